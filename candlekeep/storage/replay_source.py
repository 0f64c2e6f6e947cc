"""What a replay reads: stored trades in exchange order with bounded memory, stored bars of bars-only
instruments, recorded outages, and the counts that decide whether a range has data at all.

    trade_pages(engine, instrument, from_ns, end_ns)   # -> Iterator[StoredTrade], page by page
    count_trades(engine, instrument, start_ns, end_ns) # -> int
    bar_interval(engine, instrument, start_ns, end_ns) # -> finest of 1m/1h/1d with bars, or None
    stored_bars(engine, instrument, interval, start_ns, end_ns)  # -> Iterator[Bar], page by page
    outages_of(engine, instrument, start_ns, end_ns)   # -> [Outage]

Bounded memory without holding a transaction: each page is one index range scan on
`(instrument, ts, trade_id)` with `LIMIT page`, continued from the last page's final timestamp
(keyset pagination). A server-side cursor would do the same in one statement, but it keeps a
snapshot (and a pool connection) open for as long as the session lives, paused for hours included,
which holds back vacuum on the busiest table; a page query holds nothing between pages.
Order inside one timestamp is the exchange order of candlekeep.bars.trade_order_key (numeric ids
numerically, before any other ids, which sort by their text), restored per page from the index's
`(ts, trade_id)` order. Decimals come as
PostgreSQL's text (exactly the stored digits, never an exponent) and times as whole microseconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
from sqlalchemy import Engine

from candlekeep.bars import NS_PER_S, Bar, Interval, trade_order_key
from candlekeep.replay import Outage, StoredTrade
from candlekeep.storage.bars import BarStore
from candlekeep.storage.outages import OutageStore

NS_PER_US = 1_000
DEFAULT_PAGE = 20_000
# The unique index's own order, so each page is an index range scan (any other order key makes the
# planner sort rows per page); exchange order inside one timestamp is restored here (`_trades`).
_ORDER = "ts, trade_id"
_PAGE = f"""
SELECT (extract(epoch FROM ts) * 1000000)::bigint, trade_id, price::text, size::text, side FROM ticks
WHERE instrument = %s AND ts >= %s AND ts < %s ORDER BY {_ORDER} LIMIT %s"""
_AT = f"""
SELECT (extract(epoch FROM ts) * 1000000)::bigint, trade_id, price::text, size::text, side FROM ticks
WHERE instrument = %s AND ts = %s ORDER BY {_ORDER}"""
_COUNT = "SELECT count(*) FROM ticks WHERE instrument = %s AND ts >= %s AND ts < %s"


def _utc_us(ts_us: int) -> datetime:
    seconds, micros = divmod(ts_us, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=micros)


def _ceil_us(ns: int) -> int:
    """Stored times are whole microseconds: ts_ns >= x <=> ts_us >= ceil(x / 1000)."""
    return -(-ns // NS_PER_US)


def _rows(engine: Engine, sql: str, params: tuple) -> list[tuple]:
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        with driver.cursor() as cur:
            cur.execute(sql, params)
            rows = cur.fetchall()
        conn.rollback()
    return rows


def trade_pages(engine: Engine, instrument: str, from_ns: int, end_ns: int, *, page: int = DEFAULT_PAGE,
                prefetch: bool = True) -> Iterator[StoredTrade]:  # fmt: skip
    """Stored trades of `instrument` with `from_ns <= ts < end_ns`, in exchange order, `page` rows
    in memory at a time (plus, rarely, one timestamp's worth). With `prefetch`, the next page is
    read on a worker thread while this one is consumed (psycopg waits on the server without the
    GIL), so at most two pages are held."""
    if page < 2:
        raise ValueError("page must be at least 2")
    pages = _pages(engine, instrument, from_ns, end_ns, page)
    if not prefetch:
        for rows in pages:
            yield from rows
        return
    with ThreadPoolExecutor(1, thread_name_prefix="replay-read") as pool:
        ahead = pool.submit(next, pages, None)
        while (rows := ahead.result()) is not None:
            ahead = pool.submit(next, pages, None)
            yield from rows


def _pages(engine: Engine, instrument: str, from_ns: int, end_ns: int, page: int) -> Iterator[list[StoredTrade]]:
    lo, hi = _ceil_us(from_ns), _ceil_us(end_ns)
    while lo < hi:
        rows = _rows(engine, _PAGE, (instrument, _utc_us(lo), _utc_us(hi), page))
        if len(rows) < page:
            if rows:
                yield _trades(rows)
            return
        last = rows[-1][0]
        if rows[0][0] == last:  # one timestamp fills the page: read that timestamp whole
            yield _trades(_rows(engine, _AT, (instrument, _utc_us(last))))
            lo = last + 1
            continue
        # The last timestamp may continue past the page: leave it for the next page.
        cut = len(rows) - 1
        while rows[cut - 1][0] == last:
            cut -= 1
        yield _trades(rows[:cut])
        lo = last


def _trades(rows: list[tuple]) -> list[StoredTrade]:
    out = [StoredTrade(ts_us * NS_PER_US, trade_id, price, size, side) for ts_us, trade_id, price, size, side in rows]
    # Trades sharing a timestamp come in index (text) order: put them in exchange order
    # (trade_order_key: numeric ids numerically). Pages never split a timestamp.
    i, n = 0, len(out) - 1
    while i < n:
        if out[i].ts_ns != out[i + 1].ts_ns:
            i += 1
            continue
        j = i + 1
        while j <= n and out[j].ts_ns == out[i].ts_ns:
            j += 1
        out[i:j] = sorted(out[i:j], key=lambda t: trade_order_key(t.ts_ns, t.trade_id))
        i = j
    return out


def count_trades(engine: Engine, instrument: str, start_ns: int, end_ns: int) -> int:
    return _rows(engine, _COUNT, (instrument, _utc_us(_ceil_us(start_ns)), _utc_us(_ceil_us(end_ns))))[0][0]


BAR_INTERVALS = (Interval.M1, Interval.H1, Interval.D1)


def _bar_range(start_ns: int, end_ns: int) -> tuple[int, int]:
    """Bars whose bucket starts in [start, end) (unix s, start rounded up to a whole second)."""
    return -(-start_ns // NS_PER_S), -(-end_ns // NS_PER_S)


def bar_interval(engine: Engine, instrument: str, start_ns: int, end_ns: int) -> Interval | None:
    """The finest stored interval (1m, 1h, 1d) with bars of `instrument` in the range, or None."""
    for interval in BAR_INTERVALS:
        if count_bars(engine, instrument, interval, start_ns, end_ns):
            return interval
    return None


def count_bars(engine: Engine, instrument: str, interval: Interval, start_ns: int, end_ns: int) -> int:
    lo, hi = _bar_range(start_ns, end_ns)
    return BarStore(engine).count_bars(instrument, interval, interval.ceil(lo), hi, stored_only=True)


def stored_bars(engine: Engine, instrument: str, interval: Interval, start_ns: int, end_ns: int, *,
                page: int = 10_000) -> Iterator[Bar]:  # fmt: skip
    """Stored bars of the range, ascending, `page` buckets of time at a time."""
    store = BarStore(engine)
    lo, hi = _bar_range(start_ns, end_ns)
    lo = interval.ceil(lo)
    step = page * interval.seconds
    while lo < hi:
        yield from store.read_bars(instrument, interval, lo, min(hi, lo + step))
        lo += step


def outages_of(engine: Engine, instrument: str, start_ns: int, end_ns: int) -> list[Outage]:
    """Recorded outages of `instrument` overlapping the range (an open one runs to the range's end)."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    rows = OutageStore(engine).list(instrument=instrument, start=_utc_us(_ceil_us(start_ns)),
                                    end=_utc_us(_ceil_us(end_ns)))  # fmt: skip
    found = []
    for row in rows:
        begin = (row.started_at - epoch) // timedelta(microseconds=1) * NS_PER_US
        finish = end_ns if row.ended_at is None else (row.ended_at - epoch) // timedelta(microseconds=1) * NS_PER_US
        found.append(Outage(begin, max(finish, begin + 1), row.reason))
    return found
