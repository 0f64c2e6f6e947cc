"""A per-instrument L2 order book with exact Decimal prices and sizes, and the venues' checksums.

    book = OrderBook("kraken:BTC-USD", depth=1000)
    book.replace(bids, asks)                    # a snapshot: (price, size) levels, any order
    book.set_bid(price, size); book.set_ask(price, size)   # absolute size; 0 removes the level
    book.best_bid(), book.best_ask(), book.top(10), book.crossed()
    kraken_checksum(book), okx_checksum(book)   # the venues' CRC32 over the top levels

Each side is a dict (price -> size) beside a sorted list of its prices, kept in order with
`bisect` (bench/books.py measures it against `sortedcontainers.SortedDict` and the C `order-book`
package on the real recordings; README "Libraries, and why" has the figures). Prices are
`Decimal`s, so the levels compare exactly; a level keeps the price text it was first seen with and
the size text of its last update, which is what the venues' checksum rules format.

No I/O; one book belongs to one instrument and one thread of control.
"""

from __future__ import annotations

import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from decimal import Decimal

from candlekeep.bars import decimal_str

Level = tuple[Decimal, Decimal]  # (price, size)
_ZERO = Decimal(0)


class _Side:
    """One side: sizes by price, and the prices in ascending order."""

    __slots__ = ("sizes", "prices")

    def __init__(self) -> None:
        self.sizes: dict[Decimal, Decimal] = {}
        self.prices: list[Decimal] = []

    def set(self, price: Decimal, size: Decimal) -> None:
        sizes = self.sizes
        if size == _ZERO:
            if sizes.pop(price, None) is not None:  # removing an absent level is normal (Binance docs)
                prices = self.prices
                del prices[bisect_left(prices, price)]
            return
        if price not in sizes:
            prices = self.prices
            prices.insert(bisect_left(prices, price), price)
        sizes[price] = size

    def clear(self) -> None:
        self.sizes.clear()
        self.prices.clear()

    def __len__(self) -> int:
        return len(self.prices)


