"""Order books: `GET /v1/book`, `/v1/book/consolidated`, `/v1/book/metrics`, `/v1/heatmap`, `WS /v1/book/stream`.

Thin glue around candlekeep.book_serving (checks, caps, bodies) over the books daemon's tables
(candlekeep.storage.books). Bad input is a 422 naming the parameter and cap; nothing stored is a
404. Prices and sizes are decimal strings. API keys and rate limits apply as to every route
(api/security.py); the WebSocket takes `?api_key=` like `/v1/stream`.

`WS /v1/book/stream?instrument=&interval=1&depth=25&mode=snapshot|diff`: every `interval` seconds
(0.1 to 60) the latest stored book is pushed when it changed: `{"type": "snapshot", ...}` (the
GET /v1/book body) first and, in `diff` mode, `{"type": "diff", ts_ns, sequence, bids, asks}` after
it, with only the levels of the top `depth` that changed (size "0": gone).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import msgspec
from fastapi import APIRouter, HTTPException, Query, Request, Response, WebSocket
from starlette.concurrency import run_in_threadpool

from api.socket_feeds import serve_until_disconnect
from candlekeep.book_serving import (
    MAX_DEPTH,
    BookNotFound,
    BookQueryError,
    book_diff,
    consolidated,
    current_book,
    heatmap,
    instrument_id,
    metrics_history,
    snapshot_body,
)
from candlekeep.storage.books import BookStore

router = APIRouter(prefix="/v1", tags=["books"])
POLICY_VIOLATION = 1008
_ERRORS = {422: {"description": "invalid parameter or over a cap; the detail says which"},
           404: {"description": "nothing stored for it"}}  # fmt: skip


def _store(request: Request | WebSocket) -> BookStore:
    store = getattr(request.app.state, "book_store", None)
    if store is None:  # one per app, made on first use (the engine is the app's)
        store = request.app.state.book_store = BookStore(request.app.state.engine)
    return store


def _json(body: object) -> Response:
    return Response(msgspec.json.encode(body), media_type="application/json")


def _call(fn, **kw) -> Response:  # type: ignore[no-untyped-def]
    try:
        return _json(fn(**kw))
    except BookQueryError as exc:
        raise HTTPException(422, str(exc)) from None
    except BookNotFound as exc:
        raise HTTPException(404, str(exc)) from None


Instrument = Annotated[str, Query(description="`venue:BASE-QUOTE`", examples=["kraken:BTC-USD"])]
Start = Annotated[str, Query(description="unix seconds or ISO-8601", examples=["2024-01-01T00:00:00Z"])]
End = Annotated[str, Query(description="exclusive; unix seconds or ISO-8601", examples=["2024-01-01T01:00:00Z"])]


@router.get("/book", summary="The current top-N book of one instrument", responses=_ERRORS)
def get_book(request: Request, instrument: Instrument,
             depth: Annotated[int, Query(ge=1, le=MAX_DEPTH, description="levels per side")] = 25) -> Response:  # fmt: skip
    return _call(current_book, store=_store(request), instrument=instrument, depth=depth, now_ns=time.time_ns())


@router.get("/book/consolidated", summary="One book across venues for a BASE-QUOTE pair", responses=_ERRORS)
def get_consolidated(
    request: Request,
    pair: Annotated[str, Query(description="BASE-QUOTE; other quotes join only by CANDLEKEEP_BOOK_QUOTE_MAP",
                               examples=["BTC-USD"])],
    bucket: Annotated[str | None, Query(description="bucket width (decimal); default per pair or sized to the price")] = None,
) -> Response:  # fmt: skip
    settings = request.app.state.settings
    return _call(consolidated, store=_store(request), pair=pair, bucket=bucket,
                 stale_ns=int(settings.book_stale_s * 1e9), widths=settings.bucket_widths(),
                 quote_map=settings.quote_map())  # fmt: skip


@router.get("/book/metrics", summary="History of imbalance, spread, mid, microprice", responses=_ERRORS)
def get_metrics(request: Request, instrument: Instrument, start: Start, end: End,
                interval: Annotated[str, Query(description="1s 5s 10s 15s 30s 1m 5m 15m 1h 4h 1d")] = "1m") -> Response:  # fmt: skip
    return _call(metrics_history, store=_store(request), instrument=instrument, start=start, end=end, interval=interval)


@router.get("/heatmap", summary="Order-book heatmap: sizes per price bucket and time slot", responses=_ERRORS)
def get_heatmap(
    request: Request, instrument: Instrument, start: Start, end: End,
    bucket: Annotated[str | None, Query(description="bucket width, a multiple of the stored one (default)")] = None,
    resolution: Annotated[str, Query(description="1s 5s 10s 15s 30s 1m 5m 15m 1h 4h 1d")] = "1m",
) -> Response:  # fmt: skip
    return _call(heatmap, store=_store(request), instrument=instrument, start=start, end=end, bucket=bucket,
                 resolution=resolution)  # fmt: skip


@router.websocket("/book/stream")
async def book_stream(websocket: WebSocket) -> None:
    await websocket.accept()
    params = websocket.query_params
    try:
        unknown = set(params) - {"instrument", "interval", "depth", "mode", "api_key"}
        if unknown:
            raise BookQueryError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
        if not params.get("instrument"):
            raise BookQueryError("missing parameter 'instrument' (e.g. kraken:BTC-USD)")
        iid = instrument_id(params["instrument"])
        try:
            interval = float(params.get("interval", "1"))
            depth = int(params.get("depth", "25"))
        except ValueError:
            raise BookQueryError("interval must be a number of seconds and depth an integer") from None
        if not 0.1 <= interval <= 60:
            raise BookQueryError("interval must be between 0.1 and 60 seconds")
        if not 1 <= depth <= MAX_DEPTH:
            raise BookQueryError(f"depth must be between 1 and {MAX_DEPTH}")
        mode = params.get("mode", "snapshot")
        if mode not in ("snapshot", "diff"):
            raise BookQueryError("mode must be snapshot or diff")
    except BookQueryError as exc:
        await websocket.close(code=POLICY_VIOLATION, reason=str(exc)[:120])
        return
    await serve_until_disconnect(websocket, _push_book(websocket, _store(websocket), iid, interval, depth, mode),
                                 f"book stream {iid}")


async def _push_book(websocket: WebSocket, store: BookStore, iid: str, interval: float, depth: int,
                     mode: str) -> None:  # fmt: skip
    """Every `interval` seconds, the latest stored book of `iid` when it changed: a snapshot first,
    then snapshots or (mode `diff`) diffs against the last one sent."""
    last = None
    while True:
        snap = await run_in_threadpool(store.latest, iid)
        if snap is not None and (last is None or snap.ts_ns != last.ts_ns):
            if mode == "diff" and last is not None:
                body = {"type": "diff", "ts_ns": snap.ts_ns, "sequence": snap.sequence,
                        **book_diff(last, snap, depth)}  # fmt: skip
            else:
                body = {"type": "snapshot", **snapshot_body(snap, depth, time.time_ns())}
            await websocket.send_text(msgspec.json.encode(body).decode())
            last = snap
        await asyncio.sleep(interval)
