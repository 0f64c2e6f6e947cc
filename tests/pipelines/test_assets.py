"""The bar assets, materialized offline with the simulator into the real test database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal

import dagster as dg

from candlekeep.bars import Bar, Interval
from candlekeep.instruments import Instrument
from candlekeep.sources.simulator import Simulator
from candlekeep.storage.bars import BarStore
from candlekeep.storage.coverage import CoverageStore
from pipelines.assets import bars_1d, bars_1m, materialize_range
from pipelines.resources import CandlekeepResource
from tests.pipelines.conftest import BTC, ETH


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def key(day: str, instrument: str = BTC) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"date": day, "instrument": instrument})


def metadata(result: dg.ExecuteInProcessResult, node: str = "bars_1m") -> dict:
    (mat, *_) = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in mat.metadata.items()}


def checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def simulated(instrument: str, start: int, end: int) -> list[tuple]:
    bars = Simulator(seed=0).bars(Instrument.parse(instrument), Interval.M1, start, end)
    return [_exact(b) for page in bars for b in page]


def _exact(b: Bar) -> tuple:
    return (b.instrument, b.interval, b.start, str(b.open), str(b.high), str(b.low), str(b.close), str(b.volume),
            str(b.quote_volume), b.trades, b.source, b.final)  # fmt: skip


def test_one_partition_lands_in_the_bars_table_checked_and_rerun_changes_nothing(candlekeep, instance, engine):
    first = dg.materialize([bars_1m], partition_key=key("2024-03-01"), resources={"candlekeep": candlekeep},
                           instance=instance)  # fmt: skip

    assert first.success
    stored = BarStore(engine).read_bars(BTC, Interval.M1, ts("2024-03-01"), ts("2024-03-02"))
    assert [_exact(b) for b in stored] == simulated(BTC, ts("2024-03-01"), ts("2024-03-02"))
    meta = metadata(first)
    assert (meta["rows"], meta["inserted"], meta["updated"], meta["unchanged"]) == (1440, 1440, 0, 0)
    assert (meta["source"], meta["gaps"], meta["missing_buckets"], meta["partitions"]) == ("simulator", 0, 0, 1)
    assert meta["first_gaps"] == [] and meta["coverage"] == {"complete": 1, "gaps": 0, "empty": 0, "open": 0}
    results = checks(first)
    assert {name: c.passed for name, c in results.items()} == {"ohlc_consistent": True, "complete": True}
    assert results["ohlc_consistent"].metadata["bars_checked"].value == 1440
    assert results["complete"].metadata["periods_complete"].value == 1
    assert instance.get_materialized_partitions(bars_1m.key) == {str(key("2024-03-01"))}

    again = dg.materialize([bars_1m], partition_key=key("2024-03-01"), resources={"candlekeep": candlekeep},
                           instance=instance)  # fmt: skip
    meta = metadata(again)
    assert (meta["rows"], meta["inserted"], meta["updated"], meta["unchanged"]) == (1440, 0, 0, 1440)
    assert [_exact(b) for b in BarStore(engine).read_bars(BTC, Interval.M1, ts("2024-03-01"), ts("2024-03-02"))] == \
        simulated(BTC, ts("2024-03-01"), ts("2024-03-02"))  # fmt: skip


def test_materialize_range_backfills_three_days_in_one_run_then_per_batch(candlekeep, instance, engine):
    seen: list[str] = []
    summaries = materialize_range(instrument=ETH, interval="1m", start=date(2024, 3, 1), end=date(2024, 3, 4),
                                  source="simulator", instance=instance, candlekeep=candlekeep,
                                  on_partition=seen.append)  # fmt: skip

    assert seen == [str(key(d, ETH)) for d in ("2024-03-01", "2024-03-02", "2024-03-03")]
    (summary,) = summaries  # one single-run range: one paged stream
    assert (summary.start, summary.end, summary.rows, summary.inserted, summary.gaps) == (
        date(2024, 3, 1), date(2024, 3, 4), 3 * 1440, 3 * 1440, 0)  # fmt: skip
    assert summary.checks == {"ohlc_consistent": True, "complete": True} and summary.source == "simulator"
    assert ETH in instance.get_dynamic_partitions("instruments")
    assert instance.get_materialized_partitions(bars_1m.key) == set(seen)
    stored = BarStore(engine).read_bars(ETH, Interval.M1, ts("2024-03-01"), ts("2024-03-04"))
    assert [_exact(b) for b in stored] == simulated(ETH, ts("2024-03-01"), ts("2024-03-04"))
    coverage = CoverageStore(engine).read(instrument=ETH, interval="1m")
    assert [(r.day, r.rows, r.status) for r in coverage] == [
        (date(2024, 3, d), 1440, "complete") for d in (1, 2, 3)
    ]

    # Two partitions per run: a range run and a single-partition run; nothing changes.
    again = materialize_range(instrument=ETH, interval=Interval.M1, start=date(2024, 3, 1), end=date(2024, 3, 4),
                              source=None, instance=instance, candlekeep=candlekeep, partitions_per_run=2)  # fmt: skip
    assert [(s.start, s.end, s.unchanged, s.inserted + s.updated) for s in again] == [
        (date(2024, 3, 1), date(2024, 3, 3), 2880, 0),
        (date(2024, 3, 3), date(2024, 3, 4), 1440, 0),
    ]


class Holey(CandlekeepResource):
    """The pipelines' resource with a source that has no data for a few minutes of 2024-03-01."""

    def make_source(self):
        return HoleySimulator()


