"""`GET /v1/ohlcv` and the seeds' `GET /ohlcv`: the stitched bars of one instrument and interval.

Bars are ascending, one per bucket: stored bars (final ones win), recent bars read through Redis, the
forming bar last (final:false); gaps listed, `complete` false while a closed bucket is missing
(candlekeep.serving has the rules). An untracked instrument or a range with gaps asks the coordinator
for the data (once per instrument and range, however many requests wait for it) and waits up to
`wait` seconds; an incomplete answer carries `Retry-After`. `format=csv` streams text/csv.

The routes are async: the store is read in worker threads, and a request waiting for data waits on
the event loop (candlekeep.serving.OnDemand.read_async), within the caps of api.limits (concurrent
waits per key and in total, concurrent large answers). A CSV export is an api.limits.CsvResponse:
primed before its header (a database that is down answers a JSON 503), released at once when the
client goes away or stalls, and aborted, never ended cleanly, when the database fails mid-stream.
"""

from __future__ import annotations

from contextlib import nullcontext
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
import anyio.to_thread

from api.deps import OhlcvDep
from api.limits import CsvResponse, identity_of
from api.replay_reads import replay_ohlcv
from api.schemas import OhlcvPublic, OhlcvSeedPublic
from candlekeep.bars import Interval
from candlekeep.query import MAX_BARS_PER_QUERY, OhlcvQuery, QueryError, build_query, parse_timestamp
from candlekeep.responses import ResponseCache, encode_ohlcv_json
from candlekeep.serving import (
    MAX_CSV_BARS,
    MAX_WAIT_S,
    OhlcvService,
    OnDemand,
    Stitched,
    TrackLimitReached,
    UnknownInstrument,
    build_export_query,
)
from candlekeep.sources import SourceError

router = APIRouter(prefix="/v1", tags=["ohlcv"])
seed_router = APIRouter(tags=["ohlcv"])

RETRY_AFTER_FETCHING_S = 5  # data was asked for: try again soon
RETRY_AFTER_IDLE_S = 60  # nothing could be asked for (no broker, or a request failed)

_ERRORS = {
    404: {"description": "an untracked instrument its source does not know; the detail names it and says why "
                         "(nothing is tracked or created)"},
    429: {"description": "rate limit, too many waiting requests for this key, or this key added its share of "
                         "instruments (`Retry-After`)"},
    503: {"description": "the database is unavailable, the server holds its share of waiting or large requests, "
                         "or the source cannot be asked now (`Retry-After`)"},
    422: {"description": "invalid instrument, interval, range, limit, countback or wait; the detail says which "
                         f"(a range or limit over {MAX_BARS_PER_QUERY} bars, {MAX_CSV_BARS} for CSV, names the cap)"},
    200: {"content": {"text/csv": {"example": "time,open,high,low,close,volume,quote_volume,trades,source,final\n"
                                              "1704067200,42283.58,42298.62,42261.02,42298.61,12.3456,522109.41,37,"
                                              "cryptocompare,true\n"}},
          "description": "the bars (JSON, or CSV with `format=csv`: its completeness in X-Candlekeep-Complete, "
                         "X-Candlekeep-Gaps `start-end,...` (unix s, first 100), X-Candlekeep-Gap-Count, and "
                         "Retry-After while incomplete)",
          "headers": {"X-Candlekeep-Complete": {"schema": {"type": "string", "enum": ["true", "false"]}},
                      "X-Candlekeep-Gaps": {"schema": {"type": "string"}},
                      "X-Candlekeep-Gap-Count": {"schema": {"type": "string"}}}},
}  # fmt: skip


class Format(StrEnum):
    json = "json"
    csv = "csv"


Wait = Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for missing data asked for on demand")]
Limit = Annotated[int | None, Query(ge=1, description=f"the first N bars of the range, as SQL's LIMIT (at most {MAX_BARS_PER_QUERY}); "
                                                    "`countback` gives the last N")]
Countback = Annotated[int | None, Query(ge=1, description=f"the N buckets ending at `end`; `start` is then optional and ignored "
                                                          f"(TradingView semantics; at most {MAX_BARS_PER_QUERY})")]  # fmt: skip


