"""A loopback CryptoCompare streamer v2 for tests: a real WebSocket server on 127.0.0.1:<free port>.

Runs `websockets`' threaded server (a test dependency: `pip install websockets`) for one test. Each
accepted connection runs a script, `script(session)`, in its own handler thread: connection i runs
`scripts[i]` (the last script repeats). A session speaks the documented frame types: the real recorded
welcome (TYPE 20, ../shared/fixtures/cryptocompare/streamer_v2), SUBSCRIBECOMPLETE (16), LOADCOMPLETE (3),
trades (TYPE "0"), HEARTBEAT (999), error frames (401 / 429 / 500) and a forced disconnect; it records
every frame the client sends (`session.received`) and can wait for one (`session.expect("SubAdd")`).
When a script returns with the connection still open, the server stays silent (no heartbeats) until
the client leaves: that is how heartbeat silence is tested.

Frame shapes: 20, 16, 3, 17, 999 and 401 are the official docs' examples; 500 INVALID_SUB and
SUBSCRIPTION_UNRECOGNIZED follow frames quoted in public client code ({"TYPE":"500","MESSAGE":...,
"PARAMETER":"<sub>","INFO":...}); no recorded 429 or 500 FORCE_DISCONNECT frame exists in the
fixtures, so those use the same TYPE/MESSAGE/INFO shape. A trade's fields are the ones of the real
console dump (TYPE, M, FSYM, TSYM, F, ID, TS, Q, P, TOTAL, RTS, CCSEQ, TSNS, RTSNS).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from tests.utils.fixture_server import fixture_bytes

WELCOME_FIXTURE = "cryptocompare/streamer_v2/welcome_type20_tradingview_tutorial.json"
DOC_EXAMPLES = "cryptocompare/streamer_v2/control_messages_official_docs_examples.jsonl"


def doc_example(frame_type: str) -> bytes:
    """The official docs' example frame of `frame_type`, byte for byte."""
    for line in fixture_bytes(DOC_EXAMPLES).splitlines():
        if json.loads(line)["TYPE"] == frame_type:
            return line
    raise KeyError(frame_type)


def trade_frame(
    *, market: str, fsym: str, tsym: str, flags: int | str, trade_id: int | str, ts: int, q: str, p: str,
    tsns: int | None = None, rts: int | None = None, rtsns: int | None = None, ccseq: int | None = None,
) -> str:
    """A TYPE "0" frame as JSON text. `q` / `p` are decimal strings written as JSON numbers, digit
    for digit (TOTAL = Q * P, as the docs define it); optional fields are left out when None."""
    total = Decimal(q) * Decimal(p)
    parts = [
        '"TYPE":"0"', f'"M":{json.dumps(market)}', f'"FSYM":{json.dumps(fsym)}', f'"TSYM":{json.dumps(tsym)}',
        f'"F":{json.dumps(str(flags))}', f'"ID":{json.dumps(str(trade_id))}', f'"TS":{ts}', f'"Q":{q}', f'"P":{p}',
        f'"TOTAL":{total}',
    ]  # fmt: skip
    for name, value in (("RTS", rts), ("CCSEQ", ccseq), ("TSNS", tsns), ("RTSNS", rtsns)):
        if value is not None:
            parts.append(f'"{name}":{value}')
    return "{" + ",".join(parts) + "}"


