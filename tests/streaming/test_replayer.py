"""The replayer daemon over real Kafka and PostgreSQL, with the real trades of ../shared/fixtures/trades
stored through TickStore. Expected streams come from the CSV rows (tests/utils/replay.py), never from
candlekeep.replay itself."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine

from candlekeep.bars import NS_PER_S
from candlekeep.bus import KafkaBus
from candlekeep.replay import SessionState
from candlekeep.storage.replay_sessions import ReplaySessionStore
from streaming.replayer import Replayer
from tests.utils.replay import BTC, ETH, LATENESS_NS, Reader, expected_records, running, stored_trades, ticks_topic
from tests.utils.wait import eventually

BTC_START = 1_582_329_600 * NS_PER_S  # 2020-02-22 00:00 UTC; the recording runs 00:00:02 .. 02:05:47


@pytest.fixture
def kafka(kafka_bootstrap: str):
    bus = KafkaBus(kafka_bootstrap)
    yield bus
    bus.close()


def create(store: ReplaySessionStore, instruments, start_ns, end_ns, speed):
    return store.create(instruments=instruments, start_ns=start_ns, end_ns=end_ns, speed=speed,
                        lateness_ns=LATENESS_NS, max_active=8, wall_ns=time.time_ns())  # fmt: skip


def test_a_session_publishes_exactly_the_stored_ticks_in_event_time_order(engine: Engine, kafka, topic_prefix: str) -> None:
    trades = stored_trades(engine)
    store = ReplaySessionStore(engine)
    start, end = BTC_START + 60 * NS_PER_S, BTC_START + 2 * 3600 * NS_PER_S
    session = create(store, [BTC, ETH], start, end, None)
    expected = expected_records(trades, [BTC, ETH], start, end)
    assert session.trades_total == sum(1 for r in expected if hasattr(r, "price"))
    reader = Reader(kafka, ticks_topic(topic_prefix, session.id))
    with running(Replayer(kafka, engine, prefix=topic_prefix)):
        store.act(session.id, "start", wall_ns=time.time_ns())
        got = reader.until(len(expected))
        eventually(lambda: store.get(session.id).state == SessionState.FINISHED, what="finished")
    assert reader.quiet() == len(expected)
    assert got == expected
    assert [r.key for r in reader.records] == [r.instrument for r in expected]
    done = store.get(session.id)
    assert done.trades_sent == done.trades_total and done.messages_sent == len(expected)
    assert done.percent == 100.0 and done.clock.sim_ns == end + LATENESS_NS
