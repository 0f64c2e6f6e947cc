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
