"""`GET /v1/ohlcv`: stored bars of one instrument and interval, ascending, with the gaps listed."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from api.deps import BarStoreDep
from api.schemas import BarPublic, GapPublic, OhlcvPublic
from candlekeep.query import QueryError, build_query, query_ohlcv

router = APIRouter(prefix="/v1", tags=["ohlcv"])


@router.get(
    "/ohlcv",
    response_model=OhlcvPublic,
    summary="OHLCV bars of one instrument",
    responses={422: {"description": "invalid instrument, interval or range; the detail says which"}},
)
def get_ohlcv(
    store: BarStoreDep,
    instrument: Annotated[str, Query(description="`venue:BASE-QUOTE`, or `BTC-USD` / `BTCUSD` (default venue cccagg)", examples=["cccagg:BTC-USD"])],
    interval: Annotated[str, Query(description="1m 5m 15m 30m 1h 4h 1d", examples=["1m"])],
    start: Annotated[str, Query(description="unix seconds or ISO-8601 (UTC unless an offset is given)", examples=["2024-01-01"])],
    end: Annotated[str, Query(description="exclusive; unix seconds or ISO-8601", examples=["2024-01-02"])],
) -> OhlcvPublic:
    try:
        query = build_query(instrument=instrument, interval=interval, start=start, end=end)
    except QueryError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    result = query_ohlcv(store=store, query=query, now=int(time.time()))
    return OhlcvPublic(
        instrument=query.instrument.id,
        requested=instrument,
        interval=query.interval.value,
        start=query.start,
        end=query.end,
        bars=[BarPublic.from_bar(bar) for bar in result.bars],
        gaps=[GapPublic(start=s, end=e) for s, e in result.gaps],
        complete=result.complete,
    )
