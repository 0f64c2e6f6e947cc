"""GET /health against the real database, a real (or unreachable) Redis, an unreachable Kafka and real
daemon health servers (streaming.health.HealthServer) on the ports the API probes."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from api.main import create_app
from candlekeep.settings import Settings
from streaming.health import HealthServer, StateMachine
from tests.utils.net import LOOPBACK_PEER, free_port

DAEMONS = ("producer", "aggregator", "coordinator", "dynamic")


def free_port_block(count: int = 4) -> int:
    """A base port such that base .. base+count-1 are all free on loopback right now."""
    for _ in range(200):
        base = free_port()
        if base + count >= 65536:
            continue
        try:
            socks = []
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no block of free ports")


@pytest.fixture
def port_base() -> int:
    return free_port_block()


def test_health_reports_database_migrations_and_redis(
    engine: Engine, database_url: str, redis_url: str, port_base: int
) -> None:
    settings = Settings(database_url=database_url, redis_url=redis_url, kafka_bootstrap_servers=None,
                        stream_port_base=port_base)  # fmt: skip
    with TestClient(create_app(settings), client=LOOPBACK_PEER) as client:
        response = client.get("/health")

    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in ("status", "database", "migrations", "redis", "kafka")} == {
        "status": "ok", "database": "ok", "migrations": "current", "redis": "ok", "kafka": "not configured"
    }  # fmt: skip
    # No daemon runs: reported, and the API still serves (the daemons are not its dependencies).
    assert set(body["daemons"]) == set(DAEMONS)
    for i, name in enumerate(DAEMONS):
        assert body["daemons"][name]["state"] == "unreachable"
        assert body["daemons"][name]["healthy"] is None
        assert body["daemons"][name]["url"] == f"http://127.0.0.1:{port_base + i}/health"


@pytest.fixture
def daemon_servers(port_base: int) -> Iterator[dict[str, StateMachine]]:
    """The aggregator (streaming) and the coordinator (in error) answering on their ports; the others not."""
    machines, servers = {}, []
    for name, index, state in (("aggregator", 1, "consuming"), ("coordinator", 2, "error")):
        registry = CollectorRegistry()
        machine = StateMachine(name, {"idle": {"consuming", "error"}, "consuming": {"error"}, "error": {"idle"}},
                               initial="idle", registry=registry)  # fmt: skip
        machine.to(state, reason="test")
        machines[name] = machine
        servers.append(HealthServer(registry, machine.health, port=port_base + index).start())
    yield machines
    for server in servers:
        server.stop()


def test_health_reports_each_daemon_state(
    engine: Engine, database_url: str, port_base: int, daemon_servers: dict[str, StateMachine]
) -> None:
    settings = Settings(database_url=database_url, redis_url=None, stream_port_base=port_base)
    with TestClient(create_app(settings), client=LOOPBACK_PEER) as client:
        response = client.get("/health")

    assert response.status_code == 200, response.text  # a daemon in error does not pull the API out
    daemons = response.json()["daemons"]
    assert daemons["aggregator"]["state"] == "consuming"
    assert daemons["aggregator"]["healthy"] is True
    assert daemons["aggregator"]["since"]
    assert daemons["coordinator"]["state"] == "error"  # its /health answered 503; the body still counts
    assert daemons["coordinator"]["healthy"] is False
    assert daemons["producer"]["state"] == daemons["dynamic"]["state"] == "unreachable"
    assert daemons["producer"]["detail"]


def test_health_with_daemon_ports_unknown(engine: Engine, database_url: str) -> None:
    settings = Settings(database_url=database_url, redis_url=None, stream_port_base=0)
    with TestClient(create_app(settings), client=LOOPBACK_PEER) as client:
        daemons = client.get("/health").json()["daemons"]
    assert {d["state"] for d in daemons.values()} == {"unknown port"}


def test_health_is_503_when_kafka_is_configured_but_unreachable(
    engine: Engine, database_url: str, port_base: int
) -> None:
    settings = Settings(database_url=database_url, redis_url=None, stream_port_base=port_base,
                        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")  # fmt: skip
    with TestClient(create_app(settings), client=LOOPBACK_PEER) as client:
        started = time.monotonic()
        response = client.get("/health")
        took = time.monotonic() - started

    assert response.status_code == 503
    assert response.json()["kafka"].startswith("error")
    assert response.json()["database"] == "ok"
    assert took < 5, took  # probes are bounded


def test_health_stays_200_when_only_redis_the_cache_is_unreachable(engine: Engine, database_url: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(Settings(database_url=database_url, redis_url=dead)), client=LOOPBACK_PEER) as client:
        response = client.get("/health")

    assert response.status_code == 200  # the API serves from the database alone
    assert response.json()["status"] == "ok"
    assert response.json()["redis"].startswith("error")
    assert response.json()["database"] == "ok"


def test_health_is_503_when_the_database_is_down(engine: Engine) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    with TestClient(create_app(Settings(database_url=dead)), client=LOOPBACK_PEER) as client:
        response = client.get("/health")

    assert response.status_code == 503
    assert response.json()["database"].startswith("error")


@pytest.fixture(scope="module")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.utils.kafka import KafkaBroker, KafkaBrokerError

    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    try:
        broker.start()
    except KafkaBrokerError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield broker.bootstrap
    broker.stop()


def test_health_reports_a_reachable_kafka(
    engine: Engine, database_url: str, port_base: int, kafka_bootstrap: str
) -> None:
    settings = Settings(database_url=database_url, redis_url=None, stream_port_base=port_base,
                        kafka_bootstrap_servers=kafka_bootstrap)  # fmt: skip
    with TestClient(create_app(settings), client=LOOPBACK_PEER) as client:
        response = client.get("/health")

    assert response.status_code == 200, response.text
    assert response.json()["kafka"] == "ok"


def test_anonymous_remote_callers_get_the_status_alone(engine: Engine) -> None:
    """Beyond loopback and without a key: `status` only (no error text, socket path or daemon URL)."""
    dead = f"postgresql://postgres@/nothing?host=/tmp/candlekeep-no-such-socket-dir&port={free_port()}"
    app = create_app(Settings(database_url=dead, api_keys=["k" * 24]))
    with TestClient(app, client=("203.0.113.7", 50000)) as remote:
        response = remote.get("/health")
        assert response.status_code == 503
        assert response.json() == {"status": "degraded"}
        assert "candlekeep-no-such-socket-dir" not in response.text
        full = remote.get("/health", headers={"X-API-Key": "k" * 24})
        assert full.status_code == 503
        assert full.json()["database"].startswith("error")
        assert set(full.json()) >= {"daemons", "kafka", "redis", "migrations"}


def test_anonymous_health_probes_the_database_once_per_ttl(engine: Engine, database_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import api.routes.health as health_route

    probes = []
    real = health_route._database_state
    monkeypatch.setattr(health_route, "_database_state", lambda e: probes.append(1) or real(e))
    app = create_app(Settings(database_url=database_url, redis_url=None, api_keys=["k" * 24]))
    with TestClient(app, client=("203.0.113.7", 50000)) as remote:
        bodies = [remote.get("/health").json() for _ in range(20)]
    assert bodies == [{"status": "ok"}] * 20
    assert len(probes) == 1  # 20 anonymous calls within BRIEF_TTL_S: one database ping
