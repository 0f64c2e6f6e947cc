"""The cryptofeed recorder format (../shared/fixtures/exchanges_ws/cryptofeed, PROVENANCE.md): read
recordings to normalize or replay them, write them when capturing.

One line per event, times in unix seconds with the recorder's decimals:

    wss://ws.kraken.com <-> 1618678132.3858151                  a connection opened to this URL
    wss://ws.kraken.com <- 1618678132.8253062: {"event":...}    a frame we sent on it
    1618678132.8258188: {"connectionID":...}                    a frame received (text)
    1618678070.733454: b'\\x1f\\x8b...'                          a binary frame (HTX: gzip), a Python bytes literal
    https://api.binance.com/api/v3/depth?... -> 1633998512.3: {...}   a REST response body (the *.http.* files)

Times are parsed as exact decimals (`received_ns` integers, no float). Blank lines are skipped; any
other line that matches none of these is an error naming its line number.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Literal

from candlekeep.bars import NS_PER_S

_OPEN = re.compile(r"^(?P<url>\S+) <-> (?P<ts>\d+(?:\.\d+)?)$")
_SENT = re.compile(r"^(?P<url>\S+) <- (?P<ts>\d+(?:\.\d+)?): (?P<data>.*)$")
_RECEIVED = re.compile(r"^(?P<ts>\d+(?:\.\d+)?): (?P<data>.*)$")
_HTTP = re.compile(r"^(?P<url>\S+) -> (?P<ts>\d+(?:\.\d+)?): (?P<data>.*)$")


class RecordingError(ValueError):
    """A line of a recording that is not in the recorder format."""


@dataclass(frozen=True, slots=True)
class WsEvent:
    kind: Literal["open", "sent", "received"]
    received_ns: int
    url: str | None  # for open and sent
    data: str | bytes | None  # None for open


@dataclass(frozen=True, slots=True)
class HttpResponse:
    url: str
    received_ns: int
    body: str


def _ns(text: str) -> int:
    return int(Decimal(text) * NS_PER_S)


def _ns_text(received_ns: int) -> str:
    whole, frac = divmod(received_ns, NS_PER_S)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".")


def _frame(text: str, where: str) -> str | bytes:
    if text.startswith(("b'", 'b"')):
        try:
            value = ast.literal_eval(text)
        except (SyntaxError, ValueError) as exc:
            raise RecordingError(f"{where}: bad bytes literal: {exc}") from None
        if not isinstance(value, bytes):
            raise RecordingError(f"{where}: not a bytes literal")
        return value
    return text


def parse_ws_lines(lines: Iterator[str] | list[str], name: str = "recording") -> Iterator[WsEvent]:
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        where = f"{name}:{number}"
        if m := _RECEIVED.match(line):
            yield WsEvent("received", _ns(m["ts"]), None, _frame(m["data"], where))
        elif m := _SENT.match(line):
            yield WsEvent("sent", _ns(m["ts"]), m["url"], _frame(m["data"], where))
        elif m := _OPEN.match(line):
            yield WsEvent("open", _ns(m["ts"]), m["url"], None)
        else:
            raise RecordingError(f"{where}: not a recorder line: {line[:80]!r}")


def read_ws(path: str | Path) -> list[WsEvent]:
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        return list(parse_ws_lines(f, path.name))


def read_http(path: str | Path) -> list[HttpResponse]:
    """The REST responses of a recording (`<url> -> <ts>: <body>`), in order. Other lines (the
    listing files' `configuration:` line) are skipped."""
    path = Path(path)
    out: list[HttpResponse] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if m := _HTTP.match(line.rstrip("\r\n")):
                out.append(HttpResponse(m["url"], _ns(m["ts"]), m["data"]))
    return out


class RecordingWriter:
    """Writes the recorder format (`feeds capture`): one line per event, flushed per line so a
    killed capture keeps everything up to its last frame."""

    def __init__(self, ws: IO[str], http: IO[str] | None = None) -> None:
        self._ws = ws
        self._http = http

    def _line(self, out: IO[str], text: str) -> None:
        if "\n" in text or "\r" in text:
            raise RecordingError("a recorded frame cannot contain a line break")
        out.write(text + "\n")
        out.flush()

    def opened(self, url: str, received_ns: int) -> None:
        self._line(self._ws, f"{url} <-> {_ns_text(received_ns)}")

    def sent(self, url: str, received_ns: int, frame: str) -> None:
        self._line(self._ws, f"{url} <- {_ns_text(received_ns)}: {frame}")

    def received(self, received_ns: int, frame: str | bytes) -> None:
        text = repr(frame) if isinstance(frame, bytes) else frame
        self._line(self._ws, f"{_ns_text(received_ns)}: {text}")

    def http(self, url: str, received_ns: int, body: str) -> None:
        self._line(self._http or self._ws, f"{url} -> {_ns_text(received_ns)}: {body}")
