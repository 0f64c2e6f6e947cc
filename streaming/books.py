"""The books daemon: `books` topic -> per-instrument L2 books -> `book_snapshots`, `book_buckets`, `book_metrics`.

    python -m streaming.books [--port 9106] [--interval 1] [--depth 25] [--flush-interval 0.5] [--writers 2]
    candlekeep stream books

Consumer group `books` (with the topic prefix) on `books`. Each record is decoded (bad ones go to
`deadletter` with the reason) and applied to its instrument's candlekeep.orderbook.OrderBook:
- a snapshot replaces the book; where the venue's connector keeps its book cut to a subscribed
  depth (`Connector.book_depth`: Kraken, 1000 per side), the daemon cuts its copy the same way after
  every delta (`venue_book_depth`). Kraken documents that a client must truncate its book to the
  subscribed depth after each update, because it sends no "qty 0" for a level that falls out of
  scope (docs.kraken.com, "Book checksum (v2)", Maintaining the book; the v1 feed the connector
  reads behaves the same and republishes, flagged "r", the level that comes back into scope). So the
  connector publishes the levels Kraken sent and no deletes for the cut ones, and only the same cut
  makes the daemon's book the connector's book, level for level. It must be the subscribed depth,
  not the snapshot's size: a shallow pair's book (fewer levels than subscribed on both sides) grows
  without anything falling out. Venues whose connector keeps every level (no book_depth) are not
  cut: their deletes come on the wire;
- a delta before any snapshot of its instrument waits: it is dropped and counted, the instrument
  stays `waiting` until its first snapshot; a delta whose `prev_sequence` is not the sequence
  the book is at is a break: the book is dropped, and the instrument waits for the next snapshot.
Outputs follow BOOK time, the records' `ts_ns`, never the wall clock. Time is cut into intervals
of `interval` (default 1 s, UTC-aligned); when an instrument's record falls in a later interval
than the one its book was last changed in, the book as it stood at the end of that interval
(every record with ts_ns < its end applied) is summarized (candlekeep.book_analytics.book_output,
ts = the interval's end) before the record is applied. Intervals without an update emit nothing.
So the outputs are a function of the log alone.

Durability and restart (kdb+ `r.q`: startup is recovery). Every `flush_interval` (or `flush_max`
outputs) the outputs due so far (each as its instrument's band of levels, exact text) go as one batch
to a writer process (`writers`, default 2, round robin), which makes them (book_output) and stores
them (BookStore, COPY, idempotent on (instrument, ts)): the Python work of the outputs and
PostgreSQL's own run beside the consuming process instead of inside it. With each batch go the
offsets a restart must read from at that point: for each partition the offset of the OLDEST
snapshot a live book of that partition was built from (the next offset when no book is live). They
are committed, by the consuming process, only once that batch and every earlier one are stored; at
most two batches per writer wait, then consuming waits. A failed write stops the writers, keeps
every output not yet stored (in order) and commits nothing past them; they are written again.
A restart reads from there: every
book is rebuilt from a snapshot, instruments whose snapshot comes later wait for it, and each output
is computed again from the same records, so it is the same row, already stored (DO NOTHING). `kill -9`
at any moment, then a restart, leaves exactly the outputs of an uninterrupted run. A venue that
publishes a snapshot every N seconds bounds the replay to about N seconds of its records.

Retention (`CANDLEKEEP_BOOK_RETENTION_DAYS`): after a flush has written and committed, the daemon
drops the day partitions of the three tables (TimescaleDB: their 1-day chunks, `drop_chunks`) that lie
wholly before `retention clock - retention days` (BookStore.drop_older_than), once per new cutoff day.
The retention clock is the EARLIER of the book clock (the largest `ts_ns` applied, the outputs' own
clock) and the wall clock. The book clock makes stored rows a function of the log: a replayed or
recorded day of 2022 (tests, bench, `--start` in the past) is kept while it is being written, not
dropped the moment it lands as a wall clock would; the wall clock bounds it, so one record stamped
far in the future cannot wipe the table. One mechanism for both backends: TimescaleDB's own
`add_retention_policy` runs on the wall clock in its job scheduler and exists only under the
Timescale (community) license, while `drop_chunks` works under either license.

State (one block):
    state      idle | syncing | consuming | error (StateMachine; every transition logged): syncing
               while some instrument seen waits for a snapshot, consuming when every one has a book
    _books     instrument -> _Live (book, sequence, interval, base offset, partition) or None: waiting
    _outputs   outputs not yet handed to the writer; _offsets the next offset per partition read so far
    _in_flight batches handed to the writers (_Batch: outputs, restart offsets, writer), oldest first
    _writers   the writer processes (_WriterProcess; spawned, one pipe each, EOF ends them)
    committed  the offsets this member committed last, per partition
    _book_clock_ns  the largest ts_ns applied; _retained_to the retention cutoff (a date) last applied
"""

