"""KuCoin: the recorded session (KUCOIN.ws.1.0 + its REST snapshots KUCOIN.http.0.0) replayed over
loopback WebSocket and HTTP into the live connector, checked against the venue's ticker frames."""

from __future__ import annotations

import json
from decimal import Decimal
from urllib.parse import parse_qsl, urlsplit

from candlekeep.bars import Disconnect, Trade
from candlekeep.books import BookSnapshot
from candlekeep.sources.exchanges.base import RESYNC, SEQUENCE_GAP, IntegrityEvent, listing_bodies
from candlekeep.sources.exchanges.kucoin import FULL_SNAPSHOT_PATH, SYMBOLS_URL, symbol_map, ws_url_from_bullet
from candlekeep.sources.exchanges.kucoin import KucoinConnector as _Kucoin
from candlekeep.sources.exchanges.recording import read_http
from candlekeep.feeds import normalize
from tests.utils.exchange_drive import Mirror, at_least, drive, play, published, published_at_least, records_of, sent_frames
from tests.utils.exchange_replay import ReplayServer, received_frames, recorded, recording_path, run_live
from tests.utils.fixture_server import FixtureServer, Reply

RECORDING = "KUCOIN.ws.1.0.txt"


def KucoinConnector(*args, **kwargs):  # noqa: N802 - the connector as the recording's client ran it
    """The recording's client fetched the full book (`/api/v3/...`, an authenticated session)."""
    return _Kucoin(*args, snapshot_path=FULL_SNAPSHOT_PATH, **kwargs)


def _setup():
    events = recorded(RECORDING)
    http = read_http(recording_path("KUCOIN.http.0.0.txt"))
    symbols = symbol_map(listing_bodies(recording_path("KUCOIN.0.txt").read_text())[SYMBOLS_URL])
    level2 = next(f for f in sent_frames(events) if f["topic"].startswith("/market/level2:"))
    # The instruments whose REST snapshot the recording holds (LTX-USDT's was never recorded; its
    # frames are ignored like any symbol not followed).
    recorded_symbols = {dict(parse_qsl(urlsplit(h.url).query))["symbol"] for h in http}
    instruments = [symbols.instrument(s) for s in level2["topic"].split(":", 1)[1].split(",") if s in recorded_symbols]
    return events, http, symbols, instruments


def _serve_snapshots(server: FixtureServer, http) -> None:
    for response in http:
        split = urlsplit(response.url)
        server.add(split.path, Reply.json(response.body), query=dict(parse_qsl(split.query)))


def _per_instrument(records, instruments):
    """{instrument: (its book records, its trades)} as published (the two streams race each other live)."""
    out = {i: ([], []) for i in instruments}
    for e in published(records):
        books, trades = out[e[1] if isinstance(e, tuple) else e.instrument]
        (books if isinstance(e, tuple) else trades).append(e)
    return out


def test_bullet_answer_gives_the_socket_url() -> None:
    # The shape of `POST /api/v1/bullet-public` (KuCoin docs, "Apply connect token").
    body = {"code": "200000", "data": {"token": "2neAiuYvAU6", "instanceServers": [
        {"endpoint": "wss://ws-api-spot.kucoin.com/", "encrypt": True, "protocol": "websocket",
         "pingInterval": 18000, "pingTimeout": 10000}]}}  # fmt: skip
    assert ws_url_from_bullet(body, "c1") == ("wss://ws-api-spot.kucoin.com/?token=2neAiuYvAU6&connectId=c1", 18.0)


def test_live_replay_books_equal_the_recorded_tickers_at_the_same_sequence() -> None:
    events, http, symbols, instruments = _setup()
    direct = drive(KucoinConnector(symbols, instruments, snapshot_every_s=0), events, http)

    with FixtureServer() as rest, ReplayServer([play(received_frames(events))]) as ws:
        _serve_snapshots(rest, http)
        connector = KucoinConnector(symbols, instruments, ws_url=ws.url, rest_url=rest.url, snapshot_every_s=0)
        expected = _per_instrument(records_of(direct), instruments)
        total = sum(len(books) + len(trades) for books, trades in expected.values())
        live, _ = run_live(connector, until=published_at_least(total))
    # Snapshot and frames race differently live, yet each instrument publishes exactly the same.
    assert _per_instrument(live, instruments) == expected
    offline = normalize(KucoinConnector(symbols, instruments, snapshot_every_s=0), events, http)
    assert _per_instrument(list(offline), instruments) == expected  # `feeds normalize` too

    # Independent truth: a `/market/ticker` frame carries the matching engine's sequence and its best
    # bid/ask; the book rebuilt from published records at that same sequence must show them.
    mirror, sequence, compared, wrong = Mirror(), {}, 0, []
    for step in direct:
        for record in step.records:
            mirror.apply(record)
            if hasattr(record, "sequence") and isinstance(getattr(record, "bids", None), tuple):
                sequence[record.instrument] = record.sequence
        msg = json.loads(step.frame)
        if msg.get("subject") != "trade.ticker":
            continue
        instrument = symbols.instrument(msg["topic"].split(":", 1)[1])
        data = msg["data"]
        if sequence.get(instrument) == int(data["sequence"]):
            compared += 1
            if mirror.best(instrument) != (Decimal(data["bestBid"]), Decimal(data["bestAsk"])):
                wrong.append((instrument, data["sequence"]))
    assert compared > 0 and wrong == []
    assert not any(isinstance(r, IntegrityEvent) and r.kind not in ("synced",) for r in live)
    trades = [r for r in live if isinstance(r, Trade)]
    assert trades and all(t.side in ("buy", "sell") and t.trade_id for t in trades)


