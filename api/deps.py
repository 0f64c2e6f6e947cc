"""Typed dependencies for routes: the settings, the engine, the stores and the OHLCV service, built once per app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine

from candlekeep.serving import OhlcvService
from candlekeep.settings import Settings
from candlekeep.storage.bars import BarStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_bar_store(request: Request) -> BarStore:
    return request.app.state.bar_store


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
BarStoreDep = Annotated[BarStore, Depends(get_bar_store)]


def get_ohlcv_service(request: Request) -> OhlcvService:
    return request.app.state.ohlcv


OhlcvDep = Annotated[OhlcvService, Depends(get_ohlcv_service)]
