"""Exact 1h / 1d rollups of the 1m bars, a change counter per instrument; the unread continuous aggregates go.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-02

- `bar_rollups(instrument, interval, bucket, ...)`: each 1h / 1d bucket rolled up from the stored 1m
  bars exactly as candlekeep.bars.rollup_bars does, with `minutes` (how many 1m bars it holds) and
  `flat` (all of them flat: a 1d rollup is made from the 1h ones). candlekeep.storage.bars keeps it
  in the same transaction as every 1m write and reads 1h / 1d from it, so long coarse ranges read
  one row per bar instead of rolling up 60 or 1440 minutes per bar.
- `bar_versions(instrument, version)`: bumped in the same transaction as every bar write that
  changes something (the API's encoded-response cache compares it).
- TimescaleDB: `bars_1h_cagg` / `bars_1d_cagg` (0001) are dropped. Nothing read them, and being
  real-time aggregates they missed late writes below their watermark until a refresh; the rollups
  are exact at every commit. Plain tables on both paths (a year of 1h is 8,760 rows an instrument).

The upgrade fills the rollups from the 1m bars already stored (one statement per interval).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLLUPS = """
CREATE TABLE bar_rollups (
    instrument text NOT NULL,
    "interval" text NOT NULL,
    bucket timestamptz NOT NULL,
    open numeric NOT NULL,
    high numeric NOT NULL,
    low numeric NOT NULL,
    close numeric NOT NULL,
    volume numeric NOT NULL,
    quote_volume numeric NOT NULL,
    trades bigint,
    source text NOT NULL,
    final boolean NOT NULL,
    revision integer NOT NULL,
    minutes integer NOT NULL,
    flat boolean NOT NULL,
    CONSTRAINT bar_rollups_pkey PRIMARY KEY (instrument, "interval", bucket),
    CONSTRAINT bar_rollups_interval_valid CHECK ("interval" IN ('1h', '1d'))
)"""

VERSIONS = """
CREATE TABLE bar_versions (
    instrument text PRIMARY KEY,
    version bigint NOT NULL
)"""

# As candlekeep.storage.bars.refresh_rollups does it: every hour holding a 1m bar from its 1m bars,
# then every day from its hours.
_FILL = """
INSERT INTO bar_rollups AS r (instrument, "interval", bucket, open, high, low, close, volume, quote_volume, trades, source, final, revision, minutes, flat)
SELECT k.instrument, '{interval}', k.bucket,
       coalesce((array_agg(m.open ORDER BY m.bucket) FILTER (WHERE NOT m.flat))[1],
                (array_agg(m.close ORDER BY m.bucket DESC))[1]),
       coalesce(max(m.high) FILTER (WHERE NOT m.flat), (array_agg(m.close ORDER BY m.bucket DESC))[1]),
       coalesce(min(m.low) FILTER (WHERE NOT m.flat), (array_agg(m.close ORDER BY m.bucket DESC))[1]),
       (array_agg(m.close ORDER BY m.bucket DESC))[1],
       sum(m.volume), sum(m.quote_volume),
       CASE WHEN count(m.trades) = count(*) THEN sum(m.trades) END,
       CASE WHEN min(m.source) = max(m.source) THEN min(m.source) ELSE 'mixed' END,
       bool_and(m.final), max(m.revision), sum(m.minutes), bool_and(m.flat)
FROM (SELECT DISTINCT instrument, date_bin('{width}', bucket, TIMESTAMPTZ '1970-01-01 00:00:00+00')
      FROM {table} WHERE "interval" = '{finer}') AS k(instrument, bucket)
JOIN LATERAL (SELECT bucket, open, high, low, close, volume, quote_volume, trades, source, final, revision,
           {minutes_flat} FROM {table} WHERE instrument = k.instrument AND "interval" = '{finer}'
           AND bucket >= k.bucket AND bucket < k.bucket + INTERVAL '{width}') AS m ON true
GROUP BY k.instrument, k.bucket
ORDER BY k.instrument, k.bucket
ON CONFLICT (instrument, "interval", bucket) DO UPDATE SET
    (open, high, low, close, volume, quote_volume, trades, source, final, revision, minutes, flat) = (excluded.open, excluded.high, excluded.low, excluded.close, excluded.volume,
    excluded.quote_volume, excluded.trades, excluded.source, excluded.final, excluded.revision, excluded.minutes,
    excluded.flat)
WHERE (r.open, r.high, r.low, r.close, r.volume, r.quote_volume, r.trades, r.source, r.final, r.revision, r.minutes, r.flat)
      IS DISTINCT FROM (excluded.open, excluded.high, excluded.low, excluded.close, excluded.volume, excluded.quote_volume, excluded.trades, excluded.source, excluded.final, excluded.revision, excluded.minutes, excluded.flat)"""
FILL_1H = _FILL.format(interval="1h", width="1 hour", table="bars", finer="1m",
                       minutes_flat="1 AS minutes, (volume = 0 AND open = high AND high = low AND low = close) AS flat")
FILL_1D = _FILL.format(interval="1d", width="1 day", table="bar_rollups", finer="1h", minutes_flat="minutes, flat")


def upgrade() -> None:
    op.execute("DROP MATERIALIZED VIEW IF EXISTS bars_1d_cagg CASCADE")
    op.execute("DROP MATERIALIZED VIEW IF EXISTS bars_1h_cagg CASCADE")
    op.execute(ROLLUPS)
    op.execute(VERSIONS)
    op.execute(FILL_1H)
    op.execute(FILL_1D)


def downgrade() -> None:
    # The continuous aggregates are not made again: nothing read them.
    op.execute("DROP TABLE IF EXISTS bar_versions, bar_rollups")
