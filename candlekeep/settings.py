"""The one settings object: every `CANDLEKEEP_*` environment variable (DESIGN.md "Configuration").

Built explicitly (`Settings()`), never at import. Bad values are rejected here, at start, with a
message naming the variable.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
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
    # Addresses of reverse proxies whose X-Forwarded-For / -Proto the API believes (uvicorn's
    # forwarded_allow_ips); empty: forwarded headers are ignored, the peer address is the client.
    api_forwarded_allow_ips: CommaList = []
    # Requests waiting (`wait=`) for data asked on demand: at most this many at once, in total and per
    # API key (or client address); beyond, 503 / 429. Waiting holds a slot, never a worker thread.
    api_max_waits: int = Field(64, gt=0)
    api_max_waits_per_key: int = Field(8, gt=0)
    # Answers over `api_large_request_bars` bars built at once (each holds its bars in memory).
    api_max_large_requests: int = Field(4, gt=0)
    api_large_request_bars: int = Field(10_000, gt=0)
    # Instruments one API key (or client address) may add by asking for them (on-demand `track`).
    api_max_tracks_per_key: int = Field(10, ge=0)
    # A CSV export whose client reads nothing for this long is dropped (its COPY cancelled).
    api_send_timeout_s: float = Field(30.0, gt=0)
    # Encoded /v1/ohlcv JSON answers kept per API process, served while their stamp is current
    # (candlekeep.responses); 0 turns the cache off.
    api_response_cache_mb: int = Field(64, ge=0)

    simulator_seed: int = 0
    # First day (UTC) offered as a Dagster partition.
    history_start: date = date(2024, 1, 1)

    data_dir: Path = Path(".candlekeep")
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, gt=0, lt=65536)
    dagster_port: int = Field(3000, gt=0, lt=65536)
    # Streaming daemons' /health and /metrics: base, base+1, ... (0: any free port).
    stream_port_base: int = Field(9101, ge=0, lt=65533)
    # The log's clock: a live source sends a heartbeat per instrument after this long without a
    # trade, dated its receive clock minus the latency bound (so a slow trade is late, not lost).
    heartbeat_s: float = Field(1.0, gt=0)
    stream_latency_bound_s: float = Field(1.0, ge=0)

    # Exchange connectors (issue 10): a full book snapshot on `books` every N s of exchange time
    # (besides the one after each (re)sync); REST snapshot token bucket per venue (cryptofeed #613);
    # heartbeats on `ticks` while an instrument is quiet.
    venue_snapshot_every_s: float = Field(60.0, ge=0)
    venue_rest_snapshots_per_second: float = Field(2.0, gt=0)
    venue_rest_snapshot_burst: int = Field(5, gt=0)
    venue_heartbeat_every_s: float = Field(5.0, gt=0)

    # --- operations (candlekeep/logs.py) ---
    # `json`: one JSON object per line per event (for log shippers); `text`: for people.
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- order books (issue 11: streaming/books.py, api/routes/book.py) ---
    # Outputs every `book_interval_s` of BOOK time (the records' timestamps), top `book_depth` levels.
    book_interval_s: float = Field(1.0, gt=0)
    book_depth: int = Field(25, gt=0, le=1000)
    # Bucket widths per pair or instrument, `BTC-USD=10,kraken:ETH-USD=0.5`; others: sized to the price.
    book_bucket_widths: CommaList = []
    # A venue with no update for this long (book time) leaves the consolidated book, named.
    book_stale_s: float = Field(10.0, gt=0)
    # Quotes counted as another in the consolidated book, `USDT=USD`; none by default: never mixed.
    book_quote_map: CommaList = []
    book_retention_days: int = Field(30, gt=0)

    # Replay sessions (candlekeep/replay.py): at most this many active at once (created, running,
    # paused, error); each closes with a heartbeat at its end plus this lateness (the aggregator's).
    replay_max_sessions: int = Field(8, gt=0)
    replay_lateness_s: float = Field(2.0, ge=0)

    @field_validator("instruments", "api_keys", "api_cors_origins", "api_forwarded_allow_ips", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_url", "kafka_bootstrap_servers", "dagster_pg_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `CANDLEKEEP_REDIS_URL=` (exported empty) means "not configured", not a URL named "".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("book_bucket_widths", "book_quote_map", mode="before")
    @classmethod
    def _split_book_lists(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("book_bucket_widths")
    @classmethod
    def _valid_widths(cls, value: list[str]) -> list[str]:
        for item in value:
            key, sep, width = item.partition("=")
            try:
                ok = bool(sep and key) and Decimal(width) > 0
            except ArithmeticError:
                ok = False
            if not ok:
                raise ValueError(f"CANDLEKEEP_BOOK_BUCKET_WIDTHS: {item!r} is not PAIR=positive-width, e.g. BTC-USD=10")
        return value

    @field_validator("book_quote_map")
    @classmethod
    def _valid_quote_map(cls, value: list[str]) -> list[str]:
        for item in value:
            src, sep, dst = item.partition("=")
            if not (sep and src.isalnum() and dst.isalnum()):
                raise ValueError(f"CANDLEKEEP_BOOK_QUOTE_MAP: {item!r} is not QUOTE=QUOTE, e.g. USDT=USD")
        return value

    def bucket_widths(self) -> dict[str, Decimal]:
        """`book_bucket_widths` as {pair or instrument id: width}."""
        return {k.strip(): Decimal(w) for k, _, w in (i.partition("=") for i in self.book_bucket_widths)}

    def quote_map(self) -> dict[str, str]:
        """`book_quote_map` as {quote: the quote it counts as}."""
        return {k.strip().upper(): v.strip().upper() for k, _, v in (i.partition("=") for i in self.book_quote_map)}

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
