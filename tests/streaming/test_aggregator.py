"""The aggregator daemon end to end: real PostgreSQL, Redis and Kafka (and the in-process bus).

Truth is `aggregate_trades` of the unique trades sent (real recorded trades from
../shared/fixtures/trades), never the daemon's own counts. The daemon reads no clock of its own:
the tests move the log's clock by publishing heartbeats to `ticks`, as a producer does (the data is
from 2020: the clock walks through it as a live feed would). In the kill -9 test the daemon is a
subprocess (`python -m streaming.aggregator`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text

from candlekeep.bars import NS_PER_S, Bar, Interval, Trade
from candlekeep.cache import BarCache, bar_key, forming_key, updates_channel
from candlekeep.bars import Heartbeat
from candlekeep.messages import BARS, DEADLETTER, TICKS, decode_bar, encode_bar, encode_tick, encode_tick_record, topic
from candlekeep.storage.bars import BarStore
from candlekeep.storage.db import create_engine, with_database
from candlekeep.storage.migrate import upgrade
from candlekeep.storage.outages import OutageStore, from_ns
from candlekeep.storage.ticks import TickStore
from streaming.aggregator import TRANSITIONS, Aggregator
from candlekeep.bus import Bus, InProcessBus, KafkaBus, partition_for
from streaming.health import HealthServer, InvalidTransition, StateMachine
from tests.utils.redis import RedisServer
from tests.utils.ticklog import make_log, pandas_bars
from tests.utils.trades import load_freqtrade, load_tardis, reference
from tests.utils.wait import eventually

MIN_NS = 60 * NS_PER_S
LATENESS_NS = 2 * NS_PER_S


# --- harness -------------------------------------------------------------------------------------


class Clock:
    """The log's clock, moved the way a live source moves it: setting `ns` publishes a heartbeat at
    that time for each attached instrument (nothing before `attach`)."""

    def __init__(self, ns: int) -> None:
        self._ns = ns
        self.feed: Feed | None = None
        self.instruments: list[str] = []

    def attach(self, feed: Feed, instruments: Sequence[str]) -> Clock:
        self.feed, self.instruments = feed, sorted(set(instruments))
        return self

    def beat(self) -> None:
        if self.feed is not None:
            self.feed.beat(self.instruments, self._ns)

    @property
    def ns(self) -> int:
        return self._ns

    @ns.setter
    def ns(self, value: int) -> None:
        self._ns = value
        self.beat()


def micro(trade: Trade) -> Trade:
    """The trade as stored (times truncated to the microsecond, as the daemon does)."""
    return replace(trade, ts_ns=trade.ts_ns - trade.ts_ns % 1000, received_ns=None)




def stored_bars(engine: Engine, instrument: str, start: int, end: int) -> list[Bar]:
    """Bars in PostgreSQL, revision zeroed (the database counts its own changes)."""
    return [replace(b, revision=0) for b in BarStore(engine).read_bars(instrument, Interval.M1, start, end)]


def tick_count(engine: Engine, instrument: str | None = None) -> int:
    with engine.connect() as conn:
        sql = "SELECT count(*) FROM ticks" + (" WHERE instrument = :i" if instrument else "")
        return conn.execute(text(sql), {"i": instrument}).scalar_one()


def sample(registry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def make(bus: Bus, engine: Engine, prefix: str, clock: Clock | None = None, cache: BarCache | None = None,
         **kw) -> Aggregator:  # fmt: skip
    """An aggregator on `bus`; `clock` is only the test's (the daemon takes none)."""
    kw.setdefault("flush_interval_s", 0.05)
    kw.setdefault("poll_timeout_s", 0.05)
    return Aggregator(bus, BarStore(engine), TickStore(engine), cache, prefix=prefix, **kw)


@contextmanager
def running(aggregator: Aggregator) -> Iterator[Aggregator]:
    stop = threading.Event()
    thread = threading.Thread(target=aggregator.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield aggregator
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), "the aggregator did not stop"


class Feed:
    """Publishes ticks (or raw values) to the `ticks` topic and counts them."""

    def __init__(self, bus: Bus, prefix: str) -> None:
        self.topic = topic(prefix, TICKS)
        self.producer = bus.producer(name="test-feed")
        self.sent = 0

    def send(self, trades: Sequence[Trade]) -> None:
        for t in trades:
            self.producer.publish(self.topic, t.instrument, encode_tick(t))
        self.sent += len(trades)
        assert self.producer.flush(30) == 0

    def beat(self, instruments: Sequence[str], ts_ns: int) -> None:
        for instrument in instruments:
            self.producer.publish(self.topic, instrument, encode_tick_record(Heartbeat(instrument, ts_ns, "test")))
        self.sent += len(instruments)
        assert self.producer.flush(30) == 0

    def send_raw(self, key: str, value: bytes) -> None:
        self.producer.publish(self.topic, key, value)
        self.sent += 1
        assert self.producer.flush(30) == 0


