"""The API as `candlekeep up` runs it: a real uvicorn process from `candlekeep.cli.api_command`.

Forwarded headers are believed only from CANDLEKEEP_API_FORWARDED_ALLOW_IPS (none by default), so a
loopback client cannot spoof its address past the per-address rate limit; `?api_key=` values never
reach the server's log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.utils.api_server import api_process
from tests.utils.api_server import status as _status


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
