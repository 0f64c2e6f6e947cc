"""BarBlock: a page of bars of one instrument and interval, held as exact decimal text.

The backfill's bulk record: a source parses a history page straight into one (no `Bar` and no
`Decimal` per row), and the store streams it into PostgreSQL with one join per page. Pure data, no
I/O. `bars()` gives the same bars as `Bar` records; `blocks_from_bars` goes the other way.

A block holds, per bar, its start and its six values as the source's decimal text joined by tabs
(`values[i]`, fields in `columns` order), plus the trade counts when the source has them. The
constructor refuses what could not be stored digit for digit: starts not strictly ascending or off
the interval's boundaries, and value text with anything but digits, `.`, `+`, `-`, `e`/`E` and the
tabs between fields (so no NaN, Infinity or floats). Whether each field is a well-formed number is
left to PostgreSQL's numeric input, which refuses a malformed one loudly and reads a well-formed one
exactly: `1.50` stays 1.50, `1e-8` is 0.00000001, as `Decimal` reads them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from itertools import islice
from operator import lt

from candlekeep.bars import Bar, Interval

# The fields of `values`, in any order; `trades` travels apart (most sources count none).
VALUE_FIELDS = ("open", "high", "low", "close", "volume", "quote_volume")
_NUMBER_TEXT = b"0123456789.+-eE\t\n"  # what value text may hold (fields joined by tabs, rows by newlines)
_finite = Decimal.is_finite


@dataclass(frozen=True, slots=True)
class BarBlock:
    instrument: str
    interval: str
    source: str
    final: bool
    starts: Sequence[int]  # unix s, strictly ascending, on the interval's boundaries
    values: Sequence[str]  # per bar: its VALUE_FIELDS' decimal text in `columns` order, tab-separated
    columns: tuple[str, ...] = VALUE_FIELDS
    trades: Sequence[int | None] | None = None  # per bar; None: the source counts no trades

    def __post_init__(self) -> None:
        step = Interval(self.interval).seconds
        object.__setattr__(self, "interval", Interval(self.interval).value)  # a plain str
        n = len(self.starts)
        if sorted(self.columns) != sorted(VALUE_FIELDS):
            raise ValueError(f"columns must name each of {VALUE_FIELDS} once, got {self.columns}")
        if len(self.values) != n or (self.trades is not None and len(self.trades) != n):
            raise ValueError(f"block of {self.instrument}: {n} starts, {len(self.values)} values")
        if not n:
            return
        if not all(map(lt, self.starts, islice(self.starts, 1, None))):
            raise ValueError(f"block of {self.instrument}: starts must be strictly ascending")
        consecutive = self.starts[-1] - self.starts[0] == step * (n - 1)  # then all aligned if the first is
        if self.starts[0] % step if consecutive else any(s % step for s in self.starts):
            raise ValueError(f"block of {self.instrument}: a start is not on a {self.interval} boundary")
        try:
            text = "\n".join(self.values).encode("ascii")
        except (UnicodeEncodeError, TypeError) as exc:
            raise TypeError(f"block of {self.instrument}: values must be ASCII decimal text") from exc
        if text.translate(None, _NUMBER_TEXT) or text.count(b"\t") != n * (len(VALUE_FIELDS) - 1):
            raise ValueError(
                f"block of {self.instrument}: each value must be {len(VALUE_FIELDS)} decimal numbers joined by tabs"
            )

    def __len__(self) -> int:
        return len(self.starts)

    def between(self, lo: int, hi: int) -> BarBlock:
        """The bars with `lo <= start < hi` (the same block when all of them are)."""
        a, b = bisect_left(self.starts, lo), bisect_left(self.starts, hi)
        if a == 0 and b == len(self.starts):
            return self
        # A slice of a valid block is valid: made without checking it again.
        part = object.__new__(BarBlock)
        for name, value in (
            ("instrument", self.instrument), ("interval", self.interval), ("source", self.source),
            ("final", self.final), ("starts", self.starts[a:b]), ("values", self.values[a:b]),
            ("columns", self.columns), ("trades", None if self.trades is None else self.trades[a:b]),
        ):  # fmt: skip
            object.__setattr__(part, name, value)
        return part

    def bars(self) -> list[Bar]:
        """The same bars as `Bar` records, each value `Decimal(text)` (every digit kept)."""
        where = [self.columns.index(f) for f in VALUE_FIELDS]
        trades = self.trades if self.trades is not None else [None] * len(self.starts)
        out = []
        for start, text, count in zip(self.starts, self.values, trades, strict=True):
            fields = text.split("\t")
            o, h, lo, c, v, qv = (Decimal(fields[i]) for i in where)
            out.append(Bar(self.instrument, self.interval, start, o, h, lo, c, v, qv, count, self.source, self.final))
        return out


def blocks_from_bars(bars: Iterable[Bar]) -> list[BarBlock]:
    """`bars` (any order) as blocks, one per (instrument, interval, source, final), starts ascending.

    A bucket given twice keeps its last bar, as `BarStore.upsert_bars` does. Values must be finite
    Decimals; they are written as `str()` gives them (`1E-8` included), so every digit is kept.
    """
    latest = {(b.instrument, b.interval, b.start): b for b in bars}
    groups: dict[tuple[str, str, str, bool], list[Bar]] = {}
    for bar in latest.values():
        groups.setdefault((bar.instrument, str(bar.interval), bar.source, bool(bar.final)), []).append(bar)
    blocks = []
    for (instrument, interval, source, final), group in groups.items():
        group.sort(key=lambda b: b.start)
        values = [value_text(b) for b in group]
        trades = [b.trades for b in group]
        blocks.append(BarBlock(
            instrument, interval, source, final, [b.start for b in group], values, VALUE_FIELDS,
            None if all(t is None for t in trades) else [None if t is None else int(t) for t in trades],
        ))  # fmt: skip
    return blocks


def value_text(bar: Bar) -> str:
    """The bar's open, high, low, close, volume and quote volume as COPY text (tab-separated), each as
    `str()` gives it ('1.50', '1E-8': PostgreSQL reads exponents exactly), so every digit is kept.
    TypeError unless all six are finite Decimals."""
    o, h, lo, c, v, qv = bar.open, bar.high, bar.low, bar.close, bar.volume, bar.quote_volume
    try:  # Decimal.is_finite refuses floats and ints with a TypeError
        finite = _finite(o) and _finite(h) and _finite(lo) and _finite(c) and _finite(v) and _finite(qv)
    except TypeError:
        finite = False
    if not finite:
        raise TypeError(
            f"bar of {bar.instrument} at {bar.start}: prices and volumes must be finite Decimals, got "
            f"{(o, h, lo, c, v, qv)!r}"
        )
    return f"{str(o)}\t{str(h)}\t{str(lo)}\t{str(c)}\t{str(v)}\t{str(qv)}"