from __future__ import annotations

import argparse
import decimal
import logging
import multiprocessing
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Engine

from candlekeep.bars import EXACT, NS_PER_S
from candlekeep.book_analytics import (
    BUCKET_RANGE_BPS,
    DEPTH_BPS,
    IMBALANCE_LEVELS,
    book_output,
    mid_price,
    width_for,
)
from candlekeep.books import BookDelta, BookSnapshot, Level
from candlekeep.bus import Bus, BusConsumer, BusProducer, Record, publish_waiting
from candlekeep.instruments import Instrument
from candlekeep.messages import BOOKS, DEADLETTER, MessageError, decode_book, encode_deadletter
from candlekeep.messages import topic as topic_name
from candlekeep.orderbook import OrderBook
from candlekeep.settings import Settings
from candlekeep.sources.exchanges.registry import ID_VENUES, VENUES
from candlekeep.storage.books import BookStore
from streaming.health import HealthServer, StateMachine

log = logging.getLogger(__name__)

GROUP = "books"
DEFAULT_PORT = 9106
TRANSITIONS = {
    "idle": {"syncing", "consuming", "error"},
    "syncing": {"consuming", "error", "idle"},
    "consuming": {"syncing", "error", "idle"},
    "error": {"syncing", "consuming", "idle"},
}


