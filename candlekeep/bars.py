"""Ticks and bars: the records every part exchanges, and the pure bar math (DESIGN.md "Bar semantics").

No I/O here. Times are integers (bar starts in unix seconds, trade times in unix nanoseconds) so
bucket edges are exact; prices and sizes are `Decimal` and never pass through a float.

Conventions, in one place:
- a bar holds trades with `start <= ts < start + interval`; open = first trade, close = last, by
  (exchange timestamp, trade id); volume = sum of size; quote_volume = sum of price * size;
- a live minute without trades is a *flat* bar at the previous close with zero volume;
- a missing bar is a gap, reported and never filled;
- coarser bars are rolled up from finer ones, and flat bars contribute only their close (a flat bar
  sits at the previous close, which exchange convention does not count as a traded price).
"""

from __future__ import annotations

import decimal
import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

# Sums of prices and sizes stay exact: 28 significant digits (Python's default) could round a large
# quote volume, so aggregation runs in a context far wider than any price x size product needs.
EXACT = decimal.Context(prec=120, traps=[decimal.Inexact, decimal.InvalidOperation])

NS_PER_S = 1_000_000_000


class Interval(enum.StrEnum):
    M1 = "1m"
    M5 = "5m"
    M15 = "15m"
    M30 = "30m"
    H1 = "1h"
    H4 = "4h"
    D1 = "1d"

    @property
    def seconds(self) -> int:
        return _INTERVAL_SECONDS[self]

    def floor(self, ts_s: int) -> int:
        """Start (unix s) of the bucket holding `ts_s`; buckets are UTC and aligned to the epoch."""
        return ts_s - ts_s % self.seconds

    def ceil(self, ts_s: int) -> int:
        return -((-ts_s) // self.seconds) * self.seconds

    @classmethod
    def parse(cls, text: str) -> Interval:
        try:
            return cls(text)
        except ValueError:
            allowed = " ".join(i.value for i in cls)
            raise ValueError(f"invalid interval {text!r}: expected one of {allowed}") from None


_INTERVAL_SECONDS = {
    Interval.M1: 60,
    Interval.M5: 300,
    Interval.M15: 900,
    Interval.M30: 1800,
    Interval.H1: 3600,
    Interval.H4: 14400,
    Interval.D1: 86400,
}

SIDES = ("buy", "sell", "unknown")


def iso_utc(ts_s: int) -> str:
    """Unix seconds as ISO-8601 UTC, `2024-01-01T00:00:00Z`: the one time formatter of every output."""
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def decimal_str(value: Decimal) -> str:
    """Plain decimal text with every digit the source gave (`str()` alone would write 1E-8)."""
    text = str(value)  # plain notation, and twice as fast as format(), unless it has an exponent
    return text if "E" not in text else format(value, "f")


@dataclass(frozen=True, slots=True)
class Trade:
    """One trade (a tick). `ts_ns` is exchange time, `received_ns` our receipt time."""

    instrument: str
    ts_ns: int
    price: Decimal
    size: Decimal
    side: str
    trade_id: str
    source: str
    received_ns: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.price, Decimal) or not isinstance(self.size, Decimal):
            raise TypeError("Trade price and size must be Decimal (never float)")
        if not (self.price.is_finite() and self.size.is_finite()) or self.price <= 0 or self.size <= 0:
            raise ValueError(f"trade {self.trade_id} of {self.instrument}: price and size must be positive")
        if self.side not in SIDES:
            raise ValueError(f"trade {self.trade_id}: side must be one of {SIDES}, got {self.side!r}")

    @property
    def sort_key(self) -> tuple:
        return trade_order_key(self.ts_ns, self.trade_id)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The source was live for `instrument` and has sent every trade of it up to `ts_ns`."""

    instrument: str
    ts_ns: int
    source: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The source cannot vouch for `instrument` between its previous record and its next one.

    A dropped connection, a failed subscription, or a producer that started without knowing the
    past; `ts_ns` is when the source noticed. The span around it is a gap (DESIGN.md).
    """

    instrument: str
    ts_ns: int
    source: str
    reason: str


