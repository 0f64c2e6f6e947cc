"""Offline capture and normalization of exchange feeds (`candlekeep feeds capture|normalize`).

`normalize(connector, ws_events, http_responses)` runs the very connector code the live path runs
over a recording (candlekeep.sources.exchanges.recording): a recorded connection opening is
`on_open`, each received frame is `on_frame` at its recorded time, and a recorded REST snapshot is
handed to `on_snapshot` at its recorded time once the connector has asked for that URL (path and
query compared, so a recording from the venue replays into a connector pointed anywhere).
Frames the connector would send (resubscribes) have no recorded answer and are dropped.

`record_json(record)` is the one JSON shape per normalized record: trade, book snapshot, book
delta, integrity event, disconnect, heartbeat; decimal strings with every digit the venue sent.
`capture(...)` runs the live FeedRunner with a RecordingWriter attached.
"""

from __future__ import annotations

import asyncio
import heapq
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any
from urllib.parse import urlsplit

import requests

from candlekeep.bars import Disconnect, Heartbeat, Trade, decimal_str
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.sources.exchanges.base import Connector, FetchSnapshot, IntegrityEvent, Record, listing_bodies
from candlekeep.sources.exchanges.recording import HttpResponse, RecordingWriter, WsEvent
from candlekeep.sources.exchanges.registry import symbols_from_listing, venue


def _path_query(url: str) -> str:
    split = urlsplit(url)
    return f"{split.path}?{split.query}"


def normalize(connector: Connector, ws_events: Iterable[WsEvent],
              http_responses: Sequence[HttpResponse] = ()) -> Iterator[Record]:  # fmt: skip
    """Every record the connector makes of a recording, in order (one connection: the recorder
    writes one file per connection)."""
    conn = connector.connections()[0].key
    wanted: dict[str, str] = {}  # path?query -> instrument, snapshots asked for and not yet given
    timeline: list[tuple[int, int, str, Any]] = []
    for n, response in enumerate(http_responses):
        timeline.append((response.received_ns, 2 * n + 1, "http", response))
    heapq.heapify(timeline)
    ws = iter(ws_events)

    def actions() -> None:
        for action in connector.take_actions():
            if isinstance(action, FetchSnapshot):
                wanted[_path_query(action.url)] = action.instrument

    def rest_until(ts: int | None) -> Iterator[Record]:
        while timeline and (ts is None or timeline[0][0] <= ts):
            _, _, _, response = heapq.heappop(timeline)
            instrument = wanted.pop(_path_query(response.url), None)
            if instrument is not None:
                yield from connector.on_snapshot(instrument, response.body, response.received_ns)
                actions()

    for event in ws:
        yield from rest_until(event.received_ns)
        if event.kind == "open":
            yield from connector.on_open(conn, event.received_ns)
        elif event.kind == "received" and event.data is not None:
            yield from connector.on_frame(conn, event.data, event.received_ns)
        actions()
    yield from rest_until(None)


def record_json(record: Record) -> dict[str, Any]:
    """One normalized record as a JSON object (exact decimal strings)."""
    if isinstance(record, Trade):
        return {"type": "trade", "instrument": record.instrument, "ts_ns": record.ts_ns,
                "price": decimal_str(record.price), "size": decimal_str(record.size), "side": record.side,
                "trade_id": record.trade_id, "source": record.source, "received_ns": record.received_ns}  # fmt: skip
    if isinstance(record, BookSnapshot | BookDelta):
        body = {"type": "book_snapshot" if isinstance(record, BookSnapshot) else "book_delta",
                "instrument": record.instrument, "ts_ns": record.ts_ns, "received_ns": record.received_ns,
                "sequence": record.sequence, "prev_sequence": record.prev_sequence,
                "bids": [[decimal_str(p), decimal_str(s)] for p, s in record.bids],
                "asks": [[decimal_str(p), decimal_str(s)] for p, s in record.asks],
                "source": record.source, "verified": record.verified}  # fmt: skip
        return body
    if isinstance(record, IntegrityEvent):
        return {"type": "integrity", "instrument": record.instrument, "event": record.kind,
                "sequence": record.sequence, "detail": record.detail, "source": record.source,
                "received_ns": record.received_ns}  # fmt: skip
    if isinstance(record, Disconnect):
        return {"type": "disconnect", "instrument": record.instrument, "ts_ns": record.ts_ns,
                "source": record.source, "reason": record.reason}  # fmt: skip
    if isinstance(record, Heartbeat):
        return {"type": "heartbeat", "instrument": record.instrument, "ts_ns": record.ts_ns, "source": record.source}
    raise TypeError(f"not a feed record: {record!r}")


def write_jsonl(records: Iterable[Record], out: IO[str]) -> int:
    count = 0
    for record in records:
        out.write(json.dumps(record_json(record), separators=(",", ":")) + "\n")
        count += 1
    return count


def connector_from_listing(venue_name: str, listing_text: str, instruments: Sequence[str],
                           **options: Any) -> Connector:  # fmt: skip
    """A connector whose symbols come from a recorded listing file (`<url> -> <ts>: <body>` lines)."""
    symbols = symbols_from_listing(venue_name, listing_bodies(listing_text))
    return venue(venue_name).connector(symbols, instruments, **options)


def fetch_listing(venue_name: str, rest_base: str | None = None, *, recorder: RecordingWriter | None = None,
                  timeout: float = 20.0) -> dict[str, Any]:  # fmt: skip
    """GET the venue's symbol listing: {url: decoded body} (recorded when `recorder` is given)."""
    import time
    from decimal import Decimal

    spec = venue(venue_name)
    bodies: dict[str, Any] = {}
    with requests.Session() as session:
        for path in spec.listing_paths:
            url = f"{rest_base or spec.rest_base}{path}"
            response = session.get(url, timeout=timeout)
            response.raise_for_status()
            if recorder is not None:
                recorder.http(url, time.time_ns(), response.text)
            bodies[url] = json.loads(response.text, parse_float=Decimal)
    return bodies


def capture(venue_name: str, instruments: Sequence[str], ws_out: IO[str], http_out: IO[str], *,
            seconds: float | None = None, ws_url: str | None = None, rest_url: str | None = None) -> None:  # fmt: skip
    """Record raw frames and REST responses (listing and snapshots) in the recorder format."""
    from candlekeep.sources.exchanges.live import FeedRunner

    recorder = RecordingWriter(ws_out, http_out)
    spec = venue(venue_name)
    symbols = spec.symbols([*fetch_listing(venue_name, rest_url, recorder=recorder).values()])
    connector = spec.connector(symbols, instruments, ws_url=ws_url, rest_url=rest_url)
    runner = FeedRunner(connector, lambda record: None, recorder=recorder)

    async def main() -> None:
        stop = asyncio.Event()
        if seconds is not None:
            asyncio.get_running_loop().call_later(seconds, stop.set)
        await runner.run(stop)

    asyncio.run(main())
