"""Backfill: stream a source's bar pages into the store, then record what each period now holds.

Plain core, called by the Dagster assets (pipelines/assets.py) and through them by `candlekeep
backfill`; it imports no Dagster. A pipeline: fetch threads (one per stream, a long range being
fetched as `FETCH_STREAMS` consecutive ranges) get the source's pages and parse them into
`BarBlock`s (CryptoCompare's straight from the JSON text, with no per-bar record), while the calling
thread writes them with `BarStore.upsert_blocks`, `BATCH_ROWS` bars per COPY transaction (fetching
waits on the network and writing on PostgreSQL, both without the GIL). Memory stays flat: at most
`PREFETCH_PAGES` pages wait, and one batch is held for its transaction. Idempotent: the store's
upserts make a second run over the same range change nothing (it reports the rows as unchanged).

Coverage (DESIGN.md "Storage"): one `coverage` row per period touched — a UTC day for intervals
below 1h, a UTC month for 1h and coarser (`day` = the period's first day) — with the rows the store
holds for that period and its status: `complete` (every bucket present), `gaps` (some missing),
`empty` (none), `open` (the period has not ended yet). Statuses describe the store, not the last
page received, so a period that an earlier run filled stays `complete`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from queue import Full, Queue
from typing import TYPE_CHECKING, TypeVar

from candlekeep.bar_block import BarBlock, blocks_from_bars
from candlekeep.bars import Interval, missing_ranges
from candlekeep.instruments import Instrument
from candlekeep.sources.base import Source

if TYPE_CHECKING:
    from candlekeep.storage.bars import BarStore
    from candlekeep.storage.coverage import CoverageStore

T = TypeVar("T")

COMPLETE, GAPS, EMPTY, OPEN = "complete", "gaps", "empty", "open"
# One transaction per BATCH_ROWS bars (whole pages); PREFETCH_PAGES pages fetched and parsed ahead
# while a batch is written. Together they bound memory (a few pages, whatever the range).
BATCH_ROWS = 4_000
PREFETCH_PAGES = 2
# A range of SPLIT_BUCKETS buckets or more (two CryptoCompare pages) is fetched as FETCH_STREAMS
# consecutive ranges side by side, so one stream's round trip overlaps another's (the rate limiter
# still spaces every call); at most one request more than a single stream.
SPLIT_BUCKETS = 4_000
FETCH_STREAMS = 2


@dataclass(frozen=True, slots=True)
class PeriodCoverage:
    """What the store holds for one coverage period after the backfill (one `coverage` row)."""

    day: date  # first day of the period
    start: int  # unix s
    end: int  # unix s, exclusive (the period's end, not clipped)
    rows: int
    status: str
    gaps: tuple[tuple[int, int], ...]  # missing `[start, end)` bucket ranges of the closed part


@dataclass(frozen=True, slots=True)
class BackfillResult:
    rows_fetched: int  # bars the source delivered (inside the clipped range)
    inserted: int
    updated: int
    unchanged: int
    gaps: list[tuple[int, int]]  # missing `[start, end)` bucket ranges of the clipped range, in the store
    source: str
    interval: str = ""
    start: int = 0  # the range actually fetched, `[start, end)`: `end` clipped to the open bucket
    end: int = 0
    periods: list[PeriodCoverage] = field(default_factory=list)  # one per coverage row recorded

    @property
    def written(self) -> int:
        return self.inserted + self.updated

    @property
    def missing_buckets(self) -> int:
        return missing_bucket_count(self.gaps, Interval(self.interval).seconds) if self.gaps else 0


def missing_bucket_count(gaps: Iterable[tuple[int, int]], seconds: int) -> int:
    """Number of buckets in `[start, end)` gap ranges of a `seconds`-long interval."""
    return sum((end - start) // seconds for start, end in gaps)


def backfill(
    *,
    source: Source,
    bar_store: BarStore,
    coverage_store: CoverageStore,
    instrument: Instrument,
    interval: Interval,
    start: int,
    end: int,
    now: int | None = None,
    on_page: Callable[[int], None] | None = None,
) -> BackfillResult:
    """Fetch `[start, end)` (unix s) of `instrument` at `interval` from `source` into the store.

    `end` is clipped to the start of the bucket open at `now` (default: the wall clock), so the open
    bucket is never stored. `on_page(n)` is called for each page of `n` bars once it is stored
    (committed: pages are written a few at a time, `BATCH_ROWS` bars per transaction).
    """
    interval = Interval(interval)
    now = int(time.time()) if now is None else now
    first = interval.ceil(start)
    stop = min(interval.ceil(end), interval.floor(now))
    fetched = 0

    def written(block: BarBlock) -> None:
        nonlocal fetched
        fetched += len(block)
        if on_page is not None:
            on_page(len(block))

    inserted = updated = unchanged = 0
    if first < stop:
        streams = [_clipped(_blocks(source, instrument, interval, lo, hi), instrument, lo, hi)
                   for lo, hi in fetch_ranges(interval, first, stop)]  # fmt: skip
        with closing(prefetched(*streams, depth=PREFETCH_PAGES)) as blocks:  # closing stops the fetching threads
            stored = bar_store.upsert_blocks(blocks, batch_rows=BATCH_ROWS, on_written=written,
                                             span=(instrument.id, interval, first, stop))  # fmt: skip
        inserted, updated, unchanged = stored.inserted, stored.updated, stored.unchanged
    periods = record_periods(
        coverage_store, bar_store, source.name, instrument, interval,
        [p for p in coverage_periods(interval, start, end) if p[0] < now], now,
    )  # fmt: skip
    # The range's gaps are the periods' gaps (read one incomplete period at a time, so memory stays flat).
    gaps = _join_ranges((max(lo, first), min(hi, stop)) for p in periods for lo, hi in p.gaps if lo < stop and hi > first)
    return BackfillResult(
        rows_fetched=fetched,
        inserted=inserted,
        updated=updated,
        unchanged=unchanged,
        gaps=gaps,
        source=source.name,
        interval=interval.value,
        start=first,
        end=max(first, stop),
        periods=periods,
    )


def _blocks(source: Source, instrument: Instrument, interval: Interval, first: int, stop: int) -> Iterator[BarBlock]:
    """The source's pages as BarBlocks: parsed straight into blocks when the source can (`bar_blocks`,
    CryptoCompare), else converted from its `Bar` pages."""
    bar_blocks = getattr(source, "bar_blocks", None)
    if bar_blocks is not None:
        yield from bar_blocks(instrument, interval, first, stop)
        return
    for page in source.bars(instrument, interval, first, stop):
        yield from blocks_from_bars(page)


def _clipped(blocks: Iterable[BarBlock], instrument: Instrument, first: int, stop: int) -> Iterator[BarBlock]:
    # A source must return only `[first, stop)` of this instrument; keep the store clean if not.
    for block in blocks:
        if block.instrument == instrument.id and (block := block.between(first, stop)):
            yield block


def prefetched(*streams: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Pull each stream of pages on a thread of its own while the caller writes.

    Fetching (network, parsing) and writing (mostly waiting on PostgreSQL, which releases the GIL)
    then overlap instead of adding up, and so do the streams' round trips; at most `depth` pages
    wait, so memory stays flat. Pages come in arrival order (each stream's in its own order). A
    source error is raised in the caller, and closing the iterator stops the threads.
    """
    queue: Queue = Queue(maxsize=depth)
    done = object()
    stopping = threading.Event()

    def put(item: object) -> bool:
        while not stopping.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def pull(pages: Iterator[T]) -> None:
        try:
            for page in pages:
                if not put(page):
                    return
            put(done)
        except BaseException as exc:  # handed to the caller, raised there
            put(exc)

    threads = [threading.Thread(target=pull, args=(s,), name="backfill-prefetch", daemon=True) for s in streams]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            item = queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stopping.set()
        for thread in threads:
            thread.join()


