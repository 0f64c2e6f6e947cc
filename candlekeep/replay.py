"""Replay sessions, the pure part (DESIGN.md "Daemons": replayer): states, the replay clock, the
merged event-time stream, seek positions. No I/O and no clock of its own: callers pass wall time.

A session replays stored history of one or more instruments over `[start_ns, end_ns)` at a speed
(`speed` simulated seconds per wall second, or `None` for `max`: as fast as the bus takes it).

States and actions (the API's verbs; the replayer itself moves running -> finished / error, and an
error back to running once its backoff is over):

    created --start--> running --pause--> paused --resume--> running
    created | running | paused | error --stop--> stopped          (terminal)
    running --(stream exhausted)--> finished                        (terminal)
    running --(failure)--> error --(retry / resume)--> running

The replay clock (`ReplayClock`) is an anchor: simulated time `sim_ns` at wall time `wall_ns`.
While running at speed N the clock reads `sim_ns + (wall - wall_ns) * N`, so one simulated second
takes 1/N s of wall time, and a record stamped `ts` is due at `wall_ns + (ts - sim_ns) / N`. A
held clock (`wall_ns is None`: created, paused, stopped) reads `sim_ns`. Pause holds it at its
current reading, resume re-anchors it there, a speed change re-anchors it at its current reading
with the new speed, and a seek sets it. At `max` the clock is the time of the last record sent.

The stream of a session is one iterator of `Item`s in event-time order: per instrument, its trades
(exchange order), a disconnect where a recorded outage starts, a heartbeat at every whole second of
the range outside outages, and a closing heartbeat at `end + lateness` so every bucket of the range
closes; these per-instrument streams are merged by `(ts_ns, instrument)` (Tardis's `combine`;
`heapq.merge` is stable, so each instrument's own order is kept). Instruments with bars only
yield their stored bars, each at its bucket's end (when it would have closed live).

Every item has a total order key (`order_key`): `(ts_ns, instrument, rank, *trade order)` with rank
trade 0 < disconnect 1 < heartbeat 2 < bar 3. A `Position` is the key of the last item delivered;
the stream resumed after it (`after`) is exactly the rest, whatever was sent before, because every
item is a function of the range alone, not of where reading began. `Position.before(ts)` is the
position whose rest is every item stamped `ts` or later: a seek.
"""

from __future__ import annotations

import enum
import heapq
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from candlekeep.bars import NS_PER_S, Bar, Interval, trade_order_key


class SessionState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FINISHED = "finished"
    ERROR = "error"


S = SessionState
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    S.CREATED: frozenset({S.RUNNING, S.STOPPED, S.ERROR}),
    S.RUNNING: frozenset({S.PAUSED, S.STOPPED, S.FINISHED, S.ERROR}),
    S.PAUSED: frozenset({S.RUNNING, S.STOPPED, S.ERROR}),
    S.ERROR: frozenset({S.RUNNING, S.STOPPED}),
    S.STOPPED: frozenset(),
    S.FINISHED: frozenset(),
}
# The API's verbs: action -> (states it is allowed from, state it leads to).
ACTIONS: dict[str, tuple[frozenset[SessionState], SessionState]] = {
    "start": (frozenset({S.CREATED}), S.RUNNING),
    "pause": (frozenset({S.RUNNING}), S.PAUSED),
    "resume": (frozenset({S.PAUSED, S.ERROR}), S.RUNNING),
    "stop": (frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.ERROR}), S.STOPPED),
}
SEEKABLE = frozenset({S.CREATED, S.RUNNING, S.PAUSED})
ACTIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.ERROR})  # count against the sessions cap

HEARTBEAT_NS = NS_PER_S


class TransitionNotAllowed(ValueError):
    """The action is not allowed from the session's current state; the text says both."""


def next_state(state: SessionState | str, action: str) -> SessionState:
    """The state `action` leads to from `state`, or TransitionNotAllowed."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: expected one of {', '.join(ACTIONS)}")
    allowed, target = ACTIONS[action]
    if SessionState(state) not in allowed:
        names = ", ".join(sorted(allowed))
        raise TransitionNotAllowed(f"cannot {action} a session that is {state} (only from {names})")
    return target


def parse_speed(value: str | float | int | None) -> float | None:
    """`max` (or None) -> None; a positive finite number -> float; anything else ValueError."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "max"):
        return None
    try:
        speed = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"speed must be a positive number or 'max', got {value!r}") from None
    if not math.isfinite(speed) or speed <= 0:
        raise ValueError(f"speed must be a positive number or 'max', got {value!r}")
    return speed


_NS_RANGE = range(-(1 << 63), 1 << 63)  # a BIGINT of nanoseconds: 1677-09-21 to 2262-04-11


