"""Live glue of the exchange connectors: venue instruments -> `ticks` and `books` (issue 10).

    feeds = VenueFeeds(["binance:BTC-USDT", "kraken:BTC-USD"], registry=registry)
    feeds.start()                      # one thread, one asyncio loop, every venue's sockets in it
    for record in feeds.events():      # Trade / Heartbeat / Disconnect / BookSnapshot / BookDelta
        publish_record(producer, prefix, record)
    feeds.stop()

`venue_instruments(ids)` splits a tracked set into what a venue connector serves and the rest
(CryptoCompare keeps `cccagg:*` and every venue without a connector). `VenueFeeds` fetches each
venue's symbol listing (retried with backoff until it answers), builds its connector and runs a
`FeedRunner` per venue in one background event loop; records reach the caller's thread through a
queue, so the bus producer is only ever used from one thread. Integrity events are not published:
they are counted in Prometheus (`candlekeep_venue_integrity_total{venue,instrument,event}`) and
logged; the runners' socket counters are `candlekeep_venue_socket_events{venue,event}`.

`publish_record` maps a record to its topic: trades, heartbeats and disconnects to `ticks`
(encode_tick_record), book snapshots and deltas to `books` (encode_book), keyed by instrument;
a frame no connector could read (`BadFrame`) to `deadletter`, whole, keyed by venue.
The book side publishes a full snapshot after each (re)sync and every `snapshot_every_s` of
exchange time (the connectors' `snapshot_every_s`), so a consumer can start anywhere.

State: `_queue` records handed over by the loop thread, in emit order; `_runners` venue -> its
FeedRunner (their `stats` and the connectors' `counters` are what /metrics shows).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from candlekeep.bars import Disconnect, Heartbeat, Trade
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.bus import BufferFull, BusProducer
from candlekeep.feeds import fetch_listing
from candlekeep.instruments import Instrument
from candlekeep.messages import BOOKS, DEADLETTER, TICKS, encode_book, encode_deadletter, encode_tick_record, topic
from candlekeep.settings import Settings
from candlekeep.sources.cryptocompare_stream import BadFrame
from candlekeep.sources.exchanges.base import Connector, IntegrityEvent, Record, SymbolMap
from candlekeep.sources.exchanges.live import FeedRunner
from candlekeep.sources.exchanges.registry import ID_VENUES, venue

log = logging.getLogger(__name__)

SOCKET_EVENTS = ("connects", "disconnects", "frames", "bad_frames", "snapshots", "snapshot_retries", "silence_timeouts")


def venue_instruments(instruments: Iterable[str]) -> tuple[dict[str, list[str]], list[str]]:
    """({connector venue: [instrument ids]}, [ids no venue connector serves])."""
    served: dict[str, list[str]] = {}
    rest: list[str] = []
    for text in instruments:
        ins = Instrument.parse(text)
        name = ID_VENUES.get(ins.venue)
        if name is None:
            rest.append(ins.id)
        else:
            served.setdefault(name, []).append(ins.id)
    return served, rest


def publish_record(producer: BusProducer, prefix: str, record: Record | BadFrame, *, wait: float = 0.1) -> bool:
    """Publish one record to its topic (waiting out backpressure); False for records that are not
    published (integrity events). A frame no connector could read goes to `deadletter`, whole."""
    if isinstance(record, Trade | Heartbeat | Disconnect):
        name, key, value = TICKS, record.instrument, encode_tick_record(record)
    elif isinstance(record, BookSnapshot | BookDelta):
        name, key, value = BOOKS, record.instrument, encode_book(record)
    elif isinstance(record, BadFrame):
        source = record.error.split(" ", 1)[0]
        name, key = DEADLETTER, source
        value = encode_deadletter(topic_name=f"{source} websocket", partition=-1, offset=-1, error=record.error,
                                  payload=record.payload)  # fmt: skip
    else:
        return False
    while True:
        try:
            producer.publish(topic(prefix, name), key, value)
            return True
        except BufferFull:
            producer.poll(wait)


class VenueFeeds:
    def __init__(
        self,
        instruments: Iterable[str],
        *,
        registry: CollectorRegistry | None = None,
        symbols: Mapping[str, SymbolMap] | None = None,
        urls: Mapping[str, tuple[str | None, str | None]] | None = None,
        snapshot_every_s: float = 60.0,
        runner_options: Mapping[str, Any] | None = None,
        warn_queued: int = 100_000,
    ) -> None:
        """`symbols` (per venue) skips the listing fetch; `urls` venue -> (ws_url, rest_url) points
        connectors elsewhere (tests, a proxy)."""
        self.by_venue, self.unserved = venue_instruments(instruments)
        self._symbols = dict(symbols or {})
        self._urls = dict(urls or {})
        self.snapshot_every_s = snapshot_every_s
        self.runner_options = dict(runner_options or {})
        self._queue: queue.Queue[Record | BadFrame] = queue.Queue()
        self._warn_at = warn_queued
        self._runners: dict[str, FeedRunner] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        registry = registry if registry is not None else CollectorRegistry()
        self._sockets = Gauge("candlekeep_venue_socket_events", "connects, disconnects, frames, bad frames, "
                              "snapshot fetches and retries, silence timeouts, per venue",
                              ["venue", "event"], registry=registry)  # fmt: skip
        self._integrity = Counter("candlekeep_venue_integrity", "book integrity checks and resyncs",
                                  ["venue", "instrument", "event"], registry=registry)  # fmt: skip

    @classmethod
    def from_settings(cls, settings: Settings, instruments: Iterable[str], *,
                      registry: CollectorRegistry | None = None) -> VenueFeeds:  # fmt: skip
        return cls(instruments, registry=registry, snapshot_every_s=settings.venue_snapshot_every_s,
                   runner_options={"snapshot_rate_per_s": settings.venue_rest_snapshots_per_second,
                                   "snapshot_burst": settings.venue_rest_snapshot_burst,
                                   "heartbeat_every_s": settings.venue_heartbeat_every_s})  # fmt: skip

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._stop = asyncio.Event()
            ready.set()
            try:
                loop.run_until_complete(self._main())
            finally:
                loop.close()
                self._closed.set()

        self._thread = threading.Thread(target=run, name="venue-feeds", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def events(self, poll: float = 0.2) -> Iterator[Record | BadFrame]:
        """Records in emit order until stopped (integrity events included: the caller may count them)."""
        while not (self._closed.is_set() and self._queue.empty()):
            try:
                yield self._queue.get(timeout=poll)
            except queue.Empty:
                continue

    def metrics(self) -> dict[str, Any]:
        return {name: {"sockets": dict(runner.stats), "integrity": runner.connector.metrics()}
                for name, runner in self._runners.items()}  # fmt: skip

    # -- the loop thread --------------------------------------------------------------------------

    async def _main(self) -> None:
        assert self._stop is not None
        tasks = [asyncio.create_task(self._venue(name, ids)) for name, ids in self.by_venue.items()]
        await self._stop.wait()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _venue(self, name: str, instruments: list[str]) -> None:
        assert self._stop is not None
        spec = venue(name)
        ws_url, rest_url = self._urls.get(name, (None, None))
        symbols = self._symbols.get(name)
        delay = 1.0
        while symbols is None and not self._stop.is_set():
            try:
                bodies = await asyncio.to_thread(fetch_listing, name, rest_url)
                symbols = spec.symbols(list(bodies.values()))
            except Exception as exc:  # noqa: BLE001 - any failure of the listing: retry, logged
                log.warning("%s: symbol listing failed (%s); retrying in %.0f s", name, exc, delay)
                try:
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                except TimeoutError:
                    pass
                delay = min(60.0, delay * 2)
        if symbols is None:
            return
        listed = [i for i in instruments if i in symbols.to_venue]
        for missing in sorted(set(instruments) - set(listed)):
            log.error("%s does not list %s; not subscribed", name, missing)
        if not listed:
            return
        connector: Connector = spec.connector(symbols, listed, ws_url=ws_url, rest_url=rest_url,
                                              snapshot_every_s=self.snapshot_every_s)  # fmt: skip
        runner = FeedRunner(connector, self._emit, **self.runner_options)
        self._runners[name] = runner
        for event in SOCKET_EVENTS:
            self._sockets.labels(name, event).set_function(lambda r=runner, e=event: r.stats[e])
        await runner.run(self._stop)

    def _emit(self, record: Record | BadFrame) -> None:
        if isinstance(record, IntegrityEvent):
            self._integrity.labels(record.source, record.instrument, record.kind).inc()
        # Never dropped and never blocking the loop (a blocked loop would starve every socket's
        # pings): the queue is unbounded, and its depth is reported when it grows.
        self._queue.put_nowait(record)
        depth = self._queue.qsize()
        if depth >= self._warn_at:
            log.warning("venue feeds: %d records queued; the publisher is not keeping up", depth)
            self._warn_at *= 2


def run_to_bus(feeds: VenueFeeds, producer: BusProducer, prefix: str = "", *, until: float | None = None) -> int:
    """Publish every record of `feeds` until it stops (or `until`, a monotonic deadline); the count."""
    published = 0
    for record in feeds.events():
        if publish_record(producer, prefix, record):
            published += 1
            producer.poll(0)
        if until is not None and time.monotonic() > until:
            break
    return published
