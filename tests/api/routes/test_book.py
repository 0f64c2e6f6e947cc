"""The order-book routes over a real PostgreSQL filled by BookStore: every route, bad parameters, caps."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal as D

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from starlette.websockets import WebSocketDisconnect

from candlekeep.bars import NS_PER_S
from candlekeep.book_analytics import book_output, intensity
from candlekeep.instruments import Instrument
from candlekeep.sources.simulator import Simulator
from candlekeep.sources.simulator_book import SimulatorBooks
from candlekeep.storage.books import BookStore

T0 = int(datetime.now(UTC).timestamp()) // 3600 * 3600 - 7200


def _fill(engine: Engine, instrument: str, seconds: int, *, seed: int = 1, start: int = T0, verified: bool = True,
          width: D = D("10")) -> list:  # fmt: skip
    inst = Instrument.parse(instrument)
    sim = SimulatorBooks(Simulator(seed, now=lambda: 4e9), levels=30)
    outs = []
    for s in range(start, start + seconds):
        bids, asks = sim.book_at(inst, s)
        outs.append(book_output(instrument, s * NS_PER_S, bids, asks, sequence=s, verified=verified,
                                source="simulator", width=width))  # fmt: skip
    BookStore(engine).insert(outs)
    return outs


def test_current_book(client: TestClient, engine: Engine) -> None:
    outs = _fill(engine, "kraken:BTC-USD", 5)
    r = client.get("/v1/book", params={"instrument": "kraken:BTC-USD", "depth": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    last = outs[-1]
    assert body["ts_ns"] == last.ts_ns and body["sequence"] == last.sequence and body["verified"] is True
    assert body["bids"] == [[str(p), str(s)] for p, s in last.summary.bids[:3]]
    assert body["asks"] == [[str(p), str(s)] for p, s in last.summary.asks[:3]]
    assert body["mid"] == str(last.summary.mid) and body["age_ms"] >= 0
    assert body["depth_bps"]["50"]["bid"] == str(last.summary.bid_depth[50])
    assert client.get("/v1/book", params={"instrument": "kraken:ETH-USD"}).status_code == 404
    for bad in ({"instrument": "nope"}, {"instrument": "kraken:BTC-USD", "depth": 0},
                {"instrument": "kraken:BTC-USD", "depth": 1001}, {}):  # fmt: skip
        assert client.get("/v1/book", params=bad).status_code == 422, bad


def test_consolidated_is_the_bucketed_sum_and_names_stale_venues(client: TestClient, engine: Engine) -> None:
    a = _fill(engine, "kraken:BTC-USD", 30, seed=1)
    b = _fill(engine, "coinbase:BTC-USD", 30, seed=2)
    stale = _fill(engine, "bitstamp:BTC-USD", 1, seed=3)  # its only output: 29 s before the others' latest
    _fill(engine, "binance:BTC-USDT", 30, seed=4)  # another quote: never mixed in
    r = client.get("/v1/book/consolidated", params={"pair": "BTC-USD", "bucket": "20"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [v["instrument"] for v in body["venues"]] == ["coinbase:BTC-USD", "kraken:BTC-USD"]
    assert body["excluded"] == [{"instrument": "bitstamp:BTC-USD", "reason": "stale: no update for 29 s (limit 10 s)"}]
    for side in ("bids", "asks"):
        rows = [(p, s) for o in (a[-1], b[-1]) for p, s in getattr(o.summary, side)]  # the stored top 25 of each
        frame = pd.DataFrame(rows, columns=["price", "size"])
        frame["bucket"] = frame.price.map(lambda p: D(math.floor(p / 20)) * 20)
        expected = frame.groupby("bucket")["size"].sum().sort_index(ascending=side == "asks")
        assert body[side] == [[str(p), str(s)] for p, s in expected.items()]
    assert D(body["best_bid"]["price"]) == max(a[-1].summary.bids[0][0], b[-1].summary.bids[0][0])
    assert D(body["best_ask"]["price"]) == min(a[-1].summary.asks[0][0], b[-1].summary.asks[0][0])
    assert stale
    usdt = client.get("/v1/book/consolidated", params={"pair": "BTC-USDT"}).json()
    assert [v["instrument"] for v in usdt["venues"]] == ["binance:BTC-USDT"]
    assert client.get("/v1/book/consolidated", params={"pair": "DOGE-USD"}).status_code == 404
    for bad in ({"pair": "BTCUSD"}, {"pair": "BTC-USD", "bucket": "0"}, {"pair": "BTC-USD", "bucket": "x"},
                {"pair": "BTC-USD", "bucket": "NaN"}):  # fmt: skip
        assert client.get("/v1/book/consolidated", params=bad).status_code == 422, bad


def test_metrics_history(client: TestClient, engine: Engine) -> None:
    outs = _fill(engine, "kraken:BTC-USD", 120)
    r = client.get("/v1/book/metrics", params={"instrument": "kraken:BTC-USD", "start": T0, "end": T0 + 120,
                                               "interval": "1m"})  # fmt: skip
    assert r.status_code == 200, r.text
    rows = r.json()["rows"]
    assert [row["t"] for row in rows] == [T0, T0 + 60] and [row["samples"] for row in rows] == [60, 60]
    assert rows[1]["imbalance"]["5"] == str(outs[-1].metrics.imbalance_levels[5])
    assert rows[1]["microprice"] == str(outs[-1].metrics.microprice)
    assert rows[0]["spread_max"] == str(max(o.summary.spread for o in outs[:60]))
    base = {"instrument": "kraken:BTC-USD", "start": T0, "end": T0 + 120}
    for bad in ({**base, "interval": "7s"}, {**base, "end": T0}, {**base, "start": "yesterday"},
                {**base, "start": T0 - 40 * 86400}, {**base, "interval": "1s", "start": T0 - 86400}):  # fmt: skip
        r = client.get("/v1/book/metrics", params=bad)
        assert r.status_code == 422, bad
    assert "cap" in client.get("/v1/book/metrics", params={**base, "interval": "1s", "start": T0 - 86400}).json()["detail"]


def test_heatmap(client: TestClient, engine: Engine) -> None:
    outs = _fill(engine, "kraken:BTC-USD", 60)
    r = client.get("/v1/heatmap", params={"instrument": "kraken:BTC-USD", "start": T0, "end": T0 + 60,
                                          "resolution": "10s", "bucket": "30"})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bucket"] == "30" and body["columns"] == ["t_ms", "side", "prices", "sizes", "intensities"]
    slots = {}
    for o in outs:  # the last output of each 10 s slot
        slots[(o.ts_ns // NS_PER_S) // 10] = o
    expected = []
    for o in slots.values():
        cells: dict = {}
        for side, buckets in (("bid", o.bid_buckets), ("ask", o.ask_buckets)):
            for p, s in buckets:
                key = (side, D(math.floor(p / 30)) * 30)
                cells[key] = cells.get(key, D(0)) + s
        largest = max(cells.values())
        expected += [(o.ts_ns // 1_000_000, side, p, s, intensity(s, largest)) for (side, p), s in sorted(cells.items())]
    assert all(isinstance(v, str) for *_, ps, ss, ins in body["slices"] for v in ps + ss + ins)  # decimal strings
    cells = [(t, side, D(p), D(s), D(i)) for t, side, ps, ss, ins in body["slices"]
             for p, s, i in zip(ps, ss, ins, strict=True)]  # fmt: skip
    assert cells == expected
    assert [(t, side) for t, side, *_ in body["slices"]] == sorted({(t, side) for t, side, *_ in expected})
    assert max(c[4] for c in cells) == 1
    base = {"instrument": "kraken:BTC-USD", "start": T0, "end": T0 + 60}
    for bad in ({**base, "bucket": "15"}, {**base, "bucket": "-10"}, {**base, "resolution": "2s"},
                {**base, "resolution": "1s", "end": T0 + 86_401}, {**base, "instrument": "BTC"}):  # fmt: skip
        assert client.get("/v1/heatmap", params=bad).status_code == 422, bad
    one_day = client.get("/v1/heatmap", params={**base, "resolution": "1s", "end": T0 + 86_400})
    assert one_day.status_code == 200  # exactly at the cap
    empty = client.get("/v1/heatmap", params={**base, "instrument": "kraken:ETH-USD"}).json()
    assert empty["slices"] == []


def test_book_stream_snapshot_then_diffs(client: TestClient, engine: Engine) -> None:
    outs = _fill(engine, "kraken:BTC-USD", 2)
    with client.websocket_connect("/v1/book/stream?instrument=kraken:BTC-USD&interval=0.1&mode=diff&depth=5") as ws:
        first = ws.receive_json()
        assert first["type"] == "snapshot" and first["sequence"] == outs[-1].sequence
        more = _fill(engine, "kraken:BTC-USD", 1, start=T0 + 2)[0]
        diff = ws.receive_json()
        assert diff["type"] == "diff" and diff["sequence"] == more.sequence
        book = {side: dict(getattr(outs[-1].summary, side)[:5]) for side in ("bids", "asks")}
        for side in ("bids", "asks"):
            for p, s in diff[side]:
                if D(s) == 0:
                    del book[side][D(p)]
                else:
                    book[side][D(p)] = D(s)
            assert sorted(book[side].items(), reverse=side == "bids") == list(getattr(more.summary, side)[:5])


@pytest.mark.parametrize("query", ["", "instrument=nope", "instrument=kraken:BTC-USD&interval=0",
                                   "instrument=kraken:BTC-USD&mode=full", "instrument=kraken:BTC-USD&depth=x",
                                   "instrument=kraken:BTC-USD&foo=1"])  # fmt: skip
def test_book_stream_refuses_bad_parameters(client: TestClient, query: str) -> None:
    with client.websocket_connect(f"/v1/book/stream?{query}") as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    assert closed.value.code == 1008
