"""FeedRunner behaviour that is not venue-specific: REST snapshot bursts under HTTP 429 (cryptofeed
#613), heartbeats while quiet, many connections in one loop. Real recordings, loopback servers."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from candlekeep.bars import Heartbeat, Trade
from candlekeep.feeds import connector_from_listing
from candlekeep.sources.exchanges.recording import read_http
from tests.utils.exchange_replay import ReplayServer, ReplaySession, received_frames, recorded, recording_path, run_live
from tests.utils.fixture_server import FixtureServer, Received, Reply

BINANCE = {"NKNUSDT": "binance:NKN-USDT", "BLZETH": "binance:BLZ-ETH", "LRCBTC": "binance:LRC-BTC", "RUNEEUR": "binance:RUNE-EUR"}


def test_snapshot_bursts_are_spaced_and_a_429_is_retried_not_dropped() -> None:
    bodies = {}
    for r in read_http(recording_path("BINANCE.http.0.0.txt")):
        bodies[r.url.split("symbol=")[1].split("&")[0]] = r.body
    first_answer: dict[str, bool] = {}
    lock = threading.Lock()

    def depth(request: Received) -> Reply:
        symbol = request.query["symbol"]
        with lock:
            refused = symbol not in first_answer
            first_answer[symbol] = True
        if refused:  # the venue's rate limiter, as Binance answers it
            return Reply.json(json.dumps({"code": -1003, "msg": "Too many requests"}), status=429,
                              headers={"Retry-After": "1"})  # fmt: skip
        return Reply.json(bodies[symbol])

    frames = received_frames(recorded("BINANCE.ws.1.0.txt"))

    def script(session: ReplaySession) -> None:
        session.send_all(frames)

    with FixtureServer() as http, ReplayServer([script]) as ws:
        http.add_handler("/api/v3/depth", depth)
        c = connector_from_listing("binance", recording_path("BINANCE.0.txt").read_text(), list(BINANCE.values()),
                                   ws_url=ws.url, rest_url=http.url, trades=False)  # fmt: skip
        started = time.monotonic()
        records, runner = run_live(
            c, lambda rs: sum(getattr(r, "kind", "") == "synced" for r in rs) >= 4,
            snapshot_rate_per_s=4.0, snapshot_burst=1,
        )  # fmt: skip
        took = time.monotonic() - started
        calls = http.requests
    assert [r.query["symbol"] for r in calls].count("NKNUSDT") == 2  # refused once, asked again
    assert len(calls) == 8 and runner.stats["snapshot_retries"] == 4
    assert took >= 7 / 4.0  # 8 requests through a 4/s bucket of 1: >= 1.75 s, never a burst
    assert {r.instrument for r in records if getattr(r, "kind", "") == "synced"} == set(BINANCE.values())


def test_heartbeats_while_quiet_at_the_connection_exchange_clock() -> None:
    frames = received_frames(recorded("KRAKEN.ws.48.0.txt"))
    ids = ["kraken:WAVES-EUR", "kraken:XMR-USD", "kraken:KSM-BTC", "kraken:GRT-ETH", "kraken:SC-EUR",
           "kraken:ETH-CHF", "kraken:OCEAN-BTC", "kraken:OMG-USD", "kraken:BTC-CHF", "kraken:ADA-BTC"]  # fmt: skip

    def script(session: ReplaySession) -> None:
        session.expect('"subscribe"')
        session.send_all(frames)

    with ReplayServer([script]) as ws:
        c = connector_from_listing("kraken", recording_path("KRAKEN.0.txt").read_text(), ids, ws_url=ws.url,
                                   books=False)  # fmt: skip
        records, _ = run_live(c, lambda rs: sum(isinstance(r, Heartbeat) for r in rs) >= 20, heartbeat_every_s=0.1)
    trades = [r for r in records if isinstance(r, Trade)]
    clock = max(t.ts_ns for t in trades)  # every trade of the recording arrives before the first beat
    beats = [r for r in records if isinstance(r, Heartbeat)]
    assert beats and all(b.ts_ns == clock for b in beats)
    quiet = {b.instrument for b in beats}
    # an instrument whose last trade is the clock itself gets no heartbeat at that clock
    assert all(b.ts_ns > max((t.ts_ns for t in trades if t.instrument == b.instrument), default=0) for b in beats)
    assert "kraken:WAVES-EUR" in quiet


def test_many_connections_in_one_loop_do_not_wait_for_each_other() -> None:
    """Binance spreads 200 instruments per socket; with 2 per socket here, one silent socket must
    not hold back the others' records."""
    from candlekeep.sources.exchanges import binance

    frames = received_frames(recorded("BINANCE.ws.1.0.txt"))
    release = threading.Event()

    def script(session: ReplaySession) -> None:
        if "nknusdt" in session.path:
            release.wait(20)  # this venue socket stalls
        # a socket carries only the streams it subscribed (by symbol: the recording's are aggTrade)
        mine = [f for f in frames if json.loads(f)["stream"].split("@")[0] + "@" in session.path]
        session.send_all(mine)

    bodies = {r.url.split("symbol=")[1].split("&")[0]: r.body for r in read_http(recording_path("BINANCE.http.0.0.txt"))}
    old = binance.INSTRUMENTS_PER_CONNECTION
    binance.INSTRUMENTS_PER_CONNECTION = 2
    try:
        with FixtureServer() as http, ReplayServer([script]) as ws:
            for symbol, body in bodies.items():
                http.add("/api/v3/depth", Reply.json(body), query={"symbol": symbol})
            c = connector_from_listing("binance", recording_path("BINANCE.0.txt").read_text(), list(BINANCE.values()),
                                       ws_url=ws.url, rest_url=http.url)  # fmt: skip
            assert len(c.connections()) == 2

            def other_socket_synced(rs: list[Any]) -> bool:
                return any(getattr(r, "kind", "") == "synced" and r.instrument == "binance:LRC-BTC" for r in rs)

            records, _ = run_live(c, other_socket_synced, timeout=15)
            release.set()
    finally:
        binance.INSTRUMENTS_PER_CONNECTION = old
    assert not any(getattr(r, "kind", "") == "synced" and r.instrument == "binance:NKN-USDT" for r in records)


