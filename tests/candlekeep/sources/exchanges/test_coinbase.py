"""Coinbase: the recorded ws-feed session (COINBASE.ws.28.0, the Exchange feed's former name) replayed
over loopback into the live connector, checked against the venue's own ticker frames."""

from __future__ import annotations

import json
from decimal import Decimal

from candlekeep.bars import Disconnect, Trade
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.sources.exchanges.base import CROSSED, RESYNC, IntegrityEvent, listing_bodies
from candlekeep.sources.exchanges.coinbase import CoinbaseConnector, iso_to_ns, symbol_map
from candlekeep.feeds import normalize
from tests.utils.exchange_drive import Mirror, at_least, drive, play, published, published_at_least, records_of, sent_frames
from tests.utils.exchange_replay import ReplayServer, received_frames, recorded, recording_path, run_live

RECORDING = "COINBASE.ws.28.0.txt"
LISTING = "COINBASE.0.txt"


def _symbols():
    return symbol_map(listing_bodies(recording_path(LISTING).read_text())["https://api.pro.coinbase.com/products"])


def _setup():
    events = recorded(RECORDING)
    symbols = _symbols()
    products = sent_frames(events)[0]["product_ids"]
    return events, symbols, [symbols.instrument(p) for p in products]


def test_listing_maps_products_to_instrument_ids() -> None:
    symbols = _symbols()
    assert symbols.instrument("BAND-GBP") == "coinbase:BAND-GBP"
    assert symbols.venue_symbol("coinbase:SKL-USD") == "SKL-USD"


def test_timestamps_keep_every_digit() -> None:
    assert iso_to_ns("2021-04-17T16:43:37.075687Z") == 1618677817075687000
    assert iso_to_ns("2023-02-09T20:32:50.714964855Z") == 1675974770714964855


def test_live_replay_books_equal_the_recorded_tickers_and_trades_their_taker_side() -> None:
    events, symbols, instruments = _setup()
    direct = drive(CoinbaseConnector(symbols, instruments, snapshot_every_s=0), events)
    expected = published(records_of(direct))

    with ReplayServer([play(received_frames(events))]) as server:
        live, _ = run_live(CoinbaseConnector(symbols, instruments, ws_url=server.url, snapshot_every_s=0),
                           until=published_at_least(len(expected)))  # fmt: skip
    assert published(live) == expected  # the live path publishes exactly what the pure path does
    offline = normalize(CoinbaseConnector(symbols, instruments, snapshot_every_s=0), events)
    assert published(offline) == expected  # and so does `feeds normalize`

    # Independent truth 1: each `ticker` frame's best bid/ask (the venue's own top of book) against
    # the book rebuilt from published records when it arrived; a ticker older than the book's
    # latest update (or sent before the product's snapshot) describes another moment and is skipped.
    mirror, latest, compared, wrong = Mirror(), {}, 0, []
    tickers: dict[tuple[str, str], dict] = {}
    for step in direct:
        for record in step.records:
            mirror.apply(record)
            if isinstance(record, (BookSnapshot, BookDelta)):
                latest[record.instrument] = record.ts_ns  # a snapshot's: its (recorded) receipt time
        msg = json.loads(step.frame)
        if msg["type"] != "ticker":
            continue
        instrument = symbols.instrument(msg["product_id"])
        tickers[(instrument, str(msg["trade_id"]))] = msg
        if instrument in latest and iso_to_ns(msg["time"]) >= latest[instrument]:
            compared += 1
            if mirror.best(instrument) != (Decimal(msg["best_bid"]), Decimal(msg["best_ask"])):
                wrong.append((instrument, msg["time"], mirror.best(instrument), msg["best_bid"], msg["best_ask"]))
    assert compared > 0 and wrong == []

    # Independent truth 2: the ticker names the taker side, price and size of the trade it follows.
    trades = [r for r in live if isinstance(r, Trade)]
    checked = [(t, tickers[(t.instrument, t.trade_id)]) for t in trades if (t.instrument, t.trade_id) in tickers]
    assert checked
    for trade, msg in checked:
        assert (trade.side, trade.price, trade.size) == (msg["side"], Decimal(msg["price"]), Decimal(msg["last_size"]))
    assert not any(isinstance(r, BookDelta) and r.verified for r in live)  # no sequence on L2: unverified


