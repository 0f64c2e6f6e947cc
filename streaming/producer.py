"""The producer daemon: live trades -> the `ticks` topic (DESIGN.md "Daemons"; issue part 1).

    python -m streaming.producer [--speed N] [--start 2024-03-01T12:00:00Z] [--end ...] [--port 9101]

Picks the live source by `CANDLEKEEP_SOURCE`: the CryptoCompare streamer (candlekeep/sources/
cryptocompare_stream.py) or the simulator played back in real time (`SimulatorPlayback`, below: the
very trades `Simulator.trades` gives the backfill, so live and historical data agree). Publishes
each trade to `ticks` (key = instrument id, value = `encode_tick`) through the bus producer,
which batches and reports deliveries; follows `track` / `untrack` on `control`; persists the
source's heartbeats (the source was live up to a time) and disconnects (it cannot vouch from here
on): at start for every instrument, for a newly tracked one, at a dropped connection or a failed
subscription, and at stop. The aggregator turns them into gaps and `outages` rows.

Threads: the source runs in a reader thread and hands its records over through a bounded queue;
the main thread publishes, polls delivery reports, reads `control` and keeps the metrics.

State (one block):
    state       idle | connecting | subscribing | streaming | backoff | error (the source's
                connection state; idle before start and after stop); every transition is logged
    _local      ticks the bus refused with BufferFull (broker down or slow), in order; while it is
                non-empty new ticks queue behind it (per-instrument order) and `backpressure` is on.
                At `local_bound` the main thread stops taking from the handoff queue, the handoff
                fills and the reader thread blocks: the source is read no faster than the broker
                takes ticks. A failed delivery is queued again (up to `max_redeliveries`). Nothing
                is dropped: a failed delivery is queued again, however often; a stop with the
                broker away keeps trying and says so every 5 s (a second stop gives up, loudly).

Control: each producer reads `control` in a consumer group of its own (`<prefix>producer-<8 hex>`,
new at every start) that never commits, so every producer sees every command (a group shared by two
producers would give the single `control` partition to only one of them), and every start replays
`control` from the beginning and rebuilds the set of tracked instruments (startup is recovery).
"""

from __future__ import annotations

import argparse
import heapq
import logging
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import uuid4

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import Engine

from candlekeep.bars import NS_PER_S, Disconnect, Heartbeat, Trade
from candlekeep.instruments import Instrument
from candlekeep.messages import CONTROL, DEADLETTER, TICKS, MessageError, decode_control, encode_deadletter, encode_tick_record
from candlekeep.messages import topic as topic_name
from candlekeep.settings import Settings
from candlekeep.sources.cryptocompare_stream import BadFrame, StreamStatus, SubscriptionFailed
from candlekeep.sources.simulator import Simulator
from candlekeep.bus import Bus, BufferFull, BusConsumer, BusProducer
from streaming.health import HealthServer, InvalidTransition, StateMachine

log = logging.getLogger(__name__)

# The source drives connecting .. error; idle is before start and after stop.
TRANSITIONS = {
    "idle": {"connecting", "error"},
    "connecting": {"subscribing", "streaming", "backoff", "error", "idle"},
    "subscribing": {"streaming", "backoff", "error", "idle"},
    "streaming": {"backoff", "error", "idle"},
    "backoff": {"connecting", "error", "idle"},
    "error": {"backoff", "connecting", "idle"},
}
SOURCE_FRAMES = "source.frames"  # `topic` of dead letters for source frames (they have no offset)


class LiveSource(Protocol):
    """A live trade source: `events()` yields Trade / Heartbeat / Disconnect / StreamStatus /
    SubscriptionFailed / BadFrame until close() (or, for a bounded playback, until it is done);
    `now_ns()` is its clock (the simulator's is sim time)."""

    name: str

    def events(self) -> Iterator[object]: ...
    def now_ns(self) -> int: ...
    def subscribe(self, instruments: Iterable[str]) -> None: ...
    def unsubscribe(self, instruments: Iterable[str]) -> None: ...
    def close(self) -> None: ...


# --- simulator playback ---------------------------------------------------------------------------


