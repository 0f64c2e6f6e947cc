"""The Source interface: where bars (and, for some sources, trades) come from.

A source only fetches and normalizes: it returns typed records and never touches storage, Kafka or
Dagster. Implementations are picked by settings (`candlekeep.sources.make_source`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from candlekeep.bars import Bar, Interval
from candlekeep.instruments import Instrument


class SourceError(Exception):
    """A source could not deliver what was asked."""


class Source(Protocol):
    name: str  # recorded in `bars.source` for every bar this source writes

    def bars(self, instrument: Instrument, interval: Interval, start: int, end: int) -> Iterator[list[Bar]]:
        """Closed bars with `start <= bar.start < end` (unix s), as pages.

        Pages are bounded in size (memory stays flat for any range), may arrive in any order,
        and together hold each bucket at most once. A bucket that has not closed yet is never
        returned; a bucket the source has no data for is simply absent (a gap).
        """
        ...