def test_resubscribes_of_a_resync_burst_respect_the_venues_send_cap() -> None:
    """Two Kraken pairs fail their checksum at once: their unsubscribe/subscribe frames go out through
    the connection's token bucket (2/s here after the initial subscribe), not all at once."""
    import dataclasses

    from candlekeep.sources.exchanges.kraken import KrakenConnector
    from tests.candlekeep.sources.exchanges.test_kraken import BOOK, INSTRUMENTS, corrupt_checksum

    frames = received_frames(recorded(BOOK))
    faulty, at_sc = corrupt_checksum(frames, "SC/EUR", 3)
    faulty, at_xmr = corrupt_checksum(faulty, "XMR/USD", 3)
    last = max(at_sc, at_xmr)

    class Capped(KrakenConnector):
        def connections(self) -> list[Any]:
            return [dataclasses.replace(spec, sends_per_s=2.0, send_burst=1) for spec in super().connections()]

    def script(session: ReplaySession) -> None:
        session.expect('"subscribe"')
        session.send_all(faulty[: last + 1])

    with ReplayServer([script]) as ws:
        listing = recording_path("KRAKEN.0.txt").read_text()
        base = connector_from_listing("kraken", listing, INSTRUMENTS)
        c = Capped(base.symbols, INSTRUMENTS, ws_url=ws.url, trades=False)
        run_live(c, lambda rs: len([f for f in ws.sessions[0].received if '"ping"' not in f]) >= 5 if ws.sessions else False,
                 timeout=30)  # fmt: skip
        session = ws.sessions[0]
        sent = [(t, json.loads(f)) for t, f in zip(session.received_at, session.received, strict=True)
                if '"ping"' not in f]  # fmt: skip
    assert [f["event"] for _, f in sent] == ["subscribe", "unsubscribe", "subscribe", "unsubscribe", "subscribe"]
    assert sorted(p for _, f in sent[1:] for p in f["pair"]) == ["SC/EUR", "SC/EUR", "XMR/USD", "XMR/USD"]
    gaps = [b[0] - a[0] for a, b in zip(sent[1:], sent[2:])]
    assert all(g >= 0.4 for g in gaps), gaps  # 2 per second


def test_app_level_pings_and_a_silent_socket_is_replaced() -> None:
    """Kraken's app-level `{"event":"ping"}` goes out on its interval (0.1 s here); a socket that
    stays silent past `silence_timeout_s` is dropped: a disconnect per instrument, a new socket,
    the subscriptions again."""
    import dataclasses

    from candlekeep.bars import Disconnect
    from candlekeep.sources.exchanges.base import PingRule
    from candlekeep.sources.exchanges.kraken import KrakenConnector
    from candlekeep.sources.exchanges.live import STARTED
    from tests.candlekeep.sources.exchanges.test_kraken import INSTRUMENTS

    class Quick(KrakenConnector):
        def connections(self) -> list[Any]:
            return [dataclasses.replace(spec, ping=PingRule(0.1, '{"event":"ping"}'), silence_timeout_s=1.0)
                    for spec in super().connections()]  # fmt: skip

    def silent(session: ReplaySession) -> None:
        session.expect('"subscribe"')  # then nothing at all

    with ReplayServer([silent]) as ws:
        base = connector_from_listing("kraken", recording_path("KRAKEN.0.txt").read_text(), INSTRUMENTS)
        c = Quick(base.symbols, INSTRUMENTS, ws_url=ws.url, books=False)
        records, runner = run_live(c, lambda rs: len(ws.sessions) >= 2 and len(ws.sessions[1].received) >= 1,
                                   timeout=20)  # fmt: skip
        first = list(ws.sessions[0].received)
    assert json.loads(first[0])["event"] == "subscribe"
    assert first.count('{"event":"ping"}') >= 5  # about ten in the silent second
    lost = [r for r in records if isinstance(r, Disconnect) and r.reason != STARTED]
    assert sorted(d.instrument for d in lost) == sorted(INSTRUMENTS) and "no frame for 1.0 s" in lost[0].reason
    assert runner.stats["silence_timeouts"] == 1 and runner.stats["connects"] == 2
