"""The 1h / 1d rollups (bar_rollups) stay equal to candlekeep.bars.rollup_bars of the stored 1m bars
through later writes, revisions and concurrent writers; the per-instrument version moves only with
a change; missing_minutes lists what missing_ranges of the bucket starts lists."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from candlekeep.bar_block import blocks_from_bars
from candlekeep.bars import Bar, Interval, missing_ranges, rollup_bars
from candlekeep.storage.bars import BarStore
from tests.candlekeep.storage.test_derived_bars import minute_bars
from tests.utils.bars import make_bar

T0 = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp())
BTC = "cccagg:BTC-USD"


def rollup_rows(engine: Engine, instrument: str, interval: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT extract(epoch FROM bucket)::bigint, open, high, low, close, volume, quote_volume, trades, source,"
            " final, revision FROM bar_rollups WHERE instrument = :i AND \"interval\" = :iv ORDER BY bucket"),
            {"i": instrument, "iv": interval})]  # fmt: skip


def assert_rollups_follow_1m(store: BarStore, instrument: str) -> None:
    stored = store.read_bars(instrument, Interval.M1, T0 - 10 * 86400, T0 + 10 * 86400)
    for interval in (Interval.H1, Interval.D1):
        expected = [(b.start, b.open, b.high, b.low, b.close, b.volume, b.quote_volume, b.trades, b.source, b.final,
                     b.revision) for b in rollup_bars(stored, interval)]  # fmt: skip
        assert rollup_rows(store.engine, instrument, interval.value) == expected, interval


def version(engine: Engine, instrument: str) -> int | None:
    with engine.connect() as conn:
        return conn.execute(text("SELECT version FROM bar_versions WHERE instrument = :i"), {"i": instrument}).scalar()


def test_rollups_follow_revisions_late_minutes_and_finality(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([make_bar(BTC, T0 + 60 * i, f"{100 + i % 7}.{i % 10}", volume=f"0.{i + 1:03d}",
                                source="stream", final=False) for i in range(0, 3000, 3)])  # fmt: skip
    assert_rollups_follow_1m(store, BTC)
    first = version(engine, BTC)

    store.upsert_bars([make_bar(BTC, T0 + 60 * 7, "250.5", volume="3")])  # a late minute into a stored hour
    store.upsert_bars([make_bar(BTC, T0 + 60 * 9, "1.25", volume="0.5")])  # final over provisional: revised
    store.upsert_written([dataclasses.replace(make_bar(BTC, T0 + 60 * 1500, "99"), source="stream", final=False)])
    assert_rollups_follow_1m(store, BTC)
    assert version(engine, BTC) != first

    moved = version(engine, BTC)
    store.upsert_bars([make_bar(BTC, T0 + 60 * 7, "250.5", volume="3")])  # identical: nothing changes
    assert version(engine, BTC) == moved


def test_concurrent_writers_of_one_hour_lose_no_minute(engine: Engine) -> None:
    """Two writers storing different minutes of the same hours at once: each refresh waits for the
    other's commit (the version row lock) and then sees its minutes."""
    store = BarStore(engine)
    errors: list[BaseException] = []

    def write(offset: int) -> None:
        try:
            for i in range(offset, 240, 2):  # one transaction per minute
                store.upsert_bars([make_bar(BTC, T0 + 60 * i, f"{100 + i}", volume="1")])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(store.read_bars(BTC, Interval.M1, T0, T0 + 240 * 60)) == 240
    assert_rollups_follow_1m(store, BTC)


def test_refresh_rollups_rebuilds_after_writes_around_the_store(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([make_bar(BTC, T0 + 60 * i, "10", volume="1") for i in range(120)])
    with engine.begin() as conn:  # a bulk load the store did not see
        conn.execute(text("UPDATE bars SET close = 11, high = 11 WHERE instrument = :i AND bucket < to_timestamp(:s)"),
                     {"i": BTC, "s": T0 + 600})  # fmt: skip
        conn.execute(text("DELETE FROM bars WHERE instrument = :i AND bucket >= to_timestamp(:s)"),
                     {"i": BTC, "s": T0 + 3600})  # fmt: skip
    store.refresh_rollups(BTC, T0, T0 + 7200)
    assert_rollups_follow_1m(store, BTC)
    assert [r[0] for r in rollup_rows(engine, BTC, "1h")] == [T0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bars=minute_bars(), cut=st.tuples(st.integers(-3600, 3600), st.integers(-3600, 3600)))
def test_missing_minutes_are_the_missing_ranges_of_the_starts(engine: Engine, bars: list[Bar],
                                                              cut: tuple[int, int]) -> None:  # fmt: skip
    store = BarStore(engine)
    store.upsert_bars(bars)
    instrument = bars[0].instrument
    for start, end in [(bars[0].start - 7200, bars[-1].start + 7200), (bars[0].start + cut[0], bars[-1].start + cut[1])]:
        if end <= start:
            continue
        starts = store.bucket_starts(instrument, Interval.M1, start, end)
        assert store.missing_minutes(instrument, start, end) == missing_ranges(starts, Interval.M1, start, end)


def test_decimals_of_rollups_keep_every_digit(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([make_bar(BTC, T0, "0.000000000123456789", volume="12345678901234567890.123456789"),
                       make_bar(BTC, T0 + 60, "0.000000000123456780", volume="0.000000000000000001")])  # fmt: skip
    (row,) = rollup_rows(engine, BTC, "1h")
    assert str(row[5]) == "12345678901234567890.123456789000000001"  # exact sums, no rounding
    assert str(row[4]) == "1.23456780E-10"  # the last close, its trailing zero kept


def test_rollups_follow_the_backfills_block_path_streamed_and_merged(engine: Engine) -> None:
    """upsert_blocks' COPY straight into an empty span, and its merge over stored minutes, keep the
    rollups in the same transaction as upsert_bars does."""
    store = BarStore(engine)
    minutes = [make_bar(BTC, T0 + 60 * i, f"{200 + i % 11}.{i % 10}", volume=f"0.{i + 1:04d}") for i in range(3000)]
    span = (BTC, Interval.M1, T0, T0 + 60 * 3000)
    assert store.upsert_blocks(blocks_from_bars(minutes[:2000]), batch_rows=700, span=span).inserted == 2000
    assert_rollups_follow_1m(store, BTC)
    first = version(engine, BTC)

    revised = [dataclasses.replace(b, close=Decimal("1.5")) for b in minutes[1500:]]  # merged, then new minutes
    store.upsert_blocks(blocks_from_bars(revised), batch_rows=700, span=span)
    assert_rollups_follow_1m(store, BTC)
    assert version(engine, BTC) != first
