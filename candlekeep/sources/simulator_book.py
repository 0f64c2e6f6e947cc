"""The simulator's L2 order books: a deterministic book per instrument, bracketing its trades.

    sim_books = SimulatorBooks(Simulator(seed), levels=25, snapshot_every_s=60)
    sim_books.book_at(instrument, s)                          # -> (bids, asks) in effect during second s
    for update in sim_books.updates(instrument, start_ns, end_ns):   # BookSnapshot | BookDelta
        ...

In-process, no I/O. The book in effect during unix second `s` (from `s` to `s + 1`) is a pure
function of (seed, instrument, s), so any range can be generated on its own and gives the same
records every time, like the simulator's trades:
- the touch brackets that second's trades: best bid = the lowest and best ask = the highest trade
  price in `[s, s + 1)` (a sell hits the bid, a buy lifts the ask), the ask one tick above the bid
  when they coincide; a second without trades takes the last trade before it as both;
  so `best bid <= price <= best ask` for every trade of the second;
- deeper levels sit on a grid of `spacing` ticks (a power of ten near 1 bps of the price), each grid
  price present or absent and sized by a hash of (seed, instrument, grid price, epoch): an epoch
  lasts 20 s, phase-shifted per price, so a level lives on while the touch moves and sizes change
  a few at a time (realistic deltas, not a new book every second);
- sizes are log-normal around the simulator's median trade notional, in 1e-8 units.
Records: one update per second at `ts_ns = s * 10**9`, `sequence = s`. A `BookSnapshot` on every
second divisible by `snapshot_every_s` and at the start of every range; a `BookDelta`
(`prev_sequence = s - 1`, absolute new sizes, 0 removes a level) otherwise, holding exactly what
changed between the books of `s - 1` and `s`. `verified=True`: the chain is gapless by construction.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from decimal import Decimal

from candlekeep.bars import EXACT, NS_PER_S
from candlekeep.books import BookDelta, BookSnapshot, Level
from candlekeep.instruments import Instrument
from candlekeep.sources.simulator import NAME, SIZE_DECIMALS, Simulator

_EPOCH_S = 20
_PRESENT = 0.7  # share of grid prices holding an order at any epoch
_MAX_SCAN = 400  # grid steps scanned for `levels` present prices (0.7^400: never exhausted)
_U64 = 2.0**-64


def _h(*parts: object) -> int:
    """A 64-bit hash of a tuple (stable across processes, unlike `hash`)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _normal(h: int) -> float:
    """An approximately standard normal from four 16-bit chunks of `h` (Irwin-Hall)."""
    s = (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF) + (h >> 48)
    return (s / 65535.0 - 2.0) * math.sqrt(3.0)


