from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.main import create_app
from candlekeep.settings import Settings
from tests.utils.net import LOOPBACK_PEER


@pytest.fixture
def client(engine: Engine, database_url: str) -> Iterator[TestClient]:
    """The API over the test database (emptied for each test)."""
    app = create_app(Settings(database_url=database_url, redis_url=None, api_rate_limit_per_minute=0))
    with TestClient(app, client=LOOPBACK_PEER) as test_client:
        yield test_client
