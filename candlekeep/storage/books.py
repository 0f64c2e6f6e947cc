"""Order-book outputs in PostgreSQL (`book_snapshots`, `book_buckets`, `book_metrics`; migrations 0004, 0007).

    store = BookStore(engine)
    store.insert(outputs)                              # BookOutput -> the three tables; rows new
    store.latest(instrument)                           # -> StoredSnapshot | None
    store.latest_many(instruments)                     # -> {instrument: StoredSnapshot}
    store.snapshot_ids()                               # instruments with a stored snapshot
    store.metrics(instrument, start_ns, end_ns, interval_s)   # -> [MetricsRow] per interval
    store.heatmap(instrument, start_ns, end_ns, resolution_s, width)  # -> [HeatmapRow]
    store.heatmap_json(instrument, start_ns, end_ns, resolution_s, width)  # the same, served: JSON text
    store.metric_rows(instrument, start_ns, end_ns)    # the raw rows, for the 1m roll-up
    store.drop_older_than(days, now)                   # retention (streaming.books schedules it)

Writes go in bounded batches (`batch_size` outputs, one transaction each) after the batch's day
partitions are ensured; each table is COPY'd straight in inside a savepoint, and when that hits
the primary key (a replay after a restart writes the same outputs again) the batch goes through a
temp table and `INSERT ... ON CONFLICT DO NOTHING`: outputs are deterministic from the `books` log,
so a row already stored is the row that would be written. Prices and sizes go in as exact text.
Times are whole microseconds (book outputs fall on interval edges, so nothing is lost).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from sqlalchemy import Engine

from candlekeep.bars import decimal_str
from candlekeep.book_analytics import BookOutput, intensity_texts
from candlekeep.books import Level
from candlekeep.storage import partitions

NS_PER_US = 1_000
NS_PER_DAY = 86_400 * 1_000_000_000
TABLES = ("book_snapshots", "book_buckets", "book_metrics")
_SNAP_COLS = ("instrument, ts, sequence, bids, asks, mid, spread, bid_depth_10, ask_depth_10, bid_depth_50,"
              " ask_depth_50, bid_depth_100, ask_depth_100, verified, source")  # fmt: skip
_BUCKET_COLS = "instrument, ts, side, width, prices, sizes, intensities"
_METRIC_COLS = ("instrument, ts, mid, spread, imbalance_1, imbalance_5, imbalance_10, imbalance_10bps,"
                " imbalance_50bps, weighted_mid, microprice")  # fmt: skip
_SNAP_SELECT = f"SELECT (extract(epoch FROM ts) * 1000000)::bigint, {_SNAP_COLS.split(', ', 2)[2]}"
_SNAP_COLS += ", bucket_width"  # written, not read back into StoredSnapshot
_COLUMNS = {"book_snapshots": _SNAP_COLS, "book_buckets": _BUCKET_COLS, "book_metrics": _METRIC_COLS}
_LATEST = f"{_SNAP_SELECT}, instrument FROM book_snapshots WHERE instrument = %s ORDER BY ts DESC LIMIT 1"
_LATEST_MANY = f"""
SELECT DISTINCT ON (instrument) {_SNAP_SELECT.removeprefix('SELECT ')}, instrument
FROM book_snapshots WHERE instrument = ANY(%s) ORDER BY instrument, ts DESC"""
_IDS = "SELECT DISTINCT instrument FROM book_snapshots ORDER BY instrument"
# One row per interval: the last sample of each metric in it (exact, as stored), the interval's
# spread range and the number of samples. `interval_s` divides the epoch into UTC buckets.
_METRICS = """
SELECT DISTINCT ON (slot)
       slot, mid, spread, imbalance_1, imbalance_5, imbalance_10, imbalance_10bps, imbalance_50bps,
       weighted_mid, microprice,
       min(spread) OVER w, max(spread) OVER w, count(*) OVER w
