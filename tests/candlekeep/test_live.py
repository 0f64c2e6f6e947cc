"""The event-time bar builder (`candlekeep.live`) against independent truths.

Truths: `candlekeep.bars.aggregate_trades` of the same trades, and a pandas resample of them (sorted
by exchange time and numeric trade id, sums of Decimals in an exact context), on real recorded
trades: ../shared/fixtures/trades (Tardis Binance-futures BTCUSDT, freqtrade ETH/USDT), parsed
with prices and sizes as Decimal straight from the CSV text. The builder sees them in order, shuffled,
late, duplicated, and across a simulated restart; its latest version of every bar must equal the
truth digit for digit.
"""

from __future__ import annotations

import decimal
import random
from dataclasses import replace
from decimal import Decimal

import pandas as pd
import pytest

from candlekeep.bars import EXACT, NS_PER_S, Bar, Trade
from candlekeep.live import BarBuilder, Outcome
from tests.utils.trades import load_freqtrade, load_tardis, reference

INST = "binance:BTC-USDT"
D = Decimal
MIN = 60 * NS_PER_S


# --- real trades ---------------------------------------------------------------------------------


def span(trades: list[Trade]) -> tuple[int, int]:
    """[first bucket, last bucket + 1 minute) in unix seconds."""
    lo = min(t.ts_ns for t in trades) // MIN * 60
    hi = max(t.ts_ns for t in trades) // MIN * 60 + 60
    return lo, hi


def pandas_reference(trades: list[Trade]) -> pd.DataFrame:
    """1m OHLCV by pandas resample: an implementation that shares nothing with candlekeep."""
    frame = pd.DataFrame({
        "time": pd.to_datetime([t.ts_ns for t in trades], unit="ns", utc=True),
        "ts": [t.ts_ns for t in trades],
        "id": [int(t.trade_id) for t in trades],
        "price": [t.price for t in trades],
        "size": [t.size for t in trades],
    }).drop_duplicates("id")
    frame = frame.sort_values(["ts", "id"], kind="stable").set_index("time")
    with decimal.localcontext(EXACT):
        frame["quote"] = [p * s for p, s in zip(frame["price"], frame["size"], strict=True)]
        grouped = frame.resample("1min")
        out = pd.DataFrame({
            "open": grouped["price"].first(), "high": grouped["price"].max(), "low": grouped["price"].min(),
            "close": grouped["price"].last(), "volume": grouped["size"].sum(),
            "quote_volume": grouped["quote"].sum(), "trades": grouped["price"].count(),
        })  # fmt: skip
    quiet = out["trades"] == 0
    out["close"] = out["close"].where(~quiet).ffill()
    for col in ("open", "high", "low"):
        out.loc[quiet, col] = out.loc[quiet, "close"]
    out.loc[quiet, ["volume", "quote_volume"]] = Decimal(0)
    return out


def latest_versions(*batches: list[Bar]) -> dict[int, Bar]:
    """The last version handed out of each bucket, in the order handed out."""
    latest: dict[int, Bar] = {}
    for batch in batches:
        for bar in batch:
            latest[bar.start] = bar
    return latest


def run(builder: BarBuilder, arrivals: list[tuple[int, Trade]]) -> list[Bar]:
    """Feed (arrival time, trade) in arrival order, advancing the clock; every bar handed out."""
    out: list[Bar] = []
    for now, trade in arrivals:
        out += builder.advance(now)
        out += builder.add(trade)
    return out


def fields(bar: Bar) -> tuple:
    """Every value, decimals as their exact text (so '1.50' != '1.5')."""
    return (bar.instrument, bar.interval, bar.start, str(bar.open), str(bar.high), str(bar.low), str(bar.close),
            str(bar.volume), str(bar.quote_volume), bar.trades, bar.source, bar.final)  # fmt: skip


BASE = 1_700_000_040  # 2023-11-14 22:14:00 UTC, a minute boundary


def at(minute: int, second: float = 0) -> int:
    """Unix ns `second`s into minute `minute` after BASE."""
    return (BASE + minute * 60) * NS_PER_S + int(second * NS_PER_S)


def trade(minute: int, second: float, price: str, trade_id: int, size: str = "1") -> Trade:
    return Trade(INST, at(minute, second), D(price), D(size), "buy", str(trade_id), "test")


