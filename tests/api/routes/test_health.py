"""GET /health against the real database and a real (or unreachable) Redis."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.main import create_app
from candlekeep.settings import Settings
from tests.utils.net import free_port


def test_health_reports_database_migrations_and_redis(engine: Engine, database_url: str, redis_url: str) -> None:
    with TestClient(create_app(Settings(database_url=database_url, redis_url=redis_url))) as client:
        response = client.get("/health")

    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "database": "ok", "migrations": "current", "redis": "ok"}


def test_health_is_503_when_redis_is_unreachable(engine: Engine, database_url: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(Settings(database_url=database_url, redis_url=dead))) as client:
        response = client.get("/health")

    assert response.status_code == 503
    assert response.json()["redis"].startswith("error")
    assert response.json()["database"] == "ok"


def test_health_is_503_when_the_database_is_down(engine: Engine) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    with TestClient(create_app(Settings(database_url=dead))) as client:
        response = client.get("/health")

    assert response.status_code == 503
    assert response.json()["database"].startswith("error")