class SimulatorPlayback:
    """`Simulator.trades` played in real time, or `speed` times faster: sim time = start +
    (wall - wall0) * speed, each trade yielded once sim time reaches it, with heartbeats on the
    simulator's own clock (`events`). `end_ns` None: forever.

    Deterministic: trades are a pure function of (seed, instrument, time); `clock` (monotonic s) and
    `wait(seconds)` are injectable. An instrument subscribed while playing joins at the next minute
    boundary of sim time; one unsubscribed stops at once.
    """

    name = "simulator"
    _UNBOUNDED_S = 32_503_680_000.0  # year 3000: the playback itself keeps trades from running ahead

    def __init__(
        self,
        *,
        instruments: Iterable[str],
        seed: int = 0,
        start_ns: int | None = None,
        end_ns: int | None = None,
        speed: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
        wait: Callable[[float], object] | None = None,
        heartbeat_s: float = 1.0,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.seed = seed
        self.speed = speed
        self.heartbeat_s = heartbeat_s
        self.start_ns = wall_ns() if start_ns is None else start_ns
        self.end_ns = end_ns
        self._clock = clock
        self._closed = threading.Event()
        self._wait = wait or self._closed.wait
        self._sim = Simulator(seed, now=lambda: self._UNBOUNDED_S)
        self._lock = threading.Lock()
        self._wanted = {Instrument.parse(i).id for i in instruments}
        self._cursor = self.start_ns  # sim time up to which trades have been generated
        self._wall0: float | None = None

    def now_ns(self) -> int:
        return self.sim_now_ns()

    def sim_now_ns(self) -> int:
        if self._wall0 is None:
            return self.start_ns
        return self.start_ns + int((self._clock() - self._wall0) * self.speed * NS_PER_S)

    def subscribe(self, instruments: Iterable[str]) -> None:
        with self._lock:
            self._wanted.update(Instrument.parse(i).id for i in instruments)

    def unsubscribe(self, instruments: Iterable[str]) -> None:
        with self._lock:
            self._wanted.difference_update(Instrument.parse(i).id for i in instruments)

    @property
    def instruments(self) -> list[str]:
        with self._lock:
            return sorted(self._wanted)

    def close(self) -> None:
        self._closed.set()

    def events(self) -> Iterator[Trade | Heartbeat | StreamStatus]:
        """Trades in sim time, with a heartbeat for each instrument that had no trade since the
        last beat. Beats come every `heartbeat_s` of wall time, i.e. `heartbeat_s * speed` of sim
        time (at least one sim second), on multiples of that step and at every minute boundary,
        so the aggregator's clock passes each minute on the simulator's own clock."""
        if self._wall0 is None:
            self._wall0 = self._clock()
        start = datetime.fromtimestamp(self.start_ns / NS_PER_S, UTC).isoformat()
        yield StreamStatus("connecting", f"simulator seed {self.seed} at x{self.speed:g}")
        yield StreamStatus("subscribing", ", ".join(self.instruments))
        yield StreamStatus("streaming", f"sim time from {start}")
        minute = 60 * NS_PER_S
        beat = max(NS_PER_S, int(self.heartbeat_s * self.speed * NS_PER_S)) // NS_PER_S * NS_PER_S
        quiet: dict[str, bool] = {}  # instrument -> no trade since the last beat
        while not self._closed.is_set() and (self.end_ns is None or self._cursor < self.end_ns):
            chunk_end = (self._cursor // minute + 1) * minute
            if self.end_ns is not None:
                chunk_end = min(chunk_end, self.end_ns)
            with self._lock:
                wanted = sorted(self._wanted)
            for instrument in wanted:
                quiet.setdefault(instrument, True)
            beats = [(t, "") for t in range((self._cursor // beat + 1) * beat, chunk_end, beat)]
            beats.append((chunk_end, ""))
            # Merged by time; heapq.merge is stable, so one instrument's trades keep their order, and
            # a trade at a beat's time comes before the beat (it is covered by it).
            chunk = heapq.merge(
                *(((t.ts_ns, t) for t in self._sim.trades(Instrument.parse(i), self._cursor, chunk_end))
                  for i in wanted),
                beats,
                key=lambda item: (item[0], item[1] == ""),
            )  # fmt: skip
            for ts_ns, item in chunk:
                if not self._until(ts_ns):
                    return
                if isinstance(item, Trade):
                    if item.instrument in self._wanted:
                        quiet[item.instrument] = False
                        yield item
                    continue
                for instrument in wanted:
                    if instrument in self._wanted and quiet.get(instrument, True):
                        yield Heartbeat(instrument, ts_ns, self.name)
                    quiet[instrument] = True
            self._cursor = chunk_end
            if not self._until(chunk_end):  # a new subscription joins here, at the boundary
                return

    def _until(self, sim_ns: int) -> bool:
        """Wait until sim time reaches `sim_ns`; False when closed meanwhile."""
        while not self._closed.is_set():
            lag_s = (sim_ns - self.sim_now_ns()) / NS_PER_S / self.speed
            if lag_s <= 0:
                return True
            self._wait(min(lag_s, 0.25))
        return False


def make_live_source(
    settings: Settings, *, speed: float = 1.0, start_ns: int | None = None, end_ns: int | None = None
) -> LiveSource:
    """The live source `CANDLEKEEP_SOURCE` names, tracking `CANDLEKEEP_INSTRUMENTS`."""
    if settings.source == "simulator":
        return SimulatorPlayback(
            instruments=settings.instruments, seed=settings.simulator_seed, start_ns=start_ns, end_ns=end_ns,
            speed=speed,
        )  # fmt: skip
    from candlekeep.sources.cryptocompare_stream import StreamerClient

    key = settings.cryptocompare_api_key
    return StreamerClient(
        instruments=settings.instruments,
        url=settings.cryptocompare_stream_url,
        api_key=key.get_secret_value() if key else None,
    )


# --- state and metrics ----------------------------------------------------------------------------


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "candlekeep_producer_"
        self.ticks = Counter(f"{p}ticks", "Ticks handed to the bus (or queued locally)", registry=registry)
        self.ticks_per_s = Gauge(f"{p}ticks_per_second", "Ticks per second, last interval", registry=registry)
        self.delivered = Gauge(f"{p}delivered", "Messages the broker acknowledged", registry=registry)
        self.failed = Gauge(f"{p}delivery_failures", "Messages whose delivery failed", registry=registry)
        self.buffered = Gauge(f"{p}buffered", "Messages not yet acknowledged (bus + local)", registry=registry)
        self.local = Gauge(f"{p}local_queue", "Messages held locally after BufferFull", registry=registry)
        self.backpressure = Gauge(f"{p}backpressure", "1 while the bus refuses messages", registry=registry)
        self.last_age = Gauge(f"{p}last_message_age_seconds", "Seconds since the last trade", registry=registry)
        self.deadletters = Counter(f"{p}deadletters", "Bad frames and control messages", registry=registry)
        self.heartbeats = Counter(f"{p}heartbeats", "Heartbeats published (the source was live up to a time)",
                                  registry=registry)  # fmt: skip
        self.disconnects = Counter(f"{p}disconnects", "Disconnects published, per instrument", registry=registry)
        self.failed_subs = Gauge(f"{p}failed_subscriptions", "Subscriptions the source refused", registry=registry)


_END = object()  # the source is done


# --- the daemon -----------------------------------------------------------------------------------


class Producer:
    name = "producer"

    def __init__(
        self,
        bus: Bus,
        source: LiveSource,
        *,
        topic_prefix: str = "",
        max_buffered: int = 100_000,
        local_bound: int = 10_000,
        handoff: int = 1_000,
        ticks_partitions: int = 1,
        max_redeliveries: int = 5,
        control_group: str | None = None,
        poll_interval: float = 0.05,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.source = source
        self.max_buffered = max_buffered
        self.local_bound = local_bound
        self.ticks_partitions = ticks_partitions
        self.max_redeliveries = max_redeliveries
        self._redeliveries: dict[tuple[str, str, bytes], int] = {}
        # Unique per instance, never committed: every producer sees all of `control`, from the start.
        self.control_group = control_group or f"{topic_prefix}producer-{uuid4().hex[:8]}"
        self.poll_interval = poll_interval
        self.ticks_topic = topic_name(topic_prefix, TICKS)
        self.control_topic = topic_name(topic_prefix, CONTROL)
        self.deadletter_topic = topic_name(topic_prefix, DEADLETTER)
        self.registry = registry or CollectorRegistry()
        self.metrics = _Metrics(self.registry)
        self.state = StateMachine(self.name, TRANSITIONS, initial="idle", registry=self.registry)
        self._clock = clock
        self._stop = threading.Event()
        self._give_up = threading.Event()
        self._handoff: queue.Queue[object] = queue.Queue(maxsize=handoff)
        self._local: deque[tuple[str, str, bytes]] = deque()
        self._out: BusProducer | None = None
        self.failed_instruments: dict[str, str] = {}
        self.backpressure = False
        self.source_blocked = 0  # times the reader thread waited on a full handoff queue
        self.ticks = 0
        self._last_trade: float | None = None
        self._rate_mark = (clock(), 0)
        self._next_control = 0.0

    # -- lifecycle --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask run() to return: the source is closed and everything handed over is delivered, for as
        long as the broker needs. A second stop() while the broker is away gives up, loudly."""
        if self._stop.is_set():
            self._give_up.set()
        self._stop.set()
        self.source.close()

    def run(self) -> None:
        """Until stop(), or until a bounded source is done and every tick is delivered."""
        if not self._ensure_topics():
            return
        self._out = self.bus.producer(name=self.name, max_buffered=self.max_buffered, on_failed=self._on_failed)
        control = self.bus.consumer(group=self.control_group, topics=[self.control_topic])
        # Startup: after a kill -9 the log cannot know what was missed; every instrument says so.
        self._disconnect(self.source.instruments, "producer started")
        reader = threading.Thread(target=self._read_source, name="producer-source", daemon=True)
        reader.start()
        try:
            done = False
            while not self._stop.is_set() and not (done and not self._local):
                now = self._clock()
                if now >= self._next_control:
                    self._poll_control(control)
                    self._next_control = now + 0.2
                if len(self._local) >= self.local_bound:
                    self._out.flush(self.poll_interval)  # returns as soon as the broker has taken it all
                else:
                    done = self._drain_handoff(wait=self.poll_interval) or done
                self._retry_local()
                self._out.poll(0)
                self._update_metrics()
            if self._stop.is_set():
                self._take_rest()  # what the source already handed over goes out too
                self._disconnect(self.source.instruments, "producer stopped")
            self._deliver_everything()
        finally:
            self.source.close()
            self._stop.set()
            reader.join(10)
            control.close()
            self._to("idle", "stopped")
            self._update_metrics()

    def _ensure_topics(self) -> bool:
        """Create the topics, retrying (state `error`) while the broker is away; False if stopped."""
        delay = 1.0
        while True:
            try:
                self.bus.ensure_topics([self.ticks_topic], partitions=self.ticks_partitions)
                self.bus.ensure_topics([self.control_topic, self.deadletter_topic])
                return True
            except Exception as exc:  # noqa: BLE001 - the broker may come later; keep trying
                log.exception("producer: cannot create topics; retrying in %.0f s", delay)
                self._to("error", f"cannot create topics: {exc}")
            if self._stop.wait(delay):
                self._to("idle", "stopped")
                return False
            delay = min(delay * 2, 30.0)

    # -- the source, in the reader thread ---------------------------------------------------------

    def _read_source(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                for event in self.source.events():
                    if not self._hand_over(event):
                        return
                    failures = 0
                break  # a bounded source is done
            except Exception as exc:  # noqa: BLE001 - a bug in a source must not stop the daemon
                failures += 1
                delay = min(60.0, 5.0 * 2 ** min(failures - 1, 4))
                log.exception("producer: the source failed; restarting it in %.0f s", delay)
                self._hand_over(StreamStatus("error", f"source failed: {exc!r}"))
                self._stop.wait(delay)
        self._hand_over(_END)

    def _hand_over(self, item: object) -> bool:
        """Put `item` on the handoff queue, blocking while it is full (backpressure on the source)."""
        while not self._stop.is_set():
            try:
                self._handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                self.source_blocked += 1
        return False

    # -- the main thread --------------------------------------------------------------------------

    def _drain_handoff(self, *, wait: float, batch: int = 5_000) -> bool:
        """Handle up to `batch` source records, waiting up to `wait` s for the first; stops early
        when the local queue reaches its bound. True once the source is done."""
        for n in range(batch):
            if len(self._local) >= self.local_bound:
                return False
            try:
                item = self._handoff.get(timeout=wait) if n == 0 else self._handoff.get_nowait()
            except queue.Empty:
                return False
            if item is _END:
                return True
            self._handle(item)
        return False

    def _take_rest(self) -> None:
        while True:
            try:
                item = self._handoff.get_nowait()
            except queue.Empty:
                return
            if item is _END:
                return
            self._handle(item)

    def _handle(self, item: object) -> None:
        if isinstance(item, Trade):
            self._send(self.ticks_topic, item.instrument, encode_tick_record(item))
            self.ticks += 1
            self.metrics.ticks.inc()
            self._last_trade = self._clock()
        elif isinstance(item, Heartbeat):
            self._send(self.ticks_topic, item.instrument, encode_tick_record(item))
            self.metrics.heartbeats.inc()
        elif isinstance(item, Disconnect):
            self._send(self.ticks_topic, item.instrument, encode_tick_record(item))
            self.metrics.disconnects.inc()
        elif isinstance(item, StreamStatus):
            self._to(item.state, item.detail)
        elif isinstance(item, SubscriptionFailed):
            self.failed_instruments[item.instrument] = item.reason
            self.metrics.failed_subs.set(len(self.failed_instruments))
        elif isinstance(item, BadFrame):
            self._deadletter(self.source.name, SOURCE_FRAMES, -1, -1, item.error, item.payload)
        else:
            log.error("producer: unexpected record from the source: %r", item)

    def _disconnect(self, instruments: Iterable[str], reason: str) -> None:
        """The log cannot know what happened before this: a start, a new instrument, a stop."""
        now = self.source.now_ns()
        for instrument in instruments:
            self._handle(Disconnect(instrument, now, self.source.name, reason))

    def _to(self, state: str, reason: str) -> None:
        try:
            self.state.to(state, reason=reason)
        except InvalidTransition:  # a source bug; the daemon goes on in the state it reports
            log.exception("producer: unexpected transition to %s (%s)", state, reason)

    def _send(self, topic: str, key: str, value: bytes) -> None:
        """Publish in order: behind anything held locally, or locally when the bus is full."""
        assert self._out is not None
        if not self._local:
            try:
                self._out.publish(topic, key, value)
                return
            except BufferFull:
                self._set_backpressure(True)
        self._local.append((topic, key, value))

    def _on_failed(self, topic: str, key: str, value: bytes, error: str) -> None:
        """A delivery failed (the bus logged it): publish it again, behind what is queued. Nothing
        accepted is dropped; past `max_redeliveries` attempts of one message it says so, loudly,
        and keeps trying. Served inside poll/flush."""
        attempts = self._redeliveries.get((topic, key, value), 0) + 1
        self._redeliveries[(topic, key, value)] = attempts
        if attempts == self.max_redeliveries + 1:
            log.error("producer: a message to %s (key %s) failed %d deliveries (%s); still holding it",
                      topic, key, attempts - 1, error)  # fmt: skip
        self._local.append((topic, key, value))

    def _retry_local(self) -> None:
        assert self._out is not None
        while self._local:
            topic, key, value = self._local[0]
            try:
                self._out.publish(topic, key, value)
            except BufferFull:
                return
            self._local.popleft()
        self._set_backpressure(False)

    def _deliver_everything(self) -> None:
        """Flush local and bus buffers for as long as it takes (the broker may be down), saying
        every 5 s how much is held; only a second stop() gives up, and says what is lost."""
        assert self._out is not None
        next_word = self._clock() + 5.0
        while True:
            self._retry_local()
            left = self._out.flush(0.5)
            self._update_metrics()
            if left == 0 and not self._local:
                return
            if self._give_up.is_set():
                log.error("producer forced to stop with %d messages undelivered (%d held locally); they are lost",
                          left + len(self._local), len(self._local))  # fmt: skip
                return
            if self._clock() >= next_word:
                next_word = self._clock() + 5.0
                log.warning("producer stopping: holding %d undelivered messages until the broker takes them "
                            "(stop again to give up)", left + len(self._local))  # fmt: skip

    def _set_backpressure(self, on: bool) -> None:
        if on != self.backpressure:
            self.backpressure = on
            self.metrics.backpressure.set(1 if on else 0)
            if on:
                log.warning("producer backpressure: the bus is full; holding ticks locally (bound %d)",
                            self.local_bound)  # fmt: skip
            else:
                log.info("producer backpressure over: local queue drained")

    def _deadletter(self, key: str, topic: str, partition: int, offset: int, error: str, payload: bytes) -> None:
        self.metrics.deadletters.inc()
        log.warning("producer dead letter from %s: %s", topic, error)
        value = encode_deadletter(topic_name=topic, partition=partition, offset=offset, error=error, payload=payload)
        self._send(self.deadletter_topic, key, value)

    # -- control ----------------------------------------------------------------------------------

    def _poll_control(self, consumer: BusConsumer) -> None:
        try:
            records = consumer.poll_batch(max_records=500, timeout=0)
        except Exception:  # noqa: BLE001 - the broker may be away; control waits, ticks go on
            log.exception("producer: cannot read %s", self.control_topic)
            return
        for record in records:
            try:
                cmd = decode_control(record.value)
            except MessageError as exc:
                key = record.key or "*"
                self._deadletter(key, record.topic, record.partition, record.offset, str(exc), record.value)
                continue
            if cmd.op == "track":
                log.info("producer: track %s (request %s)", cmd.instrument, cmd.request_id)
                self.failed_instruments.pop(cmd.instrument, None)
                if cmd.instrument not in self.source.instruments:
                    self._disconnect([cmd.instrument], "tracked: nothing known before now")
                self.source.subscribe([cmd.instrument])
            elif cmd.op == "untrack":
                log.info("producer: untrack %s (request %s)", cmd.instrument, cmd.request_id)
                self.source.unsubscribe([cmd.instrument])

    # -- health -----------------------------------------------------------------------------------

    def _update_metrics(self) -> None:
        now = self._clock()
        pending = self._out.pending if self._out is not None else 0
        m = self.metrics
        m.buffered.set(pending + len(self._local))
        m.local.set(len(self._local))
        if self._out is not None:
            m.delivered.set(self._out.delivered)
            m.failed.set(self._out.failed)
        if self._last_trade is not None:
            m.last_age.set(now - self._last_trade)
        mark_t, mark_n = self._rate_mark
        if now - mark_t >= 1.0:
            m.ticks_per_s.set((self.ticks - mark_n) / (now - mark_t))
            self._rate_mark = (now, self.ticks)

    def health(self) -> dict[str, Any]:
        """The /health body (streaming.health): state, backpressure, buffers, rates, failures."""
        out = self._out
        return self.state.health(
            source=self.source.name,
            backpressure=self.backpressure,
            buffered=(out.pending if out is not None else 0) + len(self._local),
            local_queue=len(self._local),
            ticks=self.ticks,
            delivered=out.delivered if out is not None else 0,
            delivery_failures=out.failed if out is not None else 0,
            last_message_age_s=None if self._last_trade is None else self._clock() - self._last_trade,
            failed_instruments=dict(self.failed_instruments),
            source_blocked=self.source_blocked,
        )


# --- construction and command line ---------------------------------------------------------------------------------


def _time_ns(text: str) -> int:
    """`2024-03-01T12:00:00Z`, `2024-03-01` or unix seconds -> unix ns."""
    if text.isdigit():
        return int(text) * NS_PER_S
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * NS_PER_S + moment.microsecond * 1000


def build(
    settings: Settings,
    bus: Bus,
    engine: Engine | None = None,
    *,
    speed: float = 1.0,
    start_ns: int | None = None,
    end_ns: int | None = None,
    partitions: int = 1,
) -> Producer:
    """The producer of `settings` on `bus` (streaming.runner and `main` share it). `engine` is
    unused (the aggregator records outages from the log) and kept for the callers' signature."""
    source = make_live_source(settings, speed=speed, start_ns=start_ns, end_ns=end_ns)
    return Producer(bus, source, topic_prefix=settings.topic_prefix, ticks_partitions=partitions)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streaming.producer", description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=float, default=1.0, help="simulator playback speed (sim s per wall s)")
    parser.add_argument("--start", type=_time_ns, default=None, help="simulator sim start (default: now)")
    parser.add_argument("--end", type=_time_ns, default=None, help="simulator sim end (default: never)")
    parser.add_argument("--partitions", type=int, default=1, help="partitions of `ticks` when creating it")
    parser.add_argument("--host", default="127.0.0.1", help="/health and /metrics address")
    parser.add_argument("--port", type=int, default=9101, help="/health and /metrics port (-1: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    from candlekeep.bus import make_bus

    settings = Settings()
    bus = make_bus(settings)
    producer = build(settings, bus, speed=args.speed, start_ns=args.start, end_ns=args.end,
                     partitions=args.partitions)  # fmt: skip
    server = None
    if args.port >= 0:
        server = HealthServer(producer.registry, producer.health, host=args.host, port=args.port).start()
        log.info("producer /health and /metrics on %s", server.url)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: producer.stop())
    try:
        producer.run()
    finally:
        if server is not None:
            server.stop()
        bus.close()


if __name__ == "__main__":
    main()
