"""Event-time bars from the `ticks` log: the aggregator's pure core (no I/O, no clock of its own).

    builder = BarBuilder("coinbase:BTC-USD")          # 1m bars, 2 s allowed lateness, 60 min memory
    outcome, changed = builder.offer(trade)           # revised and newly closed bars
    changed = builder.heartbeat(ts_ns)                # the source vouches for everything up to ts_ns
    builder.disconnect(ts_ns, source, reason)         # the source cannot vouch from here on (a gap)
    builder.take_gaps()                               # gap spans opened / closed since the last call
    builder.forming                                   # the bar of the current bucket, or None
    builder.seal()                                    # after the daemon published what it was given

    bars, gaps = bars_of_log(records)                 # the whole thing as one pure function

The log's clock (DESIGN.md "Bar semantics"): an instrument's clock is the largest `ts_ns` of its
trades and heartbeats; a bucket closes when the clock passes `end + lateness`. A disconnect opens a
gap at the clock (the record before it); the next trade or heartbeat closes it at its own time. A
bucket with trades always has its bar (one holding an edge of a gap is partial: the gap, stored as
an outage, says so). A quiet bucket is a flat bar at the previous close only when no gap lies
between the trade that set that close and the bucket's end: the source was live through it. After
a gap, quiet buckets have no bar (a gap, reported) until the next trade. No wall clock anywhere: the
same records give the same bars, at any speed and in any batching.

The kdb+ tick pattern, one instrument per builder. What a bucket's bar holds depends only on the
trades in it and, for a bucket without trades, on the previous close: bars are exactly
`candlekeep.bars.aggregate_trades` of the trades received (source "stream", final=False). Timing
decides only *when* a bar is handed out:
- `advance(clock)` closes every bucket with `end + lateness <= clock`: buckets with trades as their
  aggregate, quiet ones as flat bars where the rule above allows; before the first trade nothing is
  emitted (a gap, not a flat bar). `offer` and `heartbeat` call it with the instrument's clock;
- a trade for an already closed bucket (late) re-aggregates that bar and returns it, together with
  the flat bars after it whose previous close changed (a trade before the first bar fills in that
  bar and the flat ones up to the next traded bucket);
- a trade whose bucket is older than the memory horizon (`horizon` closed buckets kept) is
  `TOO_LATE`: nothing changes here; the caller stores it and revises that bar from the stored
  ticks (it is valid, however late); a trade id already seen (within the horizon) is a `DUPLICATE`
  and dropped (the first version wins);
- a record that cannot be counted exactly (more digits than the EXACT context holds) or whose time
  is further than `max_ahead_ns` ahead of the clock (or `max_behind_ns` behind it) raises `Poison`
  and changes nothing: the caller dead-letters it and every other record goes on;
- `resolution_ns` (default 1) orders trades by their time truncated to that resolution, then id:
  the aggregator uses 1000, the `ticks` table's microseconds, so its bars equal the stored ones.
Revisions count published versions: a closed bar goes out as revision 0, and a change after the
last `seal()` makes it revision + 1 once; more changes before the next seal keep that number (the
daemon seals as it cuts a batch to flush, so it publishes one revision per flush, as the database
counts).

Startup is recovery: `restore()` resumes a fresh builder from the stored ticks and bars, so a
restarted daemon continues exactly where the stored state says it was.

State (one block, all of it):
    closed_until   unix s: every bucket starting before it is closed (handed out); None before the
                   first advance/restore
    _buckets       bucket start -> _Agg (running OHLCV of its trades), for buckets >= window start
    _ids           trade id -> bucket start, for the trades in `_buckets` (duplicate detection)
    _base          (close, time of its trade) of the last bar before the window (None: a gap)
    clock_ns       the log's clock: largest ts of trades and heartbeats (None before the first)
    _gaps          [start_ns, end_ns | None] spans the source could not vouch for (None: still open)
    _new_gaps      Gap records opened or closed since the last take_gaps()
    _emitted       bucket start -> the last Bar handed out, for closed buckets in the window
    _unsealed      buckets handed out since the last seal() (a further change keeps the revision)
    _now_ns        the last advance time (the clock's bucket is the forming one)
    _gap_from      the reference time of a disconnect not yet followed by a record (poison checks)
    _latest        newest bucket with a trade
"""

from __future__ import annotations

