"""A WebSocket feed served until it ends or its client goes (`WS /v1/stream`, `WS /v1/book/stream`).

A feed only sends: on its own it would notice a client that left only at its next send, so a quiet
channel (a stopped replay session publishes nothing again) would hold its subscription, its Redis
connection and uvicorn's graceful shutdown for ever. A second task reads the socket and sees the
client go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import anyio
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect

log = logging.getLogger(__name__)


async def serve_until_disconnect(websocket: WebSocket, feed: Coroutine[Any, Any, None], what: str) -> None:
    """Run `feed` until it ends or the client goes, whichever is first; then the other is cancelled.
    A feed that fails is logged (as `what`) and its socket closed with 1011."""
    watcher = asyncio.create_task(until_disconnect(websocket))
    runner = asyncio.create_task(feed)
    try:
        done, _ = await asyncio.wait({watcher, runner}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done and not watcher.done():  # the feed ended first: it failed, or it closed the socket itself
            failed = (exc := runner.exception()) is not None and not isinstance(exc, WebSocketDisconnect)
            if failed:
                log.error("%s failed", what, exc_info=exc)
            with contextlib.suppress(Exception):  # already closed (a feed that refused its parameters): nothing to do
                await websocket.close(code=1011 if failed else 1000)
    finally:
        for task in (watcher, runner):
            task.cancel()
        # Shielded: the server's cancellation must not land inside redis-py's connection teardown
        # (which swallows CancelledError and would leave the task's cancel count inconsistent).
        with anyio.CancelScope(shield=True):
            await asyncio.wait({watcher, runner}, timeout=5)


async def until_disconnect(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass  # clients have nothing to say; their frames are ignored
