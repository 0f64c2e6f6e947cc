"""HTX (Huobi): the recorded session (HUOBI.ws.44.0: gzip binary frames, depth.step0 and trade.detail)
replayed over loopback, byte for byte, into the live connector."""

from __future__ import annotations

import gzip
import json

from candlekeep.bars import Trade, decimal_str
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.feeds import normalize
from candlekeep.sources.exchanges.base import IntegrityEvent, listing_bodies
from candlekeep.sources.exchanges.htx import BOOK_TOPIC, LISTING_PATH, REST_URL, STALE, HtxConnector, symbol_map
from tests.utils.exchange_drive import at_least, play, published, published_at_least, sent_frames
from tests.utils.exchange_replay import ReplayServer, received_frames, recorded, recording_path, run_live

RECORDING = "HUOBI.ws.44.0.txt"


def _setup():
    events = recorded(RECORDING)
    symbols = symbol_map(listing_bodies(recording_path("HUOBI.0.txt").read_text())[REST_URL + LISTING_PATH])
    subs = [f["sub"] for f in sent_frames(events) if "sub" in f and f["sub"].endswith("depth.step0")]
    return events, symbols, [symbols.instrument(s.split(".")[1]) for s in subs]


def _books_and_trades(records):
    out: dict[str, tuple[list, list]] = {}
    for e in published(records):
        books, trades = out.setdefault(e[1] if isinstance(e, tuple) else e.instrument, ([], []))
        (books if isinstance(e, tuple) else trades).append(e)
    return out


def test_listing_maps_lower_case_symbols() -> None:
    _, symbols, _ = _setup()
    assert symbols.instrument("btcusdt") == "htx:BTC-USDT"
    assert symbols.venue_symbol("htx:YFI-HUSD") == "yfihusd"


def test_live_replay_answers_each_ping_as_recorded_and_publishes_unverified_snapshots() -> None:
    events, symbols, instruments = _setup()
    frames = received_frames(events)
    assert all(isinstance(f, bytes) for f in frames)  # gzip, sent as binary frames
    expected = _books_and_trades(normalize(HtxConnector(symbols, instruments, book_channel=BOOK_TOPIC, snapshot_every_s=0), events))
    recorded_pongs = [json.dumps(f, separators=(",", ":")) for f in sent_frames(events) if "pong" in f]
    with ReplayServer([play(frames, expect="sub")]) as server:
        connector = HtxConnector(symbols, instruments, book_channel=BOOK_TOPIC, ws_url=server.url, snapshot_every_s=0)
        published_all = published_at_least(sum(len(b) + len(t) for b, t in expected.values()))

        def answered(session) -> list[str]:
            return [f for f in session.received if '"pong"' in f]

        # Done when every record is out and every recorded ping has been answered.
        live, _ = run_live(connector, until=lambda rs: published_all(rs) and bool(server.sessions)
                           and len(answered(server.sessions[0])) >= len(recorded_pongs))  # fmt: skip
        pongs = answered(server.sessions[0])
    assert _books_and_trades(live) == expected
    # Independent truth: the recording holds the pongs the recording client sent to the venue's pings.
    assert [json.dumps(json.loads(p), separators=(",", ":")) for p in pongs] == recorded_pongs

    assert not any(isinstance(r, BookDelta) for r in live)  # every push is a whole book
    snapshots = [r for r in live if isinstance(r, BookSnapshot)]
    assert snapshots and not any(r.verified for r in snapshots)
    last: dict[str, int] = {}
    for snap in snapshots:
        assert snap.sequence > last.get(snap.instrument, -1)  # versions only grow
        last[snap.instrument] = snap.sequence
        assert snap.bids[0][0] < snap.asks[0][0]
        assert list(snap.bids) == sorted(snap.bids, reverse=True) and list(snap.asks) == sorted(snap.asks)
    # The exponent-form prices of the wire keep their digits: the first trioeth push's best bid is
    # written `9.121E-7` on the wire, exactly 0.0000009121.
    trio = next(s for s in snapshots if s.instrument == symbols.instrument("trioeth"))
    wire = next(gzip.decompress(f).decode() for f in frames if b'"ch":"market.trioeth.depth.step0"' in gzip.decompress(f))
    assert wire.split('"bids":[[', 1)[1].startswith("9.121E-7,")
    assert decimal_str(trio.bids[0][0]) == "0.0000009121"
    trades = [r for r in live if isinstance(r, Trade)]
    assert trades and len({(t.instrument, t.trade_id) for t in trades}) == len(trades)


