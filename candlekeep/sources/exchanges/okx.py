"""OKX, WebSocket API v5 (public): trades and the 400-level L2 book, checked by seqId chain and CRC32.

Facts (OKX v5 docs "WebSocket: Order book channel", "Trades channel", "Connect"; recording
../shared/fixtures/exchanges_ws/cryptofeed/OKX.ws.1.0.txt of 2022-05-13, listing OKX.0.txt):
- URL `wss://ws.okx.com:8443/ws/v5/public`; subscribe
  `{"op":"subscribe","args":[{"channel":"books","instId":"BTC-USDT"},{"channel":"trades",...}]}`.
  At most 480 subscribe/unsubscribe requests per hour per connection, 3 connects per second per IP;
  we batch every instrument in one request per channel.
- Pings: the server closes a connection quiet for 30 s; we send the text `ping` every 20 s and the
  server answers `pong`. 30 s without any frame is a dead socket.
- Symbols: REST `GET /api/v5/public/instruments?instType=SPOT|SWAP|FUTURES`. Spot `BTC-USDT` is
  `okx:BTC-USDT`; perpetual swaps `UNI-USD-SWAP` are `okx_swap:UNI-USD`; dated futures
  `BTC-USD-220527` are `okx_futures:BTC-USD220527` (a futures id keeps its expiry). Derivative
  sizes are in contracts (`ctVal` of `ctValCcy` each), as OKX sends them.
- Book frames: `{"arg":{...},"action":"snapshot"|"update","data":[{"asks":[[px,sz,"0",orders],...],
  "bids":[...],"ts":"<ms>","checksum":<int>,"seqId":n,"prevSeqId":m}]}`; size "0" deletes.
- Integrity, on every frame: (1) where OKX sends `seqId`/`prevSeqId` (since 2022-08; the 2022-05
  recording predates them) an update's `prevSeqId` must equal the previous `seqId` (equal `seqId`
  and `prevSeqId` is a heartbeat-like no-change update); (2) `checksum` is the signed CRC32 of the
  top 25 levels interleaved `bid:bidsz:ask:asksz:...` (`candlekeep.orderbook.okx_checksum`),
  snapshots included. A break, a mismatch or a crossed book resyncs that instrument only:
  unsubscribe + subscribe its `books` channel, which pushes a fresh snapshot.
- Trades: `{"instId","tradeId","px","sz","side","ts"}`; `side` is the taker's.

A real update frame from the recording (trimmed to one level per side):

    {"arg":{"channel":"books","instId":"BTC-USD-220527"},"action":"update","data":[{"asks":
    [["30249.4","0","0","0"]],"bids":[["30182.6","452","0","1"]],"ts":"1652459225464",
    "checksum":-914047754}]}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from candlekeep.bars import Trade
from candlekeep.orderbook import okx_checksum
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
    levels,
    ms_to_ns,
)

WS_URL = "wss://ws.okx.com:8443/ws/v5/public"
REST_URL = "https://www.okx.com"
LISTING_PATHS = tuple(f"/api/v5/public/instruments?instType={t}" for t in ("SPOT", "SWAP", "FUTURES"))
CONN = "okx-0"
BOOK_CHANNEL = "books"


def symbol_map(listings: Iterable[Mapping[str, Any]]) -> SymbolMap:
    """From the instruments bodies (`{"code":"0","data":[{"instId":...,"instType":...}]}`)."""
    pairs = []
    for body in listings:
        for inst in body["data"]:
            inst_id, kind = inst["instId"], inst["instType"]
            if kind == "SPOT":
                pairs.append((f"okx:{inst['baseCcy']}-{inst['quoteCcy']}", inst_id))
            elif kind == "SWAP":
                base, quote = inst["uly"].split("-")
                pairs.append((f"okx_swap:{base}-{quote}", inst_id))
            elif kind == "FUTURES":
                base, quote = inst["uly"].split("-")
                expiry = inst_id.rsplit("-", 1)[1]
                pairs.append((f"okx_futures:{base}-{quote}{expiry}", inst_id))
    return SymbolMap.of("okx", pairs)


class OkxConnector(Connector):
    venue = "okx"
    ws_url = WS_URL
    verified = True

    def connections(self) -> list[ConnectionSpec]:
        frames = []
        if self.with_books:
            frames.append(self._op("subscribe", BOOK_CHANNEL, self.instruments))
        if self.with_trades:
            frames.append(self._op("subscribe", "trades", self.instruments))
        return [ConnectionSpec(CONN, self.ws_url, self.instruments, tuple(frames), PingRule(20.0, "ping"),
                               silence_timeout_s=30.0)]  # fmt: skip

    def _op(self, op: str, channel: str, instruments: Iterable[str]) -> str:
        args = [{"channel": channel, "instId": self.symbols.venue_symbol(i)} for i in instruments]
        return json.dumps({"op": op, "args": args}, separators=(",", ":"))

    def on_open(self, conn: str, received_ns: int) -> list[Record]:
        for instrument in self.spec(conn).instruments:
            self._reset(self.states[instrument])  # the subscribe frames bring the snapshots
        return []

    def _request_snapshot(self, instrument: str) -> None:
        self._actions.append(Send(CONN, self._op("unsubscribe", BOOK_CHANNEL, [instrument])))
        self._actions.append(Send(CONN, self._op("subscribe", BOOK_CHANNEL, [instrument])))

    # -- frames -----------------------------------------------------------------------------------

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        if raw == "pong":
            return []
        msg = decode_json(raw)
        if not isinstance(msg, dict):
            raise ConnectorError(f"unexpected frame shape: {str(msg)[:80]}")
        if "event" in msg:
            if msg["event"] == "error":
                raise ConnectorError(f"OKX error {msg.get('code')}: {msg.get('msg')}")
            return []  # subscribe / unsubscribe acknowledgements
        arg = msg.get("arg") or {}
        channel = arg.get("channel")
        if channel not in (BOOK_CHANNEL, "trades"):
            return []
        instrument = self.symbols.instrument(arg["instId"])
        if instrument not in self.states:
            return []
        if channel == "trades":
            return self._trades(instrument, msg["data"], received_ns) if self.with_trades else []
        if not self.with_books:
            return []
        out: list[Record] = []
        for data in msg["data"]:
            out += self._book(instrument, msg.get("action"), data, received_ns)
        return out

    def _trades(self, instrument: str, rows: list[dict[str, Any]], received_ns: int) -> list[Record]:
        return [Trade(instrument, ms_to_ns(t["ts"]), *levels([(t["px"], t["sz"])])[0], t["side"], str(t["tradeId"]),
                      self.venue, received_ns) for t in rows]  # fmt: skip

    def _book(self, instrument: str, action: str | None, data: dict[str, Any], received_ns: int) -> list[Record]:
        state = self.states[instrument]
        book = state.book
        ts_ns = ms_to_ns(data["ts"])
        seq = data.get("seqId")
        prev = data.get("prevSeqId")
        bids, asks = levels(data.get("bids", ())), levels(data.get("asks", ()))
        if action == "snapshot":
            book.replace(bids, asks)
            state.sequence = seq
        elif state.phase != "synced":
            return []  # an update of a book we are resyncing: the coming snapshot replaces it
        else:
            if prev is not None and state.sequence is not None and prev != state.sequence:
                return self.resync(instrument, received_ns, SEQUENCE_GAP,
                                   f"prevSeqId {prev} after seqId {state.sequence}", seq)  # fmt: skip
            book.update(bids, asks)
            prev_seq, state.sequence = state.sequence, seq
        computed = okx_checksum(book)
        if "checksum" in data and computed != int(data["checksum"]):
            return self.resync(instrument, received_ns, CHECKSUM_MISMATCH,
                               f"venue crc32 {data['checksum']}, book gives {computed}", seq)  # fmt: skip
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        out: list[Record] = [self._event(instrument, CHECKSUM_OK, received_ns, seq, str(data.get("checksum")))]
        if action == "snapshot":
            return out + self._synced(state, ts_ns, received_ns, "snapshot")
        return out + self._delta_record(state, ts_ns, received_ns, prev_seq, bids, asks)