def fetch_ranges(interval: Interval, first: int, stop: int) -> list[tuple[int, int]]:
    """`[first, stop)` cut into the consecutive ranges fetched side by side (FETCH_STREAMS of them
    when it holds at least SPLIT_BUCKETS buckets, else one), on bucket boundaries."""
    buckets = (stop - first) // interval.seconds
    streams = FETCH_STREAMS if buckets >= SPLIT_BUCKETS else 1
    edges = [first + interval.seconds * (buckets * i // streams) for i in range(streams)] + [stop]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if lo < hi]


def _join_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ascending `[start, end)` ranges with touching neighbours (across a period edge) joined."""
    joined: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if joined and joined[-1][1] == lo:
            joined[-1] = (joined[-1][0], hi)
        else:
            joined.append((lo, hi))
    return joined


def coverage_periods(interval: Interval, start: int, end: int) -> list[tuple[int, int]]:
    """The `[start, end)` coverage periods (UTC days below 1h, UTC months from 1h) touching `[start, end)`."""
    periods = []
    cursor = _period_start(interval, start)
    while cursor < end:
        nxt = _next_period(interval, cursor)
        periods.append((cursor, nxt))
        cursor = nxt
    return periods


def _period_start(interval: Interval, ts: int) -> int:
    if Interval(interval).seconds < Interval.H1.seconds:
        return ts - ts % 86_400
    d = datetime.fromtimestamp(ts, UTC)
    return int(datetime(d.year, d.month, 1, tzinfo=UTC).timestamp())


def _next_period(interval: Interval, period_start: int) -> int:
    if Interval(interval).seconds < Interval.H1.seconds:
        return period_start + 86_400
    d = datetime.fromtimestamp(period_start, UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp())


def period_coverage(
    bar_store: BarStore, instrument: Instrument | str, interval: Interval, start: int, end: int, now: int
) -> PeriodCoverage:
    """What the store holds for the period `[start, end)` (buckets up to the one open at `now`)."""
    interval = Interval(interval)
    instrument_id = instrument if isinstance(instrument, str) else instrument.id
    closed_end = min(end, interval.floor(now))
    starts = []
    if start < closed_end:
        # stored_only: the bars written at `interval` itself, not 1h / 1d bars derived from 1m ones.
        starts = bar_store.bucket_starts(instrument_id, interval, start, closed_end, stored_only=True)
    rows = len({s for s in starts if start <= s < closed_end})
    gaps = tuple(missing_ranges(starts, interval, start, closed_end)) if start < closed_end else ()
    if end > interval.floor(now):
        status = OPEN
    elif rows == 0:
        status = EMPTY
    elif gaps:
        status = GAPS
    else:
        status = COMPLETE
    return PeriodCoverage(datetime.fromtimestamp(start, UTC).date(), start, end, rows, status, gaps)


def record_periods(
    coverage_store: CoverageStore,
    bar_store: BarStore,
    source_name: str,
    instrument: Instrument,
    interval: Interval,
    periods: Sequence[tuple[int, int]],
    now: int,
) -> list[PeriodCoverage]:
    """`period_coverage` of each `[start, end)` period, recorded as one `coverage` row each.

    One query counts every period's stored bars; only a period with some but not all of its buckets
    is read bucket by bucket (for its gaps), so a long complete range costs two statements.
    """
    closed = [(p_start, min(p_end, interval.floor(now))) for p_start, p_end in periods]
    counts = bar_store.count_stored(instrument.id, interval, closed)
    out = []
    for (p_start, p_end), (_, closed_end), rows in zip(periods, closed, counts, strict=True):
        buckets = len(range(interval.ceil(p_start), closed_end, interval.seconds))
        if 0 < rows < buckets:
            out.append(period_coverage(bar_store, instrument, interval, p_start, p_end, now))
            continue
        gaps = tuple(missing_ranges((), interval, p_start, closed_end)) if rows == 0 and buckets else ()
        status = OPEN if p_end > interval.floor(now) else EMPTY if rows == 0 else COMPLETE
        out.append(PeriodCoverage(datetime.fromtimestamp(p_start, UTC).date(), p_start, p_end, rows, status, gaps))
    coverage_store.record_many(
        [(instrument.id, interval.value, p.day, source_name, p.rows, p.status) for p in out]
    )
    return out
