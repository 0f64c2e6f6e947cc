"""BookStore on a real PostgreSQL: exact round trips, idempotent writes, the heatmap against pandas."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

import pandas as pd
from sqlalchemy import Engine, text

from candlekeep.bars import NS_PER_S
from candlekeep.book_analytics import book_output, heatmap_slice, intensity
from candlekeep.instruments import Instrument
from candlekeep.sources.simulator import Simulator
from candlekeep.sources.simulator_book import SimulatorBooks
from candlekeep.storage.books import BookStore

BTC = Instrument.parse("cccagg:BTC-USD")


def _outputs(start_s: int, seconds: int, width: D = D("10")) -> list:
    sim = SimulatorBooks(Simulator(1, now=lambda: 4e9), levels=30)
    out = []
    for s in range(start_s, start_s + seconds):
        bids, asks = sim.book_at(BTC, s)
        out.append(book_output(BTC.id, s * NS_PER_S, bids, asks, sequence=s, verified=True, source="simulator",
                               width=width, depth=25))  # fmt: skip
    return out


def _now_s() -> int:
    return int(datetime.now(UTC).timestamp()) // 60 * 60 - 3600


def test_round_trip_exact_and_idempotent(engine: Engine) -> None:
    store = BookStore(engine)
    outs = _outputs(_now_s(), 30)
    assert store.insert(outs, batch_size=7) == 30
    assert store.insert(outs[10:20] + _outputs(_now_s() + 30, 5), batch_size=100) == 5  # replayed rows: no-ops
    with engine.connect() as conn:
        counts = [conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in
                  ("book_snapshots", "book_metrics")]  # fmt: skip
        buckets = conn.execute(text("SELECT sum(cardinality(prices)) FROM book_buckets")).scalar()
    assert counts == [35, 35]
    assert buckets == sum(len(o.bid_buckets) + len(o.ask_buckets) for o in outs + _outputs(_now_s() + 30, 5))
    last = _outputs(_now_s() + 34, 1)[0]
    got = store.latest(BTC.id)
    assert got is not None and got.ts_ns == last.ts_ns and got.sequence == last.sequence
    assert got.bids == last.summary.bids and got.asks == last.summary.asks  # digits kept: "0.01000000" stays
    assert [str(p) for p, _ in got.bids] == [str(p) for p, _ in last.summary.bids]
    assert got.mid == last.summary.mid and got.bid_depth == last.summary.bid_depth
    assert store.latest_many([BTC.id, "kraken:BTC-USD"]).keys() == {BTC.id}
    assert store.latest("kraken:BTC-USD") is None


def _cells(slices_json: str) -> list[tuple[int, str, str, str, str]]:
    """heatmap_json's slices (parsed by the json module) as one row per cell, every number a string."""
    out = []
    for t, side, *arrays in json.loads(slices_json):
        assert all(isinstance(v, str) for a in arrays for v in a) and len(arrays[0]) > 0
        out += [(t, side, *cell) for cell in zip(*arrays, strict=True)]
    return out


