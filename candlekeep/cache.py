"""The Redis bar cache (DESIGN.md "Redis"): recent closed bars, the forming bar, live updates.

    cache = BarCache.from_url("redis://127.0.0.1:6379/0")
    cache.put(closed=[bar, ...], forming=[bar, ...])    # -> True when Redis has it all now
    cache.read_bar(instrument, "1m", start) / cache.read_forming(instrument, "1m")

Keys (helpers below, so readers such as the API build the same names):
    ohlcv:{instrument}:{interval}:{bucket ISO-8601 UTC}   a recent closed bar (JSON, `closed_ttl_s`)
    ohlcv:{instrument}:{interval}:forming                 the forming bar (JSON, `forming_ttl_s`, so
                                                          a stopped writer's bar goes away)
    channel ohlcv:{instrument}:{interval}:updates         every write, published (same JSON)
    ohlcv:{instrument}:version                            a counter, incremented after every write of
                                                          closed bars of the instrument (readers of
                                                          encoded answers compare it; no TTL)
The JSON is `candlekeep.messages.encode_bar`, the `bars` topic's shape. The bucket text is
`2024-01-01T00:00:00Z`.

Redis is a cache: `put` never raises to the caller. When Redis is down it returns False, counts the
failure and keeps a bounded backlog holding the latest state of each key (the newest bar per key;
past the bound the oldest closed bars are dropped first, and counted: PostgreSQL still has them).
Writes are not attempted again before `retry_after_s` (doubling while failures go on, up to
`max_retry_after_s`, so a hanging Redis stalls the caller at most once per period); the next `put`
or `catch_up` after that writes the backlog (set and publish, closed bars oldest first, then forming
bars) and carries on as usual.

State: `_closed` / `_forming` (key -> (payload, channel, ttl), oldest first: the backlog, empty
while Redis answers), `_down_since` (monotonic time of the first failure, None while Redis
answers), `_versions` (instruments whose version is to be incremented with the backlog's next
write), `_next_try` and `_streak` (the backoff), the counters `failures`, `dropped`, `written`;
all guarded by one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from candlekeep.bars import Bar, iso_utc
from candlekeep.messages import decode_bar, encode_bar

log = logging.getLogger(__name__)

DEFAULT_CLOSED_TTL_S = 6 * 3600
DEFAULT_FORMING_TTL_S = 600


def bucket_text(start: int) -> str:
    return iso_utc(start)


def bar_key(instrument: str, interval: str, start: int) -> str:
    return f"ohlcv:{instrument}:{interval}:{bucket_text(start)}"


def forming_key(instrument: str, interval: str) -> str:
    return f"ohlcv:{instrument}:{interval}:forming"


def version_key(instrument: str) -> str:
    return f"ohlcv:{instrument}:version"


def updates_channel(instrument: str, interval: str) -> str:
    return f"ohlcv:{instrument}:{interval}:updates"


class BarCache:
    def __init__(
        self,
        client: redis.Redis,
        *,
        closed_ttl_s: int = DEFAULT_CLOSED_TTL_S,
        forming_ttl_s: int = DEFAULT_FORMING_TTL_S,
        backlog_limit: int = 10_000,
        retry_after_s: float = 1.0,
        max_retry_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if backlog_limit < 1:
            raise ValueError("backlog_limit must be positive")
        self.client = client
        self.closed_ttl_s = closed_ttl_s
        self.forming_ttl_s = forming_ttl_s
        self.backlog_limit = backlog_limit
        self.retry_after_s = retry_after_s
        self.max_retry_after_s = max_retry_after_s
        self._streak = 0  # failed attempts in a row
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (payload, channel, ttl), oldest first; closed bars are written before forming ones
        self._closed: OrderedDict[str, tuple[bytes, str, int]] = OrderedDict()
        self._forming: OrderedDict[str, tuple[bytes, str, int]] = OrderedDict()
        self._versions: set[str] = set()  # instruments whose closed bars are in the backlog
        self._down_since: float | None = None
        self._next_try = 0.0
        self.failures = 0
        self.dropped = 0
        self.written = 0
        self.last_error: str | None = None

    @classmethod
    def from_url(cls, url: str, **kw) -> BarCache:
        """A cache on a client that fails fast (1 s timeouts, no client-side retries)."""
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0))
        return cls(client, **kw)

    # -- writes ------------------------------------------------------------------------------

    def put(self, *, closed: Iterable[Bar] = (), forming: Iterable[Bar] = ()) -> bool:
        """Cache and publish `closed` and `forming` bars; True when Redis has everything now."""
        with self._lock:
            for b in closed:
                self._versions.add(b.instrument)
                key = bar_key(b.instrument, b.interval, b.start)
                self._closed[key] = (encode_bar(b), updates_channel(b.instrument, b.interval), self.closed_ttl_s)
                self._closed.move_to_end(key)
            for b in forming:
                key = forming_key(b.instrument, b.interval)
                self._forming[key] = (encode_bar(b), updates_channel(b.instrument, b.interval), self.forming_ttl_s)
                self._forming.move_to_end(key)
            self._trim()
            return self._drain()

    def catch_up(self) -> bool:
        """Write the backlog if Redis is due another try; True when nothing is left to write."""
        with self._lock:
            return self._drain()

    def _drain(self) -> bool:
        if not self._closed and not self._forming:
            return True
        if self._down_since is not None and self._clock() < self._next_try:
            return False
        items = [*self._closed.items(), *self._forming.items()]
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, (payload, channel, ttl) in items:
                pipe.set(key, payload, ex=ttl)
                pipe.publish(channel, payload)
            for instrument in sorted(self._versions):  # after the bars: a reader seeing it sees them
                pipe.incr(version_key(instrument))
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self._down_since is None:
                self._down_since = self._clock()
                log.warning("redis unavailable (%s): caching into a backlog", self.last_error,
                            extra={"error": self.last_error})  # fmt: skip
            delay = min(self.max_retry_after_s, self.retry_after_s * 2 ** min(self._streak, 16))
            self._streak += 1
            self._next_try = self._clock() + delay
            return False
        self._closed.clear()  # under the lock: nothing newer arrived meanwhile
        self._forming.clear()
        self._versions.clear()
        self.written += len(items)
        if self._down_since is not None:
            down_s = round(self._clock() - self._down_since, 3)
            log.info("redis back after %s s: %d keys written", down_s, len(items),
                     extra={"keys": len(items), "down_s": down_s})  # fmt: skip
            self._down_since = None
            self._streak = 0
        return True

    def _trim(self) -> None:
        """Past the bound, drop the oldest closed bars first (PostgreSQL has them), then forming ones."""
        while len(self._closed) + len(self._forming) > self.backlog_limit:
            (self._closed or self._forming).popitem(last=False)
            self.dropped += 1

    # -- state -------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False from a failed write until a write succeeds again."""
        return self._down_since is None

    @property
    def backlog(self) -> int:
        return len(self._closed) + len(self._forming)

    # -- reads (tests, the API) --------------------------------------------------------------

    def read_bar(self, instrument: str, interval: str, start: int) -> Bar | None:
        raw = self.client.get(bar_key(instrument, interval, start))
        return None if raw is None else decode_bar(raw)

    def read_forming(self, instrument: str, interval: str) -> Bar | None:
        raw = self.client.get(forming_key(instrument, interval))
        return None if raw is None else decode_bar(raw)

    def close(self) -> None:
        self.client.close()
