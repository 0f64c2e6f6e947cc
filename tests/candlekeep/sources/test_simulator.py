"""The simulator source: determinism, bar semantics, an independent pandas reference, `now`.

The truths are independent of the simulator's own aggregation: `candlekeep.bars.aggregate_trades`
and `rollup_bars` over the simulator's trades, and a pandas resample of those trades.
"""

from __future__ import annotations

import decimal
import itertools
import time
from datetime import UTC, datetime
from decimal import Decimal

import pandas as pd
import pytest

from candlekeep.bars import EXACT, NS_PER_S, Bar, Interval, Trade, aggregate_trades, decimal_str, rollup_bars
from candlekeep.instruments import Instrument
from candlekeep.settings import Settings
from candlekeep.sources import make_source
from candlekeep.sources.simulator import Simulator

BTC = Instrument.parse("coinbase:BTC-USD")
ETH = Instrument.parse("cccagg:ETH-USD")
NOW = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
START = int(datetime(2024, 6, 3, tzinfo=UTC).timestamp())  # a Monday, 00:00 UTC
HOUR = 3600
MIN_NS = 60 * NS_PER_S


def sim(seed: int = 7, now: float = NOW) -> Simulator:
    return Simulator(seed=seed, now=lambda: now)


def all_bars(source: Simulator, instrument: Instrument, interval: Interval, start: int, end: int) -> list[Bar]:
    return [bar for page in source.bars(instrument, interval, start, end) for bar in page]


def all_trades(source: Simulator, instrument: Instrument, start_s: int, end_s: int) -> list[Trade]:
    return list(source.trades(instrument, start_s * NS_PER_S, end_s * NS_PER_S))


def truth(source: Simulator, instrument: Instrument, interval: Interval, start: int, end: int) -> list[Bar]:
    """DESIGN.md bars of the simulator's trades, seeded with the close of the last earlier trade."""
    trades = all_trades(source, instrument, start, end)
    prev_close = source.last_trade_before(instrument, start * NS_PER_S).price
    return aggregate_trades(
        trades, interval, start, end, instrument=instrument.id, source="simulator", prev_close=prev_close
    )


# --- determinism ----------------------------------------------------------------------------------------


def test_same_seed_same_market_other_seed_other_market() -> None:
    start, end = START + 10 * HOUR, START + 11 * HOUR
    first = all_trades(sim(), BTC, start, end)
    assert len(first) > 300
    assert all_trades(sim(), BTC, start, end) == first
    assert all_bars(sim(), BTC, Interval.M1, start, end) == all_bars(sim(), BTC, Interval.M1, start, end)
    # Another seed: other arrivals and sizes, and another price path (not just other trades on it).
    other = all_trades(sim(seed=8), BTC, start, end)
    assert [t.ts_ns for t in other] != [t.ts_ns for t in first]
    assert [t.size for t in other] != [t.size for t in first]
    closes = [b.close for b in all_bars(sim(), BTC, Interval.H4, START, START + 86400)]
    other_closes = [b.close for b in all_bars(sim(seed=8), BTC, Interval.H4, START, START + 86400)]
    assert max(abs(a / b - 1) for a, b in zip(closes, other_closes, strict=True)) > Decimal("0.01")
    assert all_trades(sim(), ETH, start, end) != first


def test_split_ranges_concatenate_to_the_whole() -> None:
    source = sim()
    start, end = START + 14 * HOUR, START + 15 * HOUR
    whole = all_trades(source, BTC, start, end)
    # Split inside minutes, on a timestamp shared by several fills of one order, and on minute edges.
    shared = next(a.ts_ns for a, b in itertools.pairwise(whole) if a.ts_ns == b.ts_ns)
    cuts = sorted({start * NS_PER_S, start * NS_PER_S + 1_234_567_891, shared, (start + 600) * NS_PER_S,
                   (start + 1799) * NS_PER_S + 5, end * NS_PER_S})  # fmt: skip
    # Generated out of order on one simulator instance: no state carries between calls.
    parts = {(a, b): list(source.trades(BTC, a, b)) for a, b in reversed(list(itertools.pairwise(cuts)))}
    assert [t for a, b in itertools.pairwise(cuts) for t in parts[(a, b)]] == whole

    bars = all_bars(source, BTC, Interval.M1, start, end)
    edges = [start, start + 60, start + 17 * 60, start + 45 * 60, end]
    pieces = {(a, b): all_bars(source, BTC, Interval.M1, a, b) for a, b in reversed(list(itertools.pairwise(edges)))}
    assert [bar for a, b in itertools.pairwise(edges) for bar in pieces[(a, b)]] == bars
    assert all_bars(source, BTC, Interval.M5, start, end) == list(rollup_bars(bars, Interval.M5))


