"""BarCache on a real Redis: DESIGN.md keys with TTLs, pub/sub updates, and riding out a Redis outage.

The outage tests start their own `redis-server` (tests/utils/redis.py) so they can stop and restart it
on the same port.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import redis

from candlekeep.bars import Bar
from candlekeep.cache import BarCache, bar_key, forming_key, updates_channel
from candlekeep.messages import decode_bar
from tests.utils.redis import RedisServer

INST = "coinbase:BTC-USD"
T0 = 1_704_067_200  # 2024-01-01T00:00:00Z


@pytest.fixture
def own_redis(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def bar(start: int, close: str, *, trades: int = 3, revision: int = 0) -> Bar:
    price = Decimal(close)
    return Bar(INST, "1m", start, price, price + 1, price - 1, price, Decimal("1.50"), Decimal("1.50") * price,
               trades, "stream", False, revision)  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_keys_ttls_and_published_updates(redis_url: str) -> None:
    cache = BarCache.from_url(redis_url, closed_ttl_s=3600, forming_ttl_s=90)
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(updates_channel(INST, "1m"))
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"

    closed, forming = bar(T0, "42000.10"), bar(T0 + 60, "42001")
    assert cache.put(closed=[closed], forming=[forming]) is True
    assert bar_key(INST, "1m", T0) == "ohlcv:coinbase:BTC-USD:1m:2024-01-01T00:00:00Z"
    assert forming_key(INST, "1m") == "ohlcv:coinbase:BTC-USD:1m:forming"
    assert decode_bar(client.get(bar_key(INST, "1m", T0))) == closed
    assert cache.read_forming(INST, "1m") == forming and cache.read_bar(INST, "1m", T0) == closed
    assert 3590 <= client.ttl(bar_key(INST, "1m", T0)) <= 3600
    assert 80 <= client.ttl(forming_key(INST, "1m")) <= 90
    published = [decode_bar(pubsub.get_message(timeout=2)["data"]) for _ in range(2)]
    assert published == [closed, forming]
    # The bytes are the `bars` topic's JSON, decimals as exact strings.
    assert b'"close":"42000.10"' in client.get(bar_key(INST, "1m", T0))
    pubsub.close()
    client.close()


def test_redis_down_never_raises_then_catches_up_with_the_latest_state(own_redis: RedisServer) -> None:
    clock = Clock()
    cache = BarCache.from_url(own_redis.url, retry_after_s=5, backlog_limit=3, clock=clock)
    assert cache.put(forming=[bar(T0, "1")]) is True
    own_redis.stop()

    assert cache.put(closed=[bar(T0, "2")], forming=[bar(T0 + 60, "3")]) is False  # no exception
    assert not cache.available and cache.failures == 1 and cache.backlog == 2
    # Within retry_after_s nothing is tried (no stall per call); the newest state per key is kept.
    for close in ("4", "5", "6"):
        assert cache.put(forming=[bar(T0 + 60, close)]) is False
    assert cache.put(closed=[bar(T0, "7", revision=1)]) is False
    assert cache.failures == 1 and cache.backlog == 2
    # Past the bound, the oldest closed bars go first (PostgreSQL has them), counted; the forming stays.
    cache.put(closed=[bar(T0 - 120, "8"), bar(T0 - 60, "9")])
    assert cache.backlog == 3 and cache.dropped == 1
    cache.put(closed=[bar(T0 + 120, "10")])
    assert cache.backlog == 3 and cache.dropped == 2

    own_redis.start()  # empty: it lost everything, as a restarted cache may
    assert cache.catch_up() is False  # not due yet
    clock.now += 5
    assert cache.catch_up() is True
    assert cache.available and cache.backlog == 0
    assert cache.read_forming(INST, "1m").close == Decimal("6")
    assert cache.read_bar(INST, "1m", T0 - 60) == bar(T0 - 60, "9")
    assert cache.read_bar(INST, "1m", T0 + 120).close == Decimal("10")
    assert cache.read_bar(INST, "1m", T0) is None and cache.read_bar(INST, "1m", T0 - 120) is None  # dropped
    client = redis.Redis.from_url(own_redis.url)
    assert client.ttl(forming_key(INST, "1m")) > 0 and client.ttl(bar_key(INST, "1m", T0 - 60)) > 0
    client.close()


def test_writes_resume_directly_after_an_outage(own_redis: RedisServer) -> None:
    clock = Clock()
    cache = BarCache.from_url(own_redis.url, retry_after_s=1, clock=clock)
    own_redis.stop()
    assert cache.put(forming=[bar(T0, "1")]) is False
    own_redis.start()
    clock.now += 1
    assert cache.put(forming=[bar(T0, "2")]) is True  # the next put writes backlog and new state
    assert cache.read_forming(INST, "1m").close == Decimal("2")


def test_retries_back_off_while_redis_stays_down(own_redis: RedisServer) -> None:
    clock = Clock()
    cache = BarCache.from_url(own_redis.url, retry_after_s=1, max_retry_after_s=3, clock=clock)
    own_redis.stop()
    attempts = []
    for _ in range(12):  # one put every half second for six seconds
        before = cache.failures
        cache.put(forming=[bar(T0, "1")])
        if cache.failures > before:
            attempts.append(clock.now)
        clock.now += 0.5
    assert attempts == [0.0, 1.0, 3.0]  # waits of 1, 2, then capped at 3 s (the next would be at 6)
    own_redis.start()
    clock.now = 6.0
    assert cache.catch_up() is True and cache.read_forming(INST, "1m").close == Decimal("1")
