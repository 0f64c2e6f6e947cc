"""The replayer daemon: stored history -> `replay.<session>.ticks` / `.bars`, paced by each session's clock.

    python -m streaming.runner replayer [--port 9105]

Sessions are rows of `replay_sessions` (candlekeep.storage.replay_sessions), created and steered
by the API and the CLI; the rules (states, clock, stream order, positions) are candlekeep.replay.
The daemon only follows the rows: every `poll_s` (20 ms) it reads the sessions, and in between
publishes, for each running one, the records that are due by its clock, `batch` at a time; so a
pause, a seek or a speed change takes effect within one batch (what leaves in 20 ms). At `max` speed every record is due at once and the
bus's backpressure (`publish_waiting`) paces the session.

Each session's topics have one partition, so the topic holds the session's merged event-time
order (key = instrument id, as on `ticks`). Records: trades with their original `ts_ns`, a
heartbeat per instrument every whole second outside recorded outages, a disconnect where an outage
starts, the closing heartbeat at `end + lateness`, all with `source: "replay"`; bars of bars-only
instruments on `.bars`. A seek ahead publishes a disconnect per instrument at the seek time first
(reason `SEEK`): the log skips a span, and the bars built from it must not fill it with flat bars.

Durability: every `checkpoint_s` (1 s; and at a pause, stop, seek or the end) the producer is flushed,
and only once every record is acknowledged is the position of the last one written to the row. A
failed delivery re-reads the session from its durable position. So a replayer killed at any moment
(`kill -9`), once restarted, resumes each running session from its last durable position, with its
clock re-anchored there: the output may repeat records up to that position, and skips none. One
replayer runs per database (a second one would publish the same sessions twice).

State (one block):
    state     idle (no running session) | replaying | error (StateMachine; transitions logged)
    runs      session id -> _Run: the open stream (head item, iterator), the position and counts
              published since the last checkpoint, the seek epoch it was read at
    _prepared the same for created and paused sessions, opened ahead (used if still at that position)
    _failures consecutive loop failures (bounded backoff 0.5 s doubling to 30 s)
    _retry_at session id -> wall time its `error` state is retried
"""

from __future__ import annotations

import argparse
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Engine

from candlekeep.bars import Disconnect, Heartbeat
from candlekeep.bus import Bus, BufferFull, BusProducer, publish_waiting
from candlekeep.messages import encode_bar, encode_disconnect, encode_heartbeat, encode_stored_trade, replay_topic
from candlekeep.replay import (
    DISCONNECT,
    HEARTBEAT,
    TRADE,
    Item,
    Position,
    ReplayClock,
    SessionState,
    after,
    bar_stream,
    instrument_stream,
    merge,
)
from candlekeep.settings import Settings
from candlekeep.storage.replay_sessions import ReplaySessionStore, SessionRow
from candlekeep.storage.replay_source import bar_interval, outages_of, stored_bars, trade_pages
from streaming.health import StateMachine

log = logging.getLogger(__name__)

SOURCE = "replay"
TRANSITIONS = {
    "idle": {"replaying", "error"},
    "replaying": {"idle", "error"},
    "error": {"idle", "replaying"},
}
SEEK = "seek: the replay skipped ahead"  # the reason of the disconnects a forward seek publishes
DRIFT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class DeliveryFailed(RuntimeError):
    """Records of a session were not acknowledged by the bus; it is re-read from its durable position."""


@dataclass
class _Run:
    row: SessionRow
    items: Iterator[Item]
    head: Item | None
    ticks_topic: str
    bars_topic: str
    clock: ReplayClock
    last: Position  # of the last record published (durable once checkpointed)
    messages: int = 0  # published since the last checkpoint
    trades: int = 0
    checkpoint_wall_ns: int = 0
    failed_mark: int = 0
    drift_s: list[float] = field(default_factory=list)  # recent publish - due, for /health