# --- bar semantics ----------------------------------------------------------------------------------------


def test_1m_bars_equal_aggregate_trades() -> None:
    source = sim()
    start, end = START + 6 * HOUR, START + 9 * HOUR
    bars = all_bars(source, BTC, Interval.M1, start, end)
    assert len(bars) == 180
    assert bars == truth(source, BTC, Interval.M1, start, end)
    assert all(b.source == "simulator" and b.final and b.revision == 0 and not b.problems() for b in bars)


@pytest.mark.parametrize(
    ("interval", "start", "end"),
    [
        (Interval.M5, START + 20 * HOUR, START + 23 * HOUR),
        (Interval.M15, START + 2 * HOUR, START + 5 * HOUR),
        (Interval.H1, START + 6 * HOUR, START + 12 * HOUR),
        (Interval.H4, START, START + 8 * HOUR),
        (Interval.D1, START, START + 86400),
    ],
)
def test_coarse_bars_equal_direct_aggregation_and_rollup(interval: Interval, start: int, end: int) -> None:
    source = sim()
    bars = all_bars(source, ETH, interval, start, end)
    assert [b.start for b in bars] == list(range(start, end, interval.seconds))
    assert bars == truth(source, ETH, interval, start, end)
    assert bars == list(rollup_bars(all_bars(source, ETH, Interval.M1, start, end), interval))


def test_quiet_minutes_are_flat_at_the_previous_close() -> None:
    source = sim()
    start, end = START + 12 * HOUR, START + 24 * HOUR
    bars = all_bars(source, BTC, Interval.M1, start, end)
    quiet = [i for i, b in enumerate(bars) if b.trades == 0]
    assert 0.005 * len(bars) <= len(quiet) <= 0.12 * len(bars)  # a few percent
    for i in quiet:
        bar = bars[i]
        prev = bars[i - 1].close if i else source.last_trade_before(BTC, start * NS_PER_S).price
        assert (bar.open, bar.high, bar.low, bar.close) == (prev, prev, prev, prev)
        assert (bar.volume, bar.quote_volume) == (0, 0)
        assert bar.is_flat
        assert list(source.trades(BTC, bar.start * NS_PER_S, (bar.start + 60) * NS_PER_S)) == []
    assert all(b.trades and b.volume > 0 for i, b in enumerate(bars) if i not in set(quiet))


def test_a_range_starting_on_a_quiet_minute_opens_flat_at_the_last_trade() -> None:
    source = sim()
    day = all_bars(source, BTC, Interval.M1, START, START + 86400)
    quiet_start = next(b.start for b in day[1:] if b.trades == 0)
    first = all_bars(source, BTC, Interval.M1, quiet_start, quiet_start + 300)[0]
    before = all_trades(source, BTC, quiet_start - HOUR, quiet_start)
    assert before, "an hour without trades"
    assert first.is_flat and first.close == before[-1].price
    assert source.last_trade_before(BTC, quiet_start * NS_PER_S) == before[-1]


def test_last_trade_before_is_the_last_trade_of_the_preceding_range() -> None:
    source = sim()
    trades = all_trades(source, BTC, START + HOUR, START + 2 * HOUR)
    for t in trades[::97] + [trades[-1]]:
        earlier = [u for u in trades if u.ts_ns < t.ts_ns]
        if earlier:
            assert source.last_trade_before(BTC, t.ts_ns) == earlier[-1]
        assert source.last_trade_before(BTC, t.ts_ns + 1).ts_ns == t.ts_ns


