"""BarStore writes: idempotent upserts, revisions, final vs provisional, exact decimals and times."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text

from candlekeep.bars import Bar, Interval
from candlekeep.storage.bars import BarStore, UpsertResult
from candlekeep.storage.db import create_engine
from tests.utils.backend import backend, chunk_of

BTC = "cccagg:BTC-USD"
T0 = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())


def bar(start: int, close: str, *, final: bool = True, source: str = "cryptocompare", volume: str = "1.5",
        instrument: str = BTC, interval: str = "1m") -> Bar:
    price = Decimal(close)
    return Bar(instrument, interval, start, price, price + 1, price - 1, price, Decimal(volume),
               Decimal(volume) * price, 7, source, final)


def stored(engine: Engine, start: int, instrument: str = BTC) -> dict:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT close, revision, updated_at, final, source FROM bars"
                 " WHERE instrument = :i AND interval = '1m' AND bucket = to_timestamp(:s)"),
            {"i": instrument, "s": start},
        ).mappings().one()
    return dict(row)


def test_upsert_is_idempotent(engine: Engine) -> None:
    store = BarStore(engine)
    bars = [bar(T0 + 60 * i, f"{100 + i}.25") for i in range(50)]
    assert store.upsert_bars(bars) == UpsertResult(inserted=50, updated=0, unchanged=0)
    before = stored(engine, T0 + 60)
    again = store.upsert_bars(bars)
    assert again == UpsertResult(inserted=0, updated=0, unchanged=50)
    assert again.written == 0
    after = stored(engine, T0 + 60)
    assert after == before
    assert after["revision"] == 0
    assert store.read_bars(BTC, Interval.M1, T0, T0 + 3000) == bars


def test_changed_bar_bumps_revision(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([bar(T0, "100"), bar(T0 + 60, "101")])
    first = stored(engine, T0)
    result = store.upsert_bars([bar(T0, "100"), bar(T0 + 60, "101.5")])  # a late trade moved the second
    assert result == UpsertResult(inserted=0, updated=1, unchanged=1)
    assert stored(engine, T0) == first
    changed = stored(engine, T0 + 60)
    assert (changed["close"], changed["revision"]) == (Decimal("101.5"), 1)
    assert changed["updated_at"] >= first["updated_at"]
    store.upsert_bars([bar(T0 + 60, "102")])
    assert stored(engine, T0 + 60)["revision"] == 2
    assert [b.revision for b in store.read_bars(BTC, "1m", T0, T0 + 120)] == [0, 2]


def test_provisional_never_overwrites_final(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([bar(T0, "100", final=True)])
    refused = store.upsert_bars([bar(T0, "999", final=False, source="stream")])
    assert refused == UpsertResult(inserted=0, updated=0, unchanged=1)
    kept = stored(engine, T0)
    assert (kept["close"], kept["final"], kept["source"]) == (Decimal("100"), True, "cryptocompare")
    assert kept["revision"] == 0


def test_final_overwrites_provisional(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([bar(T0, "100", final=False, source="stream")])
    store.upsert_bars([bar(T0, "100.5", final=False, source="stream")])  # provisional over provisional
    assert stored(engine, T0)["close"] == Decimal("100.5")
    assert store.upsert_bars([bar(T0, "101", final=True)]) == UpsertResult(0, 1, 0)
    now = stored(engine, T0)
    assert (now["close"], now["final"], now["source"], now["revision"]) == (Decimal("101"), True, "cryptocompare", 2)


def test_finalizing_identical_values_is_a_revision(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([bar(T0, "100", final=False)])
    assert store.upsert_bars([bar(T0, "100", final=True)]) == UpsertResult(0, 1, 0)
    assert stored(engine, T0)["final"] is True


@pytest.mark.parametrize(
    "digits",
    ["29234.52", "0.00000001", "1E-8", "123456789012345.123456789012", "1.50", "0E-8", "7", "0.10000000"],
)
def test_decimals_round_trip_exactly(engine: Engine, digits: str) -> None:
    """NUMERIC keeps the digits given, trailing zeros included ('1.50' stays '1.50')."""
    value = Decimal(digits)
    original = Bar(BTC, "1m", T0, value, value, value, value, value, value * 3, None, "cryptocompare")
    BarStore(engine).upsert_bars([original])
    (back,) = BarStore(engine).read_bars(BTC, Interval.M1, T0, T0 + 60)
    assert back == original
    for field in ("open", "high", "low", "close", "volume", "quote_volume"):
        assert str(getattr(back, field)) == str(getattr(original, field)), field
    assert back.trades is None


def test_positive_exponents_come_back_as_integers(engine: Engine) -> None:
    """NUMERIC has no positive exponent: Decimal('1.5E+3') reads back as Decimal('1500'), equal."""
    value = Decimal("1.5E+3")
    BarStore(engine).upsert_bars([Bar(BTC, "1m", T0, value, value, value, value, value, value, 1, "x")])
    (back,) = BarStore(engine).read_bars(BTC, Interval.M1, T0, T0 + 60)
    assert back.close == value and str(back.close) == "1500"


def test_numerically_equal_rewrite_is_unchanged(engine: Engine) -> None:
    """'1.5' over a stored '1.50' is the same number: no revision, and the stored digits stay."""
    store = BarStore(engine)
    store.upsert_bars([bar(T0, "100.50")])
    assert store.upsert_bars([bar(T0, "100.5")]) == UpsertResult(0, 0, 1)
    assert str(stored(engine, T0)["close"]) == "100.50"


def test_bucket_is_the_exact_utc_instant(engine: Engine, database_url: str) -> None:
    """Whatever the session time zone, a bar lands at its UTC instant and in its UTC month."""
    start = int(datetime(2024, 1, 31, 23, 0, tzinfo=UTC).timestamp())  # still January in UTC, Feb in Kolkata
    kolkata = create_engine(database_url, connect_args={"options": "-c TimeZone=Asia/Kolkata"})
    try:
        BarStore(kolkata).upsert_bars([bar(start, "100")])
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT bucket = TIMESTAMPTZ '2024-01-31 23:00:00+00', extract(epoch FROM bucket)::bigint,"
                     " tableoid::regclass::text FROM bars WHERE instrument = :i"),
                {"i": BTC},
            ).one()
        assert tuple(row[:2]) == (True, start)
        if backend(engine) == "native":
            assert row[2] == "bars_p202401"  # its UTC month's partition
        else:  # the chunk holding its UTC instant
            chunk = chunk_of(engine, "bars", datetime(2024, 1, 31, 23, 0, tzinfo=UTC))
            assert chunk is not None and chunk[0] == row[2]
        assert [b.start for b in BarStore(kolkata).read_bars(BTC, "1m", start, start + 60)] == [start]
    finally:
        kolkata.dispose()


def test_far_past_partition_is_made_on_upsert(engine: Engine) -> None:
    instant = datetime(2017, 3, 15, 12, 30, tzinfo=UTC)
    start = int(instant.timestamp())
    native = backend(engine) == "native"
    with engine.connect() as conn:
        if native:
            assert conn.execute(text("SELECT to_regclass('bars_p201703')")).scalar() is None
        else:
            assert chunk_of(engine, "bars", instant) is None
    assert BarStore(engine).upsert_bars([bar(start, "1180.12")]).inserted == 1
    with engine.connect() as conn:
        if native:
            assert conn.execute(text("SELECT to_regclass('bars_p201703')::text")).scalar() == "bars_p201703"
        else:
            assert chunk_of(engine, "bars", instant) is not None
    assert BarStore(engine).read_bars(BTC, "1m", start, start + 60) == [bar(start, "1180.12")]


def test_batches_stream_and_last_duplicate_wins(engine: Engine) -> None:
    store = BarStore(engine)
    bars = [bar(T0 + 60 * i, str(100 + i)) for i in range(25)]
    bars.insert(3, bar(T0, "55"))  # an earlier version of the first bucket, inside the first batch
    bars.append(bar(T0 + 60 * 24, "77"))  # a later version of the last bucket, in the same last batch
    result = store.upsert_bars(iter(bars), batch_size=10)
    assert result.inserted == 25 and result.written == result.inserted + result.updated
    got = {b.start: b.close for b in store.read_bars(BTC, "1m", T0, T0 + 3600)}
    assert got[T0 + 60] == Decimal("101")
    assert got[T0 + 60 * 24] == Decimal("77")
    assert len(got) == 25


def test_mixed_new_and_stored_buckets_in_one_batch(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([bar(T0 + 60, "1")])
    result = store.upsert_bars([bar(T0, "2"), bar(T0 + 60, "1"), bar(T0 + 120, "3"), bar(T0, "2", instrument="x:A-B")])
    assert result == UpsertResult(inserted=3, updated=0, unchanged=1)


def test_refuses_misaligned_and_float_bars(engine: Engine) -> None:
    store = BarStore(engine)
    with pytest.raises(ValueError, match="boundary"):
        store.upsert_bars([bar(T0 + 30, "1")])
    with pytest.raises(ValueError, match="unknown interval"):
        store.upsert_bars([replace(bar(T0, "1"), interval="2m")])
    with pytest.raises(TypeError, match="finite Decimals"):
        store.upsert_bars([replace(bar(T0, "1"), close=1.0)])
    with pytest.raises(TypeError, match="finite Decimals"):
        store.upsert_bars([replace(bar(T0, "1"), high=Decimal("NaN"))])
    assert store.count_bars(BTC, "1m", T0, T0 + 3600) == 0


def test_text_fields_are_escaped(engine: Engine) -> None:
    odd = bar(T0, "1", source="tab\there\\back\nslash")
    BarStore(engine).upsert_bars([odd])
    assert BarStore(engine).read_bars(BTC, "1m", T0, T0 + 60) == [odd]


def test_interval_enum_members_are_stored_as_their_value(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([replace(bar(T0, "1"), interval=Interval.M1)])
    assert store.bucket_starts(BTC, Interval.M1, T0, T0 + 60) == [T0]


def test_latest_start_and_counts(engine: Engine) -> None:
    store = BarStore(engine)
    assert store.latest_start(BTC) is None
    store.upsert_bars([bar(T0 + 60 * i, "1") for i in (0, 1, 5)])
    assert store.latest_start(BTC, Interval.M1) == T0 + 300
    assert store.bucket_starts(BTC, "1m", T0 + 1, T0 + 301) == [T0 + 60, T0 + 300]
    assert store.count_bars(BTC, "1m", T0, T0 + 3600) == 3
    assert store.read_bars(BTC, "1m", T0, T0 + 3600, limit=2) == [bar(T0, "1"), bar(T0 + 60, "1")]


def test_concurrent_writer_during_the_copy_fast_path(engine: Engine) -> None:
    """A bucket stored by another transaction after the batch looked (and found none) makes the
    COPY fail with a unique violation; the batch then takes the merge path and nothing is lost."""
    store = BarStore(engine)
    store.upsert_bars([bar(T0 + 3600, "1")])  # partitions made; T0..T0+120 still empty
    other = engine.connect()
    other.execute(text(
        "INSERT INTO bars (instrument, interval, bucket, open, high, low, close, volume, quote_volume, trades,"
        " source, final) VALUES (:i, '1m', to_timestamp(:s), 5, 6, 4, 5, 1, 5, 1, 'other', true)"
    ), {"i": BTC, "s": T0 + 60})  # not committed yet: invisible to the batch's check
    results: list[UpsertResult] = []
    writer = threading.Thread(target=lambda: results.append(
        store.upsert_bars([bar(T0, "10"), bar(T0 + 60, "11"), bar(T0 + 120, "12")])))
    writer.start()
    time.sleep(0.5)  # the COPY now waits on the other transaction's row
    other.commit()
    other.close()
    writer.join(30)
    assert results == [UpsertResult(inserted=2, updated=1, unchanged=0)]
    assert [(b.close, b.revision) for b in store.read_bars(BTC, "1m", T0, T0 + 180)] == [
        (Decimal("10"), 0), (Decimal("11"), 1), (Decimal("12"), 0)
    ]


def test_latest_final_start_is_the_newest_final_stored_bar_of_the_range(engine: Engine) -> None:
    store = BarStore(engine)
    assert store.latest_final_start(BTC, Interval.M1, T0, T0 + 3600) is None
    store.upsert_bars([
        bar(T0, "1"), bar(T0 + 60, "2"), bar(T0 + 120, "3", final=False, source="stream"),
        bar(T0 + 180, "4", instrument="x:A-B"), bar(T0 + 3600, "5", interval="1h"),
    ])
    assert store.latest_final_start(BTC, Interval.M1, T0, T0 + 3600) == T0 + 60  # provisional T0+120 skipped
    assert store.latest_final_start(BTC, "1m", T0, T0 + 60) == T0  # end is exclusive
    assert store.latest_final_start(BTC, "1m", T0 + 61, T0 + 3600) is None  # start is inclusive, only T0+120 after
    assert store.latest_final_start(BTC, "1m", T0 + 60, T0 + 61) == T0 + 60
    assert store.latest_final_start("x:A-B", "1m", T0, T0 + 3600) == T0 + 180
    assert store.latest_final_start(BTC, Interval.H1, T0, T0 + 7200) == T0 + 3600  # stored rows of that interval


def test_latest_start_before_looks_at_the_given_stored_intervals_only(engine: Engine) -> None:
    store = BarStore(engine)
    assert store.latest_start_before(BTC, [Interval.M1], T0 + 86400) is None
    store.upsert_bars([
        bar(T0, "1"), bar(T0 + 60, "2", final=False), bar(T0 + 7200, "3", interval="1h"),
        bar(T0 + 600, "4", instrument="x:A-B"),
    ])
    assert store.latest_start_before(BTC, [Interval.M1], T0 + 86400) == T0 + 60  # provisional bars count
    assert store.latest_start_before(BTC, ["1m"], T0 + 60) == T0  # `before` is exclusive
    assert store.latest_start_before(BTC, ["1m"], T0) is None
    assert store.latest_start_before(BTC, [Interval.M1, Interval.H1], T0 + 86400) == T0 + 7200
    assert store.latest_start_before(BTC, [Interval.M1, "1h"], T0 + 7200) == T0 + 60
    assert store.latest_start_before(BTC, [Interval.M5], T0 + 86400) is None  # derived intervals are not stored
    assert store.latest_start_before("x:A-B", ["1m"], T0 + 86400) == T0 + 600


def test_copy_csv_streams_what_read_bars_reads_as_csv(engine: Engine) -> None:
    store = BarStore(engine)
    bars = [
        bar(T0, "100.50"),
        replace(bar(T0 + 60, "0.00000001", final=False, source="a,b"), trades=None),
        bar(T0 + 300, "7"),
        bar(T0 + 3600, "9", instrument="x:A-B"),
    ]
    store.upsert_bars(bars)
    expected = [  # NUMERIC as PostgreSQL prints it (trailing zeros kept, no exponent), CSV quoting
        f"{T0},100.50,101.50,99.50,100.50,1.5,150.750,7,cryptocompare,true\n".encode(),
        f"{T0 + 60},0.00000001,1.00000001,-0.99999999,0.00000001,1.5,0.000000015,,\"a,b\",false\n".encode(),
        f"{T0 + 300},7,8,6,7,1.5,10.5,7,cryptocompare,true\n".encode(),
    ]
    chunks = list(store.copy_csv(BTC, "1m", T0, T0 + 3600))
    assert b"".join(chunks) == b"".join(expected)
    assert b"".join(store.copy_csv(BTC, Interval.M1, T0 + 1, T0 + 300)) == expected[1]  # starts in [start, end)
    small = list(store.copy_csv(BTC, "1m", T0, T0 + 3600, chunk_bytes=10))
    assert len(small) > 1 and b"".join(small) == b"".join(chunks)  # chunks of about chunk_bytes
    assert list(store.copy_csv(BTC, "1m", T0 + 3600, T0 + 7200)) == []


def test_copy_csv_of_a_derived_interval_matches_read_bars(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([bar(T0 + 60 * i, f"{100 + i}.5") for i in range(12)])
    rows = [line.split(",") for line in b"".join(store.copy_csv(BTC, "5m", T0, T0 + 3600)).decode().splitlines()]
    read = store.read_bars(BTC, Interval.M5, T0, T0 + 3600)
    assert len(read) == 3
    assert rows == [
        [str(b.start), str(b.open), str(b.high), str(b.low), str(b.close), str(b.volume), str(b.quote_volume),
         str(b.trades), b.source, "true" if b.final else "false"]
        for b in read
    ]


def row_versions(engine: Engine) -> dict[int, tuple[str, str]]:
    """(xmin, xmax) of each stored bar: a new row version changes xmin; a lock (what ON CONFLICT DO
    UPDATE takes on the conflicting row, even when its WHERE refuses the update) sets xmax."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT extract(epoch FROM bucket)::bigint, xmin::text, xmax::text FROM bars"))
        return {start: (xmin, xmax) for start, xmin, xmax in rows}


