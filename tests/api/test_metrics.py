"""Prometheus metrics of the API (api/metrics.py): parsed back from GET /metrics, never read from objects."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.main import create_app
from candlekeep.settings import Settings
from tests.utils.net import LOOPBACK_PEER

KEY = "ck_metrics_5d1f0c9a"


def make_app(database_url: str, **overrides: Any) -> FastAPI:
    settings = Settings(**{"database_url": database_url, "redis_url": None, "api_keys": [], **overrides})
    app = create_app(settings)

    @app.get("/v1/things/{name}")
    def thing(name: str) -> dict[str, str]:
        return {"name": name}

    return app


def scrape(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, by (sample name, labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def labels(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


def test_latency_is_recorded_per_route_template_not_per_path(database_url: str) -> None:
    client = TestClient(make_app(database_url), client=LOOPBACK_PEER)
    for name in ("btc", "eth", "sol"):
        assert client.get(f"/v1/things/{name}").status_code == 200

    samples = scrape(client)
    route = labels(method="GET", route="/v1/things/{name}")
    assert samples[("candlekeep_api_request_duration_seconds_count", route)] == 3
    assert samples[("candlekeep_api_request_duration_seconds_sum", route)] > 0
    assert samples[("candlekeep_api_request_duration_seconds_bucket", route | {("le", "+Inf")})] == 3
    assert samples[("candlekeep_api_requests_total", route | {("status", "200")})] == 3
    assert not any("btc" in value for _, label_set in samples for _, value in label_set)


def test_unmatched_paths_share_one_series(database_url: str) -> None:
    client = TestClient(make_app(database_url), client=LOOPBACK_PEER)
    for path in ("/wp-login.php", "/.env", "/v2/whatever"):
        assert client.get(path).status_code == 404

    samples = scrape(client)
    assert samples[("candlekeep_api_requests_total", labels(method="GET", route="<unmatched>", status="404"))] == 3
    assert not any("wp-login" in value for _, label_set in samples for _, value in label_set)


def test_refused_requests_are_counted_under_their_route(database_url: str) -> None:
    client = TestClient(make_app(database_url, api_keys=[KEY]), client=("127.0.0.1", 5000))
    assert client.get("/v1/things/btc").status_code == 401

    samples = scrape(client)  # /metrics itself: open to loopback
    assert samples[("candlekeep_api_requests_total",
                    labels(method="GET", route="/v1/things/{name}", status="401"))] == 1  # fmt: skip


def test_cache_and_on_demand_counters_are_exported(database_url: str) -> None:
    app = make_app(database_url)
    client = TestClient(app, client=LOOPBACK_PEER)
    before = scrape(client)
    assert before[("candlekeep_api_cache_requests_total", labels(result="hit"))] == 0  # present from the start
    assert before[("candlekeep_api_ondemand_requests_total", labels(op="fetch"))] == 0

    metrics = app.state.serving_metrics  # what the lifespan hands to OhlcvService
    assert metrics is app.state.metrics
    metrics.cache_lookup(hits=3, misses=1)
    metrics.cache_lookup(hits=0, misses=2)
    metrics.on_demand_request(op="fetch")
    metrics.on_demand_request(op="track")
    metrics.on_demand_request(op="fetch")
    with pytest.raises(ValueError, match="unknown on-demand op"):
        metrics.on_demand_request(op="sideways")

    after = scrape(client)
    assert after[("candlekeep_api_cache_requests_total", labels(result="hit"))] == 3
    assert after[("candlekeep_api_cache_requests_total", labels(result="miss"))] == 3
    assert after[("candlekeep_api_ondemand_requests_total", labels(op="fetch"))] == 2
    assert after[("candlekeep_api_ondemand_requests_total", labels(op="track"))] == 1


def test_each_app_has_its_own_registry(database_url: str) -> None:
    one, two = TestClient(make_app(database_url), client=LOOPBACK_PEER), TestClient(make_app(database_url), client=LOOPBACK_PEER)
    one.get("/v1/things/a")
    route = labels(method="GET", route="/v1/things/{name}")
    assert scrape(one)[("candlekeep_api_request_duration_seconds_count", route)] == 1
    assert ("candlekeep_api_request_duration_seconds_count", route) not in scrape(two)


def test_the_apps_own_routes_are_labelled_by_their_template(database_url: str) -> None:
    """The real routers (included by create_app, not added by a test) show under their templates."""
    app = create_app(Settings(database_url=database_url, redis_url=None, api_keys=[]))
    with TestClient(app, client=LOOPBACK_PEER) as client:
        client.get("/health")
        client.get("/udf/time")
        client.get("/v1/ohlcv", params={"instrument": "cccagg:BTC-USD", "interval": "1m", "start": 0, "end": 60})
        samples = scrape(client)
    routes = {dict(label_set).get("route") for name, label_set in samples if name == "candlekeep_api_requests_total"}
    assert {"/health", "/udf/time", "/v1/ohlcv"} <= routes, routes
    assert "<unmatched>" not in routes
