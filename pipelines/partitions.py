"""Partitions of the bar assets: UTC date (or month) x instrument.

- `instruments_partitions`: dynamic, one key per instrument id (`cccagg:BTC-USD`), added by
  `sensors.instruments_sensor` (and by `assets.materialize_range` for an ad-hoc backfill);
- `daily` / `monthly`: UTC time windows from the history start through the current (open) period
  (`end_offset=1`), keyed `YYYY-MM-DD` (a month by its first day);
- `bars_1m_partitions` = date x instrument; `bars_monthly_partitions` = month x instrument (1h, 1d).

The history start is `CANDLEKEEP_HISTORY_START` (default 2024-01-01), read once when this module is
imported; nothing here opens a connection.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

import dagster as dg

DEFAULT_HISTORY_START = date(2024, 1, 1)
DATE, INSTRUMENT = "date", "instrument"


def history_start() -> date:
    """First day offered as a partition: `CANDLEKEEP_HISTORY_START`, as `Settings.history_start` reads it."""
    raw = os.environ.get("CANDLEKEEP_HISTORY_START", "").strip()
    return date.fromisoformat(raw) if raw else DEFAULT_HISTORY_START


HISTORY_START = history_start()

instruments_partitions = dg.DynamicPartitionsDefinition(name="instruments")

daily = dg.DailyPartitionsDefinition(start_date=HISTORY_START.isoformat(), timezone="UTC", end_offset=1)
monthly = dg.MonthlyPartitionsDefinition(
    start_date=HISTORY_START.replace(day=1).isoformat(), timezone="UTC", end_offset=1
)

bars_1m_partitions = dg.MultiPartitionsDefinition({DATE: daily, INSTRUMENT: instruments_partitions})
bars_monthly_partitions = dg.MultiPartitionsDefinition({DATE: monthly, INSTRUMENT: instruments_partitions})


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Consecutive partitions of one instrument, fetched as one paged stream: `[start, end)` UTC."""

    instrument: str
    start: datetime
    end: datetime
    keys: tuple[str, ...]  # the multipartition keys covered, in time order

    @property
    def start_ts(self) -> int:
        return int(self.start.timestamp())

    @property
    def end_ts(self) -> int:
        return int(self.end.timestamp())


def partition_ranges(partition_keys: Iterable[str], partitions_def: dg.MultiPartitionsDefinition) -> list[PartitionRange]:
    """Group multipartition keys by instrument and merge adjacent time windows into ranges."""
    time_def = _time_dimension(partitions_def)
    by_instrument: dict[str, list[tuple[datetime, datetime, str]]] = {}
    for key in partition_keys:
        mpk = key if isinstance(key, dg.MultiPartitionKey) else partitions_def.get_partition_key_from_str(key)
        window = time_def.time_window_for_partition_key(mpk.keys_by_dimension[DATE])
        by_instrument.setdefault(mpk.keys_by_dimension[INSTRUMENT], []).append((window.start, window.end, str(mpk)))
    ranges: list[PartitionRange] = []
    for instrument in sorted(by_instrument):
        windows = sorted(by_instrument[instrument])
        start, end, keys = windows[0][0], windows[0][1], [windows[0][2]]
        for w_start, w_end, key in windows[1:]:
            if w_start == end:
                end = w_end
                keys.append(key)
            else:
                ranges.append(PartitionRange(instrument, _utc(start), _utc(end), tuple(keys)))
                start, end, keys = w_start, w_end, [key]
        ranges.append(PartitionRange(instrument, _utc(start), _utc(end), tuple(keys)))
    return ranges


def time_keys(partitions_def: dg.MultiPartitionsDefinition, start: date, end: date) -> list[str]:
    """Date-dimension keys of the periods touching `[start, end)` (dates, end exclusive)."""
    if end <= start:
        return []
    keys = []
    cursor = start if _time_dimension(partitions_def) == daily else start.replace(day=1)
    while cursor < end:
        keys.append(cursor.isoformat())
        cursor = _next_key_date(partitions_def, cursor)
    return keys


def multi_key(date_key: str, instrument: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({DATE: date_key, INSTRUMENT: instrument})


def _next_key_date(partitions_def: dg.MultiPartitionsDefinition, day: date) -> date:
    if _time_dimension(partitions_def) == daily:
        return date.fromordinal(day.toordinal() + 1)
    return date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)


def _time_dimension(partitions_def: dg.MultiPartitionsDefinition) -> dg.TimeWindowPartitionsDefinition:
    dims: Sequence = partitions_def.partitions_defs
    return next(d.partitions_def for d in dims if d.name == DATE)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)