class StreamerSession:
    """One client connection, driven by a script."""

    def __init__(self, index: int, conn: ServerConnection) -> None:
        self.index = index
        self.conn = conn
        request = conn.request
        self.path = request.path if request is not None else ""
        self.query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        self.received: list[dict[str, Any]] = []
        self.connected_at = time.monotonic()
        self.closed_at: float | None = None
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"ws-session-{index}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self.conn:
                frame = json.loads(message)
                self.received.append(frame)
                self._inbox.put(frame)
        except ConnectionClosed:
            pass
        finally:
            self.closed_at = time.monotonic()
            self._inbox.put(None)

    # -- what the server sends --------------------------------------------------------------------

    def send(self, frame: str | bytes | dict[str, Any]) -> None:
        if isinstance(frame, dict):
            frame = json.dumps(frame)
        self.conn.send(frame.decode() if isinstance(frame, bytes) else frame)

    def welcome(self) -> None:
        self.send(fixture_bytes(WELCOME_FIXTURE).strip())

    def subscribe_complete(self, sub: str) -> None:
        self.send(doc_example("16").replace(b'"0~Coinbase~ETH~BTC"', json.dumps(sub).encode()))

    def load_complete(self) -> None:
        self.send(doc_example("3"))

    def heartbeat(self) -> None:
        self.send(doc_example("999").replace(b"1582817678330", str(time.time_ns() // 1_000_000).encode()))

    def trade(self, frame: str) -> None:
        self.send(frame)

    def unauthorized(self) -> None:
        self.send(doc_example("401"))

    def rate_limited(self, message: str = "TOO_MANY_SOCKETS_MAX_1_PER_CLIENT") -> None:
        self.send({"TYPE": "429", "MESSAGE": message, "INFO": "Too many sockets open for this api_key."})

    def invalid_sub(self, sub: str) -> None:
        self.send({
            "TYPE": "500", "MESSAGE": "INVALID_SUB", "PARAMETER": sub,
            "INFO": "We have not integrated any of the exchanges trades on or we have not currently mapped it.",
        })  # fmt: skip

    def unrecognized_sub(self, sub: str) -> None:
        self.send({
            "TYPE": "500", "MESSAGE": "SUBSCRIPTION_UNRECOGNIZED", "PARAMETER": sub,
            "INFO": "You are not receiving updates on this subscription.",
        })  # fmt: skip

    def force_disconnect(self) -> None:
        """The server's FORCE_DISCONNECT frame, then it closes the socket."""
        self.send({"TYPE": "500", "MESSAGE": "FORCE_DISCONNECT", "INFO": "Disconnected by the server."})
        self.drop()

    def drop(self) -> None:
        """Close the TCP connection without a closing handshake."""
        self.conn.close_socket()

    # -- what the client sent ---------------------------------------------------------------------

    def expect(self, action: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next client frame with this `action` (frames with other actions are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"session {self.index}: no {action} within {timeout} s") from None
            if frame is None:
                raise AssertionError(f"session {self.index}: closed before {action}")
            if frame.get("action") == action:
                return frame

    def wait_closed(self, timeout: float | None = 5.0) -> bool:
        self._reader.join(timeout)
        return not self._reader.is_alive()


Script = Callable[[StreamerSession], None]


class StreamerServer:
    """Serve `scripts` on ws://127.0.0.1:<port>/v2; use as a context manager."""

    def __init__(self, scripts: Sequence[Script]) -> None:
        if not scripts:
            raise ValueError("at least one script")
        self.scripts = list(scripts)
        self.sessions: list[StreamerSession] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.socket.getsockname()[:2]
        return f"ws://{host}:{port}/v2"

    def __enter__(self) -> StreamerServer:
        self._server = serve(self._handle, "127.0.0.1", 0, compression=None, ping_interval=None)
        self._thread = threading.Thread(target=self._server.serve_forever, name="ws-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._thread.join(10)
        if self.errors and exc[0] is None:
            raise AssertionError(f"server script failed: {self.errors[0]!r}") from self.errors[0]

    def _handle(self, conn: ServerConnection) -> None:
        with self._lock:
            session = StreamerSession(len(self.sessions), conn)
            self.sessions.append(session)
            self._changed.notify_all()
        script = self.scripts[min(session.index, len(self.scripts) - 1)]
        try:
            script(session)
        except ConnectionClosed:
            pass  # the client left while the script was talking
        except BaseException as exc:  # noqa: BLE001 - reported when the test leaves the server
            self.errors.append(exc)
        session.wait_closed(timeout=None)  # silent until the client leaves (or the server shuts down)

    def wait_for_sessions(self, count: int, timeout: float = 10.0) -> list[StreamerSession]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.sessions) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.sessions)} connections, expected {count} within {timeout} s")
                self._changed.wait(left)
            return list(self.sessions)