FROM (SELECT *, floor(extract(epoch FROM ts) / %(step)s)::bigint * %(step)s AS slot
      FROM book_metrics WHERE instrument = %(instrument)s AND ts >= %(start)s AND ts < %(end)s) AS m
WINDOW w AS (PARTITION BY slot)
ORDER BY slot, ts DESC"""
_METRIC_ROWS = """
SELECT (extract(epoch FROM m.ts) * 1000000)::bigint, m.mid, m.spread, m.imbalance_5, s.bid_depth_50, s.ask_depth_50
FROM book_metrics AS m LEFT JOIN book_snapshots AS s ON s.instrument = m.instrument AND s.ts = m.ts
WHERE m.instrument = %(instrument)s AND m.ts >= %(start)s AND m.ts < %(end)s ORDER BY m.ts"""
# The heatmap: per `resolution` slot the last stored output in it, its buckets (unnested) re-bucketed
# to `width` (a multiple of the stored width: div() is exact integer division, the edge rule of
# candlekeep.book_analytics), and each cell's intensity = size / the slot's largest cell, rounded
# to 6 places half up exactly as book_analytics.intensity does. One row per cell (ts, side, price,
# size, intensity); _HEATMAP orders them, _HEATMAP_SLICES gathers each slot's side into arrays.
_HEATMAP_CELLS = """
WITH slots AS (
    SELECT DISTINCT ON (floor(extract(epoch FROM ts) / %(step)s)) ts
    FROM book_snapshots WHERE instrument = %(instrument)s AND ts >= %(start)s AND ts < %(end)s
    ORDER BY floor(extract(epoch FROM ts) / %(step)s), ts DESC
), cells AS (
    SELECT b.ts, b.side, div(u.price, %(width)s) * %(width)s AS price, sum(u.size) AS size
    FROM book_buckets AS b JOIN slots USING (ts), unnest(b.prices, b.sizes) AS u(price, size)
    WHERE b.instrument = %(instrument)s AND b.ts >= %(start)s AND b.ts < %(end)s
    GROUP BY b.ts, b.side, div(u.price, %(width)s)
)
SELECT ts, side, price, size, div(2000000 * size + max(size) OVER w, 2 * max(size) OVER w) * 0.000001 AS intensity
FROM cells WINDOW w AS (PARTITION BY ts)"""
# ORDER BY names numeric columns, never an output's text: text order puts 10000 before 9990.
_HEATMAP = f"""
SELECT (extract(epoch FROM ts) * 1000000)::bigint, side, price, size, intensity
FROM ({_HEATMAP_CELLS}) AS c ORDER BY ts, side, price"""
# The served heatmap is JSON built here, one fragment per slot and side, `[t_ms,"bid",["59800",...],
# [sizes],[intensities]]`: PostgreSQL writes each numeric exactly as it would as text, and a day of
# 1 s slices (3.5M cells) never becomes millions of Python strings (bench/books.py (e)). Decimal text
# needs no JSON escaping (digits, '.', '-'); `side` is 'bid' or 'ask' (a CHECK); no array is empty.
_SLICE_JSON = """'[' || (extract(epoch FROM {ts}) * 1000)::bigint || ',"' || {side} || '",["'
    || array_to_string({prices}, '","') || '"],["' || array_to_string({sizes}, '","') || '"],["'
    || array_to_string({intensities}, '","') || '"]]'"""
_HEATMAP_SLICES = f"""
SELECT {_SLICE_JSON.format(ts="ts", side="side", prices="array_agg(price ORDER BY price)",
                           sizes="array_agg(size ORDER BY price)", intensities="array_agg(intensity ORDER BY price)")}
