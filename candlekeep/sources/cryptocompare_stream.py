"""CryptoCompare streamer v2: live trades over a WebSocket (notes/cryptocompare.md section 2).

Runs in the caller's thread: `StreamerClient.events()` connects, subscribes the trade channels
`0~{exchange}~{BASE}~{QUOTE}`, parses frames and yields typed records until `close()`. It owns one
socket at a time and nothing else: no Kafka, no storage (the producer daemon publishes the trades
and persists the outages this yields).

State (one block, guarded by `_lock` where another thread can touch it):
    _wanted     instrument id -> subscription string, what should be subscribed (subscribe/unsubscribe
                from any thread; applied on the live socket, and all of it again on every reconnect)
    _pending    SubAdd / SubRemove requests not yet sent on the live socket
    failed      instrument id -> reason, subscriptions the server refused (500 INVALID_SUB ...); they
                are not resubscribed until subscribed again
    _down       the open outage: (started_ns, reason, instruments) while the feed is not live, else None

Lifecycle of one connection: connecting -> (welcome, TYPE 20) send SubAdd -> subscribing ->
(LOADCOMPLETE, TYPE 3) streaming. It ends on a server close, a network error, FORCE_DISCONNECT,
401, 429, or heartbeat silence (no TYPE 999 for `heartbeat_timeout`, 60 s: the docs promise one
every 30-60 s); then backoff (jittered, exponential, never under 5 s: the docs ask for >= 5 s and
refuse > 60 connects a minute; after a 429 at least `rate_limited_backoff`), and reconnect.
An outage runs from the last frame of the lost connection (or the first failed attempt) to the
next LOADCOMPLETE; it is yielded when it opens (`ended_ns=None`) and again when it closes.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import websocket

from candlekeep.bars import NS_PER_S, Disconnect, Heartbeat, Trade
from candlekeep.instruments import Instrument
from candlekeep.sources.base import SourceError
from candlekeep.sources.cryptocompare import MIN_API_EXCHANGES, SOURCE

log = logging.getLogger(__name__)

STREAM_URL = "wss://streamer.cryptocompare.com/v2"
TRADE_CHANNEL = "0"

# Frame TYPEs (the docs' "Examples" table; fixtures/cryptocompare/streamer_v2).
TRADE = "0"
LOADCOMPLETE = "3"
SUBSCRIBECOMPLETE = "16"
UNSUBSCRIBECOMPLETE = "17"
UNSUBSCRIBEALLCOMPLETE = "18"
WELCOME = "20"
HEARTBEAT = "999"
UNAUTHORIZED = "401"
RATE_LIMITED = "429"  # RATE_LIMIT_OPENING_SOCKETS_TOO_FAST, TOO_MANY_SOCKETS_MAX_*, TOO_MANY_SUBSCRIPTIONS_MAX_*
SERVER_ERROR = "500"  # MESSAGE: INVALID_JSON | INVALID_SUB | INVALID_PARAMETER | SUBSCRIPTION_UNRECOGNIZED |
#                       SUBSCRIPTION_ALREADY_ACTIVE | FORCE_DISCONNECT
SUB_REFUSED = {"INVALID_SUB", "SUBSCRIPTION_UNRECOGNIZED", "INVALID_PARAMETER"}

# Trade `F` flags bitmask.
FLAG_SELL, FLAG_BUY, FLAG_UNKNOWN, FLAG_REVERSED = 1, 2, 4, 8

HEARTBEAT_TIMEOUT_S = 60.0
MIN_BACKOFF_S = 5.0
MAX_BACKOFF_S = 300.0
RATE_LIMITED_BACKOFF_S = 60.0  # > 60 connects a minute: refused for at least a minute

STATES = ("connecting", "subscribing", "streaming", "backoff", "error")


class StreamError(SourceError):
    """A streamer frame that cannot be understood."""


# --- what events() yields, besides `Trade` ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """The connection moved to `state` (one of STATES); `detail` says why."""

    state: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SubscriptionFailed:
    instrument: str
    reason: str


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A frame that could not be parsed: kept whole for the dead-letter topic."""

    payload: bytes
    error: str


Event = Trade | Heartbeat | Disconnect | StreamStatus | SubscriptionFailed | BadFrame


# --- parsing --------------------------------------------------------------------------------------


