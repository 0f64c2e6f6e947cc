"""The table of contents: every asset, check, job, schedule, sensor and resource of Candlekeep's Dagster code.

Loaded by `dagster` / `dagster-webserver` through workspace.yaml (module `pipelines.definitions`).
Importing it opens no connection: the resource resolves settings and the database when a run or a
sensor tick starts. The partitions' first day is `CANDLEKEEP_HISTORY_START` (pipelines/partitions.py).
"""

from __future__ import annotations

import os

import dagster as dg

from pipelines.assets import bars_1d, bars_1h, bars_1m
from pipelines.book_assets import book_instruments_sensor, book_metrics_1m
from pipelines.resources import CandlekeepResource
from pipelines.schedules import bars_1m_job, bars_1m_refresh_schedule, bars_monthly_job, bars_monthly_refresh_schedule
from pipelines.sensors import instruments_sensor
from pipelines.views import ohlcv_1d, ohlcv_1h


def _secret(name: str) -> dg.EnvVar | None:
    """`dg.EnvVar(name)` (read at execution, shown as an env var in the UI) when set; Dagster refuses an unset one."""
    return dg.EnvVar(name) if os.environ.get(name) else None


defs = dg.Definitions(
    assets=[bars_1m, bars_1h, bars_1d, ohlcv_1h, ohlcv_1d, book_metrics_1m],  # ohlcv_*: lineage of the served views
    jobs=[bars_1m_job, bars_monthly_job],
    schedules=[bars_1m_refresh_schedule, bars_monthly_refresh_schedule],
    sensors=[instruments_sensor, book_instruments_sensor],
    resources={
        "candlekeep": CandlekeepResource(cryptocompare_api_key=_secret("CANDLEKEEP_CRYPTOCOMPARE_API_KEY")),
    },
)
