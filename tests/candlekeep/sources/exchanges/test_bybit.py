"""Bybit v5: no recording of v5 exists (BYBIT.ws.25.0 is the retired v1 `realtime_public` protocol), so
these tests use the frames of Bybit's official v5 documentation:

- publicTrade: bybit-exchange.github.io/docs/v5/websocket/public/trade, "Response Example";
- orderbook snapshot: bybit-exchange.github.io/docs/v5/websocket/public/orderbook, "Response
  Example" (orderbook.50.BTCUSDT, u 13079592; the levels the docs elide with "..." are left out);
- orderbook delta: the docs' delta example (spread trading orderbook page, the same v5 format).

Deltas that continue or break the documented snapshot's `u` chain are built in the documented shape
(their values are ours: fault injection), and replayed over a loopback WebSocket into the live path.
"""

from __future__ import annotations

import json
from decimal import Decimal

from candlekeep.bars import Trade
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.sources.exchanges.base import RESYNC, SEQUENCE_GAP, IntegrityEvent, SymbolMap, listing_bodies
from candlekeep.sources.exchanges.bybit import BybitConnector, symbol_map
from tests.utils.exchange_drive import Mirror, at_least
from tests.utils.exchange_replay import ReplayServer, recording_path, run_live

DOC_TRADE = ('{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":1672304486868,"data":[{"T":1672304486865,'
             '"s":"BTCUSDT","S":"Buy","v":"0.001","p":"16578.50","L":"PlusTick",'
             '"i":"20f43950-d8dd-5b31-9112-a178eb6023af","BT":false}]}')  # fmt: skip
DOC_SNAPSHOT = ('{"topic":"orderbook.50.BTCUSDT","type":"snapshot","ts":1671179923028,"data":{"s":"BTCUSDT",'
                '"b":[["17440.00","40.833"],["17439.50","0.513"],["17416.00","6.156"],["17415.50","32.268"]],'
                '"a":[["17440.50","78.815"],["17441.00","8.858"],["17464.50","4.901"],["17465.00","5.744"]],'
                '"u":13079592,"seq":22520573250}}')  # fmt: skip
DOC_DELTA_SPREAD = ('{"topic":"orderbook.25.SOLUSDT_SOL/USDT","ts":1744165512257,"type":"delta","data":{"s":'
                    '"SOLUSDT_SOL/USDT","b":[],"a":[["22.3755","4.7"]],"u":64892,"seq":299084},"cts":1744165512234}')  # fmt: skip


def _delta(symbol: str, u: int, bids=(), asks=(), ts: int = 1671179923046) -> str:
    """A delta in the documented shape."""
    return json.dumps({"topic": f"orderbook.50.{symbol}", "type": "delta", "ts": ts,
                       "data": {"s": symbol, "b": [list(b) for b in bids], "a": [list(a) for a in asks],
                                "u": u, "seq": 22520573250 + u}, "cts": ts - 2})  # fmt: skip


def _symbols() -> SymbolMap:
    return SymbolMap.of("bybit", [("bybit:BTC-USDT", "BTCUSDT"), ("bybit:ETH-USDT", "ETHUSDT"),
                                  ("bybit:SOL-USDT", "SOLUSDT_SOL/USDT")])  # fmt: skip


def test_the_recorded_listing_maps_symbols() -> None:
    symbols = symbol_map(listing_bodies(recording_path("BYBIT.0.txt").read_text())["https://api.bybit.com/v2/public/symbols"])
    assert symbols.instrument("BTCUSDT") == "bybit:BTC-USDT"
    assert symbol_map({"result": {"list": [{"symbol": "BTCUSDT", "baseCoin": "BTC", "quoteCoin": "USDT"}]}}).venue_symbol(
        "bybit:BTC-USDT") == "BTCUSDT"  # fmt: skip


