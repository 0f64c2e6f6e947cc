"""The FastAPI application. Run: `uvicorn --factory api.main:create_app` (or `candlekeep up`).

Nothing connects at import: the engine is built when the app starts and disposed when it stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.routes import health, ohlcv
from candlekeep.settings import Settings
from candlekeep.storage.bars import BarStore
from candlekeep.storage.db import create_engine, resolve_database_url


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(resolve_database_url(settings))
        app.state.settings = settings
        app.state.engine = engine
        app.state.bar_store = BarStore(engine)
        yield
        engine.dispose()

    app = FastAPI(
        title="Candlekeep",
        summary="Crypto OHLCV candles: backfilled history, exact decimals, gaps reported.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.include_router(health.router)
    app.include_router(ohlcv.router)
    return app