def test_a_dropped_diff_resyncs_only_its_symbol() -> None:
    events, http, symbols, instruments = _setup()
    frames = received_frames(events)
    victim = "BCHSV-USDT"
    victim_id = symbols.instrument(victim)
    diffs = [i for i, f in enumerate(frames) if f'"topic":"/market/level2:{victim}"' in f]
    lost = diffs[-5]  # late in the session: the book is synced by then
    clean = drive(KucoinConnector(symbols, instruments, snapshot_every_s=0), events, http)

    with FixtureServer() as rest, ReplayServer([play([f for i, f in enumerate(frames) if i != lost])]) as ws:
        _serve_snapshots(rest, http)
        connector = KucoinConnector(symbols, instruments, ws_url=ws.url, rest_url=rest.url, snapshot_every_s=0)
        resynced = at_least(2, lambda r: isinstance(r, IntegrityEvent) and r.kind == "synced" and r.instrument == victim_id)
        live, _ = run_live(connector, until=resynced)
        fetched = [r.query["symbol"] for r in rest.requests]
    gaps = [r for r in live if isinstance(r, IntegrityEvent) and r.kind in (SEQUENCE_GAP, RESYNC)]
    assert {r.instrument for r in gaps} == {victim_id}
    assert fetched.count(victim) >= 2  # its snapshot fetched again (and nobody else's)
    assert all(fetched.count(symbols.venue_symbol(i)) <= 1 for i in instruments if i != victim_id)
    metrics = connector.metrics()
    assert metrics[victim_id][RESYNC] >= 1
    assert all(RESYNC not in counts for i, counts in metrics.items() if i != victim_id)
    # The others published what the clean recording gives them, as far as the live run got.
    expected = _per_instrument(records_of(clean), instruments)
    for instrument, records in _per_instrument(live, instruments).items():
        if instrument != victim_id:
            assert records[0] == expected[instrument][0][: len(records[0])]


def test_a_forced_disconnect_reconnects_resubscribes_and_resnapshots() -> None:
    events, http, symbols, instruments = _setup()
    frames = received_frames(events)
    half = len(frames) // 2

    def first(session) -> None:
        session.expect("subscribe")
        session.send_all(frames[:half])
        session.drop()

    with FixtureServer() as rest, ReplayServer([first, play(frames)]) as ws:
        _serve_snapshots(rest, http)
        connector = KucoinConnector(symbols, instruments, ws_url=ws.url, rest_url=rest.url, snapshot_every_s=0)
        with_snapshot = {symbols.instrument(dict(parse_qsl(urlsplit(h.url).query))["symbol"]) for h in http}
        live, runner = run_live(connector, until=lambda rs: _resnapshotted(rs) >= with_snapshot)
        second = ws.sessions[1].received
    disconnects = [r for r in live if isinstance(r, Disconnect)]
    assert {d.instrument for d in disconnects} == set(instruments)
    assert any("/market/level2:" in f for f in second) and any("/market/match:" in f for f in second)
    assert runner.stats["connects"] == 2
    # After the disconnect every book started over from a fresh snapshot: none of its deltas came
    # between the disconnect and its new snapshot.
    cut = live.index(disconnects[-1])
    fresh: set[str] = set()
    for r in live[cut:]:
        if isinstance(r, BookSnapshot):
            fresh.add(r.instrument)
        elif type(r).__name__ == "BookDelta":
            assert r.instrument in fresh


def _resnapshotted(records) -> set[str]:
    """Instruments with a book snapshot after the last disconnect (incrementally cheap enough: the
    record lists here are a few thousand long and this runs only until it holds)."""
    last = max((i for i, r in enumerate(records) if isinstance(r, Disconnect)), default=None)
    if last is None:
        return set()
    return {r.instrument for r in records[last:] if isinstance(r, BookSnapshot)}


def test_live_connects_where_the_token_answer_says() -> None:
    # Each connect first POSTs bullet-public (the docs' answer shape); the socket URL carries its token.
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    events, http, symbols, instruments = _setup()
    posts: list[str] = []

    with ReplayServer([play(received_frames(events))]) as ws:
        body = json.dumps({"code": "200000", "data": {"token": "T0KEN", "instanceServers": [
            {"endpoint": ws.url + "/endpoint", "encrypt": False, "protocol": "websocket",
             "pingInterval": 18000, "pingTimeout": 10000}]}}).encode()  # fmt: skip

        class Bullet(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                posts.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        token_server = ThreadingHTTPServer(("127.0.0.1", 0), Bullet)
        threading.Thread(target=token_server.serve_forever, daemon=True).start()
        try:
            rest_url = f"http://127.0.0.1:{token_server.server_address[1]}"
            connector = KucoinConnector(symbols, instruments, rest_url=rest_url, snapshot_every_s=0)
            assert connector.token_request("kucoin") == rest_url + "/api/v1/bullet-public"
            run_live(connector, until=at_least(1, lambda r: isinstance(r, Trade)))
            path = ws.sessions[0].path
        finally:
            token_server.shutdown()
    assert posts and posts[0] == "/api/v1/bullet-public"
    assert path == "/endpoint?token=T0KEN&connectId=candlekeep"
