"""GET /v1/ohlcv over a real PostgreSQL: ordering, exact decimals, derived intervals, gaps, 422s."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from candlekeep.bars import Interval, rollup_bars
from candlekeep.storage.bars import BarStore
from tests.utils.bars import make_bar

T0 = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
BTC = "cccagg:BTC-USD"


def test_bars_come_back_ascending_with_every_digit(client: TestClient, engine: Engine) -> None:
    bars = [make_bar(BTC, T0 + 60 * i, f"42000.{i:02d}", volume="0.00000001") for i in (2, 0, 1)]
    BarStore(engine).upsert_bars(bars)

    response = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "start": T0, "end": T0 + 180})

    assert response.status_code == 200, response.text
    body = response.json()
    assert [b["time"] for b in body["bars"]] == [T0, T0 + 60, T0 + 120]
    assert [b["close"] for b in body["bars"]] == ["42000.00", "42000.01", "42000.02"]
    assert body["bars"][0]["volume"] == "0.00000001"
    assert body["bars"][0]["start"] == "2024-01-01T00:00:00Z"
    assert body["gaps"] == [] and body["complete"] is True


def test_missing_buckets_are_listed_as_gaps(client: TestClient, engine: Engine) -> None:
    BarStore(engine).upsert_bars([make_bar(BTC, T0, "1"), make_bar(BTC, T0 + 240, "2")])

    body = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "start": T0, "end": T0 + 300}).json()

    assert body["gaps"] == [{"start": T0 + 60, "end": T0 + 240}]
    assert body["complete"] is False


def test_seed_style_symbol_resolves_and_says_so(client: TestClient, engine: Engine) -> None:
    BarStore(engine).upsert_bars([make_bar(BTC, T0, "1")])

    body = client.get("/v1/ohlcv", params={"instrument": "BTCUSD", "interval": "1m", "start": "2024-01-01T00:00:00Z",
                                           "end": "2024-01-01T00:01:00Z"}).json()

    assert body["instrument"] == BTC and body["requested"] == "BTCUSD"
    assert len(body["bars"]) == 1


def test_coarse_interval_is_the_exact_rollup_of_1m(client: TestClient, engine: Engine) -> None:
    minute_bars = [make_bar(BTC, T0 + 60 * i, f"{100 + (i * 7) % 13}.{i % 10}", volume=f"0.{i + 1:03d}") for i in range(30)]
    BarStore(engine).upsert_bars(minute_bars)

    body = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "5m", "start": T0, "end": T0 + 1800}).json()

    expected = list(rollup_bars(minute_bars, Interval.M5))
    assert [b["time"] for b in body["bars"]] == [b.start for b in expected]
    for got, want in zip(body["bars"], expected, strict=True):
        assert [Decimal(got[k]) for k in ("open", "high", "low", "close", "volume", "quote_volume")] == [
            want.open, want.high, want.low, want.close, want.volume, want.quote_volume]
        assert got["trades"] == want.trades


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({"instrument": "not an id!", "interval": "1m", "start": "2024-01-01", "end": "2024-01-02"}, "instrument"),
        ({"instrument": BTC, "interval": "7m", "start": "2024-01-01", "end": "2024-01-02"}, "interval"),
        ({"instrument": BTC, "interval": "1m", "start": "yesterday", "end": "2024-01-02"}, "start"),
        ({"instrument": BTC, "interval": "1m", "start": "2024-01-02", "end": "2024-01-01"}, "after start"),
        ({"instrument": BTC, "interval": "1m", "start": "2000-01-01", "end": "2024-01-01"}, "outside"),
        ({"instrument": BTC, "interval": "1m", "start": "2020-01-01", "end": "2024-01-01"}, "at most"),
    ],
)
def test_bad_requests_get_422_naming_the_problem(client: TestClient, params: dict, names: str) -> None:
    response = client.get("/v1/ohlcv", params=params)

    assert response.status_code == 422
    assert names in response.json()["detail"]


def test_missing_parameter_is_422(client: TestClient) -> None:
    response = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "start": "2024-01-01"})

    assert response.status_code == 422
    assert "end" in response.text
