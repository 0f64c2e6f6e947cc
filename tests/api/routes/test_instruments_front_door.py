"""The front door for a new instrument (issue 8, items 1 and 13): an untracked instrument is tracked only
when its source knows it; otherwise 404 naming it and the reason, and nothing is created. A request
never migrates or registers anything else; a key may add at most CANDLEKEEP_API_MAX_TRACKS_PER_KEY.
Real PostgreSQL; CryptoCompare over the loopback fixture server.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from api.main import create_app
from candlekeep.settings import Settings
from tests.candlekeep.sources.test_cryptocompare import HISTODAY, UNKNOWN_PAIR_TYPE2
from tests.utils.fixture_server import FixtureServer, Reply
from tests.utils.net import LOOPBACK_PEER

PARAMS = {"interval": "1m", "start": "2024-01-01", "end": "2024-01-01T01:00:00Z", "wait": 0}


def _rows(engine: Engine) -> list[tuple[str, bool]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT id, tracked FROM instruments ORDER BY id"))]


def _settings(database_url: str, **kw: Any) -> Settings:
    return Settings(**{"database_url": database_url, "redis_url": None, "kafka_bootstrap_servers": None,
                       "api_rate_limit_per_minute": 0, "source": "simulator", **kw})  # fmt: skip


def test_a_garbage_instrument_is_404_and_creates_nothing(engine: Engine, database_url: str) -> None:
    with TestClient(create_app(_settings(database_url)), client=LOOPBACK_PEER) as client:
        before = _rows(engine)
        response = client.get("/v1/ohlcv", params={"instrument": "cccagg:FOO-BAR", **PARAMS})
        assert response.status_code == 404
        assert "cccagg:FOO-BAR" in response.json()["detail"] and "simulator" in response.json()["detail"]
        assert client.get("/v1/ohlcv", params={"instrument": "cccagg:FOO-BAR", **PARAMS}).status_code == 404
        assert client.app.state.on_demand.requests_sent == 0  # type: ignore[attr-defined]
    assert _rows(engine) == before


def test_an_instrument_cryptocompare_does_not_know_is_404(engine: Engine, database_url: str) -> None:
    with FixtureServer() as server:
        server.add(HISTODAY, Reply.json(UNKNOWN_PAIR_TYPE2))
        settings = _settings(database_url, source="cryptocompare", cryptocompare_base_url=server.url)
        with TestClient(create_app(settings), client=LOOPBACK_PEER) as client:
            for _ in range(3):
                response = client.get("/v1/ohlcv", params={"instrument": "cccagg:EZETH-USD", **PARAMS})
                assert response.status_code == 404
                assert "cccagg:EZETH-USD" in response.json()["detail"]
                assert "market does not exist for this coin pair" in response.json()["detail"]
        assert len(server.requests) == 1  # the verdict is kept: the source is asked once
    assert _rows(engine) == []


def test_a_known_instrument_is_tracked_without_a_migration_in_the_request(engine: Engine, database_url: str) -> None:
    """Eight concurrent first requests (main: Alembic ran inside each, 7 of 8 crashed)."""
    with TestClient(create_app(_settings(database_url)), client=LOOPBACK_PEER) as client:
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: client.get("/v1/ohlcv", params={"instrument": "coinbase:SOL-USD",
                                                                            **PARAMS}).status_code, range(8)))  # fmt: skip
    assert codes == [200] * 8
    assert _rows(engine) == [("coinbase:SOL-USD", True)]


def test_a_key_adds_at_most_its_share_of_instruments(engine: Engine, database_url: str) -> None:
    settings = _settings(database_url, api_max_tracks_per_key=2, api_keys=["ck_a_0123456789abcdef", "ck_b_0123456789abcdef"])
    with TestClient(create_app(settings), client=("203.0.113.7", 5000)) as client:
        a, b = {"X-API-Key": "ck_a_0123456789abcdef"}, {"X-API-Key": "ck_b_0123456789abcdef"}
        for instrument in ("coinbase:BTC-USD", "coinbase:ETH-USD"):
            assert client.get("/v1/ohlcv", params={"instrument": instrument, **PARAMS}, headers=a).status_code == 200
        third = client.get("/v1/ohlcv", params={"instrument": "kraken:BTC-USD", **PARAMS}, headers=a)
        assert third.status_code == 429 and "CANDLEKEEP_API_MAX_TRACKS_PER_KEY" in third.json()["detail"]
        assert client.get("/v1/ohlcv", params={"instrument": "kraken:BTC-USD", **PARAMS}, headers=b).status_code == 200
    assert _rows(engine) == [("coinbase:BTC-USD", True), ("coinbase:ETH-USD", True), ("kraken:BTC-USD", True)]
