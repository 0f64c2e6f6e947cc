"""`GET /v1/instruments` (what is registered, and whether it is tracked) and `DELETE /v1/instruments/{id}`
(untrack: the live feed stops and the Dagster partition goes; stored bars stay).

Untrack goes through `app.state.untrack` (api.main.request_untrack): an `untrack` command on
`control` when a bus reaches the coordinator (Kafka, or the in-process bus of `candlekeep up`), which
sets tracked=false; without one, tracked=false at once and the embedded coordinator tells the producer. DELETE needs a key, or a loopback caller when no key is configured
(api.security marks those `trusted`).
"""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Path, Request
from pydantic import BaseModel, Field

from candlekeep.instruments import InstrumentError, resolve_instrument
from candlekeep.storage.instruments import InstrumentStore

router = APIRouter(prefix="/v1", tags=["instruments"])


class InstrumentPublic(BaseModel):
    id: str = Field(examples=["cccagg:BTC-USD"])
    tracked: bool = Field(description="true while the live feed and hourly refreshes run for it")


class InstrumentsPublic(BaseModel):
    instruments: list[InstrumentPublic]


@router.get("/instruments", response_model=InstrumentsPublic, summary="Registered instruments")
async def list_instruments(request: Request) -> InstrumentsPublic:
    store: InstrumentStore = request.app.state.instruments
    rows = await anyio.to_thread.run_sync(store.tracked_flags)
    return InstrumentsPublic(instruments=[InstrumentPublic(id=i, tracked=t) for i, t in rows])


@router.delete(
    "/instruments/{instrument}",
    response_model=InstrumentPublic,
    summary="Stop tracking an instrument (its stored bars stay)",
    responses={403: {"description": "needs an API key (or a loopback caller when no key is configured)"},
               404: {"description": "no such instrument is registered"},
               422: {"description": "not an instrument id"}},
)  # fmt: skip
async def untrack(request: Request, instrument: Annotated[str, Path(examples=["coinbase:ETH-USD"])]) -> InstrumentPublic:
    if not request.scope.get("state", {}).get("trusted", False):
        raise HTTPException(403, "untracking needs an API key (X-API-Key or Authorization: Bearer)")
    try:
        resolved = resolve_instrument(instrument)
    except InstrumentError as exc:
        raise HTTPException(422, str(exc)) from None
    store: InstrumentStore = request.app.state.instruments
    known = dict(await anyio.to_thread.run_sync(store.tracked_flags))
    if resolved.id not in known:
        raise HTTPException(404, f"{resolved.id} is not registered")
    await anyio.to_thread.run_sync(request.app.state.untrack, resolved.id)
    return InstrumentPublic(id=resolved.id, tracked=False)