def trade_sub(instrument: Instrument | str) -> str:
    """`coinbase:BTC-USD` -> `0~Coinbase~BTC~USD` (the REST client's venue map, `e` names)."""
    inst = Instrument.parse(instrument) if isinstance(instrument, str) else instrument
    exchange = MIN_API_EXCHANGES.get(inst.venue, inst.venue.capitalize())
    return f"{TRADE_CHANNEL}~{exchange}~{inst.base}~{inst.quote}"


def side_from_flags(flags: object) -> str:
    """`F` bitmask -> buy / sell / unknown (&1 sell, &2 buy, &4 unknown; &8 only marks reversed)."""
    value = _int(flags, "F")
    if value & FLAG_SELL and not value & FLAG_BUY:
        return "sell"
    if value & FLAG_BUY and not value & FLAG_SELL:
        return "buy"
    return "unknown"


def loads(raw: str | bytes) -> dict[str, Any]:
    """A frame as a dict, every decimal digit kept (`parse_float=Decimal`)."""
    try:
        frame = json.loads(raw, parse_float=Decimal)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StreamError(f"not JSON: {exc}") from None
    if not isinstance(frame, dict) or "TYPE" not in frame:
        raise StreamError("not a streamer frame (no TYPE)")
    return frame


def parse_trade(frame: dict[str, Any], *, instrument: str, local_ns: int) -> Trade:
    """A TYPE "0" frame -> Trade. Real frame (fixtures/.../trade_type0_console_dump..., as JSON):

        {"TYPE":"0","M":"Coinbase","FSYM":"BTC","TSYM":"USD","F":"1","ID":"852793745",
         "TS":1753190418,"Q":0.34637342,"P":119283.1,"TOTAL":41316.495295202,"RTS":1753190418,
         "CCSEQ":852777369,"TSNS":654000000,"RTSNS":708000000}

    ts_ns = TS s + TSNS ns (TSNS only on some markets); received_ns = RTS + RTSNS when the frame has
    RTS, else `local_ns` (our receipt time). Q and P must already be Decimal or int (never float).
    """
    try:
        ts_ns = _int(frame["TS"], "TS") * NS_PER_S + _int(frame.get("TSNS", 0), "TSNS")
        received_ns = local_ns
        if frame.get("RTS") is not None:
            received_ns = _int(frame["RTS"], "RTS") * NS_PER_S + _int(frame.get("RTSNS", 0), "RTSNS")
        trade_id = frame["ID"]
        if isinstance(trade_id, bool) or not isinstance(trade_id, (int, str)) or trade_id == "":
            raise StreamError(f"bad ID {trade_id!r}")
        return Trade(
            instrument=instrument,
            ts_ns=ts_ns,
            price=_decimal(frame["P"], "P"),
            size=_decimal(frame["Q"], "Q"),
            side=side_from_flags(frame["F"]),
            trade_id=str(trade_id),
            source=SOURCE,
            received_ns=received_ns,
        )
    except KeyError as exc:
        raise StreamError(f"trade frame without {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise StreamError(f"bad trade frame: {exc}") from None


def _int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise StreamError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)  # F and ID come as strings
    raise StreamError(f"{name} must be an integer, got {value!r}")


def _decimal(value: object, name: str) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    raise StreamError(f"{name} must be a JSON number parsed as Decimal, got {value!r}")


# --- the client -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SessionEnd:
    """Why a connection ended. `kind`: disconnect | unauthorized | rate_limited (they pick the
    backoff), streamed (a disconnect after the feed was live), closed (close() was called)."""

    reason: str
    kind: str = "disconnect"


