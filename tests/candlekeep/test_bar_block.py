"""BarBlock: what it refuses, and the same bars both ways (Bar <-> block) with every digit kept."""

from __future__ import annotations

from decimal import Decimal

import pytest

from candlekeep.bar_block import VALUE_FIELDS, BarBlock, blocks_from_bars
from candlekeep.bars import Bar

BTC = "cccagg:BTC-USD"
T0 = 1_704_067_200  # 2024-01-01, a day boundary


def block(starts: list[int], values: list[str], **kw: object) -> BarBlock:
    return BarBlock(BTC, "1m", "cryptocompare", True, starts, values, **kw)  # type: ignore[arg-type]


ROW = "1.50\t2\t1E-8\t0.10\t100.00000001\t-0"


def test_bars_keep_the_text_digit_for_digit() -> None:
    b = block([T0, T0 + 60], [ROW, "3\t4\t1\t2\t5\t6"], columns=("close", "high", "low", "open", "volume", "quote_volume"))
    first, second = b.bars()
    # as_tuple: sign, digits and exponent, so 1.50 is not 1.5 and 1E-8 is not 0.00000001's text alone.
    assert first.close.as_tuple() == Decimal("1.50").as_tuple()
    assert first.high.as_tuple() == Decimal("2").as_tuple()
    assert first.low.as_tuple() == Decimal("1E-8").as_tuple()
    assert first.open.as_tuple() == Decimal("0.10").as_tuple()
    assert first.volume.as_tuple() == Decimal("100.00000001").as_tuple()
    assert first.quote_volume.as_tuple() == Decimal("-0").as_tuple()
    assert (second.start, second.open, second.high, second.low, second.close) == (T0 + 60, 2, 4, 1, 3)
    assert (first.instrument, first.interval, first.trades, first.source, first.final) == (BTC, "1m", None, "cryptocompare", True)


@pytest.mark.parametrize(
    ("starts", "values"),
    [
        ([T0 + 60, T0], [ROW, ROW]),  # descending
        ([T0, T0], [ROW, ROW]),  # a bucket twice
        ([T0, T0 + 90], [ROW, ROW]),  # off the minute
        ([T0 + 1, T0 + 61], [ROW, ROW]),  # consecutive, but none on a boundary
        ([T0], ["NaN\t1\t1\t1\t1\t1"]),
        ([T0], ["Infinity\t1\t1\t1\t1\t1"]),
        ([T0], ["1\t1\t1\t1\t1"]),  # a field short
        ([T0], ["1\t1\t1\t1\t1\t1\t1"]),  # a field over
        ([T0], ["1 \t1\t1\t1\t1\t1"]),
        ([T0], ["1\\N\t1\t1\t1\t1\t1"]),
        ([T0], ["1\n1\t1\t1\t1\t1"]),
        ([T0], ["١\t1\t1\t1\t1\t1"]),  # a digit, but not ASCII
        ([T0], [ROW, ROW]),  # more values than starts
    ],
)
def test_refuses_what_could_not_be_stored_exactly(starts: list[int], values: list[str]) -> None:
    with pytest.raises((ValueError, TypeError)):
        block(starts, values)


def test_columns_must_name_each_value_field_once() -> None:
    with pytest.raises(ValueError, match="columns"):
        block([T0], [ROW], columns=("open", "open", "low", "close", "volume", "quote_volume"))


def test_between_slices_by_start() -> None:
    b = block([T0, T0 + 60, T0 + 120], [ROW, "1\t1\t1\t1\t1\t1", "2\t2\t2\t2\t2\t2"])
    assert b.between(T0, T0 + 180) is b
    part = b.between(T0 + 1, T0 + 121)
    assert (list(part.starts), list(part.values)) == ([T0 + 60, T0 + 120], ["1\t1\t1\t1\t1\t1", "2\t2\t2\t2\t2\t2"])
    assert not b.between(T0 + 180, T0 + 240)


def bar(start: int, close: str, *, trades: int | None = 3, final: bool = True, source: str = "simulator") -> Bar:
    c = Decimal(close)
    return Bar(BTC, "1m", start, c, c, c, c, Decimal("0.00000001"), Decimal("1E-8"), trades, source, final)


def test_blocks_from_bars_group_sort_and_keep_the_last_of_a_bucket() -> None:
    bars = [bar(T0 + 60, "2.50"), bar(T0, "1.0"), bar(T0 + 60, "3.00"), bar(T0 + 120, "4", final=False)]
    finals, provisional = blocks_from_bars(bars)
    assert list(finals.starts) == [T0, T0 + 60] and finals.final and not provisional.final
    assert [b.close for b in finals.bars()] == [Decimal("1.0"), Decimal("3.00")]
    round_trip = finals.bars() + provisional.bars()
    expected = [bar(T0, "1.0"), bar(T0 + 60, "3.00"), bar(T0 + 120, "4", final=False)]
    assert [(b, tuple(str(getattr(b, f)) for f in VALUE_FIELDS)) for b in round_trip] == [
        (b, tuple(str(getattr(b, f)) for f in VALUE_FIELDS)) for b in expected
    ]
    assert finals.trades == [3, 3]


def test_blocks_from_bars_without_trade_counts_and_refusing_floats() -> None:
    (b,) = blocks_from_bars([bar(T0, "1", trades=None)])
    assert b.trades is None and b.bars()[0].trades is None
    floaty = Bar(BTC, "1m", T0, 1.5, Decimal(1), Decimal(1), Decimal(1), Decimal(0), Decimal(0), None, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="finite Decimals"):
        blocks_from_bars([floaty])
    with pytest.raises(TypeError, match="finite Decimals"):
        blocks_from_bars([bar(T0, "NaN")])
