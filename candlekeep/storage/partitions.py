"""Native partitions made on demand: monthly for `bars` (`bars_pYYYYMM`), daily for `ticks`
(`ticks_pYYYYMMDD`), by the SQL function `candlekeep_ensure_partitions` (migration 0001).

Writers call `ensure_partitions` before inserting a batch. Each engine remembers the periods it has
already ensured, so hot paths reach the database only when a batch enters a new month or day.
Under TimescaleDB (hypertables, no native partitioning) it does nothing.

State: `_ensured[engine]` = {table: set of period starts}, and `_native[engine]` = {table: whether
it is natively partitioned}; both dropped with the engine (weak keys), reset by `forget`.
"""

from __future__ import annotations

import threading
import weakref
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Connection, Engine, text

_PERIOD = {"bars": "month", "ticks": "day"}
# Order books (migration 0004): daily, like ticks.
_PERIOD.update({"book_snapshots": "day", "book_buckets": "day", "book_metrics": "day"})

_lock = threading.Lock()
_ensured: weakref.WeakKeyDictionary[Engine, dict[str, set[date]]] = weakref.WeakKeyDictionary()
_native: weakref.WeakKeyDictionary[Engine, dict[str, bool]] = weakref.WeakKeyDictionary()


def ensure_partitions(conn: Connection, table: str, start: datetime, end: datetime) -> None:
    """Make sure `table` has partitions for every instant in `[start, end)` (aware datetimes).

    When `conn` has no transaction open, the partitions are created and committed here and
    remembered for the engine. Inside the caller's transaction they are created but not remembered
    (a rollback would undo them), so prefer calling it outside the transaction that writes.
    """
    if table not in _PERIOD:
        raise ValueError(f"no partition scheme for table {table!r} (expected one of {sorted(_PERIOD)})")
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("ensure_partitions needs timezone-aware datetimes")
    if end <= start:
        return
    engine = conn.engine
    if not _is_native(conn, table):
        return
    wanted = periods(table, start, end)
    with _lock:
        known = _ensured.setdefault(engine, {}).setdefault(table, set())
        missing = [p for p in wanted if p not in known]
    if not missing:
        return
    span_start = _as_datetime(missing[0])
    span_end = end if missing[-1] == wanted[-1] else _as_datetime(_next(table, missing[-1]))
    call = text("SELECT candlekeep_ensure_partitions(:table, :start, :end)")
    params = {"table": table, "start": span_start, "end": span_end}
    if conn.in_transaction():
        conn.execute(call, params)
        return
    with conn.begin():
        conn.execute(call, params)
    with _lock:
        known.update(missing)


def forget(engine: Engine) -> None:
    """Drop what this process remembers for `engine` (after partitions were dropped, say)."""
    with _lock:
        _ensured.pop(engine, None)
        _native.pop(engine, None)


def periods(table: str, start: datetime, end: datetime) -> list[date]:
    """Start dates (UTC) of the partition periods of `table` meeting `[start, end)`."""
    first = start.astimezone(UTC).date()
    if _PERIOD[table] == "month":
        first = first.replace(day=1)
    out = []
    current = first
    while _as_datetime(current) < end:
        out.append(current)
        current = _next(table, current)
    return out


def _next(table: str, period: date) -> date:
    if _PERIOD[table] == "day":
        return period + timedelta(days=1)
    return date(period.year + period.month // 12, period.month % 12 + 1, 1)


def _as_datetime(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _is_native(conn: Connection, table: str) -> bool:
    engine = conn.engine
    with _lock:
        known = _native.get(engine, {}).get(table)
    if known is not None:
        return known
    autobegun = not conn.in_transaction()
    exists, native = conn.execute(
        text(
            "SELECT to_regclass(:table) IS NOT NULL,"
            " EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(:table))"
        ),
        {"table": table},
    ).one()
    if autobegun:
        conn.rollback()  # leave the connection as we found it (no transaction open)
    if exists:  # not yet migrated: ask again next time
        with _lock:
            _native.setdefault(engine, {})[table] = native
    return native
