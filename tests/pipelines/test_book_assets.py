"""book_metrics_1m materialized for real: the day's stored outputs rolled up, checked against pandas."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import dagster as dg
import pandas as pd
from sqlalchemy import Engine, text

from candlekeep.bars import NS_PER_S
from candlekeep.book_analytics import book_output
from candlekeep.instruments import Instrument
from candlekeep.sources.simulator import Simulator
from candlekeep.sources.simulator_book import SimulatorBooks
from candlekeep.storage.books import BookStore
from pipelines.book_assets import book_instruments, book_instruments_sensor, book_metrics_1m

INST = "kraken:BTC-USD"
DAY = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp())


def _fill(engine: Engine, every_s: int, skip: range = range(0)) -> list:
    sim = SimulatorBooks(Simulator(4, now=lambda: 4e9), levels=25)
    inst = Instrument.parse(INST)
    outs = [book_output(INST, s * NS_PER_S, *sim.book_at(inst, s), sequence=s, verified=True, source="simulator",
                        width=Decimal("10"))
            for s in range(DAY, DAY + 86_400, every_s) if s not in skip]  # fmt: skip
    BookStore(engine).insert(outs)
    return outs


def _stored(engine: Engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT (extract(epoch FROM bucket))::bigint, samples, mid_open, mid_high, mid_low, mid_close, spread_open,"
            " spread_high, spread_low, spread_close, imbalance_5_open, imbalance_5_high, imbalance_5_low,"
            " imbalance_5_close, bid_depth_50_min, bid_depth_50_max, ask_depth_50_min, ask_depth_50_max"
            " FROM book_metrics_1m WHERE instrument = :i ORDER BY bucket"), {"i": INST})]  # fmt: skip


def _key() -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"date": "2024-03-01", "instrument": INST})


def test_a_day_rolls_up_like_pandas_and_a_rerun_gives_the_same_rows(candlekeep, engine: Engine) -> None:
    outs = _fill(engine, 15)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(book_instruments.name, [INST])
        first = dg.materialize([book_metrics_1m], partition_key=_key(), resources={"candlekeep": candlekeep},
                               instance=instance)  # fmt: skip
        assert first.success
        rows = _stored(engine)
        frame = pd.DataFrame([(o.ts_ns // NS_PER_S // 60 * 60, o.summary.mid, o.summary.spread,
                               o.metrics.imbalance_levels[5], o.summary.bid_depth[50], o.summary.ask_depth[50])
                              for o in outs], columns=["minute", "mid", "spread", "imb", "bd", "ad"])  # fmt: skip
        g = frame.groupby("minute")
        expected = []
        for minute, grp in g:
            expected.append((minute, len(grp), *(v for col in ("mid", "spread", "imb") for v in
                             (grp[col].iloc[0], grp[col].max(), grp[col].min(), grp[col].iloc[-1])),
                             grp.bd.min(), grp.bd.max(), grp.ad.min(), grp.ad.max()))  # fmt: skip
        assert len(rows) == 1440 and rows == expected
        (check,) = first.get_asset_check_evaluations()
        assert check.passed and check.metadata["minutes_present"].value == 1440
        again = dg.materialize([book_metrics_1m], partition_key=_key(), resources={"candlekeep": candlekeep},
                               instance=instance)  # fmt: skip
        assert again.success and _stored(engine) == rows


def test_missing_minutes_warn_and_are_listed(candlekeep, engine: Engine) -> None:
    _fill(engine, 30, skip=range(DAY + 600, DAY + 720))  # minutes 10 and 11 without outputs
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(book_instruments.name, [INST])
        result = dg.materialize([book_metrics_1m], partition_key=_key(), resources={"candlekeep": candlekeep},
                                instance=instance)  # fmt: skip
        (check,) = result.get_asset_check_evaluations()
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        assert check.metadata["missing_minutes"].value == 2
        assert check.metadata["first_missing"].value == ["2024-03-01T00:10:00Z", "2024-03-01T00:11:00Z"]
        assert len(_stored(engine)) == 1438


def test_sensor_adds_instruments_with_stored_books(candlekeep, engine: Engine) -> None:
    _fill(engine, 3600)
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources={"candlekeep": candlekeep}) as context:
            result = book_instruments_sensor(context)
        (request,) = result.dynamic_partitions_requests
        assert list(request.partition_keys) == [INST]