def test_unchanged_bars_are_skipped_before_the_merge_touches_their_rows(engine: Engine) -> None:
    """Under TimescaleDB an ON CONFLICT that reaches a row of a compressed chunk decompresses it, even
    when nothing changes; so unchanged rows (and refused provisional ones) must not reach the merge.
    Here that shows as: their row is neither rewritten nor locked. Under TimescaleDB the compressed
    chunk stays compressed."""
    store = BarStore(engine)
    bars = [bar(T0 + 60 * k, str(100 + k)) for k in range(5)]
    store.upsert_bars(bars)
    compressed = backend(engine) == "timescaledb"
    if compressed:
        with engine.begin() as conn:
            conn.execute(text("SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks('bars') c"))
    before = row_versions(engine)
    assert all(xmax == "0" for _, xmax in before.values())
    # The same bars, a provisional bar a final one refuses, and one real change.
    again = [*bars[:3], bar(T0 + 180, "999", final=False, source="stream"), bar(T0 + 240, "104.5")]
    assert store.upsert_bars(again) == UpsertResult(0, 1, 4)
    after = row_versions(engine)
    assert {s: after[s] for s in list(after)[:4]} == {s: before[s] for s in list(before)[:4]}
    assert after[T0 + 240][0] != before[T0 + 240][0]  # the changed one is a new row version
    assert stored(engine, T0 + 180)["close"] == Decimal("103")
    if compressed:
        with engine.connect() as conn:
            assert conn.execute(text(
                "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks WHERE hypertable_name = 'bars'"
                " AND range_start <= to_timestamp(:t) AND to_timestamp(:t) < range_end"), {"t": T0}).scalar()  # fmt: skip
