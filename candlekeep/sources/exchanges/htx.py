"""HTX (Huobi) spot: trades and the 150-level book over `wss://api.huobi.pro/ws` and `/feed` (gzip frames).

Facts (HTX spot API docs, "Websocket Market Data"; the recording HUOBI.ws.44.0, 2021):
- URLs `wss://api.huobi.pro/ws` (also `wss://api-aws.huobi.pro/ws`) and `.../feed`. Every server frame is gzip-
  compressed JSON (the recording keeps them as bytes literals). The server pings
  `{"ping": ts}` every 5 s and drops a client that has not answered `{"pong": ts}` twice; so the
  connector answers each ping itself.
- Subscribe `{"sub":"market.btcusdt.depth.step0","id":"..."}` and `market.btcusdt.trade.detail`;
  answered `{"id":..,"status":"ok","subbed":..}`; errors come as `{"status":"error","err-msg":..}`.
- Books, two protocols (`book_channel`):
  * `mbp.150` (the default; HTX support notice 900000047626 "new MBP feed", and the API docs'
    "Market By Price (incremental update)"), served on **`wss://api.huobi.pro/feed`** only:
    `sub` pushes `{"ch":"market.btcusdt.mbp.150","ts":ms,"tick":{"seqNum":N,"prevSeqNum":M,
    "bids":[[price,size]],"asks":..}}` (absolute sizes, 0 removes); the full book is asked for with
    `{"req":"market.btcusdt.mbp.150","id":..}` on the same socket and answered `{"rep":..,"status":
    "ok","data":{"seqNum":S,"bids":..,"asks":..}}`. Integrity, per symbol: increments are buffered
    until the refresh (seqNum S); those with seqNum <= S are in it; the next must have prevSeqNum
    == S, and every later one prevSeqNum == the last seqNum, else that symbol alone asks again.
    Trades stay on `/ws` (a second socket, so losing the book socket does not disconnect trades).
  * `depth.step0` (what the 2021 recording holds): **a full snapshot** of the top 150 levels per
    side, pushed about once a second: `{"ch":..,"ts":ms,"tick":{"bids":..,"asks":..,"version":N,
    "ts":ms}}`. `version` grows but is not contiguous (it counts engine updates between pushes), so
    it orders the pushes and nothing more: a push older than the last one is dropped as stale, and
    **no sequence chain or checksum proves these books: they are published `verified=False`**.
    Each push replaces the book (a `BookSnapshot`); crossed pushes are reported.
- Trades: `trade.detail` ticks hold `data:[{"tradeId":..,"ts":ms,"amount":..,"price":..,
  "direction":"buy"|"sell"}]`; `direction` is the taker's side, `tradeId` the trade id.
- Symbols: the listing `GET /v1/common/symbols` gives `symbol` (`btcusdt`), `base-currency`,
  `quote-currency` (lower case); our id is `htx:BTC-USDT`.
- Prices come as JSON numbers, some in exponent form (`9.121E-7`): decoded to Decimal, digit for digit.

A real (decompressed) book push, levels shortened (HUOBI.ws.44.0.txt):

    {"ch":"market.borusdt.depth.step0","ts":1618678069724,"tick":{"bids":[[710.01,2.260165],
     [710.0,0.104328],...],"asks":[...],"version":326374035,"ts":1618678069722}}
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import replace
from decimal import Decimal
from typing import Any

from candlekeep.bars import Disconnect, Trade
from candlekeep.sources.exchanges.base import (
    CROSSED,
    SEQUENCE_GAP,
    BookState,
    ConnectionSpec,
    Connector,
    ConnectorError,
    Record,
    Send,
    SymbolMap,
    decode_json,
    levels,
    ms_to_ns,
)

VENUE = "htx"
WS_URL = "wss://api.huobi.pro/ws"
FEED_URL = "wss://api.huobi.pro/feed"  # the mbp channels live here only
MBP_CHANNEL = "mbp.150"
REST_URL = "https://api.huobi.pro"
LISTING_PATH = "/v1/common/symbols"
BOOK_TOPIC = "depth.step0"
TRADE_TOPIC = "trade.detail"
CONN = "htx"
FEED_CONN = "htx-feed"
STALE = "stale"  # integrity event: a book push older than the one already published


def symbol_map(listing: Any) -> SymbolMap:
    """The `GET /v1/common/symbols` body -> instrument ids <-> HTX symbols (`btcusdt`)."""
    try:
        rows = listing["data"]
        return SymbolMap.of(VENUE, (
            (f"{VENUE}:{r['base-currency'].upper()}-{r['quote-currency'].upper()}", r["symbol"]) for r in rows
        ))  # fmt: skip
    except (KeyError, TypeError) as exc:
        raise ConnectorError(f"htx symbol listing: {exc!r}") from None


def inflate(raw: str | bytes) -> str | bytes:
    """A server frame: gzip bytes -> JSON text (text frames pass through)."""
    if isinstance(raw, bytes):
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ConnectorError(f"htx frame is not gzip: {exc}") from None
    return raw


class HtxConnector(Connector):
    venue = VENUE
    ws_url = WS_URL
    verified = True  # with mbp.150; depth.step0 books are published unverified (see above)

    def __init__(self, *args: Any, book_channel: str = MBP_CHANNEL, feed_url: str | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        if book_channel not in (MBP_CHANNEL, BOOK_TOPIC):
            raise ConnectorError(f"htx book channel {book_channel!r}: {MBP_CHANNEL} or {BOOK_TOPIC}")
        self.book_channel = book_channel
        self.verified = book_channel == MBP_CHANNEL  # type: ignore[misc]
        # `ws_url` pointed elsewhere (a test, a proxy) serves /feed's channels too unless told otherwise.
        self.feed_url = feed_url or (FEED_URL if self.ws_url == WS_URL else self.ws_url)
        self._req_ids = 0

    def connections(self) -> list[ConnectionSpec]:
        trades, books = [], []
        for n, instrument in enumerate(self.instruments):
            symbol = self.symbols.venue_symbol(instrument)
            if self.with_books:
                books.append(json.dumps({"sub": f"market.{symbol}.{self.book_channel}", "id": f"b{n}"}))
            if self.with_trades:
                trades.append(json.dumps({"sub": f"market.{symbol}.{TRADE_TOPIC}", "id": f"t{n}"}))
        if self.book_channel == BOOK_TOPIC:  # the recorded layout: everything on /ws
            return [ConnectionSpec(CONN, self.ws_url, self.instruments, tuple(books + trades), silence_timeout_s=15.0)]
        specs = []
        if books:
            # No instruments on the book socket: it carries no trades, so it must never vouch for them
            # (the runner's heartbeats and disconnects go by a spec's instruments).
            specs.append(ConnectionSpec(FEED_CONN, self.feed_url, (), tuple(books), silence_timeout_s=15.0))
        if trades:
            specs.append(ConnectionSpec(CONN, self.ws_url, self.instruments, tuple(trades), silence_timeout_s=15.0))
        return specs

    def on_open(self, conn: str, received_ns: int) -> list[Record]:
        if conn == FEED_CONN or (conn == CONN and self.book_channel == BOOK_TOPIC):
            for instrument in self.instruments:
                self._reset(self.states[instrument])
                if conn == FEED_CONN:
                    self._request_snapshot(instrument)
        return []

    def on_close(self, conn: str, received_ns: int, reason: str) -> list[Record]:
        if conn == FEED_CONN:  # the book socket only: its books start over, the trade stream is intact
            for instrument in self.instruments:
                self._reset(self.states[instrument])
            return []
        if self.book_channel == MBP_CHANNEL:  # the trade socket only: its trades break, the books do not
            return [Disconnect(i, received_ns, VENUE, reason) for i in self.spec(conn).instruments]
        return super().on_close(conn, received_ns, reason)

    def _request_snapshot(self, instrument: str) -> None:
        if self.book_channel != MBP_CHANNEL:
            return  # depth.step0: the next push is a whole book anyway
        self._req_ids += 1
        symbol = self.symbols.venue_symbol(instrument)
        self._actions.append(Send(FEED_CONN, json.dumps({"req": f"market.{symbol}.{MBP_CHANNEL}", "id": f"r{self._req_ids}"})))

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        msg = decode_json(inflate(raw))
        if not isinstance(msg, dict):
            raise ConnectorError(f"htx frame is not an object: {str(msg)[:200]}")
        if "ping" in msg:
            self._actions.append(Send(conn, json.dumps({"pong": msg["ping"]})))
            return []
        if msg.get("status") == "error":
            raise ConnectorError(f"htx error {msg.get('err-code')}: {msg.get('err-msg')}")
        if "rep" in msg and msg.get("status") == "ok":
            return self._on_refresh(msg, received_ns)
        channel = msg.get("ch")
        if not channel:
            return []  # subscribe answers
        try:
            _, symbol, topic = channel.split(".", 2)
            instrument = self.symbols.instrument(symbol)
            if instrument not in self.states:
                return []
            if topic == BOOK_TOPIC and self.with_books:  # (also in mbp mode: a recording of step0 replays)
                return self._on_depth(instrument, msg, received_ns)
            if topic == MBP_CHANNEL and self.with_books:
                return self._on_increment(self.states[instrument], msg, received_ns)
            if topic == TRADE_TOPIC and self.with_trades:
                return self._on_trades(instrument, msg["tick"], received_ns)
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise ConnectorError(f"htx {channel} frame: {exc!r}: {str(msg)[:200]}") from None
        return []

    def _on_depth(self, instrument: str, msg: dict, received_ns: int) -> list[Record]:
        tick = msg["tick"]
        state = self.states[instrument]
        version = int(tick["version"])
        if state.sequence is not None and version <= state.sequence:
            return [self._event(instrument, STALE, received_ns, version, f"version {version} after {state.sequence}")]
        state.book.replace(levels(tick["bids"]), levels(tick["asks"]))
        state.sequence = version
        if state.book.crossed():
            bid, ask = state.book.best_bid(), state.book.best_ask()
            # Nothing to re-request: the next push replaces this book anyway. Reported, not published.
            state.sequence = None
            return [self._event(instrument, CROSSED, received_ns, version, f"best bid {bid} >= best ask {ask}")]
        state.phase = "synced"
        # Whatever `book_channel` says, a depth.step0 push is proven by nothing: never `verified`.
        return [replace(self._snapshot_record(state, ms_to_ns(tick.get("ts", msg["ts"])), received_ns), verified=False)]

    def _on_refresh(self, msg: dict, received_ns: int) -> list[Record]:
        try:
            _, symbol, topic = msg["rep"].split(".", 2)
            instrument = self.symbols.instrument(symbol)
            if topic != MBP_CHANNEL or instrument not in self.states:
                return []
            data = msg["data"]
            state = self.states[instrument]
            state.book.replace(levels(data["bids"]), levels(data["asks"]))
            state.sequence = int(data["seqNum"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConnectorError(f"htx refresh: {exc!r}: {str(msg)[:200]}") from None
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        ts_ns = ms_to_ns(msg["ts"]) if msg.get("ts") else received_ns
        out = self._synced(state, ts_ns, received_ns, "req refresh")
        buffered, state.buffer = state.buffer, []
        for tick, ts, buffered_ns in buffered:
            out += self._apply(state, tick, ts, buffered_ns)
            if state.phase != "synced":
                break
        return out

    def _on_increment(self, state: BookState, msg: dict, received_ns: int) -> list[Record]:
        tick, ts_ns = msg["tick"], ms_to_ns(msg["ts"])
        if state.phase != "synced":
            if len(state.buffer) >= self.max_buffered:
                state.buffer.pop(0)
            state.buffer.append((tick, ts_ns, received_ns))
            return []
        return self._apply(state, tick, ts_ns, received_ns)

    def _apply(self, state: BookState, tick: dict, ts_ns: int, received_ns: int) -> list[Record]:
        seq, prev = int(tick["seqNum"]), int(tick["prevSeqNum"])
        last = state.sequence
        assert last is not None
        if seq <= last:
            return []  # already in the refresh
        if prev != last:
            return self.resync(state.instrument, received_ns, SEQUENCE_GAP, f"prevSeqNum {prev}, book at {last}", seq)
        bids, asks = levels(tick.get("bids", [])), levels(tick.get("asks", []))
        state.book.update(bids, asks)
        state.sequence = seq
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        return self._delta_record(state, ts_ns, received_ns, prev, bids, asks)

    def _on_trades(self, instrument: str, tick: dict, received_ns: int) -> list[Record]:
        out: list[Record] = []
        for trade in tick["data"]:
            side = trade["direction"]
            if side not in ("buy", "sell"):
                raise ConnectorError(f"htx trade direction {side!r}")
            out.append(Trade(instrument, ms_to_ns(trade["ts"]), Decimal(trade["price"]), Decimal(trade["amount"]),
                             side, str(trade.get("tradeId", trade["id"])), VENUE, received_ns))  # fmt: skip
        return out
