"""Backfill: stream a source's bar pages into the store, then record what each period now holds.

Plain core, called by the Dagster assets (pipelines/assets.py) and through them by `candlekeep
backfill`; it imports no Dagster. Memory stays flat: each page goes to `upsert_bars` as it arrives.
Idempotent: the store's upserts make a second run over the same range change nothing (it reports
the rows as unchanged).

Coverage (DESIGN.md "Storage"): one `coverage` row per period touched — a UTC day for intervals
below 1h, a UTC month for 1h and coarser (`day` = the period's first day) — with the rows the store
holds for that period and its status: `complete` (every bucket present), `gaps` (some missing),
`empty` (none), `open` (the period has not ended yet). Statuses describe the store, not the last
page received, so a period that an earlier run filled stays `complete`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from queue import Full, Queue
from typing import TYPE_CHECKING

from candlekeep.bars import Bar, Interval, missing_ranges
from candlekeep.instruments import Instrument
from candlekeep.sources.base import Source

if TYPE_CHECKING:
    from candlekeep.storage.bars import BarStore
    from candlekeep.storage.coverage import CoverageStore

COMPLETE, GAPS, EMPTY, OPEN = "complete", "gaps", "empty", "open"


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
    bucket is never stored. `on_page(n)` is called after each page of `n` bars is stored.
    """
    interval = Interval(interval)
    now = int(time.time()) if now is None else now
    first = interval.ceil(start)
    stop = min(interval.ceil(end), interval.floor(now))
    inserted = updated = unchanged = fetched = 0
    if first < stop:
        for page in prefetched(source.bars(instrument, interval, first, stop)):
            # A source must return only `[first, stop)` of this instrument; keep the store clean if not.
            bars = [b for b in page if first <= b.start < stop and b.instrument == instrument.id]
            if bars:
                result = bar_store.upsert_bars(bars)
                inserted += result.inserted
                updated += result.updated
                unchanged += result.unchanged
                fetched += len(bars)
            if on_page is not None:
                on_page(len(bars))
    periods = [
        _record_period(coverage_store, bar_store, source.name, instrument, interval, p_start, p_end, now)
        for p_start, p_end in coverage_periods(interval, start, end)
        if p_start < now
    ]
    # The range's gaps are the periods' gaps (queried one period at a time, so memory stays flat).
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


def prefetched(pages: Iterator[list[Bar]], depth: int = 2) -> Iterator[list[Bar]]:
    """Pull the next pages on a thread while the caller writes this one.

    Fetching (network, parsing) and writing (mostly waiting on PostgreSQL, which releases the GIL)
    then overlap instead of adding up; at most `depth` pages wait, so memory stays flat. A source
    error is raised in the caller, and closing the iterator stops the thread.
    """
    queue: Queue = Queue(maxsize=depth)
    done = object()
    closing = threading.Event()

    def put(item: object) -> bool:
        while not closing.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def pull() -> None:
        try:
            for page in pages:
                if not put(page):
                    return
            put(done)
        except BaseException as exc:  # handed to the caller, raised there
            put(exc)

    thread = threading.Thread(target=pull, name="backfill-prefetch", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closing.set()
        thread.join()


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


def _record_period(
    coverage_store: CoverageStore,
    bar_store: BarStore,
    source_name: str,
    instrument: Instrument,
    interval: Interval,
    start: int,
    end: int,
    now: int,
) -> PeriodCoverage:
    period = period_coverage(bar_store, instrument, interval, start, end, now)
    coverage_store.record(
        instrument=instrument.id,
        interval=interval.value,
        day=period.day,
        source=source_name,
        rows=period.rows,
        status=period.status,
    )
    return period
