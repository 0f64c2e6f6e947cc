"""Factories for bars in tests."""

from __future__ import annotations

from decimal import Decimal

from candlekeep.bars import Bar


def make_bar(instrument: str, start: int, close: str, *, interval: str = "1m", volume: str = "1.5",
             source: str = "simulator", final: bool = True) -> Bar:
    price = Decimal(close)
    return Bar(instrument, interval, start, price, price + 1, price - 1, price, Decimal(volume),
               Decimal(volume) * price, 3, source, final)
