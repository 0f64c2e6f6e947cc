"""Asset checks of the bar assets, evaluated over the partitions a run materialized.

The checks are declared on the assets as `check_specs` and their results are returned by the asset
with its materialization. Partitioned checks (`partitions_def=` on `@asset_check` / `AssetCheckSpec`)
are a preview feature in Dagster 1.13, and an `AssetCheckResult` names no partition: a run over a
range of partitions records its check results without one. So these results are asset-level and
their metadata names the partitions checked and the evidence (counts, first offending bars, gaps).

- `ohlc_consistent` (ERROR): every bar stored at the asset's interval has low <= open, close <= high,
  volumes >= 0, a non-negative trade count and a start on its interval's grid — the rules of
  `candlekeep.bars.Bar.problems`, counted in SQL over the table (one counting query per
  instrument range, however long) and explained per offending bar by `Bar.problems`;
- `complete` (WARN): every closed period (a UTC day of 1m bars, a month of 1h / 1d bars) holds all
  its buckets (1440 for a day of 1m); otherwise the missing ranges are listed. A period still open
  passes with the bars it has so far. Gaps are facts about the source, so they warn, never fail a run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC

import dagster as dg
from sqlalchemy import BigInteger, Engine, and_, cast, func, or_, select

from candlekeep.backfill import COMPLETE, EMPTY, GAPS, OPEN, coverage_periods, missing_bucket_count, period_coverage
from candlekeep.bars import Bar, Interval, iso_utc
from candlekeep.storage.tables import bars
from pipelines.partitions import PartitionRange

OHLC_CHECK = "ohlc_consistent"
COMPLETE_CHECK = "complete"
MAX_LISTED = 20  # offending bars / gap ranges / periods listed in a check's metadata


def bar_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            OHLC_CHECK,
            asset=asset,
            description="Stored bars are consistent: low <= open, close <= high; volume, quote volume, trades >= 0.",
        ),
        dg.AssetCheckSpec(
            COMPLETE_CHECK,
            asset=asset,
            description="Every closed period holds all its buckets (1440 for a day of 1m bars), or its gaps are listed.",
        ),
    ]


def check_ohlc(engine: Engine, ranges: Sequence[PartitionRange], interval: Interval) -> dg.AssetCheckResult:
    """Count the stored `interval` bars of `ranges` that `Bar.problems` would reject, in SQL."""
    interval = Interval(interval)
    checked = offending_count = 0
    offending: list[dict] = []
    with engine.connect() as conn:
        for r in ranges:
            where = and_(
                bars.c.instrument == r.instrument,
                bars.c.interval == interval.value,
                bars.c.bucket >= r.start,
                bars.c.bucket < r.end,
            )
            bad = or_(
                bars.c.low > bars.c.open, bars.c.open > bars.c.high,
                bars.c.low > bars.c.close, bars.c.close > bars.c.high,
                bars.c.volume < 0, bars.c.quote_volume < 0, bars.c.trades < 0,
                func.mod(cast(func.extract("epoch", bars.c.bucket), BigInteger), interval.seconds) != 0,
            )  # fmt: skip
            total, wrong = conn.execute(
                select(func.count(), func.count().filter(bad)).select_from(bars).where(where)
            ).one()
            checked += total
            offending_count += wrong
            if wrong and len(offending) < MAX_LISTED:
                rows = conn.execute(
                    select(bars).where(where, bad).order_by(bars.c.bucket).limit(MAX_LISTED - len(offending))
                ).mappings()
                offending.extend(_offending(row, interval) for row in rows)
    return dg.AssetCheckResult(
        check_name=OHLC_CHECK,
        passed=offending_count == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"{checked} bars consistent"
            if not offending_count
            else f"{offending_count} of {checked} bars inconsistent (first: {offending[0]['instrument']} {offending[0]['start']})"
        ),
        metadata={
            "partitions": _describe(ranges),
            "bars_checked": checked,
            "offending_bars": offending_count,
            "first_offending": dg.MetadataValue.json(offending),
        },
    )


def _offending(row, interval: Interval) -> dict:
    start = row["bucket"].timestamp()
    bar = Bar(
        row["instrument"], interval.value, int(start), row["open"], row["high"], row["low"], row["close"],
        row["volume"], row["quote_volume"], row["trades"], row["source"], row["final"], row["revision"],
    )  # fmt: skip
    problems = bar.problems() if start == int(start) else [f"start {start} is not a whole second"]
    return {
        "instrument": bar.instrument, "start": row["bucket"].astimezone(UTC).isoformat(),
        "open": str(bar.open), "high": str(bar.high), "low": str(bar.low), "close": str(bar.close),
        "volume": str(bar.volume), "quote_volume": str(bar.quote_volume), "trades": bar.trades,
        "source": bar.source, "problems": problems,
    }  # fmt: skip


def check_completeness(
    bar_store, ranges: Sequence[PartitionRange], interval: Interval, *, now: int | None = None
) -> dg.AssetCheckResult:
    """Count the buckets each period of `ranges` holds; closed periods with missing buckets fail."""
    interval = Interval(interval)
    now = int(time.time()) if now is None else now
    counts = {COMPLETE: 0, GAPS: 0, EMPTY: 0, OPEN: 0}
    present = expected = missing = 0
    gap_list: list[dict] = []
    incomplete: list[dict] = []
    for r in ranges:
        for start, end in coverage_periods(interval, r.start_ts, r.end_ts):
            if start >= now:
                continue
            period = period_coverage(bar_store, r.instrument, interval, start, end, now)
            counts[period.status] += 1
            closed_end = min(end, interval.floor(now))
            expected += max(0, (closed_end - start) // interval.seconds)
            present += period.rows
            missing += missing_bucket_count(period.gaps, interval.seconds)
            if period.status in (GAPS, EMPTY) and len(incomplete) < MAX_LISTED:
                incomplete.append({
                    "instrument": r.instrument, "period": period.day.isoformat(), "status": period.status,
                    "bars": period.rows, "expected": (end - start) // interval.seconds,
                })  # fmt: skip
            for g_start, g_end in period.gaps:
                if len(gap_list) < MAX_LISTED:
                    gap_list.append({"instrument": r.instrument, "start": _iso(g_start), "end": _iso(g_end),
                                     "buckets": (g_end - g_start) // interval.seconds})
    bad = counts[GAPS] + counts[EMPTY]
    return dg.AssetCheckResult(
        check_name=COMPLETE_CHECK,
        passed=bad == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{counts[COMPLETE]} closed periods complete, {counts[OPEN]} still open"
            if not bad
            else f"{bad} closed periods incomplete: {missing} of {expected} buckets missing"
        ),
        metadata={
            "partitions": _describe(ranges),
            "periods_complete": counts[COMPLETE],
            "periods_with_gaps": counts[GAPS],
            "periods_empty": counts[EMPTY],
            "periods_open": counts[OPEN],
            "bars_present": present,
            "bars_expected_so_far": expected,
            "buckets_missing": missing,
            "incomplete_periods": dg.MetadataValue.json(incomplete),
            "first_gaps": dg.MetadataValue.json(gap_list),
        },
    )


def _describe(ranges: Sequence[PartitionRange]) -> str:
    return ", ".join(f"{r.instrument} {r.start.date()}..{r.end.date()} (end exclusive)" for r in ranges)


def _iso(ts: int) -> str:
    return iso_utc(ts)
