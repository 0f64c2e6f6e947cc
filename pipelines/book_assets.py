"""`book_metrics_1m`: the books daemon's stored outputs rolled up to 1-minute summaries, per UTC day x instrument.

- partitions: `daily` (pipelines/partitions.py) x `book_instruments`, a dynamic partition of the
  instruments with stored books, added by `book_instruments_sensor` from `book_snapshots`;
- body (glue): the day's stored metrics and depths (BookStore.metric_rows) -> the pure roll-up
  (candlekeep.book_analytics.rollup_minutes: mid, spread and imbalance over the top 5 levels as
  open/high/low/close, bid/ask depth within 50 bps as min/max, the sample count) -> the day's rows
  of `book_metrics_1m` replaced in one transaction. A backfill from the UI recomputes a day from
  the stored outputs and gives the same rows;
- check `complete` (WARN): every minute of a closed day holds at least one stored output (a
  minute still to come in an open day is not counted); the metadata lists the first missing
  minutes. The books daemon is outside Dagster, so a gap is a fact about the feed: it warns.
"""

# No `from __future__ import annotations`: Dagster inspects the `context` and resource annotations.
import time
from datetime import UTC, datetime, timedelta

import dagster as dg

from candlekeep.bars import NS_PER_S
from candlekeep.book_analytics import MINUTE_NS, rollup_minutes
from candlekeep.storage.books import BookStore, replace_minutes
from pipelines.partitions import DATE, INSTRUMENT, daily
from pipelines.resources import CandlekeepResource

book_instruments = dg.DynamicPartitionsDefinition(name="book_instruments")
book_metrics_1m_partitions = dg.MultiPartitionsDefinition({DATE: daily, INSTRUMENT: book_instruments})
COMPLETE_CHECK = "complete"
MAX_LISTED = 20


@dg.asset(
    partitions_def=book_metrics_1m_partitions,
    kinds={"postgres"},
    group_name="books",
    check_specs=[dg.AssetCheckSpec(COMPLETE_CHECK, asset="book_metrics_1m",
                                   description="Every minute of a closed day holds at least one stored book output.")],
)  # fmt: skip
def book_metrics_1m(context: dg.AssetExecutionContext, candlekeep: CandlekeepResource) -> dg.MaterializeResult:
    """1-minute summaries of the stored order-book outputs (book_metrics_1m), one partition per UTC day and instrument."""
    key = context.partition_key.keys_by_dimension  # type: ignore[attr-defined]
    instrument, day = key[INSTRUMENT], datetime.fromisoformat(key[DATE]).replace(tzinfo=UTC)
    start_ns = int(day.timestamp()) * NS_PER_S
    end_ns = int((day + timedelta(days=1)).timestamp()) * NS_PER_S
    engine = candlekeep.engine()
    samples = BookStore(engine).metric_rows(instrument, start_ns, end_ns)
    summaries = rollup_minutes(instrument, samples)
    rows = replace_minutes(engine, instrument, start_ns, end_ns, summaries)
    now_ns = time.time_ns()
    closed_end = min(end_ns, now_ns // MINUTE_NS * MINUTE_NS)
    have = {m.bucket_ns for m in summaries}
    missing = [b for b in range(start_ns, closed_end, MINUTE_NS) if b not in have]
    expected = max(0, (closed_end - start_ns) // MINUTE_NS)
    check = dg.AssetCheckResult(
        check_name=COMPLETE_CHECK,
        passed=not missing,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"minutes_expected": expected, "minutes_present": expected - len(missing),
                  "missing_minutes": len(missing),
                  "first_missing": [_iso(b) for b in missing[:MAX_LISTED]]},  # fmt: skip
    )
    return dg.MaterializeResult(
        metadata={"rows": rows, "samples": len(samples), "instrument": instrument, "day": key[DATE],
                  "source": "book_metrics + book_snapshots"},  # fmt: skip
        check_results=[check],
    )


@dg.sensor(minimum_interval_seconds=300)
def book_instruments_sensor(context: dg.SensorEvaluationContext, candlekeep: CandlekeepResource) -> dg.SensorResult:
    """Adds every instrument with stored books to the `book_instruments` partitions."""
    known = set(context.instance.get_dynamic_partitions(book_instruments.name))
    new = [i for i in BookStore(candlekeep.engine()).snapshot_ids() if i not in known]
    return dg.SensorResult(dynamic_partitions_requests=[book_instruments.build_add_request(new)] if new else [])


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns // NS_PER_S, UTC).isoformat().replace("+00:00", "Z")
