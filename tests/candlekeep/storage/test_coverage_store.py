"""CoverageStore round trips."""

from __future__ import annotations

from datetime import date

import pytest
from sqlalchemy import Engine

from candlekeep.bars import Interval
from candlekeep.storage.coverage import CoverageStore

BTC = "cccagg:BTC-USD"


def test_record_and_read(engine: Engine) -> None:
    store = CoverageStore(engine)
    store.record(instrument=BTC, interval=Interval.M1, day=date(2024, 1, 2), source="cryptocompare", rows=1440,
                 status="complete")
    store.record(instrument=BTC, interval="1m", day=date(2024, 1, 1), source="cryptocompare", rows=1400,
                 status="gaps")
    store.record(instrument=BTC, interval="1h", day=date(2024, 1, 1), source="cryptocompare", rows=744,
                 status="complete")
    store.record(instrument="cccagg:ETH-USD", interval="1m", day=date(2024, 1, 1), source="cryptocompare", rows=0,
                 status="empty")

    rows = store.read(instrument=BTC)
    assert [(r.day, r.interval, r.rows, r.status) for r in rows] == [
        (date(2024, 1, 1), "1h", 744, "complete"),
        (date(2024, 1, 1), "1m", 1400, "gaps"),
        (date(2024, 1, 2), "1m", 1440, "complete"),
    ]
    assert all(r.instrument == BTC and r.source == "cryptocompare" for r in rows)
    assert all(r.fetched_at.tzinfo is not None for r in rows)

    only_1m = store.read(instrument=BTC, interval=Interval.M1, start_day=date(2024, 1, 2))
    assert [(r.day, r.status) for r in only_1m] == [(date(2024, 1, 2), "complete")]
    before = store.read(instrument=BTC, interval="1m", end_day=date(2024, 1, 2))  # end_day is exclusive
    assert [(r.day, r.status) for r in before] == [(date(2024, 1, 1), "gaps")]


def test_record_again_replaces(engine: Engine) -> None:
    store = CoverageStore(engine)
    store.record(instrument=BTC, interval="1m", day=date(2024, 1, 1), source="simulator", rows=10, status="open")
    first = store.read(instrument=BTC)[0]
    store.record(instrument=BTC, interval="1m", day=date(2024, 1, 1), source="simulator", rows=1440,
                 status="complete")
    (row,) = store.read(instrument=BTC)
    assert (row.rows, row.status) == (1440, "complete")
    assert row.fetched_at >= first.fetched_at


def test_bad_status_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="invalid coverage status"):
        CoverageStore(engine).record(instrument=BTC, interval="1m", day=date(2024, 1, 1), source="x", rows=1,
                                     status="done")