FROM ({_HEATMAP_CELLS}) AS c GROUP BY ts, side ORDER BY ts, side"""
_STORED_SLICE_JSON = _SLICE_JSON.format(ts="b.ts", side="b.side", prices="b.prices", sizes="b.sizes",
                                        intensities="b.intensities")  # fmt: skip
# The heatmap at the stored width: the intensities stored with each output are the slot's (one output
# per slot: its last), so each slot's sides are the stored rows themselves, in primary-key order.
_HEATMAP_STORED = f"""
WITH slots AS (
    SELECT max(ts) AS ts FROM book_snapshots
    WHERE instrument = %(instrument)s AND ts >= %(start)s AND ts < %(end)s
    GROUP BY floor(extract(epoch FROM ts) / %(step)s)
)
SELECT {_STORED_SLICE_JSON}
FROM book_buckets AS b JOIN slots USING (ts)
WHERE b.instrument = %(instrument)s AND b.ts >= %(start)s AND b.ts < %(end)s
ORDER BY b.ts, b.side"""
# Every stored output is the last of its slot (outputs no denser than the resolution): the slices are
# simply the stored rows of the range, in primary-key order.
_HEATMAP_ALL = f"""
SELECT {_STORED_SLICE_JSON}
FROM book_buckets AS b WHERE b.instrument = %(instrument)s AND b.ts >= %(start)s AND b.ts < %(end)s
ORDER BY b.ts, b.side"""
_ONE_PER_SLOT = """
SELECT count(*) = count(DISTINCT floor(extract(epoch FROM ts) / %(step)s)) FROM book_snapshots
WHERE instrument = %(instrument)s AND ts >= %(start)s AND ts < %(end)s"""
_WIDTHS = """
SELECT DISTINCT bucket_width FROM book_snapshots WHERE instrument = %(instrument)s AND ts >= %(start)s AND ts < %(end)s"""


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    instrument: str
    ts_ns: int
    sequence: int | None
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    mid: Decimal | None
    spread: Decimal | None
    bid_depth: dict[int, Decimal]
    ask_depth: dict[int, Decimal]
    verified: bool
    source: str


@dataclass(frozen=True, slots=True)
class MetricsRow:
    ts_ns: int  # the interval's start
    mid: Decimal | None
    spread: Decimal | None
    imbalance: dict[str, Decimal | None]  # "1", "5", "10", "10bps", "50bps"
    weighted_mid: Decimal | None
    microprice: Decimal | None
    spread_min: Decimal | None
    spread_max: Decimal | None
    samples: int


@dataclass(frozen=True, slots=True)
class HeatmapRow:
    ts_ns: int
    side: str
    price: Decimal
    size: Decimal
    intensity: Decimal


class BookStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- writes ------------------------------------------------------------------------------

    def insert(self, outputs: Iterable[BookOutput], *, batch_size: int = 2_000) -> int:
        """Store `outputs` in batches of at most `batch_size`; the number of new snapshot rows."""
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        written = 0
        batch: list[BookOutput] = []
        for output in outputs:
            batch.append(output)
            if len(batch) >= batch_size:
                written += self._write(batch)
                batch = []
        if batch:
            written += self._write(batch)
        return written

    def _write(self, batch: Sequence[BookOutput]) -> int:
        lines = {table: [] for table in TABLES}  # type: dict[str, list[str]]
        snapshot_lines, bucket_lines, metric_lines = (lines[t] for t in TABLES)
        for out in batch:
            ts = _ts_text(out.ts_ns)
            snapshot_lines.append(_snapshot_line(out, ts))
            metric_lines.append(_metrics_line(out, ts))
            cells = (*out.bid_buckets, *out.ask_buckets)
            if not cells:
                continue
            texts = intensity_texts([size for _, size in cells])  # one slice: both sides
            head = f"{_escape(out.instrument)}\t{ts}\t"
            width = decimal_str(out.width)
            n_bids = len(out.bid_buckets)
            for side, buckets, intensities in (("bid", out.bid_buckets, texts[:n_bids]),
                                               ("ask", out.ask_buckets, texts[n_bids:])):  # fmt: skip
                if buckets:
                    prices = ",".join([decimal_str(p) for p, _ in buckets])
                    sizes = ",".join([decimal_str(q) for _, q in buckets])
                    levels = ",".join(intensities)
                    bucket_lines.append(f"{head}{side}\t{width}\t{{{prices}}}\t{{{sizes}}}\t{{{levels}}}\n")
        # The UTC days the batch touches, each ensured alone: a batch holding a 2021 and a 2022 recording
        # must not make every day partition in between.
        days = sorted({o.ts_ns // NS_PER_DAY for o in batch})
        for attempt in (1, 2):
            try:
                return self._insert(lines, days)
            except psycopg.errors.CheckViolation as err:
                if attempt == 2 or "no partition" not in str(err):
                    raise
                partitions.forget(self.engine)
        raise AssertionError("unreachable")

    def _insert(self, lines: dict[str, list[str]], days: list[int]) -> int:
        with self.engine.connect() as conn:
            for table in TABLES:
                for day in days:
                    start = _utc_us(day * NS_PER_DAY // NS_PER_US)
                    partitions.ensure_partitions(conn, table, start, start + timedelta(days=1))
            with conn.begin():
                driver = conn.connection.driver_connection
                assert isinstance(driver, psycopg.Connection)
                new = 0
                with driver.cursor() as cur:
                    for table in TABLES:
                        count = _copy_or_merge(cur, table, lines[table])
                        if table == "book_snapshots":
                            new = count
                return new

    def drop_older_than(self, days: int, now: datetime) -> int:
        """Retention: drop day partitions (or TimescaleDB chunks) of the three tables wholly older than
        `days` before `now`; the number of partitions or chunks dropped. One transaction per native
        partition (a DROP locks the table, its indexes and TOAST: thousands of old days in one
        transaction would exhaust the lock table), so an interrupted run leaves whole days only."""
        cutoff = datetime.combine((now.astimezone(UTC) - timedelta(days=days)).date(), datetime.min.time(), UTC)
        dropped = 0
        old: list[str] = []
        with self.engine.begin() as conn:
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            with driver.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
                timescale = cur.fetchone() is not None
                for table in TABLES:
                    if timescale:
                        cur.execute("SELECT count(*) FROM drop_chunks(%s, older_than => %s)", (table, cutoff))
                        dropped += cur.fetchone()[0]  # type: ignore[index]
                        continue
                    cur.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                                " WHERE i.inhparent = to_regclass(%s)", (table,))  # fmt: skip
                    for (name,) in cur.fetchall():
                        day = name.rsplit("_p", 1)[1]
                        if date(int(day[:4]), int(day[4:6]), int(day[6:])) < cutoff.date():
                            old.append(name)
        for name in sorted(old):
            with self.engine.begin() as conn:
                driver = conn.connection.driver_connection
                assert isinstance(driver, psycopg.Connection)
                driver.execute(f'DROP TABLE IF EXISTS "{name}"')
            dropped += 1
        partitions.forget(self.engine)
        return dropped

    # -- reads -------------------------------------------------------------------------------

    def latest(self, instrument: str) -> StoredSnapshot | None:
        rows = self._rows(_LATEST, (instrument,))
        return _snapshot(rows[0]) if rows else None

    def latest_many(self, instruments: Sequence[str]) -> dict[str, StoredSnapshot]:
        return {(s := _snapshot(row)).instrument: s for row in self._rows(_LATEST_MANY, (list(instruments),))}

    def snapshot_ids(self) -> list[str]:
        return [row[0] for row in self._rows(_IDS, ())]

    def metrics(self, instrument: str, start_ns: int, end_ns: int, interval_s: int) -> list[MetricsRow]:
        """One row per `interval_s` UTC interval with samples in `[start_ns, end_ns)`: the last sample
        of each metric, the interval's spread range and its sample count."""
        params = {"instrument": instrument, "start": _utc_ns(start_ns), "end": _utc_ns(end_ns), "step": interval_s}
        out = []
        for slot, mid, spread, i1, i5, i10, i10b, i50b, wm, micro, smin, smax, n in self._rows(_METRICS, params):
            out.append(MetricsRow(slot * 1_000_000_000, mid, spread, {"1": i1, "5": i5, "10": i10, "10bps": i10b,
                                  "50bps": i50b}, wm, micro, smin, smax, n))  # fmt: skip
        return out

    def metric_rows(self, instrument: str, start_ns: int, end_ns: int) -> list[tuple[int, Any, Any, Any, Any, Any]]:
        """(ts_ns, mid, spread, imbalance_5, bid_depth_50, ask_depth_50) of every stored output, by time."""
        params = {"instrument": instrument, "start": _utc_ns(start_ns), "end": _utc_ns(end_ns)}
        return [(ts_us * NS_PER_US, *rest) for ts_us, *rest in self._rows(_METRIC_ROWS, params)]

    def stored_widths(self, instrument: str, start_ns: int, end_ns: int) -> list[Decimal]:
        params = {"instrument": instrument, "start": _utc_ns(start_ns), "end": _utc_ns(end_ns)}
        return sorted(row[0] for row in self._rows(_WIDTHS, params))

    def heatmap(self, instrument: str, start_ns: int, end_ns: int, resolution_s: int, width: Decimal) -> list[HeatmapRow]:
        """The heatmap cells of `[start_ns, end_ns)`: per `resolution_s` slot, the last stored output's
        buckets summed into `width` buckets, with intensities normalized per slot (see _HEATMAP)."""
        params = {"instrument": instrument, "start": _utc_ns(start_ns), "end": _utc_ns(end_ns),
                  "step": resolution_s, "width": width}  # fmt: skip
        return [HeatmapRow(ts_us * NS_PER_US, side, price, size, level)
                for ts_us, side, price, size, level in self._rows(_HEATMAP, params)]  # fmt: skip

    def heatmap_json(self, instrument: str, start_ns: int, end_ns: int, resolution_s: int, width: Decimal,
                     *, stored_width: bool = False) -> str:  # fmt: skip
        """`heatmap` for serving, as a JSON array of slices, one per slot and side in time order:
        `[t_ms, side, prices, sizes, intensities]`, the three arrays aligned in price order, every
        number an exact decimal string. `stored_width`: `width` is the only stored width of the range,
        so the stored rows are the slices (their intensities are the slot's: no re-bucketing)."""
        params = {"instrument": instrument, "start": _utc_ns(start_ns), "end": _utc_ns(end_ns),
                  "step": resolution_s, "width": width}  # fmt: skip
        sql = _HEATMAP_SLICES
        if stored_width:
            sql = _HEATMAP_ALL if self._rows(_ONE_PER_SLOT, params)[0][0] else _HEATMAP_STORED
        return "[" + ",".join([row[0] for row in self._rows(sql, params)]) + "]"

    def _rows(self, sql: str, params: Any) -> list[tuple]:
        with self.engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            with driver.cursor() as cur:
                cur.execute(sql, params)
                rows = cur.fetchall()
            conn.rollback()
        return rows


