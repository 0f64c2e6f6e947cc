"""The FastAPI application. Run: `uvicorn --factory api.main:create_app` (or `candlekeep up`).

Nothing connects at import: the engine (and the Redis client, when CANDLEKEEP_REDIS_URL is set) is
built when the app starts and closed when it stops. The lifespan composes the serving core
(candlekeep.serving) with the streaming side: on-demand requests reach the coordinator through
`request_fetch` below, as commands on `control` (of the in-process bus `create_app(bus=...)` is
given by streaming/together.py, or of Kafka); api/ imports nothing from streaming/. Migrations run
at start (`candlekeep up` / `migrate`), never here. Errors: api.limits turns PostgreSQL outages
into JSON 503 and caps waiting and large requests.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.limits import Limits, install_database_errors
from api.metrics import install_metrics
from api.routes import health, ohlcv, stream, udf
from api.routes import book
from api.routes import instruments as instruments_routes
from api.routes import replays
from api.routes import status as status_routes
from api.security import install_security
from api.web import install_web
from candlekeep.bus import Bus, make_bus
from candlekeep.cache import BarCache
from candlekeep.logs import configure as configure_logging
from candlekeep.messages import ControlCommand
from candlekeep.responses import ResponseCache
from candlekeep.serving import OhlcvService, OnDemand
from candlekeep.settings import Settings
from candlekeep.sources.listing import make_listing
from candlekeep.storage.bars import BarStore
from candlekeep.storage.db import create_engine, resolve_database_url
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.storage.outages import OutageStore

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, bus: Bus | None = None) -> FastAPI:
    """The API. `bus`: the in-process bus the streaming daemons of this same process run on
    (streaming/together.py, what `candlekeep up` runs without Kafka); on-demand commands go there."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_level)  # uvicorn's loggers too, one format
        engine = create_engine(resolve_database_url(settings))
        cache = BarCache.from_url(settings.redis_url) if settings.redis_url else None
        app.state.settings = settings
        app.state.limits = Limits.from_settings(settings)
        app.state.responses = (ResponseCache(max_bytes=settings.api_response_cache_mb << 20)
                               if settings.api_response_cache_mb else None)  # fmt: skip
        app.state.engine = engine
        app.state.bar_store = BarStore(engine)
        app.state.cache = cache
        app.state.ohlcv = OhlcvService(bar_store=app.state.bar_store, cache=cache, outages=OutageStore(engine),
                                       metrics=getattr(app.state, "serving_metrics", None))  # fmt: skip
        instruments = InstrumentStore(engine)
        listing = make_listing(settings)
        app.state.instruments = instruments
        app.state.untrack = request_untrack(settings, instruments, bus)
        app.state.on_demand = OnDemand(
            request_fetch=request_fetch(settings, instruments, bus),
            service=app.state.ohlcv,
            tracked=lambda: instruments.list_ids(tracked_only=True),
            unknown=listing.unknown,  # nothing is tracked before the source says it knows the instrument
            registered=instruments.is_registered,  # ... unless the platform registered it already
            max_tracks_per_requester=settings.api_max_tracks_per_key,
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
        docs_url=None,  # /docs and /redoc: api/web.py, with their assets served locally
        redoc_url=None,
    )
    install_security(app, settings)  # refuses to start exposed beyond loopback without a key
    install_metrics(app)  # outermost: times refused requests too
    install_database_errors(app)  # PostgreSQL down: JSON 503 + Retry-After, not a 500 and a traceback
    for router in (health.router, ohlcv.router, ohlcv.seed_router, udf.router, stream.router):
        app.include_router(router)
    app.include_router(replays.router)  # replay sessions (issue 9)
    app.include_router(book.router)  # order books (issue 11)
    app.include_router(instruments_routes.router)  # GET /v1/instruments, DELETE /v1/instruments/{id}
    # --- web dashboard (issue 12): the health panel's /v1/status, then `/` and the offline docs
    app.include_router(status_routes.router)
    install_web(app)  # after the routers: its mounts never shadow an API path
    return app


def request_fetch(settings: Settings, instruments: InstrumentStore,
                  bus: Bus | None = None) -> Callable[[str, int | None, int | None], None]:  # fmt: skip
    """`track` (start = end = None) or `fetch [start, end)` for OnDemand, through the coordinator.

    The command goes on `control`: of `bus` when given (the in-process bus shared with the daemons of
    this process), else of Kafka when configured. With neither, a track registers the instrument
    tracked in the database (the coordinator of `stream all` picks it up), and a range fetch raises:
    no coordinator can be reached. Nothing here migrates: migrations run at start, never in a request.
    """

    def request(instrument: str, start: int | None, end: int | None) -> None:
        from candlekeep.instruments import Instrument

        op = "track" if start is None or end is None else "fetch"
        if bus is None and not settings.kafka_bootstrap_servers:
            if op == "fetch":
                raise RuntimeError("fetching a range needs the coordinator: run `candlekeep up` (API and streaming in "
                                   "one process) or set CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS")  # fmt: skip
            instruments.register([Instrument.parse(instrument)], tracked=True)
            log.info("on-demand track %s: registered as tracked; the coordinator sets it up", instrument)
            return
        _publish(settings, bus, ControlCommand(op, instrument, uuid.uuid4().hex, start, end))

    return request


def request_untrack(settings: Settings, instruments: InstrumentStore, bus: Bus | None = None) -> Callable[[str], None]:
    """`untrack` for DELETE /v1/instruments/{id}: on `control` (of `bus`, else Kafka) for the coordinator;
    with neither, tracked=false at once (the embedded coordinator then tells the producer)."""

    def untrack(instrument: str) -> None:

        if bus is None and not settings.kafka_bootstrap_servers:
            instruments.set_tracked(instrument, False)
            log.info("untrack %s: tracked=false; the coordinator stops its feed", instrument)
            return
        _publish(settings, bus, ControlCommand("untrack", instrument, uuid.uuid4().hex))

    return untrack


def _publish(settings: Settings, bus: Bus | None, cmd: ControlCommand) -> None:
    """One control command on `control` (of `bus`, else a Kafka bus for the call), acknowledged within 5 s."""
    from candlekeep.messages import CONTROL, encode_control
    from candlekeep.messages import topic as topic_name

    own = bus is None
    target = bus or make_bus(settings)
    try:
        control = topic_name(settings.topic_prefix, CONTROL)
        target.ensure_topics([control])
        out = target.producer(name=f"candlekeep-api-{cmd.op}")
        out.publish(control, cmd.instrument, encode_control(cmd))
        if out.flush(5.0) or out.failed:
            raise RuntimeError(f"{cmd.op} {cmd.instrument}: the bus did not acknowledge the command within 5 s")
        log.info("on-demand %s %s [%s, %s): command %s on %s", cmd.op, cmd.instrument, cmd.start, cmd.end,
                 cmd.request_id, control)  # fmt: skip
    finally:
        if own:
            target.close()