HOLES = {ts("2024-03-01T10:00"), ts("2024-03-01T10:01"), ts("2024-03-01T17:30")}


class HoleySimulator:
    name = "simulator"

    def bars(self, instrument, interval, start, end) -> Iterator[list[Bar]]:
        for page in Simulator(seed=0).bars(instrument, interval, start, end):
            yield [b for b in page if b.start not in HOLES]


def test_checks_fail_on_a_bad_bar_and_list_the_gaps(database_url, engine, instance):
    bad_minute = ts("2024-03-01T17:30")  # a hole in the source: the bad bar stays as inserted
    price = Decimal("60000.00")
    bad = Bar(BTC, "1m", bad_minute, price, price, price + 5, price, Decimal("1"), price, 1, "manual")  # low > high
    BarStore(engine).upsert_bars([bad])

    result = dg.materialize([bars_1m], partition_key=key("2024-03-01"),
                            resources={"candlekeep": Holey(database_url=database_url)}, instance=instance)  # fmt: skip

    assert result.success  # checks report, they do not fail the run
    found = checks(result)
    ohlc, complete = found["ohlc_consistent"], found["complete"]
    assert not ohlc.passed and ohlc.severity == dg.AssetCheckSeverity.ERROR
    assert ohlc.metadata["offending_bars"].value == 1 and ohlc.metadata["bars_checked"].value == 1438
    (offender,) = ohlc.metadata["first_offending"].value
    assert offender["start"] == "2024-03-01T17:30:00+00:00" and offender["source"] == "manual"
    assert any("OHLC inconsistent" in p for p in offender["problems"])
    assert not complete.passed and complete.severity == dg.AssetCheckSeverity.WARN
    assert complete.metadata["buckets_missing"].value == 2
    assert complete.metadata["first_gaps"].value == [
        {"instrument": BTC, "start": "2024-03-01T10:00:00Z", "end": "2024-03-01T10:02:00Z", "buckets": 2}
    ]
    assert metadata(result)["missing_buckets"] == 2
    assert [(r.rows, r.status) for r in CoverageStore(engine).read(instrument=BTC, interval="1m")] == [(1438, "gaps")]


def test_daily_bars_for_a_month(candlekeep, instance, engine):
    result = dg.materialize([bars_1d], partition_key=key("2024-02-01"), resources={"candlekeep": candlekeep},
                            instance=instance)  # fmt: skip
    meta = metadata(result, "bars_1d")
    assert (meta["rows"], meta["inserted"], meta["interval"]) == (29, 29, "1d")
    assert {c.check_name: c.passed for c in result.get_asset_check_evaluations()} == {
        "ohlc_consistent": True, "complete": True}  # fmt: skip
    assert BarStore(engine).bucket_starts(BTC, Interval.D1, ts("2024-02-01"), ts("2024-03-01"), stored_only=True) == \
        list(range(ts("2024-02-01"), ts("2024-03-01"), 86_400))  # fmt: skip
