"""`streaming.runner`: every daemon in one process over the in-process bus (threads), and supervised child
processes on a real Kafka broker; `send_track` as the CLI calls it. Real PostgreSQL, the simulator
played back 10x from a quarter of an hour ago (so bars close in event time, within seconds).

Truth: the simulator's bars for the tracked instrument's history, and the ticks the producer says it
published, counted again in the topic and in PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import psutil
from sqlalchemy import Engine, text

from candlekeep.bars import NS_PER_S, Interval, Trade
from candlekeep.instruments import Instrument
from candlekeep.messages import CONTROL, TICKS, decode_control, decode_tick_record, topic
from candlekeep.settings import Settings
from candlekeep.sources.simulator import Simulator
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.bus import KafkaBus
from streaming.runner import DAEMONS, Embedded, run_all, send_track
from tests.utils.wait import eventually

BTC, ETH = "cccagg:BTC-USD", "coinbase:ETH-USD"
ROOT = Path(__file__).resolve().parents[2]


def bar_stats(engine: Engine, instrument: str, source: str) -> tuple[int, int]:
    """(bars, trades in them) of `instrument` written by `source`."""
    with engine.connect() as conn:
        row = conn.execute(text("SELECT count(*), coalesce(sum(trades), 0) FROM bars WHERE instrument = :i"
                                " AND source = :s AND \"interval\" = '1m'"), {"i": instrument, "s": source}).one()
    return row[0], row[1]


def tick_count(engine: Engine, instrument: str | None = None) -> int:
    with engine.connect() as conn:
        sql = "SELECT count(*) FROM ticks" + (" WHERE instrument = :i" if instrument else "")
        return conn.execute(text(sql), {"i": instrument}).scalar_one()


def test_run_all_embedded_streams_tracks_and_stops_cleanly(engine: Engine, database_url: str,
                                                           topic_prefix: str) -> None:  # fmt: skip
    settings = Settings(database_url=database_url, kafka_bootstrap_servers=None, redis_url=None, source="simulator",
                        topic_prefix=topic_prefix, instruments=[BTC])  # fmt: skip
    stop = threading.Event()
    systems: list[Embedded] = []
    result: list[int] = []
    start_ns = time.time_ns() - 900 * NS_PER_S
    thread = threading.Thread(target=lambda: result.append(run_all(
        settings, speed=10, start_ns=start_ns, ports=dict.fromkeys(DAEMONS, 0), stop=stop, ready=systems.append)))
    thread.start()
    try:
        system = eventually(lambda: systems and systems[0], what="run_all started")
        for name, server in system.servers.items():  # each daemon on its own port
            assert json.load(urllib.request.urlopen(f"{server.url}/health", timeout=5))["daemon"] == name
        eventually(lambda: bar_stats(engine, BTC, "stream")[0] >= 3, what="stream bars of the configured instrument")

        # The CLI's `candlekeep track` without a broker: registered; the embedded coordinator takes it from there.
        send_track(settings, ETH)
        assert InstrumentStore(engine).list_ids(tracked_only=True) == [ETH]
        eventually(lambda: bar_stats(engine, ETH, "simulator")[0] == 1440, what="the tracked instrument's history")
        end = system.coordinator.fetched[ETH]
        history = [b for p in Simulator(0).bars(Instrument.parse(ETH), Interval.M1, end - 86_400, end) for b in p]
        stored = BarStore(engine).read_bars(ETH, Interval.M1, end - 86_400, end)
        # Fetched minutes that ended less than SETTLE_S before the fetch stay provisional.
        assert [replace(b, revision=0, final=True) for b in stored] == history
        assert [b.final for b in stored[-3:]] == [True, False, False]
        eventually(lambda: tick_count(engine, ETH) > 0, what="live ticks of the tracked instrument")
        trades_then = bar_stats(engine, BTC, "stream")[1]
        eventually(lambda: bar_stats(engine, BTC, "stream")[1] > trades_then, what="more stream bars")
    finally:
        stop.set()
        thread.join(90)
    assert not thread.is_alive() and result == [0]  # 0: every daemon stopped cleanly

    # Clean shutdown: what the producer published went through the bus into PostgreSQL, all committed.
    assert system.producer.state.state == "idle" and system.producer.health()["buffered"] == 0
    assert system.aggregator.state.state == "idle" and system.dynamic.state.state == "idle"
    ticks_topic = topic(topic_prefix, TICKS)
    reader = system.bus.consumer(group=f"count-{uuid.uuid4().hex}", topics=[ticks_topic])
    records = reader.poll_batch(max_records=10_000_000, timeout=1)
    reader.close()
    trades = [r for r in records if isinstance(decode_tick_record(r.value), Trade)]
    assert len(records) == system.aggregator.committed[(ticks_topic, 0)]  # trades, heartbeats, disconnects
    assert len(trades) == system.producer.ticks
    assert tick_count(engine) == system.producer.ticks
    assert system.coordinator.counts() == {"track:done": 1}
    assert all(not t.is_alive() for t in threading.enumerate() if t.name in DAEMONS)


def test_run_all_embedded_stops_cleanly_on_sigint(engine: Engine, database_url: str, topic_prefix: str,
                                                 tmp_path: Path) -> None:  # fmt: skip
    env = {**os.environ, "CANDLEKEEP_DATABASE_URL": database_url, "CANDLEKEEP_TOPIC_PREFIX": topic_prefix,
           "CANDLEKEEP_INSTRUMENTS": BTC, "CANDLEKEEP_SOURCE": "simulator"}  # fmt: skip
    for key in ("CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS", "CANDLEKEEP_REDIS_URL"):
        env.pop(key, None)
    log_path = tmp_path / "runner.log"
    command = [sys.executable, "-m", "streaming.runner", "all", "--speed", "10", "--start",
               str(int(time.time()) - 900), "--port-base", "-1"]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)  # fmt: skip
    try:
        eventually(lambda: tick_count(engine, BTC) > 0, timeout=60, what="ticks in PostgreSQL")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    assert "embedded streaming stopped cleanly: producer ok, coordinator ok, aggregator ok, dynamic ok" in output


def test_run_all_on_kafka_supervises_and_restarts_the_daemons(kafka_bootstrap: str, database_url: str,
                                                              engine: Engine, topic_prefix: str,
                                                              tmp_path: Path) -> None:  # fmt: skip
    env = {**os.environ, "CANDLEKEEP_DATABASE_URL": database_url, "CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "CANDLEKEEP_TOPIC_PREFIX": topic_prefix, "CANDLEKEEP_INSTRUMENTS": BTC, "CANDLEKEEP_SOURCE": "simulator"}
    env.pop("CANDLEKEEP_REDIS_URL", None)
    log_path = tmp_path / "runner.log"
    start_s = int(time.time()) - 900
    with log_path.open("wb") as log:
        command = [sys.executable, "-m", "streaming.runner", "all", "--speed", "10", "--start", str(start_s),
                   "--port-base", "0"]  # fmt: skip
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)  # fmt: skip

    def children() -> dict[str, int]:
        found = {}
        for child in psutil.Process(proc.pid).children():
            try:
                cmdline = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE and "streaming.runner" in cmdline:
                found[cmdline[cmdline.index("streaming.runner") + 1]] = child.pid
        return found

    try:
        # Exactly the four daemons: a child caught between fork() and exec() still shows the
        # supervisor's own command line (`streaming.runner all`).
        first = eventually(lambda: (c := children()) and set(c) == set(DAEMONS) and c, what="four children")
        eventually(lambda: bar_stats(engine, BTC, "stream")[0] >= 2, timeout=60, what="stream bars")
        send_track(Settings(kafka_bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix), ETH)
        eventually(lambda: bar_stats(engine, ETH, "simulator")[0] == 1440, timeout=60, what="history via coordinator")

        os.kill(first["aggregator"], signal.SIGKILL)
        again = eventually(lambda: (c := children()).get("aggregator", first["aggregator"]) != first["aggregator"]
                           and set(c) == set(DAEMONS) and c, timeout=30, what="the aggregator restarted")  # fmt: skip
        assert {n: p for n, p in again.items() if n != "aggregator"} == {
            n: p for n, p in first.items() if n != "aggregator"}  # the others kept running
        ticks, (_, trades) = tick_count(engine, BTC), bar_stats(engine, BTC, "stream")
        eventually(lambda: tick_count(engine, BTC) > ticks and bar_stats(engine, BTC, "stream")[1] > trades,
                   timeout=60, what="bars after the restart")  # fmt: skip
        eventually(lambda: tick_count(engine, ETH) > 0, timeout=30, what="live ticks of the tracked instrument")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    assert f"aggregator (pid {first['aggregator']}) exited with code -9" in output
    assert "restart 1" in output


def test_send_track_returns_once_the_command_is_on_control(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix)
    request_id = send_track(settings, ETH)
    bus = KafkaBus(kafka_bootstrap)
    try:
        consumer = bus.consumer(group=f"test-{uuid.uuid4().hex[:8]}", topics=[topic(topic_prefix, CONTROL)])
        records = eventually(lambda: consumer.poll_batch(max_records=10, timeout=0.5), what="the command")
    finally:
        bus.close()
    assert len(records) == 1 and records[0].key == ETH
    command = decode_control(records[0].value)
    assert (command.op, command.instrument, command.request_id) == ("track", ETH, request_id)
