"""The API as `candlekeep up` runs it: a real uvicorn process from `candlekeep.cli.api_command`.

Forwarded headers are believed only from CANDLEKEEP_API_FORWARDED_ALLOW_IPS (none by default), so a
loopback client cannot spoof its address past the per-address rate limit; `?api_key=` values never
reach the server's log.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from candlekeep.cli import api_command
from candlekeep.settings import Settings
from tests.utils.net import free_port
from tests.utils.wait import eventually

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def api_process(database_url: str, log_path: Path, **env: str) -> Iterator[str]:
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
            eventually(lambda: _status(base + "/openapi.json") == 200, timeout=30, what="the API to answer")
            yield base
        finally:
            proc.terminate()
            proc.wait(10)


def _status(url: str, headers: dict[str, str] | None = None) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_x_forwarded_for_does_not_spoof_the_rate_limit(engine: Any, database_url: str, tmp_path: Path) -> None:
    env = {"CANDLEKEEP_API_KEYS": "ck_server_test_key_0123456789", "CANDLEKEEP_API_RATE_LIMIT_PER_MINUTE": "1",
           "CANDLEKEEP_API_RATE_BURST": "3"}  # fmt: skip
    with api_process(database_url, tmp_path / "api.log", **env) as base:
        statuses = [_status(base + "/udf/time", {"X-API-Key": f"guess-{i}", "X-Forwarded-For": f"198.51.100.{i}"})
                    for i in range(1, 11)]  # fmt: skip
    assert statuses[:2] == [401, 401]  # the first went to the initial readiness probe's bucket
    assert 429 in statuses  # one address, one bucket: the forged addresses do not count


def test_forwarded_headers_are_believed_from_a_configured_proxy(engine: Any, database_url: str,
                                                                tmp_path: Path) -> None:  # fmt: skip
    env = {"CANDLEKEEP_API_KEYS": "ck_server_test_key_0123456789", "CANDLEKEEP_API_RATE_LIMIT_PER_MINUTE": "1",
           "CANDLEKEEP_API_RATE_BURST": "3", "CANDLEKEEP_API_FORWARDED_ALLOW_IPS": "127.0.0.1"}  # fmt: skip
    with api_process(database_url, tmp_path / "api.log", **env) as base:
        statuses = [_status(base + "/udf/time", {"X-API-Key": f"guess-{i}", "X-Forwarded-For": f"198.51.100.{i}"})
                    for i in range(1, 11)]  # fmt: skip
    assert statuses == [401] * 10  # each forwarded client has its own bucket behind a trusted proxy


def test_query_keys_are_redacted_in_the_access_log(engine: Any, database_url: str, tmp_path: Path) -> None:
    key = "ck_never_in_the_log_4f1e9a"
    log_path = tmp_path / "api.log"
    with api_process(database_url, log_path, CANDLEKEEP_API_KEYS=key) as base:
        assert _status(base + f"/udf/time?api_key={key}") == 200
        assert _status(base + "/udf/time?api_key=wrong-guess-77") == 401
    text = log_path.read_text()
    assert "/udf/time?api_key=***" in text
    assert key not in text and "wrong-guess-77" not in text
