"""Coverage: what each backfill partition wrote (DESIGN.md "Storage"), so gaps and reconciliations
are queryable. One row per (instrument, interval, day, source); recording again replaces it.

`day` is the first day of the partition written (a day for 1m, a month's first day for 1h/1d).
Status: complete (every bucket present) | gaps (some missing) | empty (none) | open (the period is
not over yet).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Engine, text

from candlekeep.bars import Interval

STATUSES = ("complete", "gaps", "empty", "open")


@dataclass
class CoverageRow:
    instrument: str
    interval: str
    day: date
    source: str
    rows: int
    status: str
    fetched_at: datetime


class CoverageStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(
        self, *, instrument: str, interval: Interval | str, day: date, source: str, rows: int, status: str
    ) -> None:
        """Upsert the coverage of one partition (`fetched_at` = now)."""
        if status not in STATUSES:
            raise ValueError(f"invalid coverage status {status!r}: expected one of {' '.join(STATUSES)}")
        if rows < 0:
            raise ValueError(f"coverage rows must be >= 0, got {rows}")
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    'INSERT INTO coverage (instrument, "interval", day, source, rows, status, fetched_at)'
                    " VALUES (:instrument, :interval, :day, :source, :rows, :status, now())"
                    ' ON CONFLICT (instrument, "interval", day, source) DO UPDATE'
                    " SET rows = excluded.rows, status = excluded.status, fetched_at = excluded.fetched_at"
                ),
                {
                    "instrument": str(instrument),
                    "interval": Interval(interval).value,
                    "day": day,
                    "source": source,
                    "rows": rows,
                    "status": status,
                },
            )

    def record_many(self, rows: Sequence[tuple[str, Interval | str, date, str, int, str]]) -> None:
        """Upsert several partitions' coverage, `(instrument, interval, day, source, rows, status)`
        each, in one statement (what `record` does for one)."""
        for _, _, _, _, count, status in rows:
            if status not in STATUSES:
                raise ValueError(f"invalid coverage status {status!r}: expected one of {' '.join(STATUSES)}")
            if count < 0:
                raise ValueError(f"coverage rows must be >= 0, got {count}")
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    'INSERT INTO coverage (instrument, "interval", day, source, rows, status, fetched_at)'
                    " SELECT *, now() FROM unnest(CAST(:instruments AS text[]), CAST(:intervals AS text[]),"
                    " CAST(:days AS date[]), CAST(:sources AS text[]), CAST(:rows AS integer[]), CAST(:statuses AS text[]))"
                    ' ON CONFLICT (instrument, "interval", day, source) DO UPDATE'
                    " SET rows = excluded.rows, status = excluded.status, fetched_at = excluded.fetched_at"
                ),
                {
                    "instruments": [str(r[0]) for r in rows],
                    "intervals": [Interval(r[1]).value for r in rows],
                    "days": [r[2] for r in rows],
                    "sources": [r[3] for r in rows],
                    "rows": [r[4] for r in rows],
                    "statuses": [r[5] for r in rows],
                },
            )

    def read(
        self,
        *,
        instrument: str,
        interval: Interval | str | None = None,
        start_day: date | None = None,
        end_day: date | None = None,
    ) -> list[CoverageRow]:
        """Rows of `instrument` with `start_day <= day < end_day` (either bound optional), by day,
        interval, source."""
        sql = (
            'SELECT instrument, "interval", day, source, rows, status, fetched_at FROM coverage'
            " WHERE instrument = :instrument"
        )
        params: dict[str, object] = {"instrument": str(instrument)}
        if interval is not None:
            sql += ' AND "interval" = :interval'
            params["interval"] = Interval(interval).value
        if start_day is not None:
            sql += " AND day >= :start_day"
            params["start_day"] = start_day
        if end_day is not None:
            sql += " AND day < :end_day"
            params["end_day"] = end_day
        sql += ' ORDER BY day, "interval", source'
        with self.engine.connect() as conn:
            return [CoverageRow(*row) for row in conn.execute(text(sql), params)]