def test_bars_match_an_independent_pandas_resample() -> None:
    source = sim(seed=3)
    start, end = START + 15 * HOUR, START + 18 * HOUR
    trades = all_trades(source, BTC, start, end)
    prior = all_trades(source, BTC, start - HOUR, start)
    frame = pd.DataFrame(
        {
            "ts": [t.ts_ns for t in trades],
            "seq": [int(t.trade_id) for t in trades],
            "price": pd.Series([t.price for t in trades], dtype=object),
            "size": pd.Series([t.size for t in trades], dtype=object),
        }
    ).sort_values(["ts", "seq"], kind="stable")
    for interval in (Interval.M1, Interval.M15):
        width = interval.seconds * NS_PER_S
        frame["bucket"] = frame["ts"] // width * interval.seconds
        frame["notional"] = [p * s for p, s in zip(frame["price"], frame["size"], strict=True)]
        with decimal.localcontext(EXACT):
            grouped = frame.groupby("bucket").agg(
                open=("price", "first"),
                high=("price", "max"),
                low=("price", "min"),
                close=("price", "last"),
                volume=("size", "sum"),
                quote_volume=("notional", "sum"),
                trades=("price", "size"),
            )
        grouped = grouped.reindex(range(start, end, interval.seconds))
        grouped["close"] = grouped["close"].ffill().fillna(prior[-1].price)
        for col in ("open", "high", "low"):
            grouped[col] = grouped[col].fillna(grouped["close"])
        grouped = grouped.fillna({"volume": Decimal(0), "quote_volume": Decimal(0), "trades": 0})
        expected = [
            (int(b), *(decimal_str(row[c]) for c in ("open", "high", "low", "close", "volume", "quote_volume")),
             int(row["trades"]))
            for b, row in grouped.iterrows()
        ]  # fmt: skip
        got = [
            (b.start, *(decimal_str(v) for v in (b.open, b.high, b.low, b.close, b.volume, b.quote_volume)), b.trades)
            for b in all_bars(source, BTC, interval, start, end)
        ]
        assert got == expected  # every digit, as text
        assert any(g[-1] == 0 for g in got) or interval != Interval.M1  # quiet minutes were compared too


# --- now ------------------------------------------------------------------------------------------------------


def test_no_bar_for_a_bucket_that_has_not_closed() -> None:
    start = START + 5 * HOUR
    now = start + HOUR + 90.5  # 1 m 30.5 s into the second hour
    source = sim(now=now)
    bars = all_bars(source, BTC, Interval.M1, start, start + 3 * HOUR)
    assert bars[-1].start == start + HOUR  # [h:00, h:01) has closed; [h:01, h:02) is forming
    assert bars == all_bars(sim(), BTC, Interval.M1, start, start + HOUR + 60)
    assert [b.start for b in all_bars(source, BTC, Interval.H1, start, start + 3 * HOUR)] == [start]
    assert all_bars(sim(now=start + HOUR), BTC, Interval.H1, start, start + 3 * HOUR)[-1].start == start
    assert all_bars(sim(now=start + HOUR - 0.001), BTC, Interval.H1, start, start + 3 * HOUR) == []


def test_no_trade_after_now() -> None:
    start = START + 5 * HOUR
    later = all_trades(sim(), BTC, start, start + 600)
    k = len(later) // 2
    while later[k + 1].ts_ns == later[k].ts_ns:  # end on the last fill of an order
        k += 1
    assert later[k + 1].ts_ns - later[k].ts_ns > 1000
    now_ns = later[k].ts_ns + 500  # a float `now` resolves to ~0.2 us here
    seen = all_trades(sim(now=now_ns / NS_PER_S), BTC, start, start + 3 * HOUR)
    assert seen == later[: k + 1]
    assert sim(now=now_ns / NS_PER_S).last_trade_before(BTC, (start + 3 * HOUR) * NS_PER_S) == later[k]


def test_default_now_is_the_wall_clock() -> None:
    source = Simulator()
    now = time.time()
    bars = all_bars(source, BTC, Interval.M1, int(now) - 600, int(now) + 3600)
    assert 9 <= len(bars) <= 10
    assert bars[-1].start + 60 <= time.time()
    recent = list(source.trades(BTC, (int(now) - 60) * NS_PER_S, (int(now) + 60) * NS_PER_S))
    assert all(t.ts_ns <= time.time_ns() for t in recent)


