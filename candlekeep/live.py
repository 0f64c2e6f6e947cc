"""Event-time bars from a live trade stream: the aggregator's pure core (no I/O, no clock of its own).

    builder = BarBuilder("coinbase:BTC-USD")          # 1m bars, 2 s allowed lateness, 60 min memory
    outcome, revised = builder.offer(trade)           # or builder.add(trade) -> revised bars only
    closed = builder.advance(now_ns)                  # bars whose end + lateness <= now
    builder.forming                                   # the bar of the current bucket, or None
    builder.seal()                                    # after the daemon published what it was given

The kdb+ tick pattern, one instrument per builder. What a bucket's bar holds depends only on the
trades in it and, for a bucket without trades, on the previous close: bars are exactly
`candlekeep.bars.aggregate_trades` of the trades received (source "stream", final=False). Timing
decides only *when* a bar is handed out:
- `advance(now)` closes every bucket with `end + lateness <= now`: buckets with trades as their
  aggregate, quiet ones after the first bar as flat bars at the previous close; before the first
  trade nothing is emitted (a gap, not a flat bar);
- a trade for an already closed bucket (late) re-aggregates that bar and returns it, together with
  the flat bars after it whose previous close changed (a trade before the first bar fills in that
  bar and the flat ones up to the next traded bucket);
- a trade whose bucket is older than the memory horizon (`horizon` closed buckets kept) is
  `TOO_LATE`: nothing changes and the caller dead-letters it; a trade id already seen (within the
  horizon) is a `DUPLICATE` and dropped (the first version wins);
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
    _base          close of the last bar before the window (None: no bar before it, a gap)
    _emitted       bucket start -> the last Bar handed out, for closed buckets in the window
    _unsealed      buckets handed out since the last seal() (a further change keeps the revision)
    _now_ns        the last advance time (the clock's bucket is the forming one)
    _latest        newest bucket with a trade
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from decimal import Decimal

from candlekeep.bars import EXACT, NS_PER_S, Bar, Interval, Trade, trade_order_key

SOURCE = "stream"
DEFAULT_LATENESS_NS = 2 * NS_PER_S
DEFAULT_HORIZON = 60  # closed buckets whose trades are kept, so late trades revise them exactly

_ZERO = Decimal(0)


class Outcome(enum.StrEnum):
    OPEN = "open"  # counted in a bar that is still open
    REVISED = "revised"  # counted in a closed bar: the bar (and flat bars after it) handed out again
    DUPLICATE = "duplicate"  # trade id already seen: dropped
    TOO_LATE = "too_late"  # its bucket is older than the horizon: dropped, to dead-letter


class _Agg:
    """Running aggregate of one bucket's trades (exact: sums in the EXACT context)."""

    __slots__ = ("first_key", "open", "last_key", "close", "high", "low", "volume", "quote_volume", "trades", "ids")

    def __init__(self, trade: Trade, key: tuple) -> None:
        price, size = trade.price, trade.size
        self.first_key = self.last_key = key
        self.open = self.close = self.high = self.low = price
        self.volume = EXACT.add(_ZERO, size)
        self.quote_volume = EXACT.add(_ZERO, EXACT.multiply(price, size))
        self.trades = 1
        self.ids = [trade.trade_id]

    def add(self, trade: Trade, key: tuple) -> None:
        price = trade.price
        # Ties (equal keys) keep arrival order, as the stable sort in aggregate_trades does.
        if key < self.first_key:
            self.first_key, self.open = key, price
        if key >= self.last_key:
            self.last_key, self.close = key, price
        if price > self.high:
            self.high = price
        elif price < self.low:
            self.low = price
        self.volume = EXACT.add(self.volume, trade.size)
        self.quote_volume = EXACT.add(self.quote_volume, EXACT.multiply(price, trade.size))
        self.trades += 1
        self.ids.append(trade.trade_id)


