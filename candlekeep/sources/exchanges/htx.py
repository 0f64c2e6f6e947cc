"""HTX (Huobi) spot: trades and the 150-level book over `wss://api.huobi.pro/ws` (gzip frames).

Facts (HTX spot API docs, "Websocket Market Data"; the recording HUOBI.ws.44.0, 2021):
- URL `wss://api.huobi.pro/ws` (also `wss://api-aws.huobi.pro/ws`). Every server frame is gzip-
  compressed JSON (the recording keeps them as bytes literals). The server pings
  `{"ping": ts}` every 5 s and drops a client that has not answered `{"pong": ts}` twice; so the
  connector answers each ping itself.
- Subscribe `{"sub":"market.btcusdt.depth.step0","id":"..."}` and `market.btcusdt.trade.detail`;
  answered `{"id":..,"status":"ok","subbed":..}`; errors come as `{"status":"error","err-msg":..}`.
- `depth.step0` is **a full snapshot** of the top 150 levels per side, pushed about once a second:
  `{"ch":..,"ts":ms,"tick":{"bids":[[price,size]],"asks":..,"version":N,"ts":ms}}`. `version`
  grows but is not contiguous (it counts engine updates between pushes), so it orders the pushes
  and nothing more: a push older than the last one is dropped as stale, and **no sequence chain
  or checksum proves a book; these books are published `verified=False`**. Each push replaces the
  book (a `BookSnapshot`); crossed pushes are reported. (HTX's incremental `market.$symbol.mbp.$levels`
  on `/feed` carries `seqNum`/`prevSeqNum`; it is not implemented here and has no recording.)
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
from decimal import Decimal
from typing import Any

from candlekeep.bars import Trade
from candlekeep.sources.exchanges.base import (
    CROSSED,
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
REST_URL = "https://api.huobi.pro"
LISTING_PATH = "/v1/common/symbols"
BOOK_TOPIC = "depth.step0"
TRADE_TOPIC = "trade.detail"
CONN = "htx"
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
    verified = False  # depth.step0 has no sequence chain and no checksum (see above)

    def connections(self) -> list[ConnectionSpec]:
        frames = []
        for n, instrument in enumerate(self.instruments):
            symbol = self.symbols.venue_symbol(instrument)
            if self.with_books:
                frames.append(json.dumps({"sub": f"market.{symbol}.{BOOK_TOPIC}", "id": f"b{n}"}))
            if self.with_trades:
                frames.append(json.dumps({"sub": f"market.{symbol}.{TRADE_TOPIC}", "id": f"t{n}"}))
        return [ConnectionSpec(CONN, self.ws_url, self.instruments, tuple(frames), silence_timeout_s=15.0)]

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        msg = decode_json(inflate(raw))
        if not isinstance(msg, dict):
            raise ConnectorError(f"htx frame is not an object: {str(msg)[:200]}")
        if "ping" in msg:
            self._actions.append(Send(conn, json.dumps({"pong": msg["ping"]})))
            return []
        if msg.get("status") == "error":
            raise ConnectorError(f"htx error {msg.get('err-code')}: {msg.get('err-msg')}")
        channel = msg.get("ch")
        if not channel:
            return []  # subscribe answers
        try:
            _, symbol, topic = channel.split(".", 2)
            instrument = self.symbols.instrument(symbol)
            if instrument not in self.states:
                return []
            if topic == BOOK_TOPIC and self.with_books:
                return self._on_depth(instrument, msg, received_ns)
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
        return [self._snapshot_record(state, ms_to_ns(tick.get("ts", msg["ts"])), received_ns)]

    def _on_trades(self, instrument: str, tick: dict, received_ns: int) -> list[Record]:
        out: list[Record] = []
        for trade in tick["data"]:
            side = trade["direction"]
            if side not in ("buy", "sell"):
                raise ConnectorError(f"htx trade direction {side!r}")
            out.append(Trade(instrument, ms_to_ns(trade["ts"]), Decimal(trade["price"]), Decimal(trade["amount"]),
                             side, str(trade.get("tradeId", trade["id"])), VENUE, received_ns))  # fmt: skip
        return out
