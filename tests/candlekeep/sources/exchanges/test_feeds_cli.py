"""`candlekeep feeds normalize` prints what the connector makes of a recording, one JSON line each,
with the wire's decimal digits; the lines equal feeds.record_json of the live path's records
(tested per venue in test_<venue>.py) because both are the same `normalize` + `record_json`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from candlekeep.cli import main
from tests.utils.exchange_replay import recording_path


def test_normalize_prints_every_record_with_exact_decimals(capsys: pytest.CaptureFixture[str]) -> None:
    ws = recording_path("OKX.ws.1.0.txt")
    assert main(["feeds", "normalize", "--venue", "okx", "--ws", str(ws),
                 "--instruments", "okx:BTC-USDT,okx_swap:UNI-USD,okx_futures:BTC-USD220527"]) == 0  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = {(x["type"], x.get("event")) for x in lines}
    assert {("trade", None), ("book_snapshot", None), ("book_delta", None), ("integrity", "checksum_ok")} <= kinds
    # the recording's own text of the first BTC-USDT trade, digit for digit
    raw = next(json.loads(l.split(": ", 1)[1])["data"][0] for l in ws.read_text().splitlines()
               if '"channel":"trades","instId":"BTC-USDT"},"data"' in l)  # fmt: skip
    first = next(x for x in lines if x["type"] == "trade" and x["instrument"] == "okx:BTC-USDT")
    assert (first["trade_id"], first["price"], first["size"], first["side"]) == (raw["tradeId"], raw["px"], raw["sz"], raw["side"])
    checks = [x for x in lines if x["type"] == "integrity" and x["event"].startswith("checksum")]
    assert len(checks) == 290 and all(x["event"] == "checksum_ok" for x in checks)


def test_normalize_names_a_bad_venue(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["feeds", "normalize", "--venue", "nowhere", "--ws", str(recording_path("OKX.ws.1.0.txt")),
                 "--listing", str(recording_path("OKX.0.txt"))]) == 2  # fmt: skip
    assert "no connector for venue 'nowhere'" in capsys.readouterr().err


def test_capture_writes_a_recording_that_normalizes_like_the_original(tmp_path: Any) -> None:
    """`feeds capture` against loopback servers replaying the OKX recording (listing over HTTP,
    frames over WebSocket): what it wrote, normalized, equals the original recording normalized."""
    from urllib.parse import parse_qsl, urlsplit

    from candlekeep.feeds import capture, connector_from_listing, normalize, record_json
    from candlekeep.sources.exchanges.recording import read_http, read_ws
    from tests.utils.exchange_replay import ReplayServer, ReplaySession, received_frames, recorded
    from tests.utils.fixture_server import FixtureServer, Reply

    ids = ["okx:BTC-USDT", "okx_swap:UNI-USD", "okx_futures:BTC-USD220527"]
    events = recorded("OKX.ws.1.0.txt")

    def script(session: ReplaySession) -> None:
        session.expect('"subscribe"')
        session.send_all(received_frames(events))

    with FixtureServer() as http, ReplayServer([script]) as ws:
        for r in read_http(recording_path("OKX.0.txt")):
            split = urlsplit(r.url)
            http.add(split.path, Reply.json(r.body), query=dict(parse_qsl(split.query)))
        ws_file, http_file = tmp_path / "OKX.ws.capture.txt", tmp_path / "OKX.ws.capture.txt.http"
        with ws_file.open("w") as ws_out, http_file.open("w") as http_out:
            capture("okx", ids, ws_out, http_out, seconds=3.0, ws_url=ws.url, rest_url=http.url)
    captured = read_ws(ws_file)
    assert captured[0].kind == "open" and captured[1].kind == "sent" and '"op":"subscribe"' in str(captured[1].data)

    def published(ws_events: Any, listing: str) -> list[dict[str, Any]]:
        c = connector_from_listing("okx", listing, ids)
        out = [record_json(r) for r in normalize(c, ws_events) if type(r).__name__ in ("Trade", "BookSnapshot", "BookDelta")]
        for body in out:
            body.pop("received_ns")
        return out

    original = published(events, recording_path("OKX.0.txt").read_text())
    again = published(captured, http_file.read_text())
    assert len(original) > 300
    assert again == original  # periodic snapshots follow the exchange clock, so they match too
