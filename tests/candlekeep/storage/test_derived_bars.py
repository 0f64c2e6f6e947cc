"""Coarser intervals read from SQL equal candlekeep.bars.rollup_bars of the stored 1m bars (the
independent truth), flat-bar rule included; 1h/1d fall back to stored deep history only where a
bucket has no 1m bar at all."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from candlekeep.bars import Bar, Interval, rollup_bars
from candlekeep.storage.bars import BarStore

T0 = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp())
DERIVED = [Interval.M5, Interval.M15, Interval.M30, Interval.H1, Interval.H4, Interval.D1]
_names = itertools.count()

decimals = st.builds(lambda units, places: Decimal(units).scaleb(-places), st.integers(1, 10**9), st.integers(0, 8))


@st.composite
def minute_bars(draw: st.DrawFn) -> list[Bar]:
    """Ascending 1m bars of one instrument over up to a few days, with gaps, flat bars (at the
    previous close), bars that traded at one price, missing trade counts and mixed sources."""
    instrument = f"test:P{next(_names)}-USD"
    start = T0 + draw(st.integers(0, 3 * 1440)) * 60
    bars: list[Bar] = []
    close = draw(decimals)
    for _ in range(draw(st.integers(1, 60))):
        kind = draw(st.sampled_from(["trade", "trade", "flat", "flat", "one-price"]))
        source = draw(st.sampled_from(["cryptocompare", "cryptocompare", "stream"]))
        final = draw(st.booleans())
        trades = draw(st.one_of(st.none(), st.integers(0, 10**6)))
        zero = Decimal(0).scaleb(-draw(st.integers(0, 8)))
        if kind == "flat":
            bar = Bar(instrument, "1m", start, close, close, close, close, zero, zero, trades, source, final)
        elif kind == "one-price":
            price, volume = draw(decimals), draw(decimals)
            bar = Bar(instrument, "1m", start, price, price, price, price, volume, volume * price, trades, source,
                      final)
        else:
            o, c, up, down = draw(decimals), draw(decimals), draw(decimals), draw(decimals)
            volume = draw(st.one_of(st.just(zero), decimals))  # zero volume but moving prices: not flat
            high, low = max(o, c) + up, max(min(o, c) - down, Decimal("0.00000001"))
            low = min(low, o, c)
            bar = Bar(instrument, "1m", start, o, high, low, c, volume, draw(decimals), trades, source, final)
        bars.append(bar)
        close = bar.close
        start += 60 * draw(st.sampled_from([1, 1, 1, 2, 7, 31, 61, 240, 1441]))
    return bars


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bars=minute_bars(), cut=st.tuples(st.integers(-3600, 3600), st.integers(-3600, 3600)))
def test_derived_intervals_equal_rollup_of_stored_1m(engine: Engine, bars: list[Bar], cut: tuple[int, int]) -> None:
    store = BarStore(engine)
    store.upsert_bars(bars)
    instrument = bars[0].instrument
    stored = store.read_bars(instrument, Interval.M1, bars[0].start - 86400, bars[-1].start + 86400)
    assert stored == bars  # revision 0 everywhere: freshly inserted
    # Ranges cut at arbitrary (unaligned) points as well as the whole span.
    for start, end in [(bars[0].start - 86400, bars[-1].start + 86400),
                       (bars[0].start + cut[0], bars[-1].start + cut[1])]:
        for interval in DERIVED:
            expected = [b for b in rollup_bars(stored, interval) if start <= b.start < end]
            assert store.read_bars(instrument, interval, start, end) == expected, interval
            assert store.bucket_starts(instrument, interval, start, end) == [b.start for b in expected]
            assert store.count_bars(instrument, interval, start, end) == len(expected)


def m1(instrument: str, start: int, o: str, h: str, lo: str, c: str, volume: str, *, trades: int | None = 1,
       source: str = "cryptocompare", final: bool = True) -> Bar:
    return Bar(instrument, "1m", start, Decimal(o), Decimal(h), Decimal(lo), Decimal(c), Decimal(volume),
               Decimal(volume) * Decimal(c), trades, source, final)


def test_flat_bars_only_carry_the_close(engine: Engine) -> None:
    store = BarStore(engine)
    inst = "test:FLAT-USD"
    bars = [
        m1(inst, T0, "10", "10", "10", "10", "0", trades=0),  # flat at the previous close
        m1(inst, T0 + 60, "11", "12", "10.5", "11.5", "2"),
        m1(inst, T0 + 120, "11.5", "11.5", "11.5", "11.5", "0", trades=0),  # flat
        m1(inst, T0 + 300, "11.5", "11.5", "11.5", "11.5", "0", trades=0),  # a bucket of only flat bars
        m1(inst, T0 + 360, "11.5", "11.5", "11.5", "11.5", "0", trades=None, source="stream", final=False),
    ]
    store.upsert_bars(bars)
    five = store.read_bars(inst, Interval.M5, T0, T0 + 600)
    assert [(b.open, b.high, b.low, b.close, b.volume, b.trades) for b in five] == [
        (Decimal("11"), Decimal("12"), Decimal("10.5"), Decimal("11.5"), Decimal("2"), 1),
        (Decimal("11.5"), Decimal("11.5"), Decimal("11.5"), Decimal("11.5"), Decimal("0"), None),
    ]
    assert (five[1].source, five[1].final) == ("mixed", False)
    assert five == list(rollup_bars(bars, Interval.M5))


def test_deep_history_serves_a_bucket_unless_every_minute_of_it_is_stored(engine: Engine) -> None:
    """Stored 1h/1d bars serve their buckets unless all the bucket's minutes are stored: a complete
    bar beats a derivation from a few minutes, and a bucket is never made from both."""
    store = BarStore(engine)
    inst = "test:DEEP-USD"
    day = T0
    hours = [Bar(inst, "1h", day + 3600 * h, Decimal(100 + h), Decimal(200 + h), Decimal(50), Decimal(101 + h),
                 Decimal(10), Decimal(1000), None, "cryptocompare") for h in range(4)]
    minutes = [m1(inst, day + 2 * 3600 + 60 * i, "300", "301", "299", "300.5", "0.5") for i in range(3)]
    full_hour = [m1(inst, day + 4 * 3600 + 60 * i, "300", "301", "299", "300.5", "0.5") for i in range(60)]
    stored_fifth = Bar(inst, "1h", day + 4 * 3600, Decimal(1), Decimal(2), Decimal("0.5"), Decimal("1.5"), Decimal(9),
                       Decimal(9), None, "cryptocompare")
    daily = Bar(inst, "1d", day + 86400, Decimal(1), Decimal(2), Decimal("0.5"), Decimal("1.5"), Decimal(9),
                Decimal(9), None, "cryptocompare")
    first_daily = Bar(inst, "1d", day, Decimal(7), Decimal(7), Decimal(7), Decimal(7), Decimal(7), Decimal(7),
                      None, "cryptocompare")
    store.upsert_bars([*hours, *minutes, *full_hour, stored_fifth, daily, first_daily])

    # Hour 2 has 3 of its 60 minutes: its stored bar serves it; hour 4 has all 60: derived from them.
    derived_fifth = next(rollup_bars(full_hour, Interval.H1))
    assert store.read_bars(inst, Interval.H1, day, day + 5 * 3600) == [*hours, derived_fifth]
    assert store.partial_buckets(inst, Interval.H1, day, day + 5 * 3600) == []  # every bucket served whole
    assert store.bucket_starts(inst, Interval.H1, day, day + 5 * 3600) == [day + 3600 * h for h in range(5)]
    assert store.count_bars(inst, Interval.H1, day, day + 5 * 3600) == 5
    # Without a stored bar, a bucket of a few minutes is derived from them, and reported partial.
    assert store.read_bars(inst, Interval.H1, day + 2 * 3600, day + 3 * 3600)[0].source == "cryptocompare"
    store.upsert_bars([m1("test:FEW-USD", day + 60 * i, "1", "1", "1", "1", "1") for i in range(3)])
    (few,) = store.read_bars("test:FEW-USD", Interval.H1, day, day + 3600)
    assert few.trades is not None and store.partial_buckets("test:FEW-USD", Interval.H1, day, day + 3600) == [day]
    # Both days have only some minutes: their stored 1d bars serve them.
    assert store.read_bars(inst, Interval.D1, day, day + 2 * 86400) == [first_daily, daily]
    # 4h is derived from 1m only (no stored 4h bars exist): partial where minutes are missing.
    assert store.read_bars(inst, Interval.H4, day, day + 86400) == [
        next(rollup_bars(minutes, Interval.H4)), next(rollup_bars(full_hour, Interval.H4))]  # fmt: skip
    assert store.partial_buckets(inst, Interval.H4, day, day + 86400) == [day, day + 4 * 3600]
    assert store.read_bars(inst, Interval.H1, day, day + 4 * 3600, limit=2) == [hours[0], hours[1]]


def test_derived_bucket_includes_minutes_past_end(engine: Engine) -> None:
    """A bucket starting before `end` is whole, even when some of its 1m bars start after `end`."""
    store = BarStore(engine)
    inst = "test:EDGE-USD"
    bars = [m1(inst, T0 + 60 * i, str(10 + i), str(11 + i), str(9 + i), str(10 + i), "1") for i in range(60)]
    store.upsert_bars(bars)
    (hour,) = store.read_bars(inst, Interval.H1, T0, T0 + 600)
    assert hour == next(rollup_bars(bars, Interval.H1))
    assert store.read_bars(inst, Interval.H1, T0 + 1, T0 + 3600) == []  # bucket starts before `start`
