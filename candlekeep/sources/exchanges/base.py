"""The exchange connector interface: a pure parser/normalizer plus a description of its protocol.

A connector never opens a socket, touches storage or Kafka. The I/O layer (`live.py` here) owns the
sockets and drives it:

    connector = KrakenConnector(symbols, ["kraken:BTC-USD", ...])   # symbols from the venue's listing
    for spec in connector.connections():        # URL + subscribe frames + ping rule, per socket
        ... open spec.url, send spec.subscribe ...
        records = connector.on_open(spec.key, received_ns)
        records = connector.on_frame(spec.key, raw, received_ns)    # -> Trade, BookSnapshot,
                                                                    #    BookDelta, IntegrityEvent
        records = connector.on_close(spec.key, received_ns, reason) # -> Disconnect per instrument
    for action in connector.take_actions():     # Send(conn, frame) / FetchSnapshot(instrument, url)
        ... records = connector.on_snapshot(instrument, body, received_ns) ...

`feeds normalize` drives the very same methods from a recording, so the live path and the offline
path cannot drift apart.

Integrity is per instrument, never per connection: each instrument's book has its own `BookState`
(awaiting a snapshot, buffering, synced). A sequence gap, a checksum mismatch or a crossed book
resyncs that one instrument (`resync`): its book is dropped, an `IntegrityEvent("resync")` is
emitted, the venue-specific re-snapshot is requested (a REST fetch or an unsubscribe+subscribe of
that one channel), deltas are buffered until it arrives, and the others carry on untouched. Every
check and every resync is counted (`counters`, exported as metrics by the I/O layer) and logged.
A book update is emitted only after its checks passed; a venue with neither sequence numbers nor
checksums says so and publishes `verified=False`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, Literal

from candlekeep.bars import NS_PER_S, Disconnect, Trade
from candlekeep.books import BookDelta, BookSnapshot, Level
from candlekeep.instruments import Instrument, InstrumentError
from candlekeep.orderbook import OrderBook

log = logging.getLogger(__name__)

# Integrity event kinds (feeds normalize prints them; the I/O layer counts them per instrument).
CHECKSUM_OK = "checksum_ok"
CHECKSUM_MISMATCH = "checksum_mismatch"
SEQUENCE_OK = "sequence_ok"
SEQUENCE_GAP = "sequence_gap"
CROSSED = "crossed"
RESYNC = "resync"
SYNCED = "synced"
INTEGRITY_KINDS = (CHECKSUM_OK, CHECKSUM_MISMATCH, SEQUENCE_OK, SEQUENCE_GAP, CROSSED, RESYNC, SYNCED)


class ConnectorError(ValueError):
    """A frame or listing the connector cannot understand (the I/O layer logs it and goes on)."""


@dataclass(frozen=True, slots=True)
class IntegrityEvent:
    """One integrity check or transition of one instrument's book."""

    instrument: str
    kind: str  # one of INTEGRITY_KINDS
    source: str
    received_ns: int | None
    sequence: int | None = None
    detail: str = ""


Record = Trade | BookSnapshot | BookDelta | IntegrityEvent | Disconnect


@dataclass(frozen=True, slots=True)
class Send:
    """Send `frame` (text) on connection `conn`."""

    conn: str
    frame: str


@dataclass(frozen=True, slots=True)
class FetchSnapshot:
    """GET `url` (a REST book snapshot) and hand the body to `on_snapshot(instrument, ...)`."""

    instrument: str
    url: str


Action = Send | FetchSnapshot


@dataclass(frozen=True, slots=True)
class PingRule:
    """An application-level ping: send `frame` every `interval_s` seconds of the connection.
    (Protocol-level pings are answered by the websockets library itself.)"""

    interval_s: float
    frame: str


@dataclass(frozen=True, slots=True)
class ConnectionSpec:
    """One socket: where, what to send after it opens, which instruments ride on it."""

    key: str
    url: str
    instruments: tuple[str, ...]
    subscribe: tuple[str, ...] = ()
    ping: PingRule | None = None
    # No frame at all for this long means the socket is dead (venues heartbeat or push often).
    silence_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class SymbolMap:
    """Our instrument ids <-> the venue's own symbols, built from the venue's listing."""

    venue: str
    to_venue: Mapping[str, str]  # "kraken:BTC-USD" -> "XBT/USD"
    from_venue: Mapping[str, str]  # "XBT/USD" -> "kraken:BTC-USD"

    @classmethod
    def of(cls, venue: str, pairs: Iterable[tuple[str, str]]) -> SymbolMap:
        to_venue: dict[str, str] = {}
        from_venue: dict[str, str] = {}
        for instrument, symbol in pairs:
            try:
                Instrument.parse(instrument)
            except InstrumentError:
                continue  # a listing entry our ids cannot name (e.g. Kraken's "ETH2.S"): not offered
            to_venue.setdefault(instrument, symbol)
            from_venue[symbol] = instrument
        return cls(venue, to_venue, from_venue)

    def venue_symbol(self, instrument: str) -> str:
        try:
            return self.to_venue[instrument]
        except KeyError:
            raise ConnectorError(f"{instrument} is not listed on {self.venue}") from None

    def instrument(self, symbol: str) -> str:
        try:
            return self.from_venue[symbol]
        except KeyError:
            raise ConnectorError(f"{self.venue} symbol {symbol!r} is not in its listing") from None


