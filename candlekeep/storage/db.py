"""Database URLs and engines, made on demand (never at import).

URLs are libpq style (`postgresql://user:pw@host:port/db`, or a unix socket:
`postgresql://postgres:@/db?host=/socket/dir`); SQLAlchemy gets the same URL with the psycopg 3
driver named. Unset `CANDLEKEEP_DATABASE_URL` means the embedded PostgreSQL (embedded.py) with its
data under `<data_dir>/postgres` and a database `candlekeep`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import sqlalchemy
from sqlalchemy import Engine, text

if TYPE_CHECKING:
    from candlekeep.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "candlekeep"
_SCHEMES = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}


def sqlalchemy_url(url: str) -> str:
    """`postgres://` / `postgresql://` → `postgresql+psycopg://`, everything else (query too) kept."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ValueError(f"not a PostgreSQL URL: {_redact(url)!r} (expected postgresql://...)")
    return f"{_SCHEMES[scheme]}://{rest}"


def with_database(url: str, name: str) -> str:
    """The same server (and options such as `?host=`), database `name`."""
    parts = urlsplit(url)
    if not parts.scheme:
        raise ValueError(f"not a URL: {_redact(url)!r}")
    return urlunsplit(parts._replace(path="/" + quote(name, safe="")))


def create_engine(url: str, **kw: Any) -> Engine:
    """An engine on psycopg 3 with `pool_pre_ping`; sessions run in UTC. `kw` go to SQLAlchemy."""
    kw.setdefault("pool_pre_ping", True)
    connect_args = kw.setdefault("connect_args", {})
    if "options" not in connect_args and "options=" not in url:
        connect_args["options"] = "-c TimeZone=UTC"
    if "application_name=" not in url:  # a URL's own application_name wins
        connect_args.setdefault("application_name", "candlekeep")
    return sqlalchemy.create_engine(sqlalchemy_url(url), **kw)


def resolve_database_url(settings: Settings) -> str:
    """`settings.database_url`, or the embedded server's `candlekeep` database (started if needed)."""
    if settings.database_url:
        return settings.database_url
    from candlekeep.storage.embedded import start_embedded

    server = start_embedded(settings.data_dir / "postgres")
    return ensure_database(server.url(DEFAULT_DATABASE))


def ensure_database(url: str, *, maintenance_db: str = "postgres") -> str:
    """Create the database `url` names if it does not exist (connecting to `maintenance_db` on the
    same server); return `url`."""
    import psycopg
    from psycopg import sql

    name = unquote(urlsplit(url).path.lstrip("/"))
    if not name:
        raise ValueError(f"no database name in {_redact(url)!r}")
    with psycopg.connect(with_database(url, maintenance_db), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                log.info("created database %s", name)
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it meanwhile
    return url


def storage_features(engine: Engine) -> dict[str, Any]:
    """What the schema runs on, read from the catalogs (the migration decides; see 0001).

    {"timescaledb": bool, "partitioning": "native" | "timescaledb" | "none",
     "compression": bool, "license": "timescale" | "apache" | None}
    (0001's continuous aggregates are gone since 0006: the exact 1h / 1d rows are `bar_rollups`.)
    """
    with engine.connect() as conn:
        timescale = conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")).first()
        features: dict[str, Any] = {
            "timescaledb": timescale is not None,
            "partitioning": "none",
            "compression": False,
            "license": None,
        }
        if conn.execute(text("SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass('bars')")).first():
            features["partitioning"] = "native"
        if timescale is not None:
            hyper = conn.execute(
                text("SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = 'bars'")
            ).first()
            if hyper:
                features["partitioning"] = "timescaledb"
            policy = conn.execute(
                text(
                    "SELECT 1 FROM timescaledb_information.jobs"
                    " WHERE proc_name = 'policy_compression' AND hypertable_name = 'bars'"
                )
            ).first()
            features["compression"] = policy is not None
            features["license"] = conn.execute(text("SELECT current_setting('timescaledb.license', true)")).scalar()
    return features


# --- TimescaleDB license ---------------------------------------------------------------------------
# Built under the Timescale license (compressed chunks, continuous aggregates), then run under the
# Apache one, a database fails at read time (`querying compressed data is not supported`) while the
# schema is "current". `migrate` and `/health` report it through these two functions.


def license_conflicts(engine: Engine) -> list[str]:
    """What this database holds that its TimescaleDB license cannot serve; [] when nothing (or no
    TimescaleDB). Reads `timescaledb.license` and the catalogs: compressed chunks, continuous aggregates."""
    with engine.connect() as conn:
        if conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")).first() is None:
            return []
        license = conn.execute(text("SELECT current_setting('timescaledb.license', true)")).scalar()
        if license != "apache":
            return []
        compressed = dict(conn.execute(text(
            "SELECT hypertable_name, count(*) FROM timescaledb_information.chunks"
            " WHERE is_compressed GROUP BY hypertable_name ORDER BY hypertable_name")).all())  # fmt: skip
        caggs = list(conn.execute(text(
            "SELECT view_name FROM timescaledb_information.continuous_aggregates ORDER BY view_name")).scalars())  # fmt: skip
    return describe_license_conflicts(license, compressed, caggs)


def describe_license_conflicts(license: str | None, compressed_chunks: Mapping[str, int],
                               continuous_aggregates: Sequence[str]) -> list[str]:  # fmt: skip
    """The operator's sentences for what `license` cannot serve (pure; see license_conflicts)."""
    if license != "apache":
        return []
    problems = []
    for table, count in sorted(compressed_chunks.items()):
        if count:
            problems.append(
                f"{count} compressed chunk(s) of {table} cannot be read under timescaledb.license = 'apache' "
                f"(querying compressed data is not supported): set timescaledb.license = 'timescale', or "
                f"decompress them under that license (SELECT decompress_chunk(c) FROM show_chunks('{table}') c) "
                f"before switching")  # fmt: skip
    if continuous_aggregates:
        problems.append(
            f"continuous aggregate(s) {', '.join(continuous_aggregates)} cannot refresh under "
            f"timescaledb.license = 'apache': set timescaledb.license = 'timescale', or drop them "
            f"(coarse bars are then derived from 1m bars)")  # fmt: skip
    return problems


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
