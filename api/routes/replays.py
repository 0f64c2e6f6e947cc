"""`/v1/replays`: replay sessions over stored history (create, start, pause, resume, stop, seek, speed).

The routes are glue around candlekeep.storage.replay_sessions (the rules are candlekeep/replay.py);
the replayer daemon (streaming/replayer.py) follows the rows and publishes each running session to
`replay.<id>.ticks` / `.bars`. Every verb answers the session as it is afterwards.

Errors: 404 unknown session; 409 a verb the session's state does not allow (the detail names the
state and the states it is allowed from); 422 bad input (an instrument, a time, a range with no
stored ticks or bars, a speed that is not a positive number or "max", a seek outside the range);
429 the cap on active sessions (`CANDLEKEEP_REPLAY_MAX_SESSIONS`) is reached.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Request
from pydantic import BaseModel, Field

from api.deps import EngineDep, SettingsDep
from candlekeep.bars import NS_PER_S
from candlekeep.instruments import InstrumentError, resolve_instrument
from candlekeep.messages import replay_topic
from candlekeep.replay import TransitionNotAllowed, iso_ns, parse_speed, parse_time_ns
from candlekeep.storage.replay_sessions import (
    NoStoredData,
    ReplaySessionStore,
    SessionNotFound,
    SessionRow,
    TooManySessions,
)

router = APIRouter(prefix="/v1/replays", tags=["replays"])

Speed = float | Literal["max"]


class ReplayCreate(BaseModel):
    instruments: list[str] | str = Field(description="one or more instruments (`venue:BASE-QUOTE`, or `BTC-USD`)",
                                         examples=[["binance:BTC-USDT", "binance:ETH-USDT"]])  # fmt: skip
    start: str | int | float = Field(description="unix seconds or ISO-8601 (UTC unless an offset is given)",
                                     examples=["2024-01-01T00:00:00Z"])  # fmt: skip
    end: str | int | float = Field(description="exclusive; unix seconds or ISO-8601", examples=["2024-01-02"])
    speed: Speed = Field(1.0, description="simulated seconds per wall second, or \"max\"", examples=[10, "max"])


class ReplaySeek(BaseModel):
    time: str | int | float = Field(description="a time inside [start, end): unix seconds or ISO-8601")


class ReplaySpeed(BaseModel):
    speed: Speed = Field(description="a positive number, or \"max\"", examples=[60])


class ReplayPosition(BaseModel):
    messages_sent: int = Field(description="records published, repeats after a restart or seek included")
    trades_sent: int = Field(description="trades of the range up to the position")
    trades_total: int = Field(description="stored trades in the range")
    bars_total: int = Field(description="stored bars of bars-only instruments in the range")
    at_ns: int = Field(description="event time of the last record delivered (durably), unix ns")
    at: str


class ReplayPublic(BaseModel):
    id: str
    state: str = Field(examples=["created", "running", "paused", "stopped", "finished", "error"])
    instruments: list[str]
    bar_instruments: list[str] = Field(description="replayed from stored bars (no ticks in the range)")
    start: str
    end: str
    start_ns: int
    end_ns: int
    speed: Speed
    clock_ns: int = Field(description="the replay clock now, unix ns (held while not running)")
    clock: str
    position: ReplayPosition
    percent: float = Field(description="percent of the range delivered")
    messages_per_s: float
    error: str | None
    topics: dict[str, str] = Field(description="the Kafka topics of the session's output")
    symbols: list[str] = Field(description="the session's instruments as API / UDF symbols")

    @classmethod
    def of(cls, row: SessionRow, prefix: str, wall_ns: int) -> ReplayPublic:
        clock = row.clock_at(wall_ns)
        return cls(
            id=row.id, state=str(row.state), instruments=row.instruments, bar_instruments=row.bar_instruments,
            start=iso_ns(row.start_ns), end=iso_ns(row.end_ns), start_ns=row.start_ns, end_ns=row.end_ns,
            speed="max" if row.speed is None else row.speed, clock_ns=clock, clock=iso_ns(clock),
            position=ReplayPosition(messages_sent=row.messages_sent, trades_sent=row.trades_sent,
                                    trades_total=row.trades_total, bars_total=row.bars_total,
                                    at_ns=row.position.ts_ns, at=iso_ns(row.position.ts_ns)),
            percent=round(row.percent, 3), messages_per_s=round(row.rate, 1), error=row.error,
            topics={"ticks": replay_topic(prefix, row.id, "ticks"), "bars": replay_topic(prefix, row.id, "bars")},
            symbols=[f"replay:{row.id}:{i}" for i in row.instruments],
        )  # fmt: skip


class ReplayList(BaseModel):
    sessions: list[ReplayPublic]


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no session with this id"},
    409: {"description": "the session's state does not allow this"},
    422: {"description": "invalid instrument, time, range (no stored data), speed or seek time"},
}


def _store(engine: Any) -> ReplaySessionStore:
    return ReplaySessionStore(engine)


def _call(fn: Any, *args: Any, **kw: Any) -> SessionRow:
    try:
        return fn(*args, **kw)
    except SessionNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except TransitionNotAllowed as exc:
        raise HTTPException(409, str(exc)) from None
    except TooManySessions as exc:
        raise HTTPException(429, str(exc)) from None
    except (NoStoredData, InstrumentError, ValueError) as exc:
        raise HTTPException(422, str(exc)) from None


def _speed(value: Speed) -> float | None:
    try:
        return parse_speed(value)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def _time(value: str | int | float, name: str) -> int:
    try:
        return parse_time_ns(value, name=name)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


@router.post("", status_code=201, response_model=ReplayPublic, summary="create a replay session",
             responses={**_ERRORS, 429: {"description": "too many active sessions"}})  # fmt: skip
def create_replay(request: Request, engine: EngineDep, settings: SettingsDep, body: ReplayCreate) -> ReplayPublic:
    names = [body.instruments] if isinstance(body.instruments, str) else body.instruments
    try:
        instruments = [resolve_instrument(n).id for n in names]
    except InstrumentError as exc:
        raise HTTPException(422, str(exc)) from None
    start, end = _time(body.start, "start"), _time(body.end, "end")
    if end <= start:
        raise HTTPException(422, f"end ({iso_ns(end)}) must be after start ({iso_ns(start)})")
    row = _call(_store(engine).create, instruments=instruments, start_ns=start, end_ns=end, speed=_speed(body.speed),
                lateness_ns=round(settings.replay_lateness_s * NS_PER_S), max_active=settings.replay_max_sessions,
                wall_ns=time.time_ns())  # fmt: skip
    return ReplayPublic.of(row, settings.topic_prefix, time.time_ns())


@router.get("", response_model=ReplayList, summary="every replay session, oldest first")
def list_replays(engine: EngineDep, settings: SettingsDep) -> ReplayList:
    now = time.time_ns()
    return ReplayList(sessions=[ReplayPublic.of(r, settings.topic_prefix, now) for r in _store(engine).list()])


@router.get("/{session_id}", response_model=ReplayPublic, summary="one replay session", responses=_ERRORS)
def get_replay(session_id: str, engine: EngineDep, settings: SettingsDep) -> ReplayPublic:
    return ReplayPublic.of(_call(_store(engine).get, session_id), settings.topic_prefix, time.time_ns())


def _verb(action: str) -> Any:
    def handler(session_id: str, engine: EngineDep, settings: SettingsDep) -> ReplayPublic:
        row = _call(_store(engine).act, session_id, action, wall_ns=time.time_ns())
        return ReplayPublic.of(row, settings.topic_prefix, time.time_ns())

    handler.__name__ = f"{action}_replay"
    return handler


for _action, _summary in (("start", "start a created session"), ("pause", "pause: the clock holds"),
                          ("resume", "resume from the held clock (or retry a session in error)"),
                          ("stop", "stop for good")):  # fmt: skip
    router.add_api_route(f"/{{session_id}}/{_action}", _verb(_action), methods=["POST"], response_model=ReplayPublic,
                         summary=_summary, responses=_ERRORS)  # fmt: skip


@router.post("/{session_id}/seek", response_model=ReplayPublic, summary="continue from a time inside the range",
             responses=_ERRORS)  # fmt: skip
def seek_replay(session_id: str, engine: EngineDep, settings: SettingsDep,
                body: Annotated[ReplaySeek, Body()]) -> ReplayPublic:  # fmt: skip
    row = _call(_store(engine).seek, session_id, _time(body.time, "time"), wall_ns=time.time_ns())
    return ReplayPublic.of(row, settings.topic_prefix, time.time_ns())


@router.patch("/{session_id}", response_model=ReplayPublic, summary="change the speed (also while running)",
              responses=_ERRORS)  # fmt: skip
def patch_replay(session_id: str, engine: EngineDep, settings: SettingsDep,
                 body: Annotated[ReplaySpeed, Body()]) -> ReplayPublic:  # fmt: skip
    row = _call(_store(engine).set_speed, session_id, _speed(body.speed), wall_ns=time.time_ns())
    return ReplayPublic.of(row, settings.topic_prefix, time.time_ns())
