"""Coinbase Exchange market data: trades and the L2 book over `wss://ws-feed.exchange.coinbase.com`.

Facts (Coinbase Exchange WebSocket docs, docs.cdp.coinbase.com/exchange/websocket-feed):
- URL `wss://ws-feed.exchange.coinbase.com`, the unauthenticated market-data feed: the
  `ws-feed.pro.coinbase.com` of the recording (COINBASE.ws.28.0, 2021) under its current name, with
  the same JSON frames. A subscribe must arrive within 5 s of connecting or the server hangs up.
- Subscribe `{"type":"subscribe","product_ids":[...],"channels":[...]}`, answered by
  `subscriptions`. The book channel (`level2`, or `level2_batch`: the same frames batched every 50 ms,
  unauthenticated) sends one `snapshot` per product, then `l2update`s whose `changes` are
  `[side, price, new size]` (absolute; size 0 removes the level). `matches` sends `last_match` (the
  product's latest trade) once, then one `match` per trade. Resync of one product = unsubscribe and
  subscribe its book channel again (a fresh `snapshot`); there is no REST step.
- Symbols: product ids are `BASE-QUOTE` already (`BTC-USD`); the listing `GET /products` gives `id`,
  `base_currency`, `quote_currency` (COINBASE.0.txt).
- Sides: a match's `side` is the MAKER order's side; the taker (aggressor) is the other one.
  `trade_id` is an integer per product, one higher for each trade, so a skipped id is a lost trade
  (a `Disconnect` of that instrument's trades). The `heartbeat` channel sends, every second per
  product, `{"type":"heartbeat","sequence":..,"last_trade_id":..,"product_id":..,"time":..}`: a
  `last_trade_id` above the last trade we saw means trades were lost even while the feed is quiet,
  and the heartbeats keep a quiet socket from being taken for a dead one.
- Integrity: **the level2 channels carry no sequence number and no checksum** (only `ticker` and
  `match` frames are sequenced, by the product's whole order flow, which cannot chain L2 updates).
  Books of this venue are published `verified=False`; every update is still checked for a crossed
  book, which resyncs that product alone.

A real `l2update` (COINBASE.ws.28.0.txt):

    {"type":"l2update","product_id":"SKL-BTC","changes":[["sell","0.00001306","660.5"]],
     "time":"2021-04-17T16:43:37.075687Z"}

and a real `match`:

    {"type":"match","trade_id":280232,"maker_order_id":"2a0da34e-...","taker_order_id":"3c82abaa-...",
     "side":"sell","size":"985","price":"0.00001305","product_id":"SKL-BTC","sequence":177100030,
     "time":"2021-04-17T16:43:37.089723Z"}
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from candlekeep.bars import Disconnect, Trade
from candlekeep.books import Level
from candlekeep.sources.exchanges.base import (
    ConnectionSpec,
    Connector,
    ConnectorError,
    Record,
    Send,
    SymbolMap,
    decode_json,
    levels,
)

VENUE = "coinbase"
WS_URL = "wss://ws-feed.exchange.coinbase.com"
REST_URL = "https://api.exchange.coinbase.com"
LISTING_PATH = "/products"
BOOK_CHANNEL = "level2_batch"
TRADE_CHANNEL = "matches"
HEARTBEAT_CHANNEL = "heartbeat"
CONN = "coinbase"

_TAKER_SIDE = {"buy": "sell", "sell": "buy"}  # a match's `side` is the maker's


def iso_to_ns(text: str) -> int:
    """`2021-04-17T16:43:37.075687Z` (up to 9 fractional digits) -> unix ns, without a float."""
    head, dot, tail = text.rstrip("Z").partition(".")
    if dot and not (tail.isdigit() and len(tail) <= 9):
        raise ConnectorError(f"bad timestamp {text!r}")
    return _whole_seconds(head) * 1_000_000_000 + (int(tail.ljust(9, "0")) if dot else 0)


@functools.lru_cache(maxsize=4096)
def _whole_seconds(head: str) -> int:
    """`2021-04-17T16:43:37` -> unix seconds (cached: a busy feed repeats each second many times)."""
    try:
        return int(datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp())
    except ValueError:
        raise ConnectorError(f"bad timestamp {head!r}") from None


def symbol_map(products: Any) -> SymbolMap:
    """The `GET /products` body -> instrument ids; a product id is already `BASE-QUOTE`."""
    if not isinstance(products, list):
        raise ConnectorError(f"coinbase products listing is not a list: {str(products)[:200]}")
    return SymbolMap.of(VENUE, (
        (f"{VENUE}:{p['base_currency'].upper()}-{p['quote_currency'].upper()}", p["id"]) for p in products
    ))  # fmt: skip


class CoinbaseConnector(Connector):
    venue = VENUE
    ws_url = WS_URL
    verified = False  # no sequence numbers and no checksum on the L2 channels (see above)

    def __init__(self, symbols: SymbolMap, instruments: Sequence[str], *, book_channel: str = BOOK_CHANNEL,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(symbols, instruments, **kwargs)
        self.book_channel = book_channel
        self._last_trade_id: dict[str, int] = {}

    def _channels(self) -> list[str]:
        trades = [TRADE_CHANNEL, HEARTBEAT_CHANNEL] if self.with_trades else []
        return ([self.book_channel] if self.with_books else []) + trades

    def _frame(self, kind: str, product_ids: list[str], channels: list[str]) -> str:
        return json.dumps({"type": kind, "product_ids": product_ids, "channels": channels})

    def connections(self) -> list[ConnectionSpec]:
        products = [self.symbols.venue_symbol(i) for i in self.instruments]
        frame = self._frame("subscribe", products, self._channels())
        return [ConnectionSpec(CONN, self.ws_url, self.instruments, (frame,), silence_timeout_s=15.0)]

    def on_open(self, conn: str, received_ns: int) -> list[Record]:
        # The subscribe itself brings every product's snapshot: nothing to request.
        for instrument in self.spec(conn).instruments:
            self._reset(self.states[instrument])
            self._last_trade_id.pop(instrument, None)
        return []

    def _request_snapshot(self, instrument: str) -> None:
        product = [self.symbols.venue_symbol(instrument)]
        self._actions.append(Send(CONN, self._frame("unsubscribe", product, [self.book_channel])))
        self._actions.append(Send(CONN, self._frame("subscribe", product, [self.book_channel])))

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        msg = decode_json(raw)
        kind = msg.get("type") if isinstance(msg, dict) else None
        try:
            if kind == "l2update":
                return self._on_update(msg, received_ns)
            if kind in ("match", "last_match"):
                return self._on_match(msg, received_ns)
            if kind == "snapshot":
                return self._on_snapshot_frame(msg, received_ns)
            if kind == "heartbeat":
                return self._on_heartbeat(msg, received_ns)
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise ConnectorError(f"coinbase {kind} frame: {exc!r}: {str(msg)[:200]}") from None
        if kind == "error":
            raise ConnectorError(f"coinbase error: {msg.get('message')} {msg.get('reason', '')}".strip())
        return []  # subscriptions, ticker: nothing to publish

    def _on_snapshot_frame(self, msg: dict, received_ns: int) -> list[Record]:
        state = self.states.get(self.symbols.instrument(msg["product_id"]))
        if state is None or not self.with_books:
            return []  # a product we do not follow
        state.book.replace(levels(msg["bids"]), levels(msg["asks"]))
        # No exchange time on the snapshot (none in the recording): the receipt time stands in.
        ts_ns = iso_to_ns(msg["time"]) if msg.get("time") else received_ns
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        return self._synced(state, ts_ns, received_ns, "snapshot frame")

    def _on_update(self, msg: dict, received_ns: int) -> list[Record]:
        state = self.states.get(self.symbols.instrument(msg["product_id"]))
        if state is None or state.phase != "synced":
            return []  # a resync is under way: updates before its snapshot are already in it
        bids: list[Level] = []
        asks: list[Level] = []
        for side, price, size in msg["changes"]:
            level = (Decimal(price), Decimal(size))
            if side == "buy":
                bids.append(level)
            elif side == "sell":
                asks.append(level)
            else:
                raise ConnectorError(f"coinbase l2update side {side!r}")
        state.book.update(bids, asks)
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        return self._delta_record(state, iso_to_ns(msg["time"]), received_ns, None, bids, asks)

    def _on_heartbeat(self, msg: dict, received_ns: int) -> list[Record]:
        instrument = self.symbols.instrument(msg["product_id"])
        if instrument not in self.states or not self.with_trades:
            return []
        venue_last, ours = int(msg["last_trade_id"]), self._last_trade_id.get(instrument)
        if ours is None or venue_last <= ours:
            if ours is None:
                self._last_trade_id[instrument] = venue_last  # a starting point
            return []
        self._count(instrument, "trade_gap")
        self._last_trade_id[instrument] = venue_last
        return [Disconnect(instrument, received_ns, VENUE, f"trade ids {ours + 1}..{venue_last} missed (heartbeat)")]

    def _on_match(self, msg: dict, received_ns: int) -> list[Record]:
        instrument = self.symbols.instrument(msg["product_id"])
        if instrument not in self.states or not self.with_trades:
            return []  # a product we do not follow
        out: list[Record] = []
        trade_id = int(msg["trade_id"])
        last = self._last_trade_id.get(instrument)
        if last is not None and trade_id <= last:
            return []  # a repeat (last_match after a resubscribe)
        if last is not None and trade_id != last + 1:
            self._count(instrument, "trade_gap")
            out.append(Disconnect(instrument, received_ns, VENUE, f"trade ids {last + 1}..{trade_id - 1} missed"))
        self._last_trade_id[instrument] = trade_id
        if msg["type"] == "last_match":
            return out  # the product's latest trade from before we subscribed: a starting point only
        try:
            side = _TAKER_SIDE[msg["side"]]
        except KeyError:
            raise ConnectorError(f"coinbase match side {msg.get('side')!r}") from None
        out.append(Trade(instrument, iso_to_ns(msg["time"]), Decimal(msg["price"]), Decimal(msg["size"]), side,
                         str(trade_id), VENUE, received_ns))  # fmt: skip
        return out
