"""The connector interface's shared pieces: exact times, symbol maps from real listings."""

from __future__ import annotations

from decimal import Decimal

import pytest

from candlekeep.sources.exchanges.base import ConnectorError, listing_bodies, seconds_text_to_ns
from candlekeep.sources.exchanges.registry import symbols_from_listing
from tests.utils.exchange_replay import recording_path


def test_seconds_text_to_ns_is_exact() -> None:
    for text in ("1618678142.557535", "1618678142", "0.0000000019", "12.5", "1618678142.1234567891", "1e3"):
        assert seconds_text_to_ns(text) == int(Decimal(text) * 10**9), text


@pytest.mark.parametrize(("venue", "listing", "ours", "theirs"), [
    ("kraken", "KRAKEN.0.txt", "kraken:BTC-USD", "XBT/USD"),
    ("kraken", "KRAKEN.0.txt", "kraken:DOGE-USD", "XDG/USD"),
    ("binance", "BINANCE.0.txt", "binance:NKN-USDT", "NKNUSDT"),
    ("okx", "OKX.0.txt", "okx:BTC-USDT", "BTC-USDT"),
    ("okx", "OKX.0.txt", "okx_swap:UNI-USD", "UNI-USD-SWAP"),
])  # fmt: skip
def test_symbols_come_from_the_venues_own_listing(venue: str, listing: str, ours: str, theirs: str) -> None:
    symbols = symbols_from_listing(venue, listing_bodies(recording_path(listing).read_text()))
    assert symbols.venue_symbol(ours) == theirs and symbols.instrument(theirs) == ours
    with pytest.raises(ConnectorError, match="not listed"):
        symbols.venue_symbol(f"{venue}:NOPE-NOPE")
