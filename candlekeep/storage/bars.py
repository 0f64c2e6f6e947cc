"""Bars in PostgreSQL: idempotent bulk upserts, and reads with coarser intervals derived in SQL.

Writes (`upsert_bars`) stream in batches, one transaction each. A batch is deduplicated by bucket
(the last bar wins), its partitions are ensured, and then, when no stored bar falls in the batch's
bucket span (per instrument and interval), it is COPY'd straight into `bars`: a fresh backfill runs
at COPY speed (should a concurrent writer store one of its buckets meanwhile, the unique violation
rolls the attempt back and the batch takes the general path). Otherwise the batch is COPY'd into
a session temp table, the rows that would not change are dropped from it (so they are never
locked, and never decompress a TimescaleDB compressed chunk), and the rest is merged with one
`INSERT ... SELECT ... ON CONFLICT DO UPDATE ... WHERE <row differs>`. So:
- writing identical bars again changes nothing (no revision bump, `updated_at` kept: unchanged);
- a bar whose values, source or finality differ is updated: `revision + 1`, `updated_at = now()`
  (numeric values compare as numbers: '1.5' over a stored '1.50' is no change and keeps '1.50');
- a provisional bar (`final = false`, e.g. from the stream) never overwrites a final bar, and a
  final bar overwrites a provisional one; a refused provisional bar counts as unchanged;
- the stored `revision` is the database's count of changes; the incoming `Bar.revision` is ignored.

Rollups: every batch that changes 1m bars also bumps `bar_versions` for its instruments (first: the
row lock orders concurrent writers of one instrument) and refreshes, in the same transaction, the
`bar_rollups` 1h rows of the hours it touched (from the stored 1m bars) and the 1d rows of their days
(from the 1h rows), exactly as candlekeep.bars.rollup_bars does (flat bars only carry the close).

Reads (`read_bars` / `read_rows`; `copy_csv` streams the same SELECT as CSV): 1m bars are the stored
ones. 1h and 1d are the rollups; 5m, 15m, 30m and 4h are rolled up in SQL from the stored 1m bars as
the rollups are. A 1h or 1d bucket without all its minutes falls back to the stored 1h / 1d bar of
that bucket when there is one (deep history, as the source gave it). A bucket is never made from
both. Reads run on autocommit connections (no ROLLBACK round trip when the connection goes back).

Decimals go in as their exact text and come back as `Decimal` with the same digits (NUMERIC keeps
trailing zeros: '1.50' reads back as Decimal('1.50')). Bucket starts are unix seconds, stored as
the exact UTC instant.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from itertools import islice
from operator import add
from typing import Any

import psycopg
from psycopg.types.string import TextLoader
from sqlalchemy import Connection, Engine, text

from candlekeep.bar_block import BarBlock, value_text
from candlekeep.bars import Bar, BarRow, Interval
from candlekeep.storage import partitions

_SECONDS: dict[str, int] = {i.value: i.seconds for i in Interval}
_PLAIN: dict[str, str] = {i.value: i.value for i in Interval}  # Interval members (StrEnum) -> plain str
_DEEP_HISTORY = (Interval.H1, Interval.D1)  # stored coarse history used where no 1m bar exists
_EPOCH_DAY = date(1970, 1, 1)
_ATTEMPTS = 3

_STAGE = "candlekeep_bars_stage"
_CREATE_STAGE = f"""
CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (
    instrument text, "interval" text, bucket timestamptz,
    open numeric, high numeric, low numeric, close numeric, volume numeric, quote_volume numeric,
    trades integer, source text, final boolean
) ON COMMIT DELETE ROWS"""
_VALUES = "open, high, low, close, volume, quote_volume, trades, source, final"
_KEYS_AND_VALUES = f'instrument, "interval", bucket, {_VALUES}'
# Does any stored bar fall in the batch's [first, last] bucket span of an (instrument, interval)?
_ANY_STORED = """
SELECT EXISTS (
    SELECT 1 FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[]) AS k(instrument, iv, lo, hi)
    WHERE EXISTS (SELECT 1 FROM bars AS b
                  WHERE b.instrument = k.instrument AND b."interval" = k.iv AND b.bucket BETWEEN k.lo AND k.hi)
)"""
# Inserted rows have revision 0 and updated ones >= 1. (`xmax = 0` would tell them apart too, but
# PostgreSQL refuses system columns in RETURNING on a partitioned table.)
_MERGE = f"""
WITH written AS (
    INSERT INTO bars AS b ({_KEYS_AND_VALUES}, revision, updated_at)
    SELECT {_KEYS_AND_VALUES}, 0, now() FROM {_STAGE}
    ON CONFLICT (instrument, "interval", bucket) DO UPDATE SET
        open = excluded.open, high = excluded.high, low = excluded.low, close = excluded.close,
        volume = excluded.volume, quote_volume = excluded.quote_volume, trades = excluded.trades,
        source = excluded.source, final = excluded.final,
        revision = b.revision + 1, updated_at = now()
    WHERE (excluded.final OR NOT b.final)
      AND (b.open, b.high, b.low, b.close, b.volume, b.quote_volume, b.trades, b.source, b.final)
          IS DISTINCT FROM (excluded.open, excluded.high, excluded.low, excluded.close, excluded.volume,
                            excluded.quote_volume, excluded.trades, excluded.source, excluded.final)
    RETURNING revision = 0 AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM written"""

# After the merge, in its transaction: the staged bars PostgreSQL now holds as staged (inserted,
# updated or identical), with their revisions; a provisional bar refused over a final one is not.
_HELD = f"""
SELECT b.instrument, b."interval", extract(epoch FROM b.bucket)::bigint, b.revision
FROM {_STAGE} AS s JOIN bars AS b ON b.instrument = s.instrument AND b."interval" = s."interval" AND b.bucket = s.bucket
WHERE s.final OR NOT b.final"""

# Before the merge, the staged rows it would leave alone are dropped: unchanged ones, and provisional
# ones a final bar refuses. ON CONFLICT DO UPDATE locks a conflicting row even when its WHERE refuses
# the update, and under TimescaleDB reaching a row of a compressed chunk decompresses that chunk; a
# plain read does neither. So re-writing unchanged history leaves compressed chunks compressed.
_DROP_UNCHANGED = f"""
DELETE FROM {_STAGE} AS s USING bars AS b
WHERE b.instrument = s.instrument AND b."interval" = s."interval" AND b.bucket = s.bucket
  AND (NOT (s.final OR NOT b.final)
       OR (b.open, b.high, b.low, b.close, b.volume, b.quote_volume, b.trades, b.source, b.final)
          IS NOT DISTINCT FROM (s.open, s.high, s.low, s.close, s.volume, s.quote_volume, s.trades, s.source,
                                s.final))"""

_START = "extract(epoch FROM bucket)::bigint AS start"
_OUT = f"{_START}, open, high, low, close, volume, quote_volume, trades, source, final, revision"
_CSV_COLUMNS = (  # copy_csv: final as 'true' / 'false'
    f"{_START}, open, high, low, close, volume, quote_volume, trades, source, final::text AS final"
)
_STORED = """
SELECT {columns} FROM bars
WHERE instrument = :instrument AND "interval" = :interval AND bucket >= :lo AND bucket < :hi"""
_FLAT = "(volume = 0 AND open = high AND high = low AND low = close)"
# 1m bars of [lo, hi) rolled up into buckets of :step (epoch-aligned, UTC), as rollup_bars does.
_DERIVED = """
WITH m AS (
    SELECT date_bin(:step, bucket, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS agg, bucket,
           open, high, low, close, volume, quote_volume, trades, source, final, revision,
           (volume = 0 AND open = high AND high = low AND low = close) AS flat
    FROM bars
    WHERE instrument = :instrument AND "interval" = '1m' AND bucket >= :lo AND bucket < :hi
), derived AS (
    SELECT agg AS bucket,
           coalesce((array_agg(open ORDER BY bucket) FILTER (WHERE NOT flat))[1],
                    (array_agg(close ORDER BY bucket DESC))[1]) AS open,
           coalesce(max(high) FILTER (WHERE NOT flat), (array_agg(close ORDER BY bucket DESC))[1]) AS high,
           coalesce(min(low) FILTER (WHERE NOT flat), (array_agg(close ORDER BY bucket DESC))[1]) AS low,
           (array_agg(close ORDER BY bucket DESC))[1] AS close,
           sum(volume) AS volume,
           sum(quote_volume) AS quote_volume,
           CASE WHEN count(trades) = count(*) THEN sum(trades) END AS trades,
           CASE WHEN min(source) = max(source) THEN min(source) ELSE 'mixed' END AS source,
           bool_and(final) AS final,
           max(revision) AS revision,
           count(*) AS minutes
    FROM m
    GROUP BY agg
)"""
# Coarse buckets of [lo, hi) answered by a derivation from fewer than all their minutes.
_PARTIAL = f"""{_DERIVED}
SELECT extract(epoch FROM d.bucket)::bigint FROM derived AS d
WHERE d.minutes < :minutes AND NOT EXISTS (
    SELECT 1 FROM bars AS s
    WHERE s.instrument = :instrument AND s."interval" = :interval AND s.bucket = d.bucket)
ORDER BY 1"""

# Stored 1h / 1d buckets (bar_rollups, migration 0006) in the shape of `derived` above: what the
# derivation from 1m gives, kept exact in the transaction of every 1m write.
_ROLLED = """
WITH derived AS (
    SELECT bucket, open, high, low, close, volume, quote_volume, trades, source, final, revision, minutes
    FROM bar_rollups
    WHERE instrument = :instrument AND "interval" = :interval AND bucket >= :lo AND bucket < :hi
), deep AS (
    SELECT bucket, open, high, low, close, volume, quote_volume, trades, source, final, revision,
           NULL::integer AS minutes
    FROM bars
    WHERE instrument = :instrument AND "interval" = :interval AND bucket >= :lo AND bucket < :hi
)"""
# A stored deep-history 1h/1d bar serves its bucket unless every minute of it is stored: a complete
# bar beats a partial derivation from a few minutes (never a mix of the two). Each range is read once
# (anti-joins, no probe per row).
_ROLLED_OR_DEEP = """
SELECT {columns} FROM derived AS d
WHERE d.minutes = :minutes OR NOT EXISTS (SELECT 1 FROM deep AS s WHERE s.bucket = d.bucket)
UNION ALL
SELECT {columns} FROM deep AS s
WHERE NOT EXISTS (SELECT 1 FROM derived AS d WHERE d.bucket = s.bucket AND d.minutes = :minutes)"""
_ROLLED_PARTIAL = _PARTIAL.replace(_DERIVED, _ROLLED)

# Rollups of the buckets in the (instrument, lo, hi) ranges given as three arrays (edges on bucket
# edges), from their finer rows (OFFSET 0: an index range scan per range, never a join of all), as
# candlekeep.bars.rollup_bars does: 1h from the stored 1m bars, 1d from the 1h rollups (exact: a
# rollup keeps whether all its minutes were flat, and first/last/extremes/sums compose). Rows that
# would not change are left alone (not even locked).
_FINER_1M = f"""SELECT bucket, open, high, low, close, volume, quote_volume, trades, source, final, revision,
           1 AS minutes, {_FLAT} AS flat FROM bars WHERE instrument = k.instrument AND "interval" = '1m'"""
_FINER_1H = """SELECT bucket, open, high, low, close, volume, quote_volume, trades, source, final, revision,
           minutes, flat FROM bar_rollups WHERE instrument = k.instrument AND "interval" = '1h'"""
_ROLLUP_COLUMNS = ('instrument, "interval", bucket, open, high, low, close, volume, quote_volume, trades, source,'
                   " final, revision, minutes, flat")
_ROLLUP_VALUES = ("open, high, low, close, volume, quote_volume, trades, source, final, revision, minutes, flat")
_ROLLUP = f"""
INSERT INTO bar_rollups AS r ({_ROLLUP_COLUMNS})
SELECT k.instrument, '{{interval}}', date_bin(INTERVAL '{{width}}', m.bucket, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
       coalesce((array_agg(m.open ORDER BY m.bucket) FILTER (WHERE NOT m.flat))[1],
                (array_agg(m.close ORDER BY m.bucket DESC))[1]),
       coalesce(max(m.high) FILTER (WHERE NOT m.flat), (array_agg(m.close ORDER BY m.bucket DESC))[1]),
       coalesce(min(m.low) FILTER (WHERE NOT m.flat), (array_agg(m.close ORDER BY m.bucket DESC))[1]),
       (array_agg(m.close ORDER BY m.bucket DESC))[1],
       sum(m.volume), sum(m.quote_volume),
       CASE WHEN count(m.trades) = count(*) THEN sum(m.trades) END,
       CASE WHEN min(m.source) = max(m.source) THEN min(m.source) ELSE 'mixed' END,
       bool_and(m.final), max(m.revision), sum(m.minutes), bool_and(m.flat)
FROM unnest(%s::text[], %s::timestamptz[], %s::timestamptz[]) AS k(instrument, lo, hi)
JOIN LATERAL ({{finer}} AND bucket >= k.lo AND bucket < k.hi OFFSET 0) AS m ON true
GROUP BY k.instrument, date_bin(INTERVAL '{{width}}', m.bucket, TIMESTAMPTZ '1970-01-01 00:00:00+00')
ORDER BY 1, 3
ON CONFLICT (instrument, "interval", bucket) DO UPDATE SET
    ({_ROLLUP_VALUES}) = (excluded.open, excluded.high, excluded.low, excluded.close, excluded.volume,
    excluded.quote_volume, excluded.trades, excluded.source, excluded.final, excluded.revision, excluded.minutes,
    excluded.flat)
WHERE ({', '.join('r.' + c for c in _ROLLUP_VALUES.split(', '))})
      IS DISTINCT FROM ({', '.join('excluded.' + c for c in _ROLLUP_VALUES.split(', '))})"""
_ROLLUP_1H = _ROLLUP.format(interval="1h", finer=_FINER_1M, width="1 hour")
_ROLLUP_1D = _ROLLUP.format(interval="1d", finer=_FINER_1H, width="1 day")
# Bumped first in a writing transaction: the row lock also orders rollup refreshes of one instrument
# (each refresh then sees every 1m bar committed before it), so two writers cannot lose a minute.
# The version is the writing transaction's id: never the same twice, even after a TRUNCATE.
_BUMP = """
INSERT INTO bar_versions (instrument, version)
SELECT i, pg_current_xact_id()::text::bigint FROM unnest(%s::text[]) AS i ORDER BY i
ON CONFLICT (instrument) DO UPDATE SET version = excluded.version"""
# What makes an answer about one instrument stale: its bar version and its outages.
_STAMP = """
SELECT (SELECT version FROM bar_versions WHERE instrument = %(i)s),
       (SELECT md5(string_agg(o::text, ',' ORDER BY o.id)) FROM outages AS o WHERE %(i)s = ANY(o.instruments))"""



@dataclass(frozen=True)
class UpsertResult:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0  # identical to what was stored, or provisional over final (refused)

    @property
    def written(self) -> int:
        return self.inserted + self.updated

    def __add__(self, other: UpsertResult) -> UpsertResult:
        return UpsertResult(
            self.inserted + other.inserted, self.updated + other.updated, self.unchanged + other.unchanged
        )


class BarStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pinned = threading.local()  # .conn: the connection of `pinned()` in this thread

    # -- writes ------------------------------------------------------------------------------

    def upsert_bars(self, bars: Iterable[Bar], *, batch_size: int = 10_000) -> UpsertResult:
        """Write `bars` (any instruments, intervals and order); see the module docstring."""
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        total = UpsertResult()
        batch: dict[tuple[str, str, int], Bar] = {}
        for bar in bars:
            batch[(bar.instrument, bar.interval, bar.start)] = bar
            if len(batch) >= batch_size:
                total += self._write(batch.values())
                batch = {}
        if batch:
            total += self._write(batch.values())
        return total

    def upsert_blocks(
        self,
        blocks: Iterable[BarBlock],
        *,
        batch_rows: int = 8_000,
        on_written: Callable[[BarBlock], None] | None = None,
        span: tuple[str, Interval | str, int, int] | None = None,
    ) -> UpsertResult:
        """Write `blocks` as `upsert_bars` writes bars (same semantics), whole blocks per transaction.

        The bulk path of a backfill: a batch gathers blocks until it holds `batch_rows` bars (memory
        stays bounded by a batch), and its COPY text is one join per block (no per-bar record).
        `span = (instrument, interval, start, end)` promises every block is of that instrument and
        interval inside `[start, end)` (a block outside it raises ValueError). When nothing is stored
        in the span yet, each batch is streamed straight into `bars` while its blocks arrive (the
        database works while the next page is fetched); should a concurrent writer store one of its
        buckets meanwhile, that batch is rolled back and merged, and so are the later ones.
        `on_written(block)` is called for each block once its batch is committed.
        """
        if batch_rows < 1:
            raise ValueError("batch_rows must be positive")
        streaming = span is not None and self._span_is_empty(*span)
        pending = _Pending(blocks)
        total = UpsertResult()
        while (head := pending.peek()) is not None:
            batch: list[BarBlock] = []
            result = self._stream_batch(pending, batch, batch_rows, span) if streaming and span else None
            if result is None:  # not streaming, or the stream met a stored bar and was rolled back
                streaming = False
                if not batch:
                    _gather(pending, batch, batch_rows, head.columns, None)
                result = self._write_blocks(batch)
            total += result
            if on_written is not None:
                for block in batch:
                    on_written(block)
        return total

    def _span_is_empty(self, instrument: str, interval: Interval | str, start: int, end: int) -> bool:
        """Nothing stored at `interval` in `[start, end)`; its partitions are made meanwhile."""
        if start >= end:
            return False
        with self.engine.connect() as conn:
            partitions.ensure_partitions(conn, "bars", _utc(start), _utc(end))
            with conn.begin():
                cur = _cursor(conn)
                cur.execute(_ANY_STORED, ([str(instrument)], [Interval(interval).value], [_utc(start)], [_utc(end - 1)]))
                return not cur.fetchone()[0]

    def _stream_batch(
        self, pending: _Pending, batch: list[BarBlock], batch_rows: int, span: tuple[str, Interval | str, int, int]
    ) -> UpsertResult | None:
        """COPY one batch straight into `bars` as its blocks arrive; None (rolled back, the blocks
        gathered so far left in `batch`) when a bar of it is stored already or its partition went."""
        instrument, interval, start, end = str(span[0]), Interval(span[1]).value, span[2], span[3]

        def check(block: BarBlock) -> None:
            if block.instrument != instrument or block.interval != interval or not (
                start <= block.starts[0] and block.starts[-1] < end
            ):
                raise ValueError(f"block of {block.instrument} {block.interval} outside the span {span}")

        head = pending.peek()
        assert head is not None
        columns = _BlockText([head]).columns
        with self.engine.connect() as conn:
            try:
                with conn.begin():
                    cur = _cursor(conn)
                    with cur.copy(f"COPY bars ({columns}) FROM STDIN") as copy:
                        _gather(pending, batch, batch_rows, head.columns,
                                lambda block: (check(block), copy.write(_block_copy_text(block))))  # fmt: skip
                    result = UpsertResult(inserted=sum(len(b) for b in batch))
                    _Touched.of_blocks(batch).record(cur, result)  # the rollups, in the same transaction
                return result
            except (psycopg.errors.UniqueViolation, psycopg.errors.CheckViolation, psycopg.errors.DeadlockDetected):
                return None

    def _write_blocks(self, blocks: list[BarBlock]) -> UpsertResult:
        ranges: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (instrument, interval) -> block spans
        for block in blocks:
            ranges.setdefault((block.instrument, block.interval), []).append((block.starts[0], block.starts[-1]))
        spans: dict[tuple[str, str], list[int]] = {}  # (instrument, interval) -> [first, last] start
        overlapping = False
        for key, key_ranges in ranges.items():
            key_ranges.sort()
            overlapping = overlapping or any(a[1] >= b[0] for a, b in zip(key_ranges, key_ranges[1:]))
            spans[key] = [key_ranges[0][0], max(hi for _, hi in key_ranges)]
        if overlapping:  # a bucket in two blocks: the last one wins, as in upsert_bars
            result = self.upsert_bars(bar for block in blocks for bar in block.bars())
        else:
            result = self._write_text(_BlockText(blocks), spans, _Touched.of_blocks(blocks))
        return result

    def _write(self, bars: Collection[Bar]) -> UpsertResult:
        spans: dict[tuple[str, str], list[int]] = {}  # (instrument, interval) -> [first, last] start
        for bar in bars:
            span = spans.get((bar.instrument, bar.interval))
            if span is None:
                _check_interval(bar)
                spans[(bar.instrument, bar.interval)] = [bar.start, bar.start]
            elif bar.start < span[0]:
                span[0] = bar.start
            elif bar.start > span[1]:
                span[1] = bar.start
        return self._write_text(_CopyText(bars), spans, _Touched.of(bars))

    def _write_text(
        self, lines: _CopyText | _BlockText, spans: dict[tuple[str, str], list[int]], touched: _Touched
    ) -> UpsertResult:
        """One batch's COPY text written in one transaction, retried when that is safe."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return self._merge(lines, spans, touched)
            except psycopg.errors.CheckViolation as err:
                # "no partition of relation ... found for row": partitions this process remembered
                # were dropped meanwhile. Forget them and ensure again.
                if attempt == _ATTEMPTS or "no partition" not in str(err):
                    raise
                partitions.forget(self.engine)
            except psycopg.errors.DeadlockDetected:
                # Two writers upserting overlapping buckets in different orders: the batch is
                # idempotent, so run it again.
                if attempt == _ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _merge(
        self, lines: _CopyText | _BlockText, spans: dict[tuple[str, str], list[int]], touched: _Touched
    ) -> UpsertResult:
        first = _utc(min(lo for lo, _ in spans.values()))
        last = _utc(max(hi for _, hi in spans.values()) + 1)
        keys = list(spans)
        with self.engine.connect() as conn:
            partitions.ensure_partitions(conn, "bars", first, last)
            stored = True
            try:
                with conn.begin():
                    cur = _cursor(conn)
                    cur.execute(
                        _ANY_STORED,
                        (
                            [str(i) for i, _ in keys],
                            [_PLAIN[iv] for _, iv in keys],
                            [_utc(spans[k][0]) for k in keys],
                            [_utc(spans[k][1]) for k in keys],
                        ),
                    )
                    stored = cur.fetchone()[0]
                    if not stored:  # the fast path: nothing to merge with
                        _copy(cur, f"COPY bars ({lines.columns}) FROM STDIN", lines)
                        result = UpsertResult(inserted=len(lines))
                    else:
                        result = _stage_and_merge(cur, lines)
                    touched.record(cur, result)
                    return result
            except psycopg.errors.UniqueViolation:
                if stored:
                    raise
                # A concurrent writer stored some of these buckets after the check: merge instead.
            with conn.begin():
                cur = _cursor(conn)
                result = _stage_and_merge(cur, lines)
                touched.record(cur, result)
                return result

    def upsert_written(self, bars: Collection[Bar]) -> list[Bar]:
        """Upsert `bars` (one transaction, any order) and return those PostgreSQL now holds as given
        (new, changed or identical), each with its stored revision: what a publisher may hand on,
        again after a crash. Provisional bars refused over final ones are left out."""
        latest = {(b.instrument, b.interval, b.start): b for b in bars}
        if not latest:
            return []
        for bar in latest.values():
            _check_interval(bar)
        lo = _utc(min(start for _, _, start in latest))
        hi = _utc(max(start for _, _, start in latest) + 1)
        with self.engine.connect() as conn:
            partitions.ensure_partitions(conn, "bars", lo, hi)
            with conn.begin():
                cur = _cursor(conn)
                cur.execute(_CREATE_STAGE)
                _copy(cur, f"COPY {_STAGE} ({_KEYS_AND_VALUES}) FROM STDIN", _CopyText(list(latest.values())))
                cur.execute(_MERGE)
                inserted, updated = cur.fetchone() or (0, 0)
                _Touched.of(latest.values()).record(cur, UpsertResult(inserted, updated))
                cur.execute(_HELD)
                rows = cur.fetchall()
        out = []
        for instrument, interval, start, revision in rows:
            bar = latest[(instrument, interval, int(start))]
            out.append(bar if bar.revision == revision else dataclasses.replace(bar, revision=revision))
        out.sort(key=lambda b: (b.instrument, b.interval, b.start))
        return out

    # -- reads -------------------------------------------------------------------------------

    def read_bars(
        self, instrument: str, interval: Interval | str, start: int, end: int, *, limit: int | None = None
    ) -> list[Bar]:
        """Bars with `start <= bar.start < end` (unix s), ascending, at most `limit` of them."""
        interval = Interval(interval)
        instrument = str(instrument)
        return [Bar(instrument, interval.value, *row) for row in self._rows(instrument, interval, start, end, limit)]

    def read_rows(
        self, instrument: str, interval: Interval | str, start: int, end: int, *, limit: int | None = None
    ) -> list[BarRow]:
        """The bars `read_bars` gives, as BarRow tuples with the decimals as PostgreSQL's text (no
        Decimal made: what an encoder writes as it is)."""
        return self._rows(str(instrument), Interval(interval), start, end, limit, text_numerics=True)

    def read_rows_and_partial(
        self, instrument: str, interval: Interval | str, start: int, end: int, *, limit: int | None = None
    ) -> tuple[list[BarRow], list[int]]:
        """`read_rows`, and the starts of the coarse rows among them derived from only some of their
        minutes (what `partial_buckets` lists), from one query."""
        interval = Interval(interval)
        if interval is Interval.M1:
            return self.read_rows(instrument, interval, start, end, limit=limit), []
        rows = self._rows(str(instrument), interval, start, end, limit, text_numerics=True, columns=_OUT + ", minutes")
        full = interval.seconds // 60
        partial = [r[0] for r in rows if r[11] is not None and r[11] < full]
        return [r[:11] for r in rows], partial

    def _rows(self, instrument: str, interval: Interval, start: int, end: int, limit: int | None, *,
              text_numerics: bool = False, columns: str = _OUT) -> list[tuple]:  # fmt: skip
        sql, params = self._query(instrument, interval, start, end, columns)
        with self._reading() as conn:  # psycopg's fetchall: rows made in C, not one by one
            cur = _cursor(conn)
            if text_numerics:
                cur.adapters.register_loader("numeric", TextLoader)
            return cur.execute(_pyformat(sql + _order(interval) + " LIMIT :limit"), {**params, "limit": limit}).fetchall()

    def _reading(self) -> AbstractContextManager[Connection]:
        """A connection for reads: the one pinned by `pinned()` in this thread, else one of the
        engine's, autocommit (giving it back costs no ROLLBACK round trip)."""
        conn = getattr(self._pinned, "conn", None)
        if conn is not None:
            return nullcontext(conn)
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def pinned(self) -> Iterator[Connection]:
        """Every read of this store in this thread, inside the block, on one connection (one pool
        checkout, one liveness ping, for an answer made of several reads); yields it for other
        stores' reads."""
        if getattr(self._pinned, "conn", None) is not None:
            yield self._pinned.conn
            return
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            self._pinned.conn = conn
            try:
                yield conn
            finally:
                self._pinned.conn = None

    def change_stamp(self, instrument: str) -> tuple:
        """What changes whenever an answer about `instrument` may: its bar version (bumped in every
        writing transaction) and a digest of its outages. One round trip."""
        with self._reading() as conn:
            return tuple(_cursor(conn).execute(_STAMP, {"i": str(instrument)}).fetchone())

    def refresh_rollups(self, instrument: str, start: int, end: int) -> None:
        """Rebuild the 1h / 1d rollups of the whole days around `[start, end)` from the stored 1m bars
        (for 1m bars written around this store, e.g. a bulk COPY), and bump the version."""
        lo, hi = start - start % 86400, Interval.D1.ceil(end)
        with self.engine.begin() as conn:
            cur = _cursor(conn)
            cur.execute(_BUMP, ([str(instrument)],))
            cur.execute('DELETE FROM bar_rollups WHERE instrument = %s AND bucket >= %s AND bucket < %s',
                        (str(instrument), _utc(lo), _utc(hi)))  # fmt: skip
            refresh_rollups(cur, [(str(instrument), h) for h in range(lo, hi, 3600)])

    def bucket_starts(
        self, instrument: str, interval: Interval | str, start: int, end: int, *, stored_only: bool = False
    ) -> list[int]:
        """Starts of the buckets `read_bars` has a bar for, ascending (for gap listing).

        `stored_only`: only the bars stored at `interval` itself (what a backfill of that interval
        wrote), not the ones derived from 1m bars.
        """
        interval = Interval(interval)
        sql, params = self._query(str(instrument), interval, start, end, _START, stored_only=stored_only)
        with self._reading() as conn:  # one array, not a row per bucket
            starts = conn.execute(text(f"SELECT array_agg(start ORDER BY start) FROM ({sql}) AS q"), params).scalar()
        return starts or []

    def count_bars(
        self, instrument: str, interval: Interval | str, start: int, end: int, *, stored_only: bool = False
    ) -> int:
        """How many bars `read_bars` (or, `stored_only`, the stored `interval` rows) has in the range."""
        interval = Interval(interval)
        sql, params = self._query(str(instrument), interval, start, end, "bucket", stored_only=stored_only)
        with self._reading() as conn:
            return conn.execute(text(f"SELECT count(*) FROM ({sql}) AS q"), params).scalar_one()

    def count_stored(
        self, instrument: str, interval: Interval | str, ranges: Sequence[tuple[int, int]]
    ) -> list[int]:
        """How many bars are stored at `interval` itself in each `[start, end)` range, in one query."""
        if not ranges:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM bars WHERE instrument = :instrument AND \"interval\" = :interval"
                    "        AND bucket >= r.lo AND bucket < r.hi)"
                    " FROM unnest(CAST(:los AS timestamptz[]), CAST(:his AS timestamptz[])) WITH ORDINALITY"
                    " AS r(lo, hi, i) ORDER BY r.i"
                ),
                {
                    "instrument": str(instrument),
                    "interval": Interval(interval).value,
                    "los": [_utc(lo) for lo, _ in ranges],
                    "his": [_utc(max(lo, hi)) for lo, hi in ranges],
                },
            )
            return [int(r[0]) for r in rows]

    def latest_start(self, instrument: str, interval: Interval | str = Interval.M1) -> int | None:
        """Start of the newest bar stored at `interval` (where a writer stopped), or None."""
        with self._reading() as conn:
            return conn.execute(
                text(
                    'SELECT extract(epoch FROM max(bucket))::bigint FROM bars'
                    ' WHERE instrument = :instrument AND "interval" = :interval'
                ),
                {"instrument": str(instrument), "interval": Interval(interval).value},
            ).scalar_one()

    def latest_final_start(self, instrument: str, interval: Interval | str, start: int, end: int) -> int | None:
        """Start of the newest *final* bar stored at `interval` with `start <= bar.start < end`, or None.

        Stored rows only (nothing derived); one indexed scalar query (the serving cache watermark).
        """
        with self._reading() as conn:
            return conn.execute(
                text(
                    'SELECT extract(epoch FROM max(bucket))::bigint FROM bars WHERE instrument = :instrument'
                    ' AND "interval" = :interval AND final AND bucket >= :lo AND bucket < :hi'
                ),
                {"instrument": str(instrument), "interval": Interval(interval).value, "lo": _utc(start), "hi": _utc(end)},
            ).scalar()

    def latest_start_before(
        self, instrument: str, intervals: Sequence[Interval | str], before: int
    ) -> int | None:
        """Start of the newest bar stored at any of `intervals` starting before `before`, or None.

        Stored rows only, as stored (not floored to a coarser bucket); one index probe per interval.
        """
        with self._reading() as conn:
            return conn.execute(
                text(
                    'SELECT extract(epoch FROM max(bucket))::bigint FROM bars'
                    ' WHERE instrument = :instrument AND "interval" = ANY(:intervals) AND bucket < :before'
                ),
                {
                    "instrument": str(instrument),
                    "intervals": [Interval(i).value for i in intervals],
                    "before": _utc(before),
                },
            ).scalar_one()

    def copy_csv(
        self, instrument: str, interval: Interval | str, start: int, end: int, *, chunk_bytes: int = 1 << 16
    ) -> Iterator[bytes]:
        """The bars `read_bars` gives for `[start, end)`, ascending, as CSV rows without a header
        (`start,open,high,low,close,volume,quote_volume,trades,source,final`, final as true/false),
        from one COPY ... TO STDOUT, in chunks of about `chunk_bytes`. Nothing runs until iterated."""
        sql, params = self._query(str(instrument), Interval(interval), start, end, _CSV_COLUMNS)
        used = {k: v for k, v in params.items() if re.search(rf"(?<!:):{k}\b", sql)}
        compiled = text(sql + _order(Interval(interval))).bindparams(**used).compile(dialect=self.engine.dialect)
        statement = f"COPY ({compiled}) TO STDOUT WITH (FORMAT csv)"
        with self._reading() as conn:
            driver = conn.connection.driver_connection
            with driver.cursor() as cur, cur.copy(statement, compiled.params) as copy:
                buffer = bytearray()
                for data in copy:
                    buffer += data
                    if len(buffer) >= chunk_bytes:
                        yield bytes(buffer)
                        buffer.clear()
                if buffer:
                    yield bytes(buffer)

    def _query(
        self, instrument: str, interval: Interval, start: int, end: int, columns: str, *, stored_only: bool = False
    ) -> tuple[str, dict[str, Any]]:
        """SQL (without ORDER BY) selecting `columns` of the bars of `[start, end)`, and its params."""
        # Buckets starting in [start, end) are the aligned ones in [ceil(start), ceil(end)); a
        # derived bucket takes all its 1m bars, up to ceil(end).
        lo, hi = _utc(interval.ceil(start)), _utc(interval.ceil(end))
        params: dict[str, Any] = {"instrument": instrument, "interval": interval.value, "lo": lo, "hi": hi}
        if interval is Interval.M1 or stored_only:
            return _STORED.format(columns=columns), params
        params["step"] = timedelta(seconds=interval.seconds)
        if interval in _DEEP_HISTORY:  # the rollups (bar_rollups), and the source's own deep history
            params["minutes"] = interval.seconds // 60
            sql = f"{_ROLLED} {_ROLLED_OR_DEEP.format(columns=columns)}"
        else:
            sql = f"{_DERIVED} SELECT {columns} FROM derived"
        return sql, params

    def missing_minutes(self, instrument: str, start: int, end: int) -> list[tuple[int, int]]:
        """The `[lo, hi)` ranges of 1m buckets in `[start, end)` without a stored bar, ascending (what
        missing_ranges gives of `bucket_starts`), read through the 1h rollups: a complete hour costs
        nothing, and only the minutes of incomplete hours are looked at."""
        lo, hi = Interval.M1.ceil(start), Interval.M1.ceil(end)
        if lo >= hi:
            return []
        first, last = lo - lo % 3600, Interval.H1.ceil(hi)
        with self._reading() as conn:
            cur = _cursor(conn)
            hours = dict(cur.execute(
                'SELECT extract(epoch FROM bucket)::bigint, minutes FROM bar_rollups WHERE instrument = %s'
                " AND \"interval\" = '1h' AND bucket >= %s AND bucket < %s", (str(instrument), _utc(first), _utc(last)),
            ).fetchall())  # fmt: skip
            partly = [h for h in range(first, last, 3600) if 0 < hours.get(h, 0) < 60]
            runs = _runs(((str(instrument), h) for h in partly), 3600)
            starts = cur.execute(
                "SELECT array_agg(extract(epoch FROM b.bucket)::bigint ORDER BY b.bucket)"
                " FROM unnest(%s::timestamptz[], %s::timestamptz[]) AS k(lo, hi) JOIN LATERAL (SELECT bucket FROM bars"
                " WHERE instrument = %s AND \"interval\" = '1m' AND bucket >= k.lo AND bucket < k.hi OFFSET 0) AS b ON true",
                ([_utc(a) for _, a, _ in runs], [_utc(b) for _, _, b in runs], str(instrument)),
            ).fetchone()[0] if runs else None  # fmt: skip
        present = set(starts or ())
        gaps: list[tuple[int, int]] = []
        for h in range(first, last, 3600):
            held = hours.get(h, 0)
            if held == 60:
                continue
            for m in range(max(h, lo), min(h + 3600, hi), 60):
                if held and m in present:
                    continue
                if gaps and gaps[-1][1] == m:
                    gaps[-1] = (gaps[-1][0], m + 60)
                else:
                    gaps.append((m, m + 60))
        return gaps

    def partial_buckets(self, instrument: str, interval: Interval | str, start: int, end: int) -> list[int]:
        """Starts of the coarse buckets in `[start, end)` whose bar is derived from only some of
        their minutes (incomplete: a gap inside), ascending; none for 1m."""
        interval = Interval(interval)
        if interval is Interval.M1:
            return []
        lo, hi = _utc(interval.ceil(start)), _utc(interval.ceil(end))
        params = {"instrument": str(instrument), "interval": interval.value, "lo": lo, "hi": hi,
                  "step": timedelta(seconds=interval.seconds), "minutes": interval.seconds // 60}  # fmt: skip
        sql = _ROLLED_PARTIAL if interval in _DEEP_HISTORY else _PARTIAL
        with self._reading() as conn:
            return [int(r[0]) for r in conn.execute(text(sql), params)]

    def provisional_starts(self, instrument: str, start: int, end: int) -> set[int]:
        """1m buckets in `[start, end)` whose stored bar is not final."""
        with self._reading() as conn:
            rows = conn.execute(
                text('SELECT extract(epoch FROM bucket)::bigint FROM bars WHERE instrument = :i AND "interval" = \'1m\''
                     " AND bucket >= :lo AND bucket < :hi AND NOT final"),
                {"i": str(instrument), "lo": _utc(start), "hi": _utc(end)},
            )  # fmt: skip
            return {int(r[0]) for r in rows}


@dataclass
class _Touched:
    """What a batch may change besides its bars: the instruments' versions, and the 1h / 1d rollups
    of the hours and days holding its 1m bars."""

    instruments: set[str]
    hours: set[tuple[str, int]]

    @classmethod
    def of(cls, bars: Iterable[Bar]) -> _Touched:
        instruments: set[str] = set()
        hours: set[tuple[str, int]] = set()
        for bar in bars:
            instruments.add(bar.instrument)
            if bar.interval == "1m":
                hours.add((bar.instrument, bar.start - bar.start % 3600))
        return cls(instruments, hours)

    @classmethod
    def of_blocks(cls, blocks: Iterable[BarBlock]) -> _Touched:
        instruments: set[str] = set()
        hours: set[tuple[str, int]] = set()
        for block in blocks:
            instruments.add(block.instrument)
            if block.interval == "1m":
                hours.update((block.instrument, start - start % 3600) for start in block.starts)
        return cls(instruments, hours)

    def record(self, cur: psycopg.Cursor, result: UpsertResult) -> None:
        """In the batch's transaction, after its bars: bump the versions (which orders this against
        other writers of these instruments, see _BUMP), then refresh the rollups."""
        if not result.written:
            return
        cur.execute(_BUMP, (sorted(self.instruments),))
        if not self.hours:
            return
        refresh_rollups(cur, sorted(self.hours))


def refresh_rollups(cur: psycopg.Cursor, hours: Sequence[tuple[str, int]]) -> None:
    """Roll the 1m bars of the (instrument, hour start) `hours` up into their 1h rows, then those
    into the 1d rows of their days (in the caller's transaction; rows already right are kept)."""
    for statement, width, keys in ((_ROLLUP_1H, 3600, hours), (_ROLLUP_1D, 86400, {(i, h - h % 86400) for i, h in hours})):
        runs = _runs(keys, width)
        cur.execute(statement, ([i for i, _, _ in runs], [_utc(lo) for _, lo, _ in runs], [_utc(hi) for _, _, hi in runs]))


def _runs(keys: Iterable[tuple[str, int]], width: int) -> list[tuple[str, int, int]]:
    """(instrument, bucket start) keys as maximal (instrument, lo, hi) runs of adjacent buckets."""
    runs: list[list] = []
    for instrument, start in sorted(keys):
        if runs and runs[-1][0] == instrument and runs[-1][2] == start:
            runs[-1][2] = start + width
        else:
            runs.append([instrument, start, start + width])
    return [(i, lo, hi) for i, lo, hi in runs]


class _CopyText:
    """The COPY text of a batch, made in chunks while the COPY runs (so the server works while we
    format) and kept, should the batch be sent twice."""

    CHUNK = 1000  # lines
    columns = _KEYS_AND_VALUES  # of each line, in order

    def __init__(self, bars: Collection[Bar]) -> None:
        self._bars = iter(bars)
        self._count = len(bars)
        self._chunks: list[str] = []
        self._done = False

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        yield from list(self._chunks)
        while not self._done:
            chunk = "".join(_copy_line(bar) for bar in islice(self._bars, self.CHUNK))
            if not chunk:
                self._done = True
                return
            self._chunks.append(chunk)
            yield chunk


def _order(interval: Interval) -> str:
    """Stored 1m rows come in index order (ORDER BY the computed `start` would sort a year of them);
    a union of rollups and deep history can only be ordered by its output column."""
    return " ORDER BY bucket" if interval is Interval.M1 else " ORDER BY start"


@lru_cache(maxsize=256)
def _pyformat(sql: str) -> str:
    """SQLAlchemy's `:name` placeholders as psycopg's `%(name)s` (casts such as `::bigint` kept)."""
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql)


class _Pending:
    """The blocks still to write, non-empty ones only, with a look at the next one."""

    def __init__(self, blocks: Iterable[BarBlock]) -> None:
        self._blocks = (b for b in blocks if b)
        self._next: BarBlock | None = None

    def peek(self) -> BarBlock | None:
        if self._next is None:
            self._next = next(self._blocks, None)
        return self._next

    def pop(self) -> BarBlock | None:
        block, self._next = self.peek(), None
        return block


def _gather(
    pending: _Pending,
    batch: list[BarBlock],
    batch_rows: int,
    columns: tuple[str, ...],
    sink: Callable[[BarBlock], object] | None,
) -> None:
    """Move blocks with `columns` from `pending` into `batch` (each given to `sink` as it comes)
    until the batch holds `batch_rows` bars; the next block is not awaited once it is full."""
    rows = sum(len(b) for b in batch)
    while rows < batch_rows and (block := pending.peek()) is not None and block.columns == columns:
        batch.append(pending.pop())  # type: ignore[arg-type]
        if sink is not None:
            sink(block)
        rows += len(block)


class _BlockText:
    """The COPY text of a batch of blocks with the same `columns`, one join per block, made while the
    COPY runs and kept, should the batch be sent twice."""

    def __init__(self, blocks: list[BarBlock]) -> None:
        self._blocks = blocks
        self._count = sum(len(b) for b in blocks)
        self._chunks: list[str] = []
        self.columns = f'bucket, {", ".join(blocks[0].columns)}, instrument, "interval", trades, source, final'

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        yield from list(self._chunks)
        for block in self._blocks[len(self._chunks) :]:
            chunk = _block_copy_text(block)
            self._chunks.append(chunk)
            yield chunk


def _block_copy_text(block: BarBlock) -> str:
    """The block's COPY text lines (`_BlockText.columns` order): bucket, values as given, the rest."""
    buckets = _bucket_texts(block.starts)
    ident = f"{_copy_text(block.instrument)}\t{_PLAIN[block.interval]}"
    tail = f"{_copy_text(block.source)}\t{'t' if block.final else 'f'}\n"
    if block.trades is None:
        suffix = f"\t{ident}\t\\N\t{tail}"
        return suffix.join(map(add, buckets, block.values)) + suffix
    null = "\\N"
    return "".join(
        f"{b}{v}\t{ident}\t{null if t is None else int(t)}\t{tail}"
        for b, v, t in zip(buckets, block.values, block.trades, strict=True)
    )


def _cursor(conn: Connection) -> psycopg.Cursor:
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver.cursor()


def _copy(cur: psycopg.Cursor, statement: str, lines: Iterable[str]) -> None:
    with cur.copy(statement) as copy:
        for chunk in lines:
            copy.write(chunk)


def _stage_and_merge(cur: psycopg.Cursor, lines: _CopyText | _BlockText) -> UpsertResult:
    """COPY into the session's temp table, drop what would not change, then one INSERT ... ON CONFLICT
    DO UPDATE from the rest."""
    cur.execute(_CREATE_STAGE)
    _copy(cur, f"COPY {_STAGE} ({lines.columns}) FROM STDIN", lines)
    cur.execute(_DROP_UNCHANGED)
    if cur.rowcount == len(lines):  # nothing left to write
        return UpsertResult(0, 0, len(lines))
    cur.execute(_MERGE)
    inserted, updated = cur.fetchone() or (0, 0)
    return UpsertResult(inserted, updated, len(lines) - inserted - updated)


def _copy_line(bar: Bar) -> str:
    """One row of COPY text format, in `_KEYS_AND_VALUES` order.

    Decimals are written as `str()` gives them ('29234.52', '1.50', '1E-8': PostgreSQL's numeric
    input reads exponents exactly), so every digit the source gave is kept.
    """
    interval = _PLAIN[bar.interval]  # checked by _check_interval
    if bar.start % _SECONDS[interval]:
        raise ValueError(f"bar of {bar.instrument}: start {bar.start} is not on a {interval} boundary")
    trades = "\\N" if bar.trades is None else str(int(bar.trades))
    return (
        f"{_copy_text(bar.instrument)}\t{interval}\t{_copy_timestamp(bar.start)}\t{value_text(bar)}\t{trades}\t"
        f"{_copy_text(bar.source)}\t{'t' if bar.final else 'f'}\n"
    )


def _check_interval(bar: Bar) -> None:
    if bar.interval not in _PLAIN:
        raise ValueError(f"bar of {bar.instrument} at {bar.start}: unknown interval {bar.interval!r}")


@lru_cache(maxsize=4096)
def _copy_text(value: str) -> str:
    """Text escaped for COPY text format (instrument ids and source names: few distinct values)."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _copy_timestamp(start: int) -> str:
    """'YYYY-MM-DD HH:MM:SS+00' of a unix time (days and times of day are cached)."""
    day, second = divmod(start, 86400)
    return f"{_day_text(day)} {_time_of_day_text(second)}+00"


@lru_cache(maxsize=8192)
def _day_text(day: int) -> str:
    return (_EPOCH_DAY + timedelta(days=day)).isoformat()


@lru_cache(maxsize=4096)
def _time_of_day_text(second: int) -> str:
    hours, rest = divmod(second, 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def _bucket_texts(starts: Sequence[int]) -> list[str]:
    """'YYYY-MM-DD HH:MM:SS+00\t' of each start (ascending): a COPY bucket field and its tab."""
    first, last = starts[0], starts[-1]
    if last - first != 60 * (len(starts) - 1):  # not one run of consecutive minutes
        return [f"{_day_text(s // 86400)} {_time_of_day_text(s % 86400)}+00\t" for s in starts]
    texts: list[str] = []
    clocks = _minute_clocks()
    minute, end = first // 60, last // 60 + 1
    while minute < end:  # one slice of the day's clock texts per UTC day
        day, of_day = divmod(minute, 1440)
        n = min(1440 - of_day, end - minute)
        texts += map(_day_text(day).__add__, clocks[of_day : of_day + n])
        minute += n
    return texts


@lru_cache(maxsize=1)
def _minute_clocks() -> tuple[str, ...]:
    """' HH:MM:00+00\t' for each minute of a day."""
    return tuple(f" {m // 60:02d}:{m % 60:02d}:00+00\t" for m in range(1440))


def _utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
