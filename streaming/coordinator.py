"""The coordinator daemon: `control` commands -> dynamic topics, tracked instruments, history on demand.

    python -m streaming.runner coordinator [--port 9103] [--history-hours 24]

Consumer group `coordinator` (prefixed like the topics) on `control`. Commands are handled one at a
time, in log order, and each offset is committed once the command's work is durable (topic
created, row written, bars acknowledged by the bus); a crash before the commit makes the command
run again, which changes nothing, because every step is idempotent.
- `track X`: creating-topic: `dynamic.<venue>.<BASE>-<QUOTE>` (bus.ensure_topics) and the
  `instruments` row with tracked=true (pipelines/sensors.py makes every row a Dagster partition);
  notifying: the last `history_s` of 1m bars from the REST source (make_source) published into
  the dynamic topic (key = instrument id), where streaming/dynamic.py writes them to `bars`. The
  producer reads the same command on `control` and subscribes the live feed itself
  (streaming/producer.py `_poll_control`), so nothing more is sent to it. Skipped when X is tracked,
  its topic ensured and its history fetched: one partition orders one instrument's commands, so
  repeated and concurrent tracks do the work once.
- `untrack X`: tracked=false (the producer unsubscribes on its own).
- `fetch X start end`: those 1m bars from the REST source into X's dynamic topic (gap refills).
- Undecodable messages go to `deadletter` with the reason, and so does a command whose source call
  keeps failing (`max_attempts`, SourceError). Anything else (PostgreSQL or the broker down) enters
  `error` and is retried with a bounded backoff: a command is never skipped for it.
While it holds a `control` partition, at start and then periodically, the coordinator also issues
commands on `control`: a `fetch` of the refill window of each closed outage (OutageStore) of the
last `refill_lookback_s` whose bars are not all final yet, once per run; and a `track` for each
tracked instrument not set up yet (tracked by `streaming.runner.send_track` without a broker, or by
the API), or, with `announce` (the in-process bus, whose control log starts empty every run), for
every tracked instrument, so the producer subscribes them again.

Startup is recovery: `fetched` and `tracked` are rebuilt from PostgreSQL at start and whenever a
control partition is assigned. History counts as fetched when `bars` holds a bar of the REST source
within the history window, i.e. once the dynamic consumer stored it; a restart in between fetches
again (idempotent upserts downstream).

State (one block):
    state      active | creating-topic | notifying | error (StateMachine; every transition logged)
    fetched    instrument -> end (unix s) of its last delivered history fetch
    tracked    instruments with tracked=true, as last read or written
    topics     dynamic topics ensured by this process
    announced  instruments whose track command this run has seen or sent (the producer knows them)
    refills    outage ids whose refill this run checked or issued
    _pending   records polled, not yet committed (the head is being handled); _attempts: source
               failures per (topic, partition, offset); _held: control partitions held
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import Engine

from candlekeep.bars import Interval, iso_utc
from candlekeep.instruments import Instrument
from candlekeep.messages import (
    CONTROL,
    DEADLETTER,
    ControlCommand,
    MessageError,
    decode_control,
    dynamic_topic,
    encode_bar,
    encode_control,
    encode_deadletter,
)
from candlekeep.messages import topic as topic_name
from candlekeep.settings import Settings
from candlekeep.sources import Source, SourceError, make_source
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.storage.outages import OutageStore
from candlekeep.bus import Bus, BusConsumer, BusProducer, CommitFailed, Record, publish_waiting
from streaming.health import StateMachine

log = logging.getLogger(__name__)

GROUP = "coordinator"
SETTLE_S = 120  # a fetched minute is final only once it ended this long ago
DEFAULT_HISTORY_S = 86_400
TRANSITIONS = {
    "active": {"creating-topic", "notifying", "error"},
    "creating-topic": {"notifying", "active", "error"},
    "notifying": {"active", "error"},
    "error": {"active", "creating-topic", "notifying"},
}
M1 = Interval.M1


class DeliveryFailed(RuntimeError):
    """Bars or commands were not acknowledged by the bus in time; the command is retried."""


class Coordinator:
    def __init__(
        self,
        bus: Bus,
        source: Source,
        instruments: InstrumentStore,
        bar_store: BarStore,
        outages: OutageStore | None = None,
        *,
        prefix: str = "",
        history_s: int = DEFAULT_HISTORY_S,
        announce: bool = False,
        group: str | None = None,
        poll_timeout_s: float = 0.2,
        scan_interval_s: float = 5.0,
        refill_interval_s: float = 60.0,
        refill_lookback_s: int = 7 * 86_400,
        max_attempts: int = 3,
        max_backoff_s: float = 30.0,
        delivery_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
        settle_s: int = SETTLE_S,
    ) -> None:
        if history_s <= 0 or history_s % 60:
            raise ValueError(f"history_s must be a positive number of minutes, got {history_s}")
        self.bus, self.source, self.instruments, self.bar_store, self.outages = (
            bus, source, instruments, bar_store, outages)  # fmt: skip
        self.prefix = prefix
        self.control_topic = topic_name(prefix, CONTROL)
        self.deadletter_topic = topic_name(prefix, DEADLETTER)
        self.group = group or topic_name(prefix, GROUP)
        self.history_s, self.announce = history_s, announce
        self.settle_s = settle_s
        self.poll_timeout_s, self.scan_interval_s = poll_timeout_s, scan_interval_s
        self.refill_interval_s, self.refill_lookback_s = refill_interval_s, refill_lookback_s
        self.max_attempts, self.max_backoff_s, self.delivery_timeout_s = max_attempts, max_backoff_s, delivery_timeout_s
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.state = StateMachine("coordinator", TRANSITIONS, initial="active", registry=self.registry)
        self.fetched: dict[str, int] = {}
        self.tracked: set[str] = set()
        self.topics: set[str] = set()
        self.announced: set[str] = set()
        self.refills: set[int] = set()
        self._pending: list[Record] = []
        self._attempts: dict[tuple[str, int, int], int] = {}
        self._held: set[tuple[str, int]] = set()
        self._consumer: BusConsumer | None = None
        self._producer: BusProducer | None = None
        self._recover_due = True
        self._next_scan = self._next_refill = 0.0
        self._failures = 0
        self.last_error: str | None = None
        self._metrics()

    def _metrics(self) -> None:
        r, p = self.registry, "candlekeep_coordinator"
        self.m_commands = Counter(f"{p}_commands", "Control commands handled, by op and outcome (done, skipped, "
                                  "deadletter)", ["op", "outcome"], registry=r)  # fmt: skip
        self.m_tracks = Counter(f"{p}_tracks", "Track commands that set an instrument up", registry=r)
        self.m_fetches = Counter(f"{p}_fetches", "History fetches from the REST source", registry=r)
        self.m_bars = Counter(f"{p}_bars_published", "Bars published into dynamic topics", registry=r)
        self.m_errors = Counter(f"{p}_errors", "Failures (retried with backoff)", registry=r)
        self.m_deadletters = Counter(f"{p}_deadletters", "Control messages sent to deadletter", ["reason"], registry=r)
        self.m_issued = Counter(f"{p}_commands_issued", "Commands the coordinator put on control itself (refill "
                                "fetches, tracks of instruments not set up)", ["op"], registry=r)  # fmt: skip
        self.m_tracked = Gauge(f"{p}_tracked_instruments", "Instruments tracked", registry=r)
        self.m_tracked.set_function(lambda: len(self.tracked))

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Handle commands until `stop` is set (the command in hand is finished first)."""
        while not stop.is_set():
            try:
                if self._consumer is None:
                    self._start()
                self.step(stop)
                if self._failures:
                    self._failures = 0
                    self.state.to("active", reason="recovered")
            except Exception as exc:  # any failure: error state, back off, retry; never exit
                self._fail(exc)
                stop.wait(min(self.max_backoff_s, 0.5 * 2 ** min(self._failures - 1, 16)))
        self._shutdown()

    def step(self, stop: threading.Event | None = None) -> None:
        """One round: recover if due, poll, handle (committing each), then the periodic scans."""
        assert self._consumer is not None
        if not self._pending:
            self._pending = self._consumer.poll_batch(max_records=100, timeout=self.poll_timeout_s)
        if self._recover_due:  # at start, and after an assignment (which the poll may just have served)
            self._recover()
        while self._pending and not (stop is not None and stop.is_set()):
            record = self._pending[0]
            self._handle(record)
            self._commit(record)
        self._periodic()

    def _start(self) -> None:
        self.bus.ensure_topics([self.control_topic, self.deadletter_topic])
        self._producer = self._producer or self.bus.producer(name="coordinator")
        self._consumer = self.bus.consumer(group=self.group, topics=[self.control_topic],
                                           on_assign=self._on_assign, on_revoke=self._on_revoke)  # fmt: skip
        log.info("coordinator consuming %s as group %s", self.control_topic, self.group)

    def _fail(self, exc: Exception) -> None:
        self._failures += 1
        self.m_errors.inc()
        self.last_error = self.state.fail(exc, failures=self._failures, logger=log)

    def _shutdown(self) -> None:
        try:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
            if self._producer is not None and self._producer.flush(10):
                log.error("coordinator stopped with %d messages undelivered", self._producer.pending)
        except Exception as exc:  # nothing uncommitted is lost: the next run handles it again
            log.error("coordinator stopped uncleanly: %s", exc)
        if self.state.state != "active":
            self.state.to("active", reason="stopped")
        log.info("coordinator stopped")

    def _commit(self, record: Record) -> None:
        assert self._consumer is not None
        self._pending.pop(0)
        self._attempts.pop((record.topic, record.partition, record.offset), None)
        try:
            self._consumer.commit({(record.topic, record.partition): record.offset + 1})
        except CommitFailed as exc:  # revoked meanwhile: the next holder handles it again (idempotent)
            log.warning("coordinator could not commit %s[%d]@%d: %s", record.topic, record.partition,
                        record.offset, exc)  # fmt: skip
            self._pending = [r for r in self._pending if (r.topic, r.partition) != (record.topic, record.partition)]

    def _on_assign(self, partitions: list[tuple[str, int]]) -> None:
        self._held.update(partitions)
        self._recover_due = True  # done by the loop, not inside the bus callback
        self._next_scan = self._next_refill = 0.0

    def _on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        gone = set(partitions)
        self._held.difference_update(gone)
        self._pending = [r for r in self._pending if (r.topic, r.partition) not in gone]

    # -- commands ----------------------------------------------------------------------------

    def _handle(self, record: Record) -> None:
        try:
            cmd = decode_control(record.value)
            if record.key not in (cmd.instrument, "*"):
                raise MessageError(f"key {record.key!r} is neither the instrument {cmd.instrument!r} nor '*'")
            if cmd.op == "fetch":
                cmd = self._fetch_range(cmd)
        except MessageError as exc:
            self._deadletter(record, str(exc), "invalid", op="?")
            return
        instrument = Instrument.parse(cmd.instrument)
        try:
            if cmd.op == "track":
                outcome = self._track(instrument, cmd)
            elif cmd.op == "untrack":
                outcome = self._untrack(instrument, cmd)
            else:
                outcome = self._fetch(instrument, cmd)
        except SourceError as exc:
            key = (record.topic, record.partition, record.offset)
            self._attempts[key] = attempts = self._attempts.get(key, 0) + 1
            if attempts < self.max_attempts:
                raise
            self._deadletter(record, f"{cmd.op} {cmd.instrument} failed {attempts} times: {exc}", "source",
                             op=cmd.op)  # fmt: skip
            return
        self.m_commands.labels(cmd.op, outcome).inc()

    def _track(self, instrument: Instrument, cmd: ControlCommand) -> str:
        iid, name = instrument.id, dynamic_topic(self.prefix, instrument)
        self.announced.add(iid)
        if iid in self.tracked and iid in self.fetched:
            if name not in self.topics:  # set up by another member or an earlier run: make sure of the topic
                self.state.to("creating-topic", reason=f"track {iid}", request_id=cmd.request_id, topic=name)
                self._ensure_topic(name)
                self.state.to("active", reason=f"tracking {iid}", request_id=cmd.request_id)
            log.info("track %s (request %s): already set up, nothing to do", iid, cmd.request_id,
                     extra={"instrument": iid, "request_id": cmd.request_id})  # fmt: skip
            return "skipped"
        self.state.to("creating-topic", reason=f"track {iid}", request_id=cmd.request_id, topic=name)
        self._ensure_topic(name)
        if iid not in self.tracked:
            self.instruments.register([instrument], tracked=True)
            self.tracked.add(iid)
        end = M1.floor(int(self.clock()))
        start = max(end - self.history_s, self.fetched.get(iid, 0))
        if start < end:
            self.state.to("notifying", reason=f"history of {iid}", request_id=cmd.request_id)
            self._publish_history(instrument, name, start, end)
        self.fetched[iid] = max(end, self.fetched.get(iid, 0))
        self.m_tracks.inc()
        self.state.to("active", reason=f"tracking {iid}", request_id=cmd.request_id)
        return "done"

    def _untrack(self, instrument: Instrument, cmd: ControlCommand) -> str:
        self.instruments.set_tracked(instrument, False)
        self.tracked.discard(instrument.id)
        self.announced.discard(instrument.id)
        log.info("untrack %s (request %s)", instrument.id, cmd.request_id,
                 extra={"instrument": instrument.id, "request_id": cmd.request_id})  # fmt: skip
        return "done"

    def _fetch_range(self, cmd: ControlCommand) -> ControlCommand:
        """The command with its range filled in: `end` defaults to now, `start` to `history_s` before it."""
        end = cmd.end if cmd.end is not None else M1.floor(int(self.clock()))
        start = cmd.start if cmd.start is not None else end - self.history_s
        if end <= start:
            raise MessageError(f"fetch range [{_iso(start)}, {_iso(end)}) is empty")
        return replace(cmd, start=start, end=end)

    def _fetch(self, instrument: Instrument, cmd: ControlCommand) -> str:
        start, end = cmd.start, cmd.end
        assert start is not None and end is not None
        name = dynamic_topic(self.prefix, instrument)
        self.state.to("creating-topic", reason=f"fetch {instrument.id}", request_id=cmd.request_id, topic=name)
        self._ensure_topic(name)
        self.instruments.register([instrument])  # known (the dynamic consumer finds its topic); tracked unchanged
        self.state.to("notifying", reason=f"fetch {instrument.id} [{_iso(start)}, {_iso(end)})",
                      request_id=cmd.request_id)  # fmt: skip
        self._publish_history(instrument, name, start, end)
        self.state.to("active", reason=f"fetched {instrument.id}", request_id=cmd.request_id)
        return "done"

    def _ensure_topic(self, name: str) -> None:
        if name not in self.topics:
            self.bus.ensure_topics([name])
            self.topics.add(name)

    def _publish_history(self, instrument: Instrument, name: str, start: int, end: int) -> None:
        """1m bars of [start, end) from the REST source into `name`, acknowledged by the bus."""
        assert self._producer is not None
        self.m_fetches.inc()
        failed_before = self._producer.failed
        count = 0
        # A minute that ended less than `settle_s` ago may still change at the source (and the live
        # stream may still be closing it): it goes out provisional, and a later refresh makes it final.
        settled = int(self.clock()) - self.settle_s
        for page in self.source.bars(instrument, M1, start, end):
            for bar in page:
                if bar.final and bar.start + 60 > settled:
                    bar = replace(bar, final=False)
                self._publish(name, instrument.id, encode_bar(bar))
            count += len(page)
            self._producer.poll(0)
        self._delivered(failed_before, f"{count} bars of {instrument.id}")
        self.m_bars.inc(count)
        log.info("published %d bars of %s [%s, %s) into %s", count, instrument.id, _iso(start), _iso(end), name,
                 extra={"instrument": instrument.id, "bars": count, "topic": name})  # fmt: skip

    def _deadletter(self, record: Record, error: str, reason: str, *, op: str) -> None:
        assert self._producer is not None
        self.m_deadletters.labels(reason).inc()
        self.m_commands.labels(op, "deadletter").inc()
        log.warning("dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, error,
                    extra={"topic": record.topic, "partition": record.partition, "offset": record.offset,
                           "error": error})  # fmt: skip
        failed_before = self._producer.failed
        self._publish(self.deadletter_topic, record.key or "*", encode_deadletter(
            topic_name=record.topic, partition=record.partition, offset=record.offset, error=error,
            payload=record.value))  # fmt: skip
        self._delivered(failed_before, "a dead letter")

    def _publish(self, topic: str, key: str, value: bytes) -> None:
        assert self._producer is not None
        publish_waiting(self._producer, topic, key, value, timeout=self.delivery_timeout_s)

    def _delivered(self, failed_before: int, what: str) -> None:
        assert self._producer is not None
        left = self._producer.flush(self.delivery_timeout_s)
        if left or self._producer.failed > failed_before:
            raise DeliveryFailed(f"{what}: {left} not acknowledged, {self._producer.failed - failed_before} failed")

    # -- recovery and periodic scans ---------------------------------------------------------

    def _recover(self) -> None:
        """Rebuild `tracked` and `fetched` from PostgreSQL (see the module doc)."""
        self.tracked = set(self.instruments.list_ids(tracked_only=True))
        end = M1.floor(int(self.clock())) + 60
        for iid in sorted(self.tracked):
            stored = [b for b in self.bar_store.read_bars(iid, M1, end - 60 - self.history_s, end)
                      if b.source == self.source.name]  # fmt: skip
            if stored:
                self.fetched[iid] = max(self.fetched.get(iid, 0), stored[-1].start + 60)
        if not self.announce:  # their track commands are in the control log, which the producer replays
            self.announced |= {i for i in self.tracked if i in self.fetched}
        self._recover_due = False
        log.info("coordinator recovered: %d tracked, %d with history", len(self.tracked),
                 sum(1 for i in self.tracked if i in self.fetched),
                 extra={"tracked": sorted(self.tracked), "fetched": dict(self.fetched)})  # fmt: skip

    def _periodic(self) -> None:
        if not self._held:
            return  # another member holds control: it scans
        now = time.monotonic()
        if now >= self._next_scan:
            self._announce_tracked()
            self._next_scan = now + self.scan_interval_s
        if self.outages is not None and now >= self._next_refill:
            self._issue_refills()
            self._next_refill = now + self.refill_interval_s

    def _announce_tracked(self) -> None:
        """A track command for each tracked instrument not announced in this run, and an untrack for
        each announced one no longer tracked in the table (untracked without a broker: the API's
        DELETE /v1/instruments or `candlekeep untrack`), so the producer drops its feed."""
        self.tracked = set(self.instruments.list_ids(tracked_only=True))
        todo = sorted(self.tracked - self.announced)
        gone = sorted(self.announced - self.tracked)
        commands = [ControlCommand("track", iid, f"coordinator-{uuid.uuid4().hex[:12]}") for iid in todo]
        commands += [ControlCommand("untrack", iid, f"coordinator-{uuid.uuid4().hex[:12]}") for iid in gone]
        if commands:
            self._issue(commands)
            self.announced.update(todo)
            self.announced.difference_update(gone)

    def _issue_refills(self) -> None:
        """A fetch command per instrument of each closed outage not refilled yet (once per run)."""
        assert self.outages is not None
        since = datetime.fromtimestamp(self.clock() - self.refill_lookback_s, UTC)
        # An outage is refilled once its window has settled at the source (SETTLE_S): sooner, the
        # fetched minutes would come back provisional and the gap would stay until the next refresh.
        settled = datetime.fromtimestamp(self.clock() - self.settle_s, UTC)
        rows = [r for r in self.outages.list(start=since)
                if r.ended_at is not None and r.ended_at + timedelta(seconds=60) <= settled and r.id not in self.refills]  # fmt: skip
        commands = []
        for row in rows:
            start, end = row.refill_window()
            for text in row.instruments:
                try:
                    iid = Instrument.parse(text).id
                except ValueError:
                    log.warning("outage %d names an invalid instrument %r; not refilled", row.id, text)
                    continue
                if not self._refilled(iid, start, end):
                    commands.append(ControlCommand("fetch", iid, f"refill-{row.id}-{uuid.uuid4().hex[:8]}", start, end))
        if commands:
            self._issue(commands)
        self.refills.update(row.id for row in rows)

    def _refilled(self, iid: str, start: int, end: int) -> bool:
        """Every minute of [start, end) has a final bar (the REST source's; the stream's are provisional)."""
        bars = self.bar_store.read_bars(iid, M1, start, end)
        return len(bars) == (end - start) // 60 and all(b.final for b in bars)

    def _issue(self, commands: Sequence[ControlCommand]) -> None:
        assert self._producer is not None
        failed_before = self._producer.failed
        for cmd in commands:
            self._publish(self.control_topic, cmd.instrument, encode_control(cmd))
            self.m_issued.labels(cmd.op).inc()
            log.info("coordinator issues %s %s (request %s)%s", cmd.op, cmd.instrument, cmd.request_id,
                     f" [{_iso(cmd.start)}, {_iso(cmd.end)})" if cmd.start is not None else "",
                     extra={"op": cmd.op, "instrument": cmd.instrument, "request_id": cmd.request_id})  # fmt: skip
        self._delivered(failed_before, f"{len(commands)} control commands")

    # -- health ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Commands handled per `op:outcome` (from the metrics)."""
        out: dict[str, int] = {}
        for metric in self.m_commands.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[f"{sample.labels['op']}:{sample.labels['outcome']}"] = int(sample.value)
        return out

    def health(self) -> dict[str, Any]:
        return self.state.health(
            held=[f"{t}[{p}]" for t, p in sorted(self._held)],
            pending=len(self._pending),
            commands=self.counts(),
            tracked=sorted(self.tracked),
            fetched={i: _iso(t) for i, t in sorted(self.fetched.items())},
            last_error=self.last_error,
        )


