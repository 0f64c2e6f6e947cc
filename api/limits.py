"""What keeps one client, or one kind of request, from taking the server: caps on waiting and large
requests, a database outage answered as 503, and CSV exports that let go of their connection.

    app.state.limits = Limits.from_settings(settings)
    async with limits.waiting(identity):     # TooBusy (429 per key, 503 in total) beyond the caps
        ...
    async with limits.large():               # at most `max_large` large answers built at once
        ...
    return CsvResponse(chunks, send_timeout_s=30)
    install_database_errors(app)             # PostgreSQL down or the pool exhausted: JSON 503 + Retry-After

Waiting is evented, never a worker thread asleep (candlekeep.serving.OnDemand.read_async sleeps on
the event loop): a waiting request holds a slot here, nothing else. `identity` is what the security
middleware rate-limits by (`key:<hash>` or `ip:<address>`), from `scope["state"]["identity"]`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import psycopg
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from candlekeep.settings import Settings

log = logging.getLogger(__name__)

DATABASE_RETRY_AFTER_S = 5
BUSY_RETRY_AFTER_S = 2
DATABASE_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError,
                   psycopg.OperationalError, psycopg.InterfaceError)  # fmt: skip


class TooBusy(Exception):
    """A cap is reached: `status` 429 (this client's share) or 503 (the server's), with a detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class Limits:
    max_waits: int
    max_waits_per_key: int
    max_large: int
    large_bars: int
    large_queue_s: float = 10.0
    _waits: dict[str, int] = field(default_factory=dict)
    _waiting: int = 0
    _large: anyio.Semaphore | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(max_waits=settings.api_max_waits, max_waits_per_key=settings.api_max_waits_per_key,
                   max_large=settings.api_max_large_requests, large_bars=settings.api_large_request_bars)  # fmt: skip

    @property
    def waiting_now(self) -> int:
        return self._waiting

    @asynccontextmanager
    async def waiting(self, identity: str) -> AsyncIterator[None]:
        """A wait slot for `identity` (event-loop only: no lock needed)."""
        mine = self._waits.get(identity, 0)
        if mine >= self.max_waits_per_key:
            raise TooBusy(429, f"too many waiting requests: at most {self.max_waits_per_key} per API key (or client "
                               "address) wait for data at once (CANDLEKEEP_API_MAX_WAITS_PER_KEY); retry with wait=0 "
                               "or later")  # fmt: skip
        if self._waiting >= self.max_waits:
            raise TooBusy(503, f"too many waiting requests: the server holds at most {self.max_waits} at once "
                               "(CANDLEKEEP_API_MAX_WAITS); retry with wait=0 or later")  # fmt: skip
        self._waits[identity] = mine + 1
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1
            left = self._waits[identity] - 1
            if left:
                self._waits[identity] = left
            else:
                del self._waits[identity]

    @asynccontextmanager
    async def large(self) -> AsyncIterator[None]:
        """One of `max_large` slots for a large answer (over `large_bars` bars, or a CSV export);
        queued up to `large_queue_s`, then TooBusy(503)."""
        release = await self.acquire_large()
        try:
            yield
        finally:
            release()

    async def acquire_large(self) -> Callable[[], None]:
        """`large()` for a holder that outlives the route (a streamed export): returns the release."""
        if self._large is None:
            self._large = anyio.Semaphore(self.max_large)
        try:
            with anyio.fail_after(self.large_queue_s):
                await self._large.acquire()
        except TimeoutError:
            raise TooBusy(503, f"too many large requests: at most {self.max_large} CSV exports or answers over "
                               f"{self.large_bars} bars at once (CANDLEKEEP_API_MAX_LARGE_REQUESTS); retry later") from None  # fmt: skip
        semaphore, released = self._large, [False]

        def release() -> None:
            if not released[0]:
                released[0] = True
                semaphore.release()

        return release


def identity_of(request: Request) -> str:
    return request.scope.get("state", {}).get("identity", "ip:unknown")


