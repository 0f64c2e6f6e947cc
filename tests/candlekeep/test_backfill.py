"""candlekeep.backfill against the real test PostgreSQL: simulator bars in, the same bars out."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from candlekeep.backfill import backfill, coverage_periods, fetch_ranges
from candlekeep.bars import Bar, Interval
from candlekeep.instruments import Instrument
from candlekeep.sources.simulator import Simulator
from candlekeep.storage.bars import BarStore
from candlekeep.storage.coverage import CoverageStore

BTC = Instrument.parse("cccagg:BTC-USD")
DAY = 86_400


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def exact(bars: list[Bar]) -> list[tuple]:
    """Every field, decimals as text, so 1.50 and 1.5 differ (the store keeps the source's digits)."""
    return [
        (b.instrument, b.interval, b.start, str(b.open), str(b.high), str(b.low), str(b.close), str(b.volume),
         str(b.quote_volume), b.trades, b.source, b.final, b.revision)
        for b in bars
    ]  # fmt: skip


class GridSource:
    """A real Source: one flat bar per bucket of the range, except the buckets in `holes`.

    Cheap at any interval (the simulator builds an hour from 60 simulated minutes), with pages of
    `page_size` bars delivered newest first, as CryptoCompare's paging does.
    """

    name = "grid"

    def __init__(self, holes: set[int] = frozenset(), page_size: int = 500) -> None:
        self.holes = set(holes)
        self.page_size = page_size
        self.calls: list[tuple[int, int]] = []

    def bars(self, instrument: Instrument, interval: Interval, start: int, end: int) -> Iterator[list[Bar]]:
        self.calls.append((start, end))
        price = Decimal("100.25")
        buckets = [b for b in range(interval.ceil(start), end, interval.seconds) if b not in self.holes]
        for i in range(len(buckets), 0, -self.page_size):
            yield [
                Bar(instrument.id, interval.value, b, price, price, price, price, Decimal(0), Decimal(0), 0, self.name)
                for b in buckets[max(0, i - self.page_size) : i]
            ]


@pytest.fixture
def stores(engine):
    return BarStore(engine), CoverageStore(engine)


def test_two_days_of_simulator_bars_are_stored_exactly_and_rerun_changes_nothing(stores):
    bar_store, coverage_store = stores
    start, end, now = ts("2024-03-01"), ts("2024-03-03"), ts("2024-03-10")
    sim = Simulator(seed=7, now=lambda: now)
    pages: list[int] = []

    first = backfill(source=sim, bar_store=bar_store, coverage_store=coverage_store, instrument=BTC,
                     interval=Interval.M1, start=start, end=end, now=now, on_page=pages.append)  # fmt: skip

    truth = [bar for page in Simulator(seed=7, now=lambda: now).bars(BTC, Interval.M1, start, end) for bar in page]
    assert len(truth) == 2 * 1440
    assert exact(bar_store.read_bars(BTC.id, Interval.M1, start, end)) == exact(truth)
    assert (first.rows_fetched, first.inserted, first.updated, first.unchanged) == (2880, 2880, 0, 0)
    assert first.gaps == [] and first.source == "simulator" and sum(pages) == 2880 and len(pages) >= 2

    second = backfill(source=sim, bar_store=bar_store, coverage_store=coverage_store, instrument=BTC,
                      interval=Interval.M1, start=start, end=end, now=now)  # fmt: skip
    assert (second.rows_fetched, second.inserted, second.updated, second.unchanged) == (2880, 0, 0, 2880)
    assert exact(bar_store.read_bars(BTC.id, Interval.M1, start, end)) == exact(truth)

    rows = coverage_store.read(instrument=BTC.id, interval=Interval.M1)
    assert [(r.day, r.rows, r.status, r.source) for r in rows] == [
        (date(2024, 3, 1), 1440, "complete", "simulator"),
        (date(2024, 3, 2), 1440, "complete", "simulator"),
    ]


def test_the_open_day_is_clipped_at_now_and_recorded_open(stores):
    bar_store, coverage_store = stores
    now = ts("2024-03-02T12:00:30")  # the 12:00 bucket is still open
    sim = Simulator(seed=1, now=lambda: now)

    result = backfill(source=sim, bar_store=bar_store, coverage_store=coverage_store, instrument=BTC,
                      interval=Interval.M1, start=ts("2024-03-01"), end=ts("2024-03-03"), now=now)  # fmt: skip

    assert result.end == ts("2024-03-02T12:00")
    assert result.rows_fetched == 1440 + 720 and result.gaps == []
    starts = bar_store.bucket_starts(BTC.id, Interval.M1, ts("2024-03-01"), ts("2024-03-04"))
    assert max(starts) == ts("2024-03-02T11:59")  # nothing at or after the open bucket
    rows = {r.day: (r.rows, r.status) for r in coverage_store.read(instrument=BTC.id, interval=Interval.M1)}
    assert rows == {date(2024, 3, 1): (1440, "complete"), date(2024, 3, 2): (720, "open")}


def test_holes_in_the_source_are_reported_as_gaps(stores):
    bar_store, coverage_store = stores
    day = ts("2024-03-05")
    holes = {day + 60 * m for m in (0, 1, 2, 600)} | {day + DAY + 60 * m for m in range(1430, 1440)}
    now = ts("2024-04-01")

    result = backfill(source=GridSource(holes), bar_store=bar_store, coverage_store=coverage_store, instrument=BTC,
                      interval=Interval.M1, start=day, end=day + 2 * DAY, now=now)  # fmt: skip

    assert result.gaps == [
        (day, day + 180),
        (day + 36_000, day + 36_060),
        (day + DAY + 1430 * 60, day + 2 * DAY),
    ]
    assert result.missing_buckets == len(holes) == 14
    assert result.rows_fetched == result.inserted == 2 * 1440 - 14
    rows = {r.day: (r.rows, r.status, r.source) for r in coverage_store.read(instrument=BTC.id, interval=Interval.M1)}
    assert rows == {date(2024, 3, 5): (1436, "gaps", "grid"), date(2024, 3, 6): (1430, "gaps", "grid")}

    # A later source that fills the holes completes the days; the status follows the store.
    backfill(source=GridSource(), bar_store=bar_store, coverage_store=coverage_store, instrument=BTC,
             interval=Interval.M1, start=day, end=day + 2 * DAY, now=now)  # fmt: skip
    rows = {r.day: (r.rows, r.status) for r in coverage_store.read(instrument=BTC.id, interval=Interval.M1, start_day=date(2024, 3, 5))
            if r.source == "grid"}  # fmt: skip
    assert rows == {date(2024, 3, 5): (1440, "complete"), date(2024, 3, 6): (1440, "complete")}


def test_a_long_range_is_fetched_as_two_streams_and_the_seam_between_them_is_no_gap(stores):
    bar_store, coverage_store = stores
    day = ts("2024-03-05")
    seam = day + 60 * (5 * 1440 // 2)  # where fetch_ranges cuts five days
    holes = {seam - 120, seam - 60, seam, seam + 60} | {day + 60 * m for m in range(10)}
    source = GridSource(holes, page_size=700)
    pages: list[int] = []

    result = backfill(source=source, bar_store=bar_store, coverage_store=coverage_store, instrument=BTC,
                      interval=Interval.M1, start=day, end=day + 5 * DAY, now=ts("2024-04-01"), on_page=pages.append)  # fmt: skip

    assert sorted(source.calls) == [(day, seam), (seam, day + 5 * DAY)]
    assert result.gaps == [(day, day + 600), (seam - 120, seam + 120)]
    assert result.rows_fetched == result.inserted == sum(pages) == 5 * 1440 - len(holes)
    starts = bar_store.bucket_starts(BTC.id, Interval.M1, day, day + 5 * DAY)
    assert starts == sorted(set(range(day, day + 5 * DAY, 60)) - holes)
    rows = {r.day: (r.rows, r.status) for r in coverage_store.read(instrument=BTC.id, interval=Interval.M1)}
    assert rows == {date(2024, 3, 5): (1430, "gaps"), date(2024, 3, 6): (1440, "complete"),
                    date(2024, 3, 7): (1436, "gaps"), date(2024, 3, 8): (1440, "complete"),
                    date(2024, 3, 9): (1440, "complete")}  # fmt: skip

    again = backfill(source=GridSource(holes), bar_store=bar_store, coverage_store=coverage_store, instrument=BTC,
                     interval=Interval.M1, start=day, end=day + 5 * DAY, now=ts("2024-04-01"))  # fmt: skip
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 5 * 1440 - len(holes))


def test_fetch_ranges_cut_long_ranges_on_bucket_boundaries():
    day = ts("2024-03-05")
    assert fetch_ranges(Interval.M1, day, day + DAY) == [(day, day + DAY)]  # 1440 buckets: one stream
    assert fetch_ranges(Interval.M1, day, day + 30 * DAY) == [(day, day + 15 * DAY), (day + 15 * DAY, day + 30 * DAY)]
    three = fetch_ranges(Interval.H1, day, day + 4001 * 3600)
    assert [lo % 3600 for lo, _ in three] == [0, 0] and three[0][1] == three[1][0] and three[-1][1] == day + 4001 * 3600


def test_a_gap_across_midnight_is_one_range_and_clipped_to_the_range_asked(stores):
    bar_store, coverage_store = stores
    day = ts("2024-03-05")
    holes = {day + DAY - 120, day + DAY - 60, day + DAY, day + DAY + 60}  # 23:58 .. 00:01

    result = backfill(source=GridSource(holes), bar_store=bar_store, coverage_store=coverage_store, instrument=BTC,
                      interval=Interval.M1, start=day + 3600, end=day + DAY + 3600, now=ts("2024-04-01"))  # fmt: skip

    assert result.gaps == [(day + DAY - 120, day + DAY + 120)]
    assert result.start == day + 3600 and result.end == day + DAY + 3600


def test_an_empty_source_records_empty_days(stores):
    bar_store, coverage_store = stores
    day = ts("2024-03-05")
    everything = set(range(day, day + DAY, 60))
    result = backfill(source=GridSource(everything), bar_store=bar_store, coverage_store=coverage_store,
                      instrument=BTC, interval=Interval.M1, start=day, end=day + DAY, now=ts("2024-04-01"))  # fmt: skip
    assert result.rows_fetched == 0 and result.gaps == [(day, day + DAY)]
    (row,) = coverage_store.read(instrument=BTC.id, interval=Interval.M1)
    assert (row.day, row.rows, row.status) == (date(2024, 3, 5), 0, "empty")


def test_hourly_and_daily_coverage_is_per_month(stores):
    bar_store, coverage_store = stores
    start, end, now = ts("2024-02-01"), ts("2024-04-01"), ts("2024-03-20T06:30")
    hours = backfill(source=GridSource(), bar_store=bar_store, coverage_store=coverage_store, instrument=BTC,
                     interval=Interval.H1, start=start, end=end, now=now)  # fmt: skip
    days = backfill(source=GridSource(holes={ts("2024-02-10")}), bar_store=bar_store, coverage_store=coverage_store,
                    instrument=BTC, interval=Interval.D1, start=start, end=end, now=now)  # fmt: skip

    assert hours.rows_fetched == 29 * 24 + 19 * 24 + 6 and hours.end == ts("2024-03-20T06:00")
    assert days.rows_fetched == 29 + 19 - 1 and days.gaps == [(ts("2024-02-10"), ts("2024-02-11"))]
    rows = {(r.interval, r.day): (r.rows, r.status) for r in coverage_store.read(instrument=BTC.id)}
    assert rows == {
        ("1h", date(2024, 2, 1)): (696, "complete"),
        ("1h", date(2024, 3, 1)): (462, "open"),
        ("1d", date(2024, 2, 1)): (28, "gaps"),
        ("1d", date(2024, 3, 1)): (19, "open"),
    }


def test_a_range_entirely_in_the_future_fetches_nothing(stores):
    bar_store, coverage_store = stores
    source = GridSource()
    now = ts("2024-03-01T00:00:10")
    result = backfill(source=source, bar_store=bar_store, coverage_store=coverage_store, instrument=BTC,
                      interval=Interval.M1, start=ts("2024-03-01"), end=ts("2024-03-02"), now=now)  # fmt: skip
    assert source.calls == [] and result.rows_fetched == 0 and result.gaps == []
    (row,) = coverage_store.read(instrument=BTC.id, interval=Interval.M1)
    assert (row.rows, row.status) == (0, "open")


def test_coverage_periods_are_utc_days_below_an_hour_and_months_above():
    assert coverage_periods(Interval.M1, ts("2024-02-28T10:00"), ts("2024-03-01T00:01")) == [
        (ts("2024-02-28"), ts("2024-02-29")), (ts("2024-02-29"), ts("2024-03-01")), (ts("2024-03-01"), ts("2024-03-02")),
    ]  # fmt: skip
    assert coverage_periods(Interval.D1, ts("2023-12-15"), ts("2024-01-02")) == [
        (ts("2023-12-01"), ts("2024-01-01")), (ts("2024-01-01"), ts("2024-02-01")),
    ]  # fmt: skip


def test_real_recorded_cryptocompare_minutes_are_stored_digit_for_digit(stores):
    """The 1441 recorded BTC-USD minutes (2017-08-10 03:14 .. 08-11 03:14), paged over loopback."""
    from candlekeep.sources.cryptocompare import CryptoCompareClient
    from tests.utils.fixture_server import FixtureServer, PagedHistory, fixture_bytes

    bar_store, coverage_store = stores
    body = fixture_bytes("ohlcv/cryptocompare_min_api_v1_histominute_BTC_USD.body.json")
    history = PagedHistory(body, 60, pad_before_listing=True)
    rows = {int(r["time"]): r for r in _raw_rows(body)}
    day = ts("2017-08-10")
    with FixtureServer() as server:
        server.add_handler("/data/v2/histominute", history)
        client = CryptoCompareClient(base_url=server.url, api_key="test-key", page_size=500)
        result = backfill(source=client, bar_store=bar_store, coverage_store=coverage_store, instrument=BTC,
                          interval=Interval.M1, start=day, end=day + DAY, now=ts("2024-01-01"))  # fmt: skip

    assert (result.rows_fetched, result.inserted, result.source) == (1246, 1246, "cryptocompare")
    assert result.gaps == [(day, ts("2017-08-10T03:14"))]  # before the recording: a gap, not zero bars
    stored = bar_store.read_bars(BTC.id, Interval.M1, day, day + DAY)
    assert [b.start for b in stored] == list(range(ts("2017-08-10T03:14"), day + DAY, 60))
    for bar in stored:
        row = rows[bar.start]
        for attr, key in (("open", "open"), ("high", "high"), ("low", "low"), ("close", "close"),
                          ("volume", "volumefrom"), ("quote_volume", "volumeto")):  # fmt: skip
            assert getattr(bar, attr).as_tuple() == Decimal(row[key]).as_tuple(), (bar.start, attr)
    (row,) = coverage_store.read(instrument=BTC.id, interval=Interval.M1)
    assert (row.day, row.rows, row.status, row.source) == (date(2017, 8, 10), 1246, "gaps", "cryptocompare")


def _raw_rows(body: bytes) -> list[dict[str, str]]:
    """Number tokens of each recorded bar object, as written (the independent truth)."""
    import re

    text = body.decode()
    array = text[text.rindex('"Data":[') + len('"Data":[') :]
    array = array[: array.index("]")]
    number = re.compile(r'"(\w+)":(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?=[,}])')
    return [dict(number.findall(obj)) for obj in re.findall(r"\{[^{}]*\}", array)]
