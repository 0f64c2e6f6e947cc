"""The coordinator and the dynamic consumer on a real bus (in-process and a real Kafka broker) and a real
PostgreSQL: track, untrack, fetch, outage refills, dead letters, and history fetched once however
many coordinators and track commands there are.

The truth is the simulator's own bars for the window (`Simulator.bars`), never the daemons' counts;
the source calls are counted by a real wrapper around the simulator.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient
from sqlalchemy import Engine

from candlekeep.bars import Bar, Interval
from candlekeep.instruments import Instrument
from candlekeep.messages import (
    CONTROL,
    DEADLETTER,
    ControlCommand,
    decode_bar,
    decode_control,
    dynamic_topic,
    encode_bar,
    encode_control,
)
from candlekeep.messages import topic as topic_name
from candlekeep.sources import SourceError
from candlekeep.sources.simulator import Simulator
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.storage.outages import OutageStore
from candlekeep.bus import Bus, InProcessBus, KafkaBus, Record
from streaming.coordinator import SETTLE_S, Coordinator
from streaming.dynamic import DynamicConsumer
from streaming.health import HealthServer
from tests.utils.wait import eventually

M1 = Interval.M1
DOGE = "coinbase:DOGE-USD"


# --- harness -------------------------------------------------------------------------------------


class CountingSource:
    """The simulator, counting `bars` calls (instrument, interval, start, end); fails for `failing`."""

    def __init__(self, seed: int = 0, failing: str | None = None) -> None:
        self.inner = Simulator(seed)
        self.name = self.inner.name
        self.failing = failing
        self.calls: list[tuple[str, str, int, int]] = []
        self._lock = threading.Lock()

    def bars(self, instrument: Instrument, interval: Interval, start: int, end: int) -> Iterator[list[Bar]]:
        with self._lock:
            self.calls.append((instrument.id, Interval(interval).value, start, end))
        if instrument.id == self.failing:
            raise SourceError(f"{instrument.id}: no such market")
        return self.inner.bars(instrument, interval, start, end)


class Running:
    """A daemon's `run(stop)` on a thread."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=daemon.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), f"{type(self.daemon).__name__} did not stop"


def coordinator(bus: Bus, engine: Engine, prefix: str, source: CountingSource, **kw: Any) -> Coordinator:
    kw.setdefault("poll_timeout_s", 0.05)
    kw.setdefault("max_backoff_s", 0.2)
    return Coordinator(bus, source, InstrumentStore(engine), BarStore(engine), OutageStore(engine), prefix=prefix,
                       **kw)  # fmt: skip


def dynamic(bus: Bus, engine: Engine, prefix: str) -> DynamicConsumer:
    return DynamicConsumer(bus, BarStore(engine), InstrumentStore(engine), prefix=prefix, refresh_s=0.2,
                           poll_timeout_s=0.05, max_backoff_s=0.2)  # fmt: skip




def send(bus: Bus, prefix: str, *messages: ControlCommand | tuple[str, bytes]) -> None:
    """Publish commands (or raw (key, value) pairs) on `control` in one go, then wait for delivery."""
    name = topic_name(prefix, CONTROL)
    bus.ensure_topics([name])
    out = bus.producer(name="test-control")
    for m in messages:
        key, value = (m.instrument, encode_control(m)) if isinstance(m, ControlCommand) else m
        out.publish(name, key, value)
    assert out.flush(30) == 0 and out.failed == 0


def cmd(op: str, instrument: str, start: int | None = None, end: int | None = None) -> ControlCommand:
    return ControlCommand(op, instrument, uuid.uuid4().hex, start, end)


def read_topic(bus: Bus, name: str, *, count: int, timeout: float = 30.0, settle: float = 0.3) -> list[Record]:
    """Every record of `name` (a fresh group), once at least `count` arrived and nothing more for `settle` s."""
    consumer = bus.consumer(group=f"test-{uuid.uuid4().hex[:8]}", topics=[name])
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    quiet = None
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll_batch(max_records=5000, timeout=0.1)
            records += batch
            if len(records) >= count:
                if batch or quiet is None:
                    quiet = time.monotonic()
                elif time.monotonic() - quiet >= settle:
                    break
    finally:
        consumer.close()
    return sorted(records, key=lambda r: (r.partition, r.offset))


