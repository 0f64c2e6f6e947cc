"""The stitched OHLCV read: stored bars + recent bars from Redis + the forming bar, and on-demand fetches.

    service = OhlcvService(bar_store=BarStore(engine), cache=BarCache.from_url(url))   # cache may be None
    stitched = service.read(query, limit=500)          # never fetches anything
    on_demand = OnDemand(service=service, request_fetch=..., tracked=InstrumentStore(engine).list_ids)
    stitched, fetching = on_demand.read(query, wait=10)
    stitched, fetching = await on_demand.read_async(query, wait=10)   # the API: waits on the event loop

The API (`GET /v1/ohlcv`, `/udf/history`, `WS /v1/stream`) answers through this module, so they cannot
disagree. Nothing here imports FastAPI, Kafka or `streaming/`: the API hands `OnDemand` a
`request_fetch(instrument, start, end)` that puts a `track` (start = end = None) or `fetch` command on
`control`.

Bars travel as BarRow tuples (candlekeep.bars: the decimals as PostgreSQL's text), from one pinned
connection per answer; `Stitched.bars` is a BarRows that makes a Bar only when one is read, so the
JSON encoder (candlekeep.responses) writes the rows as they came. `answer_stamp(query)` says what an
answer depends on (the API caches encoded answers under it).

Stitching rules (DESIGN.md "Bar semantics", "Redis"):
- Stored bars come from `BarStore.read_rows`: final bars already win over provisional ones in the table
  (a stream write never overwrites a final bar); 1h / 1d are the exact rollups kept with every 1m
  write, the other coarser intervals are derived from 1m in SQL.
- Recent closed 1m bars are read through Redis (`ohlcv:{instrument}:1m:{bucket}`), only for buckets
  (a) younger than the cache TTL and (b) AFTER the newest final 1m bar the database holds in the
  range (the "final watermark", one indexed scalar query). Every bucket up to the watermark comes
  from the database. So a backfill refresh, which writes final bars to PostgreSQL only, always wins
  over whatever Redis still holds; a revision by the aggregator overwrites the same key, so it is read.
  A cache miss is read from the database and written back with SET NX (never over a value the
  aggregator wrote meanwhile, which is at least as new). Redis errors make the read use the database
  alone (and Redis is skipped for `redis_retry_s`): correct, slower.
- The forming 1m bar (`ohlcv:{instrument}:1m:forming`) comes last, final=False, when its bucket lies in
  the range and after every other bar; when the database holds a *provisional* bar for that very
  bucket (the aggregator's last flush) the forming bar replaces it (it is the newer state of the same
  bucket); a *final* stored bar for it wins and the forming bar is dropped. Without Redis there is no
  separate forming bar: the aggregator's last provisional bar in the database is the newest stored bar.
- Coarser intervals: the forming 1m bar is folded into its coarse bucket by `rollup_bars` over the
  stored 1m bars of that bucket before it plus the forming bar (exactly what the SQL derivation would
  give once the minute is stored); the result, final=False, replaces the derived bar of that bucket or
  is appended. A coarse bucket held only as a stored deep-history 1h/1d bar is never mixed with 1m.
- `Stitched.forming` is the last bar when it is still open: the Redis forming bar (folded for coarse
  intervals), or, without one, a provisional last bar whose bucket has not closed yet.
- Gaps are the closed buckets of the answered window (ended at least CLOSING_S ago: a bucket the live
  feed is still closing is no gap) without a complete bar: no bar at all; a coarse bar derived from
  only some of its minutes (served only where no stored complete 1h/1d bar exists); or a bucket
  holding part of a recorded outage whose bars are not final yet (the feed missed trades there).
- `limit=N`: the first N bars of the range (SQL's LIMIT); the answered window (`Stitched.query.end`)
  then ends after the last bar returned. `countback=N`: the last N bars (TradingView's countback);
  the window then begins at the first bar returned. Either stays the range when it has fewer bars.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import anyio.to_thread
import redis

from candlekeep.bars import Bar, BarRow, BarRows, Interval, bar_row, decimal_str, missing_ranges, rollup_bars, row_bar
from candlekeep.cache import BarCache, bar_key, forming_key, version_key
from candlekeep.instruments import Instrument
from candlekeep.messages import MessageError, decode_bar
from candlekeep.query import MAX_BARS_PER_QUERY, OhlcvQuery, QueryError, build_query
from candlekeep.storage.bars import BarStore
from candlekeep.storage.outages import OutageStore

log = logging.getLogger(__name__)

# CSV exports stream from one bounded COPY: at most a leap year of 1m bars.
MAX_CSV_BARS = 366 * 1440
CSV_HEADER = "time,open,high,low,close,volume,quote_volume,trades,source,final\n"
MAX_WAIT_S = 30.0
# A bucket is closing, not missing, until this long after its end: the aggregator's lateness (2 s)
# and flush interval (0.5 s) plus the feed's own latency. No gap is reported, nor fetched, before.
CLOSING_S = 5.0
MAX_FETCHES = 16  # gaps fetched per read (the rest on the next read)

_M1 = Interval.M1


class ServingMetrics(Protocol):
    """What the service reports (the operations engineer's /metrics implements it)."""

    def cache_lookup(self, *, hits: int, misses: int) -> None: ...

    def on_demand_request(self, *, op: str) -> None: ...


@dataclass(frozen=True)
class Stitched:
    """The answer to one OHLCV question."""

    query: OhlcvQuery  # the window answered (start moves up to the first bar under `limit`)
    bars: Sequence[Bar]  # ascending, one per bucket, forming bar last (final=False) when in range; from
    # `read`, a BarRows (the encoders read its rows, no Bar made)
    gaps: list[tuple[int, int]]  # closed buckets of the window without a bar
    complete: bool
    forming: Bar | None


class OhlcvService:
    def __init__(
        self,
        *,
        bar_store: BarStore,
        cache: BarCache | None,
        clock: Callable[[], float] = time.time,
        metrics: ServingMetrics | None = None,
        redis_retry_s: float = 5.0,
        outages: OutageStore | None = None,
        closing_s: float = CLOSING_S,
    ) -> None:
        self.bar_store = bar_store
        self.outages = outages
        self.closing_s = closing_s
        self.cache = cache
        self.clock = clock
        self.metrics = metrics
        self.redis_retry_s = redis_retry_s
        self._redis_skip_until = 0.0  # monotonic; Redis is not asked before then after an error

    # -- public ------------------------------------------------------------------------------

    def read(self, query: OhlcvQuery, *, limit: int | None = None, countback: int | None = None) -> Stitched:
        """Bars of `query`: the first `limit` of the range, or the last `countback`, when given (as in
        SQL's LIMIT and TradingView's countback); never fetches anything."""
        for name, n in (("limit", limit), ("countback", countback)):
            if n is not None and not 1 <= n <= MAX_BARS_PER_QUERY:
                raise QueryError(f"{name} {n} must be between 1 and {MAX_BARS_PER_QUERY} (the cap on bars per request)")
        if limit is not None and countback is not None:
            raise QueryError("give limit or countback, not both")
        with self.bar_store.pinned():  # one connection for every read of the answer
            return self._read(query, limit, countback)

    def _read(self, query: OhlcvQuery, limit: int | None, countback: int | None) -> Stitched:
        now = int(self.clock())
        if countback is not None:
            query = self._limit_window(query, countback, now)
        elif limit is not None:
            query = self._first_window(query, limit)
        rows, forming, partial = self._stitch(query, now)
        if countback is not None and len(rows) > countback:
            rows = rows[-countback:]
            query = replace(query, start=rows[0][0])
        elif limit is not None and len(rows) > limit:
            rows = rows[:limit]
            query = replace(query, end=rows[-1][0] + query.interval.seconds)
            forming = forming if forming is not None and forming.start == rows[-1][0] else None
        closed_end = self._closed_end(query)
        gaps = self._gaps(query, [r[0] for r in rows], closed_end, partial)
        return Stitched(query, BarRows(query.instrument.id, query.interval.value, rows), gaps, not gaps, forming)

    def answer_stamp(self, query: OhlcvQuery) -> tuple | None:
        """What `read(query, ...)` depends on besides the question, read before the answer is: equal
        stamps, equal answers (candlekeep.responses caches encoded answers under it). None when it
        cannot be known (Redis failing).

        Always the instrument's bar version (bumped in every writing transaction) and outages. Redis's
        closed-bar version (bumped after every closed-bar write) when closed 1m bars of the window may
        be read through Redis (younger than its TTL). And while a bucket of the window is open or
        closing: the forming bar as Redis holds it, and the minute and closed end of the clock."""
        instrument, interval = query.instrument.id, query.interval
        stored = self.bar_store.change_stamp(instrument)
        now = int(self.clock())
        open_bucket = _M1.floor(now)
        closed_end = self._closed_end(query)
        settled = closed_end >= query.end
        cache = self._usable_cache()
        if cache is None:
            return (stored,) if settled else (stored, open_bucket, closed_end)
        through_redis = interval is _M1 and max(query.start, open_bucket - cache.closed_ttl_s) < min(query.end, open_bucket)
        if settled and not through_redis:
            return (stored,)
        try:
            version, forming = cache.client.mget([version_key(instrument), forming_key(instrument, "1m")])
        except (redis.RedisError, OSError) as exc:
            self._redis_failed(exc)
            return None
        if settled:
            return (stored, version)
        return (stored, version, forming, open_bucket, closed_end)

    def _closed_end(self, query: OhlcvQuery) -> int:
        """End of the closed buckets of `query`: those that ended at least `closing_s` ago."""
        return min(query.end, query.interval.floor(int(self.clock() - self.closing_s)))

    def _gaps(self, query: OhlcvQuery, starts: list[int], closed_end: int,
              partial: list[int] | None = None) -> list[tuple[int, int]]:  # fmt: skip
        """Closed buckets of the window that lack a complete bar: no bar; a coarse bar derived from
        only some of its minutes; a bucket holding part of an outage whose bars are not final yet
        (the feed missed some of its trades: refilled by the coordinator, then final)."""
        if closed_end <= query.start:
            return []
        interval, instrument = query.interval, query.instrument.id
        missing = missing_ranges(starts, interval, query.start, closed_end)
        bad = {b for lo, hi in missing for b in range(lo, hi, interval.seconds)}
        if partial is None:
            partial = self.bar_store.partial_buckets(instrument, interval, query.start, closed_end)
        bad.update(b for b in partial if query.start <= b < closed_end)
        bad.update(interval.floor(m) for m in self._outage_minutes(query, closed_end))
        present = [start for start in starts if start not in bad]
        return missing_ranges(present, interval, query.start, closed_end)

    def _outage_minutes(self, query: OhlcvQuery, closed_end: int) -> set[int]:
        """1m buckets of the window holding part of an outage whose bars are not final yet."""
        found: set[int] = set()
        if self.outages is None:
            return found
        instrument = query.instrument.id
        with self.bar_store.pinned() as conn:  # the answer's connection when pinned by `read`
            outages = self.outages.list(instrument=instrument, start=_utc(query.start), end=_utc(closed_end), conn=conn)
        for outage in outages:
            lo, hi = outage.refill_window(now=_utc(closed_end))
            lo, hi = max(lo, query.start), min(hi, closed_end)
            if lo < hi:
                found.update(self.bar_store.provisional_starts(instrument, lo, hi))
        return found

    def latest_start(self, instrument: str, interval: Interval) -> int | None:
        """Start of the newest bucket with data (forming bar included), at `interval`, or None."""
        interval = Interval(interval)
        candidates = [self.bar_store.latest_start(instrument, _M1)]
        if interval in (Interval.H1, Interval.D1):
            candidates.append(self.bar_store.latest_start(instrument, interval))
        forming = self._forming(instrument)
        if forming is not None:
            candidates.append(forming.start)
        found = [c for c in candidates if c is not None]
        return interval.floor(max(found)) if found else None

    def closed_gaps(self, query: OhlcvQuery) -> list[tuple[int, int]]:
        """The gaps of `query` as `read` reports them, as `[start, end)` ranges (what a CSV export
        states before its rows; bucket starts only, no bars read)."""
        closed_end = self._closed_end(query)
        if closed_end <= query.start:
            return []
        if query.interval is _M1:  # a year of minutes: through the 1h rollups, no start per bar
            missing = self.bar_store.missing_minutes(query.instrument.id, query.start, closed_end)
            bad = self._outage_minutes(query, closed_end)
            if bad:
                missing = merge_ranges([*missing, *((m, m + 60) for m in bad)])
            return missing
        starts = self.bar_store.bucket_starts(query.instrument.id, query.interval, query.start, closed_end)
        return self._gaps(query, starts, closed_end)

    def csv_chunks(self, query: OhlcvQuery, *, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """The bars of `query` as CSV (header first), in chunks: one COPY for the closed buckets,
        then the open bucket (with the forming bar) through `read`. At most MAX_CSV_BARS buckets."""
        now = int(self.clock())
        buckets = (query.end - query.start) // query.interval.seconds
        if buckets > MAX_CSV_BARS:
            raise QueryError(f"range spans {buckets} {query.interval.value} bars; at most {MAX_CSV_BARS} per CSV request")
        yield CSV_HEADER.encode()
        split = max(query.start, min(query.end, query.interval.floor(now)))
        if split > query.start:
            yield from self.bar_store.copy_csv(
                query.instrument.id, query.interval, query.start, split, chunk_bytes=chunk_bytes
            )
        if split < query.end:
            tail = self.read(replace(query, start=split))
            yield "".join(csv_line(b) for b in tail.bars).encode()

    # -- stitching ---------------------------------------------------------------------------

    def _stitch(self, query: OhlcvQuery, now: int) -> tuple[list[BarRow], Bar | None, list[int]]:
        """(rows, the forming bar or None, starts of the coarse rows derived from only some minutes)."""
        instrument, interval = query.instrument.id, query.interval
        partial: list[int] = []
        if interval is _M1:
            rows, forming_1m = self._read_1m(instrument, query.start, query.end, now)
        else:
            rows, partial = self.bar_store.read_rows_and_partial(instrument, interval, query.start, query.end,
                                                                 limit=MAX_BARS_PER_QUERY)  # fmt: skip
            forming_1m = self._forming(instrument)
        forming = None
        if forming_1m is not None and interval is not _M1:
            forming_1m = self._fold(forming_1m, interval, rows)
        if forming_1m is not None and query.start <= forming_1m.start < query.end:
            last = rows[-1] if rows else None
            if last is None or last[0] < forming_1m.start:
                rows.append(bar_row(forming_1m))
                forming = forming_1m
            elif last[0] == forming_1m.start and not last[9]:
                rows[-1] = bar_row(forming_1m)
                forming = forming_1m
        if forming is None and rows and not rows[-1][9] and rows[-1][0] >= interval.floor(now):
            forming = row_bar(instrument, interval.value, rows[-1])  # no Redis: the aggregator's last state
        return rows, forming, partial

    def _fold(self, forming: Bar, interval: Interval, derived: list[BarRow]) -> Bar | None:
        """The coarse bar of the forming minute's bucket, or None when it must not be folded."""
        coarse = interval.floor(forming.start)
        minutes = self.bar_store.read_bars(forming.instrument, _M1, coarse, forming.start + 60)
        stored_same = minutes[-1] if minutes and minutes[-1].start == forming.start else None
        if stored_same is not None and stored_same.final:
            return None  # a final bar for that minute is stored: the derived bar already has it
        minutes = [m for m in minutes if m.start < forming.start]
        if not minutes and any(r[0] == coarse for r in derived):
            return None  # that bucket is a stored deep-history bar: never mixed with 1m
        folded = next(rollup_bars([*minutes, forming], interval))
        return replace(folded, final=False)

    def _read_1m(self, instrument: str, start: int, end: int, now: int) -> tuple[list[BarRow], Bar | None]:
        """1m bars of [start, end) with recent closed buckets read through Redis, and the forming bar."""
        open_bucket = _M1.floor(now)
        cache = self._usable_cache()
        lo = max(start, open_bucket - cache.closed_ttl_s) if cache else open_bucket
        hi = min(end, open_bucket)
        read = self.bar_store.read_rows
        if cache is None or lo >= hi:
            rows = read(instrument, _M1, start, end, limit=MAX_BARS_PER_QUERY)
            return rows, self._forming(instrument) if cache else None
        watermark = self.bar_store.latest_final_start(instrument, _M1, lo, hi)
        cached_lo = lo if watermark is None else max(lo, watermark + 60)
        starts = list(range(cached_lo, hi, 60))
        try:
            raws = cache.client.mget([*(bar_key(instrument, "1m", s) for s in starts), forming_key(instrument, "1m")])
        except (redis.RedisError, OSError) as exc:
            self._redis_failed(exc)
            return read(instrument, _M1, start, end, limit=MAX_BARS_PER_QUERY), None
        hits: dict[int, BarRow] = {}
        for s, raw in zip(starts, raws, strict=False):
            if raw is not None and (b := _decode(raw, instrument, "1m")) is not None and b.start == s:
                hits[s] = bar_row(b)
        forming = _decode(raws[-1], instrument, "1m") if raws[-1] is not None else None
        misses = [s for s in starts if s not in hits]
        if self.metrics is not None:
            self.metrics.cache_lookup(hits=len(hits), misses=len(misses))
        # The database: everything before the cached window, and the span of the misses.
        db_hi = max(misses[-1] + 60, cached_lo) if misses else cached_lo
        db_lo_misses = misses[0] if misses else cached_lo
        stored = read(instrument, _M1, start, cached_lo, limit=MAX_BARS_PER_QUERY) if start < cached_lo else []
        from_db = read(instrument, _M1, db_lo_misses, db_hi, limit=MAX_BARS_PER_QUERY) if misses else []
        fill = [r for r in from_db if r[0] not in hits]
        if fill:
            self._populate(cache, [row_bar(instrument, "1m", r) for r in fill])
        tail = read(instrument, _M1, hi, end, limit=MAX_BARS_PER_QUERY) if hi < end else []
        merged = {r[0]: r for r in stored}
        merged.update((r[0], r) for r in fill)
        merged.update(hits)
        merged.update((r[0], r) for r in tail)
        return [merged[s] for s in sorted(merged)], forming

    def _populate(self, cache: BarCache, bars: list[Bar]) -> None:
        """Write database bars to their keys unless the aggregator wrote them meanwhile (SET NX)."""
        from candlekeep.messages import encode_bar

        try:
            pipe = cache.client.pipeline(transaction=False)
            for b in bars:
                pipe.set(bar_key(b.instrument, b.interval, b.start), encode_bar(b), ex=cache.closed_ttl_s, nx=True)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._redis_failed(exc)

    def _forming(self, instrument: str) -> Bar | None:
        cache = self._usable_cache()
        if cache is None:
            return None
        try:
            raw = cache.client.get(forming_key(instrument, "1m"))
        except (redis.RedisError, OSError) as exc:
            self._redis_failed(exc)
            return None
        return None if raw is None else _decode(raw, instrument, "1m")

    def _usable_cache(self) -> BarCache | None:
        if self.cache is None or time.monotonic() < self._redis_skip_until:
            return None
        return self.cache

    def _redis_failed(self, exc: BaseException) -> None:
        self._redis_skip_until = time.monotonic() + self.redis_retry_s
        log.warning("redis read failed (%s: %s): reading the database alone for %.0f s",
                    type(exc).__name__, exc, self.redis_retry_s)  # fmt: skip

    # -- limit -------------------------------------------------------------------------------

    def _first_window(self, query: OhlcvQuery, limit: int) -> OhlcvQuery:
        """A window starting at query.start holding the first `limit` bars (when the range has them)."""
        step = query.interval.seconds
        guess = min(query.end, query.start + limit * step)
        if guess == query.end:
            return query
        instrument = query.instrument.id
        if self.bar_store.count_bars(instrument, query.interval, query.start, guess) >= limit:
            return replace(query, end=guess)
        starts = self.bar_store.bucket_starts(instrument, query.interval, query.start, query.end)
        if len(starts) <= limit:
            return query
        return replace(query, end=starts[limit - 1] + step)

    def _limit_window(self, query: OhlcvQuery, limit: int, now: int) -> OhlcvQuery:
        """A window ending at query.end holding the `limit` most recent bars (when the range has them)."""
        step = query.interval.seconds
        guess = max(query.start, query.end - limit * step)
        if guess == query.start:
            return query
        instrument = query.instrument.id
        # `limit` buckets hold `limit` bars unless some are missing: then look through the range.
        if self.bar_store.count_bars(instrument, query.interval, guess, query.end) >= limit:
            return replace(query, start=guess)
        starts = self.bar_store.bucket_starts(instrument, query.interval, query.start, query.end)
        if len(starts) <= limit:
            return query
        return replace(query, start=starts[-limit])


class UnknownInstrument(LookupError):
    """The source does not know the instrument: nothing is tracked, fetched or created for it."""

    def __init__(self, instrument: str, reason: str) -> None:
        super().__init__(f"unknown instrument {instrument}: {reason}")
        self.instrument, self.reason = instrument, reason


class TrackLimitReached(Exception):
    """A requester has added as many instruments as it may (OnDemand.max_tracks_per_requester)."""


class OnDemand:
    """Reads that ask for missing data: track an untracked instrument, fetch the gaps, wait for them.

    Before an untracked instrument is tracked, `unknown(instrument)` (candlekeep.sources.listing) must
    say the source knows it; otherwise UnknownInstrument is raised and nothing is asked for. Verdicts
    are kept (known: for the process's life; unknown: `unknown_ttl_s`), so a client repeating a
    garbage instrument costs the source one call. A requester (the API's key or client address)
    may add at most `max_tracks_per_requester` instruments (TrackLimitReached beyond), counted per
    process.

    Single flight: per (instrument, start, end) — start = end = None for `track` — one request goes
    out, whatever the number of concurrent readers; the same key is not requested again for
    `refetch_after_s` (clients retrying after Retry-After do not flood the coordinator). Readers then
    poll the store every `poll_s` until the window is complete or `wait` seconds have passed.

    State: `_requested` (key -> monotonic time requested) and `_tracked` (ids, refreshed every
    `tracked_ttl_s`), both under `_lock`.
    """

    def __init__(
        self,
        *,
        request_fetch: Callable[[str, int | None, int | None], None],
        service: OhlcvService,
        tracked: Callable[[], Collection[str]],
        poll_s: float = 0.25,
        refetch_after_s: float = 60.0,
        tracked_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        unknown: Callable[[Instrument], str | None] | None = None,
        unknown_ttl_s: float = 600.0,
        max_tracks_per_requester: int | None = None,
        registered: Callable[[str], bool] | None = None,
    ) -> None:
        self.request_fetch = request_fetch
        self.registered = registered  # an instrument the platform registered already is no stranger
        self.unknown, self.unknown_ttl_s = unknown, unknown_ttl_s
        self.max_tracks_per_requester = max_tracks_per_requester
        self._verdicts: dict[str, tuple[float, str | None]] = {}  # id -> (when, reason or None)
        self._tracks_by: dict[str, set[str]] = {}  # requester -> instruments it added
        self.service = service
        self.tracked = tracked
        self.poll_s, self.refetch_after_s, self.tracked_ttl_s = poll_s, refetch_after_s, tracked_ttl_s
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._requested: dict[tuple[str, int | None, int | None], float] = {}
        self._failed: set[tuple[str, int | None, int | None]] = set()  # keys whose request failed
        self._tracked: tuple[float, frozenset[str]] | None = None
        self._reads: dict[tuple[OhlcvQuery, int | None, int | None], asyncio.Future[Stitched]] = {}
        self.requests_sent = 0

    def read(self, query: OhlcvQuery, *, wait: float = 10.0, limit: int | None = None,
             countback: int | None = None) -> tuple[Stitched, bool]:
        """(the answer, whether data was asked for on its behalf). Waits at most `wait` seconds."""
        if not 0 <= wait <= MAX_WAIT_S:
            raise QueryError(f"wait {wait} must be between 0 and {MAX_WAIT_S:.0f} seconds")
        deadline = self.clock() + wait
        stitched = self.service.read(query, limit=limit, countback=countback)
        asked = self._ask(query, stitched)
        if not asked:  # nothing will arrive: answer now
            return stitched, False
        while not stitched.complete and self.clock() + self.poll_s <= deadline:
            self.sleep(self.poll_s)
            stitched = self.service.read(query, limit=limit, countback=countback)
        return stitched, asked

    async def read_async(
        self,
        query: OhlcvQuery,
        *,
        wait: float = 10.0,
        limit: int | None = None,
        countback: int | None = None,
        waiting: Callable[[], AbstractAsyncContextManager[object]] | None = None,
        requester: str | None = None,
    ) -> tuple[Stitched, bool]:
        """`read` for an event loop: each store read and request in a worker thread, the waits on the
        loop (a waiting request holds no thread). `waiting()` is entered for the polling, only when
        there is something to wait for (the API's cap on concurrent waits)."""
        if not 0 <= wait <= MAX_WAIT_S:
            raise QueryError(f"wait {wait} must be between 0 and {MAX_WAIT_S:.0f} seconds")
        deadline = self.clock() + wait

        def read_and_ask() -> tuple[Stitched, bool]:  # one worker-thread hop for both
            answer = self.service.read(query, limit=limit, countback=countback)
            return answer, self._ask(query, answer, requester)

        stitched, asked = await anyio.to_thread.run_sync(read_and_ask)
        if not asked or stitched.complete or self.clock() + self.poll_s > deadline:
            return stitched, asked
        async with waiting() if waiting is not None else nullcontext():
            while not stitched.complete and self.clock() + self.poll_s <= deadline:
                # Sleep to the next tick of one poll grid, so that concurrent waiters of the same
                # window wake together and share one read (_read_shared) instead of one read each.
                await anyio.sleep(self.poll_s - time.monotonic() % self.poll_s)
                stitched = await self._read_shared(query, limit, countback)
        return stitched, asked

    async def _read_shared(self, query: OhlcvQuery, limit: int | None, countback: int | None) -> Stitched:
        """`service.read(query, ...)` in a worker thread, joined by every caller asking the same
        while it runs (event-loop state: `_reads`, touched only from the loop)."""
        key = (query, limit, countback)
        running = self._reads.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Stitched] = asyncio.get_running_loop().create_future()
        self._reads[key] = future
        try:
            result = await anyio.to_thread.run_sync(lambda: self.service.read(query, limit=limit, countback=countback))
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody joined
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._reads[key]

    def _ask(self, query: OhlcvQuery, stitched: Stitched, requester: str | None = None) -> bool:
        """Track an untracked instrument and fetch the gaps (once per key); True when data was asked for.
        Raises UnknownInstrument / TrackLimitReached before anything is asked for an untracked one."""
        instrument = query.instrument.id
        asked = False
        if not self._is_tracked(instrument):
            try:
                self._admit(query.instrument, requester)
            except UnknownInstrument:
                if stitched.bars:  # stored history the source does not know (any more): served as it is
                    return False
                raise
            asked |= self._once(instrument, None, None)
        for lo, hi in stitched.gaps[:MAX_FETCHES]:  # each gap alone: never refetch live-covered minutes between them
            asked |= self._once(instrument, lo, hi)
        return asked

    def _admit(self, instrument: Instrument, requester: str | None) -> None:
        """Raise unless `instrument` may be tracked on `requester`'s behalf (see the class doc)."""
        if self.unknown is not None and not (self.registered is not None and self.registered(instrument.id)):
            now = self.clock()
            with self._lock:
                verdict = self._verdicts.get(instrument.id)
            if verdict is None or (verdict[1] is not None and now - verdict[0] >= self.unknown_ttl_s):
                verdict = (now, self.unknown(instrument))  # may raise SourceError: could not ask
                with self._lock:
                    self._verdicts[instrument.id] = verdict
            if verdict[1] is not None:
                raise UnknownInstrument(instrument.id, verdict[1])
        if requester is not None and self.max_tracks_per_requester is not None:
            with self._lock:
                added = self._tracks_by.setdefault(requester, set())
                if instrument.id not in added and len(added) >= self.max_tracks_per_requester:
                    raise TrackLimitReached(
                        f"this API key (or client address) has added {len(added)} instruments, the most it may "
                        f"(CANDLEKEEP_API_MAX_TRACKS_PER_KEY); {instrument.id} is not tracked")  # fmt: skip
                added.add(instrument.id)

    def in_flight(self, instrument: str, start: int | None, end: int | None) -> bool:
        with self._lock:
            at = self._requested.get((instrument, start, end))
            return at is not None and self.clock() - at < self.refetch_after_s

    def _once(self, instrument: str, start: int | None, end: int | None) -> bool:
        """Send the request unless one for the same key is recent; True when one is in flight."""
        key = (instrument, start, end)
        now = self.clock()
        with self._lock:
            at = self._requested.get(key)
            if at is not None and now - at < self.refetch_after_s:
                return key not in self._failed
            self._requested[key] = now
            self._failed.discard(key)
            for k in [k for k, t in self._requested.items() if now - t >= self.refetch_after_s]:
                del self._requested[k]
                self._failed.discard(k)
        try:
            self.request_fetch(instrument, start, end)
        except Exception as exc:  # the key stays: not asked again before refetch_after_s
            with self._lock:
                self._failed.add(key)
            log.warning("on-demand %s of %s failed (%s: %s); answering with what is stored",
                        "track" if start is None else "fetch", instrument, type(exc).__name__, exc)  # fmt: skip
            return False
        with self._lock:
            self.requests_sent += 1
            if start is None:  # tracked from now on, as far as this process knows
                self._tracked = None
        metrics = self.service.metrics
        if metrics is not None:
            metrics.on_demand_request(op="track" if start is None else "fetch")
        return True

    def _is_tracked(self, instrument: str) -> bool:
        now = self.clock()
        with self._lock:
            cached = self._tracked
        if cached is None or now - cached[0] >= self.tracked_ttl_s:
            cached = (now, frozenset(self.tracked()))
            with self._lock:
                self._tracked = cached
        return instrument in cached[1]


# -- helpers ---------------------------------------------------------------------------------


def build_export_query(*, instrument: str, interval: str, start: str, end: str, default_venue: str = "cccagg") -> OhlcvQuery:
    """`build_query` with the CSV cap (MAX_CSV_BARS) instead of MAX_BARS_PER_QUERY."""
    return build_query(
        instrument=instrument, interval=interval, start=start, end=end, default_venue=default_venue,
        max_bars=MAX_CSV_BARS, per="CSV request",
    )


def bar_state(bar: Bar, *, now: int) -> str:
    """`final`; `forming` while its bucket is open (start <= now < end); else `provisional` (closed by
    the stream, not yet replaced by the source's final bar). On the wire beside `final`, so that a
    forming bar and a closed-but-provisional one are told apart."""
    if bar.final:
        return "final"
    return "forming" if now < bar.start + Interval(bar.interval).seconds else "provisional"


def csv_line(bar: Bar) -> str:
    trades = "" if bar.trades is None else str(bar.trades)
    source = bar.source if bar.source.isidentifier() else '"' + bar.source.replace('"', '""') + '"'
    return (
        f"{bar.start},{decimal_str(bar.open)},{decimal_str(bar.high)},{decimal_str(bar.low)},{decimal_str(bar.close)},"
        f"{decimal_str(bar.volume)},{decimal_str(bar.quote_volume)},{trades},{source},{'true' if bar.final else 'false'}\n"
    )


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`[lo, hi)` ranges sorted, overlapping and touching ones merged."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _decode(raw: bytes, instrument: str, interval: str) -> Bar | None:
    try:
        bar = decode_bar(raw)
    except MessageError as exc:
        log.warning("unreadable cached bar of %s %s ignored: %s", instrument, interval, exc)
        return None
    return bar if bar.instrument == instrument and bar.interval == interval else None


__all__: list[Any] = ["MAX_CSV_BARS", "OhlcvService", "bar_state", "OnDemand", "Stitched", "TrackLimitReached", "UnknownInstrument",
                      "build_export_query", "csv_line"]
