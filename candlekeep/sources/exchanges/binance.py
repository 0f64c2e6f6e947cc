"""Binance spot: trades (`aggTrade`) and the L2 book from `depth@100ms` diffs chained to a REST snapshot.

Facts (developers.binance.com, spot "WebSocket Streams" and "How to manage a local order book
correctly"; recording ../shared/fixtures/exchanges_ws/cryptofeed/BINANCE.ws.1.0.txt with its REST
snapshots BINANCE.http.0.0.txt, listing BINANCE.0.txt):
- URL `wss://stream.binance.com:9443/stream?streams=<s1>/<s2>/...` (combined streams: frames are
  `{"stream": name, "data": {...}}`); the subscription is the URL, at most 1024 streams per
  connection (we put 200 instruments on one, 2 streams each), 5 incoming frames/s, 300 connects
  per 5 min per IP; a connection lives at most 24 h. The server sends protocol pings (the
  websockets library answers them); no app-level ping. 30 s without a frame is a dead socket.
- Symbols: REST `GET /api/v3/exchangeInfo`, `symbols[].symbol` with `baseAsset`/`quoteAsset`:
  `NKNUSDT` is `binance:NKN-USDT`.
- Book: `<sym>@depth@100ms` events `{"e":"depthUpdate","E":ms,"s":sym,"U":first,"u":last,"b":[[px,qty]],
  "a":[...]}` (absolute quantities, "0" deletes) and the REST snapshot
  `GET /api/v3/depth?symbol=SYM&limit=1000` -> `{"lastUpdateId":L,"bids":...,"asks":...}` (request
  weight 50 of 6000/min; the I/O layer's token bucket spaces re-snapshots).
- Integrity (the docs' procedure): buffer the diffs, fetch the snapshot, drop diffs with `u <= L`,
  the first applied diff must have `U <= L+1 <= u`, and each next one `U == previous u + 1` (and
  `pu == previous u` where the stream sends `pu`, as the futures streams do). Anything else is a
  gap: that symbol alone re-fetches its snapshot and re-buffers. A crossed book is a break too.
- Trades: `<sym>@aggTrade` `{"e":"aggTrade","a":aggId,"p":px,"q":qty,"f":firstId,"l":lastId,"T":ms,
  "m":buyerIsMaker}`; the taker sold when the buyer is the maker. The venue trade id is the
  aggregate id `a` (one aggregate is one taker order's fills at one price).

A real depth frame from the recording:

    {"stream":"nknusdt@depth@100ms","data":{"e":"depthUpdate","E":1633998512568,"s":"NKNUSDT",
    "U":499869753,"u":499869754,"b":[["0.35170000","4265.00000000"]],"a":[["0.35290000","10968.00000000"]]}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from candlekeep.bars import Trade
from candlekeep.sources.exchanges.base import (
    SEQUENCE_GAP,
    SEQUENCE_OK,
    BookState,
    ConnectionSpec,
    Connector,
    ConnectorError,
    Record,
    SymbolMap,
    decode_json,
    levels,
    ms_to_ns,
)

WS_URL = "wss://stream.binance.com:9443"
REST_URL = "https://api.binance.com"
LISTING_PATH = "/api/v3/exchangeInfo"
SNAPSHOT_LIMIT = 1000
INSTRUMENTS_PER_CONNECTION = 200


def symbol_map(listing: Mapping[str, Any]) -> SymbolMap:
    """From the exchangeInfo body (`{"symbols":[{"symbol":"NKNUSDT","baseAsset":"NKN",...}]}`)."""
    return SymbolMap.of("binance", ((f"binance:{s['baseAsset']}-{s['quoteAsset']}", s["symbol"])
                                    for s in listing["symbols"]))  # fmt: skip


class BinanceConnector(Connector):
    venue = "binance"
    ws_url = WS_URL
    rest_url = REST_URL
    verified = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._first_after_snapshot: set[str] = set()

    def connections(self) -> list[ConnectionSpec]:
        specs = []
        for n, start in enumerate(range(0, len(self.instruments), INSTRUMENTS_PER_CONNECTION)):
            chunk = self.instruments[start : start + INSTRUMENTS_PER_CONNECTION]
            streams = []
            for instrument in chunk:
                symbol = self.symbols.venue_symbol(instrument).lower()
                if self.with_books:
                    streams.append(f"{symbol}@depth@100ms")
                if self.with_trades:
                    streams.append(f"{symbol}@aggTrade")
            url = f"{self.ws_url}/stream?streams={'/'.join(streams)}"
            specs.append(ConnectionSpec(f"binance-{n}", url, chunk, (), None, silence_timeout_s=30.0))
        return specs

    def snapshot_url(self, instrument: str) -> str | None:
        return f"{self.rest_url}/api/v3/depth?symbol={self.symbols.venue_symbol(instrument)}&limit={SNAPSHOT_LIMIT}"

    # -- frames -----------------------------------------------------------------------------------

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        msg = decode_json(raw)
        data = msg.get("data") if isinstance(msg, dict) else None
        if not isinstance(data, dict):
            if isinstance(msg, dict) and "result" in msg:
                return []  # the answer to a SUBSCRIBE request
            raise ConnectorError(f"unexpected frame shape: {str(msg)[:80]}")
        event = data.get("e")
        if event not in ("depthUpdate", "aggTrade"):
            return []  # bookTicker, kline, ...: not normalized here
        instrument = self.symbols.instrument(data["s"])
        if instrument not in self.states:
            return []
        if event == "aggTrade":
            if not self.with_trades:
                return []
            price, size = levels([(data["p"], data["q"])])[0]
            return [Trade(instrument, ms_to_ns(data["T"]), price, size, "sell" if data["m"] else "buy",
                          str(data["a"]), self.venue, received_ns)]  # fmt: skip
        if not self.with_books:
            return []
        state = self.states[instrument]
        if state.phase != "synced":
            if len(state.buffer) >= self.max_buffered:
                return self.resync(instrument, received_ns, SEQUENCE_GAP, "snapshot too slow: buffer full")
            state.buffer.append((data, received_ns))
            return []
        return self._apply(state, data, received_ns)

    def on_snapshot(self, instrument: str, body: bytes | str, received_ns: int) -> list[Record]:
        snap = decode_json(body)
        if not isinstance(snap, dict) or "lastUpdateId" not in snap:
            raise ConnectorError(f"{instrument}: not a depth snapshot: {str(snap)[:80]}")
        state = self.states[instrument]
        last_id = int(snap["lastUpdateId"])
        state.book.replace(levels(snap["bids"]), levels(snap["asks"]))
        state.sequence = last_id
        buffered, state.buffer = state.buffer, []
        if buffered and int(buffered[0][0]["U"]) > last_id + 1:
            # The stream had already moved past the snapshot: it cannot be chained; fetch again.
            return self.resync(instrument, received_ns, SEQUENCE_GAP,
                               f"snapshot lastUpdateId {last_id} older than first buffered U {buffered[0][0]['U']}")
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        # The book is published whole once the first diff chains onto the snapshot: then it has an
        # exchange time (E) and the same records come out however the snapshot and the stream
        # interleave (live or from a recording).
        state.phase = "synced"
        self._first_after_snapshot.add(instrument)
        out: list[Record] = []
        for data, at in buffered:
            out += self._apply(state, data, at)
            if state.phase != "synced":
                break  # a gap inside the buffer: resync requested, the rest is stale
        return out

    def _apply(self, state: BookState, data: dict[str, Any], received_ns: int) -> list[Record]:
        first, last = int(data["U"]), int(data["u"])
        seq = state.sequence
        assert seq is not None
        if last <= seq:
            return []  # already inside the snapshot
        instrument = state.instrument
        if instrument in self._first_after_snapshot:
            ok = first <= seq + 1 <= last
        elif "pu" in data:
            ok = int(data["pu"]) == seq
        else:
            ok = first == seq + 1
        if not ok:
            return self.resync(instrument, received_ns, SEQUENCE_GAP, f"U={first} u={last} after {seq}", last)
        bids, asks = levels(data["b"]), levels(data["a"])
        state.book.update(bids, asks)
        state.sequence = last
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        checked = self._event(instrument, SEQUENCE_OK, received_ns, last, f"U={first} u={last}")
        if instrument in self._first_after_snapshot:
            self._first_after_snapshot.discard(instrument)
            return [checked, *self._synced(state, ms_to_ns(data["E"]), received_ns, f"chained at u={last}")]
        return [checked, *self._delta_record(state, ms_to_ns(data["E"]), received_ns, seq, bids, asks)]