def test_the_documented_trade_and_delta_frames() -> None:
    connector = BybitConnector(_symbols(), ["bybit:BTC-USDT", "bybit:SOL-USDT"], snapshot_every_s=0)
    connector.on_open("bybit", 0)
    (trade,) = connector.on_frame("bybit", DOC_TRADE, 5)
    assert trade == Trade("bybit:BTC-USDT", 1672304486865_000_000, Decimal("16578.50"), Decimal("0.001"), "buy",
                          "20f43950-d8dd-5b31-9112-a178eb6023af", "bybit", 5)  # fmt: skip
    # A delta before any snapshot is not applied: there is no book to apply it to.
    assert connector.on_frame("bybit", DOC_DELTA_SPREAD, 6) == []
    snap = DOC_DELTA_SPREAD.replace('"type":"delta"', '"type":"snapshot"').replace('"u":64892', '"u":64891')
    connector.on_frame("bybit", snap, 7)
    (delta,) = [r for r in connector.on_frame("bybit", DOC_DELTA_SPREAD, 8) if isinstance(r, BookDelta)]
    assert (delta.sequence, delta.prev_sequence, delta.asks, delta.ts_ns) == (
        64892, 64891, ((Decimal("22.3755"), Decimal("4.7")),), 1744165512234_000_000)  # fmt: skip


def test_live_a_broken_update_chain_resyncs_that_symbol_alone() -> None:
    btc, eth = "bybit:BTC-USDT", "bybit:ETH-USDT"
    eth_snapshot = DOC_SNAPSHOT.replace("BTCUSDT", "ETHUSDT")
    frames = [DOC_SNAPSHOT, eth_snapshot,
              _delta("BTCUSDT", 13079593, asks=[("17440.50", "78.857"), ("17442.00", "1.510")]),
              _delta("ETHUSDT", 13079593, bids=[("17440.00", "0")]),
              _delta("BTCUSDT", 13079595, bids=[("17439.50", "1")]),  # u 13079594 lost
              _delta("ETHUSDT", 13079594, bids=[("17439.50", "2")]),
              DOC_TRADE]  # fmt: skip

    def script(session) -> None:
        session.expect("subscribe")
        session.send_all(frames)
        assert json.loads(session.expect('"unsubscribe"')) == {"op": "unsubscribe", "args": ["orderbook.50.BTCUSDT"]}
        assert json.loads(session.expect('"subscribe"')) == {"op": "subscribe", "args": ["orderbook.50.BTCUSDT"]}
        session.send(DOC_SNAPSHOT)  # the venue answers a subscribe with a fresh snapshot

    with ReplayServer([script]) as server:
        connector = BybitConnector(_symbols(), [btc, eth], ws_url=server.url, snapshot_every_s=0)
        live, _ = run_live(connector, until=at_least(3, lambda r: isinstance(r, BookSnapshot)))
        subscribed = json.loads(server.sessions[0].received[0])
    assert subscribed == {"op": "subscribe", "args": ["orderbook.50.BTCUSDT", "publicTrade.BTCUSDT",
                                                      "orderbook.50.ETHUSDT", "publicTrade.ETHUSDT"]}  # fmt: skip
    broken = [(r.instrument, r.kind) for r in live if isinstance(r, IntegrityEvent) and r.kind in (SEQUENCE_GAP, RESYNC)]
    assert broken == [(btc, SEQUENCE_GAP), (btc, RESYNC)]
    eth_deltas = [r for r in live if isinstance(r, BookDelta) and r.instrument == eth]
    assert [(d.prev_sequence, d.sequence) for d in eth_deltas] == [(13079592, 13079593), (13079593, 13079594)]
    mirror = Mirror()
    for record in live:
        mirror.apply(record)
    assert mirror.bids[eth] == {Decimal("17439.50"): Decimal("2"), Decimal("17416.00"): Decimal("6.156"),
                                Decimal("17415.50"): Decimal("32.268")}  # fmt: skip
    assert mirror.best(btc) == (Decimal("17440.00"), Decimal("17440.50"))  # the fresh snapshot
    assert any(isinstance(r, Trade) for r in live)
    assert connector.metrics()[eth].get(RESYNC, 0) == 0
