"""MEXC: no recording exists. The frames are MEXC's official documentation's (mexcdevelop/apidocs,
branch spot_v3_en, source/index.html.md: "Trade Streams", "Diff.Depth Stream", "Order Book",
"Exchange Information"), encoded the way the venue sends them: as protobuf `PushDataV3ApiWrapper`
messages per mexcdevelop/websocket-proto, built here with Google's protobuf library (an encoder
independent of the connector's own wire reader). Values not in the docs (the chain's snapshot and
its follow-up pushes) are ours, in the documented shape: fault injection.
"""

from __future__ import annotations

import json
from decimal import Decimal

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from candlekeep.bars import Trade
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.sources.exchanges.base import CROSSED, RESYNC, SEQUENCE_GAP, IntegrityEvent
from candlekeep.sources.exchanges.mexc import MexcConnector, symbol_map
from tests.utils.exchange_drive import Mirror, all_of, at_least
from tests.utils.exchange_replay import ReplayServer, run_live
from tests.utils.fixture_server import FixtureServer, Reply

_S, _I32, _I64, _MSG = 9, 5, 3, 11
_ONE, _MANY = 1, 3


def _wrapper_class():
    proto = descriptor_pb2.FileDescriptorProto(name="mexc_push_test.proto", package="mexc", syntax="proto3")

    def message(name, *fields):
        m = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            f = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = f".mexc.{type_name}"

    message("PublicAggreDepthV3ApiItem", ("price", 1, _S, _ONE, None), ("quantity", 2, _S, _ONE, None))
    message("PublicAggreDepthsV3Api", ("asks", 1, _MSG, _MANY, "PublicAggreDepthV3ApiItem"),
            ("bids", 2, _MSG, _MANY, "PublicAggreDepthV3ApiItem"), ("eventType", 3, _S, _ONE, None),
            ("fromVersion", 4, _S, _ONE, None), ("toVersion", 5, _S, _ONE, None))  # fmt: skip
    message("PublicAggreDealsV3ApiItem", ("price", 1, _S, _ONE, None), ("quantity", 2, _S, _ONE, None),
            ("tradeType", 3, _I32, _ONE, None), ("time", 4, _I64, _ONE, None), ("tradeId", 5, _S, _ONE, None))  # fmt: skip
    message("PublicAggreDealsV3Api", ("deals", 1, _MSG, _MANY, "PublicAggreDealsV3ApiItem"),
            ("eventType", 2, _S, _ONE, None))  # fmt: skip
    message("PushDataV3ApiWrapper", ("channel", 1, _S, _ONE, None), ("symbol", 3, _S, _ONE, None),
            ("symbolId", 4, _S, _ONE, None), ("createTime", 5, _I64, _ONE, None), ("sendTime", 6, _I64, _ONE, None),
            ("publicAggreDepths", 313, _MSG, _ONE, "PublicAggreDepthsV3Api"),
            ("publicAggreDeals", 314, _MSG, _ONE, "PublicAggreDealsV3Api"))  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mexc.PushDataV3ApiWrapper"))


Wrapper = _wrapper_class()
LISTING = {"symbols": [{"symbol": "BTCUSDT", "baseAsset": "BTC", "quoteAsset": "USDT"},
                       {"symbol": "ETHUSDT", "baseAsset": "ETH", "quoteAsset": "USDT"},
                       {"symbol": "TOMO3LUSDT", "baseAsset": "TOMO3L", "quoteAsset": "USDT"}]}  # fmt: skip


def _depth(symbol: str, first: int, last: int, bids=(), asks=(), send: int = 1736411507002) -> bytes:
    push = Wrapper(channel=f"spot@public.aggre.depth.v3.api.pb@100ms@{symbol}", symbol=symbol, sendTime=send)
    body = push.publicAggreDepths
    body.eventType, body.fromVersion, body.toVersion = "spot@public.aggre.depth.v3.api.pb@100ms", str(first), str(last)
    for side, rows in ((body.bids, bids), (body.asks, asks)):
        for price, quantity in rows:
            side.add(price=price, quantity=quantity)
    return push.SerializeToString()


# The docs' Diff.Depth Stream response and Trade Streams response, as protobuf.
DOC_DEPTH = _depth("BTCUSDT", 10589632359, 10589632359, bids=[("92877.58", "0.00000000")])
_deals = Wrapper(channel="spot@public.aggre.deals.v3.api.pb@100ms@BTCUSDT", symbol="BTCUSDT", sendTime=1736409765052)
_deals.publicAggreDeals.eventType = "spot@public.aggre.deals.v3.api.pb@100ms"
_deals.publicAggreDeals.deals.add(price="93220.00", quantity="0.04438243", tradeType=2, time=1736409765051)
DOC_DEALS = _deals.SerializeToString()
DOC_ORDER_BOOK = '{"lastUpdateId": 1112416, "bids": [["15.00000", "49999.00000"]], "asks": [["14.0000", "1.0000"]]}'


