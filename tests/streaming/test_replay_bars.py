"""Session bars: the replay-bars daemon over the replayer's real output (Kafka, PostgreSQL, Redis),
against the bars of the stored real trades computed by candlekeep.bars.aggregate_trades, the
exchange-convention reference the live tests use too."""

from __future__ import annotations

import time
from dataclasses import replace

import redis
from sqlalchemy import Engine

from candlekeep.bars import NS_PER_S, Interval
from candlekeep.bus import KafkaBus
from candlekeep.messages import replay_topic
from candlekeep.replay import SessionState
from candlekeep.replay_bars import ReplayBarCache, read_replay_bars
from candlekeep.storage.replay_sessions import ReplaySessionStore
from streaming.replay_bars import ReplayBars
from streaming.replayer import Replayer
from tests.utils.net import LOOPBACK_PEER
from tests.utils.replay import BTC, ETH, LATENESS_NS, Reader, running, stored_trades
from tests.utils.trades import reference
from tests.utils.wait import eventually

START_S, END_S = 1_582_329_660, 1_582_330_020  # 00:01 .. 00:07 UTC, ETH's recording inside, BTC all along


def expected_bars(trades, instrument: str, start_s: int, end_s: int):
    inside = [t for t in trades[instrument] if start_s * NS_PER_S <= t.ts_ns < end_s * NS_PER_S]
    return [replace(b, source="replay") for b in reference(inside, start_s, end_s)]


def test_a_replayed_range_gives_the_bars_of_its_stored_ticks(engine: Engine, kafka_bootstrap: str, redis_url: str,
                                                              topic_prefix: str) -> None:  # fmt: skip
    trades = stored_trades(engine)
    store = ReplaySessionStore(engine)
    session = store.create(instruments=[BTC, ETH], start_ns=START_S * NS_PER_S, end_ns=END_S * NS_PER_S, speed=120.0,
                           lateness_ns=LATENESS_NS, max_active=8, wall_ns=time.time_ns())  # fmt: skip
    bus = KafkaBus(kafka_bootstrap)
    client = redis.Redis.from_url(redis_url)
    bars_reader = Reader(bus, replay_topic(topic_prefix, session.id, "bars"))
    daemon = ReplayBars(bus, engine, ReplayBarCache(client), prefix=topic_prefix)
    try:
        with running(Replayer(bus, engine, prefix=topic_prefix)), running(daemon):
            store.act(session.id, "start", wall_ns=time.time_ns())
            # Forming bars move with the replay clock while it runs.
            seen = eventually(lambda: read_replay_bars(client, session.id, ETH, Interval.M1, START_S, END_S)[1],
                              timeout=30, what="a forming ETH bar")  # fmt: skip
            assert START_S <= seen.start < END_S and seen.source == "replay"
            eventually(lambda: store.get(session.id).state == SessionState.FINISHED, what="finished")
            for inst in (BTC, ETH):
                want = expected_bars(trades, inst, START_S, END_S)
                eventually(lambda inst=inst, want=want: read_replay_bars(
                    client, session.id, inst, Interval.M1, START_S, END_S)[0] == want, timeout=30,
                    what=f"the session bars of {inst}")  # fmt: skip
            published = bars_reader.until(len(expected_bars(trades, BTC, START_S, END_S))
                                          + len(expected_bars(trades, ETH, START_S, END_S)))  # fmt: skip
        latest = {(b.instrument, b.start): b for b in published}
        for inst in (BTC, ETH):
            assert [latest[k] for k in sorted(latest) if k[0] == inst] == expected_bars(trades, inst, START_S, END_S)
        # Coarser bars are derived exactly from the session's minutes.
        # The 00:05 bucket is still forming: the replay's clock stopped at 00:07:02.
        five, forming = read_replay_bars(client, session.id, BTC, Interval.M5, START_S, END_S)
        minutes = expected_bars(trades, BTC, START_S, END_S)
        assert [b.start for b in five] == [1_582_329_600] and forming is not None and forming.start == 1_582_329_900
        assert (five[0].trades, forming.trades) == (sum(m.trades for m in minutes if m.start < 1_582_329_900),
                                                    sum(m.trades for m in minutes if m.start >= 1_582_329_900))
        assert five[0].open == minutes[0].open and forming.close == minutes[-1].close
        # The same bars through the live door, under the replay symbol.
        from fastapi.testclient import TestClient

        from api.main import create_app
        from candlekeep.bars import decimal_str
        from candlekeep.settings import Settings

        settings = Settings(database_url=str(engine.url.render_as_string(hide_password=False)).replace(
            "postgresql+psycopg", "postgresql"), redis_url=redis_url, api_rate_limit_per_minute=0)  # fmt: skip
        with TestClient(create_app(settings), client=LOOPBACK_PEER) as api:
            symbol = f"replay:{session.id}:{ETH}"
            answer = api.get("/v1/ohlcv", params={"instrument": symbol, "interval": "1m", "start": START_S,
                                                  "end": END_S})  # fmt: skip
            assert answer.status_code == 200, answer.text
            body = answer.json()
            want = expected_bars(trades, ETH, START_S, END_S)
            got = [b for b in body["bars"] if b["final"] is False and b["time"] < END_S]
            assert body["instrument"] == symbol and body["session"]["state"] == "finished"
            assert [(b["time"], b["open"], b["high"], b["low"], b["close"], b["volume"], b["trades"]) for b in got] == [
                (w.start, decimal_str(w.open), decimal_str(w.high), decimal_str(w.low), decimal_str(w.close),
                 decimal_str(w.volume), w.trades) for w in want]  # fmt: skip
            # Before ETH's first trade (00:01:40) there is no bar: a gap, as live.
            assert body["gaps"] == [] or body["gaps"][0]["start"] == START_S
            # And as a TradingView UDF symbol.
            info = api.get("/udf/symbols", params={"symbol": symbol}).json()
            assert info["ticker"] == symbol and info["exchange"] == "replay" and info["pricescale"] >= 10
            udf = api.get("/udf/history", params={"symbol": symbol, "resolution": "1", "from": START_S,
                                                  "to": END_S}).json()  # fmt: skip
            assert udf["s"] == "ok" and udf["t"][: len(want)] == [w.start for w in want]
            assert udf["c"][: len(want)] == [float(w.close) for w in want]
            assert api.get("/udf/symbols", params={"symbol": "replay:abcdef123456:binance:ETH-USDT"}).json() == {
                "s": "error", "errmsg": "unknown_symbol"}
            assert api.get("/v1/ohlcv", params={"instrument": "replay:abcdef123456:binance:ETH-USDT", "interval": "1m",
                                                "start": START_S, "end": END_S}).status_code == 404  # fmt: skip
            assert api.get("/v1/ohlcv", params={"instrument": f"replay:{session.id}:coinbase:SOL-USD", "interval": "1m",
                                                "start": START_S, "end": END_S}).status_code == 404  # fmt: skip
        # Never the live table.
        from sqlalchemy import text

        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM bars")).scalar_one() == 0
    finally:
        client.close()
        bus.close()