# --- trades ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instrument", "low", "high", "decimals"),
    [
        ("coinbase:BTC-USD", 10_000, 1_000_000, 2),
        ("cccagg:ETH-USD", 300, 30_000, 2),
        ("cccagg:SOL-USD", 10, 2_000, 2),
        ("binance:DOGE-USDT", 0.01, 2, None),
        ("binance:ETH-BTC", 0.005, 0.5, 8),
        ("bitflyer:BTC-JPY", 1_000_000, 100_000_000, 0),
        ("kraken:ZZTOP-EUR", 0.001, 10_000, None),
    ],
)
def test_trade_invariants(instrument: str, low: float, high: float, decimals: int | None) -> None:
    inst = Instrument.parse(instrument)
    source = sim()
    start, end = START + 13 * HOUR, START + 15 * HOUR
    trades = all_trades(source, inst, start, end)
    assert len(trades) > 100
    tick_decimals = source.price_decimals(inst)
    if decimals is not None:
        assert tick_decimals == decimals
    ids = [int(t.trade_id) for t in trades]
    assert all(t.trade_id == str(i) for t, i in zip(trades, ids, strict=True))  # plain numeric ids
    assert ids == sorted(set(ids))  # unique and increasing
    assert [t.ts_ns for t in trades] == sorted(t.ts_ns for t in trades)
    assert [t.sort_key for t in trades] == sorted(t.sort_key for t in trades)  # exchange order
    assert {t.side for t in trades} == {"buy", "sell"}
    for t, i in zip(trades, ids, strict=True):
        assert start * NS_PER_S <= t.ts_ns < end * NS_PER_S
        assert i // 10_000 == t.ts_ns // MIN_NS  # minute index * 10_000 + k
        assert isinstance(t.price, Decimal) and isinstance(t.size, Decimal)
        assert t.price > 0 and t.size > 0
        assert t.price.as_tuple().exponent == -tick_decimals
        assert t.size.as_tuple().exponent == -8
        assert low <= t.price <= high
        assert (t.instrument, t.source, t.received_ns) == (inst.id, "simulator", t.ts_ns)
    # Prices move like a market: neither frozen nor wild within two hours.
    prices = [t.price for t in trades]
    assert len(set(prices)) > 20
    assert max(prices) / min(prices) < Decimal("1.2")


def test_activity_varies_over_the_day() -> None:
    bars = all_bars(sim(), BTC, Interval.H1, START, START + 86400)
    counts = [b.trades or 0 for b in bars]
    assert max(counts) > 1.5 * min(counts)
    assert 15 * 60 <= sum(counts) / 24 <= 40 * 60  # ~15-30 trades a minute for BTC


def test_one_pair_on_two_venues_moves_together() -> None:
    a = all_bars(sim(), Instrument.parse("coinbase:BTC-USD"), Interval.H1, START, START + 86400)
    b = all_bars(sim(), Instrument.parse("kraken:BTC-USD"), Interval.H1, START, START + 86400)
    assert [x.close for x in a] != [y.close for y in b]
    assert all(abs(x.close / y.close - 1) < Decimal("0.003") for x, y in zip(a, b, strict=True))


def test_pages_are_bounded_and_contiguous() -> None:
    start = START + 6 * HOUR
    pages = list(sim().bars(BTC, Interval.M1, start, start + 2 * 86400))
    assert len(pages) >= 2
    assert all(0 < len(page) <= 1440 for page in pages)
    starts = [b.start for page in pages for b in page]
    assert starts == list(range(start, start + 2 * 86400, 60))


def test_unaligned_and_empty_ranges() -> None:
    source = sim()
    bars = all_bars(source, BTC, Interval.M5, START + 1, START + 601)
    assert [b.start for b in bars] == [START + 300, START + 600]  # bar.start in [start, end)
    assert all_bars(source, BTC, Interval.M1, START + 60, START + 60) == []
    assert list(source.trades(BTC, START * NS_PER_S, START * NS_PER_S)) == []


def test_far_dates_are_generated_without_history() -> None:
    # O(1) access: a minute in 2017 and one in 2029 cost the same as any other.
    source = sim()
    for year in (2017, 2029):
        t0 = int(datetime(year, 3, 1, tzinfo=UTC).timestamp())
        began = time.perf_counter()
        bars = all_bars(source, BTC, Interval.M1, t0, t0 + HOUR)
        assert time.perf_counter() - began < 2.0
        assert len(bars) == 60 and all(10_000 < b.close < 1_000_000 for b in bars)


def test_a_day_of_1m_bars_is_fast() -> None:
    # Generous bound (measured ~0.1 s a day on 2 cores): catches an accidental quadratic walk.
    began = time.perf_counter()
    bars = all_bars(sim(), BTC, Interval.M1, START, START + 86400)
    assert len(bars) == 1440
    assert time.perf_counter() - began < 3.0


def test_make_source_builds_the_seeded_simulator() -> None:
    source = make_source(Settings(source="simulator", simulator_seed=11))
    assert isinstance(source, Simulator)
    assert source.name == "simulator"
    start = START + HOUR
    assert list(source.trades(BTC, start * NS_PER_S, (start + 60) * NS_PER_S)) == list(
        sim(seed=11).trades(BTC, start * NS_PER_S, (start + 60) * NS_PER_S)
    )