@router.get("/ohlcv", response_model=OhlcvPublic, summary="OHLCV bars of one instrument", responses=_ERRORS)
async def get_ohlcv(
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
    return await _answer(request, service, instrument=instrument, interval=interval, start=start, end=end,
                         limit=limit, countback=countback, fmt=format, wait=wait, seed=False)  # fmt: skip


@seed_router.get("/ohlcv", response_model=OhlcvSeedPublic, summary="OHLCV bars, seed-style parameters", responses=_ERRORS)
async def get_ohlcv_seed(
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
    return await _answer(request, service, instrument=symbol, interval=interval, start=startDate, end=endDate,
                         limit=limit, countback=None, fmt=format, wait=wait, seed=True)  # fmt: skip


async def _answer(request: Request, service: OhlcvService, *, instrument: str, interval: str, start: str | None,
                  end: str, limit: int | None, countback: int | None, fmt: Format, wait: float,
                  seed: bool) -> Response:  # fmt: skip
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
            settings, limits = request.app.state.settings, request.app.state.limits
            release = await limits.acquire_large()  # an export holds a connection while it streams
            try:
                gaps = await anyio.to_thread.run_sync(service.closed_gaps, query)
            except BaseException:
                release()
                raise
            headers = {"Content-Disposition": f'inline; filename="{_filename(query)}"', **_gap_headers(gaps, False)}
            csv = CsvResponse(service.csv_chunks(query), send_timeout_s=settings.api_send_timeout_s, release=release,
                              headers=headers)  # fmt: skip
            await csv.prime()  # releases on failure
            return csv  # type: ignore[return-value]
        responses: ResponseCache | None = getattr(request.app.state, "responses", None)
        key = (query, limit, countback, instrument, seed)
        stamp = None
        if responses is not None and fmt is Format.json:  # the encoded answer, while nothing changed
            stamp, body = await anyio.to_thread.run_sync(_cached, service, responses, key, query)
            if body is not None:
                return Response(body, media_type="application/json")
        limits = request.app.state.limits
        n = limit or countback
        buckets = (query.end - query.start) // query.interval.seconds
        large = min(buckets, n or buckets) > limits.large_bars
        async with limits.large() if large else nullcontext():
            stitched, asked = await _read(request, service, query, wait=wait, limit=limit, countback=countback)
            headers = {} if stitched.complete else {
                "Retry-After": str(RETRY_AFTER_FETCHING_S if asked else RETRY_AFTER_IDLE_S)}  # fmt: skip
            if fmt is Format.csv:
                from candlekeep.serving import CSV_HEADER, csv_line

                body = CSV_HEADER + "".join(csv_line(b) for b in stitched.bars)
                return Response(body, media_type="text/csv; charset=utf-8",
                                headers={**_gap_headers(stitched.gaps, asked), **headers})  # fmt: skip
            encoded = await anyio.to_thread.run_sync(lambda: _json(stitched, requested=instrument, seed=seed))
            if responses is not None and stamp is not None and stitched.complete and not asked:
                responses.put(key, stamp, encoded)
            return Response(encoded, media_type="application/json", headers=headers)
    except QueryError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    except UnknownInstrument as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except TrackLimitReached as exc:
        raise HTTPException(status_code=429, detail=str(exc), headers={"Retry-After": "3600"}) from None
    except SourceError as exc:  # the source could not be asked whether the instrument exists
        raise HTTPException(status_code=503, detail=f"cannot check {instrument!r} with the source now: {exc}",
                            headers={"Retry-After": str(RETRY_AFTER_IDLE_S)}) from None  # fmt: skip


async def _read(request: Request, service: OhlcvService, query: OhlcvQuery, *, wait: float,
                limit: int | None, countback: int | None) -> tuple[Stitched, bool]:  # fmt: skip
    on_demand: OnDemand | None = getattr(request.app.state, "on_demand", None)
    if on_demand is None:
        return await anyio.to_thread.run_sync(lambda: service.read(query, limit=limit, countback=countback)), False
    limits = request.app.state.limits
    who = identity_of(request)
    return await on_demand.read_async(query, wait=wait, limit=limit, countback=countback,
                                      waiting=lambda: limits.waiting(who), requester=who)  # fmt: skip


MAX_GAP_HEADER_RANGES = 100


def _gap_headers(gaps: list[tuple[int, int]], asked: bool) -> dict[str, str]:
    """A CSV's completeness in its headers, as the JSON's `gaps` / `complete` say it: X-Candlekeep-Complete,
    X-Candlekeep-Gaps (`start-end` unix s, comma-separated, the first MAX_GAP_HEADER_RANGES),
    X-Candlekeep-Gap-Count, and Retry-After while incomplete."""
    if not gaps:
        return {"X-Candlekeep-Complete": "true"}
    return {
        "X-Candlekeep-Complete": "false",
        "X-Candlekeep-Gaps": ",".join(f"{s}-{e}" for s, e in gaps[:MAX_GAP_HEADER_RANGES]),
        "X-Candlekeep-Gap-Count": str(len(gaps)),
        "Retry-After": str(RETRY_AFTER_FETCHING_S if asked else RETRY_AFTER_IDLE_S),
    }


def _countback_query(*, instrument: str, interval: str, end: str, countback: int) -> OhlcvQuery:
    try:
        parsed = Interval.parse(interval)
    except ValueError as exc:
        raise QueryError(str(exc)) from None
    end_s = parsed.ceil(parse_timestamp(end, name="end"))
    start_s = end_s - countback * parsed.seconds
    return build_query(instrument=instrument, interval=interval, start=str(max(start_s, 0)), end=str(end_s))


def _cached(service: OhlcvService, responses: ResponseCache, key: tuple, query: OhlcvQuery) -> tuple[tuple | None, bytes | None]:
    """(the current stamp of `query`'s answer, the encoded answer cached under it or None)."""
    stamp = service.answer_stamp(query)
    return stamp, None if stamp is None else responses.get(key, stamp)


_json = encode_ohlcv_json  # the OhlcvPublic shape in one pass (a pydantic model per bar costs more than the read)


def _filename(query: OhlcvQuery) -> str:
    return f"{query.instrument.id.replace(':', '_')}_{query.interval.value}_{query.start}_{query.end}.csv"
