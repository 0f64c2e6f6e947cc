"""TradingView UDF under /udf, field by field against the protocol, over real PostgreSQL.

Data: coinbase:BTC-USD has 1m bars for minutes 0..119 and 150..179 of 2024-01-01 (a 30 minute gap),
prices with 2 decimals; binance:ETH-USDT has three 1m bars with 3-decimal prices.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.main import create_app
from candlekeep.bars import Bar
from candlekeep.settings import Settings
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from tests.utils.bars import make_bar
from tests.utils.net import LOOPBACK_PEER

T0 = 1704067200  # 2024-01-01T00:00:00Z
BTC = "coinbase:BTC-USD"
ETH = "binance:ETH-USDT"
BTC_MINUTES = [*range(0, 120), *range(150, 180)]


def _btc_bar(minute: int) -> Bar:
    return make_bar(BTC, T0 + minute * 60, f"{42000 + minute}.25")


@pytest.fixture
def btc_bars() -> list[Bar]:
    return [_btc_bar(m) for m in BTC_MINUTES]


@pytest.fixture
def client(engine: Engine, database_url: str, btc_bars: list[Bar]) -> Iterator[TestClient]:
    InstrumentStore(engine).register([BTC, ETH, "cccagg:SOL-USD"])
    store = BarStore(engine)
    store.upsert_bars(btc_bars)
    store.upsert_bars([make_bar(ETH, T0 + m * 60, f"2200.{m}25") for m in range(3)])
    app = create_app(Settings(database_url=database_url, redis_url=None, api_rate_limit_per_minute=0))
    with TestClient(app, client=LOOPBACK_PEER) as test_client:
        yield test_client


def _history(client: TestClient, **params) -> dict:
    response = client.get("/udf/history", params={"symbol": BTC, **params})
    assert response.status_code == 200, response.text
    return response.json()


def _assert_ok_shape(body: dict) -> int:
    assert body["s"] == "ok"
    assert set(body) == {"s", "t", "o", "h", "l", "c", "v"}
    n = len(body["t"])
    for key in "tohlcv":
        assert len(body[key]) == n, key
    assert all(isinstance(t, int) for t in body["t"])
    for key in "ohlcv":  # JSON numbers, not decimal strings
        assert all(isinstance(x, int | float) and not isinstance(x, bool) for x in body[key]), key
    assert body["t"] == sorted(set(body["t"])), "t must be strictly ascending"
    return n


def test_config(client: TestClient) -> None:
    body = client.get("/udf/config").json()
    assert body["supports_search"] is True
    assert body["supports_group_request"] is False
    assert body["supported_resolutions"] == ["1", "5", "15", "30", "60", "240", "1D"]
    assert body["supports_marks"] is False
    assert body["supports_timescale_marks"] is False
    assert body["supports_time"] is True
    assert [e["value"] for e in body["exchanges"]] == ["", "binance", "cccagg", "coinbase"]
    assert all(set(e) == {"value", "name", "desc"} for e in body["exchanges"])
    assert {"name": "Crypto", "value": "crypto"} in body["symbols_types"]


def test_symbols_resolves_an_instrument(client: TestClient) -> None:
    body = client.get("/udf/symbols", params={"symbol": BTC}).json()
    assert body == {
        "name": "BTC-USD",
        "ticker": BTC,
        "full_name": BTC,
        "description": "BTC / USD on coinbase",
        "type": "crypto",
        "session": "24x7",
        "timezone": "Etc/UTC",
        "exchange": "coinbase",
        "listed_exchange": "coinbase",
        "minmov": 1,
        "pricescale": 100,  # prices stored with 2 decimals
        "has_intraday": True,
        "has_daily": True,
        "has_weekly_and_monthly": False,
        "supported_resolutions": ["1", "5", "15", "30", "60", "240", "1D"],
        "intraday_multipliers": ["1", "5", "15", "30", "60", "240"],
        "volume_precision": 1,  # volumes stored as 1.5
        "data_status": "streaming",
    }


def test_symbols_pricescale_follows_the_stored_decimals(client: TestClient) -> None:
    assert client.get("/udf/symbols", params={"symbol": ETH}).json()["pricescale"] == 1000
    no_bars = client.get("/udf/symbols", params={"symbol": "cccagg:SOL-USD"}).json()
    assert no_bars["pricescale"] == 100 and no_bars["volume_precision"] == 8  # defaults


@pytest.mark.parametrize("symbol", ["SOLUSD", "SOL-USD", "cccagg:SOL-USD"])
def test_symbols_resolve_as_the_ohlcv_route_does(client: TestClient, symbol: str) -> None:
    """One resolver for every door: `BTCUSD` means what it means for /v1/ohlcv (default venue cccagg)."""
    body = client.get("/udf/symbols", params={"symbol": symbol}).json()
    assert body["ticker"] == "cccagg:SOL-USD"
    ohlcv = client.get("/v1/ohlcv", params={"instrument": symbol, "interval": "1m", "start": T0, "end": T0 + 60,
                                            "wait": 0}).json()  # fmt: skip
    assert ohlcv["instrument"] == body["ticker"]
    assert client.get("/udf/history", params={"symbol": symbol, "resolution": "1", "from": T0,
                                              "to": T0 + 60}).json()["s"] == "no_data"


@pytest.mark.parametrize("symbol", ["kraken:BTC-USD", "nonsense", "BTCUSD"])
def test_symbols_unknown(client: TestClient, symbol: str) -> None:
    response = client.get("/udf/symbols", params={"symbol": symbol})
    assert response.status_code == 200
    assert response.json() == {"s": "error", "errmsg": "unknown_symbol"}


def test_search(client: TestClient) -> None:
    body = client.get("/udf/search", params={"query": "btc", "type": "", "exchange": "", "limit": 10}).json()
    assert body == [{
        "symbol": BTC, "full_name": BTC, "description": "BTC / USD on coinbase",
        "exchange": "coinbase", "ticker": BTC, "type": "crypto",
    }]  # fmt: skip
    assert [r["ticker"] for r in client.get("/udf/search", params={"query": ""}).json()] == [ETH, "cccagg:SOL-USD", BTC]
    assert [r["ticker"] for r in client.get("/udf/search", params={"exchange": "binance"}).json()] == [ETH]
    assert client.get("/udf/search", params={"query": "btc", "type": "stock"}).json() == []
    assert len(client.get("/udf/search", params={"limit": 2}).json()) == 2
    assert client.get("/udf/search", params={"limit": 1000}).status_code == 422


def test_history_1m(client: TestClient, btc_bars: list[Bar]) -> None:
    body = _history(client, resolution="1", **{"from": T0, "to": T0 + 600})  # `to` exclusive
    assert _assert_ok_shape(body) == 10
    expected = btc_bars[:10]
    assert body["t"] == [b.start for b in expected]
    assert body["o"] == [float(b.open) for b in expected]
    assert body["h"] == [float(b.high) for b in expected]
    assert body["l"] == [float(b.low) for b in expected]
    assert body["c"] == [float(b.close) for b in expected]
    assert body["v"] == [1.5] * 10


def test_history_from_is_inclusive_of_the_first_full_bucket(client: TestClient) -> None:
    body = _history(client, resolution="1", **{"from": T0 + 30, "to": T0 + 181})
    assert body["t"] == [T0 + 60, T0 + 120, T0 + 180]


@pytest.mark.parametrize(
    ("resolution", "step", "count"),
    [("5", 300, 30), ("15", 900, 10), ("30", 1800, 5), ("60", 3600, 3), ("240", 14400, 1), ("1D", 86400, 1)],
)
def test_history_resolution_mapping(client: TestClient, btc_bars: list[Bar], resolution: str, step: int, count: int) -> None:
    body = _history(client, resolution=resolution, **{"from": T0, "to": T0 + 86400})
    assert _assert_ok_shape(body) == count
    buckets: dict[int, list[Bar]] = {}
    for b in btc_bars:
        buckets.setdefault(b.start - b.start % step, []).append(b)
    assert body["t"] == sorted(buckets)
    for i, t in enumerate(body["t"]):
        minutes = buckets[t]
        assert body["o"][i] == float(minutes[0].open)
        assert body["h"][i] == float(max(m.high for m in minutes))
        assert body["l"][i] == float(min(m.low for m in minutes))
        assert body["c"][i] == float(minutes[-1].close)
        assert body["v"][i] == float(sum((m.volume for m in minutes), Decimal(0)))


def test_history_countback_reaches_before_from_and_over_gaps(client: TestClient) -> None:
    # 10 bars (150..159) before `to`, then the gap 120..149, then 30 more (90..119); `from` is ignored.
    body = _history(client, resolution="1", countback=40, **{"from": T0 + 155 * 60, "to": T0 + 160 * 60})
    assert _assert_ok_shape(body) == 40
    assert body["t"] == [T0 + m * 60 for m in [*range(90, 120), *range(150, 160)]]


def test_history_countback_stops_at_the_first_bar(client: TestClient) -> None:
    body = _history(client, resolution="60", countback=300, **{"from": T0 + 7200, "to": T0 + 86400})
    assert body["t"] == [T0, T0 + 3600, T0 + 7200]


def test_history_no_data_gives_next_time(client: TestClient) -> None:
    late = _history(client, resolution="1", **{"from": T0 + 5 * 3600, "to": T0 + 6 * 3600})
    assert late == {"s": "no_data", "nextTime": T0 + 179 * 60}
    in_gap = _history(client, resolution="1", **{"from": T0 + 125 * 60, "to": T0 + 140 * 60})
    assert in_gap == {"s": "no_data", "nextTime": T0 + 119 * 60}
    hourly = _history(client, resolution="60", **{"from": T0 + 5 * 3600, "to": T0 + 6 * 3600})
    assert hourly == {"s": "no_data", "nextTime": T0 + 2 * 3600}
    before_everything = _history(client, resolution="1", **{"from": T0 - 7200, "to": T0 - 3600})
    assert before_everything == {"s": "no_data"}


def test_history_errors(client: TestClient) -> None:
    unknown = _history(client, symbol="kraken:BTC-USD", resolution="1", **{"from": T0, "to": T0 + 60})
    assert unknown == {"s": "error", "errmsg": "unknown_symbol"}
    bad_resolution = _history(client, resolution="2", **{"from": T0, "to": T0 + 60})
    assert bad_resolution["s"] == "error" and "resolution '2'" in bad_resolution["errmsg"]
    backwards = _history(client, resolution="1", **{"from": T0 + 60, "to": T0})
    assert backwards["s"] == "error" and "after from" in backwards["errmsg"]
    too_wide = _history(client, resolution="1", **{"from": T0, "to": T0 + 200_001 * 60})
    assert too_wide["s"] == "error" and "at most" in too_wide["errmsg"]
    huge_countback = _history(client, resolution="1", countback=10**6, **{"from": T0, "to": T0 + 60})
    assert huge_countback["s"] == "error" and "countback" in huge_countback["errmsg"]
    assert client.get("/udf/history", params={"symbol": BTC, "resolution": "1", "from": "x", "to": 1}).status_code == 422


def test_time(client: TestClient) -> None:
    response = client.get("/udf/time")
    assert response.headers["content-type"].startswith("text/plain")
    assert abs(int(response.text) - time.time()) < 5