class SimulatorBooks:
    """Deterministic books of the simulator's instruments (module doc); holds no state but caches."""

    def __init__(self, simulator: Simulator, *, levels: int = 25, snapshot_every_s: int = 60) -> None:
        if levels < 1 or snapshot_every_s < 1:
            raise ValueError("levels and snapshot_every_s must be at least 1")
        self.simulator, self.levels, self.snapshot_every_s = simulator, levels, snapshot_every_s

    # -- one book ----------------------------------------------------------------------------

    def _touch(self, instrument: Instrument, s: int) -> tuple[int, int]:
        """(best bid, best ask) in ticks for second `s`, from that second's trades."""
        decimals = self.simulator.price_decimals(instrument)
        prices = [int(t.price.scaleb(decimals, EXACT)) for t in
                  self.simulator.trades(instrument, s * NS_PER_S, (s + 1) * NS_PER_S)]  # fmt: skip
        return self._touch_of(instrument, s, prices)

    def _touch_of(self, instrument: Instrument, s: int, prices: list[int]) -> tuple[int, int]:
        if not prices:
            last = self.simulator.last_trade_before(instrument, s * NS_PER_S)
            prices = [int(last.price.scaleb(self.simulator.price_decimals(instrument), EXACT))]
        lo, hi = min(prices), max(prices)
        return lo, hi if hi > lo else lo + 1

    def _levels_ticks(self, instrument: Instrument, s: int, bid: int, ask: int) -> tuple[dict[int, int], dict[int, int]]:
        """{price ticks: size units} of both sides for second `s` with the given touch."""
        seed, iid = self.simulator.seed, instrument.id
        spacing = 10 ** max(0, math.floor(math.log10(max(bid, 1) * 1e-4)))
        decimals = self.simulator.price_decimals(instrument)
        # Median level size: a few median trades (400 USD-ish notional), in 1e-8 base units.
        median = max(1, int(2_000.0 * 10**decimals / max(bid, 1) * 10**SIZE_DECIMALS / self._usd_per_quote(instrument)))

        def size(price: int, epoch_key: object) -> int:
            return max(1, int(median * math.exp(0.9 * _normal(_h("size", seed, iid, price, epoch_key)))))

        bids = {bid: size(bid, ("touch", s))}
        asks = {ask: size(ask, ("touch", s))}
        for side, start, step in ((bids, (bid - 1) // spacing * spacing, -spacing),
                                  (asks, -(-(ask + 1) // spacing) * spacing, spacing)):  # fmt: skip
            price = start
            for _ in range(_MAX_SCAN):
                if len(side) >= self.levels or price <= 0:
                    break
                phase = _h("phase", seed, iid, price) % _EPOCH_S
                epoch = (s + phase) // _EPOCH_S
                if _h("present", seed, iid, price, epoch) * _U64 < _PRESENT:
                    side[price] = size(price, epoch)
                price += step
        return bids, asks

    @staticmethod
    def _usd_per_quote(instrument: Instrument) -> float:
        return {"BTC": 60_000.0, "ETH": 3_000.0}.get(instrument.quote, 1.0)

    def _book_ticks(self, instrument: Instrument, s: int, prices: list[int] | None = None) -> tuple[dict[int, int], dict[int, int]]:
        bid, ask = self._touch(instrument, s) if prices is None else self._touch_of(instrument, s, prices)
        return self._levels_ticks(instrument, s, bid, ask)

    def _as_levels(self, instrument: Instrument, side: dict[int, int], descending: bool) -> tuple[Level, ...]:
        decimals = self.simulator.price_decimals(instrument)
        return tuple((Decimal(p).scaleb(-decimals, EXACT), Decimal(q).scaleb(-SIZE_DECIMALS, EXACT))
                     for p, q in sorted(side.items(), reverse=descending))  # fmt: skip

    def book_at(self, instrument: Instrument, s: int) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
        """(bids best first, asks best first) in effect during unix second `s`."""
        bids, asks = self._book_ticks(instrument, s)
        return self._as_levels(instrument, bids, True), self._as_levels(instrument, asks, False)

    # -- records -----------------------------------------------------------------------------

    def updates(self, instrument: Instrument, start_ns: int, end_ns: int) -> Iterator[BookSnapshot | BookDelta]:
        """The records with `start_ns <= ts_ns < end_ns` (module doc), in time order."""
        first = -(-start_ns // NS_PER_S)
        stop = -(-end_ns // NS_PER_S)
        if first >= stop:
            return
        decimals = self.simulator.price_decimals(instrument)
        by_second: dict[int, list[int]] = {}
        for trade in self.simulator.trades(instrument, first * NS_PER_S, stop * NS_PER_S):
            by_second.setdefault(trade.ts_ns // NS_PER_S, []).append(int(trade.price.scaleb(decimals, EXACT)))
        previous: tuple[dict[int, int], dict[int, int]] | None = None
        for s in range(first, stop):
            book = self._book_ticks(instrument, s, by_second.get(s, []))
            ts_ns = s * NS_PER_S
            if previous is None or s % self.snapshot_every_s == 0:
                yield BookSnapshot(instrument.id, ts_ns, ts_ns, s, None, self._as_levels(instrument, book[0], True),
                                   self._as_levels(instrument, book[1], False), NAME, True)  # fmt: skip
            else:
                bids = _diff(previous[0], book[0])
                asks = _diff(previous[1], book[1])
                yield BookDelta(instrument.id, ts_ns, ts_ns, s, s - 1, self._as_levels(instrument, bids, True),
                                self._as_levels(instrument, asks, False), NAME, True)  # fmt: skip
            previous = book


def _diff(old: dict[int, int], new: dict[int, int]) -> dict[int, int]:
    """The levels that changed from `old` to `new`, as absolute sizes (0: removed)."""
    out = {p: q for p, q in new.items() if old.get(p) != q}
    out.update({p: 0 for p in old if p not in new})
    return out
