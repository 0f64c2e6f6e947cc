"""A replay session's bars in Redis (DESIGN.md "Redis": the live keys under `replay:<session>:`).

    cache = ReplayBarCache(redis_client)
    cache.put(session, closed=[bar, ...], forming=[bar, ...])   # -> True once Redis has it all
    read_replay_bars(client, session, instrument, "1m", start, end)  # -> (bars, forming | None)
    parse_replay_symbol("replay:ab12cd34ef56:binance:BTC-USDT")  # -> ("ab12cd34ef56", "binance:BTC-USDT")

Keys, exactly the live ones (candlekeep.cache) with the prefix:
    replay:<session>:ohlcv:{instrument}:1m:{bucket ISO-8601 UTC}   a closed bar (JSON, `closed_ttl_s`)
    replay:<session>:ohlcv:{instrument}:1m:forming                  the forming bar
    channel replay:<session>:ohlcv:{instrument}:1m:updates          every write, published
The JSON is `encode_bar` (the bar keeps its real instrument id, source "replay"). Session bars
never go to the `bars` table: a replay is a view of stored history, not new history. Redis is the
only store of session bars besides the `replay.<session>.bars` topic, so closed bars keep a day.
Writes that fail stay pending (the newest version per key) and go with the next put.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import redis

from candlekeep.bars import Bar, Interval, rollup_bars
from candlekeep.cache import bucket_text
from candlekeep.messages import decode_bar, encode_bar

log = logging.getLogger(__name__)

CLOSED_TTL_S = 86_400
FORMING_TTL_S = 600
_SYMBOL = re.compile(r"^replay:(?P<session>[0-9a-f]{6,32}):(?P<instrument>.+)$")


def parse_replay_symbol(text: str) -> tuple[str, str] | None:
    """`replay:<session>:<instrument>` -> (session, instrument); None for any other symbol."""
    match = _SYMBOL.match(text.strip())
    return None if match is None else (match["session"], match["instrument"])


def prefix(session: str) -> str:
    return f"replay:{session}:"


def bar_key(session: str, instrument: str, interval: str, start: int) -> str:
    return f"{prefix(session)}ohlcv:{instrument}:{interval}:{bucket_text(start)}"


def forming_key(session: str, instrument: str, interval: str) -> str:
    return f"{prefix(session)}ohlcv:{instrument}:{interval}:forming"


def updates_channel(session: str, instrument: str, interval: str) -> str:
    return f"{prefix(session)}ohlcv:{instrument}:{interval}:updates"


class ReplayBarCache:
    def __init__(self, client: redis.Redis, *, closed_ttl_s: int = CLOSED_TTL_S,
                 forming_ttl_s: int = FORMING_TTL_S) -> None:  # fmt: skip
        self.client = client
        self.closed_ttl_s, self.forming_ttl_s = closed_ttl_s, forming_ttl_s
        self._pending: dict[str, tuple[bytes, str, int]] = {}  # key -> (payload, channel, ttl), oldest first
        self.failures = 0
        self.written = 0

    def put(self, session: str, *, closed: Iterable[Bar] = (), forming: Iterable[Bar] = ()) -> bool:
        for b in closed:
            self._pending.pop(key := bar_key(session, b.instrument, b.interval, b.start), None)
            self._pending[key] = (encode_bar(b), updates_channel(session, b.instrument, b.interval), self.closed_ttl_s)
        for b in forming:
            self._pending.pop(key := forming_key(session, b.instrument, b.interval), None)
            self._pending[key] = (encode_bar(b), updates_channel(session, b.instrument, b.interval), self.forming_ttl_s)
        if not self._pending:
            return True
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, (payload, channel, ttl) in self._pending.items():
                pipe.set(key, payload, ex=ttl)
                pipe.publish(channel, payload)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self.failures += 1
            log.warning("replay bars: redis write failed (%s); %d keys pending", exc, len(self._pending))
            return False
        self.written += len(self._pending)
        self._pending.clear()
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)


def read_replay_bars(client: redis.Redis, session: str, instrument: str, interval: Interval, start: int,
                     end: int) -> tuple[list[Bar], Bar | None]:  # fmt: skip
    """The session's closed bars of `[start, end)` (derived exactly from 1m for coarser intervals),
    ascending, and its forming 1m bar rolled into `interval` when it falls in the range."""
    lo, hi = Interval.M1.floor(interval.floor(start)), interval.ceil(end)
    starts = list(range(lo, hi, 60))
    raws = client.mget([bar_key(session, instrument, "1m", s) for s in starts]) if starts else []
    minutes = [decode_bar(raw) for raw in raws if raw is not None]
    raw_forming = client.get(forming_key(session, instrument, "1m"))
    forming = decode_bar(raw_forming) if raw_forming is not None else None
    if forming is not None and not lo <= forming.start < hi:
        forming = None
    if interval is Interval.M1:
        return minutes, forming
    closed = list(rollup_bars(minutes, interval))
    if forming is None:
        return closed, None
    bucket = interval.floor(forming.start)
    members = [b for b in minutes if interval.floor(b.start) == bucket] + [forming]
    closed = [b for b in closed if b.start != bucket]
    return closed, next(rollup_bars(members, interval))
