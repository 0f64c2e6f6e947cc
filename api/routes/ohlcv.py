"""`GET /v1/ohlcv` and the seeds' `GET /ohlcv`: the stitched bars of one instrument and interval.

Bars are ascending, one per bucket: stored bars (final ones win), recent bars read through Redis, the
forming bar last (final:false); gaps listed, `complete` false while a closed bucket is missing
(candlekeep.serving has the rules). An untracked instrument or a range with gaps asks the coordinator
for the data (once per instrument and range, however many requests wait for it) and waits up to
`wait` seconds; an incomplete answer carries `Retry-After`. `format=csv` streams text/csv.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import OhlcvDep
from api.replay_reads import replay_ohlcv
from api.schemas import OhlcvPublic, OhlcvSeedPublic, iso
from candlekeep.bars import Bar, Interval, decimal_str
from candlekeep.query import MAX_BARS_PER_QUERY, OhlcvQuery, QueryError, build_query, parse_timestamp
from candlekeep.serving import MAX_CSV_BARS, MAX_WAIT_S, OhlcvService, OnDemand, Stitched, build_export_query

router = APIRouter(prefix="/v1", tags=["ohlcv"])
seed_router = APIRouter(tags=["ohlcv"])

RETRY_AFTER_FETCHING_S = 5  # data was asked for: try again soon
RETRY_AFTER_IDLE_S = 60  # nothing could be asked for (no broker, or a request failed)

_ERRORS = {
    422: {"description": "invalid instrument, interval, range, limit, countback or wait; the detail says which "
                         f"(a range or limit over {MAX_BARS_PER_QUERY} bars, {MAX_CSV_BARS} for CSV, names the cap)"},
    200: {"content": {"text/csv": {"example": "time,open,high,low,close,volume,quote_volume,trades,source,final\n"
                                              "1704067200,42283.58,42298.62,42261.02,42298.61,12.3456,522109.41,37,"
                                              "cryptocompare,true\n"}},
          "description": "the bars (JSON, or CSV with `format=csv`)"},
}  # fmt: skip


class Format(StrEnum):
    json = "json"
    csv = "csv"


Wait = Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for missing data asked for on demand")]
Limit = Annotated[int | None, Query(ge=1, description=f"the N most recent bars of the range (at most {MAX_BARS_PER_QUERY})")]
Countback = Annotated[int | None, Query(ge=1, description=f"the N buckets ending at `end`; `start` is then optional and ignored "
                                                          f"(TradingView semantics; at most {MAX_BARS_PER_QUERY})")]  # fmt: skip


@router.get("/ohlcv", response_model=OhlcvPublic, summary="OHLCV bars of one instrument", responses=_ERRORS)
def get_ohlcv(
    request: Request,
    service: OhlcvDep,
    instrument: Annotated[str, Query(description="`venue:BASE-QUOTE`, or `BTC-USD` / `BTCUSD` (default venue cccagg)", examples=["cccagg:BTC-USD"])],
    interval: Annotated[str, Query(description="1m 5m 15m 30m 1h 4h 1d", examples=["1m"])],
    end: Annotated[str, Query(description="exclusive; unix seconds or ISO-8601", examples=["2024-01-02"])],
    start: Annotated[str | None, Query(description="unix seconds or ISO-8601 (UTC unless an offset is given); required unless countback", examples=["2024-01-01"])] = None,
    limit: Limit = None,
    countback: Countback = None,
    format: Annotated[Format, Query(description="json, or csv (streamed, header line first)")] = Format.json,
    wait: Wait = 10.0,
) -> Response:
    return _answer(request, service, instrument=instrument, interval=interval, start=start, end=end, limit=limit,
                   countback=countback, fmt=format, wait=wait, seed=False)  # fmt: skip


@seed_router.get("/ohlcv", response_model=OhlcvSeedPublic, summary="OHLCV bars, seed-style parameters", responses=_ERRORS)
def get_ohlcv_seed(
    request: Request,
    service: OhlcvDep,
    symbol: Annotated[str, Query(description="`BTCUSD`, `BTC-USD` or `venue:BASE-QUOTE`", examples=["BTCUSD"])],
    startDate: Annotated[str, Query(description="unix seconds or ISO-8601", examples=["2024-01-01"])],  # noqa: N803
    endDate: Annotated[str, Query(description="exclusive; unix seconds or ISO-8601", examples=["2024-01-02"])],  # noqa: N803
    interval: Annotated[str, Query(description="1m 5m 15m 30m 1h 4h 1d")] = "1m",
    limit: Limit = None,
    format: Annotated[Format, Query(description="json, or csv")] = Format.json,
    wait: Wait = 10.0,
) -> Response:
    return _answer(request, service, instrument=symbol, interval=interval, start=startDate, end=endDate, limit=limit,
                   countback=None, fmt=format, wait=wait, seed=True)  # fmt: skip


def _answer(request: Request, service: OhlcvService, *, instrument: str, interval: str, start: str | None, end: str,
            limit: int | None, countback: int | None, fmt: Format, wait: float, seed: bool) -> Response:  # fmt: skip
    if (replay := replay_ohlcv(request, instrument=instrument, interval=interval, start=start, end=end,
                               countback=countback)) is not None:  # replay:<session>:<instrument> (issue 9)
        return replay
    for name, value in (("limit", limit), ("countback", countback)):
        if value is not None and value > MAX_BARS_PER_QUERY:
            raise HTTPException(422, f"{name} {value} is over the cap of {MAX_BARS_PER_QUERY} bars per request")
    if limit is not None and countback is not None:
        raise HTTPException(422, "give limit or countback, not both")
    try:
        if countback is not None:
            query = _countback_query(instrument=instrument, interval=interval, end=end, countback=countback)
        elif start is None:
            raise QueryError("start is required (or give countback)")
        elif fmt is Format.csv and limit is None:
            query = build_export_query(instrument=instrument, interval=interval, start=start, end=end)
        else:
            query = build_query(instrument=instrument, interval=interval, start=start, end=end)
        if fmt is Format.csv and limit is None and countback is None:
            return StreamingResponse(service.csv_chunks(query), media_type="text/csv; charset=utf-8",
                                     headers={"Content-Disposition": f'inline; filename="{_filename(query)}"'})  # fmt: skip
        on_demand: OnDemand | None = getattr(request.app.state, "on_demand", None)
        n = limit or countback
        if on_demand is not None:
            stitched, asked = on_demand.read(query, wait=wait, limit=n)
        else:
            stitched, asked = service.read(query, limit=n), False
    except QueryError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    headers = {} if stitched.complete else {"Retry-After": str(RETRY_AFTER_FETCHING_S if asked else RETRY_AFTER_IDLE_S)}
    if fmt is Format.csv:
        from candlekeep.serving import CSV_HEADER, csv_line

        body = CSV_HEADER + "".join(csv_line(b) for b in stitched.bars)
        return Response(body, media_type="text/csv; charset=utf-8", headers=headers)
    return Response(_json(stitched, requested=instrument, seed=seed), media_type="application/json", headers=headers)


def _countback_query(*, instrument: str, interval: str, end: str, countback: int) -> OhlcvQuery:
    try:
        parsed = Interval.parse(interval)
    except ValueError as exc:
        raise QueryError(str(exc)) from None
    end_s = parsed.ceil(parse_timestamp(end, name="end"))
    start_s = end_s - countback * parsed.seconds
    return build_query(instrument=instrument, interval=interval, start=str(max(start_s, 0)), end=str(end_s))


def _json(stitched: Stitched, *, requested: str, seed: bool) -> bytes:
    """The OhlcvPublic shape, encoded directly (a pydantic model per bar costs more than the read)."""
    q = stitched.query
    days: dict[int, str] = {}
    body = {
        "instrument": q.instrument.id,
        "requested": requested,
        "interval": q.interval.value,
        "start": q.start,
        "end": q.end,
        "bars": [_bar(b, days) for b in stitched.bars],
        "gaps": [{"start": s, "end": e} for s, e in stitched.gaps],
        "complete": stitched.complete,
        "forming": stitched.forming is not None,
    }
    if seed:
        body["resolved"] = q.instrument.id
    return msgspec.json.encode(body)


def _bar(b: Bar, days: dict[int, str]) -> dict:
    return {
        "time": b.start, "start": _iso(b.start, days), "open": decimal_str(b.open), "high": decimal_str(b.high),
        "low": decimal_str(b.low), "close": decimal_str(b.close), "volume": decimal_str(b.volume),
        "quote_volume": decimal_str(b.quote_volume), "trades": b.trades, "source": b.source, "final": b.final,
    }  # fmt: skip


def _iso(ts_s: int, days: dict[int, str]) -> str:
    """api.schemas.iso(ts_s), strftime once per day (`days` caches the date part for one response)."""
    day, sec = divmod(ts_s, 86400)
    prefix = days.get(day)
    if prefix is None:
        prefix = days[day] = iso(day * 86400)[:11]  # "YYYY-MM-DDT"
    hours, rest = divmod(sec, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{prefix}{hours:02d}:{minutes:02d}:{seconds:02d}Z"


def _filename(query: OhlcvQuery) -> str:
    return f"{query.instrument.id.replace(':', '_')}_{query.interval.value}_{query.start}_{query.end}.csv"
