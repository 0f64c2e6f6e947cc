"""Paged reads of stored ticks for replays: exchange order, any page size, bounded pages, and the
session rows' conditional progress writes, over real PostgreSQL and the real Tardis trades."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import Engine

from candlekeep.bars import NS_PER_S, decimal_str
from candlekeep.replay import Position, SessionState
from candlekeep.storage.replay_sessions import ReplaySessionStore
from candlekeep.storage.replay_source import count_trades, trade_pages
from candlekeep.storage.ticks import TickStore
from tests.utils.trades import load_tardis

BTC = "binance_futures:BTC-USDT"


@pytest.fixture
def tardis(engine: Engine) -> list:
    trades = load_tardis(BTC)
    TickStore(engine).insert_trades(trades)
    return trades


@pytest.mark.parametrize("page", [2, 3, 17, 20_000])
def test_pages_give_every_stored_trade_of_the_range_in_exchange_order(engine: Engine, tardis: list, page: int) -> None:
    lo, hi = 1_582_329_700 * NS_PER_S + 1, 1_582_333_000 * NS_PER_S
    expected = sorted((t for t in tardis if lo <= t.ts_ns // 1000 * 1000 < hi), key=lambda t: t.sort_key)
    # Several trades share one microsecond, more than a 2-row page holds: the page edge cuts groups.
    assert max(Counter(t.ts_ns for t in expected).values()) > 2
    got = list(trade_pages(engine, BTC, lo, hi, page=page))
    assert [(g.ts_ns, g.trade_id, g.price, g.size, g.side) for g in got] == [
        (t.ts_ns, t.trade_id, decimal_str(t.price), decimal_str(t.size), t.side) for t in expected]
    assert count_trades(engine, BTC, lo, hi) == len(expected)


def test_progress_after_a_seek_is_refused(engine: Engine, tardis: list) -> None:
    store = ReplaySessionStore(engine)
    start = 1_582_329_600 * NS_PER_S
    row = store.create(instruments=[BTC], start_ns=start, end_ns=start + 600 * NS_PER_S, speed=5.0,
                       lateness_ns=2 * NS_PER_S, max_active=4, wall_ns=0)  # fmt: skip
    store.act(row.id, "start", wall_ns=1)
    assert store.checkpoint(row.id, epoch=0, position=Position(start + 5, BTC, 0, "42377944"), messages=3, trades=1,
                            rate=10.0)  # fmt: skip
    store.seek(row.id, start + 300 * NS_PER_S, wall_ns=2)
    # The replayer read epoch 0; its late progress must not overwrite the seek.
    assert not store.checkpoint(row.id, epoch=0, position=Position(start + 9, BTC, 2, ""), messages=1, trades=0,
                                rate=1.0)  # fmt: skip
    after = store.get(row.id)
    assert after.position == Position.before(start + 300 * NS_PER_S) and after.seek_epoch == 1
    assert after.state == SessionState.RUNNING and after.messages_sent == 3
