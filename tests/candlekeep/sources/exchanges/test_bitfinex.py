"""Bitfinex: the recorded v2 session (BITFINEX.ws.11.0, `conf` flags 65536 = SEQ_ALL only, seven pairs
on one connection) replayed over loopback into the live connector; faults injected into it."""

from __future__ import annotations

import json
from decimal import Decimal

from candlekeep.bars import Disconnect, Trade
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.orderbook import OrderBook
from candlekeep.sources.exchanges.base import CHECKSUM_MISMATCH, RESYNC, SEQUENCE_GAP, IntegrityEvent, listing_bodies
from candlekeep.sources.exchanges.bitfinex import (
    OB_CHECKSUM,
    PAIRS_URL,
    SEQ_ALL,
    BitfinexConnector,
    book_checksum,
    js_number,
    pair_symbol,
    symbol_map,
)
from candlekeep.feeds import normalize
from tests.utils.exchange_drive import Mirror, drive, play, published, published_at_least, records_of, sent_frames
from tests.utils.exchange_replay import ReplayServer, received_frames, recorded, recording_path, run_live

RECORDING = "BITFINEX.ws.11.0.txt"


def _setup():
    events = recorded(RECORDING)
    symbols = symbol_map(listing_bodies(recording_path("BITFINEX.0.txt").read_text())[PAIRS_URL])
    instruments = [symbols.instrument(f["symbol"]) for f in sent_frames(events) if f.get("channel") == "book"]
    return events, symbols, instruments


def _recorded_connector(symbols, instruments, **kwargs):
    # As recorded: SEQ_ALL only, every pair on one connection.
    return BitfinexConnector(symbols, instruments, flags=SEQ_ALL, instruments_per_connection=len(instruments),
                             snapshot_every_s=0, **kwargs)  # fmt: skip


def test_pairs_map_to_instrument_ids() -> None:
    assert pair_symbol("BTCUSD") == ("BTC", "USD")
    assert pair_symbol("AAVE:UST") == ("AAVE", "USDT")  # Bitfinex's UST is Tether
    _, symbols, _ = _setup()
    assert symbols.venue_symbol("bitfinex:BTC-USD") == "tBTCUSD"
    assert symbols.instrument("tAVAX:UST") == "bitfinex:AVAX-USDT"


def test_checksum_numbers_are_written_as_javascript_does() -> None:
    # The checksum string holds JavaScript's String(n) of each number (docs.bitfinex.com "WebSocket
    # Checksum"); these are JavaScript's outputs for the same values.
    assert [js_number(Decimal(t)) for t in ("277520", "0.00383141", "1E-7", "1.5e-7", "-0.027", "60400.0")] == [
        "277520", "0.00383141", "1e-7", "1.5e-7", "-0.027", "60400"]  # fmt: skip


def test_live_replay_publishes_the_pure_path_with_an_unbroken_venue_sequence() -> None:
    events, symbols, instruments = _setup()
    direct = drive(_recorded_connector(symbols, instruments), events)
    expected = published(records_of(direct))
    with ReplayServer([play(received_frames(events))]) as server:
        connector = _recorded_connector(symbols, instruments, ws_url=server.url)
        live, _ = run_live(connector, until=published_at_least(len(expected)))
    assert published(live) == expected
    assert published(normalize(_recorded_connector(symbols, instruments), events)) == expected  # feeds normalize
    # The venue numbered every frame of the connection 1, 2, 3, ...: nothing was lost or reordered,
    # and every book came from its subscribe snapshot, never crossed.
    assert not any(isinstance(r, IntegrityEvent) and r.kind != "synced" for r in live)
    assert {r.instrument for r in live if isinstance(r, BookSnapshot)} == set(instruments)
    mirror = Mirror()
    for record in live:
        mirror.apply(record)
        if isinstance(record, BookDelta):
            bid, ask = mirror.best(record.instrument)
            assert bid < ask
            assert record.verified and record.sequence == record.prev_sequence + 1 or record.prev_sequence is not None


