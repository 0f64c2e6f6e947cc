"""The repo's pipelines/dagster.yaml, as `candlekeep up` uses it: runs and events stored in PostgreSQL."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from candlekeep.storage.db import with_database
from pipelines.assets import bars_1m
from tests.pipelines.conftest import BTC

ROOT = Path(__file__).resolve().parents[2]


def dagster_storage_url(libpq_url: str) -> str:
    """The URL as dagster.yaml needs it: SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3,
    on which dagster-postgres's `NOTIFY run_events, :id` fails; `postgresql+psycopg2://` works."""
    scheme, _, rest = libpq_url.partition("://")
    assert scheme in ("postgresql", "postgres")
    return f"postgresql+psycopg2://{rest}"


@pytest.fixture
def dagster_pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh `dagster_<uuid>` database on the test server (the same form of URL: socket or TCP)."""
    name = f"dagster_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_admin_url, name)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_runs_events_and_partitions_are_stored_in_postgres(dagster_pg_url, candlekeep, tmp_path, monkeypatch):
    shutil.copyfile(ROOT / "pipelines" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("CANDLEKEEP_DAGSTER_PG_URL", dagster_storage_url(dagster_pg_url))

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config.max_concurrent_runs == 4
        assert concurrency.pool_config.default_pool_limit == 1
        assert not instance.telemetry_enabled
        instance.add_dynamic_partitions("instruments", [BTC])
        key = dg.MultiPartitionKey({"date": "2024-03-01", "instrument": BTC})
        result = dg.materialize([bars_1m], partition_key=key, resources={"candlekeep": candlekeep}, instance=instance)
        assert result.success

    with psycopg.connect(dagster_pg_url) as conn:
        status, partition = conn.execute("SELECT status, partition FROM runs WHERE run_id = %s", (result.run_id,)).fetchone()
        assert (status, partition) == ("SUCCESS", str(key))
        (materializations,) = conn.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'",
            (result.run_id,),
        ).fetchone()
        assert materializations == 1
        (instruments,) = conn.execute(
            "SELECT array_agg(partition) FROM dynamic_partitions WHERE partitions_def_name = 'instruments'"
        ).fetchone()
        assert instruments == [BTC]
