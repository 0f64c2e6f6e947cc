"""Response shapes of the API (kept apart from the tables in candlekeep.storage.tables).

Prices and volumes are decimal strings with every digit the source gave; times are unix seconds
(and ISO-8601 UTC for people reading the JSON).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from candlekeep.bars import Bar, decimal_str, iso_utc


class BarPublic(BaseModel):
    time: int = Field(description="bucket start, unix seconds (UTC)", examples=[1704067200])
    start: str = Field(description="bucket start, ISO-8601 UTC", examples=["2024-01-01T00:00:00Z"])
    open: str = Field(examples=["42283.58"])
    high: str = Field(examples=["42298.62"])
    low: str = Field(examples=["42261.02"])
    close: str = Field(examples=["42298.61"])
    volume: str = Field(description="base volume", examples=["12.34567891"])
    quote_volume: str = Field(description="quote volume (sum of price x size)", examples=["522109.41"])
    trades: int | None = Field(description="trade count, null when the source does not count trades")
    source: str = Field(examples=["simulator", "cryptocompare", "stream"])
    final: bool = Field(description="false while the bar may still be revised")
    state: Literal["forming", "provisional", "final"] = Field(
        description="forming: its bucket is still open; provisional: closed by the live stream, may still be "
                    "revised or replaced by the source's final bar; final: as the source gives it")  # fmt: skip

    @classmethod
    def from_bar(cls, bar: Bar, *, forming: bool = False) -> BarPublic:
        return cls(
            time=bar.start,
            start=iso(bar.start),
            open=decimal_str(bar.open),
            high=decimal_str(bar.high),
            low=decimal_str(bar.low),
            close=decimal_str(bar.close),
            volume=decimal_str(bar.volume),
            quote_volume=decimal_str(bar.quote_volume),
            trades=bar.trades,
            source=bar.source,
            final=bar.final,
            state="final" if bar.final else "forming" if forming else "provisional",
        )


class GapPublic(BaseModel):
    start: int = Field(description="first missing bucket, unix seconds")
    end: int = Field(description="end of the missing range (exclusive), unix seconds")


class OhlcvPublic(BaseModel):
    instrument: str = Field(description="the instrument id the request resolved to", examples=["cccagg:BTC-USD"])
    requested: str = Field(description="the instrument as given in the request", examples=["BTCUSD"])
    interval: str = Field(examples=["1m"])
    start: int = Field(description="first bucket of the range, unix seconds")
    end: int = Field(description="end of the range (exclusive), unix seconds")
    bars: list[BarPublic]
    gaps: list[GapPublic] = Field(description="closed buckets of the range with no stored bar")
    complete: bool = Field(description="true when no closed bucket of the range is missing")
    forming: bool = Field(default=False, description="true when the last bar is the forming (still open) bucket")


class OhlcvSeedPublic(OhlcvPublic):
    resolved: str = Field(description="the instrument id `symbol` resolved to (same as `instrument`)",
                          examples=["cccagg:BTC-USD"])


class HealthPublic(BaseModel):
    status: str = Field(description="ok | degraded", examples=["ok"])
    database: str = Field(examples=["ok"])
    migrations: str = Field(description="current | behind (<current> -> <head>)", examples=["current"])
    redis: str = Field(description="ok | not configured | error: ...", examples=["not configured"])


iso = iso_utc  # the one formatter (candlekeep.bars)
