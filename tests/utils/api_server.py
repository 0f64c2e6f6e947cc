"""A real uvicorn process running the API the way `candlekeep up` does (`candlekeep.cli.api_command`)."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from candlekeep.cli import api_command
from candlekeep.settings import Settings
from tests.utils.net import free_port
from tests.utils.wait import eventually

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def api_process(database_url: str, log_path: Path, **env: str) -> Iterator[str]:
    """The API on a free loopback port with `CANDLEKEEP_*` = `env`; yields its base URL once it answers."""
    port = free_port()
    variables = {"CANDLEKEEP_DATABASE_URL": database_url, "CANDLEKEEP_API_PORT": str(port), **env}
    settings = Settings(**{k.removeprefix("CANDLEKEEP_").lower(): v for k, v in variables.items()})
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_")} | variables
    child_env["PYTHONPATH"] = str(ROOT)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(api_command(settings, log_level="info"), cwd=ROOT, env=child_env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            eventually(lambda: status(base + "/openapi.json") == 200, timeout=30, what="the API to answer")
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise AssertionError("the API did not stop within 10 s of SIGTERM (see its log)") from None


def status(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> int | None:
    """The HTTP status of GET `url` (None when nothing answers)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None