def _iso(ts_s: int | None) -> str:
    return "-" if ts_s is None else iso_utc(ts_s)


# -- construction and entry point -----------------------------------------------------------------


def build(settings: Settings, bus: Bus, engine: Engine, *, history_s: int = DEFAULT_HISTORY_S,
          announce: bool = False, **kw: Any) -> Coordinator:  # fmt: skip
    """The coordinator of `settings` on `bus` and `engine` (streaming.runner and `main` share it)."""
    return Coordinator(
        bus, make_source(settings), InstrumentStore(engine), BarStore(engine), OutageStore(engine),
        prefix=settings.topic_prefix, history_s=history_s, announce=announce, **kw,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None, settings: Settings | None = None) -> int:
    """`python -m streaming.coordinator` (or `streaming.runner coordinator`): settings from CANDLEKEEP_*."""
    from candlekeep.storage.db import create_engine, resolve_database_url
    from candlekeep.storage.migrate import upgrade
    from candlekeep.bus import make_bus
    from candlekeep.logs import configure as configure_logging
    from streaming.health import serve

    parser = argparse.ArgumentParser(prog="streaming.coordinator", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="/health and /metrics address")
    parser.add_argument("--port", type=int, default=9103, help="/health and /metrics port (0: any, -1: none)")
    parser.add_argument("--history-hours", type=float, default=DEFAULT_HISTORY_S / 3600,
                        help="history fetched on track (1m bars), hours")  # fmt: skip
    args = parser.parse_args(argv)
    settings = settings or Settings()
    configure_logging(settings.log_format, settings.log_level)
    url = resolve_database_url(settings)
    upgrade(url)
    engine = create_engine(url)
    bus = make_bus(settings)
    coordinator = build(settings, bus, engine, history_s=int(args.history_hours * 60) * 60,
                        announce=not settings.kafka_bootstrap_servers)  # fmt: skip
    return serve(coordinator, host=args.host, port=args.port, cleanup=[bus.close, engine.dispose])


if __name__ == "__main__":
    raise SystemExit(main())
