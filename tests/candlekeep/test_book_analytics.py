"""book_analytics against an independent pandas computation of the same books, and exact bucket edges."""

from __future__ import annotations

import math
from decimal import Decimal as D

import pandas as pd
import pytest

from candlekeep.book_analytics import (
    BUCKET_RANGE_BPS,
    AnalyticsError,
    VenueBook,
    book_metrics,
    book_output,
    bucket_of,
    consolidate,
    default_bucket_width,
    heatmap_slice,
    intensity,
    pair_members,
    price_buckets,
    summarize,
    within,
)
from candlekeep.instruments import Instrument
from candlekeep.sources.simulator import Simulator
from candlekeep.sources.simulator_book import SimulatorBooks

S = 1_700_000_000


def _books(n: int = 20) -> list[tuple[tuple, tuple]]:
    sim = SimulatorBooks(Simulator(3, now=lambda: 2e9), levels=40)
    out = []
    for iid in ("cccagg:BTC-USD", "kraken:ETH-USD"):
        inst = Instrument.parse(iid)
        out += [sim.book_at(inst, S + 17 * k) for k in range(n // 2)]
    return out


def _frame(levels: tuple) -> pd.DataFrame:
    return pd.DataFrame({"price": [float(p) for p, _ in levels], "size": [float(s) for _, s in levels]})


@pytest.mark.parametrize("k", range(20))
def test_summary_and_metrics_match_pandas(k: int) -> None:
    bids, asks = _books()[k]
    b, a = _frame(bids), _frame(asks)
    mid = (b.price.iloc[0] + a.price.iloc[0]) / 2
    summary = summarize(bids, asks, depth=25)
    assert summary.bids == bids[:25] and summary.asks == asks[:25]
    assert float(summary.mid) == pytest.approx(mid, rel=1e-15)
    assert float(summary.spread) == pytest.approx(a.price.iloc[0] - b.price.iloc[0], abs=1e-9)
    for bps in (10, 50, 100):
        reach = mid * bps / 10_000
        assert float(summary.bid_depth[bps]) == pytest.approx(b[b.price >= mid - reach]["size"].sum(), rel=1e-12)
        assert float(summary.ask_depth[bps]) == pytest.approx(a[a.price <= mid + reach]["size"].sum(), rel=1e-12)

    metrics = book_metrics(bids, asks)
    for n in (1, 5, 10):
        bs, as_ = b["size"].head(n).sum(), a["size"].head(n).sum()
        assert float(metrics.imbalance_levels[n]) == pytest.approx((bs - as_) / (bs + as_), rel=1e-12, abs=1e-15)
    for bps in (10, 50):
        reach = mid * bps / 10_000
        bs, as_ = b[b.price >= mid - reach]["size"].sum(), a[a.price <= mid + reach]["size"].sum()
        got = metrics.imbalance_bps[bps]
        if bs + as_ == 0:
            assert got is None
        else:
            assert float(got) == pytest.approx((bs - as_) / (bs + as_), rel=1e-12, abs=1e-15)
    b1, a1 = b.iloc[0], a.iloc[0]
    micro = (b1.price * a1["size"] + a1.price * b1["size"]) / (b1["size"] + a1["size"])
    assert float(metrics.microprice) == pytest.approx(micro, rel=1e-14)
    b5, a5 = b.head(5), a.head(5)
    vb, va = (b5.price * b5["size"]).sum() / b5["size"].sum(), (a5.price * a5["size"]).sum() / a5["size"].sum()
    wm = (vb * a5["size"].sum() + va * b5["size"].sum()) / (b5["size"].sum() + a5["size"].sum())
    assert float(metrics.weighted_mid) == pytest.approx(wm, rel=1e-14)
    assert b.price.iloc[0] <= float(metrics.microprice) <= a.price.iloc[0]


@pytest.mark.parametrize("k", range(0, 20, 3))
def test_buckets_match_pandas_groupby(k: int) -> None:
    bids, asks = _books()[k]
    width = default_bucket_width(bids[0][0])
    for levels in (bids, asks):
        frame = pd.DataFrame({"price": [p for p, _ in levels], "size": [s for _, s in levels]})  # Decimal objects
        frame["bucket"] = frame.price.map(lambda p: D(math.floor(p / width)) * width)
        expected = frame.groupby("bucket")["size"].sum()  # Decimal sums: exact
        got = price_buckets(levels, width)
        assert [p for p, _ in got] == list(expected.index)
        assert [s for _, s in got] == list(expected.values)
        assert sum(s for _, s in got) == sum(s for _, s in levels)


def test_bucket_edges_are_exact_and_documented() -> None:
    width = D("10")
    # On an edge: the bucket it opens, for either side and any trailing zeros.
    for edge in (D("60000"), D("60000.00"), D("6E+4"), D("60000.000000000")):
        assert bucket_of(edge, width) == D("60000")
    assert bucket_of(D("59999.99999999"), width) == D("59990")
    assert bucket_of(D("60009.99999999"), width) == D("60000")
    assert bucket_of(D("60010"), width) == D("60010")
    assert bucket_of(D("0.30"), D("0.1")) == D("0.3")  # 0.1 is exact in Decimal, unlike in floats
    assert float(0.3) // float(0.1) == 2.0  # the float trap this avoids
    bids = ((D("60010"), D("1")), (D("60000"), D("2")), (D("59999.99"), D("4")))
    asks = ((D("60000"), D("8")), (D("60010"), D("16")))
    assert price_buckets(bids, width) == ((D("59990"), D("4")), (D("60000"), D("2")), (D("60010"), D("1")))
    assert price_buckets(asks, width) == ((D("60000"), D("8")), (D("60010"), D("16")))
    for bad in (D("0"), D("-1")):
        with pytest.raises(AnalyticsError, match="positive"):
            price_buckets(bids, bad)


def test_default_widths_follow_the_price() -> None:
    assert default_bucket_width(D("60000")) == D("10")
    assert default_bucket_width(D("3000")) == D("1")
    assert str(default_bucket_width(D("150"))) == "0.01"


def test_heatmap_intensity_per_slice() -> None:
    points = heatmap_slice(5, ((D("100"), D("3")), (D("90"), D("1"))), ((D("110"), D("6")),))
    assert {(p.side, p.price): p.intensity for p in points} == {
        ("bid", D("100")): D("0.5"), ("bid", D("90")): D("0.166667"), ("ask", D("110")): D("1")}  # fmt: skip
    assert max(p.intensity for p in points) == 1 and all(0 <= p.intensity <= 1 for p in points)
    assert heatmap_slice(5, (), ()) == []
    assert intensity(D("1"), D("2000000")) == D("0.000001")  # 0.0000005 exactly: half up
    assert intensity(D("1"), D("2000001")) == D("0")


def _venue(iid: str, bids: tuple, asks: tuple, updated: int, verified: bool = True) -> VenueBook:
    return VenueBook(iid, bids, asks, updated, verified)


def test_consolidated_book_is_the_bucketed_sum_of_two_venues() -> None:
    books = _books(4)
    a = _venue("kraken:BTC-USD", *books[0], updated=100)
    b = _venue("coinbase:BTC-USD", *books[1], updated=90)
    width = D("10")
    got = consolidate("BTC-USD", [a, b], now_ns=100, stale_ns=50, width=width)
    for side, got_side in (("bids", got.bids), ("asks", got.asks)):
        rows = [(p, s) for book in (a, b) for p, s in getattr(book, side)]
        frame = pd.DataFrame({"price": [p for p, _ in rows], "size": [s for _, s in rows]})
        frame["bucket"] = frame.price.map(lambda p: D(math.floor(p / width)) * width)
        expected = frame.groupby("bucket")["size"].sum().sort_index(ascending=side == "asks")
        assert list(got_side) == list(zip(expected.index, expected.values, strict=True))
    assert got.best_bid[0] == max(a.bids[0][0], b.bids[0][0])
    assert got.best_ask[0] == min(a.asks[0][0], b.asks[0][0])
    assert {v.instrument: v.age_ns for v in got.venues} == {"kraken:BTC-USD": 0, "coinbase:BTC-USD": 10}
    assert got.excluded == ()


def test_stale_and_unverified_venues_drop_out_and_are_named() -> None:
    books = _books(4)
    fresh = _venue("kraken:BTC-USD", *books[0], updated=10_000_000_000)
    stale = _venue("coinbase:BTC-USD", *books[1], updated=1_000_000_000)
    unverified = _venue("bitstamp:BTC-USD", *books[0], updated=10_000_000_000, verified=False)
    got = consolidate("BTC-USD", [fresh, stale, unverified], now_ns=10_000_000_000, stale_ns=5_000_000_000,
                      width=D("10"))  # fmt: skip
    assert [v.instrument for v in got.venues] == ["kraken:BTC-USD"]
    assert dict(got.excluded) == {"bitstamp:BTC-USD": "unverified",
                                  "coinbase:BTC-USD": "stale: no update for 9 s (limit 5 s)"}  # fmt: skip
    assert got.bids == tuple(reversed(price_buckets(fresh.bids, D("10"))))


def test_usd_and_usdt_never_mix_without_a_mapping() -> None:
    books = _books(4)
    usd = _venue("kraken:BTC-USD", *books[0], updated=0)
    usdt = _venue("binance:BTC-USDT", *books[1], updated=0)
    alone = consolidate("BTC-USD", [usd, usdt], now_ns=0, stale_ns=1, width=D("10"))
    assert [v.instrument for v in alone.venues] == ["kraken:BTC-USD"]
    mapped = consolidate("BTC-USD", [usd, usdt], now_ns=0, stale_ns=1, width=D("10"), quote_map={"USDT": "USD"})
    assert [v.instrument for v in mapped.venues] == ["binance:BTC-USDT", "kraken:BTC-USD"]
    assert pair_members("BTC-USDT", ["kraken:BTC-USD", "binance:BTC-USDT"]) == ["binance:BTC-USDT"]
    with pytest.raises(AnalyticsError, match="BASE-QUOTE"):
        pair_members("BTCUSD", [])


def _composed(bids: tuple, asks: tuple, width: D, depth: int) -> tuple:
    """book_output as the composition of the public functions it is fused from (its documented meaning)."""
    summary = summarize(bids, asks, depth=depth)
    band_bids, band_asks = within(bids, asks, summary.mid, BUCKET_RANGE_BPS)
    return summary, book_metrics(bids, asks), price_buckets(band_bids, width), price_buckets(band_asks, width)


def _edge_books() -> list[tuple[tuple, tuple]]:
    """Books that reach every branch: one side empty, crossed, levels exactly on bucket and bps edges,
    shallower than 10 levels, sizes with exponents, a band that ends inside a bucket."""
    bids = tuple((D(60000) - D(k) * D("0.5"), D(k % 7 + 1).scaleb(-(k % 4))) for k in range(400))
    asks = tuple((D("60000.5") + D(k) * D("0.5"), D("1E+2") if k % 9 == 0 else D("0.30")) for k in range(400))
    # mid 100: a level exactly on each reach (10/50/100 bps for depth and imbalance, 200 for the band)
    on_edges = (tuple((D(p), D(1)) for p in ("99.99", "99.9", "99.89", "99.5", "99", "98", "97.99")),
                tuple((D(p), D(2)) for p in ("100.01", "100.1", "100.5", "100.51", "101", "102", "102.01")))
    return [
        (bids, asks), (bids[:3], asks[:7]), (bids, ()), ((), asks), ((), ()), on_edges,
        (((D(101), D(1)),), ((D(100), D(2)),)),  # crossed
        (((D(100), D(1)), (D("99.9"), D(2)), (D("99.8995"), D(3))), ((D("100.1"), D(1)),)),
    ]


def test_book_output_is_the_composition_digit_for_digit() -> None:
    """The fused book_output equals summarize + book_metrics + price_buckets over the band, every
    Decimal with the same digits (repr), on simulated books, the recorded Kraken/OKX books and edge books."""
    from tests.utils.books import recorded_books

    books = [(b, a, D(10)) for b, a in _books(40)] + [(b, a, D("0.5")) for b, a in _edge_books()]
    books += [(b, a, D(1)) for b, a in _edge_books()] + [(b, a, D("0.01")) for b, a in _books(6)]
    state: dict[str, tuple[dict, dict]] = {}
    for k, r in enumerate(recorded_books(5.0)):  # every 7th book state of the real recordings
        bids, asks = state.setdefault(r.instrument, ({}, {}))
        if type(r).__name__ == "BookSnapshot":
            bids.clear(), asks.clear()
        for side, levels in ((bids, r.bids), (asks, r.asks)):
            for price, size in levels:
                side.pop(price, None) if size == 0 else side.__setitem__(price, size)
        if k % 7 == 0:
            b, a = tuple(sorted(bids.items(), reverse=True)), tuple(sorted(asks.items()))
            books.append((b, a, default_bucket_width(b[0][0]) if b else D(1)))
    assert len(books) > 300
    for bids, asks, width in books:
        for depth in (1, 25):
            out = book_output("t:A-B", 0, bids, asks, sequence=None, verified=True, source="t", width=width, depth=depth)
            fused = (out.summary, out.metrics, out.bid_buckets, out.ask_buckets)
            assert repr(fused) == repr(_composed(bids, asks, width, depth))


def test_intensity_texts_are_the_digits_of_intensity() -> None:
    import random

    from candlekeep.bars import decimal_str
    from candlekeep.book_analytics import intensity_texts

    rng = random.Random(11)
    for _ in range(300):
        sizes = [D(rng.randint(1, 10**9)).scaleb(-rng.randint(-3, 12)) for _ in range(rng.randint(1, 40))]
        sizes += [max(sizes) / 2000001 * 2] if rng.random() < 0.3 else []  # a half-way quotient, rounded up
        largest = max(sizes)
        assert intensity_texts(sizes) == [decimal_str(intensity(s, largest)) for s in sizes]
    assert intensity_texts([D("0.5"), D("1"), D("0.0000001")]) == ["0.500000", "1.000000", "0.000000"]
