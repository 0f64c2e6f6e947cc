"""The `cryptocompare` pool holds across runs: two backfills at once never call the source at once.

Two processes each run a backfill (`materialize_range`, the asset code Dagster runs) on one Dagster
instance whose storage is PostgreSQL (the repository's dagster.yaml, as `candlekeep up` and the
compose deployment use it), against a loopback CryptoCompare replaying the real recording. The
server counts requests in flight, and holds the first one until another arrives (or a while after
both processes are about to start their runs), so two runs that may fetch together do. With the
repository's pool limit (1) at most one request is ever in flight; the same two runs with the pool
limit raised to 2 (the control) do overlap, which shows the probe sees overlap when there is one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml

from candlekeep.storage.bars import BarStore
from candlekeep.storage.db import with_database
from tests.pipelines.test_dagster_yaml import dagster_storage_url
from tests.utils.fixture_server import FixtureServer, PagedHistory, Received, Reply, fixture_bytes

ROOT = Path(__file__).resolve().parents[2]
RECORDING = "ohlcv/cryptocompare_min_api_v1_histominute_BTC_USD.body.json"  # 2017-08-10 03:14 .. 08-11 03:14
CHILD = """
import sys
from datetime import date
import dagster as dg
from pipelines.assets import materialize_range
instance = dg.DagsterInstance.get()
print("ready", flush=True)
materialize_range(instrument=sys.argv[1], interval="1m", start=date(2017, 8, 10), end=date(2017, 8, 12),
                  source="cryptocompare", instance=instance)
print("done", flush=True)
"""


class Gate:
    """Counts requests in flight; holds the first until a second is in flight or `release` is due."""

    def __init__(self, history: PagedHistory) -> None:
        self.history = history
        self.inflight = self.max_inflight = self.requests = 0
        self.release_at: float | None = None  # set once both processes are about to run
        self._cond = threading.Condition()

    def __call__(self, request: Received) -> Reply:
        with self._cond:
            self.inflight += 1
            self.requests += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            self._cond.notify_all()
            if self.requests == 1:
                self._cond.wait_for(lambda: self.inflight > 1 or (self.release_at or 1e18) <= time.monotonic(),
                                    timeout=90)  # fmt: skip
        try:
            return self.history(request)
        finally:
            with self._cond:
                self.inflight -= 1

    def both_started(self, grace_s: float) -> None:
        with self._cond:
            self.release_at = time.monotonic() + grace_s
        threading.Timer(grace_s + 0.1, self._wake).start()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def two_backfills(database_url: str, dagster_url: str, dagster_home: Path, limit: int) -> Gate:
    config = yaml.safe_load((ROOT / "pipelines" / "dagster.yaml").read_text())
    config["concurrency"]["pools"]["default_limit"] = limit
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config))
    # The pool's slots exist before two runs race to create them: Dagster 1.13 creates a pool's row
    # on first use, and two runs doing it at once fail one of them (InFailedSqlTransaction). The
    # limit is the instance's own default (dagster.yaml `default_limit`), read by Dagster.
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.event_log_storage.initialize_concurrency_limit_to_default("cryptocompare")
        assert instance.event_log_storage.get_concurrency_info("cryptocompare").slot_count == limit
    gate = Gate(PagedHistory(fixture_bytes(RECORDING), 60, pad_before_listing=True))
    with FixtureServer() as server:
        server.add_handler("/data/v2/histominute", gate)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_")}
        env.update(PYTHONPATH=str(ROOT), DAGSTER_HOME=str(dagster_home), CANDLEKEEP_DATABASE_URL=database_url,
                   CANDLEKEEP_DAGSTER_PG_URL=dagster_url,
                   CANDLEKEEP_HISTORY_START="2017-08-01", CANDLEKEEP_CRYPTOCOMPARE_BASE_URL=server.url,
                   CANDLEKEEP_CRYPTOCOMPARE_API_KEY="test-key")  # fmt: skip
        procs = [subprocess.Popen([sys.executable, "-c", CHILD, instrument], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for instrument in ("cccagg:BTC-USD", "cccagg:ETH-USD")]  # fmt: skip
        try:
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr.read()
            gate.both_started(grace_s=10)
            outputs = [proc.communicate(timeout=240) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and "done" in out, err[-3000:]
    return gate


@pytest.fixture
def dagster_databases(pg_admin_url: str) -> Iterator[list[str]]:
    """Two fresh Dagster databases (psycopg2 URLs): one per scenario, so each starts without a pool."""
    names = [f"dagster_pool_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        for name in names:
            conn.execute(f'CREATE DATABASE "{name}"')
    yield [dagster_storage_url(with_database(pg_admin_url, name)) for name in names]
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.slow
def test_two_backfills_at_once_call_cryptocompare_one_at_a_time(engine, database_url, dagster_databases, tmp_path,
                                                                monkeypatch) -> None:  # fmt: skip
    home = tmp_path / "dagster-home"
    home.mkdir()
    monkeypatch.setenv("CANDLEKEEP_DAGSTER_PG_URL", dagster_databases[0])  # what dagster.yaml reads, here too
    gate = two_backfills(database_url, dagster_databases[0], home, limit=1)  # the repository's setting
    assert gate.requests >= 2 and gate.max_inflight == 1  # each run fetched, never both at once
    store = BarStore(engine)
    for instrument in ("cccagg:BTC-USD", "cccagg:ETH-USD"):  # both backfills stored the recording
        assert store.count_bars(instrument, "1m", 1502334840, 1502421240 + 60) == 1441

    shutil.rmtree(home)
    home.mkdir()
    monkeypatch.setenv("CANDLEKEEP_DAGSTER_PG_URL", dagster_databases[1])
    control = two_backfills(database_url, dagster_databases[1], home, limit=2)
    assert control.max_inflight == 2  # with room for two, the same runs do fetch at the same time
