"""Session bars through the live doors: `GET /v1/ohlcv?instrument=replay:<id>:<instrument>`.

A replay instrument is `replay:<session>:<instrument>`. Its bars are the replay-bars daemon's
(streaming/replay_bars.py) in Redis under `replay:<session>:` keys (candlekeep.replay_bars); the
answer has the live shape (api.routes.ohlcv), with `instrument` saying the replay symbol. Gaps are
the closed buckets of the session's range (up to its replay clock) without a bar. The routes call
`replay_ohlcv` first and carry on with the live read when it returns None (not a replay symbol).
"""

from __future__ import annotations

import time

import msgspec
from fastapi import HTTPException, Request, Response

from candlekeep.bars import NS_PER_S, missing_ranges
from candlekeep.query import QueryError, build_query
from candlekeep.replay_bars import parse_replay_symbol, read_replay_bars
from candlekeep.serving import Stitched
from candlekeep.storage.replay_sessions import ReplaySessionStore, SessionNotFound


def replay_ohlcv(request: Request, *, instrument: str, interval: str, start: str | None, end: str,
                 countback: int | None = None) -> Response | None:  # fmt: skip
    parsed = parse_replay_symbol(instrument)
    if parsed is None:
        return None
    session, inner = parsed
    cache = getattr(request.app.state, "cache", None)
    if cache is None:
        raise HTTPException(503, "replay bars are kept in Redis: set CANDLEKEEP_REDIS_URL")
    try:
        row = ReplaySessionStore(request.app.state.engine).get(session)
    except SessionNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    if inner not in row.instruments:
        raise HTTPException(404, f"replay session {session} does not replay {inner} (it has {', '.join(row.instruments)})")
    try:
        if countback is not None:
            from candlekeep.bars import Interval

            step = Interval.parse(interval).seconds
            start = str(int(end) - countback * step) if end.isdigit() else None
            if start is None:
                raise QueryError("countback on a replay symbol needs end in unix seconds")
        elif start is None:
            raise QueryError("start is required (or give countback)")
        query = build_query(instrument=inner, interval=interval, start=start, end=end)
    except QueryError as exc:
        raise HTTPException(422, str(exc)) from None
    closed, forming = read_replay_bars(cache.client, session, inner, query.interval, query.start, query.end)
    clock_s = row.clock_at(time.time_ns()) // NS_PER_S
    closed_until = forming.start if forming is not None else query.interval.floor(clock_s - row.lateness_ns // NS_PER_S)
    lo = max(query.start, query.interval.ceil(row.start_ns // NS_PER_S))
    hi = min(query.end, closed_until, query.interval.ceil(-(-row.end_ns // NS_PER_S)))
    gaps = missing_ranges([b.start for b in closed], query.interval, lo, hi) if lo < hi else []
    bars = closed + ([forming] if forming is not None else [])
    from api.routes.ohlcv import _json  # the live answer's encoder (imported late: that module imports this one)

    body = msgspec.json.decode(_json(Stitched(query, bars, gaps, not gaps, forming), requested=instrument, seed=False))
    body["instrument"] = f"replay:{session}:{inner}"
    body["session"] = {"id": session, "state": str(row.state), "clock_ns": row.clock_at(time.time_ns())}
    return Response(msgspec.json.encode(body), media_type="application/json")


# --- TradingView UDF: `replay:<id>:<instrument>` symbols ------------------------------------------


def _session_instrument(request: Request, symbol: str):
    """(session row, instrument, cache) for a replay symbol this API can serve, else None."""
    parsed = parse_replay_symbol(symbol)
    cache = getattr(request.app.state, "cache", None)
    if parsed is None or cache is None:
        return None
    session, inner = parsed
    try:
        row = ReplaySessionStore(request.app.state.engine).get(session)
    except SessionNotFound:
        return None
    return (row, inner, cache) if inner in row.instruments else None


def replay_udf_symbol(request: Request, symbol: str) -> dict | None:
    """The UDF symbol info of a replay symbol (None: not one, or unknown), fields as the live one."""
    if parse_replay_symbol(symbol) is None:
        return None
    found = _session_instrument(request, symbol)
    if found is None:
        return {"s": "error", "errmsg": "unknown_symbol"}
    row, inner, cache = found
    from candlekeep import udf
    from candlekeep.bars import Interval

    bars, _ = read_replay_bars(cache.client, row.id, inner, Interval.M1, row.start_ns // NS_PER_S,
                               -(-row.end_ns // NS_PER_S))  # fmt: skip
    pricescale, volume_precision = udf.precision(bars[-500:])
    base_quote = inner.split(":", 1)[1]
    return {"name": f"{base_quote} replay {row.id}", "ticker": symbol, "full_name": symbol,
            "description": f"{base_quote} on {inner.split(':')[0]}, replayed (session {row.id})", "type": "crypto",
            "session": "24x7", "timezone": "Etc/UTC", "exchange": "replay", "listed_exchange": "replay", "minmov": 1,
            "pricescale": pricescale, "has_intraday": True, "has_daily": True, "has_weekly_and_monthly": False,
            "supported_resolutions": udf.SUPPORTED_RESOLUTIONS, "volume_precision": volume_precision,
            "data_status": "streaming" if str(row.state) == "running" else "endofday"}  # fmt: skip


def replay_udf_history(request: Request, *, symbol: str, resolution: str, start: int, end: int,
                       countback: int | None) -> dict | None:  # fmt: skip
    """UDF history arrays of a replay symbol's session bars (None: not a replay symbol)."""
    if parse_replay_symbol(symbol) is None:
        return None
    found = _session_instrument(request, symbol)
    if found is None:
        return {"s": "error", "errmsg": "unknown_symbol"}
    row, inner, cache = found
    from candlekeep import udf

    try:
        interval = udf.parse_resolution(resolution)
    except udf.UdfError as exc:
        return {"s": "error", "errmsg": str(exc)}
    if countback is not None:
        start = min(start, end - countback * interval.seconds)
    closed, forming = read_replay_bars(cache.client, row.id, inner, interval, start, end)
    bars = [b for b in closed + ([forming] if forming is not None else []) if start <= b.start < end]
    if countback is not None:
        bars = bars[-countback:]
    if not bars:
        return {"s": "no_data"}
    # float() here only: the UDF protocol carries JSON numbers, not decimal strings.
    return {"s": "ok", "t": [b.start for b in bars], "o": [float(b.open) for b in bars],
            "h": [float(b.high) for b in bars], "l": [float(b.low) for b in bars],
            "c": [float(b.close) for b in bars], "v": [float(b.volume) for b in bars]}  # fmt: skip


# --- WS /v1/stream?instrument=replay:<id>:<instrument> --------------------------------------------


async def replay_stream(websocket, symbol: str, interval_text: str) -> None:
    """The live stream protocol for a session: subscribe to its updates channel first, then the
    snapshot of the session's bars so far, then every update (forming bars as the replay clock
    moves them, closes, revisions), each bar once (candlekeep.live_feed.Seam)."""
    import contextlib

    import redis.asyncio as aioredis
    from starlette.concurrency import run_in_threadpool
    from starlette.websockets import WebSocketDisconnect

    from candlekeep.bars import Interval
    from candlekeep.live_feed import Seam
    from candlekeep.messages import MessageError, decode_bar, encode_bar
    from candlekeep.replay_bars import updates_channel

    found = _session_instrument(websocket, symbol)
    try:
        interval = Interval.parse(interval_text)
    except ValueError as exc:
        await websocket.close(code=1008, reason=str(exc)[:120])
        return
    if found is None:
        await websocket.close(code=1008, reason="unknown replay session or instrument (or no Redis)")
        return
    row, inner, cache = found
    client = aioredis.Redis.from_url(websocket.app.state.settings.redis_url, socket_connect_timeout=1)
    pubsub = client.pubsub()
    seam = Seam()

    async def offer(bar) -> int:
        if not seam.offer(bar):
            return 0
        await websocket.send_text('{"type":"bar","bar":' + encode_bar(bar).decode() + "}")
        return 1

    async def read(lo: int, hi: int) -> list:
        closed, forming = await run_in_threadpool(read_replay_bars, cache.client, row.id, inner, interval, lo, hi)
        return closed + ([forming] if forming is not None else [])

    try:
        await pubsub.subscribe(updates_channel(row.id, inner, "1m"))
        while (msg := await pubsub.get_message(timeout=5)) is None or msg["type"] != "subscribe":
            pass
        lo, hi = row.start_ns // NS_PER_S, -(-row.end_ns // NS_PER_S) + interval.seconds
        sent = 0
        for bar in await read(lo, hi):
            sent += await offer(bar)
        await websocket.send_json({"type": "live", "mode": "redis", "snapshot": sent, "session": row.id})
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if msg is None or msg["type"] != "message":
                continue
            try:
                bar = decode_bar(msg["data"])
            except MessageError:
                continue
            if interval is Interval.M1:
                await offer(bar)
            else:
                start = interval.floor(bar.start)
                for coarse in await read(start, start + interval.seconds):
                    await offer(coarse)
    except WebSocketDisconnect:
        pass
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()
            await client.aclose()
