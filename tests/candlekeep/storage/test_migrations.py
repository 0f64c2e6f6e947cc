"""Migrations on a real PostgreSQL: forward from empty, down to base, up again; the schema they make
matches candlekeep.storage.tables; partitions exist ahead and are made on demand."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text

from candlekeep.storage import partitions
from candlekeep.storage.db import create_engine, storage_features, with_database
from candlekeep.storage.migrate import alembic_dir, current_revision, downgrade, head_revision, is_current, upgrade
from candlekeep.storage.partitions import ensure_partitions
from candlekeep.storage.tables import is_managed, metadata
from tests.utils.backend import backend, chunk_interval, chunk_of


@pytest.fixture
def empty_database(pg_admin_url: str) -> Iterator[str]:
    """A database of its own, not migrated (the shared one stays untouched)."""
    name = f"candlekeep_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_admin_url, name)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tables(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")
            ).scalars()
        )


def test_upgrade_downgrade_upgrade(empty_database: str) -> None:
    engine = create_engine(empty_database)
    try:
        assert current_revision(engine) is None
        assert not is_current(engine)

        upgrade(empty_database)
        assert current_revision(engine) == head_revision()
        assert is_current(engine)
        assert {"instruments", "bars", "ticks", "coverage"} <= tables(engine)

        downgrade(empty_database, "base")
        assert current_revision(engine) is None
        assert tables(engine) == set()  # partitions went with their tables
        with engine.connect() as conn:
            assert conn.execute(text("SELECT to_regproc('candlekeep_ensure_partitions')")).scalar() is None

        upgrade(empty_database)
        assert is_current(engine)
        assert {"instruments", "bars", "ticks", "coverage"} <= tables(engine)
    finally:
        engine.dispose()
        partitions.forget(engine)


def test_schema_matches_table_metadata(session_engine: Engine) -> None:
    """What the hand-written migration makes is what tables.py declares (autogenerate sees nothing)."""
    with session_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "include_name": is_managed})
        assert compare_metadata(context, metadata) == []


def test_migrations_run_from_any_directory(tmp_path, monkeypatch, empty_database: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert (alembic_dir() / "env.py").is_file()
    upgrade(empty_database)
    engine = create_engine(empty_database)
    assert is_current(engine)
    engine.dispose()


def test_storage_features_name_the_backend(session_engine: Engine) -> None:
    features = storage_features(session_engine)
    if backend(session_engine) == "native":
        assert features == {"timescaledb": False, "partitioning": "native", "compression": False,
                            "license": None}  # fmt: skip
        return
    # TimescaleDB: hypertables under either license; the TSL features only under the Timescale one.
    tsl = features["license"] == "timescale"
    assert features == {"timescaledb": True, "partitioning": "timescaledb", "compression": tsl,
                        "license": features["license"]}  # fmt: skip
    assert features["license"] in ("timescale", "apache")


def partition_names(engine: Engine, parent: str) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.execute(
                text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                     " WHERE i.inhparent = to_regclass(:parent)"),
                {"parent": parent},
            ).scalars()
        )


def test_partitions_exist_ahead(session_engine: Engine) -> None:
    now = datetime.now(UTC)
    if backend(session_engine) == "timescaledb":  # chunks are made on insert, by their interval
        assert chunk_interval(session_engine, "bars") == timedelta(days=7)
        assert chunk_interval(session_engine, "ticks") == timedelta(days=1)
        return
    bars = partition_names(session_engine, "bars")
    month = now.replace(day=1)
    for _ in range(4):  # this month and the next three
        assert f"bars_p{month:%Y%m}" in bars
        month = (month + timedelta(days=32)).replace(day=1)
    ticks = partition_names(session_engine, "ticks")
    for ahead in range(8):  # today and the next seven days
        assert f"ticks_p{now + timedelta(days=ahead):%Y%m%d}" in ticks


def test_partition_bounds_are_utc(engine: Engine) -> None:
    session_engine = engine
    if backend(engine) == "timescaledb":  # a chunk holding a bar starts at a UTC midnight, 7 days wide
        instant = datetime(2024, 1, 31, 23, 0, tzinfo=UTC)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO bars (instrument, \"interval\", bucket, open, high, low, close, volume,"
                              " source) VALUES ('cccagg:BTC-USD', '1m', :b, 1, 1, 1, 1, 0, 'test')"), {"b": instant})
        chunk = chunk_of(engine, "bars", instant)
        assert chunk is not None
        _, lo, hi = chunk
        assert lo.astimezone(UTC).time() == datetime.min.time() and hi - lo == timedelta(days=7)
        return
    with session_engine.connect() as conn:
        bound = conn.execute(
            text("SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE c.relname = :name"),
            {"name": f"bars_p{datetime.now(UTC):%Y%m}"},
        ).scalar_one()
    start = datetime.now(UTC).replace(day=1)
    assert f"'{start:%Y-%m}-01 00:00:00+00'" in bound


def test_ensure_partitions_is_idempotent(engine: Engine) -> None:
    start, end = datetime(2091, 1, 15, tzinfo=UTC), datetime(2091, 3, 2, tzinfo=UTC)
    if backend(engine) == "timescaledb":  # hypertables are left alone: nothing made, nothing refused
        with engine.connect() as conn:
            ensure_partitions(conn, "bars", start, end)
            made = conn.execute(text("SELECT candlekeep_ensure_partitions('bars', :start, :end)"),
                                {"start": start, "end": end}).scalar_one()  # fmt: skip
            conn.commit()
        assert made == 0 and partition_names(engine, "bars") == set()
        assert chunk_of(engine, "bars", start) is None
        return
    assert not {"bars_p209101", "bars_p209102", "bars_p209103"} & partition_names(engine, "bars")
    with engine.connect() as conn:
        ensure_partitions(conn, "bars", start, end)
        ensure_partitions(conn, "bars", start, end)  # remembered: no database call
        partitions.forget(engine)
        ensure_partitions(conn, "bars", start, end)  # forgotten: the SQL function finds them all
        ensure_partitions(conn, "ticks", start, start + timedelta(days=2))
        made_again = conn.execute(
            text("SELECT candlekeep_ensure_partitions('bars', :start, :end)"), {"start": start, "end": end}
        ).scalar_one()
        conn.commit()
    assert made_again == 0
    assert {"bars_p209101", "bars_p209102", "bars_p209103"} <= partition_names(engine, "bars")
    assert "bars_p209104" not in partition_names(engine, "bars")
    assert {"ticks_p20910115", "ticks_p20910116"} <= partition_names(engine, "ticks")
    assert "ticks_p20910117" not in partition_names(engine, "ticks")


def test_ensure_partitions_rejects_unknown_tables_and_naive_times(engine: Engine) -> None:
    with engine.connect() as conn:
        with pytest.raises(ValueError, match="no partition scheme"):
            ensure_partitions(conn, "coverage", datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC))
        with pytest.raises(ValueError, match="timezone-aware"):
            ensure_partitions(conn, "bars", datetime(2024, 1, 1), datetime(2024, 2, 1))


def test_partition_periods() -> None:
    periods = partitions.periods("bars", datetime(2023, 11, 30, 23, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC))
    assert [str(p) for p in periods] == ["2023-11-01", "2023-12-01", "2024-01-01"]
    days = partitions.periods("ticks", datetime(2024, 2, 28, 12, tzinfo=UTC), datetime(2024, 3, 1, 0, 1, tzinfo=UTC))
    assert [str(p) for p in days] == ["2024-02-28", "2024-02-29", "2024-03-01"]


def test_0006_rolls_up_the_1m_bars_already_stored(empty_database: str) -> None:
    """An existing database: 0006 fills bar_rollups from its 1m bars (what reads of 1h / 1d use)."""
    from candlekeep.bars import Interval, rollup_bars
    from candlekeep.storage.bars import BarStore
    from tests.utils.bars import make_bar

    upgrade(empty_database, "0004")
    engine = create_engine(empty_database)
    try:
        t0 = int(datetime(2024, 1, 1, 23, tzinfo=UTC).timestamp())
        minutes = [make_bar("cccagg:BTC-USD", t0 + 60 * i, f"{100 + i % 9}.5") for i in range(0, 150, 2)]
        with engine.begin() as conn:
            partitions.ensure_partitions(conn, "bars", datetime.fromtimestamp(t0, UTC),
                                         datetime.fromtimestamp(t0 + 86400, UTC))  # fmt: skip
            for b in minutes:  # written the way 0004's code wrote them: no rollups
                conn.execute(text("INSERT INTO bars (instrument, \"interval\", bucket, open, high, low, close, volume,"
                                  " quote_volume, trades, source, final) VALUES (:i, '1m', to_timestamp(:s), :o, :h, :l,"
                                  " :c, :v, :qv, :t, :src, true)"),
                             {"i": b.instrument, "s": b.start, "o": b.open, "h": b.high, "l": b.low, "c": b.close,
                              "v": b.volume, "qv": b.quote_volume, "t": b.trades, "src": b.source})  # fmt: skip
        upgrade(empty_database)
        store = BarStore(engine)
        for interval in (Interval.H1, Interval.D1):
            assert store.read_bars("cccagg:BTC-USD", interval, t0 - 86400, t0 + 86400) == list(
                rollup_bars(minutes, interval))
    finally:
        engine.dispose()
        partitions.forget(engine)


def test_0007_moves_stored_buckets_into_arrays_and_back(empty_database: str) -> None:
    """An existing database: 0007 turns 0004's one row per bucket into one row per (instrument, ts, side)
    with the buckets in price order, digits kept, on every day partition; its downgrade gives the rows back."""
    upgrade(empty_database, "0006")
    engine = create_engine(empty_database)
    late, early = datetime(2024, 1, 1, 23, 59, 59, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC)
    rows = [("kraken:BTC-USD", late, "bid", "42010", "0.500", "10", "1.000000"),  # inserted out of price order
            ("kraken:BTC-USD", late, "bid", "9990", "0.250", "10", "0.500000"),
            ("kraken:BTC-USD", late, "ask", "42020", "0.010", "10", "0.020000"),
            ("okx:ETH-USDT", early, "ask", "2201.5", "3", "0.5", "1.000000")]  # fmt: skip
    select_rows = ("SELECT instrument, ts, side, price::text, size::text, width::text, intensity::text"
                   " FROM book_buckets ORDER BY 1, 2, 3, price")  # fmt: skip
    try:
        with engine.begin() as conn:
            partitions.ensure_partitions(conn, "book_buckets", late, early + timedelta(days=1))
            for row in rows:
                conn.execute(text("INSERT INTO book_buckets (instrument, ts, side, price, size, width, intensity)"
                                  " VALUES (:i, :t, :s, :p, :q, :w, :x)"),
                             dict(zip("itspqwx", row, strict=True)))  # fmt: skip
            before = conn.execute(text(select_rows)).all()
        upgrade(empty_database)
        with engine.connect() as conn:
            got = conn.execute(text("SELECT instrument, ts, side, width::text, prices::text, sizes::text,"
                                    " intensities::text FROM book_buckets ORDER BY 1, 2, 3")).all()  # fmt: skip
        assert [tuple(r) for r in got] == [
            ("kraken:BTC-USD", late, "ask", "10", "{42020}", "{0.010}", "{0.020000}"),
            ("kraken:BTC-USD", late, "bid", "10", "{9990,42010}", "{0.250,0.500}", "{0.500000,1.000000}"),
            ("okx:ETH-USDT", early, "ask", "0.5", "{2201.5}", "{3}", "{1.000000}")]  # fmt: skip
        if backend(engine) == "native":  # the rows' days are partitions of the new table, under the old names
            assert {"book_buckets_p20240101", "book_buckets_p20240102"} <= partition_names(engine, "book_buckets")
            assert to_regclass_none(engine, "book_buckets_old")
        downgrade(empty_database, "0006")
        with engine.connect() as conn:
            assert conn.execute(text(select_rows)).all() == before
    finally:
        engine.dispose()
        partitions.forget(engine)


def to_regclass_none(engine: Engine, name: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar() is None
