"""The FastAPI application. Run: `uvicorn --factory api.main:create_app` (or `candlekeep up`).

Nothing connects at import: the engine (and the Redis client, when CANDLEKEEP_REDIS_URL is set) is
built when the app starts and closed when it stops. The lifespan composes the serving core
(candlekeep.serving) with the streaming side: on-demand requests reach the coordinator through
`request_fetch` below (candlekeep/ imports nothing from streaming/).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.metrics import install_metrics
from api.routes import health, ohlcv, stream, udf
from api.routes import replays
from api.security import install_security
from candlekeep.cache import BarCache
from candlekeep.serving import OhlcvService, OnDemand
from candlekeep.settings import Settings
from candlekeep.storage.bars import BarStore
from candlekeep.storage.db import create_engine, resolve_database_url
from candlekeep.storage.instruments import InstrumentStore

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(resolve_database_url(settings))
        cache = BarCache.from_url(settings.redis_url) if settings.redis_url else None
        app.state.settings = settings
        app.state.engine = engine
        app.state.bar_store = BarStore(engine)
        app.state.cache = cache
        app.state.ohlcv = OhlcvService(bar_store=app.state.bar_store, cache=cache,
                                       metrics=getattr(app.state, "serving_metrics", None))  # fmt: skip
        instruments = InstrumentStore(engine)
        app.state.on_demand = OnDemand(
            request_fetch=request_fetch(settings),
            service=app.state.ohlcv,
            tracked=lambda: instruments.list_ids(tracked_only=True),
        )
        yield
        if cache is not None:
            cache.close()
        engine.dispose()

    app = FastAPI(
        title="Candlekeep",
        summary="Crypto OHLCV candles: backfilled history, exact decimals, gaps reported.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_security(app, settings)  # refuses to start exposed beyond loopback without a key
    install_metrics(app)  # outermost: times refused requests too
    for router in (health.router, ohlcv.router, ohlcv.seed_router, udf.router, stream.router):
        app.include_router(router)
    app.include_router(replays.router)  # replay sessions (issue 9)
    return app


def request_fetch(settings: Settings) -> Callable[[str, int | None, int | None], None]:
    """`track` (start = end = None) or `fetch [start, end)` for OnDemand, through the coordinator.

    Without a broker a track registers the instrument tracked in the database (the coordinator of
    `stream all` picks it up); a range fetch needs the broker and raises otherwise.
    """

    def request(instrument: str, start: int | None, end: int | None) -> None:
        from streaming.runner import send_track

        if start is None or end is None:
            send_track(settings, instrument, timeout=5.0)
            return
        if not settings.kafka_bootstrap_servers:
            raise RuntimeError("fetching a range needs CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS (the coordinator's control topic)")
        from candlekeep.messages import CONTROL, ControlCommand, encode_control
        from candlekeep.messages import topic as topic_name
        from candlekeep.bus import make_bus

        bus = make_bus(settings)
        try:
            control = topic_name(settings.topic_prefix, CONTROL)
            bus.ensure_topics([control])
            out = bus.producer(name="candlekeep-api-fetch")
            cmd = ControlCommand("fetch", instrument, uuid.uuid4().hex, start, end)
            out.publish(control, instrument, encode_control(cmd))
            if out.flush(5.0) or out.failed or out.delivered != 1:
                raise RuntimeError(f"fetch {instrument}: the bus did not acknowledge the command within 5 s")
            log.info("on-demand fetch %s [%s, %s): command %s on %s", instrument, start, end, cmd.request_id, control)
        finally:
            bus.close()

    return request