# What the `ticks` log carries, per instrument, in log order.
TickRecord = Trade | Heartbeat | Disconnect


def trade_order_key(ts_ns: int, trade_id: str) -> tuple:
    """Exchange order: timestamp, then trade id (numerically when the ids are numbers)."""
    if trade_id.isascii() and trade_id.isdigit():
        return (ts_ns, 0, int(trade_id), "")
    return (ts_ns, 1, 0, trade_id)


@dataclass(frozen=True, slots=True)
class Bar:
    """One OHLCV bar. `start` is the bucket start in unix seconds (UTC)."""

    instrument: str
    interval: str
    start: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    quote_volume: Decimal
    trades: int | None
    source: str
    final: bool = True
    revision: int = 0

    @property
    def start_dt(self) -> datetime:
        return datetime.fromtimestamp(self.start, UTC)

    @property
    def is_flat(self) -> bool:
        """No trade: zero volume and one price (the previous close)."""
        return self.volume == 0 and self.open == self.high == self.low == self.close

    def problems(self) -> list[str]:
        """What makes this bar impossible (empty when it is consistent)."""
        found = []
        if not (self.low <= self.open <= self.high and self.low <= self.close <= self.high):
            found.append(f"OHLC inconsistent: o={self.open} h={self.high} l={self.low} c={self.close}")
        if self.volume < 0 or self.quote_volume < 0:
            found.append(f"negative volume: v={self.volume} qv={self.quote_volume}")
        if self.trades is not None and self.trades < 0:
            found.append(f"negative trade count: {self.trades}")
        if self.interval not in Interval.__members__.values():
            found.append(f"unknown interval {self.interval!r}")
        elif self.start % Interval(self.interval).seconds:
            found.append(f"start {self.start} is not on a {self.interval} boundary")
        return found


# A bar as the database gives it to readers (candlekeep.storage.bars.BarStore.read_rows): (start,
# open, high, low, close, volume, quote_volume, trades, source, final, revision), the six decimals as
# plain decimal text ('1.50', '0.00000001': what decimal_str writes). Encoders write it as it is;
# `row_bar` makes the Bar.
BarRow = tuple[int, str, str, str, str, str, str, int | None, str, bool, int]


def bar_row(bar: Bar) -> BarRow:
    d = decimal_str
    return (bar.start, d(bar.open), d(bar.high), d(bar.low), d(bar.close), d(bar.volume), d(bar.quote_volume),
            bar.trades, bar.source, bar.final, bar.revision)  # fmt: skip


def row_bar(instrument: str, interval: str, row: BarRow) -> Bar:
    s, o, h, lo, c, v, qv, trades, source, final, revision = row
    return Bar(instrument, interval, s, Decimal(o), Decimal(h), Decimal(lo), Decimal(c), Decimal(v), Decimal(qv),
               trades, source, final, revision)  # fmt: skip


class BarRows(Sequence[Bar]):
    """Bars of one instrument and interval held as BarRows; each Bar is made when it is asked for
    (an encoder reads `rows` and makes none)."""

    __slots__ = ("instrument", "interval", "rows")

    def __init__(self, instrument: str, interval: str, rows: list[BarRow]) -> None:
        self.instrument, self.interval, self.rows = instrument, interval, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [row_bar(self.instrument, self.interval, r) for r in self.rows[index]]
        return row_bar(self.instrument, self.interval, self.rows[index])

    def __iter__(self) -> Iterator[Bar]:
        return (row_bar(self.instrument, self.interval, r) for r in self.rows)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"BarRows({list(self)!r})"


def flat_bar(instrument: str, interval: Interval, start: int, price: Decimal, source: str) -> Bar:
    zero = Decimal(0)
    return Bar(instrument, interval.value, start, price, price, price, price, zero, zero, 0, source)