# One output to make: (instrument, ts_ns, sequence, verified, source, width, bids, asks), levels as text.
PendingOutput = tuple[str, int, int | None, bool, str, str, list[tuple[str, str]], list[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class _Batch:
    """Outputs handed to the writer process, and where a restart reads from once they are stored."""

    outputs: list[PendingOutput]  # empty: nothing to write (a commit only)
    restart: dict[tuple[str, int], int]
    started: float
    writer: _WriterProcess | None  # the process storing it


@dataclass
class _Live:
    """One instrument's live book and where it came from."""

    book: OrderBook
    sequence: int | None
    verified: bool
    source: str
    interval: int  # index of the interval (ts_ns // interval_ns) of its last applied change
    dirty: bool  # changed since its last output
    base: tuple[str, int, int]  # (topic, partition, offset) of the snapshot it was built from


class BooksDaemon:
    def __init__(
        self,
        bus: Bus,
        store: BookStore,
        *,
        prefix: str = "",
        interval_ns: int = NS_PER_S,
        depth: int = 25,
        widths: Mapping[str, Decimal] | None = None,
        flush_interval_s: float = 0.5,
        flush_max: int = 250,
        writers: int = 2,
        max_records: int = 5_000,
        poll_timeout_s: float = 0.1,
        max_backoff_s: float = 30.0,
        group: str | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        retention_days: int | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_ns <= 0:
            raise ValueError("interval must be positive")
        if retention_days is not None and retention_days <= 0:
            raise ValueError("retention_days must be positive (None: no retention)")
        self.retention_days, self._wall_clock = retention_days, wall_clock
        self._book_clock_ns: int | None = None
        self._retained_to: date | None = None
        self.bus, self.store = bus, store
        self.books_topic = topic_name(prefix, BOOKS)
        self.deadletter_topic = topic_name(prefix, DEADLETTER)
        self.interval_ns, self.depth, self.widths = interval_ns, depth, dict(widths or {})
        self.flush_interval_s, self.flush_max, self.max_records = flush_interval_s, flush_max, max_records
        self.poll_timeout_s, self.max_backoff_s = poll_timeout_s, max_backoff_s
        self.group = group or topic_name(prefix, GROUP)
        self.registry = registry or CollectorRegistry()
        self.state = StateMachine("books", TRANSITIONS, initial="idle", registry=self.registry)
        self._clock = clock
        self._books: dict[str, _Live | None] = {}
        self._partition: dict[str, tuple[str, int]] = {}
        self._outputs: list[PendingOutput] = []
        if writers < 1:
            raise ValueError("writers must be at least 1")
        self._writers: list[_WriterProcess] = []  # started with the consumer, or on the first write
        self.n_writers = writers
        self._next_writer = 0
        self._in_flight: deque[_Batch] = deque()
        self.max_in_flight = 2 * writers
        self._offsets: dict[tuple[str, int], int] = {}
        self._consumer: BusConsumer | None = None
        self._producer: BusProducer | None = None
        self._retry: list[Record] = []
        self._failures = 0
        self._last_flush = clock()
        self._lag = 0
        self._last_lag_at = 0.0
        self.committed: dict[tuple[str, int], int] = {}
        self.last_error: str | None = None
        self._metrics()

    def _metrics(self) -> None:
        r, p = self.registry, "candlekeep_books"
        self.m_records = Counter(f"{p}_records", "Records consumed from books", ["kind"], registry=r)
        self._count_snapshot = self.m_records.labels("snapshot").inc
        self._count_delta = self.m_records.labels("delta").inc
        self.m_waiting = Counter(f"{p}_deltas_waiting", "Deltas dropped: their instrument has no snapshot yet",
                                 registry=r)  # fmt: skip
        self.m_breaks = Counter(f"{p}_sequence_breaks", "Deltas that did not chain; the book waits for a snapshot",
                                registry=r)  # fmt: skip
        self.m_deadletters = Counter(f"{p}_deadletters", "Records sent to deadletter", registry=r)
        self.m_outputs = Counter(f"{p}_outputs", "Outputs made (snapshot + buckets + metrics each)", registry=r)
        self.m_written = Counter(f"{p}_outputs_stored", "Outputs newly stored (replays store nothing)", registry=r)
        self.m_dropped = Counter(f"{p}_retention_dropped", "Day partitions or chunks dropped by retention",
                                 registry=r)  # fmt: skip
        self.m_flush = Histogram(f"{p}_flush_seconds", "Seconds to write a batch and commit", registry=r)
        self.m_lag = Gauge(f"{p}_consumer_lag", "Records in held partitions not yet consumed", registry=r)
        self.m_books = Gauge(f"{p}_instruments", "Instruments by book state", ["book"], registry=r)
        self.m_books.labels("live").set_function(lambda: sum(1 for b in self._books.values() if b is not None))
        self.m_books.labels("waiting").set_function(lambda: sum(1 for b in self._books.values() if b is None))

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set; then write, commit and leave the group."""
        while not stop.is_set():
            try:
                if self._consumer is None:
                    self._start()
                self.step()
                if self._failures:
                    self._failures = 0
                    self._sync_state("recovered")
            except Exception as exc:  # any failure: error state, back off, retry; never exit
                self._failures += 1
                self.last_error = self.state.fail(exc, failures=self._failures, logger=log)
                stop.wait(min(self.max_backoff_s, 0.5 * 2 ** min(self._failures - 1, 16)))
        self._shutdown()

    def step(self) -> None:
        assert self._consumer is not None
        if self._retry:
            records, self._retry = self._retry, []
        else:
            records = self._consumer.poll_batch(max_records=self.max_records, timeout=self.poll_timeout_s)
        for i, record in enumerate(records):
            try:
                self._ingest(record)
            except Exception:
                self._retry = list(records[i:])
                raise
            self._offsets[(record.topic, record.partition)] = record.offset + 1
            if len(self._outputs) >= self.flush_max:  # batches stay bounded within a poll of many records
                self._submit()
        if records:
            self._sync_state("records")
        if self._producer is not None:
            self._producer.poll(0)
        self._measure_lag()
        if len(self._outputs) >= self.flush_max or self._clock() - self._last_flush >= self.flush_interval_s:
            self._submit()
        self._settle(wait=False)

    def _start(self) -> None:
        self.bus.ensure_topics([self.books_topic, self.deadletter_topic])
        self._producer = self._producer or self.bus.producer(name="books")
        self._start_writers()  # now: they import and connect while the first records are read
        self._consumer = self.bus.consumer(group=self.group, topics=[self.books_topic],
                                           on_assign=self._on_assign, on_revoke=self._on_revoke)  # fmt: skip
        self.state.to("syncing", reason="started", topic=self.books_topic, group=self.group)

    def _sync_state(self, reason: str) -> None:
        waiting = [i for i, b in self._books.items() if b is None]
        target = "syncing" if waiting or not self._books else "consuming"
        self.state.to(target, reason=reason, waiting=len(waiting))

    def _shutdown(self) -> None:
        try:
            if self._consumer is not None:
                self.flush()
                self._consumer.close()
                self._consumer = None
            if self._producer is not None:
                self._producer.flush(10)
        except Exception as exc:  # nothing committed: the next run reads these records again
            log.error("books daemon stopped without flushing: %s", exc, extra={"error": str(exc)})
        self._stop_writers()
        if self.state.state != "idle":
            self.state.to("idle", reason="stopped")

    # -- records -----------------------------------------------------------------------------

    def _ingest(self, record: Record) -> None:
        try:
            update = decode_book(record.value)
        except MessageError as exc:
            self._deadletter(record, str(exc))
            return
        if record.key != update.instrument:
            self._deadletter(record, f"key {record.key!r} is not the instrument id {update.instrument!r}")
            return
        self.apply(update, (record.topic, record.partition, record.offset))

    def apply(self, update: BookSnapshot | BookDelta, position: tuple[str, int, int]) -> None:
        """One record of the log, at `position` (topic, partition, offset), in log order."""
        instrument = update.instrument
        if instrument not in self._partition:  # keyed partitioning: an instrument stays in its partition
            self._partition[instrument] = position[:2]
        if self._book_clock_ns is None or update.ts_ns > self._book_clock_ns:
            self._book_clock_ns = update.ts_ns
        live = self._books.get(instrument)
        interval = update.ts_ns // self.interval_ns
        if live is not None and live.dirty and interval > live.interval:
            self._emit(instrument, live)
        if isinstance(update, BookSnapshot):
            self._count_snapshot()
            book = OrderBook(instrument, venue_book_depth(instrument))
            book.replace(update.bids, update.asks)
            self._books[instrument] = _Live(book, update.sequence, update.verified, update.source,
                                            max(interval, live.interval if live else interval), True, position)  # fmt: skip
            return
        self._count_delta()
        if live is None:
            if instrument not in self._books:
                log.info("%s: deltas wait for the first snapshot", instrument)
            self._books[instrument] = None
            self.m_waiting.inc()
            return
        if update.prev_sequence is not None and live.sequence is not None and update.prev_sequence != live.sequence:
            self.m_breaks.inc()
            log.warning("%s: sequence break (delta after %s, book at %s): waiting for the next snapshot", instrument,
                        update.prev_sequence, live.sequence,
                        extra={"instrument": instrument, "prev_sequence": update.prev_sequence,
                               "sequence": live.sequence})  # fmt: skip
            self._books[instrument] = None
            return
        book = live.book
        book.update(update.bids, update.asks)
        if book.depth is not None:
            book.truncate()  # the venue's subscribed depth (module doc)
        live.sequence = update.sequence if update.sequence is not None else live.sequence
        live.verified, live.source = update.verified, update.source
        live.interval = max(live.interval, interval)
        live.dirty = True

    def _emit(self, instrument: str, live: _Live) -> None:
        bids, asks = _band(live.book, max(self.depth, IMBALANCE_LEVELS[-1]), max(BUCKET_RANGE_BPS, DEPTH_BPS[-1]))
        price = mid_price(bids, asks) or next((side[0][0] for side in (bids, asks) if side), None)
        width = width_for(instrument, self.widths, price)
        ts_ns = (live.interval + 1) * self.interval_ns
        # The writer process computes the output (book_output) from the band: sent as exact text
        # (str(Decimal) and Decimal(str) round-trip every digit and exponent).
        self._outputs.append((instrument, ts_ns, live.sequence, live.verified, live.source, str(width),
                              [(str(p), str(q)) for p, q in bids], [(str(p), str(q)) for p, q in asks]))  # fmt: skip
        live.dirty = False
        self.m_outputs.inc()

    def _deadletter(self, record: Record, error: str) -> None:
        assert self._producer is not None
        self.m_deadletters.inc()
        log.warning("dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, error,
                    extra={"topic": record.topic, "partition": record.partition, "offset": record.offset,
                           "error": error})  # fmt: skip
        value = encode_deadletter(topic_name=record.topic, partition=record.partition, offset=record.offset,
                                  error=error, payload=record.value)  # fmt: skip
        publish_waiting(self._producer, self.deadletter_topic, record.key or "", value)

    # -- durability --------------------------------------------------------------------------

    def restart_offsets(self) -> dict[tuple[str, int], int]:
        """Per partition read: where a restart must read from (module doc)."""
        out = dict(self._offsets)
        for instrument, live in self._books.items():
            if live is not None:
                tp = live.base[:2]
                if tp in out:
                    out[tp] = min(out[tp], live.base[2])
        return out

    def flush(self) -> None:
        """Write the outputs made so far, then commit where a restart must read from (waits for the writer)."""
        self._submit()
        self._settle(wait=True)

    def _submit(self) -> None:
        """Hand the outputs made so far to the writer process, with where a restart must read from once they
        (and every batch before them) are stored. At most `max_in_flight` batches wait: then this waits."""
        outputs, self._outputs = self._outputs, []
        writer = None
        if outputs:
            self._start_writers()
            writer = self._writers[self._next_writer]  # round robin: each answers its own batches in order
            self._next_writer = (self._next_writer + 1) % len(self._writers)
            writer.submit((self.depth, outputs))
        self._in_flight.append(_Batch(outputs, self.restart_offsets(), time.perf_counter(), writer))
        self._last_flush = self._clock()
        while len(self._in_flight) > self.max_in_flight:
            self._settle(wait=True, limit=1)

    def _settle(self, *, wait: bool, limit: int | None = None) -> None:
        """Commit the restart offsets of the newest batch stored with all before it (waiting for each when
        `wait`; at most `limit` batches). A failed write stops the writer, puts its outputs and every later
        batch's back, in order, and raises: they are written again (idempotent), nothing past them committed."""
        stored: dict[tuple[str, int], int] | None = None
        settled = 0
        while self._in_flight and (limit is None or settled < limit):
            batch = self._in_flight[0]
            if batch.writer is not None:
                if not wait and not batch.writer.ready():
                    break
                try:
                    written = batch.writer.result()
                except Exception:
                    self._stop_writers()
                    self._outputs = [o for b in self._in_flight for o in b.outputs] + self._outputs
                    self._in_flight.clear()
                    if stored is not None:
                        self._commit(stored)
                    raise
                self.m_written.inc(written)
                self.m_flush.observe(time.perf_counter() - batch.started)
            self._in_flight.popleft()
            stored = batch.restart
            settled += 1
        if stored is not None:
            self._commit(stored)

    def _start_writers(self) -> None:
        url = self.store.engine.url.render_as_string(hide_password=False)
        while len(self._writers) < self.n_writers:
            self._writers.append(_WriterProcess(url))

    def wait_writers_started(self, timeout: float = 60.0) -> None:
        """Block until every writer process has imported and connected (benches time the work, not that)."""
        for writer in self._writers:
            writer.wait_started(timeout)

    def _stop_writers(self) -> None:
        writers, self._writers, self._next_writer = self._writers, [], 0
        for writer in writers:
            writer.close()

    def _commit(self, restart: dict[tuple[str, int], int]) -> None:
        if self._producer is not None and self._producer.flush(10):
            raise RuntimeError("dead letters not delivered; not committing")
        offsets = {tp: o for tp, o in restart.items() if o > self.committed.get(tp, -1)}
        if offsets and self._consumer is not None:
            self._consumer.commit(offsets)
            self.committed.update(offsets)
        self.apply_retention()

    def retention_clock(self) -> datetime | None:
        """The earlier of the book clock and the wall clock (module doc); None before any record."""
        if self._book_clock_ns is None:
            return None
        return datetime.fromtimestamp(min(self._book_clock_ns // NS_PER_S, int(self._wall_clock())), UTC)

    def apply_retention(self) -> None:
        """Drop what lies wholly before the cutoff, once per new cutoff day (after the outputs are safe)."""
        now = self.retention_clock()
        if self.retention_days is None or now is None:
            return
        cutoff = (now - timedelta(days=self.retention_days)).date()
        if self._retained_to is not None and cutoff <= self._retained_to:
            return
        dropped = self.store.drop_older_than(self.retention_days, now)
        self._retained_to = cutoff
        self.m_dropped.inc(dropped)
        log.info("books retention: %d partition(s) or chunk(s) before %s dropped", dropped, cutoff,
                 extra={"cutoff": cutoff.isoformat(), "dropped": dropped})  # fmt: skip

    def _on_assign(self, partitions: list[tuple[str, int]]) -> None:
        log.info("books: assigned %s", partitions)

    def _on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        gone = set(partitions)
        try:
            self.flush()
        except Exception as exc:  # nothing committed for them: their next owner reads them again
            log.error("books: flush on revoke failed: %s", exc)
        for instrument in [i for i, tp in self._partition.items() if tp in gone]:
            self._books.pop(instrument, None)
            self._partition.pop(instrument, None)
        self._offsets = {tp: o for tp, o in self._offsets.items() if tp not in gone}
        self._outputs = [o for o in self._outputs if o[0] in self._books]
        self._retry = [r for r in self._retry if (r.topic, r.partition) not in gone]

    # -- health ------------------------------------------------------------------------------

    def _measure_lag(self) -> None:
        if self._consumer is not None and time.monotonic() - self._last_lag_at >= 1.0:
            self._last_lag_at = time.monotonic()
            try:
                self._lag = self._consumer.lag()
            except Exception as exc:  # observability only
                log.debug("consumer lag unavailable: %s", exc)
                return
            self.m_lag.set(self._lag)

    def health(self) -> dict[str, Any]:
        return self.state.health(
            lag=self._lag,
            instruments={i: ("live" if b is not None else "waiting") for i, b in sorted(self._books.items())},
            pending_outputs=len(self._outputs) + sum(len(b.outputs) for b in self._in_flight),
            committed={f"{t}[{p}]": offset for (t, p), offset in sorted(self.committed.items())},
            retained_from=None if self._retained_to is None else self._retained_to.isoformat(),
            last_error=self.last_error,
        )


class _WriterProcess:
    """The child process that makes and stores the outputs, batch by batch, in order (`_writer_main`).

    Spawned (nothing inherited: no connection of this process is shared), joined by one pipe. It exits
    when told (`close`), or when the pipe reaches EOF or is reset: this process is gone, `kill -9`
    included; what it stored by then is rows a restart would store again (idempotent)."""

    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_writer_main, args=(child, url), name="books-writer", daemon=True)
        self._process.start()
        child.close()
        self._started = False  # its first message, once its engine is made, says it has started

    def submit(self, batch: tuple[int, list[PendingOutput]]) -> None:
        self._conn.send(batch)

    def wait_started(self, timeout: float = 60.0) -> None:
        if not self._started and self._conn.poll(timeout):
            self._receive()

    def ready(self) -> bool:
        """The oldest batch's answer has come (or the process died: `result` says so)."""
        if not self._started and self._conn.poll():
            self._receive()
        return self._conn.poll() or not self._process.is_alive()

    def result(self) -> int:
        """The oldest batch's new snapshot rows (waits); raises what the writer reported."""
        kind, value = self._receive()
        if kind == "started":
            kind, value = self._receive()
        if kind != "ok":
            raise RuntimeError(f"the books writer failed: {value}")
        return value

    def _receive(self) -> tuple[str, Any]:
        try:
            kind, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the books writer process exited ({self._process.exitcode})") from None
        self._started = True
        return kind, value

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass  # already gone
        self._process.join(30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._conn.close()


def _writer_main(conn: Any, url: str) -> None:
    """The writer process: each batch (depth, outputs) made with book_output and stored (BookStore, COPY),
    answered ("ok", new snapshot rows) or ("error", why). SIGINT is the parent's to handle."""
    from candlekeep.storage.db import create_engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine = create_engine(url)
    store = BookStore(engine)
    conn.send(("started", None))
    try:
        while True:
            try:
                batch = conn.recv()
            except (EOFError, ConnectionResetError):  # the daemon is gone (exited, or kill -9)
                return
            if batch is None:
                return
            depth, pending = batch
            try:
                outputs = [book_output(instrument, ts_ns, _levels(bids), _levels(asks), sequence=sequence,
                                       verified=verified, source=source, width=Decimal(width), depth=depth)
                           for instrument, ts_ns, sequence, verified, source, width, bids, asks in pending]  # fmt: skip
                conn.send(("ok", store.insert(outputs)))
            except Exception as exc:  # reported to the daemon, which retries the batch
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        engine.dispose()


def _levels(texts: list[tuple[str, str]]) -> tuple[Level, ...]:
    return tuple((Decimal(p), Decimal(q)) for p, q in texts)


def venue_book_depth(instrument: str) -> int | None:
    """The depth per side at which `instrument`'s connector cuts its book (None: it keeps every level)."""
    try:
        venue = VENUES[ID_VENUES[Instrument.parse(instrument).venue]]
    except (KeyError, ValueError):
        return None
    return venue.connector.book_depth


def _band(book: OrderBook, top: int, bps: int) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
    """The best `top` levels of each side and every level within `bps` of the mid: all that an output
    reads (summary, depth within 100 bps, imbalance, buckets within 200 bps), without copying a
    1000-level book each interval. Exact edges, as book_analytics.within."""
    best_bid, best_ask = book.best_bid(), book.best_ask()
    if best_bid is None or best_ask is None:
        return book.bids(), book.asks()
    with decimal.localcontext(EXACT):
        mid = (best_bid[0] + best_ask[0]) / 2
        reach = mid * bps / 10_000
        low, high = mid - reach, mid + reach
    return book.bids(max(top, book.bids_at_or_above(low))), book.asks(max(top, book.asks_at_or_below(high)))


# -- construction and entry point -----------------------------------------------------------------


def build(settings: Settings, bus: Bus, engine: Engine, **kw: Any) -> BooksDaemon:
    """The books daemon of `settings` on `bus` and `engine` (streaming.runner and `main` share it)."""
    options: dict[str, Any] = {"interval_ns": int(Decimal(str(settings.book_interval_s)) * NS_PER_S),
                               "depth": settings.book_depth, "widths": settings.bucket_widths(),
                               "retention_days": settings.book_retention_days}  # fmt: skip
    options.update(kw)
    return BooksDaemon(bus, BookStore(engine), prefix=settings.topic_prefix, **options)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m streaming.books`: settings from CANDLEKEEP_* (database, Kafka, prefix, book_*)."""
    from candlekeep.bus import KafkaBus, make_bus
    from candlekeep.storage.db import create_engine, resolve_database_url
    from candlekeep.storage.migrate import upgrade

    parser = argparse.ArgumentParser(prog="streaming.books", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="/health and /metrics address")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="/health and /metrics port (0: any, -1: none)")
    parser.add_argument("--interval", type=float, default=None, help="output interval, seconds of book time")
    parser.add_argument("--depth", type=int, default=None, help="levels per side in book_snapshots")
    parser.add_argument("--flush-interval", type=float, default=0.5, help="seconds between writes")
    parser.add_argument("--writers", type=int, default=2, help="writer processes making and storing outputs")
    parser.add_argument("--instance-id", help="Kafka static group membership: a restart takes over at once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    overrides: dict[str, Any] = {"flush_interval_s": args.flush_interval, "writers": args.writers}
    if args.interval is not None:
        overrides["interval_ns"] = int(Decimal(str(args.interval)) * NS_PER_S)
    if args.depth is not None:
        overrides["depth"] = args.depth
    url = resolve_database_url(settings)
    upgrade(url)
    engine = create_engine(url)
    if settings.kafka_bootstrap_servers and args.instance_id:
        bus: Bus = KafkaBus(settings.kafka_bootstrap_servers, consumer_config={"group.instance.id": args.instance_id})
    else:
        bus = make_bus(settings)
    daemon = build(settings, bus, engine, **overrides)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server = None
    if args.port >= 0:
        server = HealthServer(daemon.registry, daemon.health, host=args.host, port=args.port).start()
        log.info("books /health and /metrics on %s", server.url)
    try:
        daemon.run(stop)
    finally:
        if server is not None:
            server.stop()
        bus.close()
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