def test_listing_and_the_documented_trade() -> None:
    symbols = symbol_map(LISTING)
    assert symbols.instrument("TOMO3LUSDT") == "mexc:TOMO3L-USDT"
    connector = MexcConnector(symbols, ["mexc:BTC-USDT"], books=False)
    (trade,) = connector.on_frame("mexc-0", DOC_DEALS, 7)
    assert trade == Trade("mexc:BTC-USDT", 1736409765051_000_000, Decimal("93220.00"), Decimal("0.04438243"), "sell",
                          "1736409765052-0", "mexc", 7)  # fmt: skip
    assert connector.on_frame("mexc-0", '{"id":0,"code":0,"msg":"spot@public.aggre.deals.v3.api.pb@100ms@BTCUSDT"}', 8) == []


def test_the_documented_order_book_is_crossed_and_is_refused() -> None:
    # The docs' own /api/v3/depth example bids 15 over an ask of 14: no real book looks like that.
    connector = MexcConnector(symbol_map(LISTING), ["mexc:BTC-USDT"], trades=False)
    connector.on_open("mexc-0", 0)
    connector.take_actions()
    out = connector.on_snapshot("mexc:BTC-USDT", DOC_ORDER_BOOK, 1)
    assert [(r.kind) for r in out if isinstance(r, IntegrityEvent)] == [CROSSED, RESYNC]
    assert not any(isinstance(r, BookSnapshot) for r in out)
    assert [a.url for a in connector.take_actions()] == ["https://api.mexc.com/api/v3/depth?symbol=BTCUSDT&limit=1000"]


def test_live_protobuf_pushes_chain_to_the_snapshot_and_a_gap_resyncs_one_symbol() -> None:
    btc, eth = "mexc:BTC-USDT", "mexc:ETH-USDT"
    snapshot = json.dumps({"lastUpdateId": 10589632358, "bids": [["92877.58", "0.5"], ["92870.00", "1.25"]],
                           "asks": [["92880.10", "0.75"]]})  # fmt: skip
    pushes = [DOC_DEPTH, _depth("ETHUSDT", 10589632359, 10589632360, asks=[("92880.10", "0.70")]),
              _depth("BTCUSDT", 10589632361, 10589632361, bids=[("92871.00", "2")]),  # 10589632360 lost
              _depth("ETHUSDT", 10589632361, 10589632361, bids=[("92870.00", "0")]), DOC_DEALS]  # fmt: skip

    def script(session) -> None:
        session.expect("SUBSCRIPTION")
        session.send_all(pushes)

    with FixtureServer() as rest, ReplayServer([script]) as ws:
        for symbol in ("BTCUSDT", "ETHUSDT"):
            rest.add("/api/v3/depth", Reply.json(snapshot), query={"symbol": symbol})
        connector = MexcConnector(symbol_map(LISTING), [btc, eth], ws_url=ws.url, rest_url=rest.url, snapshot_every_s=0)
        # Pushes may beat the snapshots: they are buffered, then chained to them. The resync's snapshot
        # (REST) may also beat the last push (the deals): wait for both.
        live, _ = run_live(connector, until=all_of(at_least(3, lambda r: isinstance(r, BookSnapshot)),
                                                   at_least(1, lambda r: isinstance(r, Trade))))
        fetched = [r.query["symbol"] for r in rest.requests]
        subscribed = json.loads(ws.sessions[0].received[0])
    assert subscribed["params"] == ["spot@public.aggre.depth.v3.api.pb@100ms@BTCUSDT",
                                    "spot@public.aggre.deals.v3.api.pb@100ms@BTCUSDT",
                                    "spot@public.aggre.depth.v3.api.pb@100ms@ETHUSDT",
                                    "spot@public.aggre.deals.v3.api.pb@100ms@ETHUSDT"]  # fmt: skip
    broken = [(r.instrument, r.kind) for r in live if isinstance(r, IntegrityEvent) and r.kind in (SEQUENCE_GAP, RESYNC)]
    assert broken == [(btc, SEQUENCE_GAP), (btc, RESYNC)]
    assert fetched.count("BTCUSDT") == 2 and fetched.count("ETHUSDT") == 1
    eth_deltas = [(d.prev_sequence, d.sequence) for d in live if isinstance(d, BookDelta) and d.instrument == eth]
    assert eth_deltas == [(10589632358, 10589632360), (10589632360, 10589632361)]
    mirror = Mirror()
    for record in live:
        mirror.apply(record)
    assert mirror.bids[eth] == {Decimal("92877.58"): Decimal("0.5")}
    assert mirror.asks[eth] == {Decimal("92880.10"): Decimal("0.70")}
    assert any(isinstance(r, Trade) and r.instrument == btc for r in live)
