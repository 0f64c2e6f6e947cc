"""The one settings object: every `CANDLEKEEP_*` environment variable (DESIGN.md "Configuration").

Built explicitly (`Settings()`), never at import. Bad values are rejected here, at start, with a
message naming the variable.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from candlekeep.instruments import Instrument

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CANDLEKEEP_", extra="ignore")

    # Unset: an embedded PostgreSQL with its data under `data_dir`.
    database_url: str | None = None
    # Dagster's run/event storage; unset: a `dagster` database on the same server as DATABASE_URL.
    dagster_pg_url: str | None = None
    # Unset: the in-process bus.
    kafka_bootstrap_servers: str | None = None
    # Unset: no cache.
    redis_url: str | None = None

    source: Literal["simulator", "cryptocompare"] = "simulator"
    cryptocompare_api_key: SecretStr | None = None
    cryptocompare_base_url: str = "https://min-api.cryptocompare.com"
    cryptocompare_stream_url: str = "wss://streamer.cryptocompare.com/v2"
    # `min-api`: /data/v2/histo*; `data-api`: CoinDesk Data API /spot/v1/historical/*.
    cryptocompare_flavour: Literal["min-api", "data-api"] = "min-api"
    # Client-side call budget; defaults are the free plan's observed limits (notes/cryptocompare.md).
    cryptocompare_calls_per_second: int = Field(20, gt=0)
    cryptocompare_calls_per_minute: int = Field(300, gt=0)
    cryptocompare_calls_per_hour: int = Field(3000, gt=0)

    instruments: CommaList = ["cccagg:BTC-USD", "cccagg:ETH-USD", "cccagg:SOL-USD"]
    api_keys: CommaList = []
    # Browser origins allowed to call the API (CORS); empty: no CORS headers at all.
    api_cors_origins: CommaList = []
    # Per API key (or per client IP without a key): a token bucket refilled at this rate, holding
    # at most `api_rate_burst` requests; 0 turns rate limiting off.
    api_rate_limit_per_minute: int = Field(600, ge=0)
    api_rate_burst: int = Field(120, gt=0)
    topic_prefix: str = ""

    simulator_seed: int = 0
    # First day (UTC) offered as a Dagster partition.
    history_start: date = date(2024, 1, 1)

    data_dir: Path = Path(".candlekeep")
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, gt=0, lt=65536)
    dagster_port: int = Field(3000, gt=0, lt=65536)
    # Streaming daemons' /health and /metrics: base, base+1, ... (0: any free port).
    stream_port_base: int = Field(9101, ge=0, lt=65533)

    # Replay sessions (candlekeep/replay.py): at most this many active at once (created, running,
    # paused, error); each closes with a heartbeat at its end plus this lateness (the aggregator's).
    replay_max_sessions: int = Field(8, gt=0)
    replay_lateness_s: float = Field(2.0, ge=0)

    @field_validator("instruments", "api_keys", "api_cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("instruments")
    @classmethod
    def _valid_instruments(cls, value: list[str]) -> list[str]:
        return [Instrument.parse(text).id for text in value]

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
            raise ValueError("CANDLEKEEP_DATABASE_URL must be a postgresql:// URL")
        return value

    @field_validator("cryptocompare_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")
