"""Does an instrument exist? Asked before anything permanent is made for it (a topic, a tracked row,
history, a live feed, a Dagster partition).

    listing = make_listing(settings)
    reason = listing.unknown(Instrument.parse("cccagg:FOO-BAR"))   # None: it exists; else why not

- the simulator serves its configured universe only: CANDLEKEEP_INSTRUMENTS plus SIMULATOR_UNIVERSE;
- CryptoCompare is asked for the pair's last `LOOKBACK_DAYS` of daily bars: it exists when it answers
  with traded bars; "market does not exist for this coin pair" (UnknownMarket) and an answer with no
  traded bar are the reasons it does not. Rate limits and outages raise (SourceError): unknown is not
  the same as "could not ask";
- exchange connectors (a venue's own listing endpoint) plug in through `VENUE_LISTINGS`: venue ->
  callable(instrument) -> reason or None, consulted before the configured source.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from candlekeep.bars import Interval
from candlekeep.instruments import Instrument
from candlekeep.settings import Settings
from candlekeep.sources.base import Source

# What the offline simulator can play besides CANDLEKEEP_INSTRUMENTS (README, "Instruments").
SIMULATOR_UNIVERSE: tuple[str, ...] = tuple(
    f"{venue}:{pair}"
    for venue in ("cccagg", "coinbase", "kraken", "bitstamp")
    for pair in ("BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "ADA-USD", "DOGE-USD", "LTC-USD")
) + tuple(f"binance:{base}-USDT" for base in ("BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "LTC"))

LOOKBACK_DAYS = 7

# venue -> lookup(instrument) -> None when the venue lists it, else the reason. Exchange connectors
# register their listing here; a venue without one falls back to the configured source.
VENUE_LISTINGS: dict[str, Callable[[Instrument], str | None]] = {}


class Listing:
    """`unknown(instrument)`: None when the source knows it, else the reason (a sentence)."""

    def unknown(self, instrument: Instrument) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class UniverseListing(Listing):
    universe: Collection[str]
    source: str = "simulator"

    def unknown(self, instrument: Instrument) -> str | None:
        if instrument.id in self.universe:
            return None
        return (f"the {self.source} does not serve {instrument.id}: it plays CANDLEKEEP_INSTRUMENTS and the "
                "simulator universe (README, Instruments) only")  # fmt: skip


@dataclass(frozen=True)
class SourceListing(Listing):
    """Known when `source` has traded daily bars of the instrument in the last `lookback_days`."""

    source: Source
    lookback_days: int = LOOKBACK_DAYS
    clock: Callable[[], float] = time.time

    def unknown(self, instrument: Instrument) -> str | None:
        from candlekeep.sources.cryptocompare import UnknownMarket

        end = Interval.D1.floor(int(self.clock())) + 86_400
        start = end - (self.lookback_days + 1) * 86_400
        try:
            for page in self.source.bars(instrument, Interval.D1, start, end):
                if any(bar.volume > 0 or bar.trades for bar in page):
                    return None
        except UnknownMarket as exc:
            return f"{self.source.name} does not know {instrument.id}: {exc}"
        return f"{self.source.name} has no trades of {instrument.id} in the last {self.lookback_days} days"


@dataclass(frozen=True)
class VenueFirst(Listing):
    fallback: Listing

    def unknown(self, instrument: Instrument) -> str | None:
        lookup = VENUE_LISTINGS.get(instrument.venue)
        return lookup(instrument) if lookup is not None else self.fallback.unknown(instrument)


def make_listing(settings: Settings, source: Source | None = None) -> Listing:
    """The listing of the configured source (CANDLEKEEP_SOURCE), exchange listings first."""
    if settings.source == "simulator":
        return VenueFirst(UniverseListing(frozenset(settings.instruments) | frozenset(SIMULATOR_UNIVERSE)))
    from candlekeep.sources import make_source

    return VenueFirst(SourceListing(source or make_source(settings)))
