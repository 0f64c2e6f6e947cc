"""The bar assets: `bars_1m` (UTC day x instrument), `bars_1h` and `bars_1d` (UTC month x instrument).

Each asset body is glue: the run's partitions → ranges per instrument → `candlekeep.backfill` →
`MaterializeResult` with rows, inserted/updated/unchanged, gaps and source, plus the results of the
checks in checks.py. A backfill over many partitions is few runs (`BackfillPolicy.multi_run`: up
to a month of days, or a year of months, per run); in a run, the keys are grouped by instrument and
consecutive periods merged, so each range is one paged stream from the source. All three assets share the concurrency pool `cryptocompare` (limit 1 in
pipelines/dagster.yaml) so runs never hit CryptoCompare in parallel. Re-running a partition changes nothing:
the store upserts, and the metadata reports the bars as unchanged.

`materialize_range` runs the same assets in-process (for `candlekeep backfill`).
"""


# No `from __future__ import annotations` here: Dagster inspects the `context` and resource
# annotations of the asset functions when they are defined.
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

import dagster as dg

from candlekeep.backfill import BackfillResult, backfill
from candlekeep.bars import Interval, iso_utc
from candlekeep.instruments import Instrument
from pipelines.checks import bar_check_specs, check_completeness, check_ohlc
from pipelines.partitions import (
    HISTORY_START,
    PartitionRange,
    bars_1m_partitions,
    bars_monthly_partitions,
    instruments_partitions,
    multi_key,
    partition_ranges,
    time_keys,
)
from pipelines.resources import CandlekeepResource

MAX_LISTED_GAPS = 10
# A backfill launched from the UI runs each instrument's consecutive partitions in chunks of this
# many per run (one paged stream each): few runs, and a failure late in a long backfill loses at
# most one chunk's materialization records (the bars are already stored; a rerun finds them unchanged).
DAYS_PER_RUN = 31
MONTHS_PER_RUN = 12
PROGRESS_EVERY_S = 5.0
POOL = "cryptocompare"
GROUP = "bars"
KINDS = {"postgres", "python"}


def fetch_bars(
    context: dg.AssetExecutionContext,
    candlekeep: CandlekeepResource,
    interval: Interval,
    partitions_def: dg.MultiPartitionsDefinition,
) -> dg.MaterializeResult:
    """Backfill every partition of this run (one paged stream per instrument range) and check it."""
    ranges = partition_ranges(context.partition_keys, partitions_def)
    source = candlekeep.make_source()
    bar_store, coverage_store = candlekeep.bar_store(), candlekeep.coverage_store()
    now = int(time.time())
    results: list[BackfillResult] = []
    for r in ranges:
        span = f"{r.instrument} {interval.value} {r.start:%Y-%m-%d}..{r.end:%Y-%m-%d} ({len(r.keys)} partitions)"
        context.log.info(f"fetching {span} from {source.name}")
        progress = _Progress(context, span)
        result = backfill(
            source=source,
            bar_store=bar_store,
            coverage_store=coverage_store,
            instrument=Instrument.parse(r.instrument),
            interval=interval,
            start=r.start_ts,
            end=r.end_ts,
            now=now,
            on_page=progress,
        )
        context.log.info(
            f"{span}: {result.rows_fetched} bars, {result.inserted} inserted, {result.updated} updated,"
            f" {result.unchanged} unchanged, {result.missing_buckets} missing"
        )
        results.append(result)
    return dg.MaterializeResult(
        metadata=_metadata(ranges, results, interval, source.name),
        check_results=[
            check_ohlc(candlekeep.engine(), ranges, interval),
            check_completeness(bar_store, ranges, interval, now=now),
        ],
    )


@dg.asset(
    partitions_def=bars_1m_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(DAYS_PER_RUN),
    pool=POOL,
    kinds=KINDS,
    group_name=GROUP,
    check_specs=bar_check_specs("bars_1m"),
)
def bars_1m(context: dg.AssetExecutionContext, candlekeep: CandlekeepResource) -> dg.MaterializeResult:
    """One-minute OHLCV bars in the `bars` table, one partition per UTC day and instrument."""
    return fetch_bars(context, candlekeep, Interval.M1, bars_1m_partitions)