def consumed(*members: Aggregator, count: int) -> Callable[[], bool]:
    """Offsets up to `count` records committed (single-partition topic, or summed over partitions
    as the members of a group committed them) and nothing pending."""
    def check() -> bool:
        committed: dict[tuple[str, int], int] = {}
        for member in members:
            for tp, offset in member.committed.items():
                committed[tp] = max(offset, committed.get(tp, 0))
        idle = all(m.health()["pending_trades"] == 0 and m.health()["pending_bars"] == 0 for m in members)
        return sum(committed.values()) >= count and idle
    return check


def settled(engine: Engine, instrument: str, expected: list[Bar], lo: int, hi: int) -> None:
    """Eventually the stored bars of [lo, hi) are `expected` (then asserted, for the diff)."""
    try:
        eventually(lambda: stored_bars(engine, instrument, lo, hi) == expected, timeout=20, what="bars")
    finally:
        assert stored_bars(engine, instrument, lo, hi) == expected


def live_schedule(trades: list[Trade], *, step_min: int, seed: int) -> list[list[Trade]]:
    """Trades grouped by arrival step of `step_min` event minutes: some arrive a step late (after
    their bar closed: revisions), some twice (duplicates), each step shuffled (out of order)."""
    rng = random.Random(seed)
    lo = trades[0].ts_ns // MIN_NS
    steps: list[list[Trade]] = [[] for _ in range((trades[-1].ts_ns // MIN_NS - lo) // step_min + 2)]
    for t in trades:
        k = (t.ts_ns // MIN_NS - lo) // step_min
        steps[k + (rng.random() < 0.03)].append(t)
        if rng.random() < 0.05:
            steps[min(k + rng.randrange(0, 2), len(steps) - 1)].append(t)
    for step in steps:
        rng.shuffle(step)
    return steps


def play(feed: Feed, aggregator: Aggregator, clock: Clock, steps: list[list[Trade]], *, start_ns: int,
         step_min: int, between: Callable[[int], None] | None = None, timeout: float = 30) -> None:  # fmt: skip
    """Send each step, then move the clock to its end (+ lateness + 1 s) and wait until flushed."""
    for k, step in enumerate(steps):
        if between is not None:
            between(k)
        feed.send(step)
        clock.ns = start_ns + (k + 1) * step_min * MIN_NS + LATENESS_NS + NS_PER_S
        eventually(consumed(aggregator, count=feed.sent), timeout=timeout, what=f"step {k} consumed and flushed")


def expected_bars(trades: list[Trade], clock: Clock) -> tuple[list[Bar], int, int]:
    lo = trades[0].ts_ns // MIN_NS * 60
    hi = (clock.ns - LATENESS_NS) // MIN_NS * 60
    return reference([micro(t) for t in trades], lo, hi), lo, hi


def unique(trades: list[Trade]) -> list[Trade]:
    return list({t.trade_id: t for t in trades}.values())


# --- the happy path, on both buses ---------------------------------------------------------------


def test_bars_ticks_redis_and_health_follow_a_live_feed(bus: Bus, engine: Engine, redis_url: str,
                                                        topic_prefix: str) -> None:  # fmt: skip
    trades = load_tardis()[:2400]  # about 30 minutes
    inst = trades[0].instrument
    start_ns = trades[0].ts_ns // MIN_NS * MIN_NS
    clock = Clock(start_ns)
    steps = live_schedule(trades, step_min=3, seed=1)
    cache = BarCache.from_url(redis_url, closed_ttl_s=3600, forming_ttl_s=120)
    listener = redis.Redis.from_url(redis_url).pubsub()
    listener.subscribe(updates_channel(inst, "1m"))
    aggregator = make(bus, engine, topic_prefix, clock, cache)
    server = HealthServer(aggregator.registry, aggregator.health).start()
    feed = Feed(bus, topic_prefix)
    clock.attach(feed, [inst])
    with running(aggregator):
        play(feed, aggregator, clock, steps, start_ns=start_ns, step_min=3)
        expected, lo, hi = expected_bars(trades, clock)
        settled(engine, inst, expected, lo, hi + 3600)
        health = json.loads(urllib.request.urlopen(f"{server.url}/health", timeout=5).read())
        metrics = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read().decode()
    server.stop()
    assert tick_count(engine) == len(trades)
    # Late trades were revisions; duplicates never counted.
    reg = aggregator.registry
    sent_twice = sum(len(s) for s in steps) - len(trades)
    assert sample(reg, "candlekeep_aggregator_ticks_total", outcome="duplicate") == sent_twice > 0
    assert sample(reg, "candlekeep_aggregator_ticks_total", outcome="revised") > 0
    assert sample(reg, "candlekeep_aggregator_revisions_total") > 0
    assert sample(reg, "candlekeep_aggregator_commits_total") > 0
    with engine.connect() as conn:
        assert conn.execute(text("SELECT max(revision) FROM bars")).scalar_one() > 0

    # Redis: the closed bars with a TTL, the forming bar, and pub/sub updates.
    client = redis.Redis.from_url(redis_url)
    last = expected[-1]
    assert replace(decode_bar(client.get(bar_key(inst, "1m", last.start))), revision=0) == last
    assert 0 < client.ttl(bar_key(inst, "1m", expected[0].start)) <= 3600
    forming = cache.read_forming(inst, "1m")
    assert forming is not None and forming.start == hi and forming.close == last.close
    assert 0 < client.ttl(forming_key(inst, "1m")) <= 120
    message = eventually(lambda: listener.get_message(timeout=1, ignore_subscribe_messages=True), what="pub/sub")
    assert decode_bar(message["data"]).instrument == inst
    listener.close()

    # Health and metrics over HTTP.
    assert health["daemon"] == "aggregator" and health["healthy"] is True
    assert health["state"] in ("consuming", "flushing") and health["last_transition"]["to"] in ("consuming", "flushing")
    assert health["lag"] >= 0 and health["last_message_age_s"] is not None
    assert 'candlekeep_aggregator_state{candlekeep_aggregator_state="error"} 0.0' in metrics
    assert "candlekeep_aggregator_consumer_lag" in metrics and "candlekeep_aggregator_last_message_age_seconds" in metrics
    assert f"candlekeep_aggregator_records_total {float(feed.sent)}" in metrics
    assert aggregator.state.state == "idle"


def test_bad_messages_are_dead_lettered_with_the_reason(bus: Bus, engine: Engine, topic_prefix: str) -> None:
    trades = load_freqtrade()
    inst, other = trades[0].instrument, "coinbase:ETH-USD"
    start_ns = trades[0].ts_ns // MIN_NS * MIN_NS
    clock = Clock(start_ns + 4 * MIN_NS + LATENESS_NS)  # the feed's 3.5 minutes are closable
    good = json.loads(encode_tick(trades[0]))
    digits = "1." + "3" * 70  # a product of two of these has more digits than the exact sums hold
    bad = {
        "not JSON": b"{not json",
        "must be positive": json.dumps({**good, "size": "-1"}).encode(),
        "invalid instrument 'BTCUSD'": json.dumps({**good, "instrument": "BTCUSD"}).encode(),
        "invalid instrument 'binance:eth-usdt'": json.dumps({**good, "instrument": "binance:eth-usdt"}).encode(),
        "trade field 'trade_id' is missing": json.dumps({k: v for k, v in good.items() if k != "trade_id"}).encode(),
        "is not the instrument id": encode_tick(replace(trades[1], instrument="binance:BTC-USDT")),
    }
    poison = {
        "more digits than the exact sums hold": json.dumps({**good, "trade_id": "p1", "price": digits,
                                                             "size": digits}).encode(),
        "ahead of the clock": json.dumps({**good, "trade_id": "p2", "ts_ns": good["ts_ns"] + 3 * 365 * 86400 * NS_PER_S,
                                          }).encode(),
    }  # fmt: skip
    # Another instrument's feed goes on through all of it, untouched.
    others = [replace(t, instrument=other, trade_id=f"o{t.trade_id}") for t in trades]
    aggregator = make(bus, engine, topic_prefix, horizon=5)
    feed = Feed(bus, topic_prefix)
    clock.attach(feed, [inst, other])
    with running(aggregator):
        feed.send(trades[:500] + others[:500])
        for value in bad.values():
            feed.send_raw(inst, value)
        for value in poison.values():
            feed.send_raw(inst, value)
        feed.send(trades[500:] + others[500:])
        clock.beat()
        eventually(consumed(aggregator, count=feed.sent), what="all consumed")
        clock.ns += 20 * MIN_NS  # the feed's minutes are past the 5-minute window now
        newest = (clock.ns - LATENESS_NS) // MIN_NS * 60 - 60
        eventually(lambda: BarStore(engine).latest_start(inst) == newest, what="quiet minutes closed")
        # A trade older than the window is valid: stored, and its bar revised from the stored ticks.
        late = replace(trades[0], trade_id="late-1", ts_ns=trades[0].ts_ns + 1000)
        feed.send([late])
        eventually(consumed(aggregator, count=feed.sent), what="late trade consumed")
        assert aggregator.state.state != "error"

    reader = bus.consumer(group="deadletter-reader", topics=[topic(topic_prefix, DEADLETTER)])
    letters = []
    deadline = time.monotonic() + 30
    while len(letters) < len(bad) + len(poison) and time.monotonic() < deadline:
        letters += [json.loads(r.value) for r in reader.poll_batch(max_records=100, timeout=0.5)]
    reader.close()
    assert len(letters) == len(bad) + len(poison)  # nothing dead-lettered for lateness
    for (reason, value), letter in zip([*bad.items(), *poison.items()], letters, strict=True):
        assert reason in letter["error"], letter
        assert base64.b64decode(letter["payload"]) == value
        assert letter["topic"] == topic(topic_prefix, TICKS) and letter["offset"] >= 500
    reg = aggregator.registry
    assert sample(reg, "candlekeep_aggregator_deadletters_total", reason="invalid") == len(bad)
    assert sample(reg, "candlekeep_aggregator_deadletters_total", reason="poison") == len(poison)
    assert sample(reg, "candlekeep_aggregator_too_late_trades_total") == 1
    # The good trades around the bad ones are all there, with the late one in its bar; the other
    # instrument's bars are exactly its trades'.
    lo = start_ns // NS_PER_S
    expected = reference([micro(t) for t in trades + [late]], lo, lo + 300)
    assert stored_bars(engine, inst, lo, lo + 300) == expected
    assert stored_bars(engine, other, lo, lo + 300) == reference([micro(t) for t in others], lo, lo + 300)
    assert tick_count(engine, inst) == len(trades) + 1 and tick_count(engine, other) == len(others)


def test_replaying_the_topic_changes_nothing(bus: Bus, engine: Engine, topic_prefix: str) -> None:
    trades = load_freqtrade()
    inst = trades[0].instrument
    start_ns = trades[0].ts_ns // MIN_NS * MIN_NS
    clock = Clock(start_ns)
    feed = Feed(bus, topic_prefix)
    clock.attach(feed, [inst])
    steps = live_schedule(trades, step_min=1, seed=2)
    with running(make(bus, engine, topic_prefix, clock)) as first:
        play(feed, first, clock, steps, start_ns=start_ns, step_min=1)
        feed.send(trades)  # the whole feed again, after everything closed
        eventually(consumed(first, count=feed.sent), what="second copy consumed")
    with engine.connect() as conn:
        before = conn.execute(text("SELECT bucket, revision, updated_at FROM bars ORDER BY bucket")).all()
    expected, lo, hi = expected_bars(trades, clock)
    assert stored_bars(engine, inst, lo, hi) == expected

    # Another group reads the same log from the start: every trade has the same outcome (the log's
    # clock, not arrival, decides), and every bar it writes is what PostgreSQL already holds.
    with running(make(bus, engine, topic_prefix, clock, group=f"{topic_prefix}replay")) as replay:
        eventually(consumed(replay, count=feed.sent), what="replay consumed")
    for outcome in ("open", "revised", "duplicate"):
        assert sample(replay.registry, "candlekeep_aggregator_ticks_total", outcome=outcome) == sample(
            first.registry, "candlekeep_aggregator_ticks_total", outcome=outcome), outcome
    assert sample(replay.registry, "candlekeep_aggregator_ticks_total", outcome="duplicate") >= len(trades)
    with engine.connect() as conn:
        after = conn.execute(text("SELECT bucket, revision, updated_at FROM bars ORDER BY bucket")).all()
    assert after == before
    assert tick_count(engine) == len(trades)


def test_rebalance_hands_instruments_over_without_loss(bus: Bus, engine: Engine, topic_prefix: str) -> None:
    base = load_freqtrade()
    names = ["binance:ETH-USDT", "kraken:ETH-USD", "coinbase:ETH-USD", "bitstamp:ETH-USD"]
    assert len({partition_for(n, 2) for n in names}) == 2
    trades = sorted((replace(t, instrument=n, trade_id=f"{i}{t.trade_id}") for i, n in enumerate(names) for t in base),
                    key=lambda t: t.ts_ns)  # fmt: skip
    start_ns = trades[0].ts_ns // MIN_NS * MIN_NS
    clock = Clock(start_ns)
    steps = live_schedule(trades, step_min=1, seed=3)
    feed = Feed(bus, topic_prefix)
    clock.attach(feed, names)
    first = make(bus, engine, topic_prefix, clock, ticks_partitions=2)
    second = make(bus, engine, topic_prefix, clock, ticks_partitions=2)
    with ExitStack() as both:
        both.enter_context(running(first))
        for k, step in enumerate(steps):
            if k == 1:
                both.enter_context(running(second))  # joins: one partition moves over
            if k == 3:
                both.close()  # the first member leaves: the second takes its partition back
                both.enter_context(running(second))
            feed.send(step)
            clock.ns = start_ns + (k + 1) * MIN_NS + LATENESS_NS + NS_PER_S
            eventually(consumed(first, second, count=feed.sent), timeout=60, what=f"step {k}")
        for name in names:
            mine = [t for t in trades if t.instrument == name]
            expected, lo, hi = expected_bars(mine, clock)
            settled(engine, name, expected, lo, hi)
    assert sample(second.registry, "candlekeep_aggregator_records_total") > 0
    assert tick_count(engine) == len(trades)


def test_restart_after_a_crash_between_writing_ticks_and_bars(engine: Engine, topic_prefix: str) -> None:
    """A previous run stored ticks of a flush but crashed before its bars and its commit: the restart
    rebuilds from the ticks, re-issues the stale bar, and counts the re-read records once."""
    trades = load_freqtrade()
    inst = trades[0].instrument
    lo = trades[0].ts_ns // MIN_NS * 60
    assert trades[499].ts_ns // MIN_NS * 60 > lo  # the first 500 cover minute 0 entirely
    TickStore(engine).insert_trades(trades[:500])
    stale = reference([micro(t) for t in trades[:100]], lo, lo + 60)  # minute 0 as an earlier flush saw it
    BarStore(engine).upsert_bars(stale)
    bus = InProcessBus()
    clock = Clock(trades[-1].ts_ns // MIN_NS * MIN_NS + MIN_NS + LATENESS_NS)
    feed = Feed(bus, topic_prefix)
    clock.attach(feed, [inst])
    bus.ensure_topics([feed.topic])
    feed.send(trades)  # nothing committed, no stream state saved: all of it is read again
    clock.beat()
    aggregator = make(bus, engine, topic_prefix, clock)
    with running(aggregator):
        eventually(consumed(aggregator, count=feed.sent), what="consumed")
        expected, lo, hi = expected_bars(trades, clock)
        settled(engine, inst, expected, lo, hi)
    # The stored ticks are absorbed by the table's key; the stale bar is replaced.
    assert sample(aggregator.registry, "candlekeep_aggregator_ticks_stored_total") == len(trades) - 500
    assert tick_count(engine) == len(trades)
    bus.close()


# --- faults --------------------------------------------------------------------------------------


def test_redis_outage_bars_still_reach_postgres_then_redis_catches_up(engine: Engine, tmp_path: Path,
                                                                       topic_prefix: str) -> None:  # fmt: skip
    own = RedisServer(tmp_path)
    own.start()
    bus = InProcessBus()
    trades = load_freqtrade()
    inst = trades[0].instrument
    start_ns = trades[0].ts_ns // MIN_NS * MIN_NS
    clock = Clock(start_ns)
    cache = BarCache.from_url(own.url, retry_after_s=0.2)
    aggregator = make(bus, engine, topic_prefix, clock, cache)
    steps = live_schedule(trades, step_min=1, seed=4)
    feed = Feed(bus, topic_prefix)
    clock.attach(feed, [inst])
    with running(aggregator):
        play(feed, aggregator, clock, steps[:2], start_ns=start_ns, step_min=1)
        own.stop()
        play(feed, aggregator, clock, steps[2:], start_ns=start_ns + 2 * MIN_NS, step_min=1)
        expected, lo, hi = expected_bars(trades, clock)
        settled(engine, inst, expected, lo, hi)  # PostgreSQL has everything
        health = aggregator.health()
        assert health["cache"]["available"] is False and health["cache"]["backlog"] > 0
        assert health["healthy"] is True  # Redis is a cache: the daemon is fine
        own.start()  # an empty Redis: the backlog fills it in
        eventually(lambda: aggregator.health()["cache"]["backlog"] == 0, what="redis caught up")
        for bar in expected[-3:]:
            cached = cache.read_bar(inst, "1m", bar.start)
            assert cached is not None and replace(cached, revision=0) == bar
        assert cache.read_forming(inst, "1m").start == hi
    own.stop()
    bus.close()


def test_after_a_crash_between_the_database_write_and_the_publish_redis_equals_postgres(
    engine: Engine, redis_url: str, topic_prefix: str
) -> None:
    """A crash after PostgreSQL took a flush but before Redis and `bars` got it leaves Redis older
    than the database (re-applying the records changes nothing in PostgreSQL, so nothing would be
    published again): the restart publishes the durable state of its window."""
    redis.Redis.from_url(redis_url).flushdb()
    bus = InProcessBus()
    trades = load_freqtrade()
    inst = trades[0].instrument
    start_ns = trades[0].ts_ns // MIN_NS * MIN_NS
    clock = Clock(trades[-1].ts_ns // MIN_NS * MIN_NS + 2 * MIN_NS + LATENESS_NS)
    feed = Feed(bus, topic_prefix)
    clock.attach(feed, [inst])
    bus.ensure_topics([feed.topic])
    feed.send(trades)
    clock.beat()
    cache = BarCache.from_url(redis_url)
    with running(make(bus, engine, topic_prefix, cache=cache)) as first:
        eventually(consumed(first, count=feed.sent), what="consumed")
    stored = BarStore(engine).read_bars(inst, Interval.M1, start_ns // NS_PER_S, clock.ns // NS_PER_S)
    assert len(stored) >= 4
    # What the crash leaves: Redis holds an older version of every bar (the publish never happened).
    client = redis.Redis.from_url(redis_url)
    for bar in stored:
        older = replace(bar, volume=bar.volume + 1, revision=max(bar.revision - 1, 0))
        client.set(bar_key(inst, "1m", bar.start), encode_bar(older))
    with running(make(bus, engine, topic_prefix, cache=cache)) as second:
        eventually(lambda: all(cache.read_bar(inst, "1m", b.start) == b for b in stored), what="redis caught up")
        assert second.health()["pending_trades"] == 0
    for bar in stored:
        assert cache.read_bar(inst, "1m", bar.start) == bar  # the very revision PostgreSQL holds
    cache.close()
    bus.close()


def test_postgres_outage_stops_commits_then_resumes_without_loss(pg_admin_url: str, topic_prefix: str) -> None:
    name = f"candlekeep_outage_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(pg_admin_url, name)
    upgrade(url)
    engine = create_engine(url)
    bus = InProcessBus()
    trades = load_tardis()[:1200]
    inst = trades[0].instrument
    start_ns = trades[0].ts_ns // MIN_NS * MIN_NS
    clock = Clock(start_ns)
    aggregator = make(bus, engine, topic_prefix, clock, max_backoff_s=0.5)
    steps = live_schedule(trades, step_min=3, seed=5)
    feed = Feed(bus, topic_prefix)
    clock.attach(feed, [inst])

    def switch(allowed: bool) -> None:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
            if not allowed:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

    try:
        with running(aggregator):
            play(feed, aggregator, clock, steps[:2], start_ns=start_ns, step_min=3)
            commits = sample(aggregator.registry, "candlekeep_aggregator_commits_total")
            switch(False)
            clock.ns = start_ns + 12 * MIN_NS + LATENESS_NS + NS_PER_S
            feed.send(steps[2] + steps[3])
            eventually(lambda: aggregator.state.state == "error", what="error state")
            time.sleep(1.5)  # several retries, none commits
            assert aggregator.health()["healthy"] is False and aggregator.health()["pending_trades"] > 0
            assert sample(aggregator.registry, "candlekeep_aggregator_commits_total") == commits
            assert sample(aggregator.registry, "candlekeep_aggregator_flush_failures_total") >= 2
            switch(True)
            eventually(lambda: aggregator.state.state != "error" and consumed(aggregator, count=feed.sent)(),
                       what="recovered")  # fmt: skip
            play(feed, aggregator, clock, steps[4:], start_ns=start_ns + 12 * MIN_NS, step_min=3)
            expected, lo, hi = expected_bars(trades, clock)
            settled(engine, inst, expected, lo, hi)
        assert tick_count(engine) == len(trades)
    finally:
        engine.dispose()
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        bus.close()


def test_broker_restart_mid_stream_loses_nothing(kafka_broker, engine: Engine, topic_prefix: str) -> None:
    bus = KafkaBus(kafka_broker.bootstrap)
    trades = load_tardis()[:1200]
    inst = trades[0].instrument
    start_ns = trades[0].ts_ns // MIN_NS * MIN_NS
    clock = Clock(start_ns)
    aggregator = make(bus, engine, topic_prefix, clock, max_backoff_s=1)
    steps = live_schedule(trades, step_min=3, seed=6)
    feed = Feed(bus, topic_prefix)
    clock.attach(feed, [inst])

    def between(k: int) -> None:
        if k == 3:
            kafka_broker.restart(hard=True)

    try:
        with running(aggregator):
            play(feed, aggregator, clock, steps, start_ns=start_ns, step_min=3, between=between, timeout=90)
            expected, lo, hi = expected_bars(trades, clock)
            settled(engine, inst, expected, lo, hi)
        assert tick_count(engine) == len(trades)
    finally:
        kafka_broker.start()  # leave it running for the other tests
        bus.close()


def all_bars(engine: Engine) -> dict[tuple[str, int], tuple]:
    """Every stored bar's values (revision and update time are the database's own)."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT instrument, extract(epoch FROM bucket)::bigint, open::text, high::text, low::text, close::text,"
            " volume::text, quote_volume::text, trades, source, final FROM bars ORDER BY 1, 2")).all()  # fmt: skip
    return {(r[0], r[1]): tuple(r[2:]) for r in rows}


def all_ticks(engine: Engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT instrument, ts, trade_id, price::text, size::text, side, source FROM ticks ORDER BY 1, 2, 3"))]


def as_row(bar: Bar) -> tuple:
    return (str(bar.open), str(bar.high), str(bar.low), str(bar.close), str(bar.volume), str(bar.quote_volume),
            bar.trades, bar.source, bar.final)  # fmt: skip


def test_the_same_log_gives_the_same_bars_through_kill_9_and_a_fresh_group(
    kafka_bootstrap: str, engine: Engine, database_url: str, pg_admin_url: str, redis_url: str, topic_prefix: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Real trades, heartbeats and a producer death (tests/utils/ticklog.py) go to `ticks` in
    random batches while `python -m streaming.aggregator` is killed with SIGKILL at random moments
    and restarted. The stored bars equal the pandas reference (flat bars and the gap included), the
    gap is one `outages` row, Redis equals PostgreSQL, and a fresh consumer group on an empty
    database stores exactly the same bars and ticks."""
    rng = random.Random(11)
    log, gaps = make_log(seed=7)
    truth = pandas_bars(log)
    chunks, k = [], 0
    while k < len(log):
        n = rng.choice([1, 7, 40, 150, 600])
        chunks.append(log[k:k + n])
        k += n

    env = {**os.environ, "CANDLEKEEP_DATABASE_URL": database_url, "CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "CANDLEKEEP_REDIS_URL": redis_url, "CANDLEKEEP_TOPIC_PREFIX": topic_prefix}  # fmt: skip
    log_path = tmp_path / "aggregator.log"

    def launch() -> subprocess.Popen:
        with log_path.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "streaming.aggregator", "--port", "-1", "--flush-interval", "0.2",
                 "--instance-id", "kill-test"],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
            )  # fmt: skip

    bus = KafkaBus(kafka_bootstrap)
    feed = Feed(bus, topic_prefix)
    bus.ensure_topics([feed.topic, topic(topic_prefix, BARS), topic(topic_prefix, DEADLETTER)])
    proc = launch()
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{topic_prefix}aggregator"})

    def committed() -> int:
        return probe.committed([TopicPartition(feed.topic, 0)], timeout=5)[0].offset

    kills = sorted(rng.sample(range(3, len(chunks) - 2), min(4, len(chunks) - 5)))
    try:
        for k, chunk in enumerate(chunks):
            for record in chunk:
                feed.producer.publish(feed.topic, record.instrument, encode_tick_record(record))
            assert feed.producer.flush(30) == 0
            feed.sent += len(chunk)
            if k == 2:  # the first run got going: from here on a kill always loses some work
                eventually(lambda: committed() > 0, timeout=60, what="first commit")
            time.sleep(rng.uniform(0.05, 0.35))
            if k in kills:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                before = committed()
                proc = launch()
                # The restart resumed and moved on before the next kill (it always loses work then).
                eventually(lambda before=before: committed() > before or committed() == feed.sent, timeout=60,
                           what="the restart committed")  # fmt: skip
        eventually(lambda: committed() == feed.sent, timeout=120, what="all offsets committed")
        expected = {key: as_row(bar) for key, bar in truth.items()}
        eventually(lambda: all_bars(engine) == expected, timeout=30, what="bars equal the reference")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        probe.close()
        if proc.poll() is None:
            proc.kill()
    assert all_bars(engine) == expected
    unique_trades = {(r.instrument, r.trade_id) for r in log if isinstance(r, Trade)}
    assert tick_count(engine) == len(unique_trades)
    assert log_path.read_text().count("restored") >= len(kills)  # each restart resumed from its state
    # The dead feed is one outage row, exactly where the contract puts it; and no bar inside it.
    (btc, (gap_start, gap_end)), = gaps.items()
    outages = OutageStore(engine).list(instrument=btc)
    assert [(o.started_at, o.ended_at, o.reason) for o in outages] == [
        (from_ns(gap_start), from_ns(gap_end), "producer started")]
    # Redis holds no older revision than PostgreSQL.
    cache = BarCache.from_url(redis_url)
    for (instrument, start), _ in list(expected.items())[-20:]:
        (stored,) = BarStore(engine).read_bars(instrument, Interval.M1, start, start + 60)
        cached = cache.read_bar(instrument, "1m", start)
        assert cached is not None and cached == stored, (instrument, start)

    # A fresh consumer group over the same log, on an empty database: the same bars and ticks.
    name = f"candlekeep_fresh_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(pg_admin_url, name)
    upgrade(url)
    fresh = create_engine(url)
    try:
        second = make(bus, fresh, topic_prefix, group=f"{topic_prefix}second", max_records=97)
        with running(second):
            eventually(consumed(second, count=feed.sent), timeout=120, what="fresh group consumed")
        assert all_bars(fresh) == all_bars(engine)
        assert all_ticks(fresh) == all_ticks(engine)
    finally:
        fresh.dispose()
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        bus.close()


def test_state_machine_validates_logs_and_serves_health(caplog: pytest.LogCaptureFixture) -> None:
    """The aggregator's states through streaming.health: allowed moves only, each one logged with its
    fields, exported as a Prometheus enum, and /health answering 503 while in error."""
    registry = CollectorRegistry()
    machine = StateMachine("aggregator", TRANSITIONS, initial="idle", registry=registry,
                           routine={("consuming", "flushing"), ("flushing", "consuming")})  # fmt: skip
    caplog.set_level(logging.DEBUG, logger="streaming.health")
    with pytest.raises(InvalidTransition, match="idle -> flushing"):
        machine.to("flushing")
    assert machine.to("consuming", reason="started", topic="t.ticks") is True
    assert machine.to("consuming") is False  # already there: no transition, no log line
    machine.to("flushing")
    machine.to("error", reason="OperationalError: down")
    lines = [(r.levelno, r.from_state, r.to_state, r.reason) for r in caplog.records if hasattr(r, "to_state")]
    assert lines == [(logging.INFO, "idle", "consuming", "started"), (logging.DEBUG, "consuming", "flushing", ""),
                     (logging.WARNING, "flushing", "error", "OperationalError: down")]  # fmt: skip
    assert "topic='t.ticks'" in caplog.records[0].getMessage()
    assert registry.get_sample_value("candlekeep_aggregator_state", {"candlekeep_aggregator_state": "error"}) == 1
    assert registry.get_sample_value("candlekeep_aggregator_state_transitions_total",
                                     {"from_state": "flushing", "to_state": "error"}) == 1  # fmt: skip
    server = HealthServer(registry, lambda: machine.health(lag=5)).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"{server.url}/health", timeout=5)
        assert answer.value.code == 503
        body = json.loads(answer.value.read())
        assert body["state"] == "error" and body["healthy"] is False and body["lag"] == 5
        assert body["last_transition"]["reason"] == "OperationalError: down"
        machine.to("consuming", reason="recovered")
        assert json.loads(urllib.request.urlopen(f"{server.url}/health", timeout=5).read())["healthy"] is True
    finally:
        server.stop()


def test_state_machine_fail_enters_error_once_then_logs_each_retry(caplog: pytest.LogCaptureFixture) -> None:
    """`fail` is the daemons' shared error handling: the first failure is the transition into
    error, each further one (still in error) one retry warning; the reason is returned."""
    registry = CollectorRegistry()
    machine = StateMachine("aggregator", TRANSITIONS, initial="idle", registry=registry)
    machine.to("consuming")
    daemon_log = logging.getLogger("streaming.aggregator")
    caplog.set_level(logging.INFO, logger="streaming")
    assert machine.fail(OSError("down"), failures=1, logger=daemon_log) == "OSError: down"
    assert machine.fail(ValueError("still down"), failures=2, logger=daemon_log) == "ValueError: still down"
    assert machine.state == "error" and machine.last_transition["reason"] == "OSError: down"
    assert registry.get_sample_value("candlekeep_aggregator_state_transitions_total",
                                     {"from_state": "consuming", "to_state": "error"}) == 1  # fmt: skip
    transition, retry = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (transition.name, transition.to_state) == ("streaming.health", "error")
    assert retry.name == "streaming.aggregator" and retry.failures == 2 and retry.error == "ValueError: still down"
    assert retry.getMessage() == "aggregator retry 2 failed: ValueError: still down"
    machine.to("consuming", reason="recovered")
    machine.fail(OSError("again"), failures=1)  # out of error: a transition again, no retry line
    assert machine.state == "error" and len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3
