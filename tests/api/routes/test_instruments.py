"""`GET /v1/instruments` and `DELETE /v1/instruments/{id}` (untrack; stored bars stay). Real PostgreSQL."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.main import create_app
from candlekeep.settings import Settings
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from tests.utils.bars import make_bar
from tests.utils.net import LOOPBACK_PEER

KEY = "ck_instruments_0123456789"


def test_list_and_untrack(engine: Engine, database_url: str) -> None:
    store = InstrumentStore(engine)
    store.register(["coinbase:ETH-USD"], tracked=True)
    store.register(["cccagg:BTC-USD"])
    BarStore(engine).upsert_bars([make_bar("coinbase:ETH-USD", 1_704_067_200, "2300")])
    app = create_app(Settings(database_url=database_url, redis_url=None, kafka_bootstrap_servers=None,
                              api_rate_limit_per_minute=0))  # fmt: skip
    with TestClient(app, client=LOOPBACK_PEER) as client:
        assert client.get("/v1/instruments").json() == {"instruments": [
            {"id": "cccagg:BTC-USD", "tracked": False}, {"id": "coinbase:ETH-USD", "tracked": True}]}
        gone = client.delete("/v1/instruments/coinbase:ETH-USD")
        assert gone.status_code == 200 and gone.json() == {"id": "coinbase:ETH-USD", "tracked": False}
        assert {"id": "coinbase:ETH-USD", "tracked": False} in client.get("/v1/instruments").json()["instruments"]
        assert client.delete("/v1/instruments/kraken:DOT-EUR").status_code == 404
        assert client.delete("/v1/instruments/not-an-id").status_code == 422
        bars = client.get("/v1/ohlcv", params={"instrument": "coinbase:ETH-USD", "interval": "1m",
                                               "start": 1_704_067_200, "end": 1_704_067_260, "wait": 0}).json()
    assert [b["close"] for b in bars["bars"]] == ["2300"]  # stored bars stay


def test_untrack_needs_a_key(engine: Engine, database_url: str) -> None:
    InstrumentStore(engine).register(["coinbase:ETH-USD"], tracked=True)
    app = create_app(Settings(database_url=database_url, redis_url=None, api_keys=[KEY], api_rate_limit_per_minute=0))
    with TestClient(app, client=("203.0.113.7", 1)) as client:
        assert client.delete("/v1/instruments/coinbase:ETH-USD").status_code == 401
        assert client.delete("/v1/instruments/coinbase:ETH-USD", headers={"X-API-Key": KEY}).status_code == 200
    assert InstrumentStore(engine).list_ids(tracked_only=True) == []
