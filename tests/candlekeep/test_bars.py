"""The pure bar math of `candlekeep.bars` against DESIGN.md "Bar semantics".

Expected values are written out by hand or computed independently (datetime for bucket edges,
integers for exact sums), never read back from the code under test.
"""

from __future__ import annotations

import decimal
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from candlekeep.bars import (
    NS_PER_S,
    Bar,
    Interval,
    Trade,
    aggregate_trades,
    decimal_str,
    flat_bar,
    missing_ranges,
    rollup_bars,
)

INST = "coinbase:BTC-USD"
SRC = "test"
D = Decimal


def ts(text: str) -> int:
    """Unix seconds of an ISO-8601 UTC time."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def trade(at_s: float | int, price: str, size: str = "1", trade_id: str | int = "1", *, ns: int = 0) -> Trade:
    return Trade(INST, int(at_s) * NS_PER_S + ns, D(price), D(size), "buy", str(trade_id), SRC)


def agg(trades: list[Trade], interval: Interval, start: int, end: int, prev_close: Decimal | None = None) -> list[Bar]:
    return aggregate_trades(trades, interval, start, end, instrument=INST, source=SRC, prev_close=prev_close)


def ohlc(bar: Bar) -> tuple[Decimal, Decimal, Decimal, Decimal]:
    return bar.open, bar.high, bar.low, bar.close


# --- Interval -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1m", "5m", "15m", "30m", "1h", "4h", "1d"])
def test_interval_parse_round_trips(text: str) -> None:
    assert Interval.parse(text).value == text


@pytest.mark.parametrize("text", ["", "1M", "2m", "60s", "1w", " 1m"])
def test_interval_parse_rejects_unknown_and_names_the_choices(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid interval .*expected one of 1m 5m 15m 30m 1h 4h 1d"):
        Interval.parse(text)


def test_interval_seconds() -> None:
    expected = {"1m": 60, "5m": 300, "15m": 900, "30m": 1800, "1h": 3600, "4h": 14400, "1d": 86400}
    assert {i.value: i.seconds for i in Interval} == expected


@pytest.mark.parametrize(
    ("interval", "at", "floor"),
    [
        (Interval.D1, "2024-03-10T00:00:00", "2024-03-10T00:00:00"),
        (Interval.D1, "2024-03-09T23:59:59", "2024-03-09T00:00:00"),
        (Interval.D1, "2024-02-29T12:34:56", "2024-02-29T00:00:00"),  # leap day
        (Interval.D1, "2024-12-31T23:59:59", "2024-12-31T00:00:00"),
        (Interval.H4, "2024-03-10T03:59:59", "2024-03-10T00:00:00"),
        (Interval.H4, "2024-03-10T04:00:00", "2024-03-10T04:00:00"),
        (Interval.H4, "2024-03-10T23:00:00", "2024-03-10T20:00:00"),
        (Interval.H1, "2024-03-10T13:59:59", "2024-03-10T13:00:00"),
        (Interval.M30, "2024-03-10T13:45:00", "2024-03-10T13:30:00"),
        (Interval.M15, "2024-03-10T13:44:59", "2024-03-10T13:30:00"),
        (Interval.M5, "2024-03-10T13:44:59", "2024-03-10T13:40:00"),
        (Interval.M1, "2024-03-10T13:44:59", "2024-03-10T13:44:00"),
    ],
)
def test_interval_floor_on_utc_edges(interval: Interval, at: str, floor: str) -> None:
    assert interval.floor(ts(at)) == ts(floor)


def test_day_buckets_are_utc_midnights() -> None:
    # An independent truth: datetime's own midnight for every day of a year, including DST dates
    # of other time zones, which UTC does not have.
    day = datetime(2024, 1, 1, tzinfo=UTC)
    for _ in range(366):
        midnight = int(day.timestamp())
        assert Interval.D1.floor(midnight) == midnight
        assert Interval.D1.floor(midnight + 86399) == midnight
        assert Interval.D1.floor(midnight - 1) == midnight - 86400
        assert Interval.D1.ceil(midnight) == midnight
        assert Interval.D1.ceil(midnight + 1) == midnight + 86400
        day += timedelta(days=1)


@pytest.mark.parametrize("interval", list(Interval))
def test_interval_ceil(interval: Interval) -> None:
    edge = ts("2024-06-01T00:00:00")
    assert interval.ceil(edge) == edge
    assert interval.ceil(edge + 1) == edge + interval.seconds
    assert interval.ceil(edge - 1) == edge
    assert interval.floor(edge - 1) == edge - interval.seconds


# --- Trade records ----------------------------------------------------------------------------------


def test_trade_refuses_floats_non_positive_values_and_unknown_sides() -> None:
    with pytest.raises(TypeError):
        Trade(INST, 0, 100.5, D(1), "buy", "1", SRC)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        Trade(INST, 0, D(0), D(1), "buy", "1", SRC)
    with pytest.raises(ValueError, match="positive"):
        Trade(INST, 0, D(1), D("-0.1"), "buy", "1", SRC)
    with pytest.raises(ValueError, match="side"):
        Trade(INST, 0, D(1), D(1), "bid", "1", SRC)


def test_trade_refuses_non_finite_prices() -> None:
    with pytest.raises(ValueError):
        Trade(INST, 0, D("Infinity"), D(1), "buy", "1", SRC)


def test_trade_ids_with_non_ascii_digits_still_sort() -> None:
    assert trade(0, "1", trade_id="²").sort_key is not None


# --- aggregate_trades ---------------------------------------------------------------------------------


def test_one_minute_bar_from_trades_in_exchange_order() -> None:
    t0 = ts("2024-06-01T12:00:00")
    trades = [
        trade(t0 + 30, "101.5", "0.5", 3),
        trade(t0 + 1, "100.0", "1", 1),
        trade(t0 + 59, "99.25", "2", 4, ns=999_999_999),  # the last nanosecond of the minute
        trade(t0 + 10, "102.75", "0.25", 2),
        trade(t0 + 60, "500", "1", 5),  # the next minute's, by the half-open bucket rule
        trade(t0 - 1, "1", "1", 0),  # the previous minute's
    ]
    [bar] = agg(trades, Interval.M1, t0, t0 + 60)
    assert bar.start == t0
    assert ohlc(bar) == (D("100.0"), D("102.75"), D("99.25"), D("99.25"))
    assert bar.volume == D("3.75")
    assert bar.quote_volume == D("100.0") + D("102.75") * D("0.25") + D("101.5") * D("0.5") + D("99.25") * 2
    assert bar.trades == 4
    assert (bar.instrument, bar.interval, bar.source, bar.final, bar.revision) == (INST, "1m", SRC, True, 0)


def test_same_timestamp_trades_are_ordered_by_numeric_id() -> None:
    t0 = ts("2024-06-01T12:00:00")
    # As strings "10" < "9"; as the venue's sequence numbers 9 comes first.
    trades = [trade(t0 + 5, "200", trade_id="10"), trade(t0 + 5, "100", trade_id="9")]
    [bar] = agg(trades, Interval.M1, t0, t0 + 60)
    assert (bar.open, bar.close) == (D(100), D(200))


def test_timestamp_orders_before_trade_id() -> None:
    t0 = ts("2024-06-01T12:00:00")
    trades = [trade(t0 + 5, "100", trade_id="2"), trade(t0 + 4, "200", trade_id="7")]
    [bar] = agg(trades, Interval.M1, t0, t0 + 60)
    assert (bar.open, bar.close) == (D(200), D(100))


def test_duplicate_trade_ids_are_counted_once() -> None:
    t0 = ts("2024-06-01T12:00:00")
    once = [trade(t0 + 1, "100", "1", 1), trade(t0 + 2, "101", "2", 2)]
    [bar] = agg(once + once + [once[0]], Interval.M1, t0, t0 + 60)
    assert bar.trades == 2
    assert bar.volume == D(3)
    assert bar.quote_volume == D(302)


def test_buckets_before_the_first_price_are_gaps_not_flat_bars() -> None:
    t0 = ts("2024-06-01T12:00:00")
    bars = agg([trade(t0 + 185, "100")], Interval.M1, t0, t0 + 300)
    assert [b.start - t0 for b in bars] == [180, 240]
    assert missing_ranges([b.start for b in bars], Interval.M1, t0, t0 + 300) == [(t0, t0 + 180)]


def test_quiet_minutes_are_flat_at_the_previous_close() -> None:
    t0 = ts("2024-06-01T12:00:00")
    trades = [trade(t0 + 1, "100", trade_id=1), trade(t0 + 2, "105", trade_id=2), trade(t0 + 190, "90", trade_id=3)]
    bars = agg(trades, Interval.M1, t0, t0 + 300)
    assert [b.start - t0 for b in bars] == [0, 60, 120, 180, 240]
    for flat, price in ((bars[1], D(105)), (bars[2], D(105)), (bars[4], D(90))):
        assert ohlc(flat) == (price, price, price, price)
        assert (flat.volume, flat.quote_volume, flat.trades) == (0, 0, 0)
        assert flat.is_flat
    assert not bars[0].is_flat and not bars[3].is_flat


def test_prev_close_makes_leading_quiet_buckets_flat() -> None:
    t0 = ts("2024-06-01T12:00:00")
    bars = agg([trade(t0 + 125, "101")], Interval.M1, t0, t0 + 180, prev_close=D("99.5"))
    assert [ohlc(b) for b in bars] == [(D("99.5"),) * 4, (D("99.5"),) * 4, (D(101),) * 4]
    assert [b.trades for b in bars] == [0, 0, 1]


def test_aggregate_refuses_unaligned_ranges() -> None:
    t0 = ts("2024-06-01T12:00:00")
    with pytest.raises(ValueError, match="not aligned"):
        agg([], Interval.M5, t0 + 60, t0 + 600)
    with pytest.raises(ValueError, match="not aligned"):
        agg([], Interval.H1, t0, t0 + 1800)


def test_large_decimal_sums_are_exact() -> None:
    # 28 significant digits (Python's default context) would round these sums; the bar keeps all.
    t0 = ts("2024-06-01T12:00:00")
    prices = [f"{987654321987 + 7 * k}.{123456789 + 31 * k:09d}" for k in range(400)]
    sizes = [f"{9876543 + k}.{12345678 + 97 * k:08d}" for k in range(400)]
    trades = [trade(t0 + k % 60, p, s, k) for k, (p, s) in enumerate(zip(prices, sizes, strict=True))]
    [bar] = agg(trades, Interval.M1, t0, t0 + 60)
    # The truth in integers: prices have 9 decimals, sizes 8, products 17.
    price_units = [int(p.replace(".", "")) for p in prices]
    size_units = [int(s.replace(".", "")) for s in sizes]
    quote_units = sum(p * s for p, s in zip(price_units, size_units, strict=True))
    assert len(str(quote_units)) > 35  # well beyond the default context's 28 digits
    assert bar.quote_volume == D(f"{quote_units}E-17")  # string construction is exact
    assert bar.quote_volume.as_tuple() == D(f"{quote_units}E-17").as_tuple()  # every digit, same exponent
    assert bar.volume == D(f"{sum(size_units)}E-8")
    with decimal.localcontext() as ctx:  # the default context really would round
        ctx.prec = 28
        rounded = sum((D(p) * D(s) for p, s in zip(prices, sizes, strict=True)), D(0))
    assert rounded != bar.quote_volume


# --- rollup_bars --------------------------------------------------------------------------------------


def test_rollup_excludes_flat_bars_from_open_high_low() -> None:
    # Minute 1 is flat at 100 (the previous close); minute 2 trades 101 then 102. The hour's open
    # and low are the first and lowest traded prices, 101, not the flat bar's 100.
    hour = ts("2024-06-01T12:00:00")
    trades = [trade(hour + 60 + 5, "101", "1", 1), trade(hour + 60 + 30, "102", "2", 2)]
    minutes = agg(trades, Interval.M1, hour, hour + 120, prev_close=D(100))
    assert minutes[0].is_flat and minutes[0].close == D(100)
    [bar] = rollup_bars(minutes, Interval.H1)
    assert (bar.start, bar.interval) == (hour, "1h")
    assert ohlc(bar) == (D(101), D(102), D(101), D(102))
    assert (bar.volume, bar.quote_volume, bar.trades) == (D(3), D(305), 2)
    # Aggregating the trades straight into the hour agrees.
    assert agg(trades, Interval.H1, hour, hour + 3600, prev_close=D(100)) == [bar]


def test_rollup_of_only_flat_bars_is_flat_at_the_close() -> None:
    start = ts("2024-06-01T12:00:00")
    minutes = [flat_bar(INST, Interval.M1, start + 60 * k, D("42.5"), SRC) for k in range(5)]
    [bar] = rollup_bars(minutes, Interval.M5)
    assert bar == flat_bar(INST, Interval.M5, start, D("42.5"), SRC)


def test_rollup_groups_by_bucket_and_sums_exactly() -> None:
    start = ts("2024-06-01T12:00:00")

    def minute(k: int, o: str, h: str, lo: str, c: str, v: str, qv: str, n: int | None, source: str = SRC) -> Bar:
        return Bar(INST, "1m", start + 60 * k, D(o), D(h), D(lo), D(c), D(v), D(qv), n, source)

    minutes = [
        minute(3, "10", "12", "9", "11", "0.00000001", "0.0000001", 1),
        minute(4, "11", "15", "11", "14", "2", "28", 2),
        minute(5, "14", "14", "8", "9", "1.5", "13.5", 3),
        minute(9, "9", "9", "9", "9", "1", "9", None, source="other"),
    ]
    first, second = rollup_bars(minutes, Interval.M5)
    assert (first.start, ohlc(first), first.volume, first.quote_volume, first.trades) == (
        start,
        (D(10), D(15), D(9), D(14)),
        D("2.00000001"),
        D("28.0000001"),
        3,
    )
    assert first.source == SRC
    assert second.start == start + 300
    assert ohlc(second) == (D(14), D(14), D(8), D(9))
    assert second.trades is None  # one minute without a count: the sum is unknown
    assert second.source == "mixed"


def test_rollup_close_is_the_last_bars_close_even_when_flat() -> None:
    # A flat bar carries a close (the venue's previous close, possibly after a gap in our capture):
    # it counts for the close, never for open/high/low.
    start = ts("2024-06-01T12:00:00")
    traded = Bar(INST, "1m", start, D(10), D(12), D(9), D(11), D(1), D(11), 1, SRC)
    after_gap = flat_bar(INST, Interval.M1, start + 180, D("11.5"), SRC)
    [bar] = rollup_bars([traded, after_gap], Interval.M5)
    assert ohlc(bar) == (D(10), D(12), D(9), D("11.5"))


def test_rollup_final_and_revision() -> None:
    start = ts("2024-06-01T12:00:00")
    a = flat_bar(INST, Interval.M1, start, D(1), SRC)
    b = Bar(INST, "1m", start + 60, D(1), D(2), D(1), D(2), D(1), D(2), 1, SRC, final=False, revision=3)
    [bar] = rollup_bars([a, b], Interval.M5)
    assert (bar.final, bar.revision) == (False, 3)


# --- missing_ranges and Bar.problems ---------------------------------------------------------------------


def test_missing_ranges() -> None:
    t0 = ts("2024-06-01T00:00:00")
    m = 60
    assert missing_ranges([t0 + k * m for k in range(10)], Interval.M1, t0, t0 + 10 * m) == []
    assert missing_ranges([], Interval.M1, t0, t0 + 10 * m) == [(t0, t0 + 10 * m)]
    present = [t0 + k * m for k in (0, 1, 4, 5, 8)]
    assert missing_ranges(present, Interval.M1, t0, t0 + 10 * m) == [
        (t0 + 2 * m, t0 + 4 * m),
        (t0 + 6 * m, t0 + 8 * m),
        (t0 + 9 * m, t0 + 10 * m),
    ]
    # Unaligned edges: only buckets starting inside [start, end) are considered.
    assert missing_ranges([t0 + m], Interval.M1, t0 + 1, t0 + 2 * m + 1) == [(t0 + 2 * m, t0 + 3 * m)]
    assert missing_ranges([t0 + 3600], Interval.H1, t0, t0 + 3 * 3600) == [(t0, t0 + 3600), (t0 + 7200, t0 + 10800)]


def test_bar_problems() -> None:
    start = ts("2024-06-01T00:00:00")
    good = Bar(INST, "1h", start, D(10), D(12), D(9), D(11), D(1), D(10), 1, SRC)

    def problems(**changes: object) -> str:
        return " | ".join(replace(good, **changes).problems())  # type: ignore[arg-type]

    assert good.problems() == []
    assert flat_bar(INST, Interval.M1, start, D(5), SRC).problems() == []
    assert "OHLC inconsistent" in problems(high=D("10.5"))  # close above high
    assert "OHLC inconsistent" in problems(low=D("10.5"))  # open below low
    assert "OHLC inconsistent" in problems(open=D(13))
    assert "negative volume" in problems(volume=D(-1))
    assert "negative volume" in problems(quote_volume=D("-0.01"))
    assert "negative trade count" in problems(trades=-1)
    assert "not on a 1h boundary" in problems(start=start + 60)
    assert problems(trades=None) == ""  # an unknown count is not a problem
    assert len(replace(good, high=D(1), volume=D(-1), trades=-2, start=start + 1).problems()) == 4


# --- the property: rolling up 1m bars equals aggregating the trades at the coarser interval -------------

_HOUR0 = ts("2024-06-01T10:00:00")
_SPAN = 2 * 3600

_trades = st.lists(
    st.tuples(
        st.integers(0, _SPAN * NS_PER_S - 1),  # time in the two hours
        st.integers(1, 10**7),  # price in cents
        st.integers(1, 10**9),  # size in 1e-8
        st.integers(0, 50),  # trade id (collisions = duplicates of one trade)
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    raw=_trades,
    interval=st.sampled_from([Interval.M5, Interval.M15, Interval.H1]),
    prev_close=st.none() | st.integers(1, 10**7).map(lambda c: D(c).scaleb(-2)),
    clustered=st.booleans(),
)
def test_rollup_of_1m_equals_aggregation_at_the_interval(
    raw: list[tuple[int, int, int, int]], interval: Interval, prev_close: Decimal | None, clustered: bool
) -> None:
    by_id: dict[int, Trade] = {}
    for offset, price, size, trade_id in raw:
        if clustered:  # many trades on one timestamp: the id decides their order
            offset -= offset % (600 * NS_PER_S)
        at_ns = _HOUR0 * NS_PER_S + offset
        made = Trade(INST, at_ns, D(price).scaleb(-2), D(size).scaleb(-8), "sell", str(trade_id), SRC)
        by_id.setdefault(trade_id, made)
    trades = list(by_id.values())
    trades = trades + trades[: len(trades) // 2]  # replayed duplicates
    minutes = agg(trades, Interval.M1, _HOUR0, _HOUR0 + _SPAN, prev_close)
    direct = agg(trades, interval, _HOUR0, _HOUR0 + _SPAN, prev_close)
    assert list(rollup_bars(minutes, interval)) == direct
    # And the bars are consistent, with every unique trade counted once.
    assert all(not b.problems() for b in direct)
    assert sum(b.trades or 0 for b in direct) == len(by_id)


@pytest.mark.parametrize(
    ("value", "text"),
    [("42283.58", "42283.58"), ("1.50", "1.50"), ("1E-8", "0.00000001"), ("0.000001", "0.000001"),
     ("1.5E+3", "1500"), ("0E-10", "0.0000000000"), ("-0.25", "-0.25"), ("123456789012345.123456789012", "123456789012345.123456789012")],
)
def test_decimal_str_is_plain_text_with_every_digit(value: str, text: str) -> None:
    assert decimal_str(D(value)) == text
    assert D(decimal_str(D(value))) == D(value)


# -- the one UTC time formatter ------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=4_102_444_800))  # 1970 .. 2100
def test_iso_utc_matches_the_standard_librarys_isoformat(ts: int) -> None:
    from candlekeep.bars import iso_utc

    assert iso_utc(ts) == datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
