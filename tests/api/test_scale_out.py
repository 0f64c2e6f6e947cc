"""The API as two processes (deploy/compose.yaml runs 2 replicas) sharing one Redis.

Two real `uvicorn --factory api.main:create_app` processes on the same database, Redis and API
key, requests alternating between them:
- rate limits: a token bucket of `burst` requests (refill 1 a minute) is shared: across both
  processes exactly `burst` requests pass, then both answer 429. Per-process buckets would pass
  2 x burst;
- cache: process A reads recent provisional bars (misses, written to Redis); the bars are then
  deleted from PostgreSQL; process B still answers them, from what A put in Redis, and counts hits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text

from candlekeep.storage.bars import BarStore
from tests.utils.bars import make_bar
from tests.utils.net import free_port
from tests.utils.wait import eventually

ROOT = Path(__file__).resolve().parents[2]
KEY = "ck_scale_out_1c4e"
BURST = 6
INSTRUMENT = "cccagg:BTC-USD"


@pytest.fixture
def two_apis(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[list[str]]:
    import redis

    redis.Redis.from_url(redis_url).flushdb()  # no bucket or bar left by another test
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_")}
    env.update(PYTHONPATH=str(ROOT), CANDLEKEEP_DATABASE_URL=database_url, CANDLEKEEP_REDIS_URL=redis_url,
               CANDLEKEEP_API_KEYS=KEY, CANDLEKEEP_API_RATE_LIMIT_PER_MINUTE="1", CANDLEKEEP_API_RATE_BURST=str(BURST))
    procs, urls = [], []
    for i in range(2):
        port = free_port()
        with (tmp_path / f"api-{i}.log").open("wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
                 "--port", str(port), "--log-level", "warning"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        urls.append(f"http://127.0.0.1:{port}")

    def up(url: str) -> bool:
        assert all(p.poll() is None for p in procs), [(tmp_path / f"api-{i}.log").read_text() for i in range(2)]
        try:
            return requests.get(f"{url}/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        for url in urls:
            eventually(lambda url=url: up(url), timeout=60, what=f"{url}/health")
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def cache_samples(url: str) -> dict[str, float]:
    body = requests.get(f"{url}/metrics", timeout=5).text
    return {s.labels["result"]: s.value for f in text_string_to_metric_families(body) for s in f.samples
            if s.name == "candlekeep_api_cache_requests_total"}  # fmt: skip


def test_two_processes_share_one_rate_limit_bucket(two_apis: list[str]) -> None:
    statuses = []
    for i in range(2 * BURST):
        response = requests.get(f"{two_apis[i % 2]}/udf/time", headers={"X-API-Key": KEY}, timeout=5)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
    assert statuses == [200] * BURST + [429] * BURST, statuses


def test_a_bar_one_process_cached_is_served_by_the_other(two_apis: list[str], engine: Engine) -> None:
    first, second = two_apis
    now = int(time.time()) // 60 * 60
    bars = [make_bar(INSTRUMENT, now - 60 * k, str(40_000 + k), source="stream", final=False) for k in range(10, 0, -1)]
    BarStore(engine).upsert_bars(bars)
    params = {"instrument": INSTRUMENT, "interval": "1m", "start": now - 600, "end": now}
    headers = {"X-API-Key": KEY}

    from_first = requests.get(f"{first}/v1/ohlcv", params=params, headers=headers, timeout=10)
    assert from_first.status_code == 200, from_first.text
    assert [b["close"] for b in from_first.json()["bars"]] == [str(b.close) for b in bars]
    assert cache_samples(first)["miss"] == len(bars) and cache_samples(second)["hit"] == 0

    with engine.begin() as conn:  # only Redis holds them now
        conn.execute(text("DELETE FROM bars WHERE instrument = :i"), {"i": INSTRUMENT})
    from_second = requests.get(f"{second}/v1/ohlcv", params=params, headers=headers, timeout=10)
    assert from_second.status_code == 200, from_second.text
    assert from_second.json()["bars"] == from_first.json()["bars"]
    assert cache_samples(second)["hit"] == len(bars)
