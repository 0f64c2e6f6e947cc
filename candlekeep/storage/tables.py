"""SQLAlchemy metadata for every table (DESIGN.md "Storage"). Alembic migrations create them.

Prices and sizes are unconstrained NUMERIC (the source's digits, exactly, trailing zeros included:
'1.50' stays '1.50'); times are timestamptz (UTC). `bars` and `ticks` are range-partitioned on
time: native monthly (`bars_pYYYYMM`) / daily (`ticks_pYYYYMMDD`) partitions on PostgreSQL, made
by the SQL function `candlekeep_ensure_partitions` (partitions.py), or hypertables when
TimescaleDB is available (see alembic/versions/0001).
"""

from __future__ import annotations

import re

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Double,
    Identity,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

instruments = Table(
    "instruments",
    metadata,
    Column("id", Text, primary_key=True),
    Column("venue", Text, nullable=False),
    Column("base", Text, nullable=False),
    Column("quote", Text, nullable=False),
    Column("tracked", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

bars = Table(
    "bars",
    metadata,
    Column("instrument", Text, nullable=False),
    Column("interval", Text, nullable=False),
    Column("bucket", DateTime(timezone=True), nullable=False),
    Column("open", Numeric, nullable=False),
    Column("high", Numeric, nullable=False),
    Column("low", Numeric, nullable=False),
    Column("close", Numeric, nullable=False),
    Column("volume", Numeric, nullable=False),
    Column("quote_volume", Numeric, nullable=False),
    Column("trades", Integer),  # NULL when the source does not count trades (CryptoCompare)
    Column("source", Text, nullable=False),
    Column("final", Boolean, nullable=False),
    Column("revision", Integer, nullable=False, server_default=text("0")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("instrument", "interval", "bucket", name="bars_pkey"),
    CheckConstraint("interval IN ('1m','5m','15m','30m','1h','4h','1d')", name="bars_interval_valid"),
    postgresql_partition_by="RANGE (bucket)",
)

# Exact 1h / 1d rollups of the 1m bars (migration 0006; candlekeep.storage.bars keeps them in the
# transaction of every 1m write): `minutes` is how many 1m bars a bucket holds, `flat` whether all
# of them are flat. Apart from `bars`, whose 1h / 1d rows are the source's own deep history.
bar_rollups = Table(
    "bar_rollups",
    metadata,
    Column("instrument", Text, nullable=False),
    Column("interval", Text, nullable=False),
    Column("bucket", DateTime(timezone=True), nullable=False),
    Column("open", Numeric, nullable=False),
    Column("high", Numeric, nullable=False),
    Column("low", Numeric, nullable=False),
    Column("close", Numeric, nullable=False),
    Column("volume", Numeric, nullable=False),
    Column("quote_volume", Numeric, nullable=False),
    Column("trades", BigInteger),
    Column("source", Text, nullable=False),
    Column("final", Boolean, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("minutes", Integer, nullable=False),
    Column("flat", Boolean, nullable=False),
    PrimaryKeyConstraint("instrument", "interval", "bucket", name="bar_rollups_pkey"),
    CheckConstraint("interval IN ('1h','1d')", name="bar_rollups_interval_valid"),
)

# Bumped with every bar write that changes something, in its transaction (the API's response cache).
bar_versions = Table(
    "bar_versions",
    metadata,
    Column("instrument", Text, primary_key=True),
    Column("version", BigInteger, nullable=False),
)

ticks = Table(
    "ticks",
    metadata,
    Column("instrument", Text, nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("trade_id", Text, nullable=False),
    Column("price", Numeric, nullable=False),
    Column("size", Numeric, nullable=False),
    Column("side", Text, nullable=False),
    Column("source", Text, nullable=False),
    UniqueConstraint("instrument", "ts", "trade_id", name="ticks_instrument_ts_trade_id_key"),
    CheckConstraint("side IN ('buy','sell','unknown')", name="ticks_side_valid"),
    postgresql_partition_by="RANGE (ts)",
)

coverage = Table(
    "coverage",
    metadata,
    Column("instrument", Text, nullable=False),
    Column("interval", Text, nullable=False),
    Column("day", Date, nullable=False),  # first day of the partition written (a day, or a month for 1h/1d)
    Column("source", Text, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("status", Text, nullable=False),  # complete | gaps | empty | open (period not over yet)
    Column("fetched_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("instrument", "interval", "day", "source", name="coverage_pkey"),
    CheckConstraint("status IN ('complete','gaps','empty','open')", name="coverage_status_valid"),
)

# Spans a live feed could not vouch for (migrations 0002, 0005; candlekeep.storage.outages): the
# aggregator writes one per instrument from the disconnects on `ticks`. `ended_at` NULL: no record
# has come since the disconnect.
outages = Table(
    "outages",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("source", Text, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    Column("instruments", ARRAY(Text), nullable=False),
    Column("reason", Text, nullable=False),
    UniqueConstraint("source", "started_at", "instruments", name="outages_source_started_at_instruments_key"),
    CheckConstraint("ended_at IS NULL OR ended_at >= started_at", name="outages_ended_after_started"),
)

# Replay sessions (migration 0003; candlekeep.storage.replay_sessions): clocks and positions are
# bigint unix ns, speed NULL is `max`, anchor_wall_ns NULL is a held clock.
replay_sessions = Table(
    "replay_sessions",
    metadata,
    Column("id", Text, primary_key=True),
    Column("instruments", ARRAY(Text), nullable=False),
    Column("bar_instruments", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    Column("start_ns", BigInteger, nullable=False),
    Column("end_ns", BigInteger, nullable=False),
    Column("speed", Double),
    Column("lateness_ns", BigInteger, nullable=False),
    Column("state", Text, nullable=False),
    Column("clock_ns", BigInteger, nullable=False),
    Column("anchor_wall_ns", BigInteger),
    Column("position_ns", BigInteger, nullable=False),
    Column("position_instrument", Text, nullable=False, server_default=text("''")),
    Column("position_rank", SmallInteger, nullable=False, server_default=text("-1")),
    Column("position_trade_id", Text, nullable=False, server_default=text("''")),
    Column("seek_epoch", Integer, nullable=False, server_default=text("0")),
    Column("messages_sent", BigInteger, nullable=False, server_default=text("0")),
    Column("trades_sent", BigInteger, nullable=False, server_default=text("0")),
    Column("trades_total", BigInteger, nullable=False),
    Column("bars_total", BigInteger, nullable=False, server_default=text("0")),
    Column("rate", Double, nullable=False, server_default=text("0")),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("state IN ('created','running','paused','stopped','finished','error')",
                    name="replay_sessions_state_valid"),
    CheckConstraint("end_ns > start_ns", name="replay_sessions_range_valid"),
    CheckConstraint("speed IS NULL OR speed > 0", name="replay_sessions_speed_positive"),
)

# What each aggregator's durable state includes, per consumer group and instrument (migration 0005;
# candlekeep.storage.stream_state): written last in a flush, so a restart skips what it holds.
stream_state = Table(
    "stream_state",
    metadata,
    Column("consumer", Text, primary_key=True),
    Column("instrument", Text, primary_key=True),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("clock_ns", BigInteger),
    Column("closed_until", BigInteger),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# --- order books (migrations 0004, 0007; candlekeep.storage.books) -------------------------------
# Keyed by (instrument, ts[, side]): the books daemon rewrites the same rows on a replay.
# `bids` / `asks` are JSON arrays of [price, size] decimal strings, best first.
book_snapshots = Table(
    "book_snapshots",
    metadata,
    Column("instrument", Text, nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("sequence", BigInteger),
    Column("bids", JSONB, nullable=False),
    Column("asks", JSONB, nullable=False),
    Column("mid", Numeric),
    Column("spread", Numeric),
    *(Column(f"{side}_depth_{bps}", Numeric, nullable=False) for bps in (10, 50, 100) for side in ("bid", "ask")),
    Column("verified", Boolean, nullable=False),
    Column("source", Text, nullable=False),
    Column("bucket_width", Numeric, nullable=False),  # the width of this output's rows in book_buckets
    PrimaryKeyConstraint("instrument", "ts", name="book_snapshots_pkey"),
    postgresql_partition_by="RANGE (ts)",
)

# One row per output and side (migration 0007): the buckets' lower edges ascending, and position by
# position their summed size and intensity (size / the output's largest bucket, book_analytics.intensity).
book_buckets = Table(
    "book_buckets",
    metadata,
    Column("instrument", Text, nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("side", Text, nullable=False),
    Column("width", Numeric, nullable=False),
    Column("prices", ARRAY(Numeric), nullable=False),  # the buckets' lower edges (candlekeep.book_analytics)
    Column("sizes", ARRAY(Numeric), nullable=False),
    Column("intensities", ARRAY(Numeric), nullable=False),
    PrimaryKeyConstraint("instrument", "ts", "side", name="book_buckets_pkey"),
    CheckConstraint("side IN ('bid','ask')", name="book_buckets_side_valid"),
    CheckConstraint("cardinality(prices) > 0 AND cardinality(prices) = cardinality(sizes)"
                    " AND cardinality(prices) = cardinality(intensities)", name="book_buckets_arrays_aligned"),  # fmt: skip
    postgresql_partition_by="RANGE (ts)",
)

book_metrics = Table(
    "book_metrics",
    metadata,
    Column("instrument", Text, nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    *(Column(name, Numeric) for name in ("mid", "spread", "imbalance_1", "imbalance_5", "imbalance_10",
                                         "imbalance_10bps", "imbalance_50bps", "weighted_mid", "microprice")),
    PrimaryKeyConstraint("instrument", "ts", name="book_metrics_pkey"),
    postgresql_partition_by="RANGE (ts)",
)

book_metrics_1m = Table(
    "book_metrics_1m",
    metadata,
    Column("instrument", Text, nullable=False),
    Column("bucket", DateTime(timezone=True), nullable=False),
    Column("samples", Integer, nullable=False),
    *(Column(f"{m}_{k}", Numeric) for m in ("mid", "spread", "imbalance_5") for k in ("open", "high", "low", "close")),
    *(Column(f"{side}_depth_50_{k}", Numeric) for side in ("bid", "ask") for k in ("min", "max")),
    PrimaryKeyConstraint("instrument", "bucket", name="book_metrics_1m_pkey"),
)

# Tables that exist in the database but not in this metadata, on purpose: native partitions (made on
# demand). Alembic's comparison skips them.
UNMANAGED_TABLE = re.compile(r"^(bars_p\d{6}|ticks_p\d{8}"
                             r"|book_(snapshots|buckets|metrics)_p\d{8})$")


def is_managed(name: str | None, type_: str, parent_names: object = None) -> bool:
    """Alembic `include_name` hook: compare only the tables declared here."""
    return not (type_ == "table" and name is not None and UNMANAGED_TABLE.match(name))