def listing_bodies(text: str) -> dict[str, Any]:
    """The REST listing file of a recording (`<url> -> <unix ts>: <json body>` per line, plus
    cryptofeed's `configuration: {...}` line): {url: decoded body}, the last body per URL."""
    bodies: dict[str, Any] = {}
    for line in text.splitlines():
        head, sep, body = line.partition(": ")
        if not sep or " -> " not in head:
            continue
        url = head.split(" -> ", 1)[0]
        bodies[url] = json.loads(body, parse_float=Decimal)
    return bodies


# --- time ----------------------------------------------------------------------------------------


def ms_to_ns(ms: int | str) -> int:
    return int(ms) * 1_000_000


def seconds_text_to_ns(text: str | Decimal) -> int:
    """'1618678142.557535' (seconds, exact decimal text) -> ns, without a float."""
    return int(Decimal(text) * NS_PER_S)


# --- per-instrument book state -------------------------------------------------------------------

BookPhase = Literal["awaiting", "synced"]


@dataclass(slots=True)
class BookState:
    """One instrument's book and where it is in its sync cycle."""

    instrument: str
    book: OrderBook
    phase: BookPhase = "awaiting"
    sequence: int | None = None  # the last applied venue sequence (update id, seqId, ...)
    buffer: list[Any] = field(default_factory=list)  # deltas held until the snapshot arrives
    last_snapshot_ts_ns: int = 0  # exchange time of the last full snapshot published
    resyncs: int = 0