class OrderBook:
    """One instrument's L2 book. `depth` (when set) is the venue's subscribed depth: `truncate()`
    drops the levels beyond it, as Kraken requires (it sends no delete for a level that falls out
    of scope)."""

    __slots__ = ("instrument", "depth", "_bids", "_asks")

    def __init__(self, instrument: str, depth: int | None = None) -> None:
        self.instrument = instrument
        self.depth = depth
        self._bids = _Side()
        self._asks = _Side()

    # -- updates ----------------------------------------------------------------------------------

    def replace(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """A snapshot: the book becomes exactly these levels (size-0 levels are ignored; a price
        given twice keeps its last size). One sort per side instead of an insert per level."""
        for side, levels in ((self._bids, bids), (self._asks, asks)):
            side.sizes = {price: size for price, size in levels if size != _ZERO}
            side.prices = sorted(side.sizes)

    def update(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """A delta: absolute sizes per level, applied in order (size 0 removes the level)."""
        set_bid, set_ask = self._bids.set, self._asks.set
        for price, size in bids:
            set_bid(price, size)
        for price, size in asks:
            set_ask(price, size)

    def set_bid(self, price: Decimal, size: Decimal) -> None:
        self._bids.set(price, size)

    def set_ask(self, price: Decimal, size: Decimal) -> None:
        self._asks.set(price, size)

    def truncate(self, depth: int | None = None) -> None:
        """Keep the best `depth` levels per side (default: the book's own depth)."""
        depth = depth if depth is not None else self.depth
        if depth is None:
            return
        bids, asks = self._bids, self._asks
        if len(bids.prices) > depth:
            gone = bids.prices[: len(bids.prices) - depth]
            del bids.prices[: len(bids.prices) - depth]
            for price in gone:
                del bids.sizes[price]
        if len(asks.prices) > depth:
            gone = asks.prices[depth:]
            del asks.prices[depth:]
            for price in gone:
                del asks.sizes[price]

    def clear(self) -> None:
        self._bids.clear()
        self._asks.clear()

    # -- reads ------------------------------------------------------------------------------------

    def best_bid(self) -> Level | None:
        prices = self._bids.prices
        if not prices:
            return None
        return prices[-1], self._bids.sizes[prices[-1]]

    def best_ask(self) -> Level | None:
        prices = self._asks.prices
        if not prices:
            return None
        return prices[0], self._asks.sizes[prices[0]]

    def crossed(self) -> bool:
        """Best bid at or above best ask: a book no venue can have (a missed update)."""
        bids, asks = self._bids.prices, self._asks.prices
        return bool(bids and asks and bids[-1] >= asks[0])

    def bids(self, n: int | None = None) -> tuple[Level, ...]:
        """The best `n` bids (all when None), best first."""
        prices, sizes = self._bids.prices, self._bids.sizes
        chosen = prices[::-1] if n is None else prices[: -n - 1 : -1] if n else []
        return tuple((p, sizes[p]) for p in chosen)

    def asks(self, n: int | None = None) -> tuple[Level, ...]:
        """The best `n` asks (all when None), best first."""
        prices, sizes = self._asks.prices, self._asks.sizes
        chosen = prices if n is None else prices[:n]
        return tuple((p, sizes[p]) for p in chosen)

    def bids_at_or_above(self, price: Decimal) -> int:
        """How many bids are priced at or above `price` (a bisect, no copy)."""
        prices = self._bids.prices
        return len(prices) - bisect_left(prices, price)

    def asks_at_or_below(self, price: Decimal) -> int:
        """How many asks are priced at or below `price` (a bisect, no copy)."""
        return bisect_right(self._asks.prices, price)

    def top(self, n: int) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
        return self.bids(n), self.asks(n)

    def __len__(self) -> int:
        return len(self._bids) + len(self._asks)

    @property
    def bid_count(self) -> int:
        return len(self._bids)

    @property
    def ask_count(self) -> int:
        return len(self._asks)


# --- venue checksums -----------------------------------------------------------------------------
# Each helper formats a level the venue's way. Formatting dominates the cost of a checksum (40-100
# Decimal -> text conversions per update, where an update changes 1-3 levels), so a checker keeps
# each level's formatted piece and reuses it while the level's size object is the same one (a set
# stores a new Decimal object, so identity means unchanged).


def _kraken_digits(value: Decimal) -> str:
    """Kraken v1/v2: the wire text with the '.' removed, then the leading zeros removed."""
    return decimal_str(value).replace(".", "").lstrip("0")


class _PieceCache:
    __slots__ = ("pieces", "limit")

    def __init__(self, limit: int = 4096) -> None:
        self.pieces: dict[tuple[bool, Decimal], tuple[Decimal, str]] = {}
        self.limit = limit

    def side(self, is_bid: bool, levels: tuple[Level, ...], make: Callable[[Decimal, Decimal], str]) -> list[str]:
        """The pieces of one side's levels, in order (one dict lookup per unchanged level)."""
        pieces = self.pieces
        if len(pieces) >= self.limit:
            pieces.clear()
        out = []
        for price, size in levels:
            hit = pieces.get((is_bid, price))
            if hit is None or hit[0] is not size:
                hit = (size, make(price, size))
                pieces[(is_bid, price)] = hit
            out.append(hit[1])
        return out

    def get(self, is_bid: bool, price: Decimal, size: Decimal, make: object) -> str:
        key = (is_bid, price)
        hit = self.pieces.get(key)
        if hit is not None and hit[0] is size:
            return hit[1]
        if len(self.pieces) >= self.limit:
            self.pieces.clear()
        piece = make(price, size)  # type: ignore[operator]
        self.pieces[key] = (size, piece)
        return piece


def _kraken_piece(price: Decimal, size: Decimal) -> str:
    return _kraken_digits(price) + _kraken_digits(size)


def _okx_piece(price: Decimal, size: Decimal) -> str:
    return f"{decimal_str(price)}:{decimal_str(size)}"


class _TopChecksum:
    """A venue checksum over the top `levels` of each side, for one book.

    `__call__(book, changed_bids, changed_asks)` gives the checksum after an update that set those
    prices. When the book had at least `levels` levels on a side at the previous call and every
    price changed on that side lies strictly beyond that side's `levels`-th price, the top levels
    are provably the same objects as before, so the previous checksum is the answer: most updates
    of a deep book touch only deep levels, and the check stays exact. Pass None (or nothing) to
    recompute from the book.
    """

    levels: int = 10

    def __init__(self) -> None:
        self._cache = _PieceCache()
        self._last: int | None = None
        self._bid_edge: Decimal | None = None  # the `levels`-th best bid at the last computation
        self._ask_edge: Decimal | None = None

    def __call__(self, book: OrderBook, changed_bids: Iterable[Decimal] | None = None,
                 changed_asks: Iterable[Decimal] | None = None) -> int:  # fmt: skip
        last, bid_edge, ask_edge = self._last, self._bid_edge, self._ask_edge
        if (last is not None and changed_bids is not None and changed_asks is not None
                and bid_edge is not None and ask_edge is not None
                and all(p < bid_edge for p in changed_bids) and all(p > ask_edge for p in changed_asks)):  # fmt: skip
            return last
        bids, asks = book.bids(self.levels), book.asks(self.levels)
        self._last = crc = self._compute(bids, asks)
        self._bid_edge = bids[-1][0] if len(bids) == self.levels else None
        self._ask_edge = asks[-1][0] if len(asks) == self.levels else None
        return crc

    def reset(self) -> None:
        self._last = self._bid_edge = self._ask_edge = None

    def _compute(self, bids: tuple[Level, ...], asks: tuple[Level, ...]) -> int:
        raise NotImplementedError


class KrakenChecksum(_TopChecksum):
    """CRC32 (unsigned) of the top 10 asks (low to high) then the top 10 bids (high to low), each
    level as price digits + size digits (docs.kraken.com, "Book checksum (WebSocket v1)")."""

    levels = 10

    def _compute(self, bids: tuple[Level, ...], asks: tuple[Level, ...]) -> int:
        return zlib.crc32("".join(self._cache.side(False, asks, _kraken_piece)
                                  + self._cache.side(True, bids, _kraken_piece)).encode())  # fmt: skip


class OkxChecksum(_TopChecksum):
    """CRC32 as a signed 32-bit int of the top 25 levels interleaved
    `bid1px:bid1sz:ask1px:ask1sz:bid2px:...`; when one side runs out the other continues alone
    (OKX v5 docs, "Checksum" of the order book channel). Wire texts, digit for digit."""

    levels = 25

    def _compute(self, bids: tuple[Level, ...], asks: tuple[Level, ...]) -> int:
        bid_parts = self._cache.side(True, bids, _okx_piece)
        ask_parts = self._cache.side(False, asks, _okx_piece)
        n = min(len(bid_parts), len(ask_parts))
        parts = [piece for pair in zip(bid_parts[:n], ask_parts[:n], strict=True) for piece in pair]
        parts += bid_parts[n:] or ask_parts[n:]
        crc = zlib.crc32(":".join(parts).encode())
        return crc - (1 << 32) if crc >= 1 << 31 else crc


def kraken_checksum(book: OrderBook) -> int:
    """Kraken's checksum of `book`, computed afresh (see KrakenChecksum)."""
    return KrakenChecksum()(book)


def okx_checksum(book: OrderBook) -> int:
    """OKX's checksum of `book`, computed afresh (see OkxChecksum)."""
    return OkxChecksum()(book)