def test_a_lost_frame_on_a_shared_connection_resyncs_every_book_on_it() -> None:
    # SEQ_ALL counts frames per connection: a gap cannot say whose frame was lost, so every book on
    # that connection is re-subscribed (which is why a connection carries one pair by default).
    events, symbols, instruments = _setup()
    frames = received_frames(events)
    victim = symbols.instrument("tDOGUSD")
    dog_chan = next(json.loads(f)["chanId"] for f in frames if '"book"' in f and '"tDOGUSD"' in f)
    updates = [i for i, f in enumerate(frames) if f.startswith(f"[{dog_chan},[") and not f.startswith(f"[{dog_chan},[[")]
    lost = updates[len(updates) // 2]
    faulty = [f for i, f in enumerate(frames) if i != lost]
    direct = drive(_recorded_connector(symbols, instruments), events, received=lambda i, f: i != lost)
    with ReplayServer([play(faulty)]) as server:
        connector = _recorded_connector(symbols, instruments, ws_url=server.url)
        live, _ = run_live(connector, until=published_at_least(len(published(records_of(direct)))))
        client = server.sessions[0]
        resubscribed = [json.loads(client.expect('"book"')) for _ in instruments]
    assert published(live) == published(records_of(direct))
    gaps = [r for r in live if isinstance(r, IntegrityEvent) and r.kind == SEQUENCE_GAP]
    assert {r.instrument for r in gaps} == set(instruments)
    assert {f["symbol"] for f in resubscribed} == {symbols.venue_symbol(i) for i in instruments}
    assert {r.instrument for r in live if isinstance(r, Disconnect) and "sequence" in r.reason} == set(instruments)
    assert victim in {r.instrument for r in gaps}


def test_a_checksum_mismatch_resyncs_that_book_alone() -> None:
    # With OB_CHECKSUM on, a `[chanId, "cs", checksum]` frame (the docs' format, no SEQ_ALL here)
    # follows book updates; one that disagrees with the book resyncs that pair and nothing else.
    events, symbols, instruments = _setup()
    frames = [f for f in received_frames(events)]
    strip = lambda f: json.dumps(json.loads(f)[:-1]) if f.startswith("[") else f  # noqa: E731 - no SEQ_ALL numbers
    frames = [strip(f) for f in frames]
    victim = symbols.instrument("tIOTETH")
    chan = next(json.loads(f)["chanId"] for f in frames if '"book"' in f and '"tIOTETH"' in f)
    connector = BitfinexConnector(symbols, instruments, flags=OB_CHECKSUM, instruments_per_connection=len(instruments),
                                  snapshot_every_s=0)  # fmt: skip
    conn = connector.connections()[0].key
    connector.on_open(conn, 0)
    out = []
    for frame in frames:
        out += connector.on_frame(conn, frame, 1)
    good = book_checksum(connector.states[victim].book)
    out += connector.on_frame(conn, json.dumps([chan, "cs", good]), 2)
    out += connector.on_frame(conn, json.dumps([chan, "cs", good + 1]), 3)
    kinds = [(r.instrument, r.kind) for r in out if isinstance(r, IntegrityEvent) and r.kind != "synced"]
    assert kinds == [(victim, "checksum_ok"), (victim, CHECKSUM_MISMATCH), (victim, RESYNC)]
    assert [a.frame for a in connector.take_actions()] == [
        json.dumps({"event": "unsubscribe", "chanId": chan}),
        json.dumps({"event": "subscribe", "channel": "book", "symbol": "tIOTETH", "prec": "P0", "freq": "F0", "len": "100"})]  # fmt: skip
    assert all(connector.states[i].phase == "synced" for i in instruments if i != victim)


def test_checksum_covers_top_25_interleaved_with_negative_asks() -> None:
    book = OrderBook("bitfinex:BTC-USD")
    book.replace([(Decimal("7244.9"), Decimal("0.5"))], [(Decimal("7245.3"), Decimal("1E-7"))])
    import zlib
    crc = zlib.crc32(b"7244.9:0.5:7245.3:-1e-7")
    assert book_checksum(book) == (crc - (1 << 32) if crc >= 1 << 31 else crc)


def test_documented_trade_frame() -> None:
    # docs.bitfinex.com/reference/ws-public-trades: the trade update example (no SEQ_ALL number).
    _, symbols, _ = _setup()
    connector = BitfinexConnector(symbols, ["bitfinex:BTC-USD"], flags=0, books=False)
    conn = connector.connections()[0].key
    connector.on_open(conn, 0)
    connector.on_frame(conn, '{"event":"subscribed","channel":"trades","chanId":17470,"symbol":"tBTCUSD","pair":"BTCUSD"}', 1)
    (trade,) = connector.on_frame(conn, '[17470,"te",[401597395,1574694478808,0.005,7245.3]]', 2)
    assert trade == Trade("bitfinex:BTC-USD", 1574694478808_000_000, Decimal("7245.3"), Decimal("0.005"), "buy",
                          "401597395", "bitfinex", 2)  # fmt: skip
    assert connector.on_frame(conn, '[17470,"tu",[401597395,1574694478808,0.005,7245.3]]', 3) == []


def _with_checksums(frames: list[str], symbols, instruments) -> list[str]:
    """The recording as the venue sends it with OB_CHECKSUM on: a `[chanId,"cs",checksum]` frame
    after every book update (the docs' format; the value is the CRC of the book the recorded frames
    build, i.e. the venue's book), and SEQ_ALL renumbered over all frames (the recorded frames' text
    is kept, only their last number changes). Fault injection: the recording had checksums off."""
    plain = [f.rsplit(",", 1)[0] + "]" if f.startswith("[") else f for f in frames]  # SEQ_ALL number dropped
    venue = BitfinexConnector(symbols, instruments, flags=0, instruments_per_connection=len(instruments), snapshot_every_s=0)
    conn = venue.connections()[0].key
    venue.on_open(conn, 0)
    books: dict[int, str] = {}
    out: list[str] = []
    for frame in plain:
        venue.on_frame(conn, frame, 0)
        out.append(frame)
        msg = json.loads(frame)
        if isinstance(msg, dict):
            if msg.get("event") == "subscribed" and msg["channel"] == "book":
                books[msg["chanId"]] = symbols.instrument(msg["symbol"])
        elif msg[0] in books and isinstance(msg[1], list) and msg[1] and not isinstance(msg[1][0], list):
            out.append(json.dumps([msg[0], "cs", book_checksum(venue.states[books[msg[0]]].book)], separators=(",", ":")))
    numbered, n = [], 0
    for frame in out:
        if frame.startswith("["):
            n += 1
            frame = f"{frame[:-1]},{n}]"
        numbered.append(frame)
    return numbered


def test_with_checksums_a_lost_frame_resyncs_only_the_book_that_fails_its_checksum() -> None:
    # cryptofeed's #291: one gap resets every pair of the feed. Here the gap makes every book on the
    # socket prove itself on its next checksum, and only the book that lost the update resyncs.
    events, symbols, instruments = _setup()
    frames = _with_checksums(received_frames(events), symbols, instruments)
    dog = symbols.instrument("tDOGUSD")
    chan = next(json.loads(f)["chanId"] for f in frames if '"book"' in f and '"tDOGUSD"' in f)
    updates = [i for i, f in enumerate(frames) if f.startswith(f"[{chan},[") and not f.startswith(f"[{chan},[[")]
    # An update inside the top 25 (the checksum changed across it): one deeper would go unseen by
    # the checksum until that level reached the top 25.
    cs = {i: json.loads(frames[i + 1])[2] for i in updates}
    previous = {u: cs[p] for p, u in zip(updates, updates[1:])}
    lost = next(u for u in updates[len(updates) // 2 :] if u in previous and previous[u] != cs[u])

    def run(stream):
        connector = BitfinexConnector(symbols, instruments, instruments_per_connection=len(instruments), snapshot_every_s=0)
        conn = connector.connections()[0].key
        connector.on_open(conn, 0)
        out = []
        for frame in stream:
            out += connector.on_frame(conn, frame, 0)
        return connector, out

    clean_connector, clean = run(frames)
    assert not any(isinstance(r, IntegrityEvent) and r.kind not in ("synced", "checksum_ok") for r in clean)
    connector, faulty = run([f for i, f in enumerate(frames) if i != lost])
    events_of = [(r.instrument, r.kind) for r in faulty if isinstance(r, IntegrityEvent) and r.kind not in ("synced", "checksum_ok")]
    synced_then = {i for i in instruments if any(isinstance(r, BookSnapshot) and r.instrument == i for r in faulty[: _first_gap(faulty)])}
    assert {i for i, k in events_of if k == SEQUENCE_GAP} == synced_then
    assert [(i, k) for i, k in events_of if k != SEQUENCE_GAP] == [(dog, CHECKSUM_MISMATCH), (dog, RESYNC)]
    assert [json.loads(a.frame)["event"] for a in connector.take_actions()] == ["unsubscribe", "subscribe"]
    # Every other book published exactly what it does without the fault.
    for instrument in instruments:
        if instrument != dog:
            assert [r for r in published(faulty) if isinstance(r, tuple) and r[1] == instrument] == [
                r for r in published(clean) if isinstance(r, tuple) and r[1] == instrument], instrument  # fmt: skip


def _first_gap(records) -> int:
    return next(n for n, r in enumerate(records) if isinstance(r, IntegrityEvent) and r.kind == SEQUENCE_GAP)