def test_heatmap_matches_pandas_over_the_stored_buckets(engine: Engine) -> None:
    store = BookStore(engine)
    start = _now_s()
    outs = _outputs(start, 40)
    store.insert(outs)
    width = D("30")  # three stored 10-wide buckets per cell
    got = store.heatmap(BTC.id, start * NS_PER_S, (start + 40) * NS_PER_S, 10, width)
    rows = []
    for o in outs:
        slot = (o.ts_ns // NS_PER_S) // 10
        for side, buckets in (("bid", o.bid_buckets), ("ask", o.ask_buckets)):
            rows += [(o.ts_ns, slot, side, p, s) for p, s in buckets]
    frame = pd.DataFrame(rows, columns=["ts", "slot", "side", "price", "size"])
    last = frame[frame.ts == frame.groupby("slot").ts.transform("max")].copy()
    last["cell"] = last.price.map(lambda p: D(math.floor(p / width)) * width)
    cells = last.groupby(["ts", "side", "cell"])["size"].sum().reset_index()
    cells["largest"] = cells.groupby("ts")["size"].transform("max")
    assert len(got) == len(cells) and len(got) > 12
    assert {(r.ts_ns, r.side, r.price, r.size) for r in got} == set(zip(cells.ts, cells.side, cells.cell, cells["size"]))
    for row in got:
        assert row.intensity == intensity(row.size, max(r.size for r in got if r.ts_ns == row.ts_ns))
        assert 0 <= row.intensity <= 1
    one_slot = [r for r in got if r.ts_ns == got[0].ts_ns]
    bids = tuple((r.price, r.size) for r in one_slot if r.side == "bid")
    asks = tuple((r.price, r.size) for r in one_slot if r.side == "ask")
    assert [p.intensity for p in heatmap_slice(0, bids, asks)] == [r.intensity for r in one_slot
                                                                   if r.side == "bid"] + [r.intensity for r in one_slot if r.side == "ask"]  # fmt: skip
    as_text = _cells(store.heatmap_json(BTC.id, start * NS_PER_S, (start + 40) * NS_PER_S, 10, width))
    assert [(t, s, D(p), D(z), D(i)) for t, s, p, z, i in as_text] == [
        (r.ts_ns // 1_000_000, r.side, r.price, r.size, r.intensity) for r in got]
    # At the stored width the stored intensities are the cells: the same as the general query's.
    general = store.heatmap(BTC.id, start * NS_PER_S, (start + 40) * NS_PER_S, 10, D("10"))
    stored = _cells(store.heatmap_json(BTC.id, start * NS_PER_S, (start + 40) * NS_PER_S, 10, D("10"),
                                       stored_width=True))  # fmt: skip
    assert len(general) > 12 and [(t, s, D(p), D(z), D(i)) for t, s, p, z, i in stored] == [
        (r.ts_ns // 1_000_000, r.side, r.price, r.size, r.intensity) for r in general]


def test_metrics_per_interval_take_the_last_sample(engine: Engine) -> None:
    store = BookStore(engine)
    start = _now_s()
    outs = _outputs(start, 120)
    store.insert(outs)
    got = store.metrics(BTC.id, start * NS_PER_S, (start + 120) * NS_PER_S, 60)
    assert [r.ts_ns for r in got] == [start * NS_PER_S, (start + 60) * NS_PER_S]
    for row, group in zip(got, (outs[:60], outs[60:]), strict=True):
        assert row.samples == 60
        assert row.mid == group[-1].summary.mid and row.microprice == group[-1].metrics.microprice
        assert row.imbalance["5"] == group[-1].metrics.imbalance_levels[5]
        assert row.spread_max == max(o.summary.spread for o in group)


def test_retention_drops_whole_old_days(engine: Engine) -> None:
    store = BookStore(engine)
    old = int((datetime.now(UTC) - timedelta(days=40)).timestamp())
    store.insert(_outputs(old, 3) + _outputs(_now_s(), 3))
    assert store.drop_older_than(30, datetime.now(UTC)) >= 3
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM book_snapshots")).scalar() == 3
    store.insert(_outputs(old, 1))  # the partition is made again on demand


def test_heatmap_cells_are_in_numeric_price_order_across_a_digit_boundary(engine: Engine) -> None:
    """9,990 < 10,000 as numbers, not as text: every heatmap path orders cells by the numeric price."""
    store = BookStore(engine)
    start = _now_s()
    bids = tuple((D(p), D("1.5")) for p in ("10004", "9999", "9995", "9990.5"))
    asks = tuple((D(p), D("2")) for p in ("10006", "10011", "10025"))
    outs = [book_output("kraken:BTC-USD", (start + k) * NS_PER_S, bids, asks, sequence=k, verified=True,
                        source="t", width=D("5"), depth=25) for k in range(3)]  # fmt: skip
    store.insert(outs)
    span = (start * NS_PER_S, (start + 3) * NS_PER_S)
    for rows in (_cells(store.heatmap_json("kraken:BTC-USD", *span, 1, D("5"), stored_width=True)),
                 _cells(store.heatmap_json("kraken:BTC-USD", *span, 1, D("10")))):  # fmt: skip
        slot = [(side, D(price)) for t, side, price, _, _ in rows if t == rows[0][0]]
        assert [p for s, p in slot if s == "bid"] == sorted(p for s, p in slot if s == "bid")
        assert [p for s, p in slot if s == "ask"] == sorted(p for s, p in slot if s == "ask")
        assert any(p < 10_000 for _, p in slot) and any(p >= 10_000 for _, p in slot)
    assert [r.price for r in store.heatmap("kraken:BTC-USD", *span, 1, D("10")) if r.side == "bid"][:3] == [
        D(9990), D(10000), D(9990)]  # per slot: 9990 then 10000, then the next slot starts
