"""Instrument ids: `<venue>:<BASE>-<QUOTE>` (DESIGN.md "Instruments and intervals").

Pure parsing and formatting; no I/O. The API and CLI also accept the seed style `BTCUSD` /
`BTC-USD`, resolved against a default venue, and report which id they resolved to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_VENUE = "cccagg"

# Quote currencies tried, longest first, when splitting a seed-style symbol such as `BTCUSDT`.
_KNOWN_QUOTES = ("USDT", "USDC", "BUSD", "FDUSD", "USD", "EUR", "GBP", "JPY", "BTC", "ETH")
_SYMBOL = r"[A-Z0-9]{1,10}"  # CryptoCompare caps fsym/tsym at 10 characters
_ID_RE = re.compile(rf"^(?P<venue>[a-z0-9_]{{1,30}}):(?P<base>{_SYMBOL})-(?P<quote>{_SYMBOL})$")
_PAIR_RE = re.compile(rf"^(?P<base>{_SYMBOL})[-/_](?P<quote>{_SYMBOL})$")


class InstrumentError(ValueError):
    """An instrument id or symbol that cannot be understood."""


@dataclass(frozen=True, slots=True, order=True)
class Instrument:
    venue: str
    base: str
    quote: str

    @property
    def id(self) -> str:
        return f"{self.venue}:{self.base}-{self.quote}"

    def __str__(self) -> str:
        return self.id

    @classmethod
    def parse(cls, text: str) -> Instrument:
        """Parse a canonical id (`coinbase:BTC-USD`); anything else is an InstrumentError."""
        match = _ID_RE.match(text.strip())
        if not match:
            raise InstrumentError(
                f"invalid instrument {text!r}: expected '<venue>:<BASE>-<QUOTE>', e.g. 'cccagg:BTC-USD'"
            )
        return cls(match["venue"], match["base"], match["quote"])


def resolve_instrument(text: str, default_venue: str = DEFAULT_VENUE) -> Instrument:
    """Accept a canonical id, `venue:BTCUSD`, `BTC-USD`, `BTC/USD` or `BTCUSD` (seed style)."""
    raw = text.strip()
    if ":" in raw:
        venue, _, symbol = raw.partition(":")
        venue = venue.lower()
    else:
        venue, symbol = default_venue, raw
    symbol = symbol.upper()
    if pair := _PAIR_RE.match(symbol):
        return Instrument.parse(f"{venue}:{pair['base']}-{pair['quote']}")
    for quote in _KNOWN_QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return Instrument.parse(f"{venue}:{symbol[: -len(quote)]}-{quote}")
    raise InstrumentError(
        f"invalid instrument {text!r}: expected '<venue>:<BASE>-<QUOTE>' (e.g. 'cccagg:BTC-USD') "
        "or a symbol such as 'BTC-USD' / 'BTCUSD'"
    )