def aggregate_trades(
    trades: Iterable[Trade],
    interval: Interval,
    start: int,
    end: int,
    *,
    instrument: str,
    source: str,
    prev_close: Decimal | None = None,
) -> list[Bar]:
    """Bars for every bucket of `[start, end)` from trades (in any order, duplicates by id dropped).

    Buckets before the first known price (no `prev_close` and no trade yet) have no bar: that is a
    gap, not a flat bar. `start` and `end` must lie on bucket edges.
    """
    if start % interval.seconds or end % interval.seconds:
        raise ValueError(f"range [{start}, {end}) is not aligned to {interval.value} buckets")
    unique = {t.trade_id: t for t in trades}
    ordered = sorted(unique.values(), key=lambda t: t.sort_key)
    bars: list[Bar] = []
    i = 0
    with decimal.localcontext(EXACT):
        for bucket in range(start, end, interval.seconds):
            bucket_end_ns = (bucket + interval.seconds) * NS_PER_S
            in_bucket = []
            while i < len(ordered) and ordered[i].ts_ns < bucket_end_ns:
                if ordered[i].ts_ns >= bucket * NS_PER_S:
                    in_bucket.append(ordered[i])
                i += 1
            if in_bucket:
                bar = _bar_from_trades(in_bucket, interval, bucket, instrument, source)
                bars.append(bar)
                prev_close = bar.close
            elif prev_close is not None:
                bars.append(flat_bar(instrument, interval, bucket, prev_close, source))
    return bars


def _bar_from_trades(trades: Sequence[Trade], interval: Interval, start: int, instrument: str, source: str) -> Bar:
    prices = [t.price for t in trades]
    return Bar(
        instrument=instrument,
        interval=interval.value,
        start=start,
        open=prices[0],
        high=max(prices),
        low=min(prices),
        close=prices[-1],
        volume=sum((t.size for t in trades), Decimal(0)),
        quote_volume=sum((t.price * t.size for t in trades), Decimal(0)),
        trades=len(trades),
        source=source,
    )


def rollup_bars(bars: Iterable[Bar], interval: Interval) -> Iterator[Bar]:
    """Roll ascending finer bars up into `interval` bars (exactly; flat bars only carry the close)."""
    group: list[Bar] = []
    for bar in bars:
        if group and interval.floor(bar.start) != interval.floor(group[0].start):
            yield _merge(group, interval)
            group = []
        group.append(bar)
    if group:
        yield _merge(group, interval)


def _merge(group: Sequence[Bar], interval: Interval) -> Bar:
    traded = [b for b in group if not b.is_flat] or [group[-1]]
    counts = [b.trades for b in group]
    sources = {b.source for b in group}
    with decimal.localcontext(EXACT):
        return Bar(
            instrument=group[0].instrument,
            interval=interval.value,
            start=interval.floor(group[0].start),
            open=traded[0].open,
            high=max(b.high for b in traded),
            low=min(b.low for b in traded),
            close=group[-1].close,
            volume=sum((b.volume for b in group), Decimal(0)),
            quote_volume=sum((b.quote_volume for b in group), Decimal(0)),
            trades=None if None in counts else sum(counts),
            source=sources.pop() if len(sources) == 1 else "mixed",
            final=all(b.final for b in group),
            revision=max(b.revision for b in group),
        )


def missing_ranges(starts: Iterable[int], interval: Interval, start: int, end: int) -> list[tuple[int, int]]:
    """The `[gap_start, gap_end)` ranges of buckets in `[start, end)` with no bar in `starts`."""
    present = set(starts)
    gaps: list[tuple[int, int]] = []
    gap_start = None
    for bucket in range(interval.ceil(start), end, interval.seconds):
        if bucket in present:
            if gap_start is not None:
                gaps.append((gap_start, bucket))
                gap_start = None
        elif gap_start is None:
            gap_start = bucket
    if gap_start is not None:
        gaps.append((gap_start, interval.ceil(end)))
    return gaps