# --- against the truths, on real trades ----------------------------------------------------------


@pytest.mark.parametrize("loader", [load_tardis, load_freqtrade], ids=["tardis", "freqtrade"])
def test_in_order_stream_equals_aggregate_trades_and_pandas(loader) -> None:
    trades = loader()
    lo, hi = span(trades)
    builder = BarBuilder(trades[0].instrument)
    out = run(builder, [(t.ts_ns, t) for t in trades])
    out += builder.advance(hi * NS_PER_S + builder.lateness_ns)
    # In order, every bar is handed out once, closed, as revision 0, in bucket order.
    assert [b.start for b in out] == list(range(lo, hi, 60))
    assert all(b.revision == 0 and not b.final and b.source == "stream" for b in out)
    assert [fields(b) for b in out] == [fields(b) for b in reference(trades, lo, hi)]

    frame = pandas_reference(trades)
    assert len(frame) == len(out)
    for bar, (when, row) in zip(out, frame.iterrows(), strict=True):
        assert bar.start == int(when.timestamp())
        assert (bar.open, bar.high, bar.low, bar.close) == (row["open"], row["high"], row["low"], row["close"])
        assert (bar.volume, bar.quote_volume, bar.trades) == (row["volume"], row["quote_volume"], row["trades"])


@pytest.mark.parametrize("seed", range(4))
def test_shuffled_delayed_and_duplicated_arrivals_end_at_the_same_bars(seed: int) -> None:
    """Arrival order and delays decide only when bars are handed out (and their revisions)."""
    rng = random.Random(seed)
    trades = load_tardis()
    lo, hi = span(trades)
    arrivals = []
    for t in trades:
        delay = rng.choice([0, 0, 0, rng.randrange(0, 3 * NS_PER_S), rng.randrange(0, 5 * MIN)])
        arrivals.append((t.ts_ns + delay, t))
        if rng.random() < 0.05:  # a redelivery, sometimes much later
            arrivals.append((t.ts_ns + delay + rng.randrange(0, 10 * MIN), t))
    arrivals.sort(key=lambda a: a[0])
    builder = BarBuilder(trades[0].instrument)
    outcomes: dict[Outcome, int] = {o: 0 for o in Outcome}
    out: list[Bar] = []
    for now, t in arrivals:
        out += builder.advance(now)
        outcome, revised = builder.offer(t)
        outcomes[outcome] += 1
        out += revised
        if rng.random() < 0.01:
            builder.seal()
    out += builder.advance(hi * NS_PER_S + 10 * MIN)
    assert outcomes[Outcome.DUPLICATE] == len(arrivals) - len(trades)
    assert outcomes[Outcome.REVISED] > 0 and outcomes[Outcome.TOO_LATE] == 0
    final = latest_versions(out)
    assert builder.closed_until >= hi
    expected = reference(trades, lo, builder.closed_until)
    assert [fields(final[s]) for s in sorted(final)] == [fields(b) for b in expected]
    # Revisions only go up, one bucket at a time.
    seen: dict[int, int] = {}
    for bar in out:
        assert bar.revision >= seen.get(bar.start, 0)
        seen[bar.start] = bar.revision


def test_restored_builder_continues_exactly() -> None:
    """A builder restored from its stored trades and bars (a restart) ends where one run ends."""
    trades = load_freqtrade()
    lo, hi = span(trades)
    half = len(trades) // 2
    whole = BarBuilder(trades[0].instrument)
    expected = latest_versions(run(whole, [(t.ts_ns + NS_PER_S, t) for t in trades]), whole.advance(hi * NS_PER_S + MIN))

    first = BarBuilder(trades[0].instrument)
    stored = latest_versions(run(first, [(t.ts_ns + NS_PER_S, t) for t in trades[:half]]))
    closed_until = max(stored) + 60
    second = BarBuilder(trades[0].instrument)
    fixes = second.restore(closed_until=closed_until, trades=trades[:half], stored=stored.values())
    assert fixes == []  # the stored bars are what the stored trades give
    # The records after the last commit come again (duplicates), then the rest.
    rest = run(second, [(t.ts_ns + NS_PER_S, t) for t in trades[half - 50 :]])
    final = latest_versions(list(stored.values()), rest, second.advance(hi * NS_PER_S + MIN))
    assert [fields(final[s]) for s in sorted(final)] == [fields(expected[s]) for s in sorted(expected)]


