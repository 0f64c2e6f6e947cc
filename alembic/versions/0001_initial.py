"""Initial schema: instruments, bars, ticks, coverage, and the partition function.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written by hand (autogenerate does not emit partitioning). Two paths, chosen at upgrade time:

- plain PostgreSQL (>= 15): `bars` is range-partitioned on `bucket` by month (`bars_pYYYYMM`),
  `ticks` on `ts` by day (`ticks_pYYYYMMDD`). `candlekeep_ensure_partitions(table, from, to)`
  creates missing partitions; writers call it through candlekeep.storage.partitions, and this
  migration makes this month + 3 ahead (bars) and today + 7 days ahead (ticks).
- TimescaleDB available (`pg_available_extensions`) and loadable: `bars` / `ticks` are hypertables
  (7-day / 1-day chunks). Then each TSL feature is tried in its own SAVEPOINT and skipped, with a
  log line, under the Apache-only license: continuous aggregates `bars_1h_cagg` / `bars_1d_cagg`
  over 1m bars (real-time, refresh policies) and compression of bars chunks older than 30 days.
  candlekeep.storage.db.storage_features() reports what was enabled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from alembic import op
from sqlalchemy import Connection, text

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

INSTRUMENTS = """
CREATE TABLE instruments (
    id text PRIMARY KEY,
    venue text NOT NULL,
    base text NOT NULL,
    quote text NOT NULL,
    tracked boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
)"""

BARS = """
CREATE TABLE bars (
    instrument text NOT NULL,
    "interval" text NOT NULL,
    bucket timestamptz NOT NULL,
    open numeric NOT NULL,
    high numeric NOT NULL,
    low numeric NOT NULL,
    close numeric NOT NULL,
    volume numeric NOT NULL,
    quote_volume numeric NOT NULL,
    trades integer,
    source text NOT NULL,
    final boolean NOT NULL,
    revision integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT bars_pkey PRIMARY KEY (instrument, "interval", bucket),
    CONSTRAINT bars_interval_valid CHECK ("interval" IN ('1m','5m','15m','30m','1h','4h','1d'))
)"""

TICKS = """
CREATE TABLE ticks (
    instrument text NOT NULL,
    ts timestamptz NOT NULL,
    trade_id text NOT NULL,
    price numeric NOT NULL,
    size numeric NOT NULL,
    side text NOT NULL,
    source text NOT NULL,
    CONSTRAINT ticks_instrument_ts_trade_id_key UNIQUE (instrument, ts, trade_id),
    CONSTRAINT ticks_side_valid CHECK (side IN ('buy','sell','unknown'))
)"""

COVERAGE = """
CREATE TABLE coverage (
    instrument text NOT NULL,
    "interval" text NOT NULL,
    day date NOT NULL,
    source text NOT NULL,
    rows integer NOT NULL,
    status text NOT NULL,
    fetched_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT coverage_pkey PRIMARY KEY (instrument, "interval", day, source),
    CONSTRAINT coverage_status_valid CHECK (status IN ('complete','gaps','empty','open'))
)"""

# Periods are UTC whatever the session time zone. A hypertable or plain table is left alone (0).
# Concurrent callers are serialized by an advisory lock, and a partition made meanwhile by another
# session is not an error.
ENSURE_PARTITIONS = r"""
CREATE FUNCTION candlekeep_ensure_partitions(p_table text, p_from timestamptz, p_to timestamptz)
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
    ELSIF p_table = 'ticks' THEN
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

# A 1m bar without trades sits at the previous close; rolled up, it only carries the close
# (candlekeep.bars.rollup_bars). Written without FILTER so older continuous aggregates accept it.
FLAT = "(volume = 0 AND open = high AND high = low AND low = close)"
CAGG = f"""
CREATE MATERIALIZED VIEW {{name}}
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT instrument,
       time_bucket(INTERVAL '{{width}}', bucket) AS bucket,
       CASE WHEN bool_or(NOT {FLAT})
            THEN first(open, CASE WHEN {FLAT} THEN 'infinity'::timestamptz ELSE bucket END)
            ELSE last(close, bucket) END AS open,
       coalesce(max(CASE WHEN NOT {FLAT} THEN high END), last(close, bucket)) AS high,
       coalesce(min(CASE WHEN NOT {FLAT} THEN low END), last(close, bucket)) AS low,
       last(close, bucket) AS close,
       sum(volume) AS volume,
       sum(quote_volume) AS quote_volume,
       CASE WHEN count(trades) = count(*) THEN sum(trades) END AS trades,
       CASE WHEN min(source) = max(source) THEN min(source) ELSE 'mixed' END AS source,
       bool_and(final) AS final,
       max(revision) AS revision
FROM bars
WHERE "interval" = '1m'
GROUP BY instrument, time_bucket(INTERVAL '{{width}}', bucket)
WITH NO DATA"""


