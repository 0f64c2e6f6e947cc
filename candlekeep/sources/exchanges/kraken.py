"""Kraken spot, WebSocket API v1: trades and the L2 book, every update proven by Kraken's CRC32.

Facts (docs.kraken.com "Spot Websockets (v1)", "Book Checksum (WebSocket v1)"; recording
../shared/fixtures/exchanges_ws/cryptofeed/KRAKEN.ws.48/50.0.txt, listing KRAKEN.0.txt):
- URL `wss://ws.kraken.com`; one connection carries every pair. Subscribe
  `{"event":"subscribe","pair":["XBT/USD",...],"subscription":{"name":"book","depth":1000}}` and
  `{"name":"trade"}`. Depths 10, 25, 100, 500, 1000.
- The server sends `{"event":"heartbeat"}` about once a second when a channel is quiet; we also
  send the app-level `{"event":"ping"}` every 20 s and treat 10 s without any frame as a dead socket.
- Symbols: REST `GET /0/public/AssetPairs`, field `wsname` ("XBT/USD"). Kraken calls bitcoin XBT
  and dogecoin XDG: ours are `kraken:BTC-USD`, `kraken:DOGE-USD`.
- Book frames: `[channelID, {"as":[...],"bs":[...]}, "book-1000", "XBT/USD"]` is the snapshot;
  updates are `[channelID, {"a":[...]}, {"b":[...], "c":"<crc32>"}, "book-1000", pair]` (one or two
  dicts), levels `[price, volume, timestamp(, "r")]`, volume "0.00000000" deletes. Updates are
  applied in array order; after each update the book is truncated to the subscribed depth (Kraken
  sends no delete for a level pushed out of scope).
- Integrity: no sequence numbers; every update carries `c`, the CRC32 (unsigned) of the top 10
  asks then top 10 bids, each as price then volume with the '.' and the leading zeros removed
  (`candlekeep.orderbook.kraken_checksum`). A mismatch (or a crossed book) resyncs that pair only:
  unsubscribe + subscribe its book channel, which sends a fresh snapshot.
- Trades: `[channelID, [[price, volume, time, side b|s, ordertype m|l, misc], ...], "trade", pair]`;
  side is the taker's. v1 has no trade id: ours is `<time in ns>-<index in the frame>`, unique
  and in exchange order.

A real update frame from the recording (KRAKEN.ws.50.0.txt):

    [1920,{"a":[["0.042990","364630.28272081","1618678145.920470"]]},{"b":[["0.042990","0.00000000",
    "1618678145.920708"]],"c":"4105471083"},"book-1000","SC/EUR"]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from candlekeep.bars import Trade
from candlekeep.books import Level
from candlekeep.orderbook import kraken_checksum
from candlekeep.sources.exchanges.base import (
    CHECKSUM_MISMATCH,
    CHECKSUM_OK,
    ConnectionSpec,
    Connector,
    ConnectorError,
    PingRule,
    Record,
    Send,
    SymbolMap,
    decode_json,
    levels,
    seconds_text_to_ns,
)

WS_URL = "wss://ws.kraken.com"
REST_URL = "https://api.kraken.com"
LISTING_PATH = "/0/public/AssetPairs"
ASSET_ALIASES = {"XBT": "BTC", "XDG": "DOGE"}
DEPTH = 1000
CONN = "kraken-0"


def symbol_map(listing: Mapping[str, Any]) -> SymbolMap:
    """From the AssetPairs body (`{"error": [], "result": {name: {"wsname": "XBT/USD", ...}}}`)."""
    pairs = []
    for info in listing["result"].values():
        wsname = info.get("wsname")
        if not wsname or "/" not in wsname or wsname.endswith(".d"):
            continue
        base, quote = wsname.split("/")
        base, quote = ASSET_ALIASES.get(base, base), ASSET_ALIASES.get(quote, quote)
        pairs.append((f"kraken:{base}-{quote}", wsname))
    return SymbolMap.of("kraken", pairs)


class KrakenConnector(Connector):
    venue = "kraken"
    ws_url = WS_URL
    book_depth = DEPTH
    verified = True

    def connections(self) -> list[ConnectionSpec]:
        pairs = [self.symbols.venue_symbol(i) for i in self.instruments]
        frames = []
        if self.with_books:
            frames.append(self._subscription("subscribe", pairs, book=True))
        if self.with_trades:
            frames.append(self._subscription("subscribe", pairs, book=False))
        return [ConnectionSpec(CONN, self.ws_url, self.instruments, tuple(frames),
                               PingRule(20.0, '{"event":"ping"}'), silence_timeout_s=10.0)]  # fmt: skip

    @staticmethod
    def _subscription(event: str, pairs: Sequence[str], *, book: bool) -> str:
        subscription: dict[str, Any] = {"name": "book", "depth": DEPTH} if book else {"name": "trade"}
        return json.dumps({"event": event, "pair": list(pairs), "subscription": subscription}, separators=(",", ":"))

    def on_open(self, conn: str, received_ns: int) -> list[Record]:
        for instrument in self.spec(conn).instruments:
            self._reset(self.states[instrument])  # the subscribe frames bring the snapshots
        return []

    def _request_snapshot(self, instrument: str) -> None:
        """Kraken has no REST snapshot for the WS book: resubscribing one pair sends a fresh one."""
        pair = [self.symbols.venue_symbol(instrument)]
        self._actions.append(Send(CONN, self._subscription("unsubscribe", pair, book=True)))
        self._actions.append(Send(CONN, self._subscription("subscribe", pair, book=True)))

    # -- frames -----------------------------------------------------------------------------------

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        msg = decode_json(raw)
        if isinstance(msg, dict):
            if msg.get("event") == "subscriptionStatus" and msg.get("status") == "error":
                raise ConnectorError(f"subscription refused: {msg.get('errorMessage')} ({msg.get('pair')})")
            return []  # heartbeat, pong, systemStatus, subscriptionStatus
        if not isinstance(msg, list) or len(msg) < 4:
            raise ConnectorError(f"unexpected frame shape: {str(msg)[:80]}")
        channel, pair = msg[-2], msg[-1]
        instrument = self.symbols.instrument(pair)
        if instrument not in self.states:
            return []
        if channel == "trade":
            return self._trades(instrument, msg[1], received_ns) if self.with_trades else []
        if isinstance(channel, str) and channel.startswith("book"):
            return self._book(instrument, msg[1:-2], received_ns) if self.with_books else []
        return []

    def _trades(self, instrument: str, rows: list[list[Any]], received_ns: int) -> list[Record]:
        out: list[Record] = []
        for i, row in enumerate(rows):
            ts_ns = seconds_text_to_ns(row[2])
            out.append(Trade(instrument, ts_ns, levels([row])[0][0], levels([row])[0][1],
                             "buy" if row[3] == "b" else "sell", f"{ts_ns}-{i}", self.venue, received_ns))  # fmt: skip
        return out

    def _book(self, instrument: str, parts: list[dict[str, Any]], received_ns: int) -> list[Record]:
        state = self.states[instrument]
        book = state.book
        if "as" in parts[0] or "bs" in parts[0]:  # the snapshot
            asks = levels(parts[0].get("as", ()))
            bids = levels(parts[0].get("bs", ()))
            book.replace(bids, asks)
            book.truncate()
            ts_ns = _latest(parts[0].get("as", ()), parts[0].get("bs", ()))
            if crossed := self._check_crossed(state, received_ns):
                return crossed
            return self._synced(state, ts_ns, received_ns, "snapshot")
        if state.phase != "synced":
            return []  # an update of a book we are resyncing: the coming snapshot replaces it
        bids: list[Level] = []
        asks: list[Level] = []
        checksum: str | None = None
        raw_asks: list[Any] = []
        raw_bids: list[Any] = []
        for part in parts:  # in array order: the last entries are the most recent
            if "a" in part:
                raw_asks += part["a"]
                for price, size in levels(part["a"]):
                    book.set_ask(price, size)
                    asks.append((price, size))
            if "b" in part:
                raw_bids += part["b"]
                for price, size in levels(part["b"]):
                    book.set_bid(price, size)
                    bids.append((price, size))
            checksum = part.get("c", checksum)
        book.truncate()
        ts_ns = _latest(raw_asks, raw_bids)
        if checksum is None:
            raise ConnectorError(f"{instrument}: book update without a checksum")
        computed = kraken_checksum(book)
        if computed != int(checksum):
            return self.resync(instrument, received_ns, CHECKSUM_MISMATCH,
                               f"venue crc32 {checksum}, book gives {computed}")  # fmt: skip
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        out: list[Record] = [self._event(instrument, CHECKSUM_OK, received_ns, None, checksum)]
        out += self._delta_record(state, ts_ns, received_ns, None, bids, asks)
        return out


def _latest(*sides: Sequence[Sequence[Any]]) -> int:
    """Exchange time of an update: its newest level timestamp."""
    return max((seconds_text_to_ns(row[2]) for side in sides for row in side), default=0)
