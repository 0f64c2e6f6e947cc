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
from bisect import bisect_left
from collections.abc import Iterable
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
        """A snapshot: the book becomes exactly these levels (size-0 levels are ignored)."""
        self._bids.clear()
        self._asks.clear()
        self.update(bids, asks)

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


def _kraken_digits(value: Decimal) -> str:
    """Kraken v1/v2: the wire text with the '.' removed, then the leading zeros removed."""
    return decimal_str(value).replace(".", "").lstrip("0")


def kraken_checksum(book: OrderBook) -> int:
    """CRC32 (unsigned) of the top 10 asks (low to high) then the top 10 bids (high to low), each
    level as price digits + size digits (docs.kraken.com, "Book checksum (WebSocket v1)")."""
    parts = [_kraken_digits(p) + _kraken_digits(s) for p, s in book.asks(10)]
    parts += [_kraken_digits(p) + _kraken_digits(s) for p, s in book.bids(10)]
    return zlib.crc32("".join(parts).encode())


def okx_checksum(book: OrderBook) -> int:
    """CRC32 as a signed 32-bit int of the top 25 levels interleaved
    `bid1px:bid1sz:ask1px:ask1sz:bid2px:...`; when one side runs out the other continues alone
    (OKX v5 docs, "Checksum" of the order book channel). Wire texts, digit for digit."""
    bids, asks = book.bids(25), book.asks(25)
    parts: list[str] = []
    for i in range(max(len(bids), len(asks))):
        if i < len(bids):
            parts.append(decimal_str(bids[i][0]))
            parts.append(decimal_str(bids[i][1]))
        if i < len(asks):
            parts.append(decimal_str(asks[i][0]))
            parts.append(decimal_str(asks[i][1]))
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc
