"""Bitfinex v2 public WebSocket: trades and the P0 book (`wss://api-pub.bitfinex.com/ws/2`).

Facts (docs.bitfinex.com, "WebSocket" pages; the recording BITFINEX.ws.11.0, 2021):
- URL `wss://api-pub.bitfinex.com/ws/2` (public channels; the recording used `api.bitfinex.com/ws/2`,
  the same protocol). The server opens with `{"event":"info","version":2,...}`; info code 20051
  asks clients to reconnect, 20060/20061 bracket maintenance (resubscribe after 20061).
- `{"event":"conf","flags":F}` turns on options for the connection: 65536 `SEQ_ALL` appends a
  sequence number to every array frame, 131072 `OB_CHECKSUM` adds `[chanId,"cs",checksum,seq]`
  frames to book channels. We send both (196608); the recording had SEQ_ALL only (`"flags":65536`).
- Subscribe `{"event":"subscribe","channel":"book","symbol":"tBTCUSD","prec":"P0","freq":"F0",
  "len":"100"}` and `{"event":"subscribe","channel":"trades","symbol":"tBTCUSD"}`; the answer
  `{"event":"subscribed","chanId":N,...}` names the channel id every data frame starts with.
  Heartbeats `[chanId,"hb",seq]` come every 15 s per quiet channel. App ping: `{"event":"ping"}`.
- Book P0 rows are `[price, count, amount]`: amount > 0 a bid, < 0 an ask (size |amount|), and
  count 0 deletes the level (amount 1 for a bid, -1 for an ask). The first frame after
  `subscribed` is the snapshot (a list of rows); resync = unsubscribe + subscribe that channel.
- Trades: the snapshot (recent history, not published: those trades are hours old) then
  `[chanId,"te",[id,mts,amount,price],seq]` per trade and `"tu"` repeating it (ignored). amount > 0
  is a taker buy, < 0 a taker sell.
- Symbols: the listing `conf/pub:list:pair:exchange` gives pairs `BTCUSD` (3 + 3 letters) or
  `AAVE:USD` (colon when a code is longer); the channel symbol is `t` + pair. Bitfinex names
  Tether `UST`: it is our `USDT`.
- Integrity: the SEQ_ALL number counts frames **per connection**, not per channel (the recording
  numbers ticker, trades and book frames of seven pairs in one run 1, 2, 3, ...). A gap cannot say
  whose frame was lost, so the trades of every pair on that socket get a `Disconnect`. The books:
  with OB_CHECKSUM on (the default), each book on the socket holds its updates until its next
  checksum (CRC32 of the top 25 levels, signed; sent after book updates): a match releases them,
  a mismatch resyncs that book alone. Without checksums (the recording's flags) every book on the
  socket resyncs. A connection carries up to 10 pairs (20 channels; the venue caps channels per
  socket and new sockets per minute). A checksum mismatch at any time resyncs that book alone;
  crossed books resync too.

A real book snapshot and update (BITFINEX.ws.11.0.txt; the last number is SEQ_ALL's):

    [225206,[[277520,1,0.00383141],[277510,1,0.027],[277500,1,0.000946],...],17]
    [225206,[215350,0,1],18]
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from candlekeep.bars import Disconnect, Trade
from candlekeep.books import Level
from candlekeep.orderbook import OrderBook
from candlekeep.sources.exchanges.base import (
    CHECKSUM_MISMATCH,
    CHECKSUM_OK,
    SEQUENCE_GAP,
    ConnectionSpec,
    Connector,
    ConnectorError,
    PingRule,
    Record,
    Send,
    SymbolMap,
    decode_json,
)

VENUE = "bitfinex"
WS_URL = "wss://api-pub.bitfinex.com/ws/2"
REST_URL = "https://api-pub.bitfinex.com/v2"
LISTING_PATH = "/conf/pub:list:pair:exchange"
PAIRS_URL = f"{REST_URL}{LISTING_PATH}"
SEQ_ALL = 65536
OB_CHECKSUM = 131072
BOOK_LEN = "100"
CHECKSUM_LEVELS = 25
CURRENCY_ALIASES = {"UST": "USDT"}  # Bitfinex's own codes that differ from the common ones
PING = PingRule(30.0, json.dumps({"event": "ping"}))

_ZERO = Decimal(0)


def pair_symbol(pair: str) -> tuple[str, str]:
    """`BTCUSD` -> (BTC, USD), `AAVE:USD` -> (AAVE, USD), with Bitfinex's codes translated."""
    base, sep, quote = pair.partition(":")
    if not sep:
        if len(pair) != 6:
            raise ConnectorError(f"bitfinex pair {pair!r}: neither 3+3 letters nor BASE:QUOTE")
        base, quote = pair[:3], pair[3:]
    return CURRENCY_ALIASES.get(base, base), CURRENCY_ALIASES.get(quote, quote)


