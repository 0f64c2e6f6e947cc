"""Gate.io spot (API v4): trades and the L2 book over `wss://api.gateio.ws/ws/v4/`, chained to REST.

Facts (Gate.io API v4 docs, "Spot WebSocket v4"; the recording GATEIO.ws.1.0 + GATEIO.http.0.0, 2021):
- URL `wss://api.gateio.ws/ws/v4/`. Requests are `{"time":unix s,"channel":...,"event":"subscribe",
  "payload":[...]}`, answered `{"event":"subscribe","result":{"status":"success"}}`; pushes have
  `"event":"update"`. App ping: `{"time":...,"channel":"spot.ping"}` (answered by `spot.pong`).
- `spot.order_book_update` (payload `[pair, "100ms"]`, one subscribe per pair) pushes
  `{"t":ms,"s":pair,"U":first id,"u":last id,"b":[[price,size]],"a":[...]}`: absolute sizes, 0 removes.
  Snapshot: `GET /api/v4/spot/order_book?currency_pair=P&limit=100&with_id=true` answers
  `{"id":N,"asks":..,"bids":..}`.
- Integrity, per pair (the docs' "how to maintain a local order book"): updates are buffered until
  the snapshot (id N); those with u <= N are dropped; the first applied one must have U <= N+1; from
  then on U == last u + 1, else that pair alone re-fetches its snapshot. Crossed books resync too.
  (The 100-level snapshot plus full-depth updates keeps the top of the book exact; levels deeper
  than the snapshot are known only once an update touches them.)
- `spot.trades` (payload: pairs) pushes `{"id":..,"create_time_ms":"1619093543708.2642",
  "side":"sell","currency_pair":..,"amount":..,"price":..}`; `side` is the taker's.
- Symbols: the listing `GET /api/v4/spot/currency_pairs` gives `id` (`BTC_USDT`), `base`, `quote`.

A real book update (GATEIO.ws.1.0.txt, levels shortened):

    {"time":1619093532,"channel":"spot.order_book_update","event":"update","result":{"t":1619093532978,
     "e":"depthUpdate","E":1619093532,"s":"HAI_ETH","U":2691446,"u":2691446,"b":[["0.00010322",
     "5360.209"],...],"a":[...]}}
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from candlekeep.bars import Trade
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

VENUE = "gateio"
WS_URL = "wss://api.gateio.ws/ws/v4/"
REST_URL = "https://api.gateio.ws"
LISTING_PATH = "/api/v4/spot/currency_pairs"
SNAPSHOT_PATH = "/api/v4/spot/order_book"
SNAPSHOT_LIMIT = 100
BOOK_INTERVAL = "100ms"
CONN = "gateio"


def symbol_map(pairs: Any) -> SymbolMap:
    """The `GET /api/v4/spot/currency_pairs` body -> instrument ids <-> Gate.io pair ids."""
    if not isinstance(pairs, list):
        raise ConnectorError(f"gateio pair listing is not a list: {str(pairs)[:200]}")
    return SymbolMap.of(VENUE, ((f"{VENUE}:{p['base'].upper()}-{p['quote'].upper()}", p["id"]) for p in pairs))


class GateioConnector(Connector):
    venue = VENUE
    ws_url = WS_URL
    rest_url = REST_URL
    verified = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._applied_since_snapshot: set[str] = set()

    def _request(self, channel: str, payload: list[str]) -> str:
        return json.dumps({"time": int(time.time()), "channel": channel, "event": "subscribe", "payload": payload})

    def connections(self) -> list[ConnectionSpec]:
        pairs = [self.symbols.venue_symbol(i) for i in self.instruments]
        frames = [self._request("spot.trades", pairs)] if self.with_trades else []
        if self.with_books:
            frames += [self._request("spot.order_book_update", [p, BOOK_INTERVAL]) for p in pairs]
        ping = PingRule(15.0, json.dumps({"channel": "spot.ping"}))
        return [ConnectionSpec(CONN, self.ws_url, self.instruments, tuple(frames), ping)]

    def snapshot_url(self, instrument: str) -> str | None:
        query = urlencode({"currency_pair": self.symbols.venue_symbol(instrument), "limit": SNAPSHOT_LIMIT,
                           "with_id": "true"})  # fmt: skip
        return f"{str(self.rest_url).rstrip('/')}{SNAPSHOT_PATH}?{query}"

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        msg = decode_json(raw)
        if not isinstance(msg, dict):
            raise ConnectorError(f"gateio frame is not an object: {str(msg)[:200]}")
        if msg.get("error"):
            raise ConnectorError(f"gateio error on {msg.get('channel')}: {msg['error']}")
        if msg.get("event") != "update":
            return []  # subscribe answers, pong
        channel, result = msg.get("channel"), msg.get("result")
        try:
            if channel == "spot.order_book_update":
                return self._on_update(result, received_ns)
            if channel == "spot.trades":
                return self._on_trade(result, received_ns)
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise ConnectorError(f"gateio {channel} frame: {exc!r}: {str(msg)[:200]}") from None
        return []  # tickers, candlesticks

    def _on_trade(self, result: dict, received_ns: int) -> list[Record]:
        instrument = self.symbols.instrument(result["currency_pair"])
        if instrument not in self.states or not self.with_trades:
            return []
        side = result["side"]
        if side not in ("buy", "sell"):
            raise ConnectorError(f"gateio trade side {side!r}")
        return [Trade(instrument, ms_to_ns_exact(result["create_time_ms"]), Decimal(result["price"]),
                      Decimal(result["amount"]), side, str(result["id"]), VENUE, received_ns)]  # fmt: skip

    def _on_update(self, result: dict, received_ns: int) -> list[Record]:
        state = self.states.get(self.symbols.instrument(result["s"]))
        if state is None or not self.with_books:
            return []
        if state.phase != "synced":
            if len(state.buffer) >= self.max_buffered:
                state.buffer.pop(0)
            state.buffer.append((result, received_ns))
            return []
        return self._apply(state, result, received_ns)

    def _apply(self, state: BookState, result: dict, received_ns: int) -> list[Record]:
        first, last_id = int(result["U"]), int(result["u"])
        last = state.sequence
        assert last is not None
        if last_id <= last:
            return []  # already in the snapshot
        if first > last + 1 or (first < last + 1 and state.instrument in self._applied_since_snapshot):
            # A hole, or (after the first applied update) an overlap: the chain is broken.
            return self.resync(state.instrument, received_ns, SEQUENCE_GAP,
                               f"expected U={last + 1}, got U={first} u={last_id}", first)  # fmt: skip
        bids, asks = levels(result.get("b", [])), levels(result.get("a", []))
        state.book.update(bids, asks)
        state.sequence = last_id
        self._applied_since_snapshot.add(state.instrument)
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        return self._delta_record(state, ms_to_ns(result["t"]), received_ns, first - 1, bids, asks)

    def on_snapshot(self, instrument: str, body: bytes | str, received_ns: int) -> list[Record]:
        msg = decode_json(body)
        state = self.states[instrument]
        try:
            state.book.replace(levels(msg["bids"]), levels(msg["asks"]))
            state.sequence = int(msg["id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConnectorError(f"gateio snapshot of {instrument}: {exc!r}: {str(msg)[:200]}") from None
        self._applied_since_snapshot.discard(instrument)
        # `current` (ms) is the snapshot's exchange time where the venue sends it (not in 2021).
        ts_ns = ms_to_ns(msg["current"]) if msg.get("current") else received_ns
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        out = self._synced(state, ts_ns, received_ns, "REST snapshot")
        buffered, state.buffer = state.buffer, []
        for result, buffered_ns in buffered:
            out += self._apply(state, result, buffered_ns)
            if state.phase != "synced":
                break
        return out


def ms_to_ns_exact(text: str | int | Decimal) -> int:
    """`"1619093543708.2642"` (milliseconds with a fraction) -> ns, without a float."""
    return int(Decimal(str(text)) * 1_000_000)
