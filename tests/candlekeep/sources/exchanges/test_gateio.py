"""Gate.io: the recorded v4 session (GATEIO.ws.1.0 + REST snapshots GATEIO.http.0.0) replayed over
loopback WebSocket and HTTP into the live connector; trades checked against the recorded candles."""

from __future__ import annotations

import json
from decimal import Decimal
from urllib.parse import parse_qsl, urlsplit

from candlekeep.bars import Interval, Trade, aggregate_trades
from candlekeep.feeds import normalize
from candlekeep.sources.exchanges.base import RESYNC, SEQUENCE_GAP, IntegrityEvent, listing_bodies
from candlekeep.sources.exchanges.gateio import REST_URL, LISTING_PATH, GateioConnector, ms_to_ns_exact, symbol_map
from candlekeep.sources.exchanges.recording import read_http
from tests.utils.exchange_drive import Mirror, at_least, drive, play, published, published_at_least, records_of, sent_frames
from tests.utils.exchange_replay import ReplayServer, received_frames, recorded, recording_path, run_live
from tests.utils.fixture_server import FixtureServer, Reply

RECORDING = "GATEIO.ws.1.0.txt"


def _setup():
    events = recorded(RECORDING)
    http = read_http(recording_path("GATEIO.http.0.0.txt"))
    symbols = symbol_map(listing_bodies(recording_path("GATEIO.0.txt").read_text())[REST_URL + LISTING_PATH])
    pairs = next(f for f in sent_frames(events) if f["channel"] == "spot.trades")["payload"]
    return events, http, symbols, [symbols.instrument(p) for p in pairs]


def _serve(server: FixtureServer, http) -> None:
    for response in http:
        split = urlsplit(response.url)
        server.add(split.path, Reply.json(response.body), query=dict(parse_qsl(split.query)))


def _by_instrument(records):
    out: dict[str, tuple[list, list]] = {}
    for e in published(records):
        books, trades = out.setdefault(e[1] if isinstance(e, tuple) else e.instrument, ([], []))
        (books if isinstance(e, tuple) else trades).append(e)
    return out


def test_exact_millisecond_fractions() -> None:
    assert ms_to_ns_exact("1619093543708.2642") == 1619093543708264200


def test_live_replay_equals_normalize_and_keeps_the_venue_chain() -> None:
    events, http, symbols, instruments = _setup()
    direct = records_of(drive(GateioConnector(symbols, instruments, snapshot_every_s=0), events, http))
    expected = _by_instrument(direct)
    with FixtureServer() as rest, ReplayServer([play(received_frames(events))]) as ws:
        _serve(rest, http)
        connector = GateioConnector(symbols, instruments, ws_url=ws.url, rest_url=rest.url, snapshot_every_s=0)
        live, _ = run_live(connector, until=published_at_least(len(published(direct))))
    assert _by_instrument(live) == expected
    assert _by_instrument(normalize(GateioConnector(symbols, instruments, snapshot_every_s=0), events, http)) == expected
    # Every pair was synced from its REST id and every update continued the venue's U/u chain.
    assert {r.instrument for r in live if isinstance(r, IntegrityEvent) and r.kind == "synced"} == set(instruments)
    assert not any(isinstance(r, IntegrityEvent) and r.kind != "synced" for r in live)
    mirror = Mirror()
    for record in live:
        mirror.apply(record)
        if type(record).__name__ == "BookDelta":
            bid, ask = mirror.best(record.instrument)
            assert bid < ask


def test_trades_aggregate_to_the_recorded_candles() -> None:
    # Independent truth: `spot.candlesticks` 1m frames. A minute is comparable when the recording
    # saw all its trades: its first candle frame had zero volume (nothing traded before we joined).
    # Gate.io's candle `v` is the quote volume (sum of price x amount).
    events, http, symbols, instruments = _setup()
    steps = drive(GateioConnector(symbols, instruments, snapshot_every_s=0), events, http)
    trades: list[Trade] = []
    first_volume: dict[tuple[str, int], Decimal] = {}
    compared = 0
    for step in steps:
        trades += [r for r in step.records if isinstance(r, Trade)]
        msg = json.loads(step.frame)
        if msg["channel"] != "spot.candlesticks" or msg["event"] != "update":
            continue
        candle = msg["result"]
        instrument = symbols.instrument(candle["n"].split("_", 1)[1])
        minute = int(candle["t"])
        first_volume.setdefault((instrument, minute), Decimal(candle["v"]))
        if first_volume[(instrument, minute)] != 0 or Decimal(candle["v"]) == 0:
            continue
        mine = [t for t in trades if t.instrument == instrument]
        (bar,) = aggregate_trades(mine, Interval.M1, minute, minute + 60, instrument=instrument, source="test")
        assert (bar.open, bar.high, bar.low, bar.close, bar.quote_volume) == tuple(
            Decimal(candle[k]) for k in ("o", "h", "l", "c", "v"))  # fmt: skip
        compared += 1
    assert compared >= 2


def _faulty(frames, victim, kind):
    updates = [i for i, f in enumerate(frames) if '"spot.order_book_update","event":"update"' in f and f'"s":"{victim}"' in f]
    a, b = updates[-3], updates[-2]
    if kind == "drop":
        return [f for i, f in enumerate(frames) if i != a], lambda i, f: i != a
    swapped = list(frames)
    swapped[a], swapped[b] = frames[b], frames[a]
    return swapped, None


def test_a_dropped_or_reordered_update_resyncs_only_that_pair() -> None:
    events, http, symbols, instruments = _setup()
    frames = received_frames(events)
    victim = "OMG_USDT"
    victim_id = symbols.instrument(victim)
    clean = _by_instrument(records_of(drive(GateioConnector(symbols, instruments, snapshot_every_s=0), events, http)))
    for kind in ("drop", "reorder"):
        faulty, _ = _faulty(frames, victim, kind)
        with FixtureServer() as rest, ReplayServer([play(faulty)]) as ws:
            _serve(rest, http)
            connector = GateioConnector(symbols, instruments, ws_url=ws.url, rest_url=rest.url, snapshot_every_s=0)
            resynced = at_least(2, lambda r: isinstance(r, IntegrityEvent) and r.kind == "synced" and r.instrument == victim_id)
            live, _ = run_live(connector, until=resynced)
            fetched = [r.query["currency_pair"] for r in rest.requests]
        broken = {(r.instrument, r.kind) for r in live if isinstance(r, IntegrityEvent) and r.kind in (SEQUENCE_GAP, RESYNC)}
        assert broken == {(victim_id, SEQUENCE_GAP), (victim_id, RESYNC)}, kind
        assert fetched.count(victim) == 2 and all(fetched.count(p) == 1 for p in set(fetched) - {victim}), kind
        assert all(RESYNC not in c for i, c in connector.metrics().items() if i != victim_id)
        got = _by_instrument(live)
        for instrument in instruments:
            if instrument != victim_id and instrument in got:
                assert got[instrument][0] == clean[instrument][0][: len(got[instrument][0])], (kind, instrument)