def upgrade() -> None:
    op.execute(INSTRUMENTS)
    op.execute(COVERAGE)
    op.execute(ENSURE_PARTITIONS)
    if not op.get_context().as_sql and _timescaledb(op.get_bind()):
        _upgrade_timescaledb(op.get_bind())
        return
    op.execute(BARS + " PARTITION BY RANGE (bucket)")
    op.execute(TICKS + " PARTITION BY RANGE (ts)")
    op.execute("SELECT candlekeep_ensure_partitions('bars', now(), now() + INTERVAL '3 months')")
    op.execute("SELECT candlekeep_ensure_partitions('ticks', now(), now() + INTERVAL '7 days')")


def downgrade() -> None:
    # Continuous aggregates first (they depend on bars); their policies go with them, and the
    # compression policy goes with the hypertable. The timescaledb extension itself is left.
    op.execute("DROP MATERIALIZED VIEW IF EXISTS bars_1d_cagg CASCADE")
    op.execute("DROP MATERIALIZED VIEW IF EXISTS bars_1h_cagg CASCADE")
    op.execute("DROP TABLE IF EXISTS ticks, bars, coverage, instruments CASCADE")
    op.execute("DROP FUNCTION IF EXISTS candlekeep_ensure_partitions(text, timestamptz, timestamptz)")


def _timescaledb(conn: Connection) -> bool:
    if conn.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")).first() is None:
        return False
    # Available is not loadable: it must be in shared_preload_libraries, and we may lack the rights.
    return _attempt(conn, "TimescaleDB extension", ["CREATE EXTENSION IF NOT EXISTS timescaledb"])


def _upgrade_timescaledb(conn: Connection) -> None:
    conn.execute(text(BARS))
    conn.execute(text(TICKS))
    conn.execute(
        text(
            "SELECT create_hypertable('bars', by_range('bucket', INTERVAL '7 days'),"
            " create_default_indexes => false)"
        )
    )
    conn.execute(
        text("SELECT create_hypertable('ticks', by_range('ts', INTERVAL '1 day'), create_default_indexes => false)")
    )
    log.info("bars and ticks are TimescaleDB hypertables")
    # TSL features: each fails with "not supported under the current 'apache' license" there.
    _attempt(
        conn,
        "continuous aggregates bars_1h_cagg / bars_1d_cagg",
        [
            CAGG.format(name="bars_1h_cagg", width="1 hour"),
            CAGG.format(name="bars_1d_cagg", width="1 day"),
            # start_offset NULL: the whole history; refreshes only touch invalidated buckets.
            "SELECT add_continuous_aggregate_policy('bars_1h_cagg', start_offset => NULL,"
            " end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '15 minutes')",
            "SELECT add_continuous_aggregate_policy('bars_1d_cagg', start_offset => NULL,"
            " end_offset => INTERVAL '1 day', schedule_interval => INTERVAL '1 hour')",
        ],
    )
    _attempt(
        conn,
        "compression of bars older than 30 days",
        [
            "ALTER TABLE bars SET (timescaledb.compress,"
            " timescaledb.compress_segmentby = 'instrument, \"interval\"',"
            " timescaledb.compress_orderby = 'bucket')",
            "SELECT add_compression_policy('bars', compress_after => INTERVAL '30 days')",
        ],
    )


def _attempt(conn: Connection, feature: str, statements: list[str]) -> bool:
    """Run `statements` in a SAVEPOINT; on failure roll back to it, log, and report False."""
    try:
        with conn.begin_nested():
            for statement in statements:
                conn.execute(text(statement))
    except Exception as err:  # noqa: BLE001 - any failure means: run without this feature
        log.warning("%s not enabled: %s", feature, str(err).splitlines()[0])
        return False
    log.info("%s enabled", feature)
    return True
