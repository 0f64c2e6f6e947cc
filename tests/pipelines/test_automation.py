"""The instruments sensor and the refresh schedules, evaluated against a real test instance."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dagster as dg

from candlekeep.storage.instruments import InstrumentStore
from pipelines.definitions import defs
from pipelines.schedules import bars_1m_refresh_schedule, bars_monthly_refresh_schedule
from pipelines.sensors import instruments_sensor
from tests.pipelines.conftest import BTC, ETH

SOL = "cccagg:SOL-USD"
BINANCE_ETH = "binance:ETH-USDT"


def test_sensor_adds_configured_and_stored_instruments_once(candlekeep, instance, engine, monkeypatch):
    monkeypatch.setenv("CANDLEKEEP_INSTRUMENTS", f"{BTC},{ETH}")
    InstrumentStore(engine).register([BINANCE_ETH, SOL], tracked=True)

    with dg.build_sensor_context(instance=instance, cursor=None, resources={"candlekeep": candlekeep}) as context:
        result = instruments_sensor(context)

    (request,) = result.dynamic_partitions_requests
    assert request.partitions_def_name == "instruments"
    assert list(request.partition_keys) == sorted([ETH, BINANCE_ETH, SOL])  # BTC is a partition already
    assert json.loads(result.cursor) == sorted([BTC, ETH, BINANCE_ETH, SOL])
    instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))  # what the daemon does

    with dg.build_sensor_context(instance=instance, cursor=result.cursor, resources={"candlekeep": candlekeep}) as context:
        again = instruments_sensor(context)
    assert again.dynamic_partitions_requests == [] and again.skip_reason is not None


def test_sensor_removes_the_partition_of_an_untracked_instrument(candlekeep, instance, engine, monkeypatch):
    """Untracked (not configured): its partition goes, so no hourly refresh fails on it; bars stay."""
    monkeypatch.setenv("CANDLEKEEP_INSTRUMENTS", BTC)
    store = InstrumentStore(engine)
    store.register([BINANCE_ETH, SOL], tracked=True)
    instance.add_dynamic_partitions("instruments", [BTC, BINANCE_ETH, SOL])
    store.set_tracked(SOL, False)  # what `candlekeep untrack` / DELETE /v1/instruments does without a broker
    store.set_tracked(BTC, False)  # configured: stays a partition whatever its row says

    with dg.build_sensor_context(instance=instance, cursor=None, resources={"candlekeep": candlekeep}) as context:
        result = instruments_sensor(context)

    (request,) = result.dynamic_partitions_requests
    assert isinstance(request, dg.DeleteDynamicPartitionsRequest)
    assert list(request.partition_keys) == [SOL]


def test_sensor_still_adds_the_configured_instruments_without_a_database(instance, monkeypatch):
    from pipelines.resources import CandlekeepResource

    monkeypatch.setenv("CANDLEKEEP_INSTRUMENTS", ETH)
    unreachable = CandlekeepResource(source="simulator", database_url="postgresql://nobody@127.0.0.1:1/none")
    with dg.build_sensor_context(instance=instance, cursor=None, resources={"candlekeep": unreachable}) as context:
        result = instruments_sensor(context)
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [[ETH]]


def test_hourly_schedule_refreshes_yesterday_and_today_for_each_instrument(instance):
    instance.add_dynamic_partitions("instruments", [ETH])
    tick = datetime(2024, 3, 10, 0, 5, tzinfo=UTC)
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=tick,
                                        repository_def=defs.get_repository_def())  # fmt: skip
    data = bars_1m_refresh_schedule.evaluate_tick(context)

    assert sorted(r.partition_key for r in data.run_requests) == [
        f"2024-03-09|{BTC}", f"2024-03-09|{ETH}", f"2024-03-10|{BTC}", f"2024-03-10|{ETH}",
    ]  # fmt: skip
    assert all(r.tags["dagster/partition/date"] in ("2024-03-09", "2024-03-10") for r in data.run_requests)
    assert len({r.run_key for r in data.run_requests}) == 4
    assert bars_1m_refresh_schedule.job_name == "bars_1m_refresh"


def test_monthly_schedule_refreshes_last_and_this_month(instance):
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=datetime(2024, 3, 1, 0, 15, tzinfo=UTC),
                                        repository_def=defs.get_repository_def())  # fmt: skip
    data = bars_monthly_refresh_schedule.evaluate_tick(context)
    assert sorted(r.partition_key for r in data.run_requests) == [f"2024-02-01|{BTC}", f"2024-03-01|{BTC}"]


def test_schedules_skip_without_instruments():
    with dg.instance_for_test() as empty:
        context = dg.build_schedule_context(instance=empty, scheduled_execution_time=datetime(2024, 3, 10, 1, 5, tzinfo=UTC))
        assert isinstance(bars_1m_refresh_schedule(context), dg.SkipReason)