class Replayer:
    def __init__(
        self,
        bus: Bus,
        engine: Engine,
        *,
        prefix: str = "",
        batch: int = 2000,
        poll_s: float = 0.02,
        checkpoint_s: float = 1.0,
        page: int = 20_000,
        max_backoff_s: float = 30.0,
        delivery_timeout_s: float = 30.0,
        clock: Callable[[], int] = time.time_ns,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.bus, self.engine, self.prefix = bus, engine, prefix
        self.store = ReplaySessionStore(engine)
        self.batch, self.poll_s, self.checkpoint_s, self.page = batch, poll_s, checkpoint_s, page
        self.max_backoff_s, self.delivery_timeout_s = max_backoff_s, delivery_timeout_s
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.state = StateMachine("replayer", TRANSITIONS, initial="idle", registry=self.registry)
        self.runs: dict[str, _Run] = {}
        self._producer: BusProducer | None = None
        self._failures = 0
        self._retry_at: dict[str, int] = {}
        self._prepared: dict[str, _Run] = {}
        self._next_read = 0.0  # monotonic time of the next read of the sessions
        self._sent_upto: dict[str, int] = {}  # session -> time of the last record published (this run)
        self._ensured: set[str] = set()
        self.last_error: str | None = None
        self.ready = threading.Event()  # set after the first step (recovery done, sessions read)
        self._published = Counter("candlekeep_replayer_published", "Records published by the replayer", ["kind"],
                                  registry=self.registry)  # fmt: skip
        self._drift = Histogram("candlekeep_replayer_pacing_drift_seconds",
                                "Wall time a paced record was published after (or before) its due time",
                                buckets=DRIFT_BUCKETS, registry=self.registry)  # fmt: skip
        self._running = Gauge("candlekeep_replayer_sessions_running", "Sessions being replayed",
                              registry=self.registry)  # fmt: skip

    # -- the loop --------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._producer = self.bus.producer(name="candlekeep-replayer", max_buffered=100_000)
        recovered = False
        try:
            while not stop.is_set():
                try:
                    if not recovered:
                        self._recover()
                        recovered = True
                    wait_s = self._step()
                    self._failures = 0
                    self.ready.set()
                except Exception as exc:  # PostgreSQL or the broker down: back off, re-read from durable positions
                    self._failures += 1
                    self.last_error = self.state.fail(exc, failures=self._failures, logger=log)
                    log.debug("replayer failure", exc_info=True)
                    self.runs.clear()
                    self._prepared.clear()
                    wait_s = min(self.max_backoff_s, 0.5 * 2 ** (self._failures - 1))
                if wait_s > 0:
                    stop.wait(wait_s)
            self._checkpoint_all()
        finally:
            if self._producer is not None and (left := self._producer.flush(self.delivery_timeout_s)):
                log.error("replayer stopped with %d records unacknowledged (their sessions repeat them)", left)

    def _recover(self) -> None:
        """Startup is recovery: each running session continues from its durable position."""
        now = self.clock()
        for row in self.store.list(states=[SessionState.RUNNING]):
            if self.store.recover(row.id, wall_ns=now):
                log.info("replay %s: resuming at its durable position %d", row.id, row.position.ts_ns,
                         extra={"session": row.id, "position_ns": row.position.ts_ns})  # fmt: skip

    def _step(self) -> float:
        """Read the sessions (every `poll_s`), publish what is due, checkpoint; the seconds to wait."""
        if self.runs and time.monotonic() < self._next_read:
            return self._publish()
        self._next_read = time.monotonic() + self.poll_s
        rows = {row.id: row for row in self.store.list(states=[SessionState.CREATED, SessionState.RUNNING,
                                                               SessionState.PAUSED, SessionState.ERROR])}  # fmt: skip
        now = self.clock()
        dropped = set()
        for session_id in list(self.runs):
            row = rows.get(session_id)
            if row is None or row.state != SessionState.RUNNING or row.seek_epoch != self.runs[session_id].row.seek_epoch:
                dropped.add(session_id)  # its row is about to change (checkpoint): prepare it next time
        for row in rows.values():  # topics and first pages before the start: the first records leave on time
            self._ensure(row)
            if row.state in (SessionState.CREATED, SessionState.PAUSED) and row.id not in self._prepared and row.id not in dropped:
                self._prepared[row.id] = self._open(row, now)
        for session_id in list(self.runs):  # paused, stopped or sought: checkpoint, then drop or reopen
            run, row = self.runs[session_id], rows.get(session_id)
            if row is None or row.state != SessionState.RUNNING or row.seek_epoch != run.row.seek_epoch:
                if row is None or row.seek_epoch == run.row.seek_epoch:
                    self._checkpoint(run, now, force=True)
                log.info("replay %s: %s", session_id, "sought" if row is not None and row.state == SessionState.RUNNING
                         else (row.state if row is not None else "stopped"), extra={"session": session_id})  # fmt: skip
                del self.runs[session_id]
            else:
                run.row = row
                run.clock = row.clock if row.speed is not None else replace(row.clock, sim_ns=run.clock.sim_ns)
        for row in rows.values():
            if row.state == SessionState.ERROR and now >= self._retry_at.get(row.id, 0):
                self.store.retry(row.id, wall_ns=now)
            elif row.state == SessionState.RUNNING and row.id not in self.runs:
                ready = self._prepared.pop(row.id, None)
                if ready is None or (ready.row.seek_epoch, ready.row.position) != (row.seek_epoch, row.position):
                    ready = self._open(row, now)
                ready.row, ready.clock, ready.checkpoint_wall_ns = row, row.clock, now
                self.runs[row.id] = ready
        for session_id in [i for i in self._prepared if i not in rows or rows[i].state not in
                           (SessionState.CREATED, SessionState.PAUSED)]:  # fmt: skip
            del self._prepared[session_id]
        self._running.set(len(self.runs))
        self.state.to("replaying" if self.runs else "idle", reason=f"{len(self.runs)} sessions running")
        return self._publish()

    def _publish(self) -> float:
        next_due: int | None = None
        for session_id, run in list(self.runs.items()):
            try:
                due = self._pump(run)
                if run.head is None:
                    self._finish(run)
                    self.runs.pop(session_id, None)
                    continue
                self._checkpoint(run, self.clock())
            except DeliveryFailed as exc:
                self._session_failed(run, exc)
                continue
            if due is not None:
                next_due = due if next_due is None else min(next_due, due)
        if next_due is None:
            return self.poll_s if not self.runs else 0.0
        return max(0.0, min(self.poll_s, (next_due - self.clock()) / 1e9))

    # -- one session -------------------------------------------------------------------------------

    def _open(self, row: SessionRow, now: int) -> _Run:
        ticks_topic, bars_topic = self._ensure(row)
        items = self._items(row, row.position)
        position = row.position
        if position.rank == -1 and position.ts_ns > self._sent_upto.get(row.id, row.start_ns):
            # Sought ahead: the log skips a span, so it says so, as a feed that lost time would (no
            # flat bars are built across the skip). Not counted as progress (Position.before stays).
            marks = [Item(position.ts_ns, i, DISCONNECT, SEEK) for i in sorted(row.tick_instruments)]
            items = itertools.chain(marks, items)
        assert self._producer is not None
        log.info("replay %s: streaming %s from %d at speed %s", row.id, ",".join(row.instruments), row.position.ts_ns,
                 "max" if row.speed is None else row.speed, extra={"session": row.id})  # fmt: skip
        return _Run(row, items, next(items, None), ticks_topic, bars_topic, row.clock, row.position,
                    checkpoint_wall_ns=now, failed_mark=self._producer.failed)  # fmt: skip

    def _ensure(self, row: SessionRow) -> tuple[str, str]:
        ticks_topic = replay_topic(self.prefix, row.id, "ticks")
        bars_topic = replay_topic(self.prefix, row.id, "bars")
        if row.id not in self._ensured:
            self.bus.ensure_topics([ticks_topic, bars_topic], partitions=1)
            self._ensured.add(row.id)
        return ticks_topic, bars_topic

    def _items(self, row: SessionRow, position: Position) -> Iterator[Item]:
        from_ns = position.ts_ns
        streams = []
        for instrument in row.tick_instruments:
            trades = trade_pages(self.engine, instrument, from_ns, row.end_ns, page=self.page)
            streams.append(instrument_stream(
                instrument, trades, start_ns=row.start_ns, end_ns=row.end_ns, from_ns=from_ns,
                lateness_ns=row.lateness_ns, outages=outages_of(self.engine, instrument, row.start_ns, row.end_ns)))
        for instrument in row.bar_instruments:
            interval = bar_interval(self.engine, instrument, row.start_ns, row.end_ns)
            if interval is None:
                continue
            lo = max(row.start_ns, from_ns - interval.seconds * 1_000_000_000)
            streams.append(bar_stream(instrument, stored_bars(self.engine, instrument, interval, lo, row.end_ns),
                                      from_ns=from_ns))  # fmt: skip
        return after(merge(streams), position)

    def _pump(self, run: _Run) -> int | None:
        """Publish the records due now (at most `batch`); the wall time the next one is due (None: at once)."""
        producer = self._producer
        assert producer is not None
        clock, now = run.clock, self.clock()
        paced = clock.speed is not None
        publish, ticks_topic, items = producer.publish, run.ticks_topic, run.items
        item = run.head
        last = None
        sent = trades = 0
        due = 0
        while item is not None and sent < self.batch:
            if paced:
                due = clock.due_ns(item.ts_ns)  # type: ignore[assignment]
                if due > now:
                    now = self.clock()
                    if due > now:
                        break
            kind = item.kind
            if kind == TRADE:
                t = item.data
                value = encode_stored_trade(item.instrument, t.ts_ns, t.price, t.size, t.side, t.trade_id, SOURCE)
                trades += 1
                topic = ticks_topic
            elif kind == HEARTBEAT:
                value, topic = encode_heartbeat(Heartbeat(item.instrument, item.ts_ns, SOURCE)), ticks_topic
            elif kind == DISCONNECT:
                value, topic = encode_disconnect(Disconnect(item.instrument, item.ts_ns, SOURCE, item.data)), ticks_topic
            else:
                value, topic = encode_bar(replace(item.data, source=SOURCE)), run.bars_topic
            try:
                publish(topic, item.instrument, value)
            except BufferFull:  # backpressure: serve delivery reports, then publish again (never drop)
                publish_waiting(producer, topic, item.instrument, value, timeout=self.delivery_timeout_s)
            if paced:
                drift = (self.clock() - due) / 1e9
                self._drift.observe(drift)
                if len(run.drift_s) >= 10_000:
                    del run.drift_s[:5_000]
                run.drift_s.append(drift)
            sent += 1
            if item.data is not SEEK:
                last = item
            item = next(items, None)
        run.head = item
        run.messages += sent
        run.trades += trades
        if sent:
            producer.poll(0)
        if last is not None:
            run.last = Position.of(last)
            self._sent_upto[run.row.id] = last.ts_ns
            if not paced:
                run.clock = run.clock.sent(last.ts_ns)
        if item is None or not paced:
            return None
        return clock.due_ns(item.ts_ns)

    def _checkpoint(self, run: _Run, now: int, *, force: bool = False, finish: bool = False) -> None:
        if not (force or finish) and now - run.checkpoint_wall_ns < self.checkpoint_s * 1e9:
            return
        producer = self._producer
        assert producer is not None
        if run.messages or finish:
            left = producer.flush(self.delivery_timeout_s)
            if left or producer.failed > run.failed_mark:
                raise DeliveryFailed(f"{left} records unacknowledged, {producer.failed - run.failed_mark} failed")
        elapsed = max(1, now - run.checkpoint_wall_ns) / 1e9
        kinds = {"messages": run.messages, "trades": run.trades}
        written = self.store.checkpoint(run.row.id, epoch=run.row.seek_epoch,
                                        position=run.last, messages=run.messages, trades=run.trades,
                                        rate=run.messages / elapsed, finish=finish,
                                        clock_ns=run.clock.sim_ns if run.clock.speed is None else None)  # fmt: skip
        if run.messages:
            self._published.labels("any").inc(run.messages)
            self._published.labels("trade").inc(run.trades)
        run.messages = run.trades = 0
        run.checkpoint_wall_ns = now
        if not written:
            log.info("replay %s: changed while sending (%s); re-reading it", run.row.id, kinds,
                     extra={"session": run.row.id})  # fmt: skip
            self.runs.pop(run.row.id, None)

    def _finish(self, run: _Run) -> None:
        self._checkpoint(run, self.clock(), finish=True)
        log.info("replay %s: finished", run.row.id, extra={"session": run.row.id})

    def _checkpoint_all(self) -> None:
        for run in list(self.runs.values()):
            try:
                self._checkpoint(run, self.clock(), force=True)
            except Exception as exc:  # the next start repeats from the durable position
                log.error("replay %s: final checkpoint failed: %s", run.row.id, exc)

    def _session_failed(self, run: _Run, exc: Exception) -> None:
        now = self.clock()
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("replay %s: %s; re-reading from its durable position", run.row.id, reason,
                    extra={"session": run.row.id})  # fmt: skip
        self.runs.pop(run.row.id, None)
        assert self._producer is not None
        if self.store.fail(run.row.id, reason, wall_ns=now):
            self._retry_at[run.row.id] = now + 1_000_000_000

    # -- health ------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        sessions = {}
        for session_id, run in list(self.runs.items()):
            drift = sorted(run.drift_s)
            sessions[session_id] = {
                "position_ns": run.last.ts_ns,
                "speed": "max" if run.clock.speed is None else run.clock.speed,
                "pacing_drift_p99_s": drift[int(0.99 * (len(drift) - 1))] if drift else None,
            }
        return self.state.health(sessions=sessions, buffered=self._producer.pending if self._producer else 0,
                                 last_error=self.last_error)  # fmt: skip


def build(settings: Settings, bus: Bus, engine: Engine, **kw: Any) -> Replayer:
    """The replayer of `settings` on `bus` and `engine` (streaming.runner and `main` share it)."""
    return Replayer(bus, engine, prefix=settings.topic_prefix, **kw)


def main(argv: Sequence[str] | None = None, settings: Settings | None = None) -> int:
    """`python -m streaming.replayer` (or `streaming.runner replayer`): settings from CANDLEKEEP_*."""
    from candlekeep.bus import make_bus
    from candlekeep.storage.db import create_engine, resolve_database_url
    from candlekeep.storage.migrate import upgrade
    from streaming.health import serve

    parser = argparse.ArgumentParser(prog="streaming.replayer", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="/health and /metrics address")
    parser.add_argument("--port", type=int, default=9105, help="/health and /metrics port (0: any, -1: none)")
    parser.add_argument("--batch", type=int, default=2000, help="records per session per step (pause latency)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings or Settings()
    url = resolve_database_url(settings)
    upgrade(url)
    engine = create_engine(url)
    bus = make_bus(settings)
    replayer = build(settings, bus, engine, batch=args.batch)
    return serve(replayer, host=args.host, port=args.port, cleanup=[bus.close, engine.dispose])


if __name__ == "__main__":
    raise SystemExit(main())
