"""API keys, rate limits and CORS (api/security.py) over the real app, a real Redis and real clients.

Requests from beyond loopback use TestClient's `client=(host, port)`, which becomes the ASGI scope's
client address. `/v1/probe` and `/v1/ws-probe` are test routes added to the real app: the middleware
does not depend on which route it guards, and they answer exactly 200 / accept when let through.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from api.main import create_app
from api.security import InsecureConfiguration
from candlekeep.settings import Settings
from tests.utils.net import free_port

REMOTE = ("203.0.113.7", 50000)  # TEST-NET-3: never loopback
LOCAL = ("127.0.0.1", 50000)
KEY_A = "ck_live_8f3a9c2d71e04b5a9e6f"
KEY_B = "ck_live_0b1c2d3e4f5a6b7c8d9e"


def make_app(database_url: str, **overrides: Any) -> FastAPI:
    values: dict[str, Any] = {"database_url": database_url, "redis_url": None, "api_keys": [],
                              "api_cors_origins": [], "api_host": "127.0.0.1"}  # fmt: skip
    settings = Settings(**{**values, **overrides})
    app = create_app(settings)

    @app.get("/v1/probe")
    def probe() -> dict[str, bool]:
        return {"ok": True}

    @app.websocket("/v1/ws-probe")
    async def ws_probe(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"ok": True})
        await websocket.close()

    return app


# --- who needs a key ---------------------------------------------------------------------------------


def test_without_keys_only_loopback_peers_are_answered(database_url: str) -> None:
    """The peer address decides, not CANDLEKEEP_API_HOST: `uvicorn --host 0.0.0.0` with the default
    settings (api_host 127.0.0.1, no keys) must not serve a remote peer."""
    app = make_app(database_url)
    assert TestClient(app, client=LOCAL).get("/v1/probe").status_code == 200
    assert TestClient(app, client=("::1", 50000)).get("/v1/probe").status_code == 200
    for peer in (REMOTE, ("10.0.0.5", 1234), ("192.168.1.20", 1234), ("2001:db8::1", 1234), ("testclient", 1)):
        refused = TestClient(app, client=peer).get("/v1/ohlcv", params={"instrument": "cccagg:BTC-USD",
                                                                        "interval": "1m", "start": "0", "end": "60"})
        assert refused.status_code == 401, peer
        assert "CANDLEKEEP_API_KEYS" in refused.json()["detail"]
    with pytest.raises(WebSocketDisconnect) as ws_refused, TestClient(app, client=REMOTE).websocket_connect(
            "/v1/ws-probe"):  # fmt: skip
        pass
    assert ws_refused.value.code == 1008


def test_asgi_peer_beyond_loopback_is_refused_without_keys(database_url: str) -> None:
    """At the ASGI level: the scope's client is all the middleware sees."""
    app = make_app(database_url)
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    async def call(client: tuple[str, int]) -> int:
        sent.clear()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": "/v1/probe", "raw_path": b"/v1/probe", "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"api.example")], "client": client,
                 "server": ("0.0.0.0", 8000), "state": {}}  # fmt: skip
        await app(scope, receive, send)
        return sent[0]["status"]

    import anyio

    assert anyio.run(call, ("198.51.100.23", 40000)) == 401
    assert anyio.run(call, ("127.0.0.1", 40000)) == 200


def test_an_exposed_api_without_keys_refuses_to_start(database_url: str) -> None:
    with pytest.raises(InsecureConfiguration, match="CANDLEKEEP_API_KEYS"):
        make_app(database_url, api_host="0.0.0.0")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_hosts_start_without_keys(database_url: str, host: str) -> None:
    make_app(database_url, api_host=host)  # no raise


