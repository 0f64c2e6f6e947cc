"""The `candlekeep` command line against a real PostgreSQL (and, for `up`, real child processes)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
import requests
from sqlalchemy import Engine

from candlekeep.bars import Interval, decimal_str
from candlekeep.cli import main
from candlekeep.instruments import Instrument
from candlekeep.sources.simulator import Simulator
from tests.utils.net import free_port

BTC = Instrument.parse("cccagg:BTC-USD")
DAY = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp())


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, engine: Engine, database_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("CANDLEKEEP_DATABASE_URL", database_url)
    monkeypatch.setenv("CANDLEKEEP_SOURCE", "simulator")
    # A backfill records its runs in the instance `up` serves; here a throwaway one under tmp_path.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path_factory.mktemp("dagster-home")))


def test_backfill_then_ohlcv_prints_the_simulators_bars(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backfill", "--instrument", BTC.id, "--start", "2024-03-01", "--end", "2024-03-03"]) == 0
    assert "2880 bars fetched" in capsys.readouterr().out

    assert main(["ohlcv", "--instrument", BTC.id, "--interval", "1h", "--start", "2024-03-01",
                 "--end", "2024-03-03", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))

    truth = [b for page in Simulator(seed=0).bars(BTC, Interval.H1, DAY, DAY + 2 * 86400) for b in page]
    assert len(rows) == 48
    assert [(r["open"], r["high"], r["low"], r["close"], r["volume"], r["quote_volume"]) for r in rows] == [
        tuple(decimal_str(v) for v in (b.open, b.high, b.low, b.close, b.volume, b.quote_volume)) for b in truth]


def test_second_backfill_changes_nothing(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["backfill", "--instrument", BTC.id, "--start", "2024-03-01", "--end", "2024-03-02"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0

    assert "0 inserted, 0 updated, 1440 unchanged" in capsys.readouterr().out


def test_ohlcv_json_lists_gaps(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ohlcv", "--instrument", BTC.id, "--start", "2024-03-01T00:00:00Z", "--end", "2024-03-01T00:05:00Z",
                 "--format", "json"]) == 0
    body = json.loads(capsys.readouterr().out)

    assert body["bars"] == [] and body["complete"] is False
    assert body["gaps"] == [{"start": "2024-03-01T00:00:00Z", "end": "2024-03-01T00:05:00Z"}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ohlcv", "--instrument", "BTC USD!", "--start", "2024-01-01", "--end", "2024-01-02"], "invalid instrument"),
        (["ohlcv", "--instrument", BTC.id, "--interval", "2m", "--start", "2024-01-01", "--end", "2024-01-02"], "invalid interval"),
        (["ohlcv", "--instrument", BTC.id, "--start", "2024-01-02", "--end", "2024-01-01"], "must be after start"),
        (["backfill", "--instrument", BTC.id, "--start", "2024-01-02", "--end", "2024-01-01"], "must be after --start"),
        (["backfill", "--instrument", BTC.id, "--start", "2023-06-01", "--end", "2024-01-02"],
         "--start 2023-06-01 is before CANDLEKEEP_HISTORY_START (2024-01-01)"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(cli_env: None, capsys: pytest.CaptureFixture[str], args: list[str],
                                                 message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err  # one line


def test_backfill_takes_iso_datetimes_and_seed_symbols_and_fills_whole_days(
        cli_env: None, engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    from candlekeep.storage.bars import BarStore

    # 06:00 on Mar 1 up to (exclusive) 00:00 Mar 2: the whole of Mar 1, nothing of Mar 2
    assert main(["backfill", "--instrument", "BTCUSD", "--start", "2024-03-01T06:00:00Z", "--end", "2024-03-02"]) == 0
    assert "backfilled cccagg:BTC-USD 1m 2024-03-01..2024-03-01" in capsys.readouterr().out
    stored = BarStore(engine).read_bars(BTC.id, Interval.M1, DAY - 86_400, DAY + 2 * 86_400)
    truth = [b for page in Simulator(seed=0).bars(BTC, Interval.M1, DAY, DAY + 86_400) for b in page]
    assert [(b.start, b.close) for b in stored] == [(b.start, b.close) for b in truth]


def test_a_cli_backfill_is_a_materialization_in_the_instance_up_serves(
        cli_env: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DAGSTER_HOME (a user's shell): the backfill records its runs in data_dir/dagster, the instance
    `candlekeep up` serves in the UI (runs and events in PostgreSQL), not in a throwaway one."""
    import dagster as dg

    monkeypatch.delenv("DAGSTER_HOME")
    monkeypatch.setenv("CANDLEKEEP_DATA_DIR", str(tmp_path))
    instrument = "coinbase:SOL-USD"  # the `dagster` database is shared by this server's tests: an instrument of its own
    try:
        assert main(["backfill", "--instrument", instrument, "--start", "2024-03-01", "--end", "2024-03-02"]) == 0
        with dg.DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
            events = instance.fetch_materializations(dg.AssetKey("bars_1m"), limit=1000).records
            keys = {str(e.asset_materialization.partition) for e in events}
            assert instance.has_dynamic_partition("instruments", instrument)
    finally:
        os.environ.pop("DAGSTER_HOME", None)  # set by the command for its own process
        os.environ.pop("CANDLEKEEP_DAGSTER_PG_URL", None)
    assert f"2024-03-01|{instrument}" in keys


