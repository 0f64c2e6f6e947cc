"""Wire messages and topic names (DESIGN.md "Kafka topics"), defined once and imported everywhere.

JSON with `"v": 1`; prices and sizes travel as decimal strings and are parsed back to `Decimal`
exactly. A message that cannot be parsed or breaks the contract raises `MessageError` with the
reason (the daemons send it to `deadletter`, never crash on it).
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import msgspec

from candlekeep.bars import Bar, Disconnect, Heartbeat, TickRecord, Trade, decimal_str
from candlekeep.books import BookDelta, BookSnapshot, Level
from candlekeep.instruments import Instrument, InstrumentError

VERSION = 1

TICKS = "ticks"
BOOKS = "books"
BARS = "bars"
CONTROL = "control"
DEADLETTER = "deadletter"
CONTROL_OPS = ("track", "untrack", "fetch")


class MessageError(ValueError):
    """A message that cannot be parsed or violates the contract; the text is the reason."""


def topic(prefix: str, name: str) -> str:
    """Topic names get the optional `CANDLEKEEP_TOPIC_PREFIX`."""
    return f"{prefix}{name}"


def dynamic_topic(prefix: str, instrument: Instrument) -> str:
    return topic(prefix, f"dynamic.{instrument.venue}.{instrument.base}-{instrument.quote}")


def replay_topic(prefix: str, session: str, kind: str) -> str:
    return topic(prefix, f"replay.{session}.{kind}")


# --- ticks ---------------------------------------------------------------------------------------
# Three kinds of record share the topic (DESIGN.md): trades, heartbeats and disconnects. A record
# without `kind` is a trade (the shape before heartbeats existed).


def encode_tick(trade: Trade) -> bytes:
    return _dumps({
        "v": VERSION,
        "kind": "trade",
        "instrument": trade.instrument,
        "ts_ns": trade.ts_ns,
        "price": decimal_str(trade.price),
        "size": decimal_str(trade.size),
        "side": trade.side,
        "trade_id": trade.trade_id,
        "source": trade.source,
        "received_ns": trade.received_ns,
    })


def encode_heartbeat(beat: Heartbeat) -> bytes:
    return _dumps({"v": VERSION, "kind": "heartbeat", "instrument": beat.instrument, "ts_ns": beat.ts_ns,
                   "source": beat.source})  # fmt: skip


def encode_disconnect(gone: Disconnect) -> bytes:
    return _dumps({"v": VERSION, "kind": "disconnect", "instrument": gone.instrument, "ts_ns": gone.ts_ns,
                   "source": gone.source, "reason": gone.reason})  # fmt: skip


def encode_tick_record(record: TickRecord) -> bytes:
    if isinstance(record, Trade):
        return encode_tick(record)
    if isinstance(record, Heartbeat):
        return encode_heartbeat(record)
    return encode_disconnect(record)


class _TickV1(msgspec.Struct, forbid_unknown_fields=False):
    """Every `ticks` shape in one struct, checked by msgspec (the aggregator's hot path); the
    fields a kind needs are checked in `decode_tick_record`."""

    v: Literal[1]
    instrument: str
    ts_ns: int
    source: str
    kind: Literal["trade", "heartbeat", "disconnect"] = "trade"
    price: str | None = None
    size: str | None = None
    side: Literal["buy", "sell", "unknown"] | None = None
    trade_id: str | None = None
    received_ns: int | None = None
    reason: str | None = None


_TICK = msgspec.json.Decoder(_TickV1)


def decode_tick_record(raw: bytes) -> TickRecord:
    """A `ticks` record of any kind; `MessageError` names what breaks the contract."""
    try:
        msg = _TICK.decode(raw)
    except msgspec.ValidationError as exc:
        raise MessageError(f"tick violates the contract: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not msg.source:
        raise MessageError("tick violates the contract: source must be non-empty")
    if msg.ts_ns <= 0:
        raise MessageError(f"tick violates the contract: ts_ns must be positive, got {msg.ts_ns}")
    kind = msg.kind
    if kind == "heartbeat":
        return Heartbeat(_instrument_id(msg.instrument), msg.ts_ns, msg.source)
    if kind == "disconnect":
        if not msg.reason:
            raise MessageError("disconnect violates the contract: reason must be non-empty")
        return Disconnect(_instrument_id(msg.instrument), msg.ts_ns, msg.source, msg.reason)
    price, size, side, trade_id = msg.price, msg.size, msg.side, msg.trade_id
    if not (price and size and side and trade_id):
        for name in ("price", "size", "side", "trade_id"):
            if not getattr(msg, name):
                raise MessageError(f"tick violates the contract: trade field {name!r} is missing or empty")
    try:
        # Positional (the aggregator decodes every record here): instrument, ts_ns, price, size,
        # side, trade_id, source, received_ns.
        return Trade(_instrument_id(msg.instrument), msg.ts_ns, _decimal_text("price", price),
                     _decimal_text("size", size), side, trade_id, msg.source, msg.received_ns)  # fmt: skip
    except (TypeError, ValueError) as exc:  # Trade's own checks: positive price and size
        raise MessageError(f"tick violates the contract: {exc}") from None


def decode_tick(raw: bytes) -> Trade:
    """A trade record; any other kind is a `MessageError` (for readers that want trades only)."""
    record = decode_tick_record(raw)
    if not isinstance(record, Trade):
        raise MessageError(f"expected a trade, got a {type(record).__name__.lower()}")
    return record


# --- replay: stored trades straight to `ticks` bytes ----------------------------------------------
# The replayer sends millions of stored trades. It reads their decimals as PostgreSQL's exact text
# and writes the very bytes `encode_tick` writes for the same trade (received_ns null: not stored),
# without building a Trade and a dict per record (tests/candlekeep/test_replay_messages.py holds
# the two to byte equality over real trades).


def encode_stored_trade(instrument: str, ts_ns: int, price: str, size: str, side: str, trade_id: str,
                        source: str) -> bytes:  # fmt: skip
    tid = f'"{trade_id}"' if trade_id.isdigit() and trade_id.isascii() else json.dumps(trade_id)
    return (f'{_trade_head(instrument)}{ts_ns},"price":"{price}","size":"{size}","side":"{side}","trade_id":{tid},'
            f'"source":{_json_text(source)},"received_ns":null}}').encode()  # fmt: skip


@functools.lru_cache(maxsize=4096)
def _trade_head(instrument: str) -> str:
    return f'{{"v":1,"kind":"trade","instrument":{json.dumps(instrument)},"ts_ns":'


@functools.lru_cache(maxsize=256)
def _json_text(value: str) -> str:
    return json.dumps(value)


# --- books ---------------------------------------------------------------------------------------


def encode_book(update: BookSnapshot | BookDelta) -> bytes:
    body: dict[str, Any] = {
        "v": VERSION,
        "kind": "snapshot" if isinstance(update, BookSnapshot) else "delta",
        "instrument": update.instrument,
        "ts_ns": update.ts_ns,
        "received_ns": update.received_ns,
        "sequence": update.sequence,
        "bids": [[decimal_str(p), decimal_str(s)] for p, s in update.bids],
        "asks": [[decimal_str(p), decimal_str(s)] for p, s in update.asks],
        "source": update.source,
        "verified": update.verified,
    }
    if update.prev_sequence is not None:
        body["prev_sequence"] = update.prev_sequence
    return _dumps(body)


class _BookV1(msgspec.Struct, forbid_unknown_fields=False):
    v: Literal[1]
    kind: Literal["snapshot", "delta"]
    instrument: str
    ts_ns: int
    source: str
    bids: list[tuple[str, str]]
    asks: list[tuple[str, str]]
    verified: bool
    received_ns: int | None = None
    sequence: int | None = None
    prev_sequence: int | None = None


_BOOK = msgspec.json.Decoder(_BookV1)


def decode_book(raw: bytes) -> BookSnapshot | BookDelta:
    try:
        msg = _BOOK.decode(raw)
    except msgspec.ValidationError as exc:
        raise MessageError(f"book update violates the contract: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not msg.source:
        raise MessageError("book update violates the contract: source must be non-empty")
    cls = BookSnapshot if msg.kind == "snapshot" else BookDelta
    try:
        return cls(
            instrument=_instrument_id(msg.instrument),
            ts_ns=msg.ts_ns,
            received_ns=msg.received_ns,
            sequence=msg.sequence,
            prev_sequence=msg.prev_sequence,
            bids=_levels("bids", msg.bids),
            asks=_levels("asks", msg.asks),
            source=msg.source,
            verified=msg.verified,
        )
    except (TypeError, ValueError) as exc:  # the record's own checks
        raise MessageError(f"book update violates the contract: {exc}") from None


def _levels(name: str, rows: list[tuple[str, str]]) -> tuple[Level, ...]:
    return tuple((_decimal_text(f"{name} price", p), _decimal_text(f"{name} size", s)) for p, s in rows)


# --- bars ----------------------------------------------------------------------------------------


def encode_bar(bar: Bar) -> bytes:
    return _dumps({
        "v": VERSION,
        "instrument": bar.instrument,
        "interval": bar.interval,
        "start": bar.start,
        "open": decimal_str(bar.open),
        "high": decimal_str(bar.high),
        "low": decimal_str(bar.low),
        "close": decimal_str(bar.close),
        "volume": decimal_str(bar.volume),
        "quote_volume": decimal_str(bar.quote_volume),
        "trades": bar.trades,
        "final": bar.final,
        "revision": bar.revision,
        "source": bar.source,
    })


class _BarV1(msgspec.Struct, forbid_unknown_fields=False):
    """The bar shape, checked field by field by msgspec (cache reads decode thousands at a time)."""

    v: Literal[1]
    instrument: str
    interval: Literal["1m", "5m", "15m", "30m", "1h", "4h", "1d"]
    start: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str
    trades: int | None
    final: bool
    revision: int
    source: str


_BAR = msgspec.json.Decoder(_BarV1)


def decode_bar(raw: bytes) -> Bar:
    try:
        msg = _BAR.decode(raw)
    except msgspec.ValidationError as exc:
        raise MessageError(f"bar violates the contract: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not msg.source:
        raise MessageError("bar violates the contract: source must be non-empty")
    bar = Bar(
        instrument=_instrument_id(msg.instrument),
        interval=msg.interval,
        start=msg.start,
        open=_decimal_text("open", msg.open),
        high=_decimal_text("high", msg.high),
        low=_decimal_text("low", msg.low),
        close=_decimal_text("close", msg.close),
        volume=_decimal_text("volume", msg.volume),
        quote_volume=_decimal_text("quote_volume", msg.quote_volume),
        trades=msg.trades,
        source=msg.source,
        final=msg.final,
        revision=msg.revision,
    )
    if problems := bar.problems():
        raise MessageError(f"bar violates the contract: {'; '.join(problems)}")
    return bar


# --- control -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlCommand:
    op: str  # track | untrack | fetch
    instrument: str
    request_id: str
    start: int | None = None  # unix s, for fetch
    end: int | None = None


def encode_control(cmd: ControlCommand) -> bytes:
    body: dict[str, Any] = {"v": VERSION, "op": cmd.op, "instrument": cmd.instrument, "request_id": cmd.request_id}
    if cmd.start is not None:
        body["start"] = cmd.start
    if cmd.end is not None:
        body["end"] = cmd.end
    return _dumps(body)


def decode_control(raw: bytes) -> ControlCommand:
    msg = _loads(raw)
    start = _int(msg, "start") if msg.get("start") is not None else None
    end = _int(msg, "end") if msg.get("end") is not None else None
    if start is not None and end is not None and end <= start:
        raise MessageError("field 'end' must be after 'start'")
    return ControlCommand(
        op=_choice(msg, "op", CONTROL_OPS),
        instrument=_instrument(msg),
        request_id=_str(msg, "request_id"),
        start=start,
        end=end,
    )


# --- dead letters --------------------------------------------------------------------------------


def encode_deadletter(*, topic_name: str, partition: int, offset: int, error: str, payload: bytes) -> bytes:
    return _dumps({
        "v": VERSION,
        "topic": topic_name,
        "partition": partition,
        "offset": offset,
        "error": error,
        "payload": base64.b64encode(payload).decode("ascii"),
    })


# --- field readers -------------------------------------------------------------------------------


def _dumps(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _loads(raw: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(raw, parse_float=Decimal)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise MessageError("not a JSON object")
    if msg.get("v") != VERSION:
        raise MessageError(f"unsupported version {msg.get('v')!r} (expected {VERSION})")
    return msg


def _field(msg: Mapping[str, Any], name: str) -> Any:
    if name not in msg or msg[name] is None:
        raise MessageError(f"missing field {name!r}")
    return msg[name]


def _str(msg: Mapping[str, Any], name: str) -> str:
    value = _field(msg, name)
    if not isinstance(value, str) or not value:
        raise MessageError(f"field {name!r} must be a non-empty string")
    return value


def _int(msg: Mapping[str, Any], name: str) -> int:
    value = _field(msg, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MessageError(f"field {name!r} must be an integer")
    return value


def _decimal_text(name: str, value: str) -> Decimal:
    try:
        parsed = Decimal(value)
    except InvalidOperation:
        raise MessageError(f"field {name!r} is not a decimal: {value!r}") from None
    if not parsed.is_finite():
        raise MessageError(f"field {name!r} must be finite")
    return parsed


def _choice(msg: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    value = _field(msg, name)
    if value not in allowed:
        raise MessageError(f"field {name!r} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _instrument(msg: Mapping[str, Any]) -> str:
    return _instrument_id(_str(msg, "instrument"))


@functools.lru_cache(maxsize=4096)  # a feed carries few distinct instruments
def _instrument_id(text: str) -> str:
    try:
        return Instrument.parse(text).id
    except InstrumentError as exc:
        raise MessageError(str(exc)) from None
