"""The API under the load and faults a probe found (issue 8, items 10-12, 15), on a real uvicorn process
started as `candlekeep up` starts it, a real Kafka broker (the coordinator's `control` topic, nobody
consuming it, so a waiting request waits its full `wait`) and the real PostgreSQL.

Done when: during 50 aborted or stalled CSV exports plus 100 waiting requests, `/health` and an
ordinary read answer within 1 s each, and afterwards no connection of the API is left active
(pg_stat_activity, by the API's application_name).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from candlekeep.instruments import Instrument
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from tests.utils.api_server import api_process
from tests.utils.bars import make_bar
from tests.utils.wait import eventually

BIG, GAPPY = "cccagg:BIG-USD", "cccagg:GAP-USD"
T0 = 1_704_067_200  # 2024-01-01
BIG_BARS = 120_000  # ~83 days of 1m: a CSV of about 9 MB
APP_NAME = "candlekeep-load-test"


def _with_app_name(url: str) -> str:
    return url + ("&" if "?" in url else "?") + f"application_name={APP_NAME}"


def _api_connections(engine: Engine, *, active_only: bool) -> int:
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a"
    if active_only:
        sql += " AND state <> 'idle'"
    with engine.connect() as conn:
        return conn.execute(text(sql), {"a": APP_NAME}).scalar_one()


def _seed(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars(make_bar(BIG, T0 + 60 * i, str(40_000 + i % 997)) for i in range(BIG_BARS))
    # GAP-USD: an hour with its middle 10 minutes missing; tracked, so a read asks for a fetch only.
    store.upsert_bars(make_bar(GAPPY, T0 + 60 * i, "100") for i in range(60) if not 25 <= i < 35)
    InstrumentStore(engine).register([Instrument.parse(BIG), Instrument.parse(GAPPY)], tracked=True)


def _timed_get(url: str, timeout: float = 10) -> tuple[int, float]:
    began = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            reply.read()
            code = reply.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    return code, time.monotonic() - began


def _csv_path() -> str:
    query = urllib.parse.urlencode({"instrument": BIG, "interval": "1m", "start": T0, "end": T0 + 60 * BIG_BARS,
                                    "format": "csv"})  # fmt: skip
    return f"/v1/ohlcv?{query}"


def _aborted_export(port: int, stall: bool) -> None:
    """Read the first bytes of the export, then hang up (or, with `stall`, stop reading and keep the socket)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET {_csv_path()} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    sock.recv(1024)
    if stall:
        time.sleep(8)  # the server's send timeout (2 s here) must drop it long before this
    sock.close()


def test_aborted_exports_and_waiting_requests_starve_nothing(engine: Engine, database_url: str, kafka_bootstrap: str,
                                                             topic_prefix: str, tmp_path: Path) -> None:  # fmt: skip
    _seed(engine)
    env = {"CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "CANDLEKEEP_TOPIC_PREFIX": topic_prefix,
           "CANDLEKEEP_API_RATE_LIMIT_PER_MINUTE": "0", "CANDLEKEEP_STREAM_PORT_BASE": "0",
           "CANDLEKEEP_API_MAX_WAITS": "100", "CANDLEKEEP_API_MAX_WAITS_PER_KEY": "100",
           "CANDLEKEEP_API_SEND_TIMEOUT_S": "2"}  # fmt: skip
    with api_process(_with_app_name(database_url), tmp_path / "api.log", **env) as base:
        port = int(base.rsplit(":", 1)[1])
        wait_url = base + "/v1/ohlcv?" + urllib.parse.urlencode(
            {"instrument": GAPPY, "interval": "1m", "start": T0, "end": T0 + 3600, "wait": 20})
        ordinary = base + "/v1/ohlcv?" + urllib.parse.urlencode(
            {"instrument": BIG, "interval": "1h", "start": T0, "end": T0 + 86_400, "wait": 0})
        waiting_codes: list[int] = []
        threads = [threading.Thread(target=lambda: waiting_codes.append(_timed_get(wait_url, timeout=60)[0]))
                   for _ in range(100)]  # fmt: skip
        threads += [threading.Thread(target=_aborted_export, args=(port, i % 2 == 1)) for i in range(50)]
        for t in threads:
            t.start()
        time.sleep(2)  # everything under way
        probes = []
        for _ in range(10):
            probes.append(("health", *_timed_get(base + "/health")))
            probes.append(("read", *_timed_get(ordinary)))
            time.sleep(0.3)
        for t in threads:
            t.join(90)
        assert all(code == 200 for _, code, _ in probes), probes
        assert max(took for _, _, took in probes) < 1.0, probes
        assert waiting_codes == [200] * 100  # incomplete (nothing fetches), answered after their wait
        # No connection is left in use: the exports' COPYs were cancelled, their connections returned.
        eventually(lambda: _api_connections(engine, active_only=True) == 0, timeout=10,
                   what="the API's connections to go idle")  # fmt: skip
        assert _api_connections(engine, active_only=False) <= 15  # the pool's bound (5 + 10 overflow)
        # And the server still answers a full export afterwards.
        with urllib.request.urlopen(base + _csv_path(), timeout=60) as reply:
            assert sum(1 for _ in reply) == BIG_BARS + 1


