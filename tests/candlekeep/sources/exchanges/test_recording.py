"""The cryptofeed recorder format: every recording parses, and writing then reading gives it back."""

from __future__ import annotations

import gzip
import io

import pytest

from candlekeep.sources.exchanges.recording import RecordingError, RecordingWriter, parse_ws_lines, read_http, read_ws
from tests.utils.exchange_replay import recording_path
from tests.utils.fixture_server import fixtures_dir

WS_FILES = ["BINANCE.ws.1.0.txt", "BITFINEX.ws.11.0.txt", "BYBIT.ws.25.0.txt", "COINBASE.ws.28.0.txt",
            "GATEIO.ws.1.0.txt", "HUOBI.ws.44.0.txt", "KRAKEN.ws.48.0.txt", "KRAKEN.ws.49.0.txt",
            "KRAKEN.ws.50.0.txt", "KUCOIN.ws.1.0.txt", "OKX.ws.1.0.txt"]  # fmt: skip


def test_the_list_is_every_recording() -> None:
    assert sorted(p.name for p in (fixtures_dir() / "exchanges_ws/cryptofeed").glob("*.ws.*.txt")) == WS_FILES


@pytest.mark.parametrize("name", WS_FILES)
def test_every_recording_parses_and_round_trips(name: str) -> None:
    events = read_ws(recording_path(name))
    assert events[0].kind == "open" and events[0].url and events[0].url.startswith("wss://")
    out = io.StringIO()
    writer = RecordingWriter(out)
    for e in events:
        if e.kind == "open":
            writer.opened(e.url, e.received_ns)
        elif e.kind == "sent":
            writer.sent(e.url, e.received_ns, e.data)
        else:
            writer.received(e.received_ns, e.data)
    assert list(parse_ws_lines(out.getvalue().splitlines())) == events
    # the received-frame count equals the file's timestamp-first lines (an independent count)
    raw = recording_path(name).read_text().splitlines()
    assert sum(e.kind == "received" for e in events) == sum(1 for line in raw if line[:1].isdigit())


def test_huobi_frames_are_gzip_bytes() -> None:
    frames = [e.data for e in read_ws(recording_path("HUOBI.ws.44.0.txt")) if e.kind == "received"]
    assert all(isinstance(f, bytes) for f in frames)
    assert gzip.decompress(frames[0]).startswith(b"{")


def test_times_are_exact() -> None:
    first = read_ws(recording_path("KRAKEN.ws.50.0.txt"))[0]
    assert first.received_ns == 1618678132_385815100


def test_http_recording() -> None:
    rows = read_http(recording_path("BINANCE.http.0.0.txt"))
    assert [r.url.split("symbol=")[1].split("&")[0] for r in rows] == ["NKNUSDT", "BLZETH", "LRCBTC", "RUNEEUR"]
    assert rows[0].body.startswith('{"lastUpdateId":499869752')


def test_a_bad_line_names_its_place() -> None:
    with pytest.raises(RecordingError, match="x:2"):
        list(parse_ws_lines(["1.5: {}", "garbage"], "x"))
