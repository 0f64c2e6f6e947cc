"""The Definitions load and validate as the webserver and daemon load them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg

from pipelines.definitions import defs

ROOT = Path(__file__).resolve().parents[2]


def test_definitions_validate_and_hold_the_bar_assets_checks_jobs_schedules_and_sensor():
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    graph = defs.resolve_asset_graph()

    bar_keys = {dg.AssetKey(name) for name in ("bars_1m", "bars_1h", "bars_1d")}
    views = {dg.AssetKey("ohlcv_1h"), dg.AssetKey("ohlcv_1d")}  # lineage only (pipelines/views.py)
    books = {dg.AssetKey("book_metrics_1m")}  # order-book summaries (pipelines/book_assets.py)
    assert set(graph.get_all_asset_keys()) == bar_keys | views | books
    assert all(not graph.get(v).is_materializable for v in views)
    checks = {(k.asset_key.path[0], k.name) for k in graph.asset_check_keys}
    assert {c for c in checks if c[0] != "book_metrics_1m"} == {
        (asset, check) for asset in ("bars_1m", "bars_1h", "bars_1d") for check in ("ohlc_consistent", "complete")
    }
    assert any(asset == "book_metrics_1m" for asset, _ in checks)  # its completeness check
    for key in bar_keys:
        node = graph.get(key)
        assert node.assets_def.op.pool == "cryptocompare"
        assert node.backfill_policy == dg.BackfillPolicy.multi_run(31 if key.path[0] == "bars_1m" else 12)
        assert isinstance(node.partitions_def, dg.MultiPartitionsDefinition)
        assert {d.name for d in node.partitions_def.partitions_defs} == {"date", "instrument"}
    assert {j.name for j in defs.resolve_all_job_defs()} >= {"bars_1m_refresh", "bars_monthly_refresh"}
    assert {s.name for s in repo.schedule_defs} == {"bars_1m_refresh_schedule", "bars_monthly_refresh_schedule"}
    sensors = {s.name: s for s in repo.sensor_defs}
    assert set(sensors) == {"instruments_sensor", "book_instruments_sensor"}
    assert sensors["instruments_sensor"].default_status == dg.DefaultSensorStatus.RUNNING
    assert set(repo.get_top_level_resources()) == {"candlekeep"}


def test_the_workspace_loads_in_a_fresh_process_without_connecting():
    """What `dagster dev -w workspace.yaml` does first; no database URL is needed to load."""
    code = "import dagster as dg; from pipelines.definitions import defs; dg.Definitions.validate_loadable(defs); print('ok')"
    env = {"PATH": "/usr/bin:/bin", "CANDLEKEEP_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
