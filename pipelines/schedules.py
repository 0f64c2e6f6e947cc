"""Schedules: keep the recent partitions fresh for every instrument.

- `bars_1m_refresh_schedule`, hourly at :05 UTC: yesterday and today of `bars_1m`, one run per
  (date, instrument) key — yesterday's final minutes and late revisions, today's closed minutes;
- `bars_monthly_refresh_schedule`, daily at 00:15 UTC: last month and this month of `bars_1h` and
  `bars_1d` (one run per month and instrument materializes both).

The instruments are the `instruments` dynamic partitions (kept by `sensors.instruments_sensor`).
Run keys name the tick, so a re-evaluated tick never launches the same runs twice.
"""


from datetime import UTC, date, datetime, timedelta

import dagster as dg

from pipelines.assets import bars_1d, bars_1h, bars_1m
from pipelines.partitions import instruments_partitions, multi_key

bars_1m_job = dg.define_asset_job(
    "bars_1m_refresh",
    selection=dg.AssetSelection.assets(bars_1m),
    description="Refresh bars_1m partitions (yesterday and today, per instrument).",
)

bars_monthly_job = dg.define_asset_job(
    "bars_monthly_refresh",
    selection=dg.AssetSelection.assets(bars_1h, bars_1d),
    description="Refresh bars_1h and bars_1d partitions (last month and this month, per instrument).",
)


@dg.schedule(
    job=bars_1m_job,
    cron_schedule="5 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def bars_1m_refresh_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
    """Yesterday and today of bars_1m for every instrument."""
    today = _tick(context).date()
    return _requests(context, [today - timedelta(days=1), today])


@dg.schedule(
    job=bars_monthly_job,
    cron_schedule="15 0 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def bars_monthly_refresh_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
    """Last month and this month of bars_1h and bars_1d for every instrument."""
    this_month = _tick(context).date().replace(day=1)
    last_month = (this_month - timedelta(days=1)).replace(day=1)
    return _requests(context, [last_month, this_month])


def _requests(context: dg.ScheduleEvaluationContext, days: list[date]) -> list[dg.RunRequest] | dg.SkipReason:
    instruments = sorted(context.instance.get_dynamic_partitions(instruments_partitions.name))
    if not instruments:
        return dg.SkipReason("no instruments yet: the instruments sensor adds them")
    tick = _tick(context).isoformat()
    return [
        dg.RunRequest(run_key=f"{key}@{tick}", partition_key=key)
        for instrument in instruments
        for day in days
        for key in [str(multi_key(day.isoformat(), instrument))]
    ]


def _tick(context: dg.ScheduleEvaluationContext) -> datetime:
    moment = context.scheduled_execution_time or datetime.now(UTC)
    return moment.astimezone(UTC)