def test_bad_configuration_names_the_variable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CANDLEKEEP_INSTRUMENTS", "cccagg:BTC-USD,nonsense")

    assert main(["migrate"]) == 2
    assert "instruments" in capsys.readouterr().err


def test_track_without_kafka_marks_the_instrument_tracked_for_the_running_coordinator(
        cli_env: None, engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    from candlekeep.storage.instruments import InstrumentStore

    assert main(["track", "coinbase:ETHUSD"]) == 0

    assert "track coinbase:ETH-USD: sent" in capsys.readouterr().out
    assert "coinbase:ETH-USD" in InstrumentStore(engine).list_ids(tracked_only=True)


def test_track_refuses_an_instrument_the_source_does_not_know(
        cli_env: None, engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    from candlekeep.storage.instruments import InstrumentStore

    assert main(["track", "cccagg:FOO-BAR"]) == 2
    err = capsys.readouterr().err
    assert "unknown instrument cccagg:FOO-BAR" in err and "nothing tracked" in err and "Traceback" not in err
    assert InstrumentStore(engine).list_ids() == []


def test_untrack_without_kafka_keeps_the_bars(cli_env: None, engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    from candlekeep.storage.bars import BarStore
    from candlekeep.storage.instruments import InstrumentStore
    from tests.utils.bars import make_bar

    assert main(["track", "coinbase:ETH-USD"]) == 0
    BarStore(engine).upsert_bars([make_bar("coinbase:ETH-USD", 1_704_067_200, "2300")])
    assert main(["untrack", "coinbase:ETHUSD"]) == 0
    assert "untrack coinbase:ETH-USD: sent" in capsys.readouterr().out
    assert InstrumentStore(engine).list_ids(tracked_only=True) == []
    assert len(BarStore(engine).read_bars("coinbase:ETH-USD", "1m", 1_704_067_200, 1_704_067_260)) == 1


@pytest.mark.slow
def test_up_serves_dagster_and_the_api_and_ctrl_c_stops_everything(database_url: str, tmp_path: Path) -> None:
    api_port, dagster_port = free_port(), free_port()
    env = dict(os.environ, CANDLEKEEP_DATABASE_URL=database_url, CANDLEKEEP_DATA_DIR=str(tmp_path),
               CANDLEKEEP_API_PORT=str(api_port), CANDLEKEEP_DAGSTER_PORT=str(dagster_port),
               CANDLEKEEP_STREAM_PORT_BASE="0")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "candlekeep.cli", "up"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = _wait_for(f"http://127.0.0.1:{api_port}/health", proc)
        assert health.json()["database"] == "ok"
        assert _wait_for(f"http://127.0.0.1:{dagster_port}/server_info", proc).status_code == 200
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 4  # Dagster webserver and daemon, the API, streaming
        _wait_for_stream_bars(database_url, proc)
        # A second `up` on the same data directory says the first is running and exits, cleanly.
        second = subprocess.run([sys.executable, "-m", "candlekeep.cli", "up"], cwd=root, env=env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert second.returncode == 1, second.stderr
        assert f"already running on data directory {tmp_path.resolve()} (pid {proc.pid})" in second.stderr
        assert "Traceback" not in second.stderr + second.stdout
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "Dagster UI" in output
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def _wait_for_stream_bars(database_url: str, proc: subprocess.Popen, timeout: float = 150) -> None:
    """The live simulator feed reaches the bars table: the first minute closes within ~2 minutes."""
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "candlekeep up exited early"
            if conn.execute("SELECT count(*) FROM bars WHERE source = 'stream'").fetchone()[0] > 0:
                return
            time.sleep(1)
    raise AssertionError(f"no stream bars within {timeout} s")


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 90) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"candlekeep up exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            response = requests.get(url, timeout=2)
            if response.status_code < 500:
                return response
        except (requests.ConnectionError, requests.Timeout):  # a slow answer while it starts under load
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def test_up_refuses_a_data_directory_another_process_holds_and_ignores_a_stale_lock_file(tmp_path: Path) -> None:
    """The lock is an flock on <data dir>/up.lock: held by a live process it stops a second `up`;
    a file left by a dead one (same pid text, no lock) stops nothing."""
    import fcntl

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_")}
    # Past the lock, `up` fails fast on this (nothing listens there): proof it got past the lock.
    env.update(CANDLEKEEP_DATA_DIR=str(tmp_path), CANDLEKEEP_DATABASE_URL=f"postgresql://x@127.0.0.1:{free_port()}/x")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(tmp_path / 'up.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.truncate(0); f.write(str(os.getpid())); f.flush(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        refused = subprocess.run([sys.executable, "-m", "candlekeep.cli", "up"], cwd=root, env=env,
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 1
    assert f"already running on data directory {tmp_path.resolve()} (pid {holder.pid})" in refused.stderr
    assert "Traceback" not in refused.stderr
    # The holder is dead; its pid is still in the file, but nothing holds the lock.
    assert (tmp_path / "up.lock").read_text().strip() == str(holder.pid)
    with (tmp_path / "up.lock").open() as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free
    after = subprocess.run([sys.executable, "-m", "candlekeep.cli", "up"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "already running" not in after.stderr
    assert after.returncode != 0  # it went on, to the unreachable database
