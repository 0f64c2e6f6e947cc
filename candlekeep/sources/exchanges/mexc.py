"""MEXC spot (API v3): trades and the L2 book over `wss://wbs-api.mexc.com/ws` (protobuf frames).

No recording of MEXC exists: everything here follows MEXC's official documentation, the
`spot_v3_en` docs (github.com/mexcdevelop/apidocs, source/index.html.md, "Websocket Market
Streams") and the protobuf schemas it links (github.com/mexcdevelop/websocket-proto).

Facts:
- URL `wss://wbs-api.mexc.com/ws` (the docs write `ws://`; the server also speaks TLS). A socket
  lives at most 24 h; one carries at most 30 subscriptions; without a subscription the server hangs
  up after 30 s, and after a minute without data: so the connector sends `{"method":"PING"}`.
- Subscribe `{"method":"SUBSCRIPTION","params":["spot@public.aggre.depth.v3.api.pb@100ms@BTCUSDT",
  "spot@public.aggre.deals.v3.api.pb@100ms@BTCUSDT"]}`, answered in JSON text
  `{"id":0,"code":0,"msg":"<the channel>"}`. Pushes are **binary protobuf** `PushDataV3ApiWrapper`
  messages: channel (1), symbol (3), symbolId (4), createTime (5), sendTime (6), and the body,
  `publicAggreDepths` (313: asks 1, bids 2 as {price 1, quantity 2}, eventType 3, fromVersion 4,
  toVersion 5) or `publicAggreDeals` (314: deals 1 as {price 1, quantity 2, tradeType 3, time 4,
  tradeId 5}, eventType 2). They are decoded here with a small protobuf wire reader (no generated
  code, no dependency); prices and sizes are decimal strings on the wire.
- Book protocol (the docs' "How to Properly Maintain a Local Copy of the Order Book"): snapshot
  `GET https://api.mexc.com/api/v3/depth?symbol=BTCUSDT&limit=1000` (`lastUpdateId` is its version);
  pushes carry `[fromVersion, toVersion]`, absolute quantities (0 removes). A push with toVersion <=
  the snapshot's version is already in it; the first applied one must start at or before version + 1
  (the docs' "the version falls within [fromVersion, toVersion]"); after it, every fromVersion must
  be the last toVersion + 1, else that symbol alone re-fetches its snapshot. Crossed books resync.
- Trades: `tradeType` 1 is a taker buy, 2 a taker sell; `time` in ms. A deal without `tradeId`
  (the docs' own example has none) gets `{sendTime}-{index}`, unique per push.
- Symbols: `GET /api/v3/exchangeInfo` lists `symbol`, `baseAsset`, `quoteAsset`.

The docs' depth push, as the docs render the decoded protobuf:

    {"channel":"spot@public.aggre.depth.v3.api.pb@100ms@BTCUSDT","publicincreasedepths":{"asksList":[],
     "bidsList":[{"price":"92877.58","quantity":"0.00000000"}],"eventtype":
     "spot@public.aggre.depth.v3.api.pb@100ms","fromVersion":"10589632359","toVersion":"10589632359"},
     "symbol":"BTCUSDT","sendtime":1736411507002}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from candlekeep.bars import Trade
from candlekeep.books import Level
from candlekeep.sources.exchanges.base import (
    SEQUENCE_GAP,
    BookState,
    ConnectionSpec,
    Connector,
    ConnectorError,
    PingRule,
    Record,
    SymbolMap,
    decode_json,
    levels,
    ms_to_ns,
)

VENUE = "mexc"
WS_URL = "wss://wbs-api.mexc.com/ws"
REST_URL = "https://api.mexc.com"
LISTING_PATH = "/api/v3/exchangeInfo"
SNAPSHOT_PATH = "/api/v3/depth"
SNAPSHOT_LIMIT = 1000
SUBSCRIPTIONS_PER_CONNECTION = 30
DEPTH_CHANNEL = "spot@public.aggre.depth.v3.api.pb@100ms@{symbol}"
DEALS_CHANNEL = "spot@public.aggre.deals.v3.api.pb@100ms@{symbol}"
PING = PingRule(20.0, json.dumps({"method": "PING"}))

# PushDataV3ApiWrapper and its bodies (mexcdevelop/websocket-proto).
_CHANNEL, _SYMBOL, _SEND_TIME, _DEPTHS, _DEALS = 1, 3, 6, 313, 314
_ASKS, _BIDS, _FROM, _TO = 1, 2, 4, 5
_DEAL_ITEMS = 1
_PRICE, _QUANTITY, _TRADE_TYPE, _TIME, _TRADE_ID = 1, 2, 3, 4, 5
_TAKER = {1: "buy", 2: "sell"}


def symbol_map(listing: Any) -> SymbolMap:
    """The `GET /api/v3/exchangeInfo` body -> instrument ids <-> MEXC symbols."""
    try:
        return SymbolMap.of(VENUE, (
            (f"{VENUE}:{s['baseAsset'].upper()}-{s['quoteAsset'].upper()}", s["symbol"]) for s in listing["symbols"]
        ))  # fmt: skip
    except (KeyError, TypeError) as exc:
        raise ConnectorError(f"mexc symbol listing: {exc!r}") from None


# --- protobuf wire format (developers.google.com/protocol-buffers/docs/encoding) -------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ConnectorError("mexc frame: truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ConnectorError("mexc frame: varint too long")


def fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as int, length-delimited as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ConnectorError("mexc frame: truncated field")
            yield number, buf[pos : pos + size]
            pos += size
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ConnectorError(f"mexc frame: unsupported wire type {wire}")


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise ConnectorError("mexc frame: expected a string field")
    return value.decode()


def _levels_of(items: list[bytes]) -> list[Level]:
    out = []
    for item in items:
        row = dict(fields(item))
        out.append((Decimal(_text(row[_PRICE])), Decimal(_text(row[_QUANTITY]))))
    return out


class MexcConnector(Connector):
    venue = VENUE
    ws_url = WS_URL
    rest_url = REST_URL
    verified = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._applied_since_snapshot: set[str] = set()

    def connections(self) -> list[ConnectionSpec]:
        # An instrument's channels share one socket (so a socket vouches for the trades it carries),
        # at most 30 channels to a socket.
        per_instrument = int(self.with_books) + int(self.with_trades)
        step = max(1, SUBSCRIPTIONS_PER_CONNECTION // max(1, per_instrument))
        specs = []
        for n, start in enumerate(range(0, len(self.instruments), step)):
            group = self.instruments[start : start + step]
            channels = []
            for instrument in group:
                symbol = self.symbols.venue_symbol(instrument)
                if self.with_books:
                    channels.append(DEPTH_CHANNEL.format(symbol=symbol))
                if self.with_trades:
                    channels.append(DEALS_CHANNEL.format(symbol=symbol))
            frame = json.dumps({"method": "SUBSCRIPTION", "params": channels})
            specs.append(ConnectionSpec(f"mexc-{n}", self.ws_url, group, (frame,), PING))
        return specs

    def snapshot_url(self, instrument: str) -> str | None:
        query = urlencode({"symbol": self.symbols.venue_symbol(instrument), "limit": SNAPSHOT_LIMIT})
        return f"{str(self.rest_url).rstrip('/')}{SNAPSHOT_PATH}?{query}"

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        if isinstance(raw, str):  # subscription answers and PONG are JSON text
            msg = decode_json(raw)
            if isinstance(msg, dict) and msg.get("code") not in (0, None):
                raise ConnectorError(f"mexc refused: {msg}")
            return []
        top: dict[int, list[int | bytes]] = {}
        for number, value in fields(raw):
            top.setdefault(number, []).append(value)
        try:
            symbol = _text(top[_SYMBOL][0]) if _SYMBOL in top else _text(top[_CHANNEL][0]).rsplit("@", 1)[1]
            instrument = self.symbols.instrument(symbol)
            if instrument not in self.states:
                return []
            send_ns = ms_to_ns(top[_SEND_TIME][0]) if _SEND_TIME in top else received_ns
            if _DEPTHS in top and self.with_books:
                return self._on_depth(self.states[instrument], top[_DEPTHS][0], send_ns, received_ns)
            if _DEALS in top and self.with_trades:
                return self._on_deals(instrument, top[_DEALS][0], top.get(_SEND_TIME, [0])[0], received_ns)
        except (KeyError, IndexError, TypeError, ValueError, ArithmeticError, UnicodeDecodeError) as exc:
            raise ConnectorError(f"mexc push: {exc!r}") from None
        return []

    def _on_deals(self, instrument: str, body: Any, send_time: Any, received_ns: int) -> list[Record]:
        out: list[Record] = []
        items = [v for n, v in fields(body) if n == _DEAL_ITEMS]
        for index, item in enumerate(items):
            row = dict(fields(item))  # type: ignore[arg-type]
            side = _TAKER.get(row.get(_TRADE_TYPE))  # type: ignore[arg-type]
            if side is None:
                raise ConnectorError(f"mexc deal tradeType {row.get(_TRADE_TYPE)!r}")
            trade_id = _text(row[_TRADE_ID]) if _TRADE_ID in row else f"{send_time}-{index}"
            out.append(Trade(instrument, ms_to_ns(row[_TIME]), Decimal(_text(row[_PRICE])),  # type: ignore[arg-type]
                             Decimal(_text(row[_QUANTITY])), side, trade_id, VENUE, received_ns))  # fmt: skip
        return out

    def _on_depth(self, state: BookState, body: Any, ts_ns: int, received_ns: int) -> list[Record]:
        asks, bids, versions = [], [], {}
        for number, value in fields(body):
            if number == _ASKS:
                asks.append(value)
            elif number == _BIDS:
                bids.append(value)
            elif number in (_FROM, _TO):
                versions[number] = int(_text(value))
        push = (versions[_FROM], versions[_TO], _levels_of(bids), _levels_of(asks), ts_ns)
        if state.phase != "synced":
            if len(state.buffer) >= self.max_buffered:
                state.buffer.pop(0)
            state.buffer.append((push, received_ns))
            return []
        return self._apply(state, push, received_ns)

    def _apply(self, state: BookState, push: tuple, received_ns: int) -> list[Record]:
        first, last_version, bids, asks, ts_ns = push
        last = state.sequence
        assert last is not None
        if last_version <= last:
            return []  # already in the snapshot
        if first > last + 1 or (first < last + 1 and state.instrument in self._applied_since_snapshot):
            return self.resync(state.instrument, received_ns, SEQUENCE_GAP,
                               f"expected fromVersion {last + 1}, got {first}..{last_version}", first)  # fmt: skip
        state.book.update(bids, asks)
        state.sequence = last_version
        self._applied_since_snapshot.add(state.instrument)
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        return self._delta_record(state, ts_ns, received_ns, first - 1, bids, asks)

    def on_snapshot(self, instrument: str, body: bytes | str, received_ns: int) -> list[Record]:
        msg = decode_json(body)
        state = self.states[instrument]
        try:
            state.book.replace(levels(msg["bids"]), levels(msg["asks"]))
            state.sequence = int(msg["lastUpdateId"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConnectorError(f"mexc snapshot of {instrument}: {exc!r}: {str(msg)[:200]}") from None
        self._applied_since_snapshot.discard(instrument)
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        out = self._synced(state, received_ns, received_ns, "REST snapshot")  # the body has no time
        buffered, state.buffer = state.buffer, []
        for push, buffered_ns in buffered:
            out += self._apply(state, push, buffered_ns)
            if state.phase != "synced":
                break
        return out