@dg.asset(
    partitions_def=bars_monthly_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(MONTHS_PER_RUN),
    pool=POOL,
    kinds=KINDS,
    group_name=GROUP,
    check_specs=bar_check_specs("bars_1h"),
)
def bars_1h(context: dg.AssetExecutionContext, candlekeep: CandlekeepResource) -> dg.MaterializeResult:
    """Hourly bars as the source gives them (history older than its minute retention), per UTC month and instrument."""
    return fetch_bars(context, candlekeep, Interval.H1, bars_monthly_partitions)


@dg.asset(
    partitions_def=bars_monthly_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(MONTHS_PER_RUN),
    pool=POOL,
    kinds=KINDS,
    group_name=GROUP,
    check_specs=bar_check_specs("bars_1d"),
)
def bars_1d(context: dg.AssetExecutionContext, candlekeep: CandlekeepResource) -> dg.MaterializeResult:
    """Daily bars as the source gives them, per UTC month and instrument."""
    return fetch_bars(context, candlekeep, Interval.D1, bars_monthly_partitions)


BAR_ASSETS = {Interval.M1: bars_1m, Interval.H1: bars_1h, Interval.D1: bars_1d}


class _Progress:
    """`on_page` of a backfill: logs the bars stored so far, at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, context: dg.AssetExecutionContext, span: str) -> None:
        self.context, self.span, self.bars, self.logged = context, span, 0, time.monotonic()

    def __call__(self, bars: int) -> None:
        self.bars += bars
        if time.monotonic() - self.logged >= PROGRESS_EVERY_S:
            self.logged = time.monotonic()
            self.context.log.info(f"{self.span}: {self.bars} bars stored so far")


def _metadata(
    ranges: Sequence[PartitionRange], results: Sequence[BackfillResult], interval: Interval, source: str
) -> dict:
    gaps = [g for res in results for g in res.gaps]
    return {
        "source": source,
        "interval": interval.value,
        "ranges": ", ".join(f"{r.instrument} {r.start:%Y-%m-%d}..{r.end:%Y-%m-%d}" for r in ranges),
        "partitions": sum(len(r.keys) for r in ranges),
        "rows": sum(res.rows_fetched for res in results),
        "inserted": sum(res.inserted for res in results),
        "updated": sum(res.updated for res in results),
        "unchanged": sum(res.unchanged for res in results),
        "gaps": len(gaps),
        "missing_buckets": sum(res.missing_buckets for res in results),
        "first_gaps": dg.MetadataValue.json([[_iso(s), _iso(e)] for s, e in gaps[:MAX_LISTED_GAPS]]),
        "coverage": dg.MetadataValue.json(
            {status: sum(p.status == status for res in results for p in res.periods)
             for status in ("complete", "gaps", "empty", "open")}
        ),
    }  # fmt: skip


# --- in-process backfill (the CLI) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeSummary:
    """One in-process run of `materialize_range`: partitions `[start, end)` of one instrument."""

    run_id: str
    instrument: str
    interval: str
    start: date
    end: date  # exclusive
    partition_keys: tuple[str, ...]
    rows: int  # bars fetched from the source
    inserted: int
    updated: int
    unchanged: int
    gaps: int  # missing buckets
    gap_ranges: tuple[tuple[str, str], ...]  # the first missing `[start, end)` ranges, ISO-8601
    source: str
    checks: dict[str, bool]  # check name -> passed


def materialize_range(
    *,
    instrument: str,
    interval: Interval | str,
    start: date,
    end: date,
    source: str | None = None,
    instance: dg.DagsterInstance | None = None,
    on_partition: Callable[[str], None] | None = None,
    candlekeep: CandlekeepResource | None = None,
    partitions_per_run: int | None = None,
    log_level: str = "WARNING",
) -> list[RangeSummary]:
    """Materialize `bars_<interval>` for `instrument` over the dates `[start, end)` — `end` EXCLUSIVE.

    Runs in this process through the very asset code Dagster runs (`dagster.materialize`), in
    batches of `partitions_per_run` partitions per run (default: 31 days of 1m, 12 months of 1h/1d),
    each batch one single-run range (`dagster/asset_partition_range_start`/`_end` tags), so its
    days are fetched as one paged stream. For 1h / 1d, the months touching `[start, end)` are
    materialized whole. `on_partition(key)` is called for each partition key once its run is done.
    Dagster's console log shows `log_level` and above (the runs' events stay in the instance).

    The instrument is added to the `instruments` dynamic partitions of `instance` first. `instance`
    defaults to `DagsterInstance.get()` when DAGSTER_HOME is set, else an ephemeral instance.
    `candlekeep` defaults to `CandlekeepResource(source=source)` (the rest from `CANDLEKEEP_*`); a
    resource passed in must name the same source (or `source` be None).
    Raises `dagster.DagsterExecutionStepExecutionError` (wrapping the source's error) if a run fails.
    """
    interval = Interval(interval)
    if interval not in BAR_ASSETS:
        raise ValueError(f"interval {interval.value!r} cannot be backfilled: expected one of 1m, 1h, 1d")
    asset = BAR_ASSETS[interval]
    partitions_def = bars_1m_partitions if interval is Interval.M1 else bars_monthly_partitions
    instrument_id = Instrument.parse(instrument).id
    today = datetime.now(UTC).date()
    if start < HISTORY_START:
        raise ValueError(f"start {start} is before the history start {HISTORY_START} (CANDLEKEEP_HISTORY_START)")
    if end > date.fromordinal(today.toordinal() + 1):
        raise ValueError(f"end {end} is after tomorrow ({today} is the last partition; end is exclusive)")
    if candlekeep is None:
        candlekeep = CandlekeepResource(source=source)
    elif source is not None and source != candlekeep.source:
        raise ValueError(f"source {source!r} conflicts with the resource's source {candlekeep.source!r}")
    if instance is None:
        instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    if not instance.has_dynamic_partition(instruments_partitions.name, instrument_id):
        instance.add_dynamic_partitions(instruments_partitions.name, [instrument_id])

    keys = [str(multi_key(k, instrument_id)) for k in time_keys(partitions_def, start, end)]
    per_run = partitions_per_run or (DAYS_PER_RUN if interval is Interval.M1 else MONTHS_PER_RUN)
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    summaries = []
    for i in range(0, len(keys), per_run):
        batch = keys[i : i + per_run]
        # One key: an ordinary partition run; more: one single-run range, as a UI backfill launches it.
        tags = {} if len(batch) == 1 else {
            "dagster/asset_partition_range_start": batch[0],
            "dagster/asset_partition_range_end": batch[-1],
        }  # fmt: skip
        run = dg.materialize(
            [asset],
            partition_key=batch[0] if len(batch) == 1 else None,
            resources={"candlekeep": candlekeep},
            instance=instance,
            run_config=run_config,
            tags=tags,
        )
        summaries.append(_summary(run, asset, batch, partitions_def, instrument_id, interval))
        if on_partition is not None:
            for key in batch:
                on_partition(key)
    return summaries


def _summary(
    run: dg.ExecuteInProcessResult,
    asset: dg.AssetsDefinition,
    keys: Sequence[str],
    partitions_def: dg.MultiPartitionsDefinition,
    instrument: str,
    interval: Interval,
) -> RangeSummary:
    (r,) = partition_ranges(keys, partitions_def)
    mats = [m for m in run.asset_materializations_for_node(asset.op.name)]
    meta = {k: v.value for k, v in mats[0].metadata.items()} if mats else {}
    checks = {c.check_name: c.passed for c in run.get_asset_check_evaluations()}
    return RangeSummary(
        run_id=run.run_id,
        instrument=instrument,
        interval=interval.value,
        start=r.start.date(),
        end=r.end.date(),
        partition_keys=tuple(keys),
        rows=int(meta.get("rows", 0)),
        inserted=int(meta.get("inserted", 0)),
        updated=int(meta.get("updated", 0)),
        unchanged=int(meta.get("unchanged", 0)),
        gaps=int(meta.get("missing_buckets", 0)),
        gap_ranges=tuple(tuple(g) for g in meta.get("first_gaps", [])),
        source=str(meta.get("source", "")),
        checks=checks,
    )


def _iso(ts: int) -> str:
    return iso_utc(ts)


