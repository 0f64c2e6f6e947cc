"""`book_buckets`: one row per (instrument, ts, side), the output's buckets as arrays.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

0004 stored one row per bucket: about 42 rows per book output, and writing them (the primary key's
index above all) was half of the books daemon's PostgreSQL time (bench/README.md, "Books daemon").
Each output's buckets of one side are written and read together, never one by one, so they are now
one row: `prices` (the buckets' lower edges, ascending), `sizes` and `intensities`, position by
position, of equal length and never empty (a CHECK says so). The served heatmap prints them as they
are (array order is price order); re-bucketing unnests them.

The upgrade moves the stored rows over (array_agg in price order) and drops the old table: nothing
stored is lost. Plain PostgreSQL keeps day partitions made by candlekeep_ensure_partitions (the
function names tables, not columns: it is unchanged); TimescaleDB, a hypertable with 1-day chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import Connection, text

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ARRAYS = """
CREATE TABLE book_buckets (
    instrument text NOT NULL,
    ts timestamptz NOT NULL,
    side text NOT NULL,
    width numeric NOT NULL,
    prices numeric[] NOT NULL,
    sizes numeric[] NOT NULL,
    intensities numeric[] NOT NULL,
    CONSTRAINT book_buckets_pkey PRIMARY KEY (instrument, ts, side),
    CONSTRAINT book_buckets_side_valid CHECK (side IN ('bid','ask')),
    CONSTRAINT book_buckets_arrays_aligned CHECK (cardinality(prices) > 0
        AND cardinality(prices) = cardinality(sizes) AND cardinality(prices) = cardinality(intensities))
)"""

# 0004's table, for the downgrade (copied, not imported: a migration stays frozen).
ROWS = """
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

TO_ARRAYS = """
INSERT INTO book_buckets (instrument, ts, side, width, prices, sizes, intensities)
SELECT instrument, ts, side, min(width), array_agg(price ORDER BY price), array_agg(size ORDER BY price),
       array_agg(intensity ORDER BY price)
FROM book_buckets_old GROUP BY instrument, ts, side"""

TO_ROWS = """
INSERT INTO book_buckets (instrument, ts, side, price, size, width, intensity)
SELECT b.instrument, b.ts, b.side, u.price, u.size, b.width, u.intensity
FROM book_buckets_old AS b, unnest(b.prices, b.sizes, b.intensities) AS u(price, size, intensity)"""


def upgrade() -> None:
    _replace(ARRAYS, TO_ARRAYS)


def downgrade() -> None:
    _replace(ROWS, TO_ROWS)


def _replace(ddl: str, move: str) -> None:
    """Rename the current table (its partitions and primary key too: their names are the new table's),
    create `ddl` the way 0004 did, move the rows with `move`, drop the old table."""
    conn = op.get_bind()
    timescale = _timescaledb(conn)
    op.execute("ALTER TABLE book_buckets RENAME TO book_buckets_old")
    op.execute("ALTER TABLE book_buckets_old RENAME CONSTRAINT book_buckets_pkey TO book_buckets_old_pkey")
    if timescale:
        conn.execute(text(ddl))
        conn.execute(text("SELECT create_hypertable('book_buckets', by_range('ts', INTERVAL '1 day'),"
                          " create_default_indexes => false)"))  # fmt: skip
    else:
        partitions = conn.execute(text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                                       " WHERE i.inhparent = 'book_buckets_old'::regclass")).scalars().all()  # fmt: skip
        for name in partitions:
            old_name = name.replace("book_buckets_", "book_buckets_old_", 1)
            op.execute(f'ALTER TABLE "{name}" RENAME TO "{old_name}"')
        op.execute(ddl + " PARTITION BY RANGE (ts)")
        # The old table's days (book_buckets_pYYYYMMDD), then today and the week ahead as 0004 made them.
        for day in sorted(name.rsplit("_p", 1)[1] for name in partitions):
            start = f"'{day[:4]}-{day[4:6]}-{day[6:]} 00:00:00+00'::timestamptz"
            op.execute(f"SELECT candlekeep_ensure_partitions('book_buckets', {start}, {start} + INTERVAL '1 day')")
        op.execute("SELECT candlekeep_ensure_partitions('book_buckets', now(), now() + INTERVAL '7 days')")
    op.execute(move)
    op.execute("DROP TABLE book_buckets_old CASCADE")


def _timescaledb(conn: Connection) -> bool:
    return conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")).first() is not None