# --- errors -------------------------------------------------------------------------------------------


def install_database_errors(app: FastAPI) -> None:
    """PostgreSQL unreachable (or the pool exhausted): JSON 503 with Retry-After, one log line a second at most."""
    last = [0.0]
    lock = threading.Lock()

    async def database_down(request: Request, exc: Exception) -> JSONResponse:
        with lock:
            if time.monotonic() - last[0] >= 1.0:
                last[0] = time.monotonic()
                log.warning("database unavailable for %s: %s", request.url.path, _first_line(exc))
        return JSONResponse({"detail": "the database is unavailable; retry later"}, status_code=503,
                            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})  # fmt: skip

    async def too_busy(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TooBusy)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status,
                            headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})  # fmt: skip

    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, database_down)
    app.add_exception_handler(TooBusy, too_busy)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


# --- CSV ----------------------------------------------------------------------------------------------


class CsvResponse(Response):
    """A chunked text/csv answer from a blocking iterator (a COPY), that never holds its connection longer
    than the client reads and never ends cleanly unless every row was sent.

    - Each chunk is pulled in a worker thread, and sent within `send_timeout_s` (a stalled client is
      dropped); a disconnect, a stall or an error closes the iterator at once, in a thread (the COPY is
      cancelled and its connection goes back to the pool).
    - The first chunks are pulled by `prime()` before any header is sent, so a database that is down
      becomes a JSON 503 instead of a 200 with a header line and nothing after it.
    - An error mid-stream returns without the final empty chunk: the server closes the connection,
      and no HTTP client reads the truncated body as complete.
    """

    media_type = "text/csv; charset=utf-8"

    def __init__(self, chunks: Iterator[bytes], *, headers: dict[str, str], send_timeout_s: float,
                 release: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.status_code, self.background = 200, None
        self.init_headers(headers)  # with the content type; no content-length: chunked
        self.chunks, self.send_timeout_s, self.release = chunks, send_timeout_s, release
        self._primed: list[bytes] = []

    async def prime(self, n: int = 2) -> None:
        """Pull the first `n` chunks now (the header line and the COPY's first); errors propagate."""
        try:
            for _ in range(n):
                chunk = await anyio.to_thread.run_sync(next, self.chunks, None)
                if chunk is None:
                    break
                self._primed.append(chunk)
        except BaseException:
            await self._close()
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = self.raw_headers
        disconnected = anyio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        complete = False
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch)
                try:
                    await self._send(send, {"type": "http.response.start", "status": 200, "headers": headers})
                    for chunk in self._primed:
                        await self._send(send, {"type": "http.response.body", "body": chunk, "more_body": True})
                    self._primed.clear()
                    while not disconnected.is_set():
                        chunk = await anyio.to_thread.run_sync(next, self.chunks, None)
                        if chunk is None:
                            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
                            complete = True
                            break
                        await self._send(send, {"type": "http.response.body", "body": chunk, "more_body": True})
                except TimeoutError:
                    log.warning("CSV export %s: the client read nothing for %.0f s; dropped", scope.get("path"),
                                self.send_timeout_s)  # fmt: skip
                except OSError as exc:  # the client went away
                    log.info("CSV export %s: client gone (%s)", scope.get("path"), exc)
                except Exception as exc:  # the database failed mid-stream: abort, never a clean end
                    log.warning("CSV export %s aborted mid-stream: %s", scope.get("path"), _first_line(exc))
                finally:
                    group.cancel_scope.cancel()
        finally:
            await self._close()
        if not complete:
            log.debug("CSV export %s: response left incomplete on purpose", scope.get("path"))

    async def _send(self, send: Send, message: dict) -> None:
        with anyio.fail_after(self.send_timeout_s):
            await send(message)

    async def _close(self) -> None:
        close = getattr(self.chunks, "close", None)
        try:
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(close)
        finally:
            self.release()
