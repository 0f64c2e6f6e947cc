"""`candlekeep feeds normalize` prints what the connector makes of a recording, one JSON line each,
with the wire's decimal digits; the lines equal feeds.record_json of the live path's records
(tested per venue in test_<venue>.py) because both are the same `normalize` + `record_json`."""

from __future__ import annotations

import json

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
