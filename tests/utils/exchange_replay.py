"""Loopback replay of recorded exchange sessions into the LIVE connector path.

`ReplayServer(scripts)` is a real WebSocket server on 127.0.0.1 (websockets' threaded server): the
i-th connection runs `scripts[i]` (the last repeats) in its own thread with a `ReplaySession`, which
sends recorded frames byte for byte (`session.send`), records what the client sent
(`session.received`, `session.expect(...)`) and can drop the socket (`session.drop()`). The HTTP
side (REST snapshots) is tests.utils.fixture_server.FixtureServer.

`run_live(connector, until=...)` runs the production `FeedRunner` over those servers in a thread
with its own event loop and returns every record it emitted, once `until(records)` holds (or
raises on timeout). Nothing here parses venue frames: the recordings are sent as recorded.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from candlekeep.sources.exchanges.base import Connector, Record
from candlekeep.sources.exchanges.live import FeedRunner
from candlekeep.sources.exchanges.recording import WsEvent, read_ws
from tests.utils.fixture_server import fixtures_dir

RECORDINGS = "exchanges_ws/cryptofeed"


def recording_path(name: str) -> Any:
    return fixtures_dir() / RECORDINGS / name


def recorded(name: str) -> list[WsEvent]:
    return read_ws(recording_path(name))


def received_frames(events: Sequence[WsEvent]) -> list[str | bytes]:
    return [e.data for e in events if e.kind == "received" and e.data is not None]


class ReplaySession:
    def __init__(self, index: int, conn: ServerConnection) -> None:
        self.index = index
        self.conn = conn
        self.path = conn.request.path if conn.request is not None else ""
        self.received: list[str] = []
        self._inbox: queue.Queue[str | None] = queue.Queue()
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"replay-{index}")
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self.conn:
                text = message if isinstance(message, str) else message.decode()
                self.received.append(text)
                self._inbox.put(text)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._inbox.put(None)

    def send(self, frame: str | bytes) -> None:
        self.conn.send(frame)

    def send_all(self, frames: Sequence[str | bytes]) -> None:
        for frame in frames:
            self.conn.send(frame)

    def expect(self, contains: str, timeout: float = 10.0) -> str:
        """The next client frame containing `contains` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"session {self.index}: no frame with {contains!r} in {timeout} s") from None
            if frame is None:
                raise AssertionError(f"session {self.index}: closed before a frame with {contains!r}")
            if contains in frame:
                return frame

    def drop(self) -> None:
        """Close the TCP connection without a closing handshake."""
        self.conn.close_socket()


Script = Callable[[ReplaySession], None]


class ReplayServer:
    def __init__(self, scripts: Sequence[Script]) -> None:
        self.scripts = list(scripts)
        self.sessions: list[ReplaySession] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.socket.getsockname()[:2]
        return f"ws://{host}:{port}"

    def __enter__(self) -> ReplayServer:
        self._server = serve(self._handle, "127.0.0.1", 0, compression=None, ping_interval=None, max_size=2**25)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="replay-server")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._thread.join(10)
        if self.errors and exc[0] is None:
            raise AssertionError(f"replay script failed: {self.errors[0]!r}") from self.errors[0]

    def _handle(self, conn: ServerConnection) -> None:
        with self._lock:
            session = ReplaySession(len(self.sessions), conn)
            self.sessions.append(session)
        script = self.scripts[min(session.index, len(self.scripts) - 1)]
        try:
            script(session)
        except ConnectionClosed:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported when the test leaves the server
            self.errors.append(exc)
        session.closed.wait()  # silent until the client leaves


def run_live(
    connector: Connector,
    until: Callable[[list[Record]], bool],
    *,
    timeout: float = 30.0,
    **runner_options: Any,
) -> tuple[list[Record], FeedRunner]:
    """Run the production FeedRunner until `until(records)`; the records in emit order."""
    records: list[Record] = []
    lock = threading.Lock()
    done = threading.Event()

    def emit(record: Record) -> None:
        with lock:
            records.append(record)
            if until(records):
                done.set()

    options = {"backoff_min_s": 0.05, "backoff_max_s": 0.2, "heartbeat_every_s": 3600.0,
               "snapshot_rate_per_s": 50.0, "snapshot_burst": 10} | runner_options  # fmt: skip
    runner = FeedRunner(connector, emit, **options)
    loop = asyncio.new_event_loop()
    stop_holder: list[asyncio.Event] = []

    async def main() -> None:
        stop = asyncio.Event()
        stop_holder.append(stop)
        await runner.run(stop)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True, name="feed-runner")
    thread.start()
    finished = done.wait(timeout)
    while not stop_holder:
        time.sleep(0.01)
    loop.call_soon_threadsafe(stop_holder[0].set)
    thread.join(10)
    loop.close()
    with lock:
        result = list(records)
    if not finished:
        raise AssertionError(f"live feed did not reach the expected state in {timeout} s; {len(result)} records")
    return result, runner
