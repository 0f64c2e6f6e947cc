"""Alembic environment: metadata from candlekeep.storage.tables, the URL from (first match)
`config.attributes["connection"]` (an open Connection), `config.attributes["url"]`
(candlekeep.storage.migrate), `-x url=...` (command line), `sqlalchemy.url`, then the settings
(`CANDLEKEEP_DATABASE_URL`, or the embedded PostgreSQL).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, pool

from candlekeep.storage.db import create_engine, resolve_database_url, sqlalchemy_url
from candlekeep.storage.tables import is_managed, metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

OPTIONS = {"target_metadata": metadata, "compare_type": True, "include_name": is_managed}


def database_url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    url = url or config.get_main_option("sqlalchemy.url")
    if not url:
        from candlekeep.settings import Settings

        url = resolve_database_url(Settings())
    return url


def run_migrations_offline() -> None:
    """Emit SQL (`alembic upgrade head --sql`): the native-partition path, no TimescaleDB probe."""
    context.configure(url=sqlalchemy_url(database_url()), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run(connection: Connection) -> None:
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    if (connection := config.attributes.get("connection")) is not None:
        run(connection)
        return
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
