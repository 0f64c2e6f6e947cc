"""TradingView UDF answers (the Charting Library's "UDF compatible datafeed"), without HTTP.

    history(reader=service, engine=engine, instrument=inst, resolution="60", start=..., end=..., countback=300)

`api/routes/udf.py` turns these into the protocol's JSON. Here: the resolution map, the price scale
of an instrument (from the decimals its stored bars carry), and `history`, which reads through the
stitched reader (candlekeep.serving.OhlcvService: stored bars, final over provisional, forming bar
last) and applies the protocol's rules:
- `from` is inclusive and `to` exclusive: bars with `from <= t < to` (bucket starts);
- `countback` wins over `from`: the `countback` newest bars before `to`, however far back that
  reaches (read in growing windows, each bounded, at most `_COUNTBACK_WINDOWS` of them);
- no bar: `no_data`, with `next_time` = start of the newest bar before the range (None when there
  is none), so the library jumps there instead of paging back through emptiness.
Every read is bounded: a range spans at most MAX_BARS_PER_QUERY buckets, `countback` at most
MAX_COUNTBACK.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from sqlalchemy import Engine

from candlekeep.bars import Bar, Interval
from candlekeep.instruments import Instrument
from candlekeep.query import EARLIEST, LATEST, MAX_BARS_PER_QUERY, OhlcvQuery
from candlekeep.storage.bars import BarStore

# UDF resolution -> interval. "D" is the older spelling of "1D".
RESOLUTIONS: dict[str, Interval] = {
    "1": Interval.M1,
    "5": Interval.M5,
    "15": Interval.M15,
    "30": Interval.M30,
    "60": Interval.H1,
    "240": Interval.H4,
    "1D": Interval.D1,
    "D": Interval.D1,
}
SUPPORTED_RESOLUTIONS = ["1", "5", "15", "30", "60", "240", "1D"]
INTRADAY_MULTIPLIERS = ["1", "5", "15", "30", "60", "240"]
MAX_COUNTBACK = 10_000
DEFAULT_PRICESCALE = 100
DEFAULT_VOLUME_PRECISION = 8
_MAX_DECIMALS = 12  # a price scale beyond 10^12 is noise in a stored value, not a tick size
_COUNTBACK_WINDOWS = 24


class UdfError(ValueError):
    """A request the protocol answers with {"s": "error", "errmsg": <message>}."""


class StitchedReader(Protocol):
    def read(self, query: OhlcvQuery, *, limit: int | None = None): ...  # -> candlekeep.serving.Stitched


@dataclass(frozen=True, slots=True)
class History:
    bars: list[Bar]  # ascending, one per bucket
    next_time: int | None = None  # with no bars: start of the newest bar before the range


def parse_resolution(resolution: str) -> Interval:
    try:
        return RESOLUTIONS[resolution.strip()]
    except KeyError:
        raise UdfError(
            f"unsupported resolution {resolution!r}: expected one of {', '.join(SUPPORTED_RESOLUTIONS)}"
        ) from None


def history(
    *,
    reader: StitchedReader,
    engine: Engine,
    instrument: Instrument,
    resolution: str,
    start: int,
    end: int,
    countback: int | None = None,
) -> History:
    """Bars of `instrument` at `resolution` for `[start, end)`, or the `countback` newest before `end`."""
    interval = parse_resolution(resolution)
    step = interval.seconds
    hi = interval.ceil(min(max(end, EARLIEST), LATEST))  # buckets starting before `end`
    if countback is not None:
        if not 1 <= countback <= MAX_COUNTBACK:
            raise UdfError(f"countback must be between 1 and {MAX_COUNTBACK}, got {countback}")
        return History(_last_bars(reader, engine, instrument, interval, hi, countback))
    if end <= start:
        raise UdfError(f"to ({end}) must be after from ({start})")
    lo = interval.ceil(min(max(start, EARLIEST), LATEST))  # buckets starting at or after `start`
    if (hi - lo) // step > MAX_BARS_PER_QUERY:
        raise UdfError(
            f"range spans {(hi - lo) // step} {interval.value} bars; at most {MAX_BARS_PER_QUERY} per request"
        )
    bars = _read(reader, instrument, interval, lo, hi) if hi > lo else []
    if bars:
        return History(bars)
    return History([], newest_start_before(engine, instrument=instrument.id, interval=interval, before=lo))


def _read(reader: StitchedReader, instrument: Instrument, interval: Interval, lo: int, hi: int) -> list[Bar]:
    stitched = reader.read(OhlcvQuery(instrument, interval, lo, hi))  # spans <= MAX_BARS_PER_QUERY buckets
    return [b for b in stitched.bars if lo <= b.start < hi]


def _last_bars(
    reader: StitchedReader, engine: Engine, instrument: Instrument, interval: Interval, hi: int, count: int
) -> list[Bar]:
    """The `count` newest bars starting before `hi`: windows back in time, skipping empty stretches."""
    step = interval.seconds
    found: list[Bar] = []
    for attempt in range(_COUNTBACK_WINDOWS):
        need = count - len(found)
        span = min(need * step * 2**attempt, MAX_BARS_PER_QUERY * step)
        lo = max(interval.ceil(EARLIEST), hi - span)
        if lo < hi:
            found = _read(reader, instrument, interval, lo, hi) + found
        if len(found) >= count:
            return found[-count:]
        newest = newest_start_before(engine, instrument=instrument.id, interval=interval, before=lo)
        if newest is None:
            break
        hi = newest + step  # jump over the empty stretch: the next window ends with a bar
    return found


def newest_start_before(engine: Engine, *, instrument: str, interval: Interval, before: int) -> int | None:
    """Start of the newest `interval` bucket before `before` holding data (1m, or stored 1h/1d history).

    One index probe per stored interval (primary key (instrument, interval, bucket)).
    """
    sources = [Interval.M1] + ([interval] if interval in (Interval.H1, Interval.D1) else [])
    newest = BarStore(engine).latest_start_before(instrument, sources, before)
    return None if newest is None else interval.floor(newest)


def decimals(value: Decimal) -> int:
    """Digits after the point as stored ('1.50' -> 2, '100' -> 0)."""
    exponent = value.as_tuple().exponent
    return min(-exponent, _MAX_DECIMALS) if isinstance(exponent, int) and exponent < 0 else 0


def precision(bars: list[Bar]) -> tuple[int, int]:
    """(pricescale, volume_precision) of an instrument from its bars; sane defaults without bars."""
    if not bars:
        return DEFAULT_PRICESCALE, DEFAULT_VOLUME_PRECISION
    price_digits = max(decimals(v) for b in bars for v in (b.open, b.high, b.low, b.close))
    volume_digits = max(decimals(b.volume) for b in bars)
    return 10**price_digits, volume_digits
