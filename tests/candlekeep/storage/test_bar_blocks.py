"""BarStore.upsert_blocks against the real test PostgreSQL: the semantics of upsert_bars, by blocks.

The truth is what PostgreSQL holds, read back as text (`open::text`), against the text given.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text

from candlekeep.bar_block import BarBlock, blocks_from_bars
from candlekeep.bars import Bar, Interval
from candlekeep.storage.bars import BarStore, UpsertResult

BTC = "cccagg:BTC-USD"
T0 = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
COLUMNS = ("high", "low", "open", "volume", "quote_volume", "close")  # CryptoCompare's order


def block(first: int, n: int, *, close: str = "42001.19", final: bool = True, step: int = 60) -> BarBlock:
    starts = [first + step * i for i in range(n)]
    values = [f"42008.14\t41997.57\t42000.00\t100.78275516\t4232995.6400\t{close}" for _ in starts]
    return BarBlock(BTC, "1m", "cryptocompare", final, starts, values, COLUMNS)


@pytest.fixture
def streamed(monkeypatch: pytest.MonkeyPatch) -> list[UpsertResult | None]:
    """What each streamed batch returned (None: rolled back into a merge), in order."""
    results: list[UpsertResult | None] = []
    original = BarStore._stream_batch

    def spy(self: BarStore, *args: object) -> UpsertResult | None:
        results.append(original(self, *args))  # type: ignore[arg-type]
        return results[-1]

    monkeypatch.setattr(BarStore, "_stream_batch", spy)
    return results


def stored_text(engine: Engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT extract(epoch FROM bucket)::bigint, open::text, high::text, low::text, close::text, volume::text,"
            " quote_volume::text, trades, source, final, revision FROM bars WHERE instrument = :i ORDER BY bucket"
        ), {"i": BTC})]  # fmt: skip


def test_fresh_span_is_streamed_and_stored_digit_for_digit(engine: Engine, streamed: list) -> None:
    store = BarStore(engine)
    blocks = [block(T0 + 60 * 50, 50), block(T0, 50)]  # newest page first, as CryptoCompare pages
    written: list[int] = []
    result = store.upsert_blocks(iter(blocks), batch_rows=60, on_written=lambda b: written.append(len(b)),
                                 span=(BTC, Interval.M1, T0, T0 + 6000))  # fmt: skip
    assert result == UpsertResult(inserted=100)
    assert streamed == [UpsertResult(inserted=100)]  # one batch, streamed straight into bars
    assert written == [50, 50]
    rows = stored_text(engine)
    assert [r[0] for r in rows] == [T0 + 60 * i for i in range(100)]
    assert rows[0][1:] == ("42000.00", "42008.14", "41997.57", "42001.19", "100.78275516", "4232995.6400", None,
                           "cryptocompare", True, 0)  # fmt: skip


def test_rerun_is_unchanged_and_a_changed_value_is_a_revision(engine: Engine) -> None:
    store = BarStore(engine)
    span = (BTC, Interval.M1, T0, T0 + 6000)
    store.upsert_blocks([block(T0, 100)], span=span)
    assert store.upsert_blocks([block(T0, 100)], span=span) == UpsertResult(unchanged=100)
    # Numerically equal text ('42001.190' vs '42001.19') is no change, and the stored digits stay.
    assert store.upsert_blocks([block(T0, 100, close="42001.190")], span=span) == UpsertResult(unchanged=100)
    assert store.upsert_blocks([block(T0 + 60 * 40, 20, close="42001.5")], span=span) == UpsertResult(updated=20)
    rows = stored_text(engine)
    assert [(r[4], r[10]) for r in rows[39:61]] == [("42001.19", 0)] + [("42001.5", 1)] * 20 + [("42001.19", 0)]


def test_provisional_never_overwrites_final_and_final_overwrites_provisional(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_blocks([block(T0, 10)])
    assert store.upsert_blocks([block(T0, 10, close="1", final=False)]) == UpsertResult(unchanged=10)
    store.upsert_bars([Bar(BTC, "1m", T0 + 600, *(Decimal(1),) * 6, 3, "stream", False)])
    assert store.upsert_blocks([block(T0 + 600, 1)], span=(BTC, Interval.M1, T0, T0 + 660)) == UpsertResult(updated=1)
    rows = stored_text(engine)
    assert {r[4] for r in rows} == {"42001.19"} and all(r[9] for r in rows)
    assert rows[-1][7:] == (None, "cryptocompare", True, 1)


def test_a_span_partly_stored_is_merged(engine: Engine, streamed: list) -> None:
    store = BarStore(engine)
    store.upsert_blocks([block(T0 + 60 * 30, 10)])
    result = store.upsert_blocks([block(T0, 100)], span=(BTC, Interval.M1, T0, T0 + 6000))
    assert result == UpsertResult(inserted=90, unchanged=10)
    assert streamed == []
    assert len(stored_text(engine)) == 100


def test_a_concurrent_writer_inside_the_streamed_batch_rolls_it_back_into_a_merge(engine: Engine, streamed: list) -> None:
    store, other = BarStore(engine), BarStore(engine)

    def pages() -> Iterator[BarBlock]:
        yield block(T0 + 60 * 50, 50)
        # The span was empty when checked; a live writer now stores a provisional bar the next block holds.
        other.upsert_bars([Bar(BTC, "1m", T0 + 60 * 7, *(Decimal("9.9"),) * 6, 2, "stream", False)])
        yield block(T0, 50)
        yield block(T0 + 60 * 100, 50)  # a later batch, after the switch to merging

    result = store.upsert_blocks(pages(), batch_rows=100, span=(BTC, Interval.M1, T0, T0 + 9000))
    assert streamed == [None]  # the first batch met the stored bar; the next one was not streamed
    assert result == UpsertResult(inserted=149, updated=1)
    rows = stored_text(engine)
    assert len(rows) == 150 and {r[4] for r in rows} == {"42001.19"} and all(r[9] for r in rows)
    assert rows[7][10] == 1  # the provisional bar, finalized: one revision


def test_a_bucket_in_two_blocks_of_a_batch_keeps_the_last(engine: Engine) -> None:
    store = BarStore(engine)
    result = store.upsert_blocks([block(T0, 10), block(T0 + 300, 10, close="7")])
    assert result == UpsertResult(inserted=15)
    assert [r[4] for r in stored_text(engine)] == ["42001.19"] * 5 + ["7"] * 10


def test_a_block_outside_the_span_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="outside the span"):
        BarStore(engine).upsert_blocks([block(T0, 10)], span=(BTC, Interval.M1, T0, T0 + 300))
    assert stored_text(engine) == []  # its batch rolled back


def test_blocks_of_bars_store_what_upsert_bars_stores(engine: Engine) -> None:
    bars = [Bar(BTC, "1m", T0 + 60 * i, Decimal("1.50"), Decimal("2"), Decimal("1E-8"), Decimal("0.10"),
                Decimal("100.00000001"), Decimal("0"), i, "simulator") for i in range(5)]  # fmt: skip
    store = BarStore(engine)
    assert store.upsert_blocks(blocks_from_bars(bars)) == UpsertResult(inserted=5)
    by_blocks = stored_text(engine)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE bars"))
    store.upsert_bars(bars)
    assert by_blocks == stored_text(engine)
    assert by_blocks[0][1:8] == ("1.50", "2", "0.00000001", "0.10", "100.00000001", "0", 0)


def test_count_stored_counts_each_range_at_its_interval(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_blocks([block(T0, 100)])
    ranges = [(T0, T0 + 600), (T0 + 600, T0 + 86400), (T0 + 86400, T0 + 2 * 86400), (T0, T0)]
    assert store.count_stored(BTC, Interval.M1, ranges) == [10, 90, 0, 0]
    assert store.count_stored(BTC, Interval.H1, ranges) == [0, 0, 0, 0]
    assert store.count_stored(BTC, Interval.M1, []) == []


def test_a_source_error_mid_batch_rolls_the_batch_back_and_is_raised(engine: Engine) -> None:
    class SourceDown(Exception):
        pass

    def pages() -> Iterator[BarBlock]:
        yield block(T0, 50)
        yield block(T0 + 3000, 50)
        yield block(T0 + 6000, 50)
        raise SourceDown("HTTP 503")

    written: list[int] = []
    with pytest.raises(SourceDown):
        BarStore(engine).upsert_blocks(pages(), batch_rows=100, on_written=lambda b: written.append(len(b)),
                                       span=(BTC, Interval.M1, T0, T0 + 9000))  # fmt: skip
    assert written == [50, 50]  # the first batch was committed; the second, cut short, was not
    assert len(stored_text(engine)) == 100