def symbol_map(pairs: Any) -> SymbolMap:
    """The `conf/pub:list:pair:exchange` body (`[[pair, ...]]`) -> instrument ids <-> `t` + pair."""
    if not (isinstance(pairs, list) and pairs and isinstance(pairs[0], list)):
        raise ConnectorError(f"bitfinex pair listing is not [[...]]: {str(pairs)[:200]}")
    out = []
    for pair in pairs[0]:
        base, quote = pair_symbol(pair)
        out.append((f"{VENUE}:{base}-{quote}", f"t{pair}"))
    return SymbolMap.of(VENUE, out)


def js_number(value: Decimal) -> str:
    """A number as JavaScript's `String(n)` writes it: what Bitfinex's checksum string holds."""
    if value == value.to_integral_value() and abs(value) < Decimal("1e21"):
        return str(int(value))
    if abs(value) >= Decimal("1e-6"):
        text = format(value, "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    sign, digits, exponent = value.normalize().as_tuple()
    mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    return f"{'-' if sign else ''}{mantissa}e{exponent + len(digits) - 1}"


def book_checksum(book: OrderBook) -> int:
    """CRC32 (signed 32-bit) of `bid price:bid amount:ask price:ask amount:...` over the top 25
    levels, asks with negative amounts (docs.bitfinex.com "WebSocket Checksum", P0 books)."""
    bids, asks = book.bids(CHECKSUM_LEVELS), book.asks(CHECKSUM_LEVELS)
    parts: list[str] = []
    for i in range(CHECKSUM_LEVELS):
        if i < len(bids):
            parts += (js_number(bids[i][0]), js_number(bids[i][1]))
        if i < len(asks):
            parts += (js_number(asks[i][0]), js_number(-asks[i][1]))
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def _row(row: Sequence[Any]) -> tuple[bool, Level]:
    """A P0 row `[price, count, amount]` -> (is_bid, (price, absolute new size))."""
    price, count, amount = (Decimal(x) for x in row[:3])
    if count == _ZERO:
        return amount > 0, (price, _ZERO)
    return amount > 0, (price, abs(amount))


class BitfinexConnector(Connector):
    venue = VENUE
    ws_url = WS_URL
    verified = True  # SEQ_ALL gaps and (when on) checksums; see the module docstring

    def __init__(self, symbols: SymbolMap, instruments: Sequence[str], *, flags: int = SEQ_ALL | OB_CHECKSUM,
                 instruments_per_connection: int = 10, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(symbols, instruments, **kwargs)
        self.flags = flags
        self.per_connection = max(1, instruments_per_connection)
        self._specs = self._build_specs()
        self._conn_of = {i: spec.key for spec in self._specs for i in spec.instruments}
        self._seq: dict[str, int | None] = {}  # connection -> last SEQ_ALL number
        self._channels: dict[tuple[str, int], tuple[str, str]] = {}  # (conn, chanId) -> (channel, instrument)
        # instrument -> its book records held since a connection gap, until its next checksum
        self._held: dict[str, list[Record]] = {}

    def _subscribe(self, channel: str, instrument: str) -> str:
        frame: dict[str, Any] = {"event": "subscribe", "channel": channel, "symbol": self.symbols.venue_symbol(instrument)}
        if channel == "book":
            frame.update(prec="P0", freq="F0", len=BOOK_LEN)
        return json.dumps(frame)

    def _build_specs(self) -> list[ConnectionSpec]:
        specs = []
        for n, start in enumerate(range(0, len(self.instruments), self.per_connection)):
            group = self.instruments[start : start + self.per_connection]
            frames = [json.dumps({"event": "conf", "flags": self.flags})]
            for instrument in group:
                if self.with_books:
                    frames.append(self._subscribe("book", instrument))
                if self.with_trades:
                    frames.append(self._subscribe("trades", instrument))
            specs.append(ConnectionSpec(f"bitfinex-{n}", self.ws_url, group, tuple(frames), PING, silence_timeout_s=40.0))
        return specs

    def connections(self) -> list[ConnectionSpec]:
        return self._specs

    def on_open(self, conn: str, received_ns: int) -> list[Record]:
        # The subscribes themselves bring each book's snapshot.
        self._seq[conn] = None
        self._channels = {k: v for k, v in self._channels.items() if k[0] != conn}
        for instrument in self.spec(conn).instruments:
            self._reset(self.states[instrument])
        return []

    def _request_snapshot(self, instrument: str) -> None:
        conn = self._conn_of[instrument]
        for (c, chan_id), (channel, inst) in list(self._channels.items()):
            if c == conn and inst == instrument and channel == "book":
                self._actions.append(Send(conn, json.dumps({"event": "unsubscribe", "chanId": chan_id})))
                del self._channels[(c, chan_id)]
        self._actions.append(Send(conn, self._subscribe("book", instrument)))

    # -- frames -----------------------------------------------------------------------------------

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        msg = decode_json(raw)
        if isinstance(msg, dict):
            return self._on_event(conn, msg)
        if not (isinstance(msg, list) and len(msg) >= 2 and isinstance(msg[0], int)):
            raise ConnectorError(f"bitfinex frame is neither an event nor a channel frame: {str(msg)[:200]}")
        out: list[Record] = []
        if self.flags & SEQ_ALL:
            out += self._check_sequence(conn, msg, received_ns)
        channel, instrument = self._channels.get((conn, msg[0]), (None, None))
        if instrument is None or msg[1] == "hb":
            return out  # an unsubscribed channel's last frames, a ticker, or a heartbeat
        try:
            if channel == "book":
                out += self._on_book(self.states[instrument], msg, received_ns)
            elif channel == "trades":
                out += self._on_trades(instrument, msg, received_ns)
        except (IndexError, TypeError, ValueError, ArithmeticError) as exc:
            raise ConnectorError(f"bitfinex {channel} frame: {exc!r}: {str(msg)[:200]}") from None
        return out

    def _on_event(self, conn: str, msg: dict) -> list[Record]:
        event = msg.get("event")
        if event == "subscribed":
            symbol = msg.get("symbol") or f"t{msg.get('pair')}"
            instrument = self.symbols.instrument(symbol)
            if instrument in self.states:  # a channel of a pair we do not follow stays unmapped: ignored
                self._channels[(conn, int(msg["chanId"]))] = (msg["channel"], instrument)
        elif event == "error":
            raise ConnectorError(f"bitfinex error {msg.get('code')}: {msg.get('msg')}")
        elif event == "conf" and msg.get("status") not in (None, "OK"):
            raise ConnectorError(f"bitfinex refused conf flags {msg.get('flags')}: {msg}")
        return []  # info, conf OK, pong, unsubscribed

    def _check_sequence(self, conn: str, msg: list, received_ns: int) -> list[Record]:
        seq = msg[-1]
        if not isinstance(seq, int):
            raise ConnectorError(f"bitfinex frame without its SEQ_ALL number: {str(msg)[:200]}")
        last = self._seq.get(conn)
        self._seq[conn] = seq
        if last is None or seq == last + 1:
            return []
        # Whose frame went missing is unknowable: every instrument on this connection is suspect.
        detail = f"connection sequence {last} -> {seq}"
        out: list[Record] = []
        # The instruments with a channel on this socket (a recording may hold more than a spec does).
        on_conn = dict.fromkeys(i for (c, _), (_, i) in self._channels.items() if c == conn)
        for instrument in on_conn or self.spec(conn).instruments:
            if self.with_trades:
                out.append(Disconnect(instrument, received_ns, VENUE, detail))
            if not (self.with_books and self.states[instrument].phase == "synced"):
                continue
            if self.flags & OB_CHECKSUM:
                # Each book proves itself on its next checksum: its updates are held until then, and
                # only a book that fails resyncs (not every book of the socket).
                self._held.setdefault(instrument, [])
                out.append(self._event(instrument, SEQUENCE_GAP, received_ns, seq, detail + "; held for its checksum"))
            else:
                out += self.resync(instrument, received_ns, SEQUENCE_GAP, detail, seq)
        return out

    def _reset(self, state: Any) -> None:
        super()._reset(state)
        self._held.pop(state.instrument, None)

    def _on_book(self, state: Any, msg: list, received_ns: int) -> list[Record]:
        body = msg[1]
        if body == "cs":
            return self._on_checksum(state, int(msg[2]), received_ns)
        if isinstance(body, list) and (not body or isinstance(body[0], list)):  # the snapshot
            bids, asks = [], []
            for row in body:
                is_bid, level = _row(row)
                (bids if is_bid else asks).append(level)
            state.book.replace(bids, asks)
            self._held.pop(state.instrument, None)  # a whole new book: nothing left to prove
            state.sequence = msg[-1] if self.flags & SEQ_ALL else None
            if crossed := self._check_crossed(state, received_ns):
                return crossed
            return self._synced(state, received_ns, received_ns, "subscribe snapshot")
        if state.phase != "synced":
            return []
        is_bid, level = _row(body)
        if is_bid:
            state.book.set_bid(*level)
        else:
            state.book.set_ask(*level)
        prev, state.sequence = state.sequence, (msg[-1] if self.flags & SEQ_ALL else None)
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        # Book frames carry no exchange time: the receipt time stands in.
        records = self._delta_record(state, received_ns, received_ns, prev,
                                     [level] if is_bid else [], [] if is_bid else [level])  # fmt: skip
        held = self._held.get(state.instrument)
        if held is not None:
            held.extend(records)
            return []
        return records

    def _on_checksum(self, state: Any, checksum: int, received_ns: int) -> list[Record]:
        if state.phase != "synced":
            return []
        ours = book_checksum(state.book)
        if ours == checksum:
            return [self._event(state.instrument, CHECKSUM_OK, received_ns, state.sequence),
                    *self._held.pop(state.instrument, [])]  # fmt: skip
        return self.resync(state.instrument, received_ns, CHECKSUM_MISMATCH, f"venue {checksum}, book {ours}",
                           state.sequence)  # fmt: skip

    def _on_trades(self, instrument: str, msg: list, received_ns: int) -> list[Record]:
        if msg[1] != "te":
            return []  # the history snapshot, and "tu" (the same trade again)
        trade_id, mts, amount, price = msg[2][:4]
        amount = Decimal(amount)
        return [Trade(instrument, int(mts) * 1_000_000, Decimal(price), abs(amount),
                      "buy" if amount > 0 else "sell", str(trade_id), VENUE, received_ns)]  # fmt: skip
