"""A database built under the Timescale license, run under the Apache one: `migrate` and `/health` say so.

Under TimescaleDB (CANDLEKEEP_TEST_PG_URL pointing at one, licensed `timescale`): a chunk of `bars`
is compressed, then the same database is opened with `timescaledb.license=apache` (a libpq startup
option), where reading it fails exactly as in production (`querying compressed data is not
supported`); `candlekeep migrate` must exit 1 naming the compressed chunk and the continuous
aggregates, and `/health` must be 503 with the same in `storage`. On plain PostgreSQL (here) there
is nothing to conflict: migrate exits 0 and says nothing, `/health` reports `storage: ok`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from api.main import create_app
from candlekeep.settings import Settings
from candlekeep.storage.bars import BarStore
from candlekeep.storage.db import create_engine, describe_license_conflicts, license_conflicts, storage_features
from tests.utils.backend import backend
from tests.utils.bars import make_bar
from tests.utils.net import LOOPBACK_PEER

ROOT = Path(__file__).resolve().parents[3]


def with_options(url: str, options: str) -> str:
    return url + ("&" if "?" in url else "?") + "options=" + options.replace(" ", "%20").replace("=", "%3D")


def migrate(url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_")}
    env.update(PYTHONPATH=str(ROOT), CANDLEKEEP_DATABASE_URL=url)
    return subprocess.run([sys.executable, "-m", "candlekeep.cli", "migrate"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def health(url: str) -> tuple[int, dict]:
    app = create_app(Settings(database_url=url, redis_url=None, api_keys=[], stream_port_base=0))
    with TestClient(app, client=LOOPBACK_PEER) as client:
        response = client.get("/health")
    return response.status_code, response.json()


def test_the_sentences_name_what_cannot_be_served_and_what_to_do() -> None:
    problems = describe_license_conflicts("apache", {"bars": 3, "ticks": 0}, ["bars_1d_cagg", "bars_1h_cagg"])
    assert len(problems) == 2
    assert problems[0].startswith("3 compressed chunk(s) of bars cannot be read under timescaledb.license = 'apache'")
    assert "timescaledb.license = 'timescale'" in problems[0] and "decompress" in problems[0]
    assert "bars_1d_cagg, bars_1h_cagg" in problems[1]
    assert describe_license_conflicts("timescale", {"bars": 3}, ["bars_1h_cagg"]) == []
    assert describe_license_conflicts("apache", {}, []) == []
    assert describe_license_conflicts(None, {"bars": 1}, []) == []


def test_migrate_and_health_report_a_database_the_license_cannot_serve(engine: Engine, database_url: str) -> None:
    if backend(engine) == "native":
        assert license_conflicts(engine) == []
        done = migrate(database_url)
        assert done.returncode == 0, done.stderr
        assert "NOT USABLE" not in done.stderr
        status, body = health(database_url)
        assert (status, body["storage"]) == (200, "ok")
        return
    if storage_features(engine)["license"] != "timescale":
        pytest.fail("the TimescaleDB test server must run under timescaledb.license = 'timescale' "
                    "(the test builds a compressed chunk, then switches to apache itself)", pytrace=False)  # fmt: skip
    old = int((datetime.now(UTC) - timedelta(days=60)).timestamp()) // 60 * 60
    BarStore(engine).upsert_bars([make_bar("cccagg:BTC-USD", old, "100")])
    with engine.begin() as conn:
        conn.execute(text("SELECT compress_chunk(c, if_not_compressed => true)"
                          " FROM show_chunks('bars', older_than => INTERVAL '30 days') c"))  # fmt: skip
    apache_url = with_options(database_url, "-c timescaledb.license=apache")
    apache = create_engine(apache_url)
    try:
        with pytest.raises(Exception, match="not supported"):  # what production saw: reads fail
            BarStore(apache).read_bars("cccagg:BTC-USD", "1m", old, old + 60)
        problems = license_conflicts(apache)
        assert any("compressed chunk(s) of bars" in p for p in problems), problems
        assert any("bars_1d_cagg, bars_1h_cagg" in p for p in problems), problems
        done = migrate(apache_url)
        assert done.returncode == 1
        assert "NOT USABLE" in done.stderr and "compressed chunk(s) of bars" in done.stderr
        status, body = health(apache_url)
        assert status == 503 and body["storage"].startswith("error: ") and "compressed" in body["storage"]
    finally:
        apache.dispose()
        with engine.begin() as conn:  # leave the shared database readable for the other tests
            conn.execute(text("SELECT decompress_chunk(c, if_compressed => true) FROM show_chunks('bars') c"))
