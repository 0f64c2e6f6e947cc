"""Market-data sources: CryptoCompare (REST, two API flavours) and the offline simulator."""

from __future__ import annotations

from candlekeep.settings import Settings
from candlekeep.sources.base import Source, SourceError

__all__ = ["Source", "SourceError", "make_source"]


def make_source(settings: Settings, name: str | None = None) -> Source:
    """The source named by `name`, or by `CANDLEKEEP_SOURCE`."""
    name = name or settings.source
    if name == "simulator":
        from candlekeep.sources.simulator import Simulator

        return Simulator(seed=settings.simulator_seed)
    if name == "cryptocompare":
        from candlekeep.sources.cryptocompare import CryptoCompareClient

        return CryptoCompareClient.from_settings(settings)
    raise SourceError(f"unknown source {name!r}: expected 'simulator' or 'cryptocompare'")