# --- helpers -------------------------------------------------------------------------------------


def _copy_or_merge(cur: psycopg.Cursor, table: str, lines: list[str]) -> int:
    if not lines:
        return 0
    data = "".join(lines)
    columns = _COLUMNS[table]
    cur.execute("SAVEPOINT candlekeep_books_copy")
    try:
        with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            copy.write(data)
    except psycopg.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT candlekeep_books_copy")
    else:
        cur.execute("RELEASE SAVEPOINT candlekeep_books_copy")
        return len(lines)
    stage = f"candlekeep_{table}_stage"
    cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
    with cur.copy(f"COPY {stage} ({columns}) FROM STDIN") as copy:
        copy.write(data)
    cur.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {stage} ON CONFLICT DO NOTHING")
    return max(cur.rowcount, 0)


def _num(value: Decimal | None) -> str:
    return "\\N" if value is None else decimal_str(value)


def _levels_json(levels: Sequence[Level]) -> str:
    """`[["price","size"],...]`: decimal text needs no JSON or COPY escaping (digits, '.', '-')."""
    return "[" + ",".join([f'["{decimal_str(p)}","{decimal_str(s)}"]' for p, s in levels]) + "]"


def _snapshot_line(out: BookOutput, ts: str) -> str:
    s = out.summary
    depth = "\t".join(f"{_num(s.bid_depth[b])}\t{_num(s.ask_depth[b])}" for b in (10, 50, 100))
    seq = "\\N" if out.sequence is None else str(out.sequence)
    return (f"{_escape(out.instrument)}\t{ts}\t{seq}\t{_levels_json(s.bids)}\t{_levels_json(s.asks)}\t"
            f"{_num(s.mid)}\t{_num(s.spread)}\t{depth}\t{'t' if out.verified else 'f'}\t{_escape(out.source)}\t"
            f"{decimal_str(out.width)}\n")  # fmt: skip


