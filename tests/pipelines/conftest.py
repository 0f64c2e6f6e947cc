"""Fixtures for the Dagster code: a real test instance, the test database, the simulator source."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest

from pipelines.resources import CandlekeepResource

BTC = "cccagg:BTC-USD"
ETH = "cccagg:ETH-USD"


@pytest.fixture
def candlekeep(engine, database_url: str) -> CandlekeepResource:
    """The pipelines' resource on the (emptied) test database, with the offline simulator."""
    return CandlekeepResource(source="simulator", database_url=database_url, simulator_seed=0)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A persistent (temp-dir) Dagster instance, with BTC as an instrument partition."""
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions("instruments", [BTC])
        yield inst
