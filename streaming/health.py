"""Daemon state and observability, shared by every daemon: a state machine and a tiny HTTP server.

    registry = CollectorRegistry()                    # one per daemon, never prometheus' global one
    machine = StateMachine("aggregator", {"idle": {"consuming"}, ...}, initial="idle", registry=registry)
    machine.to("consuming", reason="partitions assigned")        # validated, logged, exported
    server = HealthServer(registry, lambda: machine.health(lag=3), port=9101).start()
    ...  GET /health -> JSON (503 while unhealthy), GET /metrics -> Prometheus text
    server.stop()

StateMachine holds a daemon's current state, refuses transitions outside the allowed set
(`InvalidTransition`), logs every transition as one structured line (message with key=value
pairs, and the same fields in `extra=` for JSON log formatters; WARNING into an error state, DEBUG
for the `routine` pairs a daemon makes many times a second, INFO otherwise), and exports the state as a
Prometheus Enum `candlekeep_<daemon>_state` plus `candlekeep_<daemon>_state_transitions_total`
{from_state, to_state} and `candlekeep_<daemon>_state_since_seconds` (unix time of the last change).
Thread-safe; `to()` into the current state is a no-op returning False. `fail(exc, failures=n)` is
the daemons' shared error handling: the first failure enters "error" (reason "<Type>: <message>"),
each further one while still there logs one "<daemon> retry <n> failed" WARNING.

HealthServer serves `/health` from a callable returning a JSON-able mapping (HTTP 503 when its
"healthy" is false) and `/metrics` from the daemon's registry, on a daemon thread
(ThreadingHTTPServer); port 0 picks a free port (`.port` after `start()`).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Enum, Gauge, generate_latest

log = logging.getLogger(__name__)


class InvalidTransition(RuntimeError):
    """A transition the daemon's state machine does not allow."""


def metric_name(daemon: str) -> str:
    return "candlekeep_" + re.sub(r"[^a-zA-Z0-9_]", "_", daemon)


class StateMachine:
    def __init__(
        self,
        daemon: str,
        transitions: Mapping[str, Iterable[str]],
        *,
        initial: str,
        registry: CollectorRegistry,
        error_states: Iterable[str] = ("error",),
        routine: Iterable[tuple[str, str]] = (),
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.daemon = daemon
        self.transitions = {state: frozenset(targets) for state, targets in transitions.items()}
        states = set(self.transitions) | {t for targets in self.transitions.values() for t in targets} | {initial}
        self.states = tuple(sorted(states))
        self.error_states = frozenset(error_states)
        self.routine = frozenset(routine)
        self._log = logger or log
        self._clock = clock
        self._lock = threading.Lock()
        self._state = initial
        self._since = clock()
        self._last: dict[str, Any] | None = None
        prefix = metric_name(daemon)
        self._enum = Enum(f"{prefix}_state", f"Current state of the {daemon}", states=list(self.states),
                          registry=registry)  # fmt: skip
        self._enum.state(initial)
        self._count = Counter(f"{prefix}_state_transitions", f"State transitions of the {daemon}",
                              ["from_state", "to_state"], registry=registry)  # fmt: skip
        self._since_gauge = Gauge(f"{prefix}_state_since_seconds", "Unix time of the last state change",
                                  registry=registry)  # fmt: skip
        self._since_gauge.set(self._since)

    @property
    def state(self) -> str:
        return self._state

    @property
    def since(self) -> float:
        """Unix time the current state was entered."""
        return self._since

    @property
    def last_transition(self) -> dict[str, Any] | None:
        return None if self._last is None else dict(self._last)

    def allowed(self, new: str) -> bool:
        return new in self.transitions.get(self._state, ())

    def to(self, new: str, *, reason: str = "", **fields: Any) -> bool:
        """Enter `new` (True), or stay when already there (False); InvalidTransition otherwise."""
        with self._lock:
            old = self._state
            if new == old:
                return False
            if new not in self.transitions.get(old, ()):
                raise InvalidTransition(f"{self.daemon}: {old} -> {new} is not allowed")
            now = self._clock()
            self._state, self._since = new, now
            self._last = {"from": old, "to": new, "at": _iso(now), "reason": reason, **fields}
            self._enum.state(new)
            self._count.labels(old, new).inc()
            self._since_gauge.set(now)
        pairs = " ".join(f"{k}={v!r}" for k, v in fields.items())
        if new in self.error_states:
            level = logging.WARNING
        elif (old, new) in self.routine:
            level = logging.DEBUG
        else:
            level = logging.INFO
        self._log.log(
            level,
            f"state transition daemon={self.daemon} from={old} to={new} reason={reason!r} {pairs}".rstrip(),
            extra={"daemon": self.daemon, "from_state": old, "to_state": new, "reason": reason,
                   "fields": dict(fields)},
        )  # fmt: skip
        return True

    def fail(self, exc: BaseException, *, failures: int, state: str = "error",
             logger: logging.Logger | None = None) -> str:  # fmt: skip
        """A daemon's failure number `failures` (its own count, kept for its backoff): enter `state`
        with the error as reason, or, when already there, log one retry WARNING (on `logger`,
        default this machine's). Returns the reason, `"<ExceptionType>: <message>"`."""
        reason = f"{type(exc).__name__}: {exc}"
        if not self.to(state, reason=reason):
            (logger or self._log).warning(
                "%s retry %d failed: %s", self.daemon, failures, reason,
                extra={"daemon": self.daemon, "failures": failures, "error": reason},
            )  # fmt: skip
        return reason

    def health(self, **extra: Any) -> dict[str, Any]:
        """The /health body: daemon, state, since, last transition, healthy, and `extra` (lag, ...)."""
        return {
            "daemon": self.daemon,
            "state": self._state,
            "healthy": self._state not in self.error_states,
            "since": _iso(self._since),
            "last_transition": self.last_transition,
            **extra,
        }


class HealthServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        health: Callable[[], Mapping[str, Any]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.registry = registry
        self.health = health
        self.host = host
        self.port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HealthServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/health":
                    try:
                        body_map = dict(outer.health())
                        status = 200 if body_map.get("healthy", True) else 503
                    except Exception as exc:  # a broken probe is itself unhealthy, never a crash
                        body_map, status = {"healthy": False, "error": f"{type(exc).__name__}: {exc}"}, 503
                    self._send(status, "application/json", json.dumps(body_map, default=str).encode())
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(outer.registry))
                else:
                    self._send(404, "text/plain", b"not found: try /health or /metrics\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("health http: " + format, *args)

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def serve(daemon: Any, *, host: str, port: int, cleanup: Iterable[Callable[[], object]] = ()) -> int:
    """Run `daemon.run(stop)` on this (main) thread, /health on `port`, until SIGINT / SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server = None
    if port >= 0:
        server = HealthServer(daemon.registry, daemon.health, host=host, port=port).start()
        log.info("%s /health and /metrics on %s", daemon.state.daemon, server.url)
    try:
        daemon.run(stop)
    finally:
        if server is not None:
            server.stop()
        for step in cleanup:
            step()
    return 0
