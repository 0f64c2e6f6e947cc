"""Binance spot replayed from the real recording (BINANCE.ws.1.0 + its REST snapshots BINANCE.http.0.0)
through loopback WebSocket and HTTP servers into the live FeedRunner + BinanceConnector.

Independent truths inside the recording: the `bookTicker` stream (Binance's own best bid/ask at
update id `u`) must equal the best levels of the book a consumer rebuilds from the published
snapshot + deltas at the same update id; the `kline_1m` candle must equal our trades aggregated
(pandas-free: candlekeep.bars.aggregate_trades) wherever the candle's trade-id range [f, L] is
fully covered by the recorded aggTrades.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from candlekeep.bars import Interval, Trade, aggregate_trades
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.feeds import connector_from_listing, normalize, record_json
from candlekeep.sources.exchanges.recording import read_http
from tests.utils.exchange_replay import (
    ReferenceBook,
    ReplayServer,
    ReplaySession,
    received_frames,
    recorded,
    recording_path,
    run_live,
)
from tests.utils.fixture_server import FixtureServer, Received, Reply

IDS = {"NKNUSDT": "binance:NKN-USDT", "BLZETH": "binance:BLZ-ETH", "LRCBTC": "binance:LRC-BTC", "RUNEEUR": "binance:RUNE-EUR"}
RECORDING = "BINANCE.ws.1.0.txt"


def connector(ws: str, rest: str, **options: Any) -> Any:
    return connector_from_listing("binance", recording_path("BINANCE.0.txt").read_text(), list(IDS.values()),
                                  ws_url=ws, rest_url=rest, **options)  # fmt: skip


def snapshots_server(bodies: dict[str, list[str]]) -> FixtureServer:
    server = FixtureServer()
    for symbol, replies in bodies.items():
        server.add("/api/v3/depth", *(Reply.json(b) for b in replies), query={"symbol": symbol})
    return server


def recorded_snapshots() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in read_http(recording_path("BINANCE.http.0.0.txt")):
        out.setdefault(dict(x.split("=") for x in urlsplit(r.url).query.split("&"))["symbol"], []).append(r.body)
    return out


def replay(frames: list[str | bytes]) -> Any:
    def script(session: ReplaySession) -> None:
        session.send_all(frames)

    return script


def depth_updates(frames: list[str | bytes]) -> int:
    return sum('"e":"depthUpdate"' in str(f) for f in frames)


def test_rebuilt_books_equal_binances_book_ticker_at_the_same_update_ids() -> None:
    frames = received_frames(recorded(RECORDING))
    tickers: dict[tuple[str, int], tuple[Decimal, Decimal, Decimal, Decimal]] = {}
    for f in frames:
        msg = json.loads(f)
        if msg["stream"].endswith("@bookTicker"):
            d = msg["data"]
            tickers[(IDS[d["s"]], d["u"])] = (Decimal(d["b"]), Decimal(d["B"]), Decimal(d["a"]), Decimal(d["A"]))
    with snapshots_server(recorded_snapshots()) as http, ReplayServer([replay(frames)]) as ws:
        records, runner = run_live(connector(ws.url, http.url, snapshot_every_s=0),
                                   lambda rs: sum(isinstance(r, BookDelta | BookSnapshot) for r in rs) >= 4 + 168)  # fmt: skip
        path = ws.sessions[0].path
    assert path.startswith("/stream?streams=nknusdt@depth@100ms/nknusdt@trade/blzeth@depth@100ms/")
    books: dict[str, ReferenceBook] = {}
    compared = 0
    for r in records:
        if isinstance(r, BookSnapshot | BookDelta):
            book = books.setdefault(r.instrument, ReferenceBook())
            book.apply(r)
            want = tickers.get((r.instrument, r.sequence))
            if want is not None:
                (bp, bs), (ap, asz) = book.sorted_bids()[0], book.sorted_asks()[0]
                assert (bp, bs, ap, asz) == want, (r.instrument, r.sequence)
                compared += 1
    assert compared >= 20  # the tickers that share an update id with a diff's final u (26 in this recording)
    assert not any(m.get("resync") for m in runner.connector.metrics().values())


def test_trades_aggregated_per_minute_equal_the_recorded_kline_where_it_covers_them() -> None:
    frames = received_frames(recorded(RECORDING))
    agg_ranges: dict[str, set[int]] = {}
    for f in frames:
        d = json.loads(f)["data"]
        if d.get("e") == "aggTrade":
            agg_ranges.setdefault(IDS[d["s"]], set()).update(range(d["f"], d["l"] + 1))
    klines = [json.loads(f)["data"]["k"] for f in frames if '"e":"kline"' in str(f)]
    with snapshots_server(recorded_snapshots()) as http, ReplayServer([replay(frames)]) as ws:
        records, _ = run_live(connector(ws.url, http.url, books=False),
                              lambda rs: sum(isinstance(r, Trade) for r in rs) >= 2)  # fmt: skip
    trades = [r for r in records if isinstance(r, Trade)]
    compared = 0
    for k in klines:
        instrument = IDS[k["s"]]
        if not set(range(k["f"], k["L"] + 1)) <= agg_ranges.get(instrument, set()):
            continue  # the candle holds trades from before the recording started
        start = k["t"] // 1000
        [bar] = aggregate_trades([t for t in trades if t.instrument == instrument], Interval.M1, start, start + 60,
                                 instrument=instrument, source="binance")  # fmt: skip
        assert (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.quote_volume) == tuple(
            Decimal(k[x]) for x in ("o", "h", "l", "c", "v", "q"))
        compared += 1
    assert compared >= 1


def drop_diff(frames: list[str | bytes], symbol: str, nth: int) -> tuple[list[str | bytes], int]:
    seen = 0
    for i, f in enumerate(frames):
        if '"e":"depthUpdate","E"' in str(f) and f'"s":"{symbol}"' in str(f):
            seen += 1
            if seen == nth:
                return frames[:i] + frames[i + 1 :], i
    raise AssertionError("no such diff")


def test_a_dropped_diff_refetches_only_that_symbols_snapshot() -> None:
    frames = received_frames(recorded(RECORDING))
    faulty, at = drop_diff(frames, "NKNUSDT", 40)
    snapshots = recorded_snapshots()
    # The second NKNUSDT snapshot: the true book after the diff before the gap, rebuilt test-side
    # from the first recorded snapshot and the untouched diffs (plain dicts), at that diff's u.
    first = json.loads(snapshots["NKNUSDT"][0])
    bids = {Decimal(p): q for p, q in first["bids"]}
    asks = {Decimal(p): q for p, q in first["asks"]}
    last_u = first["lastUpdateId"]
    for f in frames[:at]:
        d = json.loads(f)["data"]
        if d.get("e") == "depthUpdate" and d["s"] == "NKNUSDT" and d["u"] > last_u:
            for side, rows in ((bids, d["b"]), (asks, d["a"])):
                for p, q in rows:
                    side.pop(Decimal(p), None) if Decimal(q) == 0 else side.__setitem__(Decimal(p), q)
            last_u = d["u"]
    # the dropped diff's levels too (the venue's book moved on; the snapshot is taken after it)
    gone = json.loads(frames[at])["data"]
    for side, rows in ((bids, gone["b"]), (asks, gone["a"])):
        for p, q in rows:
            side.pop(Decimal(p), None) if Decimal(q) == 0 else side.__setitem__(Decimal(p), q)
    second = json.dumps({"lastUpdateId": gone["u"],
                         "bids": [[f"{p:f}", bids[p]] for p in sorted(bids, reverse=True)],
                         "asks": [[f"{p:f}", asks[p]] for p in sorted(asks)]})  # fmt: skip
    snapshots["NKNUSDT"] = [snapshots["NKNUSDT"][0], second]
    requests_seen: list[Received] = []

    with snapshots_server(snapshots) as http, ReplayServer([replay(faulty[:at + 1])]) as ws:
        def count(rs: list[Any]) -> bool:
            refetched = sum(q.query.get("symbol") == "NKNUSDT" for q in http.requests) >= 2
            return refetched and any(getattr(r, "kind", "") == "resync" for r in rs)

        records, runner = run_live(connector(ws.url, http.url, snapshot_every_s=0), count)
        requests_seen = http.requests
    metrics = runner.connector.metrics()
    assert metrics["binance:NKN-USDT"]["sequence_gap"] == 1 and metrics["binance:NKN-USDT"]["resync"] == 1
    for other in ("binance:BLZ-ETH", "binance:LRC-BTC", "binance:RUNE-EUR"):
        assert metrics[other].get("resync", 0) == 0 and metrics[other].get("sequence_gap", 0) == 0
    symbols = [r.query["symbol"] for r in requests_seen]
    assert symbols.count("NKNUSDT") == 2 and symbols.count("BLZETH") == 1  # only NKN re-fetched


def test_feeds_normalize_equals_the_live_path() -> None:
    events = recorded(RECORDING)
    frames = received_frames(events)
    with snapshots_server(recorded_snapshots()) as http, ReplayServer([replay(frames)]) as ws:
        live, _ = run_live(connector(ws.url, http.url),
                           lambda rs: sum(isinstance(r, BookDelta | BookSnapshot) for r in rs) >= 4 + 168)  # fmt: skip
    offline = list(normalize(connector("wss://unused", "https://unused"), events,
                             read_http(recording_path("BINANCE.http.0.0.txt"))))  # fmt: skip

    def published(records: list[Any]) -> list[dict[str, Any]]:
        out = [record_json(r) for r in records if isinstance(r, BookSnapshot | BookDelta | Trade)]
        for body in out:
            body.pop("received_ns")
        return sorted(out, key=lambda b: (b["instrument"], b["type"], b.get("sequence") or 0, b.get("trade_id", "")))

    assert published(live) == published(offline)


def test_a_raw_trade_frame_as_documented() -> None:
    """No recording holds the `@trade` stream: the payload of Binance's spot docs ("Trade Streams",
    developers.binance.com/docs/binance-spot-api-docs/web-socket-streams), symbol set to one of ours."""
    from candlekeep.bars import decimal_str

    c = connector("wss://unused", "https://unused")
    frame = ('{"stream":"nknusdt@trade","data":{"e":"trade","E":1672515782136,"s":"NKNUSDT","t":12345,'
             '"p":"0.001","q":"100","T":1672515782136,"m":true,"M":true}}')  # fmt: skip
    [trade] = c.on_frame("binance-0", frame, 7)
    assert (trade.instrument, trade.trade_id, decimal_str(trade.price), decimal_str(trade.size), trade.side,
            trade.ts_ns, trade.received_ns) == ("binance:NKN-USDT", "12345", "0.001", "100", "sell",
                                                1672515782136_000_000, 7)  # fmt: skip