import decimal
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from candlekeep.bars import (
    EXACT,
    NS_PER_S,
    Bar,
    Heartbeat,
    Interval,
    TickRecord,
    Trade,
    iso_utc,
    trade_order_key,
)

SOURCE = "stream"
DEFAULT_LATENESS_NS = 2 * NS_PER_S
DEFAULT_HORIZON = 60  # closed buckets whose trades are kept, so late trades revise them exactly
# A record this far from its instrument's clock is poison, not data: a year-away timestamp would
# otherwise close millions of buckets at once. After a disconnect the reference is its time.
DEFAULT_MAX_AHEAD_NS = 86_400 * NS_PER_S
DEFAULT_MAX_BEHIND_NS = 7 * 86_400 * NS_PER_S

_ZERO = Decimal(0)


class Outcome(enum.StrEnum):
    OPEN = "open"  # counted in a bar that is still open
    REVISED = "revised"  # counted in a closed bar: the bar (and flat bars after it) handed out again
    DUPLICATE = "duplicate"  # trade id already seen: dropped
    TOO_LATE = "too_late"  # its bucket is older than the horizon: the caller revises it from storage


class Poison(ValueError):
    """A record that cannot be counted; the text is the reason (for the dead letter)."""


@dataclass(frozen=True, slots=True)
class Gap:
    """A span the source could not vouch for: from the record before a disconnect to the record
    after it (`end_ns` None: no record since). Stored as an `outages` row."""

    instrument: str
    start_ns: int
    end_ns: int | None
    source: str
    reason: str


_Ref = tuple[Decimal, int]  # (close, time of the trade that set it): what a flat bar repeats


class _Agg:
    """Running aggregate of one bucket's trades (exact: sums in the EXACT context)."""

    __slots__ = ("first_key", "open", "last_key", "close", "high", "low", "volume", "quote_volume", "trades", "ids")

    def __init__(self, trade: Trade, key: tuple) -> None:
        price, size = trade.price, trade.size
        volume, quote = _exact_sums(_ZERO, _ZERO, price, size)
        self.first_key = self.last_key = key
        self.open = self.close = self.high = self.low = price
        self.volume = volume
        self.quote_volume = quote
        self.trades = 1
        self.ids = [trade.trade_id]

    def add(self, trade: Trade, key: tuple) -> None:
        price = trade.price
        # The sums first: a trade they cannot hold exactly raises Poison and changes nothing.
        self.volume, self.quote_volume = _exact_sums(self.volume, self.quote_volume, price, trade.size)
        # Ties (equal keys) keep arrival order, as the stable sort in aggregate_trades does.
        if key < self.first_key:
            self.first_key, self.open = key, price
        if key >= self.last_key:
            self.last_key, self.close = key, price
        if price > self.high:
            self.high = price
        elif price < self.low:
            self.low = price
        self.trades += 1
        self.ids.append(trade.trade_id)


def _exact_sums(volume: Decimal, quote: Decimal, price: Decimal, size: Decimal) -> tuple[Decimal, Decimal]:
    try:
        return EXACT.add(volume, size), EXACT.add(quote, EXACT.multiply(price, size))
    except (decimal.Inexact, decimal.InvalidOperation):
        raise Poison(f"price {price} x size {size} has more digits than the exact sums hold "
                     f"({EXACT.prec})") from None  # fmt: skip


