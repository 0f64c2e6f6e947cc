"""Bybit v5 public WebSocket (spot): trades and the 50-level book over `wss://stream.bybit.com/v5/public/spot`.

Facts (Bybit v5 docs, bybit-exchange.github.io/docs/v5/websocket/public/orderbook and .../trade,
and docs/v5/ws/connect):
- URL `wss://stream.bybit.com/v5/public/{spot|linear|inverse}`; this connector speaks spot.
  Subscribe `{"op":"subscribe","args":["orderbook.50.BTCUSDT","publicTrade.BTCUSDT"]}` (spot takes at
  most 10 args per request), answered `{"success":true,"op":"subscribe",...}`. App ping
  `{"op":"ping"}` every 20 s, or the server closes the socket.
- `orderbook.{depth}.{symbol}`: a `snapshot` right after subscribing, then `delta`s with absolute
  sizes (0 deletes): `{"topic":..,"type":"snapshot"|"delta","ts":ms,"data":{"s":..,"b":[[price,size]],
  "a":[...],"u":update id,"seq":cross sequence},"cts":ms}`. A new snapshot replaces the book, and
  `u` = 1 means the venue restarted its book service (a snapshot follows the same rule).
- Integrity, per symbol: `u` is one higher on every delta of a topic; any other step resyncs that
  symbol alone (unsubscribe + subscribe its book topic: the venue answers with a snapshot). Crossed
  books resync too. `seq` (the cross sequence) is kept as the records' sequence is `u`.
- `publicTrade.{symbol}`: `data` is a list of `{"T":ms,"s":..,"S":"Buy"|"Sell" (the taker),
  "v":size,"p":price,"i":trade id,"BT":block trade}`.
- Symbols: `GET /v5/market/instruments-info?category=spot` lists `symbol`, `baseCoin`, `quoteCoin`
  (the 2021 recording's listing is the older `/v2/public/symbols`: `name`, `base_currency`,
  `quote_currency`; both are read).
- The recording BYBIT.ws.25.0 (2021) is the retired v1 `realtime_public` API: `orderBookL2_25`
  deltas keyed by level id (`delete`/`update`/`insert`) with a non-contiguous `cross_seq`. That is
  another protocol, which this parser does not pretend to read; the tests use the v5 docs' frames.

The v5 docs' delta example (spread trading page, same orderbook format):

    {"topic":"orderbook.25.SOLUSDT_SOL/USDT","ts":1744165512257,"type":"delta","data":{"s":
     "SOLUSDT_SOL/USDT","b":[],"a":[["22.3755","4.7"]],"u":64892,"seq":299084},"cts":1744165512234}
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from candlekeep.bars import Trade
from candlekeep.sources.exchanges.base import (
    SEQUENCE_GAP,
    ConnectionSpec,
    Connector,
    ConnectorError,
    PingRule,
    Record,
    Send,
    SymbolMap,
    decode_json,
    levels,
    ms_to_ns,
)

VENUE = "bybit"
WS_URL = "wss://stream.bybit.com/v5/public/spot"
REST_URL = "https://api.bybit.com"
LISTING_PATH = "/v5/market/instruments-info?category=spot"
DEPTH = 50
ARGS_PER_REQUEST = 10
PING = PingRule(20.0, json.dumps({"op": "ping"}))
CONN = "bybit"

_SIDES = {"Buy": "buy", "Sell": "sell"}


def symbol_map(listing: Any) -> SymbolMap:
    """The v5 `instruments-info` body (or the older v2 `symbols` one) -> instrument ids <-> symbols."""
    try:
        result = listing["result"]
        if isinstance(result, dict):  # v5
            rows = [(r["baseCoin"], r["quoteCoin"], r["symbol"]) for r in result["list"]]
        else:  # v2
            rows = [(r["base_currency"], r["quote_currency"], r["name"]) for r in result]
    except (KeyError, TypeError) as exc:
        raise ConnectorError(f"bybit symbol listing: {exc!r}") from None
    return SymbolMap.of(VENUE, ((f"{VENUE}:{b.upper()}-{q.upper()}", s) for b, q, s in rows))


class BybitConnector(Connector):
    venue = VENUE
    ws_url = WS_URL
    verified = True

    def _book_topic(self, instrument: str) -> str:
        return f"orderbook.{DEPTH}.{self.symbols.venue_symbol(instrument)}"

    def connections(self) -> list[ConnectionSpec]:
        topics = []
        for instrument in self.instruments:
            if self.with_books:
                topics.append(self._book_topic(instrument))
            if self.with_trades:
                topics.append(f"publicTrade.{self.symbols.venue_symbol(instrument)}")
        frames = tuple(json.dumps({"op": "subscribe", "args": topics[i : i + ARGS_PER_REQUEST]})
                       for i in range(0, len(topics), ARGS_PER_REQUEST))  # fmt: skip
        return [ConnectionSpec(CONN, self.ws_url, self.instruments, frames, PING)]

    def on_open(self, conn: str, received_ns: int) -> list[Record]:
        for instrument in self.spec(conn).instruments:  # the subscribe brings each snapshot
            self._reset(self.states[instrument])
        return []

    def _request_snapshot(self, instrument: str) -> None:
        topic = self._book_topic(instrument)
        self._actions.append(Send(CONN, json.dumps({"op": "unsubscribe", "args": [topic]})))
        self._actions.append(Send(CONN, json.dumps({"op": "subscribe", "args": [topic]})))

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        msg = decode_json(raw)
        if not isinstance(msg, dict):
            raise ConnectorError(f"bybit frame is not an object: {str(msg)[:200]}")
        topic = msg.get("topic")
        if topic is None:
            if msg.get("success") is False:
                raise ConnectorError(f"bybit refused {msg.get('op')}: {msg.get('ret_msg')}")
            return []  # subscribe answers, pongs
        kind, _, symbol = topic.rpartition(".")
        try:
            instrument = self.symbols.instrument(symbol)
            if instrument not in self.states:
                return []
            if kind.startswith("orderbook.") and self.with_books:
                return self._on_book(instrument, msg, received_ns)
            if kind == "publicTrade" and self.with_trades:
                return self._on_trades(instrument, msg["data"], received_ns)
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise ConnectorError(f"bybit {topic} frame: {exc!r}: {str(msg)[:200]}") from None
        return []

    def _on_book(self, instrument: str, msg: dict, received_ns: int) -> list[Record]:
        state = self.states[instrument]
        data = msg["data"]
        update_id = int(data["u"])
        ts_ns = ms_to_ns(msg.get("cts") or msg["ts"])
        bids, asks = levels(data.get("b", [])), levels(data.get("a", []))
        if msg["type"] == "snapshot":
            state.book.replace(bids, asks)
            state.sequence = update_id
            if crossed := self._check_crossed(state, received_ns):
                return crossed
            return self._synced(state, ts_ns, received_ns, "snapshot" if update_id != 1 else "snapshot (u=1: venue restart)")
        if msg["type"] != "delta":
            raise ConnectorError(f"bybit book frame of type {msg['type']!r}")
        if state.phase != "synced":
            return []  # a resubscribe is under way: its snapshot will hold this
        last = state.sequence
        assert last is not None
        if update_id != last + 1:
            return self.resync(instrument, received_ns, SEQUENCE_GAP, f"u {last} -> {update_id}", update_id)
        state.book.update(bids, asks)
        state.sequence = update_id
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        return self._delta_record(state, ts_ns, received_ns, last, bids, asks)

    def _on_trades(self, instrument: str, data: list[dict], received_ns: int) -> list[Record]:
        out: list[Record] = []
        for t in data:
            try:
                side = _SIDES[t["S"]]
            except KeyError:
                raise ConnectorError(f"bybit trade side {t.get('S')!r}") from None
            out.append(Trade(instrument, ms_to_ns(t["T"]), Decimal(t["p"]), Decimal(t["v"]), side, str(t["i"]),
                             VENUE, received_ns))  # fmt: skip
        return out