def test_a_crossed_book_resyncs_that_product_alone_and_a_lost_trade_disconnects_its_trades() -> None:
    events, symbols, instruments = _setup()
    frames = received_frames(events)
    victim = "SKL-BTC"
    # Fault 1: one recorded update of SKL-BTC turned into a bid above its best ask (a crossed book).
    updates = [i for i, f in enumerate(frames) if f'"l2update","product_id":"{victim}"' in f]
    cross_at = updates[len(updates) // 2]
    bad = json.loads(frames[cross_at])
    bad["changes"] = [["buy", "1", "1"]]
    # Fault 2: one match of BAND-GBP dropped (its trade ids skip one).
    matches = [i for i, f in enumerate(frames) if '"type":"match"' in f and '"BAND-GBP"' in f]
    drop_at = matches[0]
    snapshot_frame = next(f for f in frames if f'"snapshot","product_id":"{victim}"' in f)
    faulty = [json.dumps(bad) if i == cross_at else f for i, f in enumerate(frames) if i != drop_at]

    def script(session) -> None:
        session.expect("subscribe")
        session.send_all(faulty)
        resubscribe = json.loads(session.expect('"subscribe"'))
        assert resubscribe["product_ids"] == [victim]
        session.send(snapshot_frame)  # the venue answers a subscribe with the product's snapshot

    clean = drive(CoinbaseConnector(symbols, instruments, snapshot_every_s=0), events)
    with ReplayServer([script]) as server:
        connector = CoinbaseConnector(symbols, instruments, ws_url=server.url, snapshot_every_s=0)
        victim_id = symbols.instrument(victim)
        live, _ = run_live(connector, until=at_least(2, lambda r: isinstance(r, BookSnapshot) and r.instrument == victim_id))
        client_frames = server.sessions[0].received
    unsubscribe = [json.loads(f) for f in client_frames if '"unsubscribe"' in f]
    assert unsubscribe == [{"type": "unsubscribe", "product_ids": [victim], "channels": ["level2_batch"]}]

    events_of = [(r.instrument, r.kind) for r in live if isinstance(r, IntegrityEvent) and r.kind in (CROSSED, RESYNC)]
    assert events_of == [(victim_id, CROSSED), (victim_id, RESYNC)]
    assert connector.metrics()[victim_id][RESYNC] == 1
    assert all(RESYNC not in counts for i, counts in connector.metrics().items() if i != victim_id)
    lost_trades = [r for r in live if isinstance(r, Disconnect) and "trade ids" in r.reason]
    assert [r.instrument for r in lost_trades] == [symbols.instrument("BAND-GBP")]

    # Every other product published exactly what the clean recording gives, record for record.
    others = [i for i in instruments if i != victim_id]
    def book_of(records, instrument):  # noqa: E306
        return [e for e in published(records) if isinstance(e, tuple) and e[1] == instrument]
    for instrument in others:
        assert book_of(live, instrument) == book_of(records_of(clean), instrument)


def test_a_forced_disconnect_reconnects_resubscribes_and_starts_each_book_from_a_new_snapshot() -> None:
    events, symbols, instruments = _setup()
    frames = received_frames(events)
    half = len(frames) // 2

    def first(session) -> None:
        session.expect("subscribe")
        session.send_all(frames[:half])
        session.drop()

    snapshots_after = at_least(2 * len(instruments), lambda r: isinstance(r, BookSnapshot))
    with ReplayServer([first, play(frames)]) as server:
        live, runner = run_live(CoinbaseConnector(symbols, instruments, ws_url=server.url, snapshot_every_s=0),
                                until=snapshots_after)  # fmt: skip
        resubscribed = json.loads(server.sessions[1].received[0])
    assert runner.stats["connects"] == 2
    assert resubscribed["type"] == "subscribe" and sorted(resubscribed["product_ids"]) == sorted(
        symbols.venue_symbol(i) for i in instruments)  # fmt: skip
    # The runner's disconnects: one per product at the start, and one per product when the socket dropped.
    dropped = [i for i, r in enumerate(live) if isinstance(r, Disconnect) and "trade ids" not in r.reason]
    assert len(dropped) == 2 * len(instruments)
    assert {live[i].instrument for i in dropped[len(instruments):]} == set(instruments)
    cut = dropped[-1]
    fresh: set[str] = set()
    for record in live[cut:]:
        if isinstance(record, BookSnapshot):
            fresh.add(record.instrument)
        elif isinstance(record, BookDelta):
            assert record.instrument in fresh  # no update before the product's new snapshot
    assert fresh == set(instruments)


# The Exchange docs' examples ("Websocket channels": the heartbeat channel, the matches channel).
DOC_MATCH = ('{"type":"match","trade_id":10,"sequence":50,"maker_order_id":"ac928c66-ca53-498f-9c13-a110027a60e8",'
             '"taker_order_id":"132fb6ae-456b-4654-b4e0-d681ac05cea1","time":"2014-11-07T08:19:27.028459Z",'
             '"product_id":"BTC-USD","size":"5.23512","price":"400.23","side":"sell"}')  # fmt: skip
DOC_HEARTBEAT = ('{"type":"heartbeat","sequence":90,"last_trade_id":20,"product_id":"BTC-USD",'
                 '"time":"2014-11-07T08:19:28.464459Z"}')  # fmt: skip


def test_a_heartbeat_naming_a_later_trade_than_ours_disconnects_that_products_trades() -> None:
    symbols = _symbols()
    connector = CoinbaseConnector(symbols, ["coinbase:BTC-USD"], books=False)
    assert json.loads(connector.connections()[0].subscribe[0])["channels"] == ["matches", "heartbeat"]
    (trade,) = connector.on_frame("coinbase", DOC_MATCH, 1)
    assert (trade.side, trade.trade_id, trade.price) == ("buy", "10", Decimal("400.23"))  # the maker sold
    (gap,) = connector.on_frame("coinbase", DOC_HEARTBEAT, 2)
    assert isinstance(gap, Disconnect) and gap.reason == "trade ids 11..20 missed (heartbeat)"
    assert connector.on_frame("coinbase", DOC_HEARTBEAT, 3) == []  # nothing new since
    assert connector.metrics()["coinbase:BTC-USD"]["trade_gap"] == 1
