"""Logs (candlekeep/logs.py): one JSON object per line under CANDLEKEEP_LOG_FORMAT=json, library noise off.

The entry points run as real subprocesses (`python -m candlekeep.cli migrate`, on the test database
and on an embedded PostgreSQL of its own), and their stderr is parsed line by line with `json`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from candlekeep.logs import JsonFormatter, configure
from candlekeep.settings import Settings
from candlekeep.storage.db import with_database

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_")}
    environ.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, *args], env=environ, cwd=ROOT, capture_output=True, text=True,
                          timeout=180)  # fmt: skip


@pytest.fixture
def fresh_database(pg_admin_url: str) -> Iterator[str]:
    """An empty database, so migrate has work to do (and something to log)."""
    name = f"candlekeep_logs_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_admin_url, name)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def json_lines(text: str) -> list[dict]:
    events = []
    for line in text.splitlines():
        event = json.loads(line)  # a line that is not one JSON object fails here, naming it
        assert {"ts", "level", "logger", "message"} <= event.keys(), line
        assert event["ts"].endswith("Z")
        events.append(event)
    return events


def test_migrate_logs_one_json_object_per_line_without_alembic_chatter(fresh_database: str) -> None:
    done = run(["-m", "candlekeep.cli", "migrate"], CANDLEKEEP_DATABASE_URL=fresh_database,
               CANDLEKEEP_LOG_FORMAT="json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    events = json_lines(done.stderr)
    messages = [e["message"] for e in events]
    assert not any(m.startswith(("Context impl", "Will assume")) for m in messages), messages
    assert not any(e["logger"] == "alembic.runtime.plugins" for e in events)
    assert sum("Running upgrade" in m for m in messages) >= 2  # the migrations themselves still show
    assert "database migrated to" in done.stdout


def test_embedded_postgres_command_dumps_are_off(tmp_path: Path) -> None:
    done = run(["-m", "candlekeep.cli", "migrate"], CANDLEKEEP_DATA_DIR=str(tmp_path / "data"),
               CANDLEKEEP_LOG_FORMAT="json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    events = json_lines(done.stderr)
    assert not any(e["logger"] == "embedded_postgres" for e in events), [e["message"][:80] for e in events]
    # What an operator needs is still there: which server, where its data is, what was migrated.
    assert any(e["logger"] == "candlekeep.storage.embedded" and "embedded PostgreSQL" in e["message"]
               for e in events)  # fmt: skip
    assert any("Running upgrade" in e["message"] for e in events)


def test_text_is_the_default_and_a_bad_format_is_refused_naming_the_variable(fresh_database: str) -> None:
    done = run(["-m", "candlekeep.cli", "migrate"], CANDLEKEEP_DATABASE_URL=fresh_database)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(" INFO " in line and not line.startswith("{") for line in lines), lines
    bad = run(["-m", "candlekeep.cli", "migrate"], CANDLEKEEP_DATABASE_URL=fresh_database, CANDLEKEEP_LOG_FORMAT="xml")
    assert bad.returncode == 2
    assert "log_format" in bad.stderr and "Traceback" not in bad.stderr


def test_a_traceback_and_extra_fields_stay_on_one_line() -> None:
    stream = io.StringIO()
    configure("json", stream=stream)
    log = logging.getLogger("candlekeep.test_logs")
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        log.exception("flush failed for %s", "cccagg:BTC-USD", extra={"daemon": "aggregator", "batch": 3})
    configure("text")  # back to stderr for the rest of the run
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["message"] == "flush failed for cccagg:BTC-USD"
    assert event["level"] == "ERROR" and event["daemon"] == "aggregator" and event["batch"] == 3
    assert "ValueError: first line\nsecond line" in event["exc_info"]


def test_json_formatter_names_record_fields_not_internals() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    event = json.loads(JsonFormatter().format(record))
    assert event.keys() == {"ts", "level", "logger", "message"}


def test_loading_the_dagster_code_prints_no_beta_warnings() -> None:
    # -W default shows every warning once; Dagster warns about `backfill_policy` on each load otherwise.
    done = run(["-W", "default", "-c", "import pipelines.definitions"])
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr[:2000]


def test_settings_read_the_log_switches() -> None:
    settings = Settings(_env_file=None, log_format="json", log_level="WARNING")
    assert (settings.log_format, settings.log_level) == ("json", "WARNING")
    with pytest.raises(ValueError, match="log_level"):
        Settings(log_level="LOUD")