class BarBuilder:
    """Event-time bars of one instrument, on the log's clock; see the module docstring."""

    def __init__(
        self,
        instrument: str,
        *,
        lateness_ns: int = DEFAULT_LATENESS_NS,
        interval: Interval = Interval.M1,
        horizon: int = DEFAULT_HORIZON,
        source: str = SOURCE,
        resolution_ns: int = 1,
        max_ahead_ns: int = DEFAULT_MAX_AHEAD_NS,
        max_behind_ns: int = DEFAULT_MAX_BEHIND_NS,
    ) -> None:
        if lateness_ns < 0:
            raise ValueError("lateness_ns must not be negative")
        if horizon < 1:
            raise ValueError("horizon must be at least one bucket")
        if resolution_ns < 1 or NS_PER_S % resolution_ns:
            raise ValueError("resolution_ns must divide a second")
        self.instrument = instrument
        self.interval = Interval(interval)
        self.lateness_ns = int(lateness_ns)
        self.horizon = horizon
        self.source = source
        self.resolution_ns = resolution_ns
        self.max_ahead_ns, self.max_behind_ns = max_ahead_ns, max_behind_ns
        self._step = self.interval.seconds
        self.closed_until: int | None = None
        self.clock_ns: int | None = None
        self._buckets: dict[int, _Agg] = {}
        self._ids: dict[str, int] = {}
        self._base: _Ref | None = None
        self._emitted: dict[int, Bar] = {}
        self._unsealed: set[int] = set()
        self._now_ns: int | None = None
        self._latest: int | None = None
        self._gaps: list[list] = []  # [start_ns, end_ns | None, source, reason]
        self._new_gaps: list[Gap] = []
        self._gap_from: int | None = None

    # -- input -------------------------------------------------------------------------------

    def feed(self, record: TickRecord) -> tuple[Outcome | None, list[Bar]]:
        """Apply one `ticks` record of this instrument: (the trade's outcome or None, changed bars)."""
        if isinstance(record, Trade):
            return self.offer(record)
        if isinstance(record, Heartbeat):
            return None, self.heartbeat(record.ts_ns)
        return None, self.disconnect(record.ts_ns, record.source, record.reason)

    def add(self, trade: Trade) -> list[Bar]:
        """Count `trade`; the closed bars it changed or closed."""
        return self.offer(trade)[1]

    def offer(self, trade: Trade) -> tuple[Outcome, list[Bar]]:
        """Count `trade` and say what happened to it, with the bars it changed or closed."""
        if trade.instrument != self.instrument:
            raise ValueError(f"trade of {trade.instrument} given to the {self.instrument} bar builder")
        ts_ns = trade.ts_ns
        # The aggregator's hot path (once per trade): the checks of _check_time inlined.
        ref = self._gap_from if self._gap_from is not None else self.clock_ns
        if ref is not None and (ts_ns - ref > self.max_ahead_ns or ref - ts_ns > self.max_behind_ns):
            self._check_time(ts_ns, "trade")  # raises Poison with the reason
        if trade.trade_id in self._ids:
            return Outcome.DUPLICATE, self._tick(ts_ns)
        ts_s = ts_ns // NS_PER_S
        bucket = ts_s - ts_s % self._step
        closed_until = self.closed_until
        if closed_until is not None and bucket < closed_until - self.horizon * self._step:
            return Outcome.TOO_LATE, self._tick(ts_ns)
        self._count(trade, bucket)
        if closed_until is None or bucket >= closed_until:
            return Outcome.OPEN, self._tick(ts_ns)
        revised = self._recompute_from(bucket)
        return Outcome.REVISED, revised + self._tick(ts_ns)

    def heartbeat(self, ts_ns: int) -> list[Bar]:
        """The source has sent every trade up to `ts_ns`: the clock moves; the bars that closed."""
        self._check_time(ts_ns, "heartbeat")
        return self._tick(ts_ns)

    def disconnect(self, ts_ns: int, source: str, reason: str) -> list[Bar]:
        """The source cannot vouch from its previous record to its next: a gap opens at the clock
        (at `ts_ns`, when it noticed, if nothing came before). Moves no clock, closes nothing."""
        if self._gaps and self._gaps[-1][1] is None:
            return []  # one gap already open: the next record closes it
        start = self.clock_ns if self.clock_ns is not None else ts_ns
        start -= start % self.resolution_ns  # gap edges at the trades' resolution, see _tick
        self._gaps.append([start, None, source, reason])
        self._new_gaps.append(Gap(self.instrument, start, None, source, reason))
        self._gap_from = ts_ns
        return []

    def take_gaps(self) -> list[Gap]:
        """Gaps opened or closed since the last call (an open one, then the same one closed)."""
        gaps, self._new_gaps = self._new_gaps, []
        return gaps

    @property
    def gap_open(self) -> Gap | None:
        if self._gaps and self._gaps[-1][1] is None:
            start, _, source, reason = self._gaps[-1]
            return Gap(self.instrument, start, None, source, reason)
        return None

    def _check_time(self, ts_ns: int, what: str) -> None:
        ref = self._gap_from if self._gap_from is not None else self.clock_ns
        if ref is None:
            return
        if ts_ns - ref > self.max_ahead_ns:
            raise Poison(f"{what} at {iso_utc(ts_ns // NS_PER_S)} is {(ts_ns - ref) // NS_PER_S} s ahead of the clock of "
                         f"{self.instrument} ({iso_utc(ref // NS_PER_S)}); the bound is {self.max_ahead_ns // NS_PER_S} s")  # fmt: skip
        if ref - ts_ns > self.max_behind_ns:
            raise Poison(f"{what} at {iso_utc(ts_ns // NS_PER_S)} is {(ref - ts_ns) // NS_PER_S} s behind the clock of "
                         f"{self.instrument} ({iso_utc(ref // NS_PER_S)}); the bound is {self.max_behind_ns // NS_PER_S} s")  # fmt: skip

    def _tick(self, ts_ns: int) -> list[Bar]:
        """A trade or heartbeat at `ts_ns` was applied: close an open gap, move the clock, close buckets."""
        if self._gaps and self._gaps[-1][1] is None:
            gap = self._gaps[-1]
            # At the resolution trades are ordered (and stored) at, like the flat-bar reference it is
            # compared with: a gap ending at a trade's nanoseconds would otherwise lie after that
            # trade's truncated time and deny the flat bars after it. Stored outages hold the same
            # truncated times, so a restored builder decides as this one does.
            gap[1] = max(ts_ns - ts_ns % self.resolution_ns, gap[0])
            self._new_gaps.append(Gap(self.instrument, gap[0], gap[1], gap[2], gap[3]))
        self._gap_from = None
        if self.clock_ns is None or ts_ns > self.clock_ns:
            self.clock_ns = ts_ns
        clock_ns = self.clock_ns
        # Most records close nothing: answer that without advance() (the same test it makes first).
        closed_until, step = self.closed_until, self._step
        if closed_until is not None:
            target_s = (clock_ns - self.lateness_ns) // NS_PER_S
            if target_s - target_s % step <= closed_until:
                if self._now_ns is None or clock_ns > self._now_ns:
                    self._now_ns = clock_ns
                return []
        return self.advance(clock_ns)

    def _count(self, trade: Trade, bucket: int) -> None:
        ts_ns = trade.ts_ns
        key = trade_order_key(ts_ns - ts_ns % self.resolution_ns, trade.trade_id)
        agg = self._buckets.get(bucket)
        if agg is None:
            self._buckets[bucket] = _Agg(trade, key)
            if self._latest is None or bucket > self._latest:
                self._latest = bucket
        else:
            agg.add(trade, key)
        self._ids[trade.trade_id] = bucket

    # -- closing -----------------------------------------------------------------------------

    def advance(self, now_ns: int) -> list[Bar]:
        """Close every bucket with `end + lateness <= now_ns`; the newly closed bars, ascending.

        The daemon never calls this with a wall clock: `offer` and `heartbeat` call it with the log's.
        """
        if self._now_ns is None or now_ns > self._now_ns:
            self._now_ns = now_ns
        target = self.interval.floor((now_ns - self.lateness_ns) // NS_PER_S)
        start = self.closed_until
        if start is None:
            start = min(self._buckets, default=target)
        elif target <= start:
            return []
        out = self._close(start, target, self._ref_before(start)) if start < target else []
        if self.closed_until is None or target > self.closed_until:
            self.closed_until = target
        self._prune()
        return out

    def seal(self) -> None:
        """The bars handed out so far were published: a further change is a new revision."""
        self._unsealed.clear()

    # -- recovery ----------------------------------------------------------------------------

    def restore(
        self,
        *,
        closed_until: int | None,
        trades: Iterable[Trade] = (),
        stored: Iterable[Bar] = (),
        base: _Ref | None = None,
        clock_ns: int | None = None,
        gaps: Iterable[Gap] = (),
    ) -> list[Bar]:
        """Resume a fresh builder from durable state.

        `closed_until`: every bucket before it was closed; `clock_ns`: the log's clock then;
        `trades`: the stored trades from the window start (`window_start(closed_until)`) on;
        `stored`: the stored bars of the window (their values and revisions); `base`: (close, time)
        of the last trade before the window (None: a gap before it); `gaps`: the stored gaps that
        reach into the window or after `base` (the last may still be open). Returns the closed bars
        of the window that the stored bars lack or that differ from what the trades give (a crash
        after the ticks of a flush were stored but before its bars); the caller writes them.
        """
        if self.closed_until is not None or self._buckets:
            raise RuntimeError("restore() needs a fresh builder")
        self._gaps = [[g.start_ns, g.end_ns, g.source, g.reason] for g in sorted(gaps, key=lambda g: g.start_ns)]
        self.clock_ns = self._now_ns = clock_ns
        if closed_until is None:  # records were seen, no bucket closed yet
            for trade in trades:
                self._count(trade, self.interval.floor(trade.ts_ns // NS_PER_S))
            return []
        if closed_until % self._step:
            raise ValueError(f"closed_until {closed_until} is not on a {self.interval.value} boundary")
        window = self.window_start(closed_until)
        assert window is not None
        self.closed_until = closed_until
        self._base = base
        for bar in stored:
            if window <= bar.start < closed_until:
                self._emitted[bar.start] = bar
        for trade in trades:
            if trade.trade_id in self._ids:
                continue
            bucket = self.interval.floor(trade.ts_ns // NS_PER_S)
            if bucket >= window:
                self._count(trade, bucket)
        return self._close(window, closed_until, base)

    def _close(self, start: int, end: int, ref: _Ref | None) -> list[Bar]:
        """Bars of the buckets `[start, end)` given the reference before them; those new or changed.

        A quiet bucket is flat only while `ref` holds across it with no gap in between; otherwise
        nothing is emitted up to the next traded bucket (jumped to: a long silence costs nothing).
        """
        out: list[Bar] = []
        step = self._step
        traded = sorted(b for b in self._buckets if start <= b < end)
        ti, bucket = 0, start
        while bucket < end:
            agg = self._buckets.get(bucket)
            if agg is not None:
                bar = self._bar_of(bucket, agg)
                ref = (agg.close, agg.last_key[0])
                ti += 1
            elif ref is not None and not self._gap_within(ref[1], (bucket + step) * NS_PER_S):
                bar = self._flat(bucket, ref[0])
            else:
                ref = None
                while ti < len(traded) and traded[ti] < bucket:
                    ti += 1
                bucket = traded[ti] if ti < len(traded) else end
                continue
            emitted = self._emit(bar)
            if emitted is not None:
                out.append(emitted)
            bucket += step
        return out

    def window_start(self, closed_until: int | None = None) -> int | None:
        """First bucket whose trades are kept (older ones are TOO_LATE)."""
        closed_until = self.closed_until if closed_until is None else closed_until
        return None if closed_until is None else closed_until - self.horizon * self._step

    # -- views -------------------------------------------------------------------------------

    @property
    def forming(self) -> Bar | None:
        """The bar of the current bucket (the clock's, or a newer one holding trades), if open."""
        bucket = self._latest
        if self._now_ns is not None:
            clock_bucket = self.interval.floor(self._now_ns // NS_PER_S)
            if bucket is None or clock_bucket > bucket:
                bucket = clock_bucket
        if bucket is None or (self.closed_until is not None and bucket < self.closed_until):
            return None
        return self.bar(bucket)

    @property
    def closing(self) -> list[Bar]:
        """Bars of the buckets that ended but are not closed yet (within the lateness): shown as
        they stand until they close, so a reader never loses the minute that just ended."""
        forming = self.forming
        if self.closed_until is None or forming is None:
            return []
        return [b for start in range(self.closed_until, forming.start, self._step) if (b := self.bar(start))]

    def bar(self, start: int) -> Bar | None:
        """The current version of the bar starting at `start` (in the window), or None (a gap)."""
        if start in self._emitted:
            return self._emitted[start]
        agg = self._buckets.get(start)
        if agg is not None:
            return self._bar_of(start, agg)
        ref = self._ref_before(start)
        if ref is None or self._gap_within(ref[1], (start + self._step) * NS_PER_S):
            return None
        return self._flat(start, ref[0])

    @property
    def trade_count(self) -> int:
        """Trades held in memory (the window's and the open buckets')."""
        return len(self._ids)

    # -- internals ---------------------------------------------------------------------------

    def _bar_of(self, bucket: int, agg: _Agg) -> Bar:
        return Bar(
            self.instrument, self.interval.value, bucket, agg.open, agg.high, agg.low, agg.close,
            agg.volume, agg.quote_volume, agg.trades, self.source, False,
        )  # fmt: skip

    def _flat(self, bucket: int, close: Decimal) -> Bar:
        return Bar(self.instrument, self.interval.value, bucket, close, close, close, close, _ZERO, _ZERO, 0,
                   self.source, False)  # fmt: skip

    def _ref_before(self, bucket: int) -> _Ref | None:
        """(close, trade time) of the last traded bucket before `bucket`, or the base."""
        lowest = self.window_start()
        if lowest is None:
            lowest = min(self._buckets, default=bucket)
        b = bucket - self._step
        while b >= lowest:
            agg = self._buckets.get(b)
            if agg is not None:
                return agg.close, agg.last_key[0]
            b -= self._step
        return self._base

    def _gap_within(self, lo_ns: int, hi_ns: int) -> bool:
        """Does a (non-empty) gap overlap `[lo_ns, hi_ns)`?"""
        for start, end, _, _ in self._gaps:
            if start < hi_ns and (end is None or (end > lo_ns and end > start)):
                return True
        return False

    def _recompute_from(self, bucket: int) -> list[Bar]:
        """A late trade landed in closed `bucket`: that bar and the flat ones after it, changed."""
        assert self.closed_until is not None
        return self._close(bucket, self.closed_until, self._ref_before(bucket))

    def _emit(self, bar: Bar) -> Bar | None:
        """`bar` with its revision when it differs from the version handed out; None when equal."""
        last = self._emitted.get(bar.start)
        if last is None:
            revision = 0
        elif _same(last, bar):
            return None
        elif bar.start in self._unsealed:
            revision = last.revision
        else:
            revision = last.revision + 1
        if revision:  # Bar(...) directly: dataclasses.replace costs several times more
            bar = Bar(bar.instrument, bar.interval, bar.start, bar.open, bar.high, bar.low, bar.close, bar.volume,
                      bar.quote_volume, bar.trades, bar.source, bar.final, revision)  # fmt: skip
        self._emitted[bar.start] = bar
        self._unsealed.add(bar.start)
        return bar

    def _prune(self) -> None:
        """Forget the buckets before the window; the newest forgotten one is the base. Gaps that
        ended before both the window and the base's trade cannot matter any more."""
        window = self.window_start()
        if window is None:
            return
        old = sorted(b for b in self._buckets if b < window)
        for b in old:
            agg = self._buckets.pop(b)
            self._base = (agg.close, agg.last_key[0])
            ids = self._ids
            for trade_id in agg.ids:
                if ids.get(trade_id) == b:
                    del ids[trade_id]
        if len(self._emitted) > self.horizon:
            for b in [b for b in self._emitted if b < window]:
                del self._emitted[b]
                self._unsealed.discard(b)
        if self._gaps:
            keep_from = min(window * NS_PER_S, self._base[1] if self._base else window * NS_PER_S)
            self._gaps = [g for g in self._gaps if g[1] is None or g[1] > keep_from]


def _same(a: Bar, b: Bar) -> bool:
    return (a.open, a.high, a.low, a.close, a.volume, a.quote_volume, a.trades) == (
        b.open, b.high, b.low, b.close, b.volume, b.quote_volume, b.trades,
    )  # fmt: skip


def bars_of_log(records: Iterable[TickRecord], **options) -> tuple[dict[tuple[str, int], Bar], list[Gap]]:
    """The bar logic as one pure function: `ticks` records in log order -> the latest version of
    every closed bar, by (instrument, start), and every gap (closed or still open), by start.

    What the aggregator daemon stores, whatever its batching, speed or crashes; `options` are
    BarBuilder's. Poison records and too-late trades are skipped here (the daemon dead-letters the
    first and revises the second from storage).
    """
    builders: dict[str, BarBuilder] = {}
    bars: dict[tuple[str, int], Bar] = {}
    gaps: dict[tuple[str, int], Gap] = {}
    for record in records:
        builder = builders.get(record.instrument)
        if builder is None:
            builder = builders[record.instrument] = BarBuilder(record.instrument, **options)
        try:
            _, changed = builder.feed(record)
        except Poison:
            continue
        for bar in changed:
            bars[(bar.instrument, bar.start)] = bar
        for gap in builder.take_gaps():
            gaps[(gap.instrument, gap.start_ns)] = gap
    return bars, sorted(gaps.values(), key=lambda g: (g.instrument, g.start_ns))