def test_exposed_api_wants_a_key_from_remote_clients(database_url: str) -> None:
    client = TestClient(make_app(database_url, api_host="0.0.0.0", api_keys=[KEY_A]), client=REMOTE)

    missing = client.get("/v1/probe")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "X-API-Key" in missing.json()["detail"]
    assert client.get("/v1/probe", headers={"X-API-Key": KEY_A}).json() == {"ok": True}
    assert client.get("/v1/probe", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
    # The stitched read is guarded too, before it touches anything.
    assert client.get("/v1/ohlcv", params={"instrument": "cccagg:BTC-USD", "interval": "1m"}).status_code == 401


def test_configured_keys_are_required_from_loopback_clients_too(database_url: str) -> None:
    """A reverse proxy on the same host makes every request local: configured keys always apply."""
    client = TestClient(make_app(database_url, api_keys=[KEY_A]), client=LOCAL)
    assert client.get("/v1/probe").status_code == 401
    assert client.get("/v1/probe", headers={"X-API-Key": KEY_A}).status_code == 200


def test_every_configured_key_works_and_near_misses_do_not(database_url: str) -> None:
    client = TestClient(make_app(database_url, api_host="0.0.0.0", api_keys=f"{KEY_A}, {KEY_B}"), client=REMOTE)

    for key in (KEY_A, KEY_B):
        assert client.get("/v1/probe", headers={"X-API-Key": key}).status_code == 200
    near_misses = [KEY_A[:-1], KEY_A + "0", KEY_A[:-1] + "X", KEY_A.upper(), "", f"{KEY_A},{KEY_B}", "x" * 4096]
    for key in near_misses:
        response = client.get("/v1/probe", headers={"X-API-Key": key})
        assert response.status_code == 401, key
    for value in (f"Basic {KEY_A}", f"Bearer {KEY_A[:-1]}", "Bearer"):
        assert client.get("/v1/probe", headers={"Authorization": value}).status_code == 401, value
    # Bytes that are not UTF-8 are a wrong key, not a server error.
    assert client.get("/v1/probe", headers={"X-API-Key": b"\xff\xfe" + KEY_A.encode()}).status_code == 401


def test_open_paths(database_url: str, engine: object) -> None:
    app = make_app(database_url, api_host="0.0.0.0", api_keys=[KEY_A])
    with TestClient(app, client=REMOTE) as remote, TestClient(app, client=LOCAL) as local:
        assert remote.get("/health").json() == {"status": "ok"}  # open: the verdict alone, no detail
        assert remote.get("/health", headers={"X-API-Key": KEY_A}).json()["database"] == "ok"
        assert local.get("/health").json() == {"status": "ok"}  # keys configured: loopback is anonymous too
        schema = remote.get("/openapi.json")
        assert schema.status_code == 200
        assert schema.json()["components"]["securitySchemes"]["ApiKeyHeader"]["name"] == "X-API-Key"
        assert remote.get("/docs").status_code == 200

        assert remote.get("/metrics").status_code == 401  # metrics: loopback, or a key
        assert remote.get("/metrics", headers={"X-API-Key": KEY_A}).status_code == 200
        assert local.get("/metrics").status_code == 200

        assert remote.get("/health", headers={"X-API-Key": "wrong"}).status_code == 401  # a wrong key is wrong


def test_websocket_needs_a_key_in_a_header_or_the_query(database_url: str) -> None:
    client = TestClient(make_app(database_url, api_host="0.0.0.0", api_keys=[KEY_A]), client=REMOTE)

    with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/v1/ws-probe"):
        pass
    assert refused.value.code == 1008
    with pytest.raises(WebSocketDisconnect), client.websocket_connect(f"/v1/ws-probe?api_key={KEY_A}x"):
        pass
    with client.websocket_connect(f"/v1/ws-probe?api_key={KEY_A}") as ws:
        assert ws.receive_json() == {"ok": True}
    with client.websocket_connect("/v1/ws-probe", headers={"X-API-Key": KEY_A}) as ws:
        assert ws.receive_json() == {"ok": True}


# --- rate limits ---------------------------------------------------------------------------------------


def assert_limited(response: Any) -> int:
    assert response.status_code == 429, response.text
    retry = response.headers["retry-after"]
    assert retry.isdigit() and int(retry) >= 1, retry
    assert "rate limit" in response.json()["detail"]
    return int(retry)


def test_in_process_bucket_per_key_and_per_address(database_url: str) -> None:
    app = make_app(database_url, api_keys=[KEY_A, KEY_B], api_rate_limit_per_minute=1, api_rate_burst=3)
    client = TestClient(app, client=REMOTE)
    a, b = {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}

    assert [client.get("/v1/probe", headers=a).status_code for _ in range(3)] == [200, 200, 200]
    assert 1 <= assert_limited(client.get("/v1/probe", headers=a)) <= 60  # one token a minute
    assert client.get("/v1/probe", headers=b).status_code == 200  # another key: its own bucket
    # Without a valid key the address is the identity: bad guesses are limited too.
    guesses = [client.get("/v1/probe", headers={"X-API-Key": f"guess{i}"}).status_code for i in range(4)]
    assert guesses == [401, 401, 401, 429]
    other = TestClient(app, client=("198.51.100.9", 4000))
    assert other.get("/v1/probe", headers={"X-API-Key": "guess"}).status_code == 401  # another address


def test_rate_limit_zero_turns_it_off(database_url: str) -> None:
    client = TestClient(make_app(database_url, api_rate_limit_per_minute=0, api_rate_burst=1), client=LOCAL)
    assert {client.get("/v1/probe").status_code for _ in range(5)} == {200}


def test_two_apps_sharing_redis_share_the_budget(database_url: str, redis_url: str) -> None:
    key = f"ck_{uuid.uuid4().hex}"  # a fresh identity, so earlier runs' buckets do not count
    settings = {"api_keys": [key], "redis_url": redis_url, "api_rate_limit_per_minute": 1, "api_rate_burst": 3}
    one = TestClient(make_app(database_url, **settings), client=REMOTE)
    two = TestClient(make_app(database_url, **settings), client=("198.51.100.9", 4000))
    headers = {"X-API-Key": key}

    assert one.get("/v1/probe", headers=headers).status_code == 200
    assert one.get("/v1/probe", headers=headers).status_code == 200
    assert two.get("/v1/probe", headers=headers).status_code == 200
    assert_limited(two.get("/v1/probe", headers=headers))
    assert_limited(one.get("/v1/probe", headers=headers))
    assert one.app.state.rate_limiter.backend == "redis"  # type: ignore[attr-defined]

    import redis

    stored = redis.Redis.from_url(redis_url)
    names = [name.decode() for name in stored.scan_iter("ratelimit:*")]
    assert any(name.startswith("ratelimit:key:") for name in names)
    assert not any(key in name for name in names)  # the key itself is never stored
    stored.close()


def test_redis_down_falls_back_to_in_process_buckets_and_says_so(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = make_app(database_url, redis_url=dead, api_rate_limit_per_minute=1, api_rate_burst=2)
    client = TestClient(app, client=LOCAL)

    with caplog.at_level(logging.WARNING, logger="api.security"):
        statuses = [client.get("/v1/probe").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # still limited: never fail open
    assert app.state.rate_limiter.backend == "local (redis down)"
    warnings = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not once per request


def test_websocket_handshakes_are_rate_limited(database_url: str) -> None:
    client = TestClient(make_app(database_url, api_rate_limit_per_minute=1, api_rate_burst=1), client=LOCAL)
    with client.websocket_connect("/v1/ws-probe") as ws:
        assert ws.receive_json() == {"ok": True}
    with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/v1/ws-probe"):
        pass
    assert refused.value.code == 1008


# --- CORS ----------------------------------------------------------------------------------------------


def test_cors_headers_only_for_configured_origins(database_url: str) -> None:
    origin = "https://charts.example.com"
    client = TestClient(make_app(database_url, api_host="0.0.0.0", api_keys=[KEY_A], api_cors_origins=origin),
                        client=REMOTE)  # fmt: skip

    ok = client.get("/v1/probe", headers={"Origin": origin, "X-API-Key": KEY_A})
    assert ok.headers["access-control-allow-origin"] == origin
    assert "retry-after" in ok.headers["access-control-expose-headers"].lower()
    # A preflight carries no key; it must pass so the real request can send one.
    preflight = client.options("/v1/probe", headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                                                     "Access-Control-Request-Headers": "x-api-key"})  # fmt: skip
    assert preflight.status_code == 200
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    # A refusal stays readable by the page.
    refused = client.get("/v1/probe", headers={"Origin": origin})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == origin

    stranger = client.get("/v1/probe", headers={"Origin": "https://evil.example", "X-API-Key": KEY_A})
    assert "access-control-allow-origin" not in stranger.headers


def test_no_cors_headers_without_configured_origins(database_url: str) -> None:
    client = TestClient(make_app(database_url), client=LOCAL)
    response = client.get("/v1/probe", headers={"Origin": "https://charts.example.com"})
    assert response.status_code == 200
    assert not any(name.startswith("access-control-") for name in response.headers)
    preflight = client.options("/v1/probe", headers={"Origin": "https://charts.example.com",
                                                     "Access-Control-Request-Method": "GET"})  # fmt: skip
    assert "access-control-allow-origin" not in preflight.headers


# --- ?api_key= for UDF and WebSocket clients, and what a refusal reveals -------------------------------


def test_udf_clients_may_send_the_key_in_the_query(database_url: str) -> None:
    client = TestClient(make_app(database_url, api_keys=[KEY_A]), client=REMOTE)
    assert client.get("/udf/time").status_code == 401
    assert client.get("/udf/time", params={"api_key": KEY_A}).status_code == 200
    assert client.get("/udf/config", params={"api_key": KEY_A + "x"}).status_code == 401
    # Only the UDF datafeed and WebSockets read it: elsewhere a key belongs in a header.
    assert client.get("/v1/probe", params={"api_key": KEY_A}).status_code == 401


def test_the_stream_accepts_api_key_in_the_query(database_url: str, engine: object) -> None:
    app = make_app(database_url, api_keys=[KEY_A])
    with TestClient(app, client=REMOTE) as client, client.websocket_connect(
            f"/v1/stream?instrument=cccagg:BTC-USD&interval=1m&api_key={KEY_A}") as ws:  # fmt: skip
        assert ws.receive_json()["type"] == "live"


def test_refusals_say_nothing_about_the_key(database_url: str) -> None:
    client = TestClient(make_app(database_url, api_keys=[KEY_A]), client=REMOTE)
    bodies = {client.get("/v1/probe", headers={"X-API-Key": key}).text
              for key in (KEY_A[:-1], KEY_A + "0", "x", "y" * len(KEY_A), "z" * 4096)}  # fmt: skip
    assert bodies == {'{"detail": "invalid API key"}'}  # one answer whatever the length or content


def test_a_non_ascii_bad_stream_parameter_closes_cleanly(database_url: str,
                                                         engine: object) -> None:
    app = make_app(database_url)
    name = "é" * 100  # 200 bytes of UTF-8 in the reason: more than a close frame holds
    with TestClient(app, client=LOCAL) as client:
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect(
                f"/v1/stream?instrument=cccagg:BTC-USD&{name}=1") as ws:  # fmt: skip
            ws.receive_json()
    assert closed.value.code == 1008
    assert closed.value.reason.startswith("unknown parameter(s): é")
    assert len(closed.value.reason.encode()) <= 123


# --- what the OpenAPI schema says ----------------------------------------------------------------------


def test_openapi_documents_401_429_and_which_routes_are_open(database_url: str, engine: object) -> None:
    app = make_app(database_url, api_keys=[KEY_A], api_rate_limit_per_minute=60)
    schema = TestClient(app, client=LOCAL).get("/openapi.json").json()
    assert "security" not in schema  # no blanket requirement: per operation
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            assert {"401", "429"} <= set(operation["responses"]), (method, path)
            if path in ("/health", "/openapi.json", "/docs", "/redoc"):
                assert operation["security"] == [], path
            else:
                assert {"ApiKeyHeader": []} in operation["security"], path
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert {"ApiKeyQuery": []} in schema["paths"]["/udf/history"]["get"]["security"]
    assert {"ApiKeyQuery": []} not in schema["paths"]["/v1/ohlcv"]["get"]["security"]
    # and what it says holds: an open route answers without a key, a secured one does not
    with TestClient(app, client=REMOTE) as remote:
        assert remote.get("/health").status_code == 200 and remote.get("/v1/instruments").status_code == 401