def test_waits_beyond_the_caps_are_refused_at_once(engine: Engine, database_url: str, kafka_bootstrap: str,
                                                   topic_prefix: str, tmp_path: Path) -> None:  # fmt: skip
    _seed(engine)
    env = {"CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "CANDLEKEEP_TOPIC_PREFIX": topic_prefix,
           "CANDLEKEEP_API_RATE_LIMIT_PER_MINUTE": "0", "CANDLEKEEP_STREAM_PORT_BASE": "0",
           "CANDLEKEEP_API_MAX_WAITS": "20", "CANDLEKEEP_API_MAX_WAITS_PER_KEY": "5"}  # fmt: skip
    with api_process(database_url, tmp_path / "api.log", **env) as base:
        wait_url = base + "/v1/ohlcv?" + urllib.parse.urlencode(
            {"instrument": GAPPY, "interval": "1m", "start": T0, "end": T0 + 3600, "wait": 6})
        results: list[tuple[int, float]] = []
        threads = [threading.Thread(target=lambda: results.append(_timed_get(wait_url, timeout=30)))
                   for _ in range(12)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    waited = [took for code, took in results if code == 200]
    refused = [took for code, took in results if code == 429]
    assert len(waited) == 5 and len(refused) == 7, results  # one client address: five wait at once
    assert min(waited) >= 5 and max(refused) < 2, results


def test_database_down_is_a_json_503(tmp_path: Path) -> None:
    from tests.utils.net import free_port

    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    with api_process(dead, tmp_path / "api.log", CANDLEKEEP_API_RATE_LIMIT_PER_MINUTE="0") as base:
        for fmt in ("json", "csv"):
            query = urllib.parse.urlencode({"instrument": BIG, "interval": "1m", "start": T0, "end": T0 + 3600,
                                            "format": fmt, "wait": 0})  # fmt: skip
            try:
                urllib.request.urlopen(base + "/v1/ohlcv?" + query, timeout=30)
                raise AssertionError("answered 2xx with the database down")
            except urllib.error.HTTPError as exc:
                assert exc.code == 503, fmt
                assert exc.headers["content-type"] == "application/json"
                assert int(exc.headers["retry-after"]) >= 1
                assert "database is unavailable" in json.loads(exc.read())["detail"]
    assert "Traceback" not in (tmp_path / "api.log").read_text()


def test_a_csv_broken_mid_stream_is_never_complete(engine: Engine, database_url: str, tmp_path: Path) -> None:
    """The COPY's backend is terminated mid-export: the client must see a broken transfer, not a clean end."""
    _seed(engine)
    with api_process(_with_app_name(database_url), tmp_path / "api.log",
                     CANDLEKEEP_API_RATE_LIMIT_PER_MINUTE="0") as base:  # fmt: skip
        host, port = urllib.parse.urlsplit(base).netloc.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", _csv_path())
        reply = conn.getresponse()
        assert reply.status == 200
        reply.read(4096)  # the export is running
        with engine.connect() as admin:
            killed = admin.execute(text("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                        "WHERE application_name = :a AND query LIKE 'COPY%') k"),
                                   {"a": APP_NAME}).scalar_one()  # fmt: skip
        assert killed == 1
        with pytest.raises(http.client.IncompleteRead):
            while reply.read(1 << 16):
                time.sleep(0.001)
        conn.close()
    log = (tmp_path / "api.log").read_text()
    assert "aborted mid-stream" in log