def simulator_bars(instrument: str, start: int, end: int, *, fetched_at: int | None = None) -> list[Bar]:
    """The simulator's bars; fetched at `fetched_at`, those ended less than SETTLE_S before are
    provisional (a fetch never makes a just-closed minute final)."""
    bars = [b for page in Simulator(0).bars(Instrument.parse(instrument), M1, start, end) for b in page]
    if fetched_at is not None:
        bars = [b if b.start + 60 <= fetched_at - SETTLE_S else replace(b, final=False) for b in bars]
    return bars


def stored(engine: Engine, instrument: str, start: int, end: int) -> list[Bar]:
    """Stored bars, revision zeroed (the database counts its own changes)."""
    return [replace(b, revision=0) for b in BarStore(engine).read_bars(instrument, M1, start, end)]


def exactly(bars: list[Bar]) -> list[bytes]:
    """Bars as their wire text: equal Decimals with different digits ('1.5' vs '1.50') differ here."""
    return [encode_bar(replace(b, revision=0)) for b in bars]


def wait_stored(engine: Engine, instrument: str, expected: list[Bar], timeout: float = 30.0) -> None:
    lo, hi = expected[0].start, expected[-1].start + 60
    try:
        eventually(lambda: stored(engine, instrument, lo, hi) == expected, timeout=timeout, what="bars stored")
    finally:
        assert exactly(stored(engine, instrument, lo, hi)) == exactly(expected)


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


# --- track ---------------------------------------------------------------------------------------


