"""Drive a connector over a recording without sockets, and the consumer's view of its records.

`drive(connector, events, http)` feeds every received frame to `on_frame`, and hands each REST
snapshot the connector asks for (`FetchSnapshot`) the recorded response of that URL once the
recording's clock passes the response's recorded time (so the snapshot lands among the frames the
way it did in the recorded session). It returns, per received frame, the frame and the records it
produced, so a test can look at the book at the very moment a recorded ticker frame arrived.

`Mirror` applies emitted book records the way a consumer of the `books` topic does (plain dicts,
no code of the connector), and `essence` drops the receipt times, which differ between a live
replay and a direct drive of the same frames.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from candlekeep.bars import Trade
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.sources.exchanges.base import Connector, FetchSnapshot, IntegrityEvent, Record
from candlekeep.sources.exchanges.recording import HttpResponse, WsEvent
from tests.utils.exchange_replay import ReplaySession


@dataclass
class Step:
    index: int  # position among the received frames
    frame: str | bytes
    records: list[Record]


def drive(connector: Connector, events: Sequence[WsEvent], http: Sequence[HttpResponse] = (),
          conn: str | None = None, received: Callable[[int, str | bytes], bool] | None = None) -> list[Step]:  # fmt: skip
    """Every received frame (those `received(i, frame)` keeps) through the connector, in order."""
    conn = conn or connector.connections()[0].key
    responses = {r.url.split("://", 1)[1]: r for r in http}  # scheme-free: tests rewrite the host
    by_path = {r.url.split("/", 3)[3]: r for r in http}
    wanted: list[tuple[int, str, str]] = []  # (recorded time, instrument, url)
    steps: list[Step] = []
    first = next(e for e in events if e.kind == "open")
    pre = connector.on_open(conn, first.received_ns)

    def take_actions(now_ns: int) -> list[Record]:
        out: list[Record] = []
        for action in connector.take_actions():
            if isinstance(action, FetchSnapshot):
                recorded = responses.get(action.url.split("://", 1)[1]) or by_path.get(action.url.split("/", 3)[3])
                if recorded is not None:
                    wanted.append((max(recorded.received_ns, now_ns), action.instrument, action.url))
                    wanted.sort()
        while wanted and wanted[0][0] <= now_ns:
            _, instrument, url = wanted.pop(0)
            body = (responses.get(url.split("://", 1)[1]) or by_path[url.split("/", 3)[3]]).body
            out += connector.on_snapshot(instrument, body, now_ns)
        return out

    pre += take_actions(first.received_ns)
    index = 0
    for e in events:
        if e.kind != "received" or e.data is None or (isinstance(e.data, str) and not e.data.strip()):
            continue
        if received is not None and not received(index, e.data):
            index += 1
            continue
        records = take_actions(e.received_ns) + connector.on_frame(conn, e.data, e.received_ns)
        records += take_actions(e.received_ns)
        steps.append(Step(index, e.data, (pre if not steps else []) + records))
        index += 1
    return steps


def records_of(steps: Iterable[Step]) -> list[Record]:
    return [r for s in steps for r in s.records]


def essence(record: Record) -> Any:
    """The record without its receipt time (and without the exchange time where that fell back to it)."""
    if isinstance(record, (BookSnapshot, BookDelta)):
        ts = None if record.ts_ns == record.received_ns else record.ts_ns
        return (type(record).__name__, record.instrument, ts, record.sequence, record.prev_sequence,
                record.bids, record.asks, record.verified)  # fmt: skip
    if isinstance(record, Trade):
        return replace(record, received_ns=None)
    if isinstance(record, IntegrityEvent):
        return replace(record, received_ns=None)
    return (type(record).__name__, record.instrument)


def published(records: Iterable[Record]) -> list[Any]:
    """What goes to `ticks` / `books`, minus heartbeats (their timing is the runner's), as essences."""
    return [essence(r) for r in records if isinstance(r, (Trade, BookSnapshot, BookDelta))]


def at_least(n: int, matches: Callable[[Record], bool]) -> Callable[[list[Record]], bool]:
    """A `run_live(until=...)` predicate: `n` emitted records match (counted incrementally)."""
    seen = [0, 0]  # records looked at, matches among them

    def until(records: list[Record]) -> bool:
        for record in records[seen[0] :]:
            seen[1] += bool(matches(record))
        seen[0] = len(records)
        return seen[1] >= n

    return until


def all_of(*conditions: Callable[[list[Record]], bool]) -> Callable[[list[Record]], bool]:
    """A `run_live(until=...)` predicate: every one of `conditions` holds (each is asked every time)."""
    return lambda records: all([condition(records) for condition in conditions])


def published_at_least(n: int) -> Callable[[list[Record]], bool]:
    """`n` trades and book records emitted."""
    return at_least(n, lambda r: isinstance(r, (Trade, BookSnapshot, BookDelta)))


@dataclass
class Mirror:
    """Books rebuilt from published records only, as a `books` consumer would."""

    bids: dict[str, dict[Decimal, Decimal]] = field(default_factory=dict)
    asks: dict[str, dict[Decimal, Decimal]] = field(default_factory=dict)

    def apply(self, record: Record) -> None:
        if isinstance(record, BookSnapshot):
            self.bids[record.instrument] = dict(record.bids)
            self.asks[record.instrument] = dict(record.asks)
        elif isinstance(record, BookDelta):
            for side, levels in ((self.bids, record.bids), (self.asks, record.asks)):
                book = side[record.instrument]
                for price, size in levels:
                    if size == 0:
                        book.pop(price, None)
                    else:
                        book[price] = size

    def best(self, instrument: str) -> tuple[Decimal, Decimal]:
        return max(self.bids[instrument]), min(self.asks[instrument])


def play(frames: Sequence[str | bytes], expect: str | None = "subscribe") -> Callable[[ReplaySession], None]:
    """A replay script: wait for the client's first subscribe, then send the recorded frames."""

    def script(session: ReplaySession) -> None:
        if expect is not None:
            session.expect(expect)
        session.send_all(frames)

    return script


def sent_frames(events: Sequence[WsEvent]) -> list[Any]:
    return [json.loads(e.data) for e in events if e.kind == "sent" and isinstance(e.data, str)]


