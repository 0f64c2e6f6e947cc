"""The aggregator daemon: `ticks` -> 1m bars on the log's clock -> PostgreSQL, Redis, `bars` topic.

    python -m streaming.aggregator [--port 9102] [--lateness 2] [--flush-interval 0.5]

Consumer group `aggregator` (with the topic prefix) on `ticks`. It is thin glue around the pure core
candlekeep.live.BarBuilder (one per instrument): each record (trade, heartbeat or disconnect;
DESIGN.md "Kafka topics") is decoded and fed to its instrument's builder, which closes buckets on
the instrument's own clock (the largest time of its trades and heartbeats) and reports gaps. No
wall clock decides a bar: wall time only paces the flushes. So the same log gives the same bars at
any speed, in any batching, after any crash. Bad records (unparseable, poison: digits the exact
sums cannot hold, a time a day ahead of the clock) go to `deadletter` with the reason, and every
other record goes on.

Every `flush_interval` the batch is cut (builders sealed) and made durable in this order; only then
are its offsets committed:
    1. its trades -> `ticks` (TickStore: COPY, idempotent); a trade older than the builder's
       window (`TOO_LATE`) is stored like any other and its bar is revised from the stored ticks
    2. its closed and revised bars -> `bars` (upsert; source "stream", final=false); the upsert
       says which were written and with which revision (a provisional bar refused over a final
       one reaches no consumer)
    3. its gaps -> `outages`, one row per instrument (the coordinator refills closed ones)
    4. the written bars -> the `bars` topic and Redis (closed keys + forming); dead letters delivered
    5. `stream_state`: per instrument, the next offset, the clock and the closed-until bucket
    6. commit the offsets
Steps 1-3 run on a writer thread while the loop keeps consuming into the next batch (one batch in
flight; a batch past `flush_max_trades` waits for it); 4-6 run on the loop's thread. A failure
anywhere enters `error`: nothing is committed, the failed batch goes back in front of the next, and
the flush is retried after a bounded backoff (0.5 s doubling to 30 s). Redis down never fails a
flush (candlekeep.cache keeps a backlog, catches up).

Startup is recovery (kdb+ `r.q`): for each instrument of an assigned partition with a
`stream_state` row (eagerly; lazily on an instrument's first record) the builder is restored from
it: the closed-until bucket and clock from the row, the window's trades from `ticks`, its stream
bars from `bars`, the previous close from the last tick before the window, the gaps from
`outages`. Records of the instrument before the row's offset are skipped: the state holds them
(steps 1-4 are idempotent, so a crash before step 5 replays them harmlessly, but a disconnect
applied twice would open a second gap). The restored window's bars are published again, so Redis
and `bars` never hold an older revision than PostgreSQL. On revoke the batch is flushed and
committed before the partitions go, and their instruments' builders are dropped.

Scaling out: the group's members share the partitions of `ticks`, which is keyed by instrument id,
so an instrument's records, builder and `stream_state` row belong to the one member holding its
partition (`--partitions` when the topic is created; a member restores an instrument it is given).
Members are processes: the per-record work is Python and holds the GIL.

Memory: per instrument, the ids of the trades of the last `horizon` minutes (60) and of the open
buckets, plus one Bar per closed minute of that window; on top of that the batch being written and
the one being filled (up to `flush_max_trades` trades each) and librdkafka's prefetch (16 MiB).
The cyclic collector runs rarely (`main`): records make no cycles, and at the default thresholds
it walked the batches' trades several times a batch.

State (one block):
    state        idle | consuming | flushing | error (StateMachine; every transition logged)
    _builders    instrument -> BarBuilder, for instruments of held partitions
    _source      instrument -> (topic, partition) its records come from
    _skip_below  instrument -> first offset its restored state does not include
    _batch       what the next flush makes durable: trades, too-late buckets, bars (latest version
                 per bucket), gaps, stream states, offsets; `_retry` the records a failure left unread
    _inflight    the batch being written (batch, future, cut time), at most one
    committed    the offsets this member committed last, per partition
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Engine

from candlekeep.bars import NS_PER_S, Bar, Interval, Trade, aggregate_trades, iso_utc
from candlekeep.cache import BarCache
from candlekeep.live import DEFAULT_HORIZON, DEFAULT_LATENESS_NS, DEFAULT_MAX_AHEAD_NS, BarBuilder, Gap, Outcome, Poison
from candlekeep.messages import BARS, DEADLETTER, TICKS, MessageError, decode_tick_record, encode_bar, encode_deadletter
from candlekeep.messages import topic as topic_name
from candlekeep.logs import configure as configure_logs
from candlekeep.settings import Settings
from candlekeep.storage.bars import BarStore
from candlekeep.storage.outages import OutageStore, from_ns, to_ns
from candlekeep.storage.stream_state import StreamState, StreamStateStore
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
    late: set[tuple[str, int]] = field(default_factory=set)  # (instrument, bucket) to revise from storage
    bars: dict[tuple[str, int], Bar] = field(default_factory=dict)
    gaps: dict[tuple[str, int], Gap] = field(default_factory=dict)
    states: dict[str, StreamState] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    records: int = 0
    written: list[Bar] = field(default_factory=list)  # set by the writer: the bars PostgreSQL took
    # instrument -> its last record applied, made a StreamState when the batch is cut (`seal_states`):
    # one state per instrument and batch instead of one per record
    last: dict[str, Record] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.trades or self.bars or self.offsets or self.gaps or self.states or self.last)

    def seal_states(self, builders: dict[str, BarBuilder]) -> None:
        """The stream state of every instrument with a record in the batch, as its builder stands."""
        for instrument, record in self.last.items():
            builder = builders[instrument]
            self.states[instrument] = StreamState(instrument, record.topic, record.partition, record.offset + 1,
                                                  builder.clock_ns, builder.closed_until)  # fmt: skip
        self.last = {}

    def sorted_bars(self) -> list[Bar]:
        return sorted(self.bars.values(), key=lambda b: (b.instrument, b.start))

    def merge(self, newer: _Batch) -> _Batch:
        """This (older, uncommitted) batch followed by `newer`: newer versions and offsets win."""
        return _Batch(self.trades + newer.trades, self.late | newer.late, {**self.bars, **newer.bars},
                      {**self.gaps, **newer.gaps}, {**self.states, **newer.states},
                      {**self.offsets, **newer.offsets}, self.records + newer.records,
                      last={**self.last, **newer.last})  # fmt: skip


class Aggregator:
    def __init__(
        self,
        bus: Bus,
        bar_store: BarStore,
        tick_store: TickStore,
        cache: BarCache | None = None,
        *,
        prefix: str = "",
        outages: OutageStore | None = None,
        states: StreamStateStore | None = None,
        lateness_ns: int = DEFAULT_LATENESS_NS,
        horizon: int = DEFAULT_HORIZON,
        max_ahead_ns: int = DEFAULT_MAX_AHEAD_NS,
        flush_interval_s: float = 0.5,
        max_records: int = 10_000,
        flush_max_trades: int = 100_000,
        poll_timeout_s: float = 0.1,
        ticks_partitions: int = 1,
        max_backoff_s: float = 30.0,
        group: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.bus, self.bar_store, self.tick_store, self.cache = bus, bar_store, tick_store, cache
        self.outages = outages or OutageStore(bar_store.engine)
        self.states = states or StreamStateStore(bar_store.engine)
        self.ticks_topic = topic_name(prefix, TICKS)
        self.bars_topic = topic_name(prefix, BARS)
        self.deadletter_topic = topic_name(prefix, DEADLETTER)
        self.lateness_ns, self.horizon, self.max_ahead_ns = lateness_ns, horizon, max_ahead_ns
        self.flush_interval_s, self.max_records, self.flush_max_trades = flush_interval_s, max_records, flush_max_trades
        self.poll_timeout_s, self.ticks_partitions = poll_timeout_s, ticks_partitions
        self.max_backoff_s = max_backoff_s
        self.group = group or topic_name(prefix, GROUP)  # prefixed like the topics it reads
        self.registry = registry or CollectorRegistry()
        self.state = StateMachine("aggregator", TRANSITIONS, initial="idle", registry=self.registry,
                                  routine={("consuming", "flushing"), ("flushing", "consuming")})  # fmt: skip
        self._builders: dict[str, BarBuilder] = {}
        self._source: dict[str, tuple[str, int]] = {}
        self._skip_below: dict[str, int] = {}
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
        self.m_too_late = Counter(f"{p}_too_late_trades", "Trades older than the window, revised from storage",
                                  registry=r)  # fmt: skip
        self.m_gaps = Counter(f"{p}_gaps", "Gaps (disconnect spans) opened, per instrument", registry=r)
        self.m_bars = Counter(f"{p}_bars_written", "Bars PostgreSQL holds as written by a flush (new, changed or identical)",
                              registry=r)  # fmt: skip
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
        self.m_open_gaps = Gauge(f"{p}_open_gaps", "Instruments whose feed is in a gap now", registry=r)
        self.m_open_gaps.set_function(lambda: sum(1 for b in self._builders.values() if b.gap_open))
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
        if self.cache is not None:
            if touched:
                builders = [b for i in touched if (b := self._builders.get(i))]
                self.cache.put(closed=[c for b in builders for c in b.closing],
                               forming=[f for b in builders if (f := b.forming)])  # fmt: skip
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
        batch = self._batch
        for i, record in enumerate(records):
            try:
                self._ingest_one(record, touched)
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
        return touched

    def _ingest_one(self, record: Record, touched: set[str]) -> None:
        try:
            item = decode_tick_record(record.value)
        except MessageError as exc:
            self._deadletter(record, str(exc), "invalid")
            return
        instrument = item.instrument
        if record.key != instrument:
            self._deadletter(record, f"key {record.key!r} is not the instrument id {instrument!r}", "invalid")
            return
        builder = self._builders.get(instrument)
        if builder is None:
            builder = self._restore(instrument)
        where = (record.topic, record.partition)
        if self._source.get(instrument) == where and record.offset < self._skip_below.get(instrument, -1):
            return  # the durable state already holds this record
        self._source[instrument] = where
        batch = self._batch
        try:
            outcome, changed = builder.feed(item)
        except Poison as exc:
            self._deadletter(record, str(exc), "poison")
        else:
            if isinstance(item, Trade):
                assert outcome is not None
                self._outcomes[outcome] += 1
                if outcome is Outcome.TOO_LATE:
                    self.m_too_late.inc()
                    batch.late.add((instrument, Interval.M1.floor(item.ts_ns // NS_PER_S)))
                if outcome is not Outcome.DUPLICATE:
                    batch.trades.append(item)
            for bar in changed:
                batch.bars[(instrument, bar.start)] = bar
            for gap in builder.take_gaps():
                if gap.end_ns is None:
                    self.m_gaps.inc()
                batch.gaps[(instrument, gap.start_ns)] = gap
            touched.add(instrument)
        batch.last[instrument] = record

    def _deadletter(self, record: Record, error: str, reason: str) -> None:
        assert self._producer is not None
        self.m_deadletters.labels(reason).inc()
        log.warning("dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, error,
                    extra={"topic": record.topic, "partition": record.partition, "offset": record.offset,
                           "error": error})  # fmt: skip
        value = encode_deadletter(topic_name=record.topic, partition=record.partition, offset=record.offset,
                                  error=error, payload=record.value)  # fmt: skip
        self._publish(self.deadletter_topic, record.key or "", value)

    # -- flush -------------------------------------------------------------------------------

    def _flush(self, *, wait: bool = False) -> None:
        """Cut the batch and hand it to the writer; commit a written batch (see the module doc).

        One batch is written at a time, on the writer thread, while the loop keeps consuming into
        the next; its bars are published, its state saved and its offsets committed here, on the
        loop's thread, once it is durable. `wait`: return only when everything cut so far is committed.
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
        batch.seal_states(self._builders)
        for builder in self._builders.values():
            builder.seal()  # what the batch holds is the published version; a change is revision + 1
        self._batch = _Batch()
        self._inflight = (batch, self._writer.submit(self._write, batch), time.monotonic())
        if wait or self._flush_failed:
            self._finish()

    def _write(self, batch: _Batch) -> None:
        """The durable part, on the writer thread: trades, bars, gaps (each idempotent)."""
        if batch.trades:
            self.m_ticks_stored.inc(self.tick_store.insert_trades(batch.trades))
        bars = batch.sorted_bars() + self._revised_from_storage(batch.late)
        batch.written = self.bar_store.upsert_written(bars) if bars else []
        self.m_bars.inc(len(batch.written))
        for gap in batch.gaps.values():
            self.outages.record(source=gap.source, started_at=from_ns(gap.start_ns), instruments=[gap.instrument],
                                ended_at=None if gap.end_ns is None else from_ns(gap.end_ns),
                                reason=gap.reason)  # fmt: skip

    def _revised_from_storage(self, late: set[tuple[str, int]]) -> list[Bar]:
        """Bars of buckets older than the builders' windows, from every stored tick of the bucket
        (the late ones were stored just before)."""
        out = []
        for instrument, bucket in sorted(late):
            trades = self.tick_store.read_trades(instrument, bucket * NS_PER_S, (bucket + 60) * NS_PER_S)
            bars = aggregate_trades(trades, Interval.M1, bucket, bucket + 60, instrument=instrument, source="stream")
            out += [dataclasses.replace(b, final=False) for b in bars]  # the stream's bars are provisional
        return out

    def _finish(self) -> None:
        """Wait for the batch in flight to be durable, publish its bars, save the stream state, then
        commit its offsets.

        On failure nothing is committed: the batch goes back in front of the one being filled
        (merged, newest versions winning) and `run` retries it after a backoff.
        """
        assert self._inflight is not None and self._producer is not None and self._consumer is not None
        batch, future, began = self._inflight
        try:
            future.result()
            bars = batch.written
            for bar in bars:
                self._publish(self.bars_topic, bar.instrument, encode_bar(bar))
            if self.cache is not None:
                self.cache.put(closed=bars, forming=[f for b in self._builders.values() if (f := b.forming)])
            undelivered = self._producer.flush(10)
            if undelivered:
                raise FlushError(f"{undelivered} bar or dead-letter messages not delivered")
            self.states.save(self.group, batch.states.values())
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

    def _restore(self, instrument: str, state: StreamState | None = None) -> BarBuilder:
        """A builder for `instrument` resumed from its `stream_state` row (see the module doc)."""
        builder = BarBuilder(instrument, lateness_ns=self.lateness_ns, horizon=self.horizon, resolution_ns=1000,
                             max_ahead_ns=self.max_ahead_ns)  # fmt: skip
        if state is None:
            state = self.states.load(self.group, [instrument]).get(instrument)
        self._builders[instrument] = builder
        if state is None:
            return builder  # new to this group: nothing closed, no previous close (a gap)
        self._source[instrument] = (state.topic, state.partition)
        self._skip_below[instrument] = state.next_offset
        if state.closed_until is None:  # records seen, nothing closed: the open buckets' trades
            clock = state.clock_ns or 0
            recent = self.tick_store.read_trades(instrument, clock - self.horizon * 60 * NS_PER_S, clock + _FAR_NS)
            builder.restore(closed_until=None, clock_ns=state.clock_ns, trades=recent)
            return builder
        closed_until = state.closed_until
        window = builder.window_start(closed_until)
        assert window is not None
        far = (max(closed_until, (state.clock_ns or 0) // NS_PER_S) + 400 * 86_400) * NS_PER_S
        trades = self.tick_store.read_trades(instrument, window * NS_PER_S, far)
        stored = [b for b in self.bar_store.read_bars(instrument, Interval.M1, window, far // NS_PER_S)
                  if b.source == "stream"]  # fmt: skip
        before = self.tick_store.last_trade_before(instrument, window * NS_PER_S)
        base = (before.price, before.ts_ns - before.ts_ns % 1000) if before else None
        since = min(window * NS_PER_S, base[1] if base else window * NS_PER_S)
        gaps = [
            Gap(instrument, to_ns(row.started_at), None if row.ended_at is None else to_ns(row.ended_at), row.source,
                row.reason)  # fmt: skip
            for row in self.outages.list(instrument=instrument, start=from_ns(since))
        ]
        fixes = builder.restore(closed_until=closed_until, trades=trades, stored=stored, base=base,
                                clock_ns=state.clock_ns, gaps=gaps)  # fmt: skip
        for bar in fixes:  # the ticks of a flush were stored but not its bars: write them now
            self._batch.bars[(bar.instrument, bar.start)] = bar
        self._republish(builder, stored)
        log.info("restored %s: %d stored trades, closed until %s, %d gaps, %d bars re-issued", instrument,
                 len(trades), iso_utc(closed_until), len(gaps), len(fixes),
                 extra={"instrument": instrument, "trades": len(trades), "fixes": len(fixes)})  # fmt: skip
        return builder

    def _republish(self, builder: BarBuilder, stored: list[Bar]) -> None:
        """Hand the durable state of the window on again, so Redis and `bars` never hold an older
        revision than PostgreSQL after a crash between a write and its publish (idempotent)."""
        if self._producer is not None:
            for bar in stored:
                self._publish(self.bars_topic, bar.instrument, encode_bar(bar))
        if self.cache is not None:
            forming = builder.forming
            self.cache.put(closed=stored, forming=[forming] if forming else [])

    def _owns(self, instrument: str, partitions: Iterable[tuple[str, int]]) -> bool:
        return (self.ticks_topic, partition_for(instrument, self.ticks_partitions)) in set(partitions)

    def _on_assign(self, partitions: list[tuple[str, int]]) -> None:
        held = set(partitions)
        for instrument, state in self.states.load(self.group).items():
            if instrument not in self._builders and (state.topic, state.partition) in held:
                self._restore(instrument, state)

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
            self._skip_below.pop(instrument, None)

    def _drop_uncommitted(self, gone: set[tuple[str, int]]) -> None:
        mine = {i for i, tp in self._source.items() if tp in gone}
        batch = self._batch
        batch.trades = [t for t in batch.trades if t.instrument not in mine]
        batch.late = {k for k in batch.late if k[0] not in mine}
        batch.bars = {k: b for k, b in batch.bars.items() if b.instrument not in mine}
        batch.gaps = {k: g for k, g in batch.gaps.items() if g.instrument not in mine}
        batch.states = {i: st for i, st in batch.states.items() if i not in mine}
        batch.last = {i: r for i, r in batch.last.items() if i not in mine}
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
        inflight = self._inflight  # once: the loop's thread replaces it while /health reads
        return self.state.health(
            # A flush being retried after a failure is no health, whatever state the retry is in.
            healthy=self.state.state != "error" and not self._flush_failed,
            lag=self._lag,
            last_message_age_s=self.last_message_age_s,
            instruments=len(self._builders),
            open_gaps=sorted(i for i, b in self._builders.items() if b.gap_open),
            clocks={i: iso_utc(b.clock_ns // NS_PER_S) for i, b in sorted(self._builders.items()) if b.clock_ns},
            # Not committed yet: the batch being filled and the one being written (a retried flush
            # is in flight while it fails again).
            pending_trades=len(self._batch.trades) + (len(inflight[0].trades) if inflight else 0),
            pending_bars=len(self._batch.bars) + (len(inflight[0].bars) if inflight else 0),
            committed={f"{t}[{p}]": offset for (t, p), offset in sorted(self.committed.items())},
            cache={"available": self.cache.available, "backlog": self.cache.backlog} if self.cache else None,
            last_error=self.last_error,
        )


# -- construction and entry point -----------------------------------------------------------------


def build(settings: Settings, bus: Bus, engine: Engine, cache: BarCache | None = None, **kw: Any) -> Aggregator:
    """The aggregator of `settings` on `bus` and `engine` (streaming.runner and `main` share it);
    `kw` are Aggregator's options (lateness_ns, horizon, flush_interval_s, ticks_partitions, ...)."""
    return Aggregator(bus, BarStore(engine), TickStore(engine), cache, prefix=settings.topic_prefix,
                      outages=OutageStore(engine), states=StreamStateStore(engine), **kw)  # fmt: skip


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
    settings = Settings()
    configure_logs(settings.log_format, settings.log_level)
    url = resolve_database_url(settings)
    upgrade(url)
    engine = create_engine(url)
    cache = BarCache.from_url(settings.redis_url) if settings.redis_url else None
    if settings.kafka_bootstrap_servers:
        # librdkafka prefetches up to 64 MiB by default: a quarter keeps the consumer fed (tens of
        # thousands of records ahead) and the resident memory that much smaller.
        consumer_config: dict[str, Any] = {"queued.max.messages.kbytes": 16_384}
        if args.instance_id:  # static membership: a restart takes over at once
            consumer_config["group.instance.id"] = args.instance_id
        bus: Bus = KafkaBus(settings.kafka_bootstrap_servers, consumer_config=consumer_config)
    else:
        bus = make_bus(settings)
    aggregator = build(
        settings, bus, engine, cache,
        lateness_ns=int(args.lateness * NS_PER_S), horizon=args.horizon, flush_interval_s=args.flush_interval,
        ticks_partitions=args.partitions,
    )  # fmt: skip
    # Every record allocates a few tracked objects (a record, a trade) and a batch holds up to
    # flush_max_trades of them: at the default thresholds the cyclic collector walks that heap
    # several times a batch. Nothing on the hot path makes cycles; collect rarely, and never the
    # startup heap (frozen).
    gc.collect()
    gc.freeze()
    gc.set_threshold(200_000, 50, 1000)
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
