"""Raw trades in PostgreSQL (`ticks`, unique on (instrument, ts, trade_id)): batched, idempotent writes.

    store = TickStore(engine)
    store.insert_trades(trades)                       # -> rows new to the table (re-inserts are no-ops)
    store.read_trades(instrument, start_ns, end_ns)   # -> [Trade] in exchange order
    store.last_trade_before(instrument, ts_ns)        # -> Trade | None (a previous close)
    store.active_instruments(since_ns)                # -> instruments with trades since then

Writes go in batches, one transaction each, after the batch's daily partitions are ensured
(candlekeep.storage.partitions, outside the transaction):
- fast path: the batch is COPY'd straight into `ticks` inside a savepoint; a stream writes each
  trade once, so this is the normal case and runs at COPY speed;
- when that hits the unique key (a replayed batch: some rows are already stored), the savepoint is
  rolled back and the batch is COPY'd into a session temp table and merged with
  `INSERT ... SELECT ... ON CONFLICT (instrument, ts, trade_id) DO NOTHING`.
So writing the same trades twice stores them once, and the count returned is the new rows only.

Time resolution: `timestamptz` keeps microseconds. Trade times are written truncated to the
microsecond (never rounded up into the next bucket) and read back as whole microseconds in ns.
Prices and sizes go in as their exact text and come back as `Decimal` with the same digits.
`received_ns` is not stored (read back as None).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

import psycopg
from sqlalchemy import Engine

from candlekeep.bars import Trade
from candlekeep.storage import partitions

NS_PER_US = 1_000
_EPOCH_DAY = date(1970, 1, 1)
_COLUMNS = "instrument, ts, trade_id, price, size, side, source"
_STAGE = "candlekeep_ticks_stage"
_CREATE_STAGE = f"""
CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (
    instrument text, ts timestamptz, trade_id text, price numeric, size numeric, side text, source text
) ON COMMIT DELETE ROWS"""
_MERGE = f"""
INSERT INTO ticks ({_COLUMNS})
SELECT {_COLUMNS} FROM {_STAGE}
ON CONFLICT (instrument, ts, trade_id) DO NOTHING"""
_SELECT = (
    "SELECT (extract(epoch FROM ts) * 1000000)::bigint, price, size, side, trade_id, source FROM ticks"
)
_READ = f"{_SELECT} WHERE instrument = %s AND ts >= %s AND ts < %s"
_LAST_BEFORE = f"""{_SELECT}
WHERE instrument = %(instrument)s
  AND ts = (SELECT max(ts) FROM ticks WHERE instrument = %(instrument)s AND ts < %(before)s)"""
# Distinct instruments with a trade since a time: a loose index scan over the unique index.
_ACTIVE = """
WITH RECURSIVE found AS (
    (SELECT instrument FROM ticks WHERE ts >= %(since)s ORDER BY instrument LIMIT 1)
    UNION ALL
    SELECT (SELECT t.instrument FROM ticks AS t WHERE t.instrument > found.instrument AND t.ts >= %(since)s
            ORDER BY t.instrument LIMIT 1)
    FROM found WHERE found.instrument IS NOT NULL
)
SELECT instrument FROM found WHERE instrument IS NOT NULL"""


class TickStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- writes ------------------------------------------------------------------------------

    def insert_trades(self, trades: Iterable[Trade], *, batch_size: int = 200_000) -> int:
        """Store `trades` (any instruments and order); the number of rows that were new."""
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        written = 0
        lines: list[str] = []
        lo = hi = 0
        for trade in trades:
            ts_us = trade.ts_ns // NS_PER_US
            if not lines:
                lo = hi = ts_us
            elif ts_us < lo:
                lo = ts_us
            elif ts_us > hi:
                hi = ts_us
            lines.append(_copy_line(trade, ts_us))
            if len(lines) >= batch_size:
                written += self._write(lines, lo, hi)
                lines = []
        if lines:
            written += self._write(lines, lo, hi)
        return written

    def _write(self, lines: list[str], lo_us: int, hi_us: int) -> int:
        data = "".join(lines)
        for attempt in (1, 2):
            try:
                return self._insert(data, len(lines), lo_us, hi_us)
            except psycopg.errors.CheckViolation as err:
                # "no partition of relation ... found for row": remembered partitions were dropped.
                if attempt == 2 or "no partition" not in str(err):
                    raise
                partitions.forget(self.engine)
        raise AssertionError("unreachable")

    def _insert(self, data: str, count: int, lo_us: int, hi_us: int) -> int:
        with self.engine.connect() as conn:
            partitions.ensure_partitions(conn, "ticks", _utc_us(lo_us), _utc_us(hi_us + 1))
            with conn.begin():
                driver = conn.connection.driver_connection
                assert isinstance(driver, psycopg.Connection)
                with driver.cursor() as cur:
                    cur.execute("SAVEPOINT candlekeep_ticks_copy")
                    try:
                        with cur.copy(f"COPY ticks ({_COLUMNS}) FROM STDIN") as copy:
                            copy.write(data)
                    except psycopg.errors.UniqueViolation:
                        cur.execute("ROLLBACK TO SAVEPOINT candlekeep_ticks_copy")
                    else:
                        cur.execute("RELEASE SAVEPOINT candlekeep_ticks_copy")
                        return count
                    cur.execute(_CREATE_STAGE)
                    with cur.copy(f"COPY {_STAGE} ({_COLUMNS}) FROM STDIN") as copy:
                        copy.write(data)
                    cur.execute(_MERGE)
                    return max(cur.rowcount, 0)

    # -- reads -------------------------------------------------------------------------------

    def read_trades(self, instrument: str, start_ns: int, end_ns: int) -> list[Trade]:
        """Stored trades of `instrument` with `start_ns <= ts_ns < end_ns`, in exchange order."""
        # Stored times are whole microseconds: ts_ns >= start_ns <=> ts_us >= ceil(start_ns / 1000).
        params = (str(instrument), _utc_us(-(-start_ns // NS_PER_US)), _utc_us(-(-end_ns // NS_PER_US)))
        trades = list(self._query(_READ, params, str(instrument)))
        trades.sort(key=lambda t: t.sort_key)
        return trades

    def last_trade_before(self, instrument: str, ts_ns: int) -> Trade | None:
        """The last stored trade (exchange order) with a time before `ts_ns`, or None."""
        params = {"instrument": str(instrument), "before": _utc_us(-(-ts_ns // NS_PER_US))}
        trades = list(self._query(_LAST_BEFORE, params, str(instrument)))
        return max(trades, key=lambda t: t.sort_key, default=None)

    def active_instruments(self, since_ns: int) -> list[str]:
        """Instruments with a stored trade at or after `since_ns`, sorted."""
        return [row[0] for row in self._rows(_ACTIVE, {"since": _utc_us(-(-since_ns // NS_PER_US))})]

    def _rows(self, sql: str, params: Any) -> list[tuple]:
        with self.engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            with driver.cursor() as cur:
                cur.execute(sql, params)
                rows = cur.fetchall()
            conn.rollback()
        return rows

    def _query(self, sql: str, params: Any, instrument: str) -> Iterator[Trade]:
        rows = self._rows(sql, params)
        for ts_us, price, size, side, trade_id, source in rows:
            yield Trade(instrument, ts_us * NS_PER_US, price, size, side, trade_id, source)


def _utc_us(ts_us: int) -> datetime:
    seconds, micros = divmod(ts_us, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=micros)


def _copy_line(trade: Trade, ts_us: int) -> str:
    """One row of COPY text format in `_COLUMNS` order (decimals as `str()` gives them: exact)."""
    seconds, micros = divmod(ts_us, 1_000_000)
    trade_id = trade.trade_id
    if not trade_id.isalnum():  # ids are digits (or letters) nearly always: nothing to escape
        trade_id = _escape(trade_id)
    return (
        f"{_copy_text(trade.instrument)}\t{_second_text(seconds)}.{micros:06d}+00\t"
        f"{trade_id}\t{trade.price}\t{trade.size}\t{trade.side}\t{_copy_text(trade.source)}\n"
    )


def _escape(value: str) -> str:
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return value


@lru_cache(maxsize=4096)
def _copy_text(value: str) -> str:
    """Escaped text of the few distinct instrument ids and source names."""
    return _escape(value)


@lru_cache(maxsize=8192)  # a batch spans few seconds per instrument, trades arrive in time order
def _second_text(seconds: int) -> str:
    day, second = divmod(seconds, 86_400)
    return f"{_day_text(day)} {_time_text(second)}"


@lru_cache(maxsize=4096)
def _day_text(day: int) -> str:
    return (_EPOCH_DAY + timedelta(days=day)).isoformat()


@lru_cache(maxsize=86_400)
def _time_text(second: int) -> str:
    hours, rest = divmod(second, 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


