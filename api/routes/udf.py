"""TradingView UDF datafeed under `/udf`: the Charting Library's `UDFCompatibleDatafeed("/udf")` works
against it unmodified.

    GET /udf/config     GET /udf/symbols?symbol=   GET /udf/search?query=&type=&exchange=&limit=
    GET /udf/history?symbol=&resolution=&from=&to=&countback=           GET /udf/time

Symbols are the instruments table's ids (ticker = `coinbase:BTC-USD`, exchange = the venue). Protocol
errors (unknown symbol, unsupported resolution, bad range) are answered the UDF way, HTTP 200 with
`{"s": "error", "errmsg": ...}`, because the library reads the body, not the status; a missing or
non-integer parameter is FastAPI's 422. History reads through the stitched service
(candlekeep.serving.OhlcvService via candlekeep.udf.history): final bars over provisional ones, the
forming bar last.

Numbers: UDF wants JSON numbers, so prices and volumes are converted from Decimal with float() at
this protocol boundary only (nowhere else in Candlekeep; `/v1/ohlcv` keeps decimal strings).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from api.deps import BarStoreDep, EngineDep, OhlcvDep
from api.replay_reads import replay_udf_history, replay_udf_symbol
from candlekeep import udf
from candlekeep.bars import Interval
from candlekeep.instruments import Instrument, resolve_instrument
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore

router = APIRouter(prefix="/udf", tags=["tradingview"])

MAX_SEARCH_RESULTS = 100
_PRECISION_SAMPLE = 120  # recent 1m bars looked at for the price scale


# -- response shapes (UDF field names, snake_case as the protocol spells them) -------------------


class UdfExchange(BaseModel):
    value: str
    name: str
    desc: str


class UdfSymbolType(BaseModel):
    name: str
    value: str


class UdfConfig(BaseModel):
    supports_search: bool = True
    supports_group_request: bool = False
    supported_resolutions: list[str] = udf.SUPPORTED_RESOLUTIONS
    supports_marks: bool = False
    supports_timescale_marks: bool = False
    supports_time: bool = True
    exchanges: list[UdfExchange]
    symbols_types: list[UdfSymbolType]


class UdfSymbol(BaseModel):
    name: str = Field(examples=["BTC-USD"])
    ticker: str = Field(examples=["coinbase:BTC-USD"])
    full_name: str = Field(examples=["coinbase:BTC-USD"])
    description: str = Field(examples=["BTC / USD on coinbase"])
    type: str = "crypto"
    session: str = "24x7"
    timezone: str = "Etc/UTC"
    exchange: str = Field(examples=["coinbase"])
    listed_exchange: str
    minmov: int = 1
    pricescale: int = Field(examples=[100], description="10^(price decimals of the stored bars); 100 without bars")
    has_intraday: bool = True
    has_daily: bool = True
    has_weekly_and_monthly: bool = False
    supported_resolutions: list[str] = udf.SUPPORTED_RESOLUTIONS
    intraday_multipliers: list[str] = udf.INTRADAY_MULTIPLIERS
    volume_precision: int
    data_status: str = "streaming"


class UdfSearchResult(BaseModel):
    symbol: str
    full_name: str
    description: str
    exchange: str
    ticker: str
    type: str = "crypto"


class UdfError(BaseModel):
    s: Literal["error"] = "error"
    errmsg: str


class UdfHistory(BaseModel):
    """`ok`: the arrays (equal lengths, t ascending); `no_data`: `nextTime` when older bars exist."""

    s: Literal["ok", "no_data"]
    t: list[int] | None = None
    o: list[float] | None = None
    h: list[float] | None = None
    l: list[float] | None = None  # noqa: E741 (the protocol's name)
    c: list[float] | None = None
    v: list[float] | None = None
    nextTime: int | None = None  # noqa: N815 (the protocol's name)


# -- routes --------------------------------------------------------------------------------------


@router.get("/config", response_model=UdfConfig, summary="Datafeed configuration")
def config(engine: EngineDep) -> UdfConfig:
    venues = sorted({i.split(":", 1)[0] for i in InstrumentStore(engine).list_ids()})
    return UdfConfig(
        exchanges=[UdfExchange(value="", name="All Exchanges", desc="")]
        + [UdfExchange(value=v, name=v, desc=v) for v in venues],
        symbols_types=[UdfSymbolType(name="All types", value=""), UdfSymbolType(name="Crypto", value="crypto")],
    )


@router.get(
    "/symbols",
    response_model=UdfSymbol | UdfError,
    response_model_exclude_none=True,
    summary="Resolve one symbol",
)
def symbols(
    request: Request,
    engine: EngineDep,
    store: BarStoreDep,
    symbol: Annotated[str, Query(description="an instrument id, or `BTCUSD` / `BTC-USD` (default venue cccagg)",
                                 examples=["coinbase:BTC-USD"])],
) -> UdfSymbol | UdfError:
    if (replay := replay_udf_symbol(request, symbol)) is not None:  # replay:<session>:<instrument> (issue 9)
        return JSONResponse(replay)  # type: ignore[return-value]
    instrument = _known(engine, symbol)
    if instrument is None:
        return UdfError(errmsg="unknown_symbol")
    pricescale, volume_precision = udf.precision(_recent_bars(store, instrument.id))
    return UdfSymbol(
        name=f"{instrument.base}-{instrument.quote}",
        ticker=instrument.id,
        full_name=instrument.id,
        description=_description(instrument),
        exchange=instrument.venue,
        listed_exchange=instrument.venue,
        pricescale=pricescale,
        volume_precision=volume_precision,
    )


@router.get("/search", response_model=list[UdfSearchResult], summary="Search symbols")
def search(
    engine: EngineDep,
    query: Annotated[str, Query(description="text contained in the id, case-insensitive")] = "",
    type: Annotated[str, Query(description="'crypto' or empty")] = "",  # noqa: A002 (the protocol's name)
    exchange: Annotated[str, Query(description="a venue, or empty for all")] = "",
    limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_RESULTS)] = 30,
) -> list[UdfSearchResult]:
    if type and type != "crypto":
        return []
    needle = query.strip().lower()
    found = []
    for instrument_id in InstrumentStore(engine).list_ids():
        instrument = Instrument.parse(instrument_id)
        if exchange and instrument.venue != exchange.lower():
            continue
        if needle and needle not in instrument_id.lower() and needle not in f"{instrument.base}{instrument.quote}".lower():
            continue
        found.append(
            UdfSearchResult(
                symbol=instrument.id,
                full_name=instrument.id,
                description=_description(instrument),
                exchange=instrument.venue,
                ticker=instrument.id,
            )
        )
        if len(found) >= limit:
            break
    return found


@router.get(
    "/history",
    response_model=UdfHistory | UdfError,
    response_model_exclude_none=True,
    summary="Bars in UDF arrays",
    description="`from` inclusive, `to` exclusive (unix s); `countback` (when given) wins over `from`: the "
    "`countback` newest bars before `to`. Without bars: `no_data` and `nextTime`, the newest bar before `from`.",
)
def history(
    request: Request,
    engine: EngineDep,
    service: OhlcvDep,
    symbol: Annotated[str, Query(examples=["coinbase:BTC-USD"])],
    resolution: Annotated[str, Query(description=" ".join(udf.SUPPORTED_RESOLUTIONS), examples=["60"])],
    from_: Annotated[int, Query(alias="from", description="unix s, inclusive")],
    to: Annotated[int, Query(description="unix s, exclusive")],
    countback: Annotated[int | None, Query(description="bars wanted, newest before `to`")] = None,
) -> UdfHistory | UdfError:
    if (replay := replay_udf_history(request, symbol=symbol, resolution=resolution, start=from_, end=to,
                                     countback=countback)) is not None:  # replay:<session>:<instrument> (issue 9)
        return JSONResponse(replay)  # type: ignore[return-value]
    instrument = _known(engine, symbol)
    if instrument is None:
        return UdfError(errmsg="unknown_symbol")
    try:
        result = udf.history(
            reader=service, engine=engine, instrument=instrument, resolution=resolution,
            start=from_, end=to, countback=countback,
        )  # fmt: skip
    except udf.UdfError as exc:
        return UdfError(errmsg=str(exc))
    if not result.bars:
        return UdfHistory(s="no_data", nextTime=result.next_time)
    bars = result.bars
    # float() here only: the UDF protocol carries JSON numbers, not decimal strings.
    return UdfHistory(
        s="ok",
        t=[b.start for b in bars],
        o=[float(b.open) for b in bars],
        h=[float(b.high) for b in bars],
        l=[float(b.low) for b in bars],
        c=[float(b.close) for b in bars],
        v=[float(b.volume) for b in bars],
    )


@router.get("/time", response_class=PlainTextResponse, summary="Server time, unix seconds as plain text")
def server_time() -> str:
    return str(int(time.time()))


# -- helpers -------------------------------------------------------------------------------------


def _known(engine, symbol: str) -> Instrument | None:
    """The registered instrument `symbol` names, or None. `symbol` resolves as `/v1/ohlcv`'s instrument
    does (candlekeep.instruments.resolve_instrument: `BTCUSD` and `BTC-USD` mean `cccagg:BTC-USD`)."""
    try:
        instrument = resolve_instrument(symbol)
    except ValueError:
        return None
    return instrument if instrument.id in InstrumentStore(engine).list_ids() else None


def _description(instrument: Instrument) -> str:
    return f"{instrument.base} / {instrument.quote} on {instrument.venue}"


def _recent_bars(store: BarStore, instrument: str) -> list:
    for interval, sample in ((Interval.M1, _PRECISION_SAMPLE), (Interval.D1, 30)):
        newest = store.latest_start(instrument, interval)
        if newest is not None:
            return store.read_bars(instrument, interval, newest - (sample - 1) * interval.seconds,
                                   newest + interval.seconds, limit=sample)  # fmt: skip
    return []