def test_a_websocket_client_sees_the_forming_bar_move_at_the_replay_speed(
        engine: Engine, kafka_bootstrap: str, redis_url: str, topic_prefix: str) -> None:  # fmt: skip
    from fastapi.testclient import TestClient

    from api.main import create_app
    from candlekeep.settings import Settings

    stored_trades(engine)
    store = ReplaySessionStore(engine)
    start_s = 1_582_329_720  # 00:02, inside ETH's recording (00:01:40 .. 00:05:07)
    session = store.create(instruments=[ETH], start_ns=start_s * NS_PER_S, end_ns=(start_s + 180) * NS_PER_S,
                           speed=30.0, lateness_ns=LATENESS_NS, max_active=8, wall_ns=time.time_ns())  # fmt: skip
    bus = KafkaBus(kafka_bootstrap)
    client = redis.Redis.from_url(redis_url)
    url = engine.url.render_as_string(hide_password=False).replace("postgresql+psycopg", "postgresql")
    settings = Settings(database_url=url, redis_url=redis_url, api_rate_limit_per_minute=0)
    first_seen: dict[int, float] = {}
    try:
        with running(Replayer(bus, engine, prefix=topic_prefix)), \
                running(ReplayBars(bus, engine, ReplayBarCache(client), prefix=topic_prefix)), \
                TestClient(create_app(settings), client=LOOPBACK_PEER) as api, \
                api.websocket_connect(f"/v1/stream?instrument=replay:{session.id}:{ETH}&interval=1m") as ws:  # fmt: skip
            assert ws.receive_json()["type"] == "live"
            store.act(session.id, "start", wall_ns=time.time_ns())
            while len(first_seen) < 4:
                msg = ws.receive_json()
                assert msg["type"] == "bar" and msg["bar"]["instrument"] == ETH and msg["bar"]["source"] == "replay"
                first_seen.setdefault(msg["bar"]["start"], time.monotonic())
    finally:
        client.close()
        bus.close()
    starts = sorted(first_seen)
    assert starts == [start_s, start_s + 60, start_s + 120, start_s + 180][: len(starts)]
    # A simulated minute is 2 s of wall time at speed 30: the next minute's bar shows up 2 s later.
    gaps = [first_seen[b] - first_seen[a] for a, b in zip(starts[1:], starts[2:])]
    assert all(1.5 <= g <= 2.6 for g in gaps), gaps
