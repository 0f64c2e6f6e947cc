"""URLs, engines and the embedded PostgreSQL."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from candlekeep.settings import Settings
from candlekeep.storage.db import create_engine, ensure_database, resolve_database_url, sqlalchemy_url, with_database
from candlekeep.storage.embedded import start_embedded


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgresql://u:p@h/db?sslmode=require", "postgresql+psycopg://u:p@h/db?sslmode=require"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql://postgres:@/db?host=/tmp/x", "postgresql+psycopg://postgres:@/db?host=/tmp/x"),
    ],
)
def test_sqlalchemy_url(url: str, expected: str) -> None:
    assert sqlalchemy_url(url) == expected


def test_sqlalchemy_url_refuses_other_databases() -> None:
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        sqlalchemy_url("mysql://u:secret@h/db")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres:@/postgres?host=/tmp/dir", "postgresql://postgres:@/other?host=/tmp/dir"),
        ("postgresql://u:p@h:5432/a", "postgresql://u:p@h:5432/other"),
        ("postgresql+psycopg://u@h", "postgresql+psycopg://u@h/other"),
    ],
)
def test_with_database(url: str, expected: str) -> None:
    assert with_database(url, "other") == expected


def test_engine_sessions_run_in_utc(pg_admin_url: str) -> None:
    engine = create_engine(pg_admin_url)
    with engine.connect() as conn:
        assert conn.execute(text("SHOW TimeZone")).scalar_one() == "UTC"
    engine.dispose()


def test_ensure_database_creates_once(pg_admin_url: str) -> None:
    name = f"candlekeep_ensure_{uuid.uuid4().hex[:8]}"
    url = with_database(pg_admin_url, name)
    try:
        assert ensure_database(url) == url
        assert ensure_database(url) == url  # already there: nothing to do
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_configured_url_is_used_as_is() -> None:
    settings = Settings(database_url="postgresql://u:p@db.example:5432/candles")
    assert resolve_database_url(settings) == "postgresql://u:p@db.example:5432/candles"


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A directory outside pytest's temp tree: when run as root the server runs as another user,
    and a pytest starting meanwhile resets /tmp/pytest-of-root to 0700, which that user cannot
    traverse."""
    path = Path(tempfile.mkdtemp(prefix="candlekeep-embedded-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_embedded_server_keeps_its_data(data_dir: Path) -> None:
    """Unset DATABASE_URL: an embedded server under data_dir/postgres with a `candlekeep` database."""
    settings = Settings(database_url=None, data_dir=data_dir / "state")
    url = resolve_database_url(settings)
    assert url.startswith("postgresql://") and "/candlekeep?" in url
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    assert resolve_database_url(settings) == url  # reused while running
    server = start_embedded(data_dir / "state" / "postgres")
    assert (data_dir / "state" / "postgres" / "PG_VERSION").is_file()
    server.stop()

    url = resolve_database_url(settings)  # started again on the same data
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone() == (42,)
    start_embedded(data_dir / "state" / "postgres").stop()