class StreamerClient:
    name = SOURCE

    def __init__(
        self,
        *,
        instruments: Iterable[str] = (),
        url: str = STREAM_URL,
        api_key: str | None = None,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S,
        min_backoff: float = MIN_BACKOFF_S,
        max_backoff: float = MAX_BACKOFF_S,
        rate_limited_backoff: float = RATE_LIMITED_BACKOFF_S,
        connect_timeout: float = 10.0,
        recv_timeout: float = 0.5,
        heartbeat_s: float = 1.0,
        latency_bound_s: float = 1.0,
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        """`heartbeat_timeout` and the backoff bounds are seconds; tests shorten them.
        `recv_timeout` bounds how long a subscribe/unsubscribe or close() waits for the socket loop."""
        if min_backoff <= 0 or max_backoff < min_backoff:
            raise ValueError("backoff bounds must satisfy 0 < min_backoff <= max_backoff")
        self.url = url
        self._api_key = api_key
        self.heartbeat_timeout = heartbeat_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.rate_limited_backoff = max(rate_limited_backoff, min_backoff)
        self.connect_timeout = connect_timeout
        self.recv_timeout = recv_timeout
        self.heartbeat_s = heartbeat_s
        self.latency_bound_ns = int(latency_bound_s * 1_000_000_000)
        self._last_sent: dict[str, float] = {}  # instrument -> monotonic time of its last trade or beat
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._wanted: dict[str, str] = {}
        self._pending: list[tuple[str, list[str]]] = []
        self._by_sub: dict[str, str] = {}  # subscription string -> instrument id (every one ever wanted)
        self.failed: dict[str, str] = {}
        self._down: tuple[int, str, set[str]] | None = None
        self._live_until_ns: int | None = None  # last frame received while the feed was live
        self.subscribed: set[str] = set()  # SUBSCRIBECOMPLETE seen on the live socket
        self.connections = 0
        self.subscribe(instruments)

    # -- control, from any thread -----------------------------------------------------------------

    @property
    def instruments(self) -> list[str]:
        with self._lock:
            return sorted(self._wanted)

    def subscribe(self, instruments: Iterable[str]) -> None:
        """Track `instruments` (ids); a previously refused one is tried again."""
        with self._lock:
            added: list[str] = []
            for iid in (Instrument.parse(text).id for text in instruments):
                self.failed.pop(iid, None)
                if iid not in self._wanted:
                    sub = self._wanted[iid] = trade_sub(iid)
                    self._by_sub[sub] = iid
                    added.append(sub)
                    if self._down is not None:
                        self._down[2].add(iid)
            if added:
                self._pending.append(("SubAdd", sorted(added)))

    def unsubscribe(self, instruments: Iterable[str]) -> None:
        with self._lock:
            ids = {Instrument.parse(text).id for text in instruments}
            removed = [self._wanted.pop(iid) for iid in ids if iid in self._wanted]
            if removed:
                self._pending.append(("SubRemove", sorted(removed)))

    def close(self) -> None:
        """Stop: events() returns within `recv_timeout` (at once from a backoff wait)."""
        self._closed.set()

    # -- the loop ---------------------------------------------------------------------------------

    def events(self) -> Iterator[Event]:
        """Trades and status records until close(); reconnects on its own, never raises for the
        network or the server (a 401 is an `error` status, then backoff)."""
        attempt = 0
        while not self._closed.is_set():
            yield StreamStatus("connecting", self._redacted_url())
            try:
                ws = self._connect()
            except (OSError, websocket.WebSocketException) as exc:
                end = _SessionEnd(f"connect failed: {exc}")
            else:
                self.connections += 1
                try:
                    end = yield from self._session(ws)
                finally:
                    _close_quietly(ws)
                if end.kind == "streamed":  # the feed was live: back off from the minimum again
                    attempt = 0
                    end = _SessionEnd(end.reason)
            if self._closed.is_set():
                break
            yield from self._feed_lost(end.reason)
            if end.kind == "unauthorized":
                yield StreamStatus("error", f"{end.reason} (check CANDLEKEEP_CRYPTOCOMPARE_API_KEY)")
            delay = self._backoff_delay(attempt, end.kind)
            attempt += 1
            yield StreamStatus("backoff", f"{end.reason}; reconnecting in {delay:.1f} s")
            self._closed.wait(delay)
        log.info("cryptocompare streamer closed")

    def _session(self, ws: websocket.WebSocket) -> Generator[Event, None, _SessionEnd]:
        """One connection, frame by frame, until it ends; returns why."""
        self.subscribed = set()
        live = welcomed = False
        last_heartbeat = self._monotonic()
        while not self._closed.is_set():
            if welcomed and (lost := self._send(ws, self._take_pending())):
                return _SessionEnd(lost, "streamed" if live else "disconnect")
            if self._monotonic() - last_heartbeat > self.heartbeat_timeout:
                reason = f"heartbeat stale: none for {self.heartbeat_timeout:g} s"
                log.warning("cryptocompare streamer: %s, reconnecting", reason)
                return _SessionEnd(reason, "streamed" if live else "disconnect")
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                if live:
                    yield from self._beats()
                continue
            except (OSError, websocket.WebSocketException) as exc:
                reason = f"connection lost: {exc or type(exc).__name__}"
                return _SessionEnd(reason, "streamed" if live else "disconnect")
            if not raw:  # a close frame (recv answers it and returns "")
                return _SessionEnd("closed by server", "streamed" if live else "disconnect")
            now_ns = self._clock_ns()
            if live:
                self._live_until_ns = now_ns
                yield from self._beats()
            try:
                frame = loads(raw)
            except StreamError as exc:
                yield BadFrame(raw.encode() if isinstance(raw, str) else raw, str(exc))
                continue
            kind = str(frame["TYPE"])
            if kind == TRADE:
                try:
                    trade = parse_trade(frame, instrument=self._instrument_of(frame), local_ns=now_ns)
                    self._last_sent[trade.instrument] = self._monotonic()
                    yield trade
                except StreamError as exc:
                    yield BadFrame(raw.encode() if isinstance(raw, str) else raw, str(exc))
            elif kind == HEARTBEAT:
                last_heartbeat = self._monotonic()
            elif kind == WELCOME:
                welcomed = True
                log.info(
                    "cryptocompare streamer welcome: server %s, client %s, sockets active %s / remaining %s",
                    frame.get("SERVER_NAME"), frame.get("CLIENT_ID"), frame.get("SOCKETS_ACTIVE"),
                    frame.get("SOCKETS_REMAINING"),
                )  # fmt: skip
                subs = self._subscribe_all()
                if lost := self._send(ws, [("SubAdd", subs)] if subs else []):
                    return _SessionEnd(lost)
                if subs:
                    yield StreamStatus("subscribing", f"{len(subs)} subscriptions")
                else:
                    live = True
                    yield from self._feed_live(now_ns, "no subscriptions")
            elif kind == SUBSCRIBECOMPLETE:
                self.subscribed.add(str(frame.get("SUB")))
            elif kind == LOADCOMPLETE:
                if not live:
                    live = True
                    yield from self._feed_live(now_ns, str(frame.get("INFO", "LOADCOMPLETE")))
            elif kind in (UNSUBSCRIBECOMPLETE, UNSUBSCRIBEALLCOMPLETE):
                self.subscribed.discard(str(frame.get("SUB")))
                log.info("cryptocompare streamer: %s %s", frame.get("MESSAGE"), frame.get("SUB") or frame.get("INFO"))
            elif kind == UNAUTHORIZED:
                return _SessionEnd(f"401 {frame.get('MESSAGE')}: {frame.get('INFO', '')}".strip(), "unauthorized")
            elif kind == RATE_LIMITED:
                return _SessionEnd(f"429 {frame.get('MESSAGE')}: {frame.get('INFO', '')}".strip(), "rate_limited")
            elif kind == SERVER_ERROR:
                message = str(frame.get("MESSAGE"))
                if message == "FORCE_DISCONNECT":
                    return _SessionEnd("500 FORCE_DISCONNECT", "streamed" if live else "disconnect")
                if message in SUB_REFUSED:
                    if failed := self._refused(str(frame.get("PARAMETER")), frame):
                        yield failed
                        yield Disconnect(failed.instrument, self._clock_ns(), SOURCE,
                                         f"subscription failed: {failed.reason}")  # fmt: skip
                elif message == "SUBSCRIPTION_ALREADY_ACTIVE":
                    log.debug("cryptocompare streamer: %s", frame)
                else:
                    log.error("cryptocompare streamer error frame: %s", frame)
            else:
                log.debug("cryptocompare streamer: ignoring TYPE %s", kind)
        return _SessionEnd("closed", "closed")

    # -- helpers ----------------------------------------------------------------------------------

    def _connect(self) -> websocket.WebSocket:
        url = self.url
        if self._api_key:
            url += ("&" if "?" in url else "?") + urlencode({"api_key": self._api_key})
        ws = websocket.create_connection(url, timeout=self.connect_timeout, enable_multithread=True)
        ws.settimeout(self.recv_timeout)
        return ws

    def _redacted_url(self) -> str:
        return self.url + ("?api_key=***" if self._api_key else "")

    def _subscribe_all(self) -> list[str]:
        """Everything wanted and not refused (requests made while disconnected are covered)."""
        with self._lock:
            self._pending.clear()
            return sorted(sub for iid, sub in self._wanted.items() if iid not in self.failed)

    def _take_pending(self) -> list[tuple[str, list[str]]]:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def _send(self, ws: websocket.WebSocket, requests: list[tuple[str, list[str]]]) -> str | None:
        """Send SubAdd / SubRemove requests; the reason when the connection is gone."""
        for action, subs in requests:
            try:
                ws.send(json.dumps({"action": action, "subs": subs}))
            except (OSError, websocket.WebSocketException) as exc:
                return f"connection lost: {exc or type(exc).__name__}"
            log.info("cryptocompare streamer: %s %s", action, " ".join(subs))
        return None

    def _instrument_of(self, frame: dict[str, Any]) -> str:
        sub = f"{TRADE_CHANNEL}~{frame['M']}~{frame['FSYM']}~{frame['TSYM']}"
        iid = self._by_sub.get(sub)
        if iid is None:  # a market we never asked for by this name: its venue is the exchange name
            iid = Instrument(str(frame["M"]).lower(), str(frame["FSYM"]), str(frame["TSYM"])).id
        return iid

    def _refused(self, sub: str, frame: dict[str, Any]) -> SubscriptionFailed | None:
        iid = self._by_sub.get(sub)
        reason = f"{frame.get('MESSAGE')}: {frame.get('INFO', '')}".strip()
        if iid is None:
            log.error("cryptocompare streamer refused %s (not ours): %s", sub, reason)
            return None
        with self._lock:
            self.failed[iid] = reason
            if self._down is not None:
                self._down[2].discard(iid)
        log.error("cryptocompare streamer refused %s (%s): %s; other instruments continue", sub, iid, reason)
        return SubscriptionFailed(iid, reason)

    def _feed_lost(self, reason: str) -> list[Disconnect]:
        """A disconnect per live instrument, once (failing reconnects add none); `ts_ns` is now,
        when it was noticed: the gap runs from each instrument's previous record to its next."""
        with self._lock:
            if self._down is not None:
                return []
            live = {iid for iid in self._wanted if iid not in self.failed}
            now = self._clock_ns()
            self._down = (now, reason, live)
        log.warning("cryptocompare feed down at %d: %s", now, reason)
        return [Disconnect(iid, now, SOURCE, reason) for iid in sorted(live)]

    def _feed_live(self, now_ns: int, detail: str) -> Iterator[Event]:
        with self._lock:
            down, self._down = self._down, None
        if down is not None:
            log.info("cryptocompare feed live again after %d..%d: %s", down[0], now_ns, down[1])
        self._live_until_ns = now_ns
        mark = self._monotonic()
        for iid in self.instruments:
            self._last_sent[iid] = mark - self.heartbeat_s  # the first beat says: live from now
        yield StreamStatus("streaming", detail)
        yield from self._beats()

    def _beats(self) -> Iterator[Heartbeat]:
        """A heartbeat for each live instrument without a trade or beat for `heartbeat_s`: its time
        is the receive clock minus the latency bound, so a slow trade is late rather than lost."""
        mark = self._monotonic()
        ts_ns = self._clock_ns() - self.latency_bound_ns
        with self._lock:
            live = [iid for iid in self._wanted if iid not in self.failed]
        for iid in live:
            if mark - self._last_sent.get(iid, mark) >= self.heartbeat_s:
                self._last_sent[iid] = mark
                yield Heartbeat(iid, ts_ns, SOURCE)
            else:
                self._last_sent.setdefault(iid, mark)

    def now_ns(self) -> int:
        return self._clock_ns()

    def _backoff_delay(self, attempt: int, kind: str) -> float:
        """Jitter over [floor, floor * 2**(attempt + 1)], capped; floor >= 5 s (60 s after a 429)."""
        floor = self.rate_limited_backoff if kind == "rate_limited" else self.min_backoff
        ceiling = min(self.max_backoff, floor * 2 ** min(attempt + 1, 16))
        return self._rng.uniform(floor, max(floor, ceiling))



def _close_quietly(ws: websocket.WebSocket) -> None:
    try:
        ws.close(timeout=1)
    except Exception:  # noqa: BLE001 - the socket is being dropped anyway
        ws.shutdown()