def test_restore_reissues_bars_whose_ticks_were_stored_without_them() -> None:
    """Crash between writing the ticks and the bars: the stored bars are stale; restore revises them."""
    trades = [trade(0, 1, "10", 1), trade(0, 30, "12", 2), trade(1, 5, "11", 3), trade(3, 0, "9", 4)]
    stale = reference(trades[:1], BASE, BASE + 60)  # bar 0 stored with its first trade only, revision 0
    builder = BarBuilder(INST)
    fixes = builder.restore(closed_until=BASE + 240, trades=trades, stored=stale)
    expected = reference(trades, BASE, BASE + 240)
    assert [fields(b) for b in fixes] == [fields(b) for b in expected]
    assert [b.revision for b in fixes] == [1, 0, 0, 0]  # bar 0 revised; 1..3 never stored


# --- the rules, one at a time --------------------------------------------------------------------


def test_no_bar_before_the_first_trade_then_flat_bars_for_quiet_minutes() -> None:
    builder = BarBuilder(INST)
    assert builder.advance(at(5)) == [] and builder.forming is None  # a gap, not a flat bar
    builder = BarBuilder(INST)
    builder.add(trade(0, 10, "100.50", 1))
    builder.add(trade(0, 50, "101.25", 2, size="0.5"))
    out = builder.add(trade(3, 1, "99", 3))  # it moves the log's clock to 3:01: minutes 0, 1 close
    assert [b.start for b in out] == [BASE, BASE + 60]
    out += builder.heartbeat(at(4, 2))  # minute 3 ends at 4:00; closes at 4:02
    assert [b.start for b in out] == [BASE, BASE + 60, BASE + 120, BASE + 180]
    first, q1, q2, last = out
    assert (first.open, first.high, first.low, first.close) == (D("100.50"), D("101.25"), D("100.50"), D("101.25"))
    assert (str(first.volume), str(first.quote_volume), first.trades) == ("1.5", "151.125", 2)
    for quiet in (q1, q2):
        assert quiet.is_flat and str(quiet.close) == "101.25" and quiet.trades == 0 and quiet.volume == 0
    assert last.close == D("99") and last.trades == 1
    # The clock's minute is forming, flat at the last close until a trade comes.
    forming = builder.forming
    assert forming is not None and forming.start == BASE + 240 and forming.is_flat and forming.close == D("99")
    builder.add(trade(4, 30, "98", 4))
    assert builder.forming.close == D("98") and builder.forming.trades == 1


def test_bucket_closes_only_after_its_end_plus_lateness() -> None:
    builder = BarBuilder(INST, lateness_ns=2 * NS_PER_S)
    builder.add(trade(0, 59.9, "10", 1))
    assert builder.advance(at(1, 1.999)) == []
    assert builder.forming.start == BASE + 60 and builder.forming.close == D("10")
    (bar,) = builder.advance(at(1, 2))
    assert bar.start == BASE and bar.close == D("10")
    # A trade inside the lateness is on time: no revision, the bar closes with it.
    builder = BarBuilder(INST)
    builder.add(trade(0, 1, "10", 1))
    builder.advance(at(1, 1))
    assert builder.add(trade(0, 59, "11", 2)) == []
    (bar,) = builder.advance(at(1, 2))
    assert bar.close == D("11") and bar.trades == 2 and bar.revision == 0


