"""Order books: stored snapshots, price buckets, metrics, and their 1-minute roll-up.

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-04

Written by hand, like 0001. `book_snapshots`, `book_buckets` and `book_metrics` are keyed by
(instrument, ts[, side, price]) so the books daemon rewrites the same rows on a replay (idempotent
upserts) and time-partitioned like `ticks`:
- plain PostgreSQL: range-partitioned on `ts` by day (`book_snapshots_pYYYYMMDD`, ...), made on
  demand by `candlekeep_ensure_partitions`, which this migration teaches the three tables (today +
  7 days ahead are made here). Retention: candlekeep.storage.books.BookStore.drop_older_than drops
  whole day partitions older than CANDLEKEEP_BOOK_RETENTION_DAYS (the books daemon runs it);
- TimescaleDB: hypertables with 1-day chunks; retention likewise through `drop_chunks`.
`book_metrics_1m` (the Dagster asset's output, small) is a plain table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from alembic import op
from sqlalchemy import Connection, text

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

BOOK_SNAPSHOTS = """
CREATE TABLE book_snapshots (
    instrument text NOT NULL,
    ts timestamptz NOT NULL,
    sequence bigint,
    bids jsonb NOT NULL,
    asks jsonb NOT NULL,
    mid numeric,
    spread numeric,
    bid_depth_10 numeric NOT NULL,
    ask_depth_10 numeric NOT NULL,
    bid_depth_50 numeric NOT NULL,
    ask_depth_50 numeric NOT NULL,
    bid_depth_100 numeric NOT NULL,
    ask_depth_100 numeric NOT NULL,
    verified boolean NOT NULL,
    source text NOT NULL,
    bucket_width numeric NOT NULL,
    CONSTRAINT book_snapshots_pkey PRIMARY KEY (instrument, ts)
)"""

BOOK_BUCKETS = """
CREATE TABLE book_buckets (
    instrument text NOT NULL,
    ts timestamptz NOT NULL,
    side text NOT NULL,
    price numeric NOT NULL,
    size numeric NOT NULL,
    width numeric NOT NULL,
    intensity numeric NOT NULL,
    CONSTRAINT book_buckets_pkey PRIMARY KEY (instrument, ts, side, price),
    CONSTRAINT book_buckets_side_valid CHECK (side IN ('bid','ask'))
)"""

BOOK_METRICS = """
CREATE TABLE book_metrics (
    instrument text NOT NULL,
    ts timestamptz NOT NULL,
    mid numeric,
    spread numeric,
    imbalance_1 numeric,
    imbalance_5 numeric,
    imbalance_10 numeric,
    imbalance_10bps numeric,
    imbalance_50bps numeric,
    weighted_mid numeric,
    microprice numeric,
    CONSTRAINT book_metrics_pkey PRIMARY KEY (instrument, ts)
)"""

BOOK_METRICS_1M = """
CREATE TABLE book_metrics_1m (
    instrument text NOT NULL,
    bucket timestamptz NOT NULL,
    samples integer NOT NULL,
    mid_open numeric, mid_high numeric, mid_low numeric, mid_close numeric,
    spread_open numeric, spread_high numeric, spread_low numeric, spread_close numeric,
    imbalance_5_open numeric, imbalance_5_high numeric, imbalance_5_low numeric, imbalance_5_close numeric,
    bid_depth_50_min numeric, bid_depth_50_max numeric,
    ask_depth_50_min numeric, ask_depth_50_max numeric,
    CONSTRAINT book_metrics_1m_pkey PRIMARY KEY (instrument, bucket)
)"""

TABLES = ("book_snapshots", "book_buckets", "book_metrics")

# 0001's function, with the three book tables partitioned by day like `ticks`.
ENSURE_PARTITIONS = r"""
CREATE OR REPLACE FUNCTION candlekeep_ensure_partitions(p_table text, p_from timestamptz, p_to timestamptz)
RETURNS integer
LANGUAGE plpgsql
AS $fn$
DECLARE
    unit text;
    fmt text;
    lo timestamp;  -- UTC wall clock
    hi timestamp;
    part text;
    made integer := 0;
BEGIN
    IF p_table = 'bars' THEN
        unit := 'month'; fmt := 'YYYYMM';
    ELSIF p_table IN (__DAILY__) THEN
        unit := 'day'; fmt := 'YYYYMMDD';
    ELSE
        RAISE EXCEPTION 'candlekeep_ensure_partitions: no partition scheme for table %', p_table;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(p_table)) THEN
        RETURN 0;
    END IF;
    lo := date_trunc(unit, p_from AT TIME ZONE 'UTC');
    WHILE lo < (p_to AT TIME ZONE 'UTC') LOOP
        hi := lo + ('1 ' || unit)::interval;
        part := p_table || '_p' || to_char(lo, fmt);
        IF to_regclass(part) IS NULL THEN
            PERFORM pg_advisory_xact_lock(hashtext('candlekeep_ensure_partitions'));
            IF to_regclass(part) IS NULL THEN
                BEGIN
                    EXECUTE format(
                        'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                        part, p_table,
                        to_char(lo, 'YYYY-MM-DD HH24:MI:SS') || '+00',
                        to_char(hi, 'YYYY-MM-DD HH24:MI:SS') || '+00');
                    made := made + 1;
                EXCEPTION WHEN duplicate_table OR unique_violation THEN
                    NULL;
                END;
            END IF;
        END IF;
        lo := hi;
    END LOOP;
    RETURN made;
END
$fn$"""


def _ensure_function(daily: Sequence[str]) -> str:
    return ENSURE_PARTITIONS.replace("__DAILY__", ", ".join(f"'{t}'" for t in daily))


def upgrade() -> None:
    op.execute(_ensure_function(("ticks", *TABLES)))
    op.execute(BOOK_METRICS_1M)
    if not op.get_context().as_sql and _timescaledb(op.get_bind()):
        conn = op.get_bind()
        for ddl, table in zip((BOOK_SNAPSHOTS, BOOK_BUCKETS, BOOK_METRICS), TABLES, strict=True):
            conn.execute(text(ddl))
            conn.execute(text(f"SELECT create_hypertable('{table}', by_range('ts', INTERVAL '1 day'),"
                              " create_default_indexes => false)"))  # fmt: skip
        log.info("book_snapshots, book_buckets and book_metrics are TimescaleDB hypertables")
        return
    for ddl, table in zip((BOOK_SNAPSHOTS, BOOK_BUCKETS, BOOK_METRICS), TABLES, strict=True):
        op.execute(ddl + " PARTITION BY RANGE (ts)")
        op.execute(f"SELECT candlekeep_ensure_partitions('{table}', now(), now() + INTERVAL '7 days')")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS book_snapshots, book_buckets, book_metrics, book_metrics_1m CASCADE")
    op.execute(_ensure_function(("ticks",)))


def _timescaledb(conn: Connection) -> bool:
    """The extension is loaded when 0001 took the TimescaleDB path (it created it)."""
    return conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")).first() is not None
