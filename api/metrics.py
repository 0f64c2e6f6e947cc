"""Prometheus metrics of the API: `install_metrics(app)` adds a timing middleware and `GET /metrics`.

    install_metrics(app)                       # in create_app, after install_security
    # candlekeep.serving.ServingMetrics, which OhlcvService / OnDemand call:
    app.state.metrics.cache_lookup(hits=5, misses=1)
    app.state.metrics.on_demand_request(op="fetch")

One CollectorRegistry per app (never prometheus' global one, so two apps in a process, as in the
tests, do not collide). Exported:
- `candlekeep_api_request_duration_seconds{method,route}` histogram and
  `candlekeep_api_requests_total{method,route,status}` counter, `route` being the route template
  (`/v1/ohlcv`, `/udf/history`, ...), never the raw path: a path no route matches is `<unmatched>`.
  Requests refused by the security middleware (401/429) are counted under the route they aimed at.
- `candlekeep_api_cache_requests_total{result="hit"|"miss"}`: bars read through the Redis cache.
  Hit ratio: `rate(..{result="hit"}[5m]) / ignoring(result) sum without(result) (rate(..[5m]))`.
- `candlekeep_api_ondemand_requests_total{op="track"|"fetch"}`: on-demand commands sent to the
  coordinator (a request joining one already in flight sends none).
- `candlekeep_api_websocket_connections{route}` gauge: open live streams.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "<unmatched>"
ONDEMAND_OPS = ("track", "fetch")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiMetrics:
    """The API's instruments, on its own registry; safe to call from any thread."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.request_duration = Histogram(
            "candlekeep_api_request_duration_seconds", "HTTP request latency by route template",
            ["method", "route"], buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.requests = Counter(
            "candlekeep_api_requests", "HTTP responses by route template and status code",
            ["method", "route", "status"], registry=self.registry,
        )  # fmt: skip
        self.cache = Counter(
            "candlekeep_api_cache_requests", "Bars looked up in the Redis cache, by result", ["result"],
            registry=self.registry,
        )  # fmt: skip
        self.ondemand = Counter(
            "candlekeep_api_ondemand_requests", "On-demand commands sent to the coordinator, by op", ["op"],
            registry=self.registry,
        )  # fmt: skip
        self.websockets = Gauge(
            "candlekeep_api_websocket_connections", "Open WebSocket connections by route template", ["route"],
            registry=self.registry,
        )  # fmt: skip
        for result in ("hit", "miss"):  # present (at 0) from the start, so ratios exist
            self.cache.labels(result=result)
        for op in ONDEMAND_OPS:
            self.ondemand.labels(op=op)

    # candlekeep.serving.ServingMetrics
    def cache_lookup(self, *, hits: int, misses: int) -> None:
        if hits:
            self.cache.labels(result="hit").inc(hits)
        if misses:
            self.cache.labels(result="miss").inc(misses)

    def on_demand_request(self, *, op: str) -> None:
        if op not in ONDEMAND_OPS:
            raise ValueError(f"unknown on-demand op {op!r}; one of {', '.join(ONDEMAND_OPS)}")
        self.ondemand.labels(op=op).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def route_template(app: ASGIApp, scope: Scope) -> str:
    """The path template of the route `scope` targets (a method mismatch still names it)."""
    partial = None
    for route in _flat_routes(getattr(getattr(app, "router", None), "routes", ())):
        match, _ = route.matches(scope)
        path = getattr(route, "path_format", None) or getattr(route, "path", None)
        if match == Match.FULL:
            return path or UNMATCHED
        if match == Match.PARTIAL and partial is None:
            partial = path
    return partial or UNMATCHED


def _flat_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Every route, with included routers expanded: FastAPI >= 0.16x includes a router lazily, as one
    `_IncludedRouter` entry whose `effective_route_contexts()` are its routes with the full path."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):
            yield from contexts()
        else:
            yield route


class MetricsMiddleware:
    """Pure ASGI: times each HTTP request from first byte in to last byte out."""

    def __init__(self, app: ASGIApp, *, fastapi_app: FastAPI, metrics: ApiMetrics) -> None:
        self.app, self.fastapi_app, self.metrics = app, fastapi_app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            gauge = self.metrics.websockets.labels(route=route_template(self.fastapi_app, scope))
            gauge.inc()
            try:
                await self.app(scope, receive, send)
            finally:
                gauge.dec()
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_template(self.fastapi_app, scope)
        method = scope.get("method", "GET")
        status = 500  # an exception before any response
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request_duration.labels(method=method, route=route).observe(time.perf_counter() - started)
            self.metrics.requests.labels(method=method, route=route, status=str(status)).inc()


router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Prometheus text exposition: request latency per route, cache hits and misses, on-demand "
    "fetches. Open to loopback clients; others need an API key when keys are required.",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "candlekeep_api_requests_total{...} 3.0\n"}}}},
)
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI) -> ApiMetrics:
    """Create the app's metrics (`app.state.metrics`, also `app.state.serving_metrics`, which the
    lifespan hands to OhlcvService), add the timing middleware and `GET /metrics`."""
    if isinstance(existing := getattr(app.state, "metrics", None), ApiMetrics):  # installing twice: no-op
        return existing
    app.state.metrics = app.state.serving_metrics = ApiMetrics()
    app.include_router(router)
    app.add_middleware(MetricsMiddleware, fastapi_app=app, metrics=app.state.metrics)
    return app.state.metrics
