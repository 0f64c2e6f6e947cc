"""Which connector speaks for which venue, and where each venue lists its symbols.

`VENUES[name]` gives the connector class, the listing paths (REST, relative to the venue's REST
base) and the function that turns those listing bodies into a `SymbolMap`. Other venues register
here the same way (one entry each).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from candlekeep.sources.exchanges import binance, kraken, okx
from candlekeep.sources.exchanges.base import Connector, ConnectorError, SymbolMap


@dataclass(frozen=True, slots=True)
class Venue:
    name: str
    connector: type[Connector]
    rest_base: str
    listing_paths: tuple[str, ...]
    symbols: Callable[[Sequence[Any]], SymbolMap]  # the listing bodies, in listing_paths order


VENUES: dict[str, Venue] = {
    "binance": Venue("binance", binance.BinanceConnector, binance.REST_URL, (binance.LISTING_PATH,),
                     lambda bodies: binance.symbol_map(bodies[0])),
    "kraken": Venue("kraken", kraken.KrakenConnector, kraken.REST_URL, (kraken.LISTING_PATH,),
                    lambda bodies: kraken.symbol_map(bodies[0])),
    "okx": Venue("okx", okx.OkxConnector, okx.REST_URL, okx.LISTING_PATHS, okx.symbol_map),
}  # fmt: skip

# Instrument-id venues served by a venue connector (OKX derivatives have their own id venues).
ID_VENUES = {"binance": "binance", "kraken": "kraken", "okx": "okx", "okx_swap": "okx", "okx_futures": "okx"}


def venue(name: str) -> Venue:
    try:
        return VENUES[name]
    except KeyError:
        raise ConnectorError(f"no connector for venue {name!r} (known: {', '.join(sorted(VENUES))})") from None


def symbols_from_listing(name: str, bodies_by_url: Mapping[str, Any]) -> SymbolMap:
    """The symbol map from listing bodies keyed by URL (a recording's listing file, or a fetch)."""
    spec = venue(name)
    bodies = []
    for path in spec.listing_paths:
        found = [body for url, body in bodies_by_url.items() if url.endswith(path)]
        if not found:
            raise ConnectorError(f"{name}: the listing has no {path}")
        bodies.append(found[-1])
    return spec.symbols(bodies)