def test_an_out_of_order_push_is_dropped_for_that_symbol_only() -> None:
    events, symbols, instruments = _setup()
    frames = received_frames(events)
    victim = "borusdt"
    pushes = [i for i, f in enumerate(frames) if f'"ch":"market.{victim}.depth.step0"'.encode() in gzip.decompress(f)]
    a, b = pushes[2], pushes[3]
    swapped = list(frames)
    swapped[a], swapped[b] = frames[b], frames[a]
    clean = _books_and_trades(normalize(HtxConnector(symbols, instruments, book_channel=BOOK_TOPIC, snapshot_every_s=0), events))
    with ReplayServer([play(swapped, expect="sub")]) as server:
        connector = HtxConnector(symbols, instruments, book_channel=BOOK_TOPIC, ws_url=server.url, snapshot_every_s=0)
        live, _ = run_live(connector, until=at_least(1, lambda r: isinstance(r, IntegrityEvent) and r.kind == STALE))
    stale = [r for r in live if isinstance(r, IntegrityEvent) and r.kind == STALE]
    assert [r.instrument for r in stale] == [symbols.instrument(victim)]
    assert connector.metrics()[symbols.instrument(victim)][STALE] == 1
    got = _books_and_trades(live)
    for instrument in instruments:
        if instrument != symbols.instrument(victim) and instrument in got:
            assert got[instrument][0] == clean[instrument][0][: len(got[instrument][0])]


# --- mbp.150 (the verified book protocol; no recording: HTX's documented frames) -------------------
# HTX support notice 900000047626 ("new MBP feed", www.huobi.com/support/en-us/detail/900000047626/):
# the `req` refresh sample (seqNum 100020142010, bids [[618.37, 71.594], [423.33, 77.726], ...]) and
# the incremental sample's shape (`ch`, `ts`, `tick.seqNum`, `tick.prevSeqNum`, `bids`, `asks`). The
# refresh's asks and the increments' levels and numbers after it are ours (the notice elides them),
# in that shape: fault injection.

def _gz(frame: dict) -> bytes:
    return gzip.compress(json.dumps(frame).encode())


def _refresh(symbol: str, req_id: str) -> bytes:
    return _gz({"id": req_id, "rep": f"market.{symbol}.mbp.150", "status": "ok", "ts": 1573199608679,
                "data": {"seqNum": 100020142010, "bids": [[618.37, 71.594], [423.33, 77.726], [223.18, 47.997]],
                         "asks": [[619.5, 1.25]]}})  # fmt: skip


def _increment(symbol: str, seq: int, prev: int, bids=(), asks=()) -> bytes:
    return _gz({"ch": f"market.{symbol}.mbp.150", "ts": 1573199608679,
                "tick": {"seqNum": seq, "prevSeqNum": prev, "bids": list(bids), "asks": list(asks)}})  # fmt: skip


