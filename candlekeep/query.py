"""OHLCV queries: validate a request into an `OhlcvQuery` (instrument resolved, buckets aligned, caps).

Every door (the CLI's `candlekeep ohlcv`, `GET /v1/ohlcv`, the UDF feed, `WS /v1/stream`) builds its
query here and answers it through the one read path, `candlekeep.serving.OhlcvService.read`, so they
cannot disagree. Bad input raises `QueryError` with a message that names the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

from candlekeep.bars import Interval
from candlekeep.instruments import Instrument, InstrumentError, resolve_instrument

# No request may make the database run an unbounded query.
MAX_BARS_PER_QUERY = 100_000
# Nothing before Bitcoin's first exchange trades, nothing absurdly far ahead.
EARLIEST = int(datetime(2009, 1, 1, tzinfo=UTC).timestamp())
LATEST = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp())

_UNIX_RE = re.compile(r"^[0-9]{1,12}$")  # ASCII digits only: `\d` would take "١٧٠٤" for unix seconds


class QueryError(ValueError):
    """A query that cannot be answered as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class OhlcvQuery:
    instrument: Instrument
    interval: Interval
    start: int  # unix s, inclusive, on a bucket edge
    end: int  # unix s, exclusive, on a bucket edge


def parse_timestamp(text: str, *, name: str) -> int:
    """Unix seconds, or an ISO-8601 date/datetime (naive means UTC), to unix seconds."""
    raw = text.strip()
    if _UNIX_RE.match(raw):
        return int(raw)
    try:
        if len(raw) == 10:
            parsed = datetime.combine(date.fromisoformat(raw), datetime.min.time())
        else:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(
            f"invalid {name} {text!r}: expected unix seconds or ISO-8601 (e.g. 2024-01-01 or 2024-01-01T12:00:00Z)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def build_query(
    *,
    instrument: str,
    interval: str,
    start: str,
    end: str,
    default_venue: str = "cccagg",
    max_bars: int = MAX_BARS_PER_QUERY,
    per: str = "request",
) -> OhlcvQuery:
    """Validate raw request values; buckets touching `[start, end)` are included, at most `max_bars`
    of them (the error names the cap as "at most {max_bars} per {per}")."""
    try:
        resolved = resolve_instrument(instrument, default_venue)
        parsed_interval = Interval.parse(interval)
    except (InstrumentError, ValueError) as exc:
        raise QueryError(str(exc)) from None
    start_s = parse_timestamp(start, name="start")
    end_s = parse_timestamp(end, name="end")
    for name, value in (("start", start_s), ("end", end_s)):
        if not EARLIEST <= value <= LATEST:
            raise QueryError(f"{name} {value} is outside the supported range 2009-01-01 .. 2100-01-01")
    if end_s <= start_s:
        raise QueryError(f"end ({end}) must be after start ({start})")
    bucket_start = parsed_interval.floor(start_s)
    bucket_end = parsed_interval.ceil(end_s)
    buckets = (bucket_end - bucket_start) // parsed_interval.seconds
    if buckets > max_bars:
        raise QueryError(
            f"range spans {buckets} {parsed_interval.value} bars; at most {max_bars} per {per} "
            "(narrow the range or use a coarser interval)"
        )
    return OhlcvQuery(resolved, parsed_interval, bucket_start, bucket_end)
