"""Outages: periods when a live source was down (table `outages`, migration 0002), so the gap can be
refilled from REST (the coordinator's `fetch`) and shows next to `coverage`.

One row per (source, started_at); recording again updates `ended_at`, `instruments` and `reason`,
so the producer writes an outage when it opens (`ended_at` NULL) and again when it closes.
Times are timestamptz (microseconds); `from_ns` converts the sources' nanoseconds (floored).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, text

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_COLUMNS = "id, source, started_at, ended_at, instruments, reason"


def from_ns(ns: int) -> datetime:
    """Unix nanoseconds -> aware UTC datetime, floored to the microsecond (no float on the way)."""
    return _EPOCH + timedelta(microseconds=ns // 1000)


def to_ns(moment: datetime) -> int:
    """Aware datetime -> unix nanoseconds (exact: whole microseconds, no float on the way)."""
    return (moment - _EPOCH) // _US * 1000


@dataclass(frozen=True)
class OutageRow:
    id: int
    source: str
    started_at: datetime
    ended_at: datetime | None
    instruments: list[str]
    reason: str

    def refill_window(self, now: datetime | None = None, *, step: int = 60) -> tuple[int, int]:
        """[start, end) in unix seconds covering the outage, widened to whole `step`s (1m bars),
        for a `fetch` control command; an open outage runs to `now`."""
        end = self.ended_at or now or datetime.now(UTC)
        start_us = (self.started_at - _EPOCH) // _US
        end_us = (end - _EPOCH) // _US
        step_us = step * 1_000_000
        start_s = start_us // step_us * step
        end_s = -(-end_us // step_us) * step
        return start_s, max(end_s, start_s + step)


class OutageStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(
        self,
        *,
        source: str,
        started_at: datetime,
        instruments: Sequence[str],
        reason: str,
        ended_at: datetime | None = None,
    ) -> int:
        """Insert or update the outage of `source` that started at `started_at`; returns its id."""
        if started_at.tzinfo is None or (ended_at is not None and ended_at.tzinfo is None):
            raise ValueError("outage times must be timezone-aware")
        if ended_at is not None and ended_at < started_at:
            raise ValueError(f"outage ends ({ended_at}) before it starts ({started_at})")
        with self.engine.begin() as conn:
            return conn.execute(
                text(
                    "INSERT INTO outages (source, started_at, ended_at, instruments, reason)"
                    " VALUES (:source, :started_at, :ended_at, :instruments, :reason)"
                    " ON CONFLICT (source, started_at, instruments) DO UPDATE SET ended_at = excluded.ended_at,"
                    " reason = excluded.reason"
                    " RETURNING id"
                ),
                {
                    "source": source,
                    "started_at": started_at,
                    "ended_at": ended_at,
                    "instruments": sorted(set(instruments)),
                    "reason": reason,
                },
            ).scalar_one()

    def close(self, outage_id: int, *, ended_at: datetime) -> None:
        """End an open outage (e.g. one left open by a previous run, once the feed is live again)."""
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE outages SET ended_at = greatest(:ended_at, started_at)"
                    " WHERE id = :id AND ended_at IS NULL"
                ),
                {"id": outage_id, "ended_at": ended_at},
            )

    def open_outages(self, source: str | None = None) -> list[OutageRow]:
        """Outages not ended yet, oldest first."""
        sql = f"SELECT {_COLUMNS} FROM outages WHERE ended_at IS NULL"
        params: dict[str, object] = {}
        if source is not None:
            sql += " AND source = :source"
            params["source"] = source
        return self._rows(sql + " ORDER BY started_at, id", params)

    def list(
        self,
        *,
        source: str | None = None,
        instrument: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        conn: Connection | None = None,
    ) -> list[OutageRow]:
        """Outages overlapping [start, end) (either bound optional; an open one runs on), of
        `source` and touching `instrument` when given, oldest first. `conn`: a connection of the
        caller's to read on (one checkout for a whole answer), else one of the engine's."""
        sql = f"SELECT {_COLUMNS} FROM outages WHERE true"
        params: dict[str, object] = {}
        if source is not None:
            sql += " AND source = :source"
            params["source"] = source
        if instrument is not None:
            sql += " AND :instrument = ANY(instruments)"
            params["instrument"] = instrument
        if start is not None:
            sql += " AND (ended_at IS NULL OR ended_at > :start)"
            params["start"] = start
        if end is not None:
            sql += " AND started_at < :end"
            params["end"] = end
        return self._rows(sql + " ORDER BY started_at, id", params, conn)

    def _rows(self, sql: str, params: dict[str, object], conn: Connection | None = None) -> list[OutageRow]:
        with self.engine.connect() if conn is None else nullcontext(conn) as conn:
            return [
                OutageRow(row.id, row.source, row.started_at, row.ended_at, list(row.instruments), row.reason)
                for row in conn.execute(text(sql), params)
            ]