class BarBuilder:
    """Event-time bars of one instrument; see the module docstring."""

    def __init__(
        self,
        instrument: str,
        *,
        lateness_ns: int = DEFAULT_LATENESS_NS,
        interval: Interval = Interval.M1,
        horizon: int = DEFAULT_HORIZON,
        source: str = SOURCE,
        resolution_ns: int = 1,
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
        self._step = self.interval.seconds
        self.closed_until: int | None = None
        self._buckets: dict[int, _Agg] = {}
        self._ids: dict[str, int] = {}
        self._base: Decimal | None = None
        self._emitted: dict[int, Bar] = {}
        self._unsealed: set[int] = set()
        self._now_ns: int | None = None
        self._latest: int | None = None

    # -- input -------------------------------------------------------------------------------

    def add(self, trade: Trade) -> list[Bar]:
        """Count `trade`; the closed bars it changed (revisions), usually none."""
        return self.offer(trade)[1]

    def offer(self, trade: Trade) -> tuple[Outcome, list[Bar]]:
        """Count `trade` and say what happened to it, with the closed bars it changed."""
        if trade.instrument != self.instrument:
            raise ValueError(f"trade of {trade.instrument} given to the {self.instrument} bar builder")
        if trade.trade_id in self._ids:
            return Outcome.DUPLICATE, []
        bucket = self.interval.floor(trade.ts_ns // NS_PER_S)
        closed_until = self.closed_until
        if closed_until is not None and bucket < closed_until - self.horizon * self._step:
            return Outcome.TOO_LATE, []
        self._count(trade, bucket)
        if closed_until is None or bucket >= closed_until:
            return Outcome.OPEN, []
        return Outcome.REVISED, self._recompute_from(bucket)

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
        """Close every bucket with `end + lateness <= now_ns`; the newly closed bars, ascending."""
        if self._now_ns is None or now_ns > self._now_ns:
            self._now_ns = now_ns
        target = self.interval.floor((now_ns - self.lateness_ns) // NS_PER_S)
        start = self.closed_until
        if start is None:
            start = min(self._buckets, default=target)
        elif target <= start:
            return []
        out: list[Bar] = []
        prev = self._close_before(start) if start < target else None
        if start < target and prev is None:  # no bar before the first traded bucket: skip to it
            first = min((b for b in self._buckets if b >= start), default=target)
            start = min(first, target)
        if start < target:
            out = self._close(start, target, prev)
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
        closed_until: int,
        trades: Iterable[Trade],
        stored: Iterable[Bar] = (),
        base_close: Decimal | None = None,
    ) -> list[Bar]:
        """Resume a fresh builder from durable state.

        `closed_until`: the end of the newest stored bar (every bucket before it was closed);
        `trades`: the stored trades from the window start (`window_start(closed_until)`) on;
        `stored`: the stored bars of the window (their values and revisions); `base_close`: the close
        of the last bar before the window (None: a gap before it). Returns the closed bars of the
        window that the stored bars lack or that differ from what the trades give (a crash after
        the ticks of a flush were stored but before its bars), new ones as revision 0 and changed
        ones as stored revision + 1; the caller writes and publishes them.
        """
        if self.closed_until is not None or self._buckets:
            raise RuntimeError("restore() needs a fresh builder")
        if closed_until % self._step:
            raise ValueError(f"closed_until {closed_until} is not on a {self.interval.value} boundary")
        window = self.window_start(closed_until)
        self.closed_until = closed_until
        self._base = base_close
        for bar in stored:
            if window <= bar.start < closed_until:
                self._emitted[bar.start] = bar
        for trade in trades:
            if trade.trade_id in self._ids:
                continue
            bucket = self.interval.floor(trade.ts_ns // NS_PER_S)
            if bucket >= window:
                self._count(trade, bucket)
        return self._close(window, closed_until, base_close)

    def _close(self, start: int, end: int, prev: Decimal | None) -> list[Bar]:
        """Bars of the buckets `[start, end)` (flat after `prev` where quiet), those new or changed."""
        out: list[Bar] = []
        for bucket in range(start, end, self._step):
            bar = self._bar(bucket, prev)
            if bar is None:
                continue
            prev = bar.close
            emitted = self._emit(bar)
            if emitted is not None:
                out.append(emitted)
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
        return self._bar(bucket, self._close_before(bucket))

    def bar(self, start: int) -> Bar | None:
        """The current version of the bar starting at `start` (in the window), or None (a gap)."""
        if start in self._emitted:
            return self._emitted[start]
        return self._bar(start, self._close_before(start))

    @property
    def trade_count(self) -> int:
        """Trades held in memory (the window's and the open buckets')."""
        return len(self._ids)

    # -- internals ---------------------------------------------------------------------------

    def _bar(self, bucket: int, prev_close: Decimal | None) -> Bar | None:
        agg = self._buckets.get(bucket)
        if agg is not None:
            return Bar(
                self.instrument, self.interval.value, bucket, agg.open, agg.high, agg.low, agg.close,
                agg.volume, agg.quote_volume, agg.trades, self.source, False,
            )  # fmt: skip
        if prev_close is None:
            return None
        return Bar(
            self.instrument, self.interval.value, bucket, prev_close, prev_close, prev_close, prev_close,
            _ZERO, _ZERO, 0, self.source, False,
        )  # fmt: skip

    def _close_before(self, bucket: int) -> Decimal | None:
        """Close of the bar just before `bucket` (a flat bar's close is the one before it)."""
        lowest = self.window_start()
        if lowest is None:
            lowest = min(self._buckets, default=bucket)
        b = bucket - self._step
        while b >= lowest:
            agg = self._buckets.get(b)
            if agg is not None:
                return agg.close
            b -= self._step
        return self._base

    def _recompute_from(self, bucket: int) -> list[Bar]:
        """A late trade landed in closed `bucket`: that bar and the flat ones after it, changed."""
        out = []
        bar = self._bar(bucket, self._close_before(bucket))
        assert bar is not None  # the bucket holds a trade now
        emitted = self._emit(bar)
        if emitted is not None:
            out.append(emitted)
        prev = bar.close
        assert self.closed_until is not None
        for b in range(bucket + self._step, self.closed_until, self._step):
            if b in self._buckets:
                break  # a traded bar does not depend on the previous close
            flat = self._bar(b, prev)
            assert flat is not None
            emitted = self._emit(flat)
            if emitted is not None:
                out.append(emitted)
        return out

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
        """Forget the buckets before the window; the close of the newest forgotten one is the base."""
        window = self.window_start()
        if window is None:
            return
        old = sorted(b for b in self._buckets if b < window)
        for b in old:
            agg = self._buckets.pop(b)
            self._base = agg.close
            ids = self._ids
            for trade_id in agg.ids:
                if ids.get(trade_id) == b:
                    del ids[trade_id]
        if len(self._emitted) > self.horizon:
            for b in [b for b in self._emitted if b < window]:
                del self._emitted[b]
                self._unsealed.discard(b)


def _same(a: Bar, b: Bar) -> bool:
    return (a.open, a.high, a.low, a.close, a.volume, a.quote_volume, a.trades) == (
        b.open, b.high, b.low, b.close, b.volume, b.quote_volume, b.trades,
    )  # fmt: skip
