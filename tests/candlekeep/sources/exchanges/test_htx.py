"""HTX (Huobi): the recorded session (HUOBI.ws.44.0: gzip binary frames, depth.step0 and trade.detail)
replayed over loopback, byte for byte, into the live connector."""

from __future__ import annotations

import gzip
import json

from candlekeep.bars import Trade, decimal_str
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.feeds import normalize
from candlekeep.sources.exchanges.base import IntegrityEvent, listing_bodies
from candlekeep.sources.exchanges.htx import LISTING_PATH, REST_URL, STALE, HtxConnector, symbol_map
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
    expected = _books_and_trades(normalize(HtxConnector(symbols, instruments, snapshot_every_s=0), events))
    recorded_pongs = [json.dumps(f, separators=(",", ":")) for f in sent_frames(events) if "pong" in f]
    with ReplayServer([play(frames, expect="sub")]) as server:
        connector = HtxConnector(symbols, instruments, ws_url=server.url, snapshot_every_s=0)
        live, _ = run_live(connector, until=published_at_least(sum(len(b) + len(t) for b, t in expected.values())))
        pongs = [f for f in server.sessions[0].received if '"pong"' in f]
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
    clean = _books_and_trades(normalize(HtxConnector(symbols, instruments, snapshot_every_s=0), events))
    with ReplayServer([play(swapped, expect="sub")]) as server:
        connector = HtxConnector(symbols, instruments, ws_url=server.url, snapshot_every_s=0)
        live, _ = run_live(connector, until=at_least(1, lambda r: isinstance(r, IntegrityEvent) and r.kind == STALE))
    stale = [r for r in live if isinstance(r, IntegrityEvent) and r.kind == STALE]
    assert [r.instrument for r in stale] == [symbols.instrument(victim)]
    assert connector.metrics()[symbols.instrument(victim)][STALE] == 1
    got = _books_and_trades(live)
    for instrument in instruments:
        if instrument != symbols.instrument(victim) and instrument in got:
            assert got[instrument][0] == clean[instrument][0][: len(got[instrument][0])]
