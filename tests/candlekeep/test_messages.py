"""Wire messages: exact round trips, and every contract violation named in a MessageError."""

from __future__ import annotations

import base64
import json
from decimal import Decimal

import pytest

from candlekeep.bars import Bar, Trade
from candlekeep.instruments import Instrument
from candlekeep.messages import (
    ControlCommand,
    MessageError,
    decode_bar,
    decode_control,
    decode_tick,
    dynamic_topic,
    encode_bar,
    encode_control,
    encode_deadletter,
    encode_tick,
    replay_topic,
    topic,
)

TRADE = Trade("coinbase:BTC-USD", 1_704_067_200_123_456_789, Decimal("42283.50"), Decimal("0.00000001"), "sell",
              "627150427", "cryptocompare", 1_704_067_200_200_000_000)
BAR = Bar("coinbase:BTC-USD", "1m", 1_704_067_200, Decimal("42283.50"), Decimal("42300"), Decimal("42200.1"),
          Decimal("42250.00"), Decimal("1.23456789"), Decimal("52165.123456789012"), 17, "stream", False, 2)


def tick(**changes: object) -> bytes:
    body = json.loads(encode_tick(TRADE))
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def test_tick_round_trip_keeps_every_digit() -> None:
    raw = encode_tick(TRADE)

    assert json.loads(raw)["price"] == "42283.50" and json.loads(raw)["size"] == "0.00000001"
    assert decode_tick(raw) == TRADE


def test_bar_and_control_round_trip() -> None:
    assert decode_bar(encode_bar(BAR)) == BAR
    cmd = ControlCommand("fetch", "coinbase:ETH-USD", "r-1", start=1_704_067_200, end=1_704_070_800)
    assert decode_control(encode_control(cmd)) == cmd


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not JSON"),
        (tick(v=2), "v"),
        (tick(price=...), "price"),
        (tick(price=42283.5), "price"),  # a JSON number may already have lost digits
        (tick(price="abc"), "not a decimal"),
        (tick(size="-1"), "positive"),
        (tick(size="NaN"), "finite"),
        (tick(side="long"), "side"),
        (tick(instrument="BTCUSD"), "invalid instrument"),
        (tick(ts_ns=True), "ts_ns"),
        (tick(ts_ns=-5), "ts_ns"),
        (tick(trade_id=""), "trade_id"),
    ],
)
def test_bad_ticks_are_refused_with_the_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        decode_tick(raw)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"interval": "2m"}, "interval"),
        ({"high": "1"}, "OHLC inconsistent"),
        ({"trades": 1.5}, "trades"),
        ({"final": "no"}, "final"),
        ({"start": 1_704_067_201}, "boundary"),
    ],
)
def test_bad_bars_are_refused_with_the_reason(change: dict, reason: str) -> None:
    body = json.loads(encode_bar(BAR)) | change
    with pytest.raises(MessageError, match=reason):
        decode_bar(json.dumps(body).encode())


def test_bad_control_commands_are_refused() -> None:
    with pytest.raises(MessageError, match="op"):
        decode_control(b'{"v":1,"op":"delete","instrument":"coinbase:BTC-USD","request_id":"x"}')
    with pytest.raises(MessageError, match="after"):
        decode_control(b'{"v":1,"op":"fetch","instrument":"coinbase:BTC-USD","request_id":"x","start":5,"end":5}')


def test_deadletter_carries_the_original_bytes() -> None:
    body = json.loads(encode_deadletter(topic_name="ticks", partition=3, offset=42, error="bad", payload=b"\x00\xff"))

    assert body == {"v": 1, "topic": "ticks", "partition": 3, "offset": 42, "error": "bad",
                    "payload": base64.b64encode(b"\x00\xff").decode()}


def test_topic_names_carry_the_prefix() -> None:
    inst = Instrument.parse("binance:ETH-USDT")
    assert topic("t1.", "ticks") == "t1.ticks"
    assert dynamic_topic("t1.", inst) == "t1.dynamic.binance.ETH-USDT"
    assert replay_topic("", "abc", "bars") == "replay.abc.bars"