def parse_time_ns(value: str | int | float, *, name: str = "time") -> int:
    """Unix seconds (a fraction is exact: `1582329700.5`) or ISO-8601 (naive means UTC) -> unix ns,
    within what a BIGINT of nanoseconds holds (a ValueError names the range otherwise)."""
    ns = _parse_time_ns(value, name)
    if ns not in _NS_RANGE:
        raise ValueError(f"{name} {value!r} is out of range: unix nanoseconds must fit in 64 bits "
                         "(1677-09-21 to 2262-04-11)")  # fmt: skip
    return ns


def _parse_time_ns(value: str | int | float, name: str) -> int:
    text_value = str(value).strip()
    try:
        seconds = Decimal(text_value)
    except InvalidOperation:
        try:
            moment = datetime.fromisoformat(text_value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"invalid {name} {value!r}: expected unix seconds or ISO-8601") from None
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * 1000
    if not seconds.is_finite():
        raise ValueError(f"invalid {name} {value!r}: expected unix seconds or ISO-8601")
    return int(seconds * NS_PER_S)


def iso_ns(ts_ns: int) -> str:
    """`2020-02-22T00:01:40.138000Z` (microseconds: what PostgreSQL keeps)."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ts_ns // 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def speed_text(speed: float | None) -> str:
    return "max" if speed is None else repr(speed)


# --- the replay clock ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayClock:
    """Simulated `sim_ns` at wall `wall_ns` (None: held), running at `speed` (None: max)."""

    sim_ns: int
    wall_ns: int | None
    speed: float | None

    @property
    def held(self) -> bool:
        return self.wall_ns is None

    def read(self, wall_ns: int) -> int:
        """The simulated time at `wall_ns` (a held or `max` clock reads its anchor)."""
        if self.wall_ns is None or self.speed is None:
            return self.sim_ns
        return self.sim_ns + round((wall_ns - self.wall_ns) * self.speed)

    def due_ns(self, ts_ns: int) -> int | None:
        """Wall time at which a record stamped `ts_ns` is due; None: now (max); held: never (-1 never
        returned: a held clock has no due time, so callers must not ask)."""
        if self.speed is None:
            return None
        if self.wall_ns is None:
            raise ValueError("a held clock has no due times")
        return self.wall_ns + math.ceil((ts_ns - self.sim_ns) / self.speed)

    def hold(self, wall_ns: int) -> ReplayClock:
        return ReplayClock(self.read(wall_ns), None, self.speed)

    def run(self, wall_ns: int) -> ReplayClock:
        """Anchor a held clock at `wall_ns`, continuing from its reading."""
        return ReplayClock(self.read(wall_ns), wall_ns, self.speed)

    def with_speed(self, speed: float | None, wall_ns: int) -> ReplayClock:
        """The same reading now, running on at `speed` (still held if it was held)."""
        return ReplayClock(self.read(wall_ns), None if self.wall_ns is None else wall_ns, speed)

    def seek(self, ts_ns: int, wall_ns: int) -> ReplayClock:
        return ReplayClock(ts_ns, None if self.wall_ns is None else wall_ns, self.speed)

    def sent(self, ts_ns: int) -> ReplayClock:
        """At `max` the clock is the time of the last record sent (monotonic)."""
        return replace(self, sim_ns=max(self.sim_ns, ts_ns)) if self.speed is None else self


# --- the stream ----------------------------------------------------------------------------------

TRADE, DISCONNECT, HEARTBEAT, BAR = "trade", "disconnect", "heartbeat", "bar"
RANK = {TRADE: 0, DISCONNECT: 1, HEARTBEAT: 2, BAR: 3}


class StoredTrade(NamedTuple):
    """A stored trade as the replayer needs it: decimal texts as PostgreSQL gives them (exact)."""

    ts_ns: int
    trade_id: str
    price: str
    size: str
    side: str


class Item(NamedTuple):
    ts_ns: int
    instrument: str
    kind: str  # trade | disconnect | heartbeat | bar
    data: Any  # StoredTrade | reason (str) | None | Bar


class Position(NamedTuple):
    """The order key of the last item delivered (see the module doc)."""

    ts_ns: int
    instrument: str = ""
    rank: int = -1
    trade_id: str = ""

    @classmethod
    def before(cls, ts_ns: int) -> Position:
        """The position whose rest is every item stamped `ts_ns` or later."""
        return cls(ts_ns)

    @classmethod
    def of(cls, item: Item) -> Position:
        return cls(item.ts_ns, item.instrument, RANK[item.kind], item.data.trade_id if item.kind == TRADE else "")

    def key(self) -> tuple:
        return _key(self.ts_ns, self.instrument, self.rank, self.trade_id)


def _key(ts_ns: int, instrument: str, rank: int, trade_id: str) -> tuple:
    return (ts_ns, instrument, rank, *trade_order_key(ts_ns, trade_id)[1:])


def order_key(item: Item) -> tuple:
    return Position.of(item).key()


@dataclass(frozen=True, slots=True)
class Outage:
    """A recorded span `[start_ns, end_ns)` in which the live feed of the instrument was down."""

    start_ns: int
    end_ns: int
    reason: str


def instrument_stream(
    instrument: str,
    trades: Iterable[StoredTrade],
    *,
    start_ns: int,
    end_ns: int,
    from_ns: int,
    lateness_ns: int,
    outages: Sequence[Outage] = (),
    heartbeat_ns: int = HEARTBEAT_NS,
) -> Iterator[Item]:
    """One instrument's items stamped `from_ns` or later, in order; `trades` are its stored trades of
    `[from_ns, end_ns)` in exchange order. Events (disconnects, heartbeats, the closing heartbeat)
    depend on the range only, so any `from_ns` gives a suffix of the same stream."""
    events = _events(instrument, start_ns=start_ns, end_ns=end_ns, from_ns=from_ns, lateness_ns=lateness_ns,
                     outages=outages, heartbeat_ns=heartbeat_ns)  # fmt: skip
    event = next(events, None)
    for trade in trades:
        ts = trade.ts_ns
        while event is not None and event.ts_ns < ts:  # at equal times, trades come first (rank 0)
            yield event
            event = next(events, None)
        yield Item(ts, instrument, TRADE, trade)
    while event is not None:
        yield event
        event = next(events, None)


def _events(instrument: str, *, start_ns: int, end_ns: int, from_ns: int, lateness_ns: int,
            outages: Sequence[Outage], heartbeat_ns: int) -> Iterator[Item]:  # fmt: skip
    spans = sorted((max(o.start_ns, start_ns), min(o.end_ns, end_ns), o.reason) for o in outages
                   if o.end_ns > start_ns and o.start_ns < end_ns)  # fmt: skip
    disconnects = [Item(s, instrument, DISCONNECT, reason) for s, _e, reason in spans if s >= from_ns]
    return heapq.merge(disconnects, _beats(instrument, spans, end_ns=end_ns, from_ns=max(start_ns, from_ns),
                                           lateness_ns=lateness_ns, heartbeat_ns=heartbeat_ns),
                       key=lambda item: (item.ts_ns, RANK[item.kind]))  # fmt: skip


def _beats(instrument: str, spans: Sequence[tuple[int, int, str]], *, end_ns: int, from_ns: int, lateness_ns: int,
           heartbeat_ns: int) -> Iterator[Item]:  # fmt: skip
    """A heartbeat at every whole `heartbeat_ns` of `[from_ns, end_ns]` outside the spans, then the
    closing one at `end + lateness`."""
    j = 0
    for beat in range(-(-from_ns // heartbeat_ns) * heartbeat_ns, end_ns + 1, heartbeat_ns):
        while j < len(spans) and spans[j][1] <= beat:
            j += 1
        if j < len(spans) and spans[j][0] <= beat:  # sorted by start: the first open span covers it
            continue
        yield Item(beat, instrument, HEARTBEAT, None)
    closing = end_ns + lateness_ns
    if lateness_ns > 0 and closing >= from_ns:
        yield Item(closing, instrument, HEARTBEAT, None)


def bar_stream(instrument: str, bars: Iterable[Bar], *, from_ns: int) -> Iterator[Item]:
    """Stored bars (ascending) of a bars-only instrument, each at its bucket's end."""
    for bar in bars:
        at = (bar.start + Interval(bar.interval).seconds) * NS_PER_S
        if at >= from_ns:
            yield Item(at, instrument, BAR, bar)


def merge(streams: Iterable[Iterable[Item]]) -> Iterator[Item]:
    """Several instruments' streams in event-time order (ties by instrument, each stream's order kept)."""
    streams = list(streams)
    if len(streams) == 1:
        return iter(streams[0])
    return heapq.merge(*streams, key=_merge_key)


def _merge_key(item: Item) -> tuple[int, str]:
    return (item.ts_ns, item.instrument)


def after(items: Iterable[Item], position: Position) -> Iterator[Item]:
    """The items strictly after `position` (items stamped before it are skipped without full keys)."""
    bound = position.key()
    ts = position.ts_ns
    it = iter(items)
    for item in it:
        if item.ts_ns < ts or (item.ts_ns == ts and order_key(item) <= bound):
            continue
        yield item
        break
    yield from it


def progress(clock_ns: int, start_ns: int, end_ns: int) -> float:
    """Percent of the range the clock has passed, 0..100."""
    if end_ns <= start_ns:
        return 100.0
    return max(0.0, min(100.0, 100.0 * (clock_ns - start_ns) / (end_ns - start_ns)))
