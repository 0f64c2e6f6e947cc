"""The aggregator daemon: `ticks` -> event-time 1m bars -> PostgreSQL (`ticks`, `bars`), Redis, `bars` topic.

    python -m streaming.aggregator [--port 9102] [--lateness 2] [--flush-interval 0.5]

Consumer group `aggregator` (with the topic prefix) on `ticks`. Each polled batch is decoded (bad
messages go to `deadletter` with the reason) and fed to one candlekeep.live.BarBuilder per
instrument; the builders are advanced with the clock and the forming bars go to Redis. Every
`flush_interval` the batch is cut (builders sealed: a later change is revision + 1) and made durable
in this order; only then are its offsets committed:
    1. its trades -> `ticks` (TickStore: COPY, idempotent on (instrument, ts, trade_id))
    2. its closed and revised bars -> `bars` (BarStore upsert; source "stream", final=false)
    3. those bars -> the `bars` topic and Redis (closed keys + forming), dead letters delivered
    4. commit the offsets of every record in the batch
Steps 1-2 run on a writer thread while the loop keeps consuming into the next batch (one batch in
flight; a batch past `flush_max_trades` waits for it); steps 3-4 run on the loop's thread. A failure
anywhere (PostgreSQL down, broker down) enters `error`: nothing is committed, the failed batch goes
back in front of the next, polling stops, and the flush is retried after a bounded backoff (0.5 s
doubling to 30 s). Redis down never fails a flush (candlekeep.cache keeps a backlog, catches up).

Startup is recovery (kdb+ `r.q`): a builder starts from durable state, never from scratch. For each
instrument of an assigned partition (eagerly, for those with ticks in the last `recovery_lookback_s`;
lazily, on an instrument's first record) it reads its stream bars and ticks back: the newest stored
stream bar says which buckets were closed, the ticks of the revision window rebuild the open and
recent buckets exactly, and the last tick before the window is the previous close. Records after
the committed offset are then consumed again and dropped as duplicates by trade id. So `kill -9` at
any moment, then a restart, gives exactly the bars of an uninterrupted run. On revoke the batch is
flushed and committed before the partitions go, and their instruments' builders are dropped.

Clock: the watermark is the injected wall clock while the consumer is live; while it works through
a backlog (its records are older than `catchup_s`) each builder advances with its own newest trade
time instead (never past the clock), so a restart after downtime closes bars in event time rather
than declaring the backlog too late. Trades played into `ticks` faster than real time from the past
are not a live feed: between their batches bars close up to the wall clock (replays belong on the
`replay.*` topics). Trades are ordered by their time at microsecond resolution
(the `ticks` table's), so the in-memory state equals what recovery reads back.

State (one block):
    state        idle | consuming | flushing | error (StateMachine; every transition logged)
    _builders    instrument -> BarBuilder, for instruments of held partitions
    _source      instrument -> (topic, partition) its records come from
    _event_ns    instrument -> newest trade time fed to its builder
    _batch       what the next flush makes durable: trades, bars (latest version per bucket),
                 offsets (next offset per partition); `_retry` the records a failure left unread
    _inflight    the batch being written (batch, future, cut time), at most one
    committed    the offsets this member committed last, per partition
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Engine

from candlekeep.bars import NS_PER_S, Bar, Interval, Trade
from candlekeep.cache import BarCache
from candlekeep.live import DEFAULT_HORIZON, DEFAULT_LATENESS_NS, BarBuilder, Outcome
from candlekeep.messages import BARS, DEADLETTER, TICKS, MessageError, decode_tick, encode_bar, encode_deadletter
from candlekeep.messages import topic as topic_name
from candlekeep.settings import Settings
from candlekeep.storage.bars import BarStore
from candlekeep.storage.ticks import TickStore
from candlekeep.bus import Bus, BusConsumer, BusProducer, Record, partition_for, publish_waiting
from streaming.health import HealthServer, StateMachine

log = logging.getLogger(__name__)

GROUP = "aggregator"
TRANSITIONS = {
    "idle": {"consuming", "error"},
    "consuming": {"flushing", "error", "idle"},
    "flushing": {"consuming", "error", "idle"},
    "error": {"consuming", "flushing", "idle"},
}
_FAR_NS = 400 * 86_400 * NS_PER_S  # reads "to the end": a year ahead of the clock is the end


class FlushError(RuntimeError):
    """A flush could not complete (undelivered messages); it is retried, nothing was committed."""


@dataclass
class _Batch:
    trades: list[Trade] = field(default_factory=list)
    bars: dict[tuple[str, int], Bar] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    records: int = 0

    def __bool__(self) -> bool:
        return bool(self.trades or self.bars or self.offsets)

    def sorted_bars(self) -> list[Bar]:
        return sorted(self.bars.values(), key=lambda b: (b.instrument, b.start))

    def merge(self, newer: _Batch) -> _Batch:
        """This (older, uncommitted) batch followed by `newer`: newer bar versions and offsets win."""
        return _Batch(self.trades + newer.trades, {**self.bars, **newer.bars}, {**self.offsets, **newer.offsets},
                      self.records + newer.records)  # fmt: skip


class Aggregator:
    def __init__(
        self,
        bus: Bus,
        bar_store: BarStore,
        tick_store: TickStore,
        cache: BarCache | None = None,
        *,
        prefix: str = "",
        clock: Callable[[], int] = time.time_ns,
        lateness_ns: int = DEFAULT_LATENESS_NS,
        horizon: int = DEFAULT_HORIZON,
        flush_interval_s: float = 0.5,
        max_records: int = 10_000,
        flush_max_trades: int = 100_000,
        poll_timeout_s: float = 0.1,
        ticks_partitions: int = 1,
        catchup_s: float = 10.0,
        max_future_s: float = 300.0,
        recovery_lookback_s: int = 86_400,
        max_backoff_s: float = 30.0,
        group: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.bus, self.bar_store, self.tick_store, self.cache = bus, bar_store, tick_store, cache
        self.ticks_topic = topic_name(prefix, TICKS)
        self.bars_topic = topic_name(prefix, BARS)
        self.deadletter_topic = topic_name(prefix, DEADLETTER)
        self.clock = clock
        self.lateness_ns, self.horizon = lateness_ns, horizon
        self.flush_interval_s, self.max_records, self.flush_max_trades = flush_interval_s, max_records, flush_max_trades
        self.poll_timeout_s, self.ticks_partitions = poll_timeout_s, ticks_partitions
        self.catchup_ms, self.max_future_ns = int(catchup_s * 1000), int(max_future_s * NS_PER_S)
        self.recovery_lookback_s, self.max_backoff_s = recovery_lookback_s, max_backoff_s
        self.group = group or topic_name(prefix, GROUP)  # prefixed like the topics it reads
        self.registry = registry or CollectorRegistry()
        self.state = StateMachine("aggregator", TRANSITIONS, initial="idle", registry=self.registry,
                                  routine={("consuming", "flushing"), ("flushing", "consuming")})  # fmt: skip
        self._builders: dict[str, BarBuilder] = {}
        self._source: dict[str, tuple[str, int]] = {}
        self._event_ns: dict[str, int] = {}
        self._batch = _Batch()
        self._retry: list[Record] = []
        self._consumer: BusConsumer | None = None
        self._producer: BusProducer | None = None
        self._flush_failed = False
        self._inflight: tuple[_Batch, Future[None], float] | None = None  # being written
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="aggregator-writer")
        self._failures = 0
        self._last_flush = time.monotonic()
        self._last_record_at: float | None = None  # monotonic
        self._last_record_ms: int | None = None  # its bus timestamp
        self._last_lag_at = 0.0
        self._lag = 0
        self._outcomes = dict.fromkeys(Outcome, 0)  # counted per trade, exported per batch
        self.committed: dict[tuple[str, int], int] = {}  # the offsets this member committed last
        self.last_error: str | None = None
        self._metrics()

    def _metrics(self) -> None:
        r, p = self.registry, "candlekeep_aggregator"
        self.m_records = Counter(f"{p}_records", "Records consumed from ticks", registry=r)
        self.m_ticks = Counter(f"{p}_ticks", "Trades by outcome (open, revised, duplicate, too_late)",
                               ["outcome"], registry=r)  # fmt: skip
        self.m_deadletters = Counter(f"{p}_deadletters", "Records sent to deadletter", ["reason"], registry=r)
        self.m_too_late = Counter(f"{p}_too_late_trades", "Trades older than the revision horizon", registry=r)
        self.m_bars = Counter(f"{p}_bars_written", "Bars inserted or changed in PostgreSQL", registry=r)
        self.m_revisions = Counter(f"{p}_revisions", "Revised bars published (revision > 0)", registry=r)
        self.m_ticks_stored = Counter(f"{p}_ticks_stored", "Trades newly stored in PostgreSQL", registry=r)
        self.m_commits = Counter(f"{p}_commits", "Offset commits (each after a durable flush)", registry=r)
        self.m_flush_failures = Counter(f"{p}_flush_failures", "Flushes that failed and were retried", registry=r)
        self.m_flush = Histogram(f"{p}_flush_seconds", "Seconds from cutting a batch to committing it",
                                 registry=r)  # fmt: skip
        self.m_lag = Gauge(f"{p}_consumer_lag", "Records in held partitions not yet consumed", registry=r)
        self.m_age = Gauge(f"{p}_last_message_age_seconds", "Seconds since the last record was consumed",
                           registry=r)  # fmt: skip
        self.m_age.set_function(lambda: self.last_message_age_s or 0.0)
        self.m_builders = Gauge(f"{p}_instruments", "Instruments with a live bar builder", registry=r)
        self.m_builders.set_function(lambda: len(self._builders))
        self.m_cache_backlog = Gauge(f"{p}_cache_backlog", "Redis writes waiting for Redis", registry=r)
        self.m_cache_backlog.set_function(lambda: self.cache.backlog if self.cache else 0)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set; then flush, commit and leave the group."""
        while not stop.is_set():
            try:
                if self._consumer is None:
                    self._start()
                if self._flush_failed:
                    self._flush(wait=True)
                self.step()
                if self._failures:
                    self._failures = 0
                    if self.state.state == "error":
                        self.state.to("consuming", reason="recovered")
            except Exception as exc:  # any failure: error state, back off, retry; never exit
                self._fail(exc)
                stop.wait(min(self.max_backoff_s, 0.5 * 2 ** min(self._failures - 1, 16)))
        self._shutdown()

    def step(self) -> None:
        """One poll: ingest, advance the builders, update forming bars, flush when due."""
        assert self._consumer is not None
        if self._retry:
            records, self._retry = self._retry, []
        else:
            records = self._consumer.poll_batch(max_records=self.max_records, timeout=self.poll_timeout_s)
        touched = self._ingest(records)
        touched |= self._advance(touched)
        if self.cache is not None:
            if touched:
                self.cache.put(forming=[f for i in touched if (b := self._builders.get(i)) and (f := b.forming)])
            elif self.cache.backlog:
                self.cache.catch_up()
        if self._producer is not None:
            self._producer.poll(0)
        self._measure_lag()
        full = len(self._batch.trades) >= self.flush_max_trades
        if full or time.monotonic() - self._last_flush >= self.flush_interval_s:
            self._flush(wait=full)

    def _start(self) -> None:
        self.bus.ensure_topics([self.ticks_topic], partitions=self.ticks_partitions)
        self.bus.ensure_topics([self.bars_topic, self.deadletter_topic])
        self._producer = self._producer or self.bus.producer(name="aggregator")
        self._consumer = self.bus.consumer(group=self.group, topics=[self.ticks_topic],
                                           on_assign=self._on_assign, on_revoke=self._on_revoke)  # fmt: skip
        self.state.to("consuming", reason="started", topic=self.ticks_topic, group=self.group)

    def _fail(self, exc: Exception) -> None:
        self._failures += 1
        self.last_error = self.state.fail(exc, failures=self._failures, logger=log)

    def _shutdown(self) -> None:
        try:
            if self._consumer is not None:
                self._flush(wait=True)
                self._consumer.close()  # revokes (flushing nothing new) and leaves the group
                self._consumer = None
            if self._producer is not None:
                self._producer.flush(10)
        except Exception as exc:  # nothing committed: the next run reads these records again
            log.error("aggregator stopped without flushing: %s", exc, extra={"error": str(exc)})
        self._writer.shutdown(wait=True)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="aggregator-writer")  # for a later run()
        if self.state.state != "idle":
            self.state.to("idle", reason="stopped")

    # -- ingest ------------------------------------------------------------------------------

    def _ingest(self, records: Sequence[Record]) -> set[str]:
        touched: set[str] = set()
        now = self.clock()
        batch = self._batch
        for i, record in enumerate(records):
            try:
                self._ingest_one(record, now, touched)
            except Exception:
                self._retry = list(records[i:])  # restore failed (PostgreSQL down): read these again
                raise
            batch.offsets[(record.topic, record.partition)] = record.offset + 1
            batch.records += 1
        for outcome, count in self._outcomes.items():
            if count:
                self.m_ticks.labels(outcome.value).inc(count)
                self._outcomes[outcome] = 0
        if records:
            self.m_records.inc(len(records))
            self._last_record_at = time.monotonic()
            self._last_record_ms = records[-1].timestamp_ms
        return touched

    def _ingest_one(self, record: Record, now: int, touched: set[str]) -> None:
        try:
            trade = decode_tick(record.value)
        except MessageError as exc:
            self._deadletter(record, str(exc), "invalid")
            return
        if record.key != trade.instrument:
            self._deadletter(record, f"key {record.key!r} is not the instrument id {trade.instrument!r}", "invalid")
            return
        if trade.ts_ns > now + self.max_future_ns:
            self._deadletter(record, f"trade time {_iso_ns(trade.ts_ns)} is in the future", "future")
            return
        builder = self._builders.get(trade.instrument)
        if builder is None:
            builder = self._restore(trade.instrument)
        self._source[trade.instrument] = (record.topic, record.partition)
        outcome, revised = builder.offer(trade)
        self._outcomes[outcome] += 1
        if outcome is Outcome.DUPLICATE:
            return
        if outcome is Outcome.TOO_LATE:
            self.m_too_late.inc()
            window = builder.window_start()
            self._deadletter(record, f"too late: trade at {_iso_ns(trade.ts_ns)} is before the revision window "
                                     f"(bars from {_iso_s(window)} on can still change)", "too_late")  # fmt: skip
            return
        self._batch.trades.append(trade)
        for bar in revised:
            self._batch.bars[(bar.instrument, bar.start)] = bar
        if trade.ts_ns > self._event_ns.get(trade.instrument, 0):
            self._event_ns[trade.instrument] = trade.ts_ns
        touched.add(trade.instrument)

    def _deadletter(self, record: Record, error: str, reason: str) -> None:
        assert self._producer is not None
        self.m_deadletters.labels(reason).inc()
        log.warning("dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, error,
                    extra={"topic": record.topic, "partition": record.partition, "offset": record.offset,
                           "error": error})  # fmt: skip
        value = encode_deadletter(topic_name=record.topic, partition=record.partition, offset=record.offset,
                                  error=error, payload=record.value)  # fmt: skip
        self._publish(self.deadletter_topic, record.key or "", value)

    def _advance(self, fed: set[str]) -> set[str]:
        """Close buckets: with the clock when live, in event time while working through a backlog.

        Behind: the records are old (a backlog after downtime), or an instrument was just fed trades
        older than `catchup_s` (history replayed into the topic). Then its builder advances to its
        newest trade time, so bars close as event time passes instead of all at once (which would
        make every later trade a revision).
        """
        now = self.clock()
        live = self._last_record_ms is None or now // 1_000_000 - self._last_record_ms < self.catchup_ms
        old = now - self.catchup_ms * 1_000_000
        moved = set()
        for instrument, builder in self._builders.items():
            newest = self._event_ns.get(instrument)
            if live and not (instrument in fed and newest is not None and newest < old):
                watermark = now
            elif newest is not None:
                watermark = min(now, newest)
            else:
                continue
            closed = builder.advance(watermark)
            for bar in closed:
                self._batch.bars[(bar.instrument, bar.start)] = bar
            if closed:
                moved.add(instrument)
        return moved

    # -- flush -------------------------------------------------------------------------------

    def _flush(self, *, wait: bool = False) -> None:
        """Cut the batch and hand it to the writer; commit a written batch (see the module doc).

        One batch is written at a time, on the writer thread, while the loop keeps consuming into
        the next; its bars are published and its offsets committed here, on the loop's thread, once
        it is durable. `wait`: return only when everything cut so far is committed.
        """
        if self._inflight is not None:
            if not wait and not self._inflight[1].done():
                return  # still writing: keep consuming (bounded by flush_max_trades)
            self._finish()
        self._last_flush = time.monotonic()
        batch = self._batch
        if not batch:
            self._flush_failed = False
            return
        self.state.to("flushing", reason="retry" if self._flush_failed else "interval",
                      trades=len(batch.trades), bars=len(batch.bars))  # fmt: skip
        for builder in self._builders.values():
            builder.seal()  # what the batch holds is the published version; a change is revision + 1
        self._batch = _Batch()
        self._inflight = (batch, self._writer.submit(self._write, batch), time.monotonic())
        if wait or self._flush_failed:
            self._finish()

    def _write(self, batch: _Batch) -> None:
        """The durable part, on the writer thread: trades, then bars (both idempotent)."""
        if batch.trades:
            self.m_ticks_stored.inc(self.tick_store.insert_trades(batch.trades))
        if batch.bars:
            self.m_bars.inc(self.bar_store.upsert_bars(batch.sorted_bars()).written)

    def _finish(self) -> None:
        """Wait for the batch in flight to be durable, publish its bars, then commit its offsets.

        On failure nothing is committed: the batch goes back in front of the one being filled
        (merged, newest bar versions winning) and `run` retries it after a backoff.
        """
        assert self._inflight is not None and self._producer is not None and self._consumer is not None
        batch, future, began = self._inflight
        try:
            future.result()
            bars = batch.sorted_bars()
            for bar in bars:
                self._publish(self.bars_topic, bar.instrument, encode_bar(bar))
            if self.cache is not None:
                self.cache.put(closed=bars, forming=[f for b in self._builders.values() if (f := b.forming)])
            undelivered = self._producer.flush(10)
            if undelivered:
                raise FlushError(f"{undelivered} bar or dead-letter messages not delivered")
            self._consumer.commit(batch.offsets)
        except Exception:
            self._inflight = None
            self._batch = batch.merge(self._batch)
            self._flush_failed = True
            self.m_flush_failures.inc()
            raise
        self._inflight = None
        self._flush_failed = False
        self.committed.update(batch.offsets)
        self.m_commits.inc()
        self.m_revisions.inc(sum(1 for b in bars if b.revision))
        self.m_flush.observe(time.monotonic() - began)
        self.state.to("consuming", reason="flushed")

    def _publish(self, topic: str, key: str, value: bytes) -> None:
        assert self._producer is not None
        publish_waiting(self._producer, topic, key, value)

    # -- recovery ----------------------------------------------------------------------------

    def _restore(self, instrument: str) -> BarBuilder:
        """A builder for `instrument` resumed from PostgreSQL (see the module doc)."""
        now = self.clock()
        builder = BarBuilder(instrument, lateness_ns=self.lateness_ns, horizon=self.horizon, resolution_ns=1000)
        lookback = Interval.M1.floor(now // NS_PER_S - self.recovery_lookback_s)
        end_s = now // NS_PER_S + _FAR_NS // NS_PER_S
        stored = [b for b in self.bar_store.read_bars(instrument, Interval.M1, lookback, end_s) if b.source == "stream"]
        if stored:
            closed_until = stored[-1].start + 60
        else:
            first = self.tick_store.read_trades(instrument, lookback * NS_PER_S, now + _FAR_NS)[:1]
            if not first:
                self._builders[instrument] = builder
                return builder  # new to the stream: nothing closed, no previous close (a gap)
            closed_until = Interval.M1.floor(first[0].ts_ns // NS_PER_S)
        window = builder.window_start(closed_until)
        assert window is not None
        trades = self.tick_store.read_trades(instrument, window * NS_PER_S, now + _FAR_NS)
        # The previous close carries over only when the stream's bars reach back to the window: a
        # stream that (re)started inside it had no bar before its first trade (a gap).
        before = None
        if stored and stored[0].start <= window:
            before = self.tick_store.last_trade_before(instrument, window * NS_PER_S)
        fixes = builder.restore(closed_until=closed_until, trades=trades, stored=stored,
                                base_close=before.price if before else None)  # fmt: skip
        for bar in fixes:  # the ticks of a flush were stored but not its bars: write them now
            self._batch.bars[(bar.instrument, bar.start)] = bar
        if trades:
            self._event_ns[instrument] = max(self._event_ns.get(instrument, 0), trades[-1].ts_ns)
        self._builders[instrument] = builder
        log.info("restored %s: %d stored trades, closed until %s, %d bars re-issued", instrument, len(trades),
                 _iso_s(closed_until), len(fixes),
                 extra={"instrument": instrument, "trades": len(trades), "fixes": len(fixes)})  # fmt: skip
        return builder

    def _owns(self, instrument: str, partitions: Iterable[tuple[str, int]]) -> bool:
        return (self.ticks_topic, partition_for(instrument, self.ticks_partitions)) in set(partitions)

    def _on_assign(self, partitions: list[tuple[str, int]]) -> None:
        since = (self.clock() // NS_PER_S - self.recovery_lookback_s) * NS_PER_S
        for instrument in self.tick_store.active_instruments(since):
            if instrument not in self._builders and self._owns(instrument, partitions):
                self._restore(instrument)
                self._source[instrument] = (self.ticks_topic, partition_for(instrument, self.ticks_partitions))

    def _on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Flush and commit before the partitions go; forget their instruments either way."""
        gone = set(partitions)
        try:
            self._flush(wait=True)
        except Exception as exc:  # not committed: the next holder reads those records again
            log.warning("flush before revoke failed, dropping uncommitted state of %s: %s", sorted(gone), exc,
                        extra={"error": str(exc)})  # fmt: skip
            self._drop_uncommitted(gone)
        for instrument in [i for i, tp in self._source.items() if tp in gone]:
            self._builders.pop(instrument, None)
            self._source.pop(instrument, None)
            self._event_ns.pop(instrument, None)

    def _drop_uncommitted(self, gone: set[tuple[str, int]]) -> None:
        mine = {i for i, tp in self._source.items() if tp in gone}
        batch = self._batch
        batch.trades = [t for t in batch.trades if t.instrument not in mine]
        batch.bars = {k: b for k, b in batch.bars.items() if b.instrument not in mine}
        batch.offsets = {tp: o for tp, o in batch.offsets.items() if tp not in gone}
        self._retry = [r for r in self._retry if (r.topic, r.partition) not in gone]

    # -- health ------------------------------------------------------------------------------

    def _measure_lag(self) -> None:
        if self._consumer is not None and time.monotonic() - self._last_lag_at >= 1.0:
            self._last_lag_at = time.monotonic()
            try:
                self._lag = self._consumer.lag()
            except Exception as exc:  # observability only: a broker that does not answer is no failure here
                log.debug("consumer lag unavailable: %s", exc)
                return
            self.m_lag.set(self._lag)

    @property
    def last_message_age_s(self) -> float | None:
        return None if self._last_record_at is None else round(time.monotonic() - self._last_record_at, 3)

    def health(self) -> dict[str, Any]:
        return self.state.health(
            lag=self._lag,
            last_message_age_s=self.last_message_age_s,
            instruments=len(self._builders),
            pending_trades=len(self._batch.trades),
            pending_bars=len(self._batch.bars),
            committed={f"{t}[{p}]": offset for (t, p), offset in sorted(self.committed.items())},
            cache={"available": self.cache.available, "backlog": self.cache.backlog} if self.cache else None,
            last_error=self.last_error,
        )


def _iso_ns(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns // NS_PER_S, UTC).isoformat().replace("+00:00", "Z")


def _iso_s(ts_s: int | None) -> str:
    return "-" if ts_s is None else datetime.fromtimestamp(ts_s, UTC).isoformat().replace("+00:00", "Z")


# -- construction and entry point -----------------------------------------------------------------


def build(settings: Settings, bus: Bus, engine: Engine, cache: BarCache | None = None, **kw: Any) -> Aggregator:
    """The aggregator of `settings` on `bus` and `engine` (streaming.runner and `main` share it);
    `kw` are Aggregator's options (lateness_ns, horizon, flush_interval_s, ticks_partitions, ...)."""
    return Aggregator(bus, BarStore(engine), TickStore(engine), cache, prefix=settings.topic_prefix, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m streaming.aggregator`: settings from CANDLEKEEP_* (database, Kafka, Redis, prefix)."""
    from candlekeep.storage.db import create_engine, resolve_database_url
    from candlekeep.storage.migrate import upgrade
    from candlekeep.bus import KafkaBus, make_bus

    parser = argparse.ArgumentParser(prog="streaming.aggregator", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="/health and /metrics address")
    parser.add_argument("--port", type=int, default=9102, help="/health and /metrics port (0: any, -1: none)")
    parser.add_argument("--lateness", type=float, default=2.0, help="allowed lateness, seconds")
    parser.add_argument("--horizon", type=int, default=DEFAULT_HORIZON, help="closed minutes kept for revisions")
    parser.add_argument("--flush-interval", type=float, default=0.5, help="seconds between flushes")
    parser.add_argument("--partitions", type=int, default=1, help="partitions of `ticks` when creating it")
    parser.add_argument("--instance-id", help="Kafka static group membership: a restart takes over at once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    url = resolve_database_url(settings)
    upgrade(url)
    engine = create_engine(url)
    cache = BarCache.from_url(settings.redis_url) if settings.redis_url else None
    if settings.kafka_bootstrap_servers and args.instance_id:
        bus: Bus = KafkaBus(settings.kafka_bootstrap_servers, consumer_config={"group.instance.id": args.instance_id})
    else:
        bus = make_bus(settings)
    aggregator = build(
        settings, bus, engine, cache,
        lateness_ns=int(args.lateness * NS_PER_S), horizon=args.horizon, flush_interval_s=args.flush_interval,
        ticks_partitions=args.partitions,
    )  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server = None
    if args.port >= 0:
        server = HealthServer(aggregator.registry, aggregator.health, host=args.host, port=args.port).start()
        log.info("aggregator /health and /metrics on %s", server.url)
    try:
        aggregator.run(stop)
    finally:
        if server is not None:
            server.stop()
        bus.close()
        if cache is not None:
            cache.close()
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