def test_mbp_increments_chain_to_the_req_refresh_and_a_gap_asks_again_for_that_symbol_alone() -> None:
    from decimal import Decimal

    from candlekeep.books import BookSnapshot
    from candlekeep.sources.exchanges.base import RESYNC, SEQUENCE_GAP, SymbolMap
    from tests.utils.exchange_drive import Mirror, all_of, at_least

    symbols = SymbolMap.of("htx", [("htx:BTC-USDT", "btcusdt"), ("htx:ETH-USDT", "ethusdt")])
    btc, eth = "htx:BTC-USDT", "htx:ETH-USDT"
    base = 100020142010

    def script(session) -> None:
        first = session.expect('"sub"')
        if "trade.detail" in first:  # the /ws socket: trades only
            session.send(_gz({"ch": "market.btcusdt.trade.detail", "ts": 1618678027942, "tick": {"id": 1, "ts": 1,
                              "data": [{"id": 7, "ts": 1618678027940, "tradeId": 100045088885, "amount": 0.5,
                                        "price": 618.4, "direction": "buy"}]}}))  # fmt: skip
            return
        reqs = [json.loads(session.expect('"req"')) for _ in range(2)]
        session.send_all([_increment("btcusdt", base + 1, base, bids=[[618.37, 0]]),  # buffered until the refresh
                          *[_refresh(r["req"].split(".")[1], r["id"]) for r in reqs],
                          _increment("ethusdt", base + 1, base, asks=[[619.5, 2]]),
                          _increment("btcusdt", base + 4, base + 3, bids=[[618.0, 1]]),  # base+2, base+3 lost
                          _increment("ethusdt", base + 2, base + 1, bids=[[423.33, 0]])])  # fmt: skip
        again = json.loads(session.expect('"req"'))
        assert again["req"] == "market.btcusdt.mbp.150"
        session.send(_refresh("btcusdt", again["id"]))

    with ReplayServer([script]) as server:
        connector = HtxConnector(symbols, [btc, eth], ws_url=server.url, snapshot_every_s=0)
        # Three snapshots (two refreshes and the re-asked one) and the /ws socket's trade: the two
        # sockets race, so waiting for the snapshots alone can stop before the trade arrives.
        live, _ = run_live(connector, until=all_of(at_least(3, lambda r: isinstance(r, BookSnapshot)),
                                                   at_least(1, lambda r: isinstance(r, Trade))))
        assert [s.url for s in connector.connections()] == [server.url, server.url]  # /feed and /ws, pointed here
    broken = [(r.instrument, r.kind) for r in live if isinstance(r, IntegrityEvent) and r.kind in (SEQUENCE_GAP, RESYNC)]
    assert broken == [(btc, SEQUENCE_GAP), (btc, RESYNC)]
    deltas = [(r.instrument, r.prev_sequence, r.sequence) for r in live if type(r).__name__ == "BookDelta"]
    assert (eth, base, base + 1) in deltas and (eth, base + 1, base + 2) in deltas
    assert (btc, base, base + 1) in deltas and not any(d[0] == btc and d[2] == base + 4 for d in deltas)
    assert all(r.verified for r in live if isinstance(r, BookSnapshot))
    mirror = Mirror()
    for record in live:
        mirror.apply(record)
    assert mirror.asks[eth] == {Decimal("619.5"): Decimal("2")}
    assert Decimal("423.33") not in mirror.bids[eth]
    assert mirror.best(btc) == (Decimal("618.37"), Decimal("619.5"))  # the refreshed book
    assert [t.trade_id for t in live if isinstance(t, Trade)] == ["100045088885"]


def test_mbp_losing_one_socket_breaks_only_what_it_carried() -> None:
    from candlekeep.bars import Disconnect
    from candlekeep.sources.exchanges.base import SymbolMap
    from candlekeep.sources.exchanges.htx import CONN, FEED_CONN

    connector = HtxConnector(SymbolMap.of("htx", [("htx:BTC-USDT", "btcusdt")]), ["htx:BTC-USDT"], snapshot_every_s=0)
    assert {s.key: s.instruments for s in connector.connections()} == {FEED_CONN: (), CONN: ("htx:BTC-USDT",)}
    connector.on_open(FEED_CONN, 0)
    (req,) = connector.take_actions()
    connector.on_frame(FEED_CONN, _refresh("btcusdt", json.loads(req.frame)["id"]), 1)
    assert connector.states["htx:BTC-USDT"].phase == "synced"
    # The trade socket drops: a Disconnect for the trades; the book (on /feed) carries on.
    assert [type(r) for r in connector.on_close(CONN, 2, "closed")] == [Disconnect]
    assert connector.states["htx:BTC-USDT"].phase == "synced"
    # The book socket drops: no Disconnect on ticks (no trade was lost); the book starts over.
    assert connector.on_close(FEED_CONN, 3, "closed") == []
    assert connector.states["htx:BTC-USDT"].phase == "awaiting"