def test_late_trade_revises_its_bar_and_the_flat_bars_after_it() -> None:
    builder = BarBuilder(INST)
    builder.add(trade(0, 10, "10", 1))
    closed = builder.advance(at(3, 5))  # bars 0, 1 (flat), 2 (flat)
    assert [b.revision for b in closed] == [0, 0, 0] and all(b.close == D("10") for b in closed)
    builder.seal()
    outcome, revised = builder.offer(trade(0, 50, "12", 2))  # new last trade of minute 0
    assert outcome is Outcome.REVISED
    assert [(b.start, b.revision, b.close, b.trades) for b in revised] == [
        (BASE, 1, D("12"), 2), (BASE + 60, 1, D("12"), 0), (BASE + 120, 1, D("12"), 0),
    ]  # fmt: skip
    # Exactly aggregate_trades of all trades so far.
    expected = reference([trade(0, 10, "10", 1), trade(0, 50, "12", 2)], BASE, BASE + 180)
    assert [fields(b) for b in revised] == [fields(b) for b in expected]
    # Before the next seal the same version is still being built: the revision stays.
    (again,) = builder.add(trade(0, 20, "13", 3))  # a new high, not the close: bars 1, 2 unchanged
    assert again.revision == 1 and again.high == D("13") and again.trades == 3
    builder.seal()
    revised = builder.add(trade(1, 30, "9", 4))  # trades into a flat bar: it becomes a real one
    assert [(b.start, b.revision, b.close) for b in revised] == [(BASE + 60, 2, D("9")), (BASE + 120, 2, D("9"))]
    assert builder.forming.close == D("9")


def test_late_trade_before_the_first_bar_fills_in_bars() -> None:
    builder = BarBuilder(INST)
    builder.add(trade(5, 0, "20", 10))
    assert [b.start for b in builder.advance(at(6, 3))] == [BASE + 300]
    revised = builder.add(trade(2, 0, "18", 5))
    assert [(b.start, b.revision, str(b.close), b.trades) for b in revised] == [
        (BASE + 120, 0, "18", 1), (BASE + 180, 0, "18", 0), (BASE + 240, 0, "18", 0),
    ]  # fmt: skip


def test_duplicates_never_count_twice() -> None:
    builder = BarBuilder(INST)
    first = trade(0, 1, "10", 7, size="2")
    assert builder.offer(first)[0] is Outcome.OPEN
    assert builder.offer(first)[0] is Outcome.DUPLICATE
    (bar,) = builder.advance(at(1, 2))
    assert bar.volume == D("2") and bar.trades == 1
    assert builder.offer(first) == (Outcome.DUPLICATE, [])  # after closing too
    # Same id, different content: still the same trade id of this venue, dropped.
    assert builder.offer(replace(first, price=D("11")))[0] is Outcome.DUPLICATE


def test_too_late_beyond_the_horizon_changes_nothing() -> None:
    builder = BarBuilder(INST, horizon=3)
    builder.add(trade(0, 1, "10", 1))
    closed = builder.add(trade(5, 1, "11", 2))
    closed += builder.advance(at(6, 2))
    assert len(closed) == 6 and builder.window_start() == BASE + 180
    assert builder.offer(trade(2, 0, "99", 3)) == (Outcome.TOO_LATE, [])
    outcome, revised = builder.offer(trade(3, 0, "12", 4))  # oldest minute still kept
    assert outcome is Outcome.REVISED and [b.start for b in revised] == [BASE + 180, BASE + 240]
    # Memory is bounded: trades of forgotten minutes are gone, and so are their ids.
    builder.advance(at(30))
    assert builder.trade_count == 0
    assert builder.forming.close == D("11")  # the previous close survives as the base


def test_trade_of_another_instrument_is_refused() -> None:
    builder = BarBuilder(INST)
    with pytest.raises(ValueError, match="bar builder"):
        builder.add(replace(trade(0, 1, "10", 1), instrument="coinbase:ETH-USD"))


def test_resolution_orders_trades_within_it_by_id() -> None:
    """At microsecond resolution (the ticks table's), two trades in one microsecond go by trade id."""
    early_high_id = Trade(INST, at(0, 1) + 100, D("10"), D("1"), "buy", "9", "test")
    late_low_id = Trade(INST, at(0, 1) + 900, D("11"), D("1"), "buy", "5", "test")
    by_ns, by_us = BarBuilder(INST), BarBuilder(INST, resolution_ns=1000)
    for builder in (by_ns, by_us):
        builder.add(early_high_id)
        builder.add(late_low_id)
    assert (by_ns.forming.open, by_ns.forming.close) == (D("10"), D("11"))
    assert (by_us.forming.open, by_us.forming.close) == (D("11"), D("10"))
    with pytest.raises(ValueError, match="resolution"):
        BarBuilder(INST, resolution_ns=7)
