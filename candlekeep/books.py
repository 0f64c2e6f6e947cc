"""Order-book records: what a venue connector produces and the `books` topic carries (DESIGN.md).

    BookSnapshot(...)   # the whole book (or its top N): replaces what a consumer holds
    BookDelta(...)      # absolute new sizes per price level; size 0 removes the level

Prices and sizes are `Decimal` from the wire in, never floats. `sequence` / `prev_sequence` are
the venue's own numbers (None where the venue has none); `ts_ns` is exchange time and
`received_ns` our receipt time, side by side. `verified` says the book this update belongs to was
proven consistent by the venue's sequence chain or checksum; a venue that offers neither publishes
`verified=False`.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

Level = tuple[Decimal, Decimal]  # (price, size)


@dataclass(frozen=True, slots=True)
class _BookUpdate:
    instrument: str
    ts_ns: int
    received_ns: int | None
    sequence: int | None
    prev_sequence: int | None
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    source: str
    verified: bool

    def __post_init__(self) -> None:
        for side in (self.bids, self.asks):
            for price, size in side:
                if not isinstance(price, Decimal) or not isinstance(size, Decimal):
                    raise TypeError("book prices and sizes must be Decimal (never float)")
                if not (price.is_finite() and size.is_finite()) or price <= 0 or size < 0:
                    raise ValueError(f"book level of {self.instrument}: price must be positive, size not negative")


@dataclass(frozen=True, slots=True)
class BookSnapshot(_BookUpdate):
    """The full book (or top N) at `sequence`; sizes are positive."""


@dataclass(frozen=True, slots=True)
class BookDelta(_BookUpdate):
    """Changed levels after `prev_sequence`, as absolute sizes (0 removes the level)."""
