"""A loopback HTTP server that answers with recorded CryptoCompare bodies (../shared/fixtures).

Runs a threaded `http.server` on 127.0.0.1 (a free port) for one test. Routes are matched by path
and a subset of the query; each route answers a script of replies in order (the last one repeats),
or a handler computes the reply. Every request received is recorded (path, query, headers).

`PagedHistory` turns the real 1441-bar histominute recording into a paged v2 endpoint: it slices
by `limit` / `toTs` the way CryptoCompare does (limit+1 bars ending at toTs) and wraps the
recorded bar objects, byte for byte, in the v2 envelope.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml


def fixtures_dir() -> Path:
    """`../shared/fixtures` next to the repository, or `CANDLEKEEP_FIXTURES_DIR`."""
    if override := os.environ.get("CANDLEKEEP_FIXTURES_DIR"):
        return Path(override)
    return Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"


def fixture_bytes(relative: str) -> bytes:
    return (fixtures_dir() / relative).read_bytes()


def cassette_interactions(relative: str) -> list[dict[str, Any]]:
    """The interactions of a VCR cassette (Ruby VCR `http_interactions` or vcrpy `interactions`)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with (fixtures_dir() / relative).open("rb") as f:
        cassette = yaml.load(f, Loader=loader)
    return cassette.get("interactions") or cassette["http_interactions"]


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (to provoke client timeouts)

    @classmethod
    def fixture(cls, relative: str, status: int = 200, **kwargs: Any) -> Reply:
        return cls(status, fixture_bytes(relative), **kwargs)

    @classmethod
    def json(cls, body: str | bytes, status: int = 200, **kwargs: Any) -> Reply:
        return cls(status, body.encode() if isinstance(body, str) else body, **kwargs)


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased


Handler = Callable[[Received], Reply]


@dataclass
class _Route:
    path: str
    query: Mapping[str, str]
    script: list[Reply] | None = None
    handler: Handler | None = None

    def matches(self, request: Received) -> bool:
        return request.path == self.path and all(request.query.get(k) == str(v) for k, v in self.query.items())

    def reply(self, request: Received) -> Reply:
        if self.handler is not None:
            return self.handler(request)
        assert self.script
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


class FixtureServer:
    def __init__(self) -> None:
        self._routes: list[_Route] = []
        self._received: list[Received] = []
        self._lock = threading.Lock()
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                split = urlsplit(self.path)
                request = Received(
                    "GET",
                    split.path,
                    dict(parse_qsl(split.query, keep_blank_values=True)),
                    {k.lower(): v for k, v in self.headers.items()},
                )
                reply = server._answer(request)
                if reply.delay:
                    time.sleep(reply.delay)
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(reply.body)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        # A short poll keeps shutdown (once per test) from costing serve_forever's default 0.5 s.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, name="fixture-server", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def add(self, path: str, *replies: Reply, query: Mapping[str, str] | None = None) -> None:
        """Answer `path` (+ query subset) with `replies` in order; the last one repeats."""
        if not replies:
            raise ValueError("a scripted route needs at least one reply")
        with self._lock:
            self._routes.append(_Route(path, dict(query or {}), script=list(replies)))

    def add_handler(self, path: str, handler: Handler, query: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self._routes.append(_Route(path, dict(query or {}), handler=handler))

    def add_cassette(self, relative: str, *, path: str | None = None, match: Sequence[str] | None = None) -> None:
        """Serve each recorded interaction at its own path (or `path`) and recorded query.

        `match` names the query parameters that must equal the recorded ones (default: all of
        them), e.g. leave out `limit` when a smaller limit gets the same recorded rows.
        """
        for interaction in cassette_interactions(relative):
            request, response = interaction["request"], interaction["response"]
            split = urlsplit(request["uri"])
            query = dict(parse_qsl(split.query, keep_blank_values=True))
            if match is not None:
                query = {k: v for k, v in query.items() if k in match}
            body = response["body"]["string"]
            reply = Reply(response["status"]["code"], body.encode() if isinstance(body, str) else body)
            self.add(path or split.path, reply, query=query)

    def _answer(self, request: Received) -> Reply:
        with self._lock:
            self._received.append(request)
            route = next((r for r in self._routes if r.matches(request)), None)
            if route is None:
                return Reply.json(json.dumps({"fixture_server": f"no route for {request.path}"}), status=599)
            if route.handler is None:
                return route.reply(request)
        return route.reply(request)  # handlers run outside the lock

    def __enter__(self) -> FixtureServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


# The bar objects of a legacy histo* body are flat JSON objects: no nested braces.
_BAR_OBJECT = re.compile(r"\{[^{}]*\}")
_TIME = re.compile(r'"time":(\d+)')


class PagedHistory:
    """A v2 histo* endpoint over a recorded v1 body, paging like CryptoCompare.

    `limit=N&toTs=T` answers the N+1 bars ending at the latest bar with `time <= T` (no toTs: the
    newest bar). Before the recording's first bar, CryptoCompare pads with all-zero bars (the pair
    was not listed); `pad_before_listing` emulates that with synthetic zero objects, which are the
    only bytes not taken from the recording.
    """

    def __init__(self, body: bytes | str, interval_s: int, *, pad_before_listing: bool = True) -> None:
        text = body.decode() if isinstance(body, bytes) else body
        data = text[text.index('"Data":[') + len('"Data":[') :]
        data = data[: data.index("]")]
        self.raw_bars = _BAR_OBJECT.findall(data)  # byte-for-byte from the recording
        self.times = [int(_TIME.search(obj)[1]) for obj in self.raw_bars]
        # Bars are looked up by time, so the recording must have no gaps (the real one has none).
        if self.times != list(range(self.times[0], self.times[-1] + 1, interval_s)):
            raise ValueError("recorded bars are not contiguous and ascending")
        self.interval_s = interval_s
        self.pad_before_listing = pad_before_listing

    def __call__(self, request: Received) -> Reply:
        limit = int(request.query.get("limit", 1440))
        to_ts = int(request.query.get("toTs", self.times[-1]))
        last = self._last_at_or_before(to_ts)
        objects: list[str] = []
        times: list[int] = []
        for offset in range(limit, -1, -1):
            t = last - offset * self.interval_s
            if t >= self.times[0]:
                i = (t - self.times[0]) // self.interval_s
                objects.append(self.raw_bars[i])
                times.append(t)
            elif self.pad_before_listing:
                objects.append(_zero_bar(t))
                times.append(t)
        envelope = (
            '{"Response":"Success","Message":"","HasWarning":false,"Type":100,"RateLimit":{},'
            f'"Data":{{"Aggregated":false,"TimeFrom":{times[0] if times else to_ts},'
            f'"TimeTo":{times[-1] if times else to_ts},"Data":[{",".join(objects)}]}}}}'
        )
        return Reply.json(envelope)

    def _last_at_or_before(self, to_ts: int) -> int:
        if to_ts >= self.times[-1]:
            return self.times[-1]
        return to_ts - (to_ts - self.times[0]) % self.interval_s


def _zero_bar(t: int) -> str:
    return (
        f'{{"time":{t},"high":0,"low":0,"open":0,"volumefrom":0,"volumeto":0,"close":0,'
        '"conversionType":"direct","conversionSymbol":""}'
    )
