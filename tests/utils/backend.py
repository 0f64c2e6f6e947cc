"""Which storage backend a test database runs on, read from the catalogs (not from the code under test).

    backend(engine)                      # "native" (declarative partitions) or "timescaledb" (hypertables)
    chunk_of(engine, "bars", instant)    # TimescaleDB: (chunk, range_start, range_end) holding `instant`
    chunk_interval(engine, "bars")       # TimescaleDB: the time dimension's chunk interval

The suite runs on either: plain PostgreSQL here (embedded), TimescaleDB when CANDLEKEEP_TEST_PG_URL
points at one. A backend-specific test checks the backend it runs on, and keeps its data assertions.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Engine, text

Backend = Literal["native", "timescaledb"]


def backend(engine: Engine) -> Backend:
    with engine.connect() as conn:
        if conn.execute(text("SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass('bars')")).first():
            return "native"
        timescale = conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")).first()
        if timescale and conn.execute(text(
                "SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = 'bars'")).first():  # fmt: skip
            return "timescaledb"
    raise AssertionError("bars is neither natively partitioned nor a hypertable")


def chunk_of(engine: Engine, table: str, instant: datetime) -> tuple[str, datetime, datetime] | None:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT format('%I.%I', chunk_schema, chunk_name), range_start, range_end"
                 " FROM timescaledb_information.chunks WHERE hypertable_name = :t"
                 " AND range_start <= :i AND :i < range_end"),
            {"t": table, "i": instant},
        ).first()  # fmt: skip
    return None if row is None else (row[0], row[1], row[2])


def chunk_interval(engine: Engine, table: str) -> timedelta:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT time_interval FROM timescaledb_information.dimensions WHERE hypertable_name = :t"),
            {"t": table},
        ).scalar_one()