def test_track_creates_the_topic_registers_the_partition_and_publishes_the_history(
    bus: Bus, engine: Engine, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streaming")
    source = CountingSource()
    coord = coordinator(bus, engine, topic_prefix, source)
    name = dynamic_topic(topic_prefix, Instrument.parse(DOGE))
    server = HealthServer(coord.registry, coord.health).start()
    running = [Running(coord), Running(dynamic(bus, engine, topic_prefix))]  # the consumer knows no topic yet
    try:
        before = time.time()
        send(bus, topic_prefix, cmd("track", DOGE))
        eventually(lambda: coord.counts().get("track:done") == 1, what="track handled")
        after = time.time()

        if isinstance(bus, KafkaBus):  # on the broker itself
            admin = AdminClient({"bootstrap.servers": bus.bootstrap})
            assert name in admin.list_topics(timeout=10).topics
        assert InstrumentStore(engine).list_ids(tracked_only=True) == [DOGE]  # the sensor's partition

        # One fetch: the last 24 h of 1m bars up to the minute of the command.
        assert len(source.calls) == 1
        instrument, interval, start, end = source.calls[0]
        assert (instrument, interval) == (DOGE, "1m")
        assert M1.floor(int(before)) <= end <= M1.floor(int(after)) and start == end - 86_400
        expected = simulator_bars(DOGE, start, end, fetched_at=end)  # fetched within the minute after `end`
        assert len(expected) == 1440 and [b.final for b in expected[-3:]] == [True, False, False]

        records = read_topic(bus, name, count=1440)
        assert [r.key for r in records] == [DOGE] * 1440
        assert exactly([decode_bar(r.value) for r in records]) == exactly(expected)
        wait_stored(engine, DOGE, expected)  # the dynamic consumer wrote exactly those

        # Again: already set up, so nothing is fetched or published.
        send(bus, topic_prefix, cmd("track", DOGE))
        eventually(lambda: coord.counts().get("track:skipped") == 1, what="second track handled")
        assert len(source.calls) == 1
        assert len(read_topic(bus, name, count=1440)) == 1440

        health = json.load(urllib.request.urlopen(f"{server.url}/health", timeout=5))
        assert health["state"] == "active" and health["healthy"] and health["tracked"] == [DOGE]
        metrics = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read().decode()
        assert 'candlekeep_coordinator_commands_total{op="track",outcome="done"} 1.0' in metrics
        assert 'candlekeep_coordinator_commands_total{op="track",outcome="skipped"} 1.0' in metrics
        assert "candlekeep_coordinator_fetches_total 1.0" in metrics
        assert "candlekeep_coordinator_bars_published_total 1440.0" in metrics
    finally:
        for r in running:
            r.stop()
        server.stop()
    transitions = [(r.from_state, r.to_state) for r in caplog.records
                   if getattr(r, "daemon", None) == "coordinator" and hasattr(r, "to_state")]  # fmt: skip
    assert transitions == [("active", "creating-topic"), ("creating-topic", "notifying"), ("notifying", "active")]


def test_two_coordinators_and_concurrent_tracks_fetch_the_history_once(
    kafka_bootstrap: str, engine: Engine, topic_prefix: str
) -> None:
    bus = KafkaBus(kafka_bootstrap)
    source = CountingSource()
    a, b = (coordinator(bus, engine, topic_prefix, source, history_s=6 * 3600) for _ in range(2))
    members = {id(a): Running(a), id(b): Running(b)}
    consumer = Running(dynamic(bus, engine, topic_prefix))
    try:
        holder = eventually(lambda: next((c for c in (a, b) if c.health()["held"]), None), what="control assigned")
        other = b if holder is a else a
        send(bus, topic_prefix, cmd("track", DOGE), cmd("track", DOGE))  # both at once
        eventually(lambda: sum(c.counts().get("track:done", 0) + c.counts().get("track:skipped", 0)
                               for c in (a, b)) == 2, what="both tracks handled")  # fmt: skip
        assert holder.counts() == {"track:done": 1, "track:skipped": 1} and other.counts() == {}
        assert len(source.calls) == 1
        _, _, start, end = source.calls[0]
        wait_stored(engine, DOGE, simulator_bars(DOGE, start, end, fetched_at=end))

        # The holder goes; the other takes control over, recovers from PostgreSQL, and does not fetch again.
        members[id(holder)].stop()
        eventually(lambda: other.health()["held"], what="control reassigned")
        send(bus, topic_prefix, cmd("track", DOGE))
        eventually(lambda: other.counts().get("track:skipped") == 1, what="track after the takeover")
        assert len(source.calls) == 1
    finally:
        consumer.stop()
        for member in members.values():
            if member.thread.is_alive():
                member.stop()
        bus.close()


def test_untrack_clears_the_flag_and_a_new_track_fetches_only_what_is_missing(
    bus: Bus, engine: Engine, topic_prefix: str
) -> None:
    source = CountingSource()
    clock = [float(ts("2024-03-01T12:00:30"))]
    coord = coordinator(bus, engine, topic_prefix, source, history_s=3600, clock=lambda: clock[0])
    running = Running(coord)
    try:
        send(bus, topic_prefix, cmd("track", DOGE))
        eventually(lambda: coord.counts().get("track:done") == 1, what="track handled")
        send(bus, topic_prefix, cmd("untrack", DOGE))
        eventually(lambda: coord.counts().get("untrack:done") == 1, what="untrack handled")
        assert InstrumentStore(engine).list_ids(tracked_only=True) == []
        assert InstrumentStore(engine).list_ids() == [DOGE]  # still known (and a Dagster partition)

        clock[0] += 600  # tracked again ten minutes later: only those ten minutes are fetched
        send(bus, topic_prefix, cmd("track", DOGE))
        eventually(lambda: coord.counts().get("track:done") == 2, what="second track handled")
        assert InstrumentStore(engine).list_ids(tracked_only=True) == [DOGE]
        noon = ts("2024-03-01T12:00:00")
        assert [c[2:] for c in source.calls] == [(noon - 3600, noon), (noon, noon + 600)]
        records = read_topic(bus, dynamic_topic(topic_prefix, Instrument.parse(DOGE)), count=70)
        truth = (simulator_bars(DOGE, noon - 3600, noon, fetched_at=noon)
                 + simulator_bars(DOGE, noon, noon + 600, fetched_at=noon + 600))  # fmt: skip
        assert exactly([decode_bar(r.value) for r in records]) == exactly(truth)
    finally:
        running.stop()


# --- fetch ---------------------------------------------------------------------------------------


def test_fetch_ranges_go_to_their_dynamic_topics_and_into_bars(bus: Bus, engine: Engine, topic_prefix: str) -> None:
    source = CountingSource()
    coord = coordinator(bus, engine, topic_prefix, source)
    running = [Running(coord), Running(dynamic(bus, engine, topic_prefix))]
    btc, eth = "cccagg:BTC-USD", "binance:ETH-USDT"
    try:
        send(bus, topic_prefix, cmd("fetch", btc, ts("2024-03-01T12:00:00"), ts("2024-03-01T14:00:00")))
        wait_stored(engine, btc, simulator_bars(btc, ts("2024-03-01T12:00:00"), ts("2024-03-01T14:00:00")))
        # A second instrument: the consumer subscribes its new topic as well.
        send(bus, topic_prefix, cmd("fetch", eth, ts("2024-03-02T00:00:30"), ts("2024-03-02T00:30:00")))
        wait_stored(engine, eth, simulator_bars(eth, ts("2024-03-02T00:01:00"), ts("2024-03-02T00:30:00")))
        assert source.calls == [(btc, "1m", ts("2024-03-01T12:00:00"), ts("2024-03-01T14:00:00")),
                                (eth, "1m", ts("2024-03-02T00:00:30"), ts("2024-03-02T00:30:00"))]  # fmt: skip
        assert coord.counts() == {"fetch:done": 2}
        assert InstrumentStore(engine).list_ids() == [eth, btc]  # known, not tracked
        assert InstrumentStore(engine).list_ids(tracked_only=True) == []
        assert len(read_topic(bus, dynamic_topic(topic_prefix, Instrument.parse(btc)), count=120)) == 120
    finally:
        for r in running:
            r.stop()


def test_closed_outages_are_refilled_once(engine: Engine, topic_prefix: str) -> None:
    bus = InProcessBus()
    btc, eth = "cccagg:BTC-USD", "cccagg:ETH-USD"
    outages = OutageStore(engine)
    now = datetime.now(UTC)
    day = (now - timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    closed = outages.record(source="cryptocompare", started_at=day.replace(hour=0, minute=10, second=20),
                            ended_at=day.replace(hour=0, minute=14, second=5), instruments=[btc, eth],
                            reason="heartbeat stale")  # fmt: skip
    done = outages.record(source="cryptocompare", started_at=day.replace(hour=0, minute=30),
                          ended_at=day.replace(hour=0, minute=32), instruments=[btc], reason="429")  # fmt: skip
    outages.record(source="cryptocompare", started_at=now, instruments=[btc], reason="still down")  # open
    day_s = int(day.timestamp())
    BarStore(engine).upsert_bars(simulator_bars(btc, day_s + 1800, day_s + 1920))  # `done` is refilled already

    source = CountingSource()
    coord = coordinator(bus, engine, topic_prefix, source)
    running = [Running(coord), Running(dynamic(bus, engine, topic_prefix))]
    try:
        eventually(lambda: coord.counts().get("fetch:done") == 2, what="refill fetches handled")
        window = (day_s + 600, day_s + 900)  # 00:10:20 .. 00:14:05, widened to whole minutes
        assert sorted(source.calls) == [(btc, "1m", *window), (eth, "1m", *window)]
        for instrument in (btc, eth):
            wait_stored(engine, instrument, simulator_bars(instrument, *window))
        assert coord.refills == {closed, done}
    finally:
        for r in running:
            r.stop()
    # A restart finds both outages refilled in PostgreSQL and fetches nothing.
    again = coordinator(bus, engine, topic_prefix, source)
    running = [Running(again)]
    try:
        eventually(lambda: again.refills == {closed, done}, what="outages checked after the restart")
        time.sleep(0.3)
        assert len(source.calls) == 2 and again.counts() == {}
    finally:
        running[0].stop()


# --- bad input -----------------------------------------------------------------------------------


def test_bad_control_messages_and_failing_fetches_are_dead_lettered(bus: Bus, engine: Engine,
                                                                    topic_prefix: str) -> None:  # fmt: skip
    source = CountingSource(failing="cccagg:NOPE-USD")
    coord = coordinator(bus, engine, topic_prefix, source, history_s=3600, max_attempts=2)
    def raw(**fields: object) -> bytes:
        return json.dumps({"v": 1, "request_id": "r", **fields}).encode()

    btc = "cccagg:BTC-USD"
    good = raw(op="untrack", instrument=DOGE)
    bad = [
        (btc, b"\xff not json"),
        (btc, raw(op="buy", instrument=btc)),
        ("BTCUSD", raw(op="track", instrument="BTCUSD")),
        (btc, raw(op="fetch", instrument=btc, start=200, end=100)),
        ("cccagg:ETH-USD", raw(op="track", instrument=btc)),
        (btc, raw(op="track", instrument=btc, v=2)),
    ]
    running = Running(coord)
    try:
        send(bus, topic_prefix, *bad, cmd("track", "cccagg:NOPE-USD"), (DOGE, good), cmd("track", DOGE))
        eventually(lambda: coord.counts().get("track:done") == 1, what="the good track after the bad ones")
    finally:
        running.stop()
    letters = read_topic(bus, topic_name(topic_prefix, DEADLETTER), count=len(bad) + 1)
    bodies = [json.loads(r.value) for r in letters]
    assert [base64.b64decode(b["payload"]) for b in bodies[:len(bad)]] == [v for _, v in bad]
    assert [r.key for r in letters[:len(bad)]] == [k for k, _ in bad]
    assert all(b["topic"] == topic_name(topic_prefix, CONTROL) for b in bodies)
    assert [b["offset"] for b in bodies] == list(range(len(bad) + 1))
    errors = [b["error"] for b in bodies]
    assert "not JSON" in errors[0]
    assert "field 'op' must be one of track, untrack, fetch; got 'buy'" in errors[1]
    assert "invalid instrument 'BTCUSD'" in errors[2]
    assert "'end' must be after 'start'" in errors[3]
    assert "neither the instrument" in errors[4]
    assert "unsupported version 2" in errors[5]
    assert errors[6] == "track cccagg:NOPE-USD failed 2 times: cccagg:NOPE-USD: no such market"
    assert [c[0] for c in source.calls] == ["cccagg:NOPE-USD", "cccagg:NOPE-USD", DOGE]  # retried, then given up
    assert coord.counts() == {"?:deadletter": 6, "track:deadletter": 1, "untrack:done": 1, "track:done": 1}


def test_the_dynamic_consumer_dead_letters_what_is_not_a_bar_of_its_topic(engine: Engine, topic_prefix: str) -> None:
    bus = InProcessBus()
    InstrumentStore(engine).register([DOGE])
    name = dynamic_topic(topic_prefix, Instrument.parse(DOGE))
    bars = simulator_bars(DOGE, ts("2024-03-01T12:00:00"), ts("2024-03-01T12:05:00"))
    btc_bar = simulator_bars("cccagg:BTC-USD", ts("2024-03-01T12:00:00"), ts("2024-03-01T12:01:00"))[0]
    bad = [(DOGE, b"{}"), ("cccagg:BTC-USD", encode_bar(btc_bar)), ("cccagg:BTC-USD", encode_bar(bars[0]))]
    bus.ensure_topics([name])
    out = bus.producer(name="test")
    for i, bar in enumerate(bars):
        out.publish(name, DOGE, encode_bar(bar))
        if i < len(bad):
            out.publish(name, *bad[i])
    assert out.flush(5) == 0
    consumer = dynamic(bus, engine, topic_prefix)
    running = Running(consumer)
    try:
        wait_stored(engine, DOGE, bars)
        letters = read_topic(bus, topic_name(topic_prefix, DEADLETTER), count=3)
    finally:
        running.stop()
    errors = [json.loads(r.value)["error"] for r in letters]
    assert "missing required field" in errors[0]  # `{}` has no field at all
    assert errors[1] == f"a bar of cccagg:BTC-USD belongs in {topic_prefix}dynamic.cccagg.BTC-USD, not {name}"
    assert errors[2] == "key 'cccagg:BTC-USD' is not the instrument id 'coinbase:DOGE-USD'"
    assert [json.loads(r.value)["offset"] for r in letters] == [1, 3, 5]
    assert consumer.committed == {(name, 0): len(bars) + len(bad)}


def test_an_instrument_untracked_in_the_table_is_untracked_on_control(engine: Engine) -> None:
    """Without a broker, `candlekeep untrack` / DELETE /v1/instruments flip the row; the embedded
    coordinator (announce) then puts `untrack` on control, which the producer follows."""
    bus, prefix = InProcessBus(), "untrack."
    InstrumentStore(engine).register([Instrument.parse("coinbase:ETH-USD")], tracked=True)
    daemon = Running(coordinator(bus, engine, prefix, CountingSource(), announce=True, scan_interval_s=0.1))
    try:
        control = topic_name(prefix, CONTROL)
        first = read_topic(bus, control, count=1)
        assert [(decode_control(r.value).op, r.key) for r in first] == [("track", "coinbase:ETH-USD")]
        InstrumentStore(engine).set_tracked("coinbase:ETH-USD", False)
        records = read_topic(bus, control, count=2)
        ops = [(decode_control(r.value).op, r.key) for r in records]
        assert ops[:2] == [("track", "coinbase:ETH-USD"), ("untrack", "coinbase:ETH-USD")]
        assert ops.count(("untrack", "coinbase:ETH-USD")) == 1  # once, not every scan
    finally:
        daemon.stop()
        bus.close()
