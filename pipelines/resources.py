"""The one resource the pipelines need: `candlekeep`, which hands assets a Source and the stores.

Built once in definitions.py and injected by parameter name. Its fields override the settings read
from `CANDLEKEEP_*` at execution time (never at import); an unset field means "as the settings say".
The database URL is resolved when a run (or sensor tick) starts: the embedded PostgreSQL is started
then if `CANDLEKEEP_DATABASE_URL` is unset, and the schema is brought to head under an advisory lock
so concurrent runs cannot race the migration (startup is recovery).

State during an execution: `_engine` (one SQLAlchemy engine, disposed at teardown) and `_settings`.
"""

from __future__ import annotations

import logging
from typing import Any

import dagster as dg
from pydantic import PrivateAttr
from sqlalchemy import Engine, text

from candlekeep.settings import Settings
from candlekeep.sources import Source, make_source
from candlekeep.storage.bars import BarStore
from candlekeep.storage.coverage import CoverageStore
from candlekeep.storage.db import create_engine, resolve_database_url
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.storage.migrate import is_current, upgrade

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x43414E444C45  # pg_advisory_lock key shared by every run that may migrate


class CandlekeepResource(dg.ConfigurableResource):
    """Source and storage for the bar assets, configured from `CANDLEKEEP_*` settings."""

    source: str | None = None  # `simulator` | `cryptocompare`; unset: CANDLEKEEP_SOURCE
    database_url: str | None = None  # unset: CANDLEKEEP_DATABASE_URL, else the embedded PostgreSQL
    cryptocompare_api_key: str | None = None  # a secret: pass dg.EnvVar("CANDLEKEEP_CRYPTOCOMPARE_API_KEY")
    simulator_seed: int | None = None

    _settings: Settings | None = PrivateAttr(default=None)
    _engine: Engine | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._settings = None
        self._engine = None

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def settings(self) -> Settings:
        """The settings from the environment, with this resource's fields on top."""
        if self._settings is None:
            overrides: dict[str, Any] = {
                name: value
                for name in ("source", "database_url", "cryptocompare_api_key", "simulator_seed")
                if (value := getattr(self, name)) is not None
            }
            self._settings = Settings(**overrides)
        return self._settings

    def make_source(self) -> Source:
        return make_source(self.settings())

    def engine(self) -> Engine:
        """The Candlekeep database (migrated to head), one engine per execution."""
        if self._engine is None:
            url = resolve_database_url(self.settings())
            engine = create_engine(url)
            try:
                _ensure_migrated(engine, url)
            except BaseException:
                engine.dispose()
                raise
            self._engine = engine
        return self._engine

    def bar_store(self) -> BarStore:
        return BarStore(self.engine())

    def coverage_store(self) -> CoverageStore:
        return CoverageStore(self.engine())

    def instrument_store(self) -> InstrumentStore:
        return InstrumentStore(self.engine())


def _ensure_migrated(engine: Engine, url: str) -> None:
    if is_current(engine):
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
        try:
            if not is_current(engine):
                log.info("migrating the Candlekeep database to head")
                upgrade(url)
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
            conn.commit()