def _metrics_line(out: BookOutput, ts: str) -> str:
    m = out.metrics
    values = (out.summary.mid, out.summary.spread, m.imbalance_levels[1], m.imbalance_levels[5],
              m.imbalance_levels[10], m.imbalance_bps[10], m.imbalance_bps[50], m.weighted_mid, m.microprice)  # fmt: skip
    return f"{_escape(out.instrument)}\t{ts}\t" + "\t".join(_num(v) for v in values) + "\n"


def _snapshot(row: tuple) -> StoredSnapshot:
    ts_us, seq, bids, asks, mid, spread, b10, a10, b50, a50, b100, a100, verified, source, instrument = row
    return StoredSnapshot(
        instrument, ts_us * NS_PER_US, seq, tuple((Decimal(p), Decimal(s)) for p, s in bids),
        tuple((Decimal(p), Decimal(s)) for p, s in asks), mid, spread, {10: b10, 50: b50, 100: b100},
        {10: a10, 50: a50, 100: a100}, verified, source,
    )  # fmt: skip


def _escape(value: str) -> str:
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return value


def _ts_text(ts_ns: int) -> str:
    seconds, rest = divmod(ts_ns // NS_PER_US, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S") + f".{rest:06d}+00"


def _utc_us(ts_us: int) -> datetime:
    seconds, micros = divmod(ts_us, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=micros)


def _utc_ns(ts_ns: int) -> datetime:
    return _utc_us(-(-ts_ns // NS_PER_US))


# --- book_metrics_1m (the Dagster roll-up) ---------------------------------------------------------

_MINUTE_COLS = ("instrument, bucket, samples, mid_open, mid_high, mid_low, mid_close, spread_open, spread_high,"
                " spread_low, spread_close, imbalance_5_open, imbalance_5_high, imbalance_5_low, imbalance_5_close,"
                " bid_depth_50_min, bid_depth_50_max, ask_depth_50_min, ask_depth_50_max")  # fmt: skip


def replace_minutes(engine: Engine, instrument: str, start_ns: int, end_ns: int, summaries: Sequence[Any]) -> int:
    """Make `book_metrics_1m` of `instrument` in `[start_ns, end_ns)` exactly `summaries`
    (candlekeep.book_analytics.MinuteSummary): one transaction, so a re-run leaves the same rows."""
    lines = []
    for m in summaries:
        values = (*m.mid, *m.spread, *m.imbalance_5, *m.bid_depth_50, *m.ask_depth_50)
        lines.append(f"{_escape(instrument)}\t{_ts_text(m.bucket_ns)}\t{m.samples}\t" + "\t".join(_num(v) for v in values)
                     + "\n")  # fmt: skip
    with engine.begin() as conn:
        driver = conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        with driver.cursor() as cur:
            cur.execute("DELETE FROM book_metrics_1m WHERE instrument = %s AND bucket >= %s AND bucket < %s",
                        (instrument, _utc_ns(start_ns), _utc_ns(end_ns)))  # fmt: skip
            if lines:
                with cur.copy(f"COPY book_metrics_1m ({_MINUTE_COLS}) FROM STDIN") as copy:
                    copy.write("".join(lines))
    return len(lines)
