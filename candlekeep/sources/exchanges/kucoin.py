"""KuCoin spot: trades and the full L2 book over the public WebSocket, chained to a REST snapshot.

Facts (KuCoin API docs, "WebSocket" and "Level2 - Market Data"; the recording KUCOIN.ws.1.0 +
KUCOIN.http.0.0, 2021):
- Connecting takes a token first: `POST https://api.kucoin.com/api/v1/bullet-public` answers
  `{"data":{"token":..., "instanceServers":[{"endpoint":"wss://...","pingInterval":18000,...}]}}`;
  the socket URL is `{endpoint}?token={token}&connectId={any id}` (`ws_url_from_bullet`). The
  recording's URL has the token replaced by `TOKEN`. The server says `{"type":"welcome"}` first.
- App ping `{"id":"...","type":"ping"}` every `pingInterval` (18 s); no frame for `pingTimeout`
  (10 s) after that means the socket is dead. At most 100 client messages per 10 s.
- Subscribe `{"id":N,"type":"subscribe","topic":"/market/level2:BTC-USDT,ETH-USDT",
  "privateChannel":false,"response":true}` (up to 100 symbols per topic), answered by `ack`.
  Topics: `/market/level2` (book diffs), `/market/match` (trades), `/market/ticker`.
- Book diffs: `{"sequenceStart":S,"sequenceEnd":E,"symbol":..,"changes":{"asks":[[price,size,seq]],
  "bids":[...]}}` (absolute sizes; 0 removes; a change with price "0" only advances the sequence).
  The snapshot: `GET /api/v1/market/orderbook/level2_100?symbol=...` (public, top 100 per side, with
  `sequence`) by default. The full book `GET /api/v3/market/orderbook/level2` (what the recording's
  client fetched, on an authenticated `push-private` session) needs an API key in the current docs;
  `snapshot_path=FULL_SNAPSHOT_PATH` selects it. With the top-100 snapshot the diffs keep the book
  exact inside the snapshot's price range; a level beyond it is known once a diff touches it.
- Integrity, per symbol: diffs are buffered until the snapshot (sequence N) arrives; those with
  E <= N are dropped, and of the first applied one only the changes with seq > N count; from then on
  every diff must start where the last ended (S == last E + 1), else that symbol alone re-fetches
  its snapshot. Crossed books resync too.
- Trades: `/market/match` frames carry `tradeId`, the taker `side`, and `time` in nanoseconds.
- Symbols: the listing `GET /api/v1/symbols` gives `symbol` (`BTC-USDT`), `baseCurrency`,
  `quoteCurrency`; our id is `kucoin:{baseCurrency}-{quoteCurrency}`.

A real book diff (KUCOIN.ws.1.0.txt):

    {"data":{"sequenceStart":1613277183874,"symbol":"BCHSV-USDT","changes":{"asks":[["0","0",
     "1613277183874"]],"bids":[]},"sequenceEnd":1613277183874},"subject":"trade.l2update",
     "topic":"/market/level2:BCHSV-USDT","type":"message"}
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
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

VENUE = "kucoin"
REST_URL = "https://api.kucoin.com"
WS_URL = "wss://ws-api-spot.kucoin.com/"  # what bullet-public names today; a token must be appended
BULLET_URL = f"{REST_URL}/api/v1/bullet-public"
LISTING_PATH = "/api/v1/symbols"
SYMBOLS_URL = f"{REST_URL}{LISTING_PATH}"
SNAPSHOT_PATH = "/api/v1/market/orderbook/level2_100"
FULL_SNAPSHOT_PATH = "/api/v3/market/orderbook/level2"
PING_INTERVAL_S = 18.0
SYMBOLS_PER_TOPIC = 100
SENDS_PER_S = 10.0  # the docs' uplink limit: 100 client messages per 10 seconds
CONN = "kucoin"

_ZERO = Decimal(0)


def ws_url_from_bullet(body: Any, connect_id: str = "candlekeep") -> tuple[str, float]:
    """The `bullet-public` answer -> (socket URL with its token, ping interval in seconds)."""
    try:
        data = body["data"]
        server = data["instanceServers"][0]
        query = urlencode({"token": data["token"], "connectId": connect_id})
        return f"{server['endpoint']}?{query}", int(server.get("pingInterval", 18000)) / 1000
    except (KeyError, IndexError, TypeError) as exc:
        raise ConnectorError(f"kucoin bullet answer without a server: {exc!r}") from None


def symbol_map(listing: Any) -> SymbolMap:
    """The `GET /api/v1/symbols` body -> instrument ids <-> KuCoin symbols."""
    try:
        rows = listing["data"]
        return SymbolMap.of(VENUE, (
            (f"{VENUE}:{r['baseCurrency'].upper()}-{r['quoteCurrency'].upper()}", r["symbol"]) for r in rows
        ))  # fmt: skip
    except (KeyError, TypeError) as exc:
        raise ConnectorError(f"kucoin symbol listing: {exc!r}") from None


def _changes(rows: list[list[Any]], after: int) -> list[Level]:
    """Changes `[price, size, seq]` with seq > `after`, as levels (sequence-only rows skipped)."""
    out = []
    for row in rows:
        price, size, seq = row[0], row[1], int(row[2])
        if seq > after and Decimal(price) != _ZERO:
            out.append((Decimal(price), Decimal(size)))
    return out


class KucoinConnector(Connector):
    venue = VENUE
    ws_url = WS_URL  # the token's server; the socket URL itself comes from `bullet-public`
    rest_url = REST_URL
    verified = True

    def __init__(self, symbols: SymbolMap, instruments: Sequence[str], *, snapshot_path: str = SNAPSHOT_PATH,
                 ping_interval_s: float = PING_INTERVAL_S, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(symbols, instruments, **kwargs)
        self.snapshot_path = snapshot_path
        self._published: dict[str, int] = {}  # instrument -> sequence of its last published book record
        self.ping_interval_s = ping_interval_s
        self._ids = itertools.count(1)

    def _subscribe(self, topic: str, symbols: list[str]) -> str:
        return json.dumps({"id": next(self._ids), "type": "subscribe", "topic": f"{topic}:{','.join(symbols)}",
                           "privateChannel": False, "response": True})  # fmt: skip

    def connections(self) -> list[ConnectionSpec]:
        symbols = [self.symbols.venue_symbol(i) for i in self.instruments]
        frames = []
        for start in range(0, len(symbols), SYMBOLS_PER_TOPIC):
            chunk = symbols[start : start + SYMBOLS_PER_TOPIC]
            if self.with_trades:
                frames.append(self._subscribe("/market/match", chunk))
            if self.with_books:
                frames.append(self._subscribe("/market/level2", chunk))
        ping = PingRule(self.ping_interval_s, json.dumps({"id": "ping", "type": "ping"}))
        return [ConnectionSpec(CONN, self.ws_url, self.instruments, tuple(frames), ping,
                               silence_timeout_s=self.ping_interval_s + 10, sends_per_s=SENDS_PER_S)]  # fmt: skip

    def token_request(self, conn: str) -> str | None:
        # `ws_url` pointed elsewhere (a test, a proxy) is used as it is: no token.
        return f"{str(self.rest_url).rstrip('/')}/api/v1/bullet-public" if self.ws_url == WS_URL else None

    def url_from_token(self, conn: str, body: bytes) -> str:
        return ws_url_from_bullet(decode_json(body))[0]  # its pingInterval is the documented 18 s

    def snapshot_url(self, instrument: str) -> str | None:
        return f"{str(self.rest_url).rstrip('/')}{self.snapshot_path}?{urlencode({'symbol': self.symbols.venue_symbol(instrument)})}"

    # -- frames -----------------------------------------------------------------------------------

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        msg = decode_json(raw)
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "message":
            subject = msg.get("subject")
            try:
                if subject == "trade.l2update":
                    return self._on_diff(msg["data"], received_ns)
                if subject == "trade.l3match":
                    return self._on_match(msg["data"], received_ns)
            except (KeyError, IndexError, TypeError, ValueError, ArithmeticError) as exc:
                raise ConnectorError(f"kucoin {subject} frame: {exc!r}: {str(msg)[:200]}") from None
            return []  # ticker, candles
        if kind == "error":
            raise ConnectorError(f"kucoin error {msg.get('code')}: {msg.get('data')}")
        if kind in ("welcome", "ack", "pong"):
            return []
        raise ConnectorError(f"kucoin frame of unknown type {kind!r}: {str(msg)[:200]}")

    def _on_match(self, data: dict, received_ns: int) -> list[Record]:
        instrument = self.symbols.instrument(data["symbol"])
        if instrument not in self.states or not self.with_trades:
            return []  # a symbol of the topic we do not follow
        side = data["side"]
        if side not in ("buy", "sell"):
            raise ConnectorError(f"kucoin match side {side!r}")
        return [Trade(instrument, int(data["time"]), Decimal(data["price"]),
                      Decimal(data["size"]), side, str(data["tradeId"]), VENUE, received_ns)]  # fmt: skip

    def _on_diff(self, data: dict, received_ns: int) -> list[Record]:
        state = self.states.get(self.symbols.instrument(data["symbol"]))
        if state is None or not self.with_books:
            return []  # a symbol of the topic we do not follow
        if state.phase != "synced":
            if len(state.buffer) >= self.max_buffered:
                state.buffer.pop(0)  # the snapshot is late; the oldest diffs are older than it will be
            state.buffer.append((data, received_ns))
            return []
        return self._apply(state, data, received_ns)

    def _apply(self, state: BookState, data: dict, received_ns: int) -> list[Record]:
        start, end = int(data["sequenceStart"]), int(data["sequenceEnd"])
        last = state.sequence
        assert last is not None
        if end <= last:
            return []  # already in the snapshot
        if start > last + 1:
            return self.resync(state.instrument, received_ns, SEQUENCE_GAP, f"expected {last + 1}, got {start}..{end}", start)
        changes = data["changes"]
        bids, asks = _changes(changes.get("bids", []), last), _changes(changes.get("asks", []), last)
        state.sequence = end
        if not (bids or asks):
            # A sequence-only diff (price "0"): the chain moves, the book does not; nothing to publish.
            # The next published delta's prev_sequence is the last published one, so the `books`
            # topic's own chain stays unbroken.
            return []
        state.book.update(bids, asks)
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        ts_ns = ms_to_ns(data["time"]) if data.get("time") else received_ns  # 2021 frames had no time
        prev = self._published.get(state.instrument, last)
        self._published[state.instrument] = end
        return self._delta_record(state, ts_ns, received_ns, prev, bids, asks)

    def on_snapshot(self, instrument: str, body: bytes | str, received_ns: int) -> list[Record]:
        msg = decode_json(body)
        try:
            if msg.get("code") != "200000":
                raise ConnectorError(f"kucoin snapshot of {instrument} refused: {str(msg)[:200]}")
            data = msg["data"]
            state = self.states[instrument]
            state.book.replace(levels(data["bids"]), levels(data["asks"]))
            state.sequence = int(data["sequence"])
            ts_ns = ms_to_ns(data["time"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConnectorError(f"kucoin snapshot of {instrument}: {exc!r}") from None
        out: list[Record] = []
        if crossed := self._check_crossed(state, received_ns):
            return crossed
        out += self._synced(state, ts_ns, received_ns, "REST snapshot")
        self._published[instrument] = state.sequence
        buffered, state.buffer = state.buffer, []
        for data, buffered_ns in buffered:
            out += self._apply(state, data, buffered_ns)
            if state.phase != "synced":
                break  # the chain broke against this snapshot: a new one is on its way
        return out