class Connector:
    """Base of every venue connector: book states, counters, the action outbox, resync.

    Subclasses set the class facts (`venue`, `verified`) and implement `connections`, `on_frame`
    and, where the venue needs it, `on_snapshot`, `snapshot_url` and `_request_snapshot`.
    """

    venue: ClassVar[str]
    ws_url: ClassVar[str]  # the public WebSocket endpoint
    rest_url: ClassVar[str | None] = None  # the REST base, where the book protocol needs snapshots
    # True when the venue's sequence numbers or checksums prove each book update.
    verified: ClassVar[bool] = True
    book_depth: ClassVar[int | None] = None
    max_buffered: ClassVar[int] = 10_000  # deltas held while a snapshot is awaited

    def __init__(
        self,
        symbols: SymbolMap,
        instruments: Sequence[str],
        *,
        books: bool = True,
        trades: bool = True,
        snapshot_every_s: float = 60.0,
        ws_url: str | None = None,
        rest_url: str | None = None,
    ) -> None:
        """`ws_url` / `rest_url` point the connector elsewhere (tests, a proxy)."""
        if ws_url is not None:
            self.ws_url = ws_url
        if rest_url is not None:
            self.rest_url = rest_url
        if not instruments:
            raise ConnectorError(f"{self.venue}: no instruments")
        self.symbols = symbols
        self.instruments = tuple(dict.fromkeys(instruments))
        for instrument in self.instruments:
            symbols.venue_symbol(instrument)  # fails early on an unlisted instrument
        self.with_books = books
        self.with_trades = trades
        self.snapshot_every_ns = int(snapshot_every_s * NS_PER_S)
        self.states: dict[str, BookState] = {
            i: BookState(i, OrderBook(i, self.book_depth)) for i in self.instruments
        }
        # (instrument, event kind) -> count; the I/O layer exports them as metrics.
        self.counters: Counter[tuple[str, str]] = Counter()
        self._actions: list[Action] = []

    # -- the protocol (subclasses) ----------------------------------------------------------------

    def connections(self) -> list[ConnectionSpec]:
        raise NotImplementedError

    def on_frame(self, conn: str, raw: str | bytes, received_ns: int) -> list[Record]:
        raise NotImplementedError

    def on_snapshot(self, instrument: str, body: bytes | str, received_ns: int) -> list[Record]:
        raise ConnectorError(f"{self.venue} takes no REST snapshots")

    def snapshot_url(self, instrument: str) -> str | None:
        """The REST snapshot URL of `instrument`, when the venue's book protocol needs one."""
        return None

    def _request_snapshot(self, instrument: str) -> None:
        """Ask the venue for a fresh snapshot of one instrument (queue an action)."""
        url = self.snapshot_url(instrument)
        if url is not None:
            self._actions.append(FetchSnapshot(instrument, url))

    # -- connection lifecycle (shared) ------------------------------------------------------------

    def spec(self, conn: str) -> ConnectionSpec:
        for spec in self.connections():
            if spec.key == conn:
                return spec
        raise ConnectorError(f"{self.venue}: no connection {conn!r}")

    def on_open(self, conn: str, received_ns: int) -> list[Record]:
        """A (re)opened socket: its instruments' books start over, snapshots are requested."""
        for instrument in self.spec(conn).instruments:
            state = self.states[instrument]
            self._reset(state)
            if self.with_books:
                self._request_snapshot(instrument)
        return []

    def on_close(self, conn: str, received_ns: int, reason: str) -> list[Record]:
        """The socket is gone: every instrument on it gets a `Disconnect` (its trades and book
        cannot be vouched for until the next snapshot), and its book is dropped."""
        out: list[Record] = []
        for instrument in self.spec(conn).instruments:
            self._reset(self.states[instrument])
            out.append(Disconnect(instrument, received_ns, self.venue, reason))
        log.info("%s connection %s closed (%s): %d instruments disconnected", self.venue, conn, reason, len(out))
        return out

    def take_actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    # -- integrity (shared) -----------------------------------------------------------------------

    def _count(self, instrument: str, kind: str) -> None:
        self.counters[(instrument, kind)] += 1

    def _event(self, instrument: str, kind: str, received_ns: int | None, sequence: int | None = None,
               detail: str = "") -> IntegrityEvent:  # fmt: skip
        self._count(instrument, kind)
        return IntegrityEvent(instrument, kind, self.venue, received_ns, sequence, detail)

    def _reset(self, state: BookState) -> None:
        state.book.clear()
        state.phase = "awaiting"
        state.sequence = None
        state.buffer.clear()

    def resync(self, instrument: str, received_ns: int | None, kind: str, detail: str,
               sequence: int | None = None) -> list[Record]:  # fmt: skip
        """A break in one instrument's book: record it, drop the book, ask for a new snapshot."""
        state = self.states[instrument]
        state.resyncs += 1
        log.warning("%s %s: %s (%s); resyncing this instrument only", self.venue, instrument, kind, detail)
        failed = self._event(instrument, kind, received_ns, sequence, detail)
        self._reset(state)
        self._request_snapshot(instrument)
        return [failed, self._event(instrument, RESYNC, received_ns, sequence, detail)]

    # -- book records (shared) --------------------------------------------------------------------

    def _snapshot_record(self, state: BookState, ts_ns: int, received_ns: int | None) -> BookSnapshot:
        state.last_snapshot_ts_ns = ts_ns
        book = state.book
        return BookSnapshot(
            instrument=state.instrument, ts_ns=ts_ns, received_ns=received_ns, sequence=state.sequence,
            prev_sequence=None, bids=book.bids(), asks=book.asks(), source=self.venue, verified=self.verified,
        )  # fmt: skip

    def _synced(self, state: BookState, ts_ns: int, received_ns: int | None, detail: str = "") -> list[Record]:
        """The book of `state` is in sync: say so and publish it whole."""
        state.phase = "synced"
        return [
            self._event(state.instrument, SYNCED, received_ns, state.sequence, detail),
            self._snapshot_record(state, ts_ns, received_ns),
        ]

    def _delta_record(self, state: BookState, ts_ns: int, received_ns: int | None, prev_sequence: int | None,
                      bids: Sequence[Level], asks: Sequence[Level]) -> list[Record]:  # fmt: skip
        """A checked delta, plus the periodic full snapshot on the log's own clock (exchange time)."""
        out: list[Record] = [BookDelta(
            instrument=state.instrument, ts_ns=ts_ns, received_ns=received_ns, sequence=state.sequence,
            prev_sequence=prev_sequence, bids=tuple(bids), asks=tuple(asks), source=self.venue,
            verified=self.verified,
        )]  # fmt: skip
        if self.snapshot_every_ns and ts_ns - state.last_snapshot_ts_ns >= self.snapshot_every_ns:
            out.append(self._snapshot_record(state, ts_ns, received_ns))
        return out

    def _check_crossed(self, state: BookState, received_ns: int | None) -> list[Record] | None:
        if state.book.crossed():
            bid, ask = state.book.best_bid(), state.book.best_ask()
            return self.resync(state.instrument, received_ns, CROSSED, f"best bid {bid} >= best ask {ask}",
                               state.sequence)  # fmt: skip
        return None

    def metrics(self) -> dict[str, dict[str, int]]:
        """{instrument: {event kind: count}} (what /metrics exports)."""
        out: dict[str, dict[str, int]] = {i: {} for i in self.instruments}
        for (instrument, kind), n in self.counters.items():
            out.setdefault(instrument, {})[kind] = n
        return out


def decode_json(raw: str | bytes) -> Any:
    """Venue JSON with every number's digits kept: floats become `Decimal`."""
    try:
        return json.loads(raw, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConnectorError(f"not JSON: {exc}") from None


def levels(rows: Iterable[Sequence[Any]]) -> list[Level]:
    """[[price, size, ...], ...] with decimal texts -> [(Decimal, Decimal), ...]."""
    try:
        return [(Decimal(row[0]), Decimal(row[1])) for row in rows]
    except (ArithmeticError, IndexError, TypeError, ValueError) as exc:
        raise ConnectorError(f"bad book level: {exc}") from None
