"""The I/O layer of the exchange connectors: sockets, pings, reconnects, REST snapshots, heartbeats.

    runner = FeedRunner(connector, emit)      # emit(record) gets every normalized record
    await runner.run(stop)                    # until `stop` (an asyncio.Event) is set

Runs in one asyncio event loop: every connection of every connector is a task, so many sockets in
one process never block each other (a slow venue only delays itself). `websockets` (asyncio) is
the library: it answers protocol pings itself, bounds frame sizes and queues, and its `connect`
raises typed errors for every way a handshake or socket fails. The connector stays pure; this
module is the only place that knows about sockets and time.

Per connection (one task each): connect -> `on_open` -> send the subscribe frames -> read frames
(`on_frame`), sending app-level pings (`PingRule`) -> on any error or `silence_timeout_s` without
a frame: `on_close` (a `Disconnect` per instrument on it), jittered exponential backoff, reconnect,
resubscribe. REST snapshots (`FetchSnapshot`) go through one queue per runner with a token bucket
(`snapshot_rate_per_s`, `snapshot_burst`) and a 429/418 answer is retried after `Retry-After`
instead of dropped: 125 symbols re-snapshotting at once must not lock a venue out (cryptofeed #613).
While a connection is live and an instrument has no trade, a `Heartbeat` is emitted every
`heartbeat_every_s` at the connection's exchange clock (the largest exchange time it has seen), so
quiet minutes close as flat bars on the log's clock.

State, per runner: `_sockets` conn key -> the open socket; `_clock` conn key -> its exchange clock;
`_last_trade` instrument -> exchange time of its last trade; `_pending` instruments with a
snapshot queued (one request per instrument at a time). `stats` counts connects, disconnects,
frames, errors and snapshot fetches for /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import requests
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from candlekeep.bars import Heartbeat, Trade
from candlekeep.sources.exchanges.base import (
    Action,
    ConnectionSpec,
    Connector,
    ConnectorError,
    FetchSnapshot,
    Record,
    Send,
)
from candlekeep.sources.exchanges.recording import RecordingWriter

log = logging.getLogger(__name__)

Emit = Callable[[Record], None]


class FeedRunner:
    def __init__(
        self,
        connector: Connector,
        emit: Emit,
        *,
        backoff_min_s: float = 1.0,
        backoff_max_s: float = 60.0,
        heartbeat_every_s: float = 5.0,
        snapshot_rate_per_s: float = 2.0,
        snapshot_burst: int = 5,
        http_timeout_s: float = 10.0,
        recorder: RecordingWriter | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.connector = connector
        self.emit = emit
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.heartbeat_every_s = heartbeat_every_s
        self.snapshot_rate_per_s = snapshot_rate_per_s
        self.snapshot_burst = snapshot_burst
        self.http_timeout_s = http_timeout_s
        self.recorder = recorder
        self.now_ns = clock_ns
        self.stats: Counter[str] = Counter()
        self.live: dict[str, bool] = {}
        self._sockets: dict[str, Any] = {}
        self._clock: dict[str, int] = {}
        self._last_trade: dict[str, int] = {}
        self._pending: set[str] = set()
        self._snapshots: asyncio.Queue[FetchSnapshot] | None = None
        self._session = requests.Session()

    # -- entry point ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._snapshots = asyncio.Queue()
        specs = self.connector.connections()
        tasks = [asyncio.create_task(self._connection(spec, stop), name=f"ws-{spec.key}") for spec in specs]
        tasks.append(asyncio.create_task(self._snapshot_worker(stop), name="rest-snapshots"))
        tasks.append(asyncio.create_task(self._heartbeats(specs, stop), name="heartbeats"))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._session.close()

    # -- records and actions ----------------------------------------------------------------------

    def _deliver(self, conn: str | None, records: list[Record]) -> None:
        for record in records:
            ts = getattr(record, "ts_ns", None)
            if conn is not None and isinstance(ts, int) and not isinstance(record, Heartbeat):
                if ts > self._clock.get(conn, 0):
                    self._clock[conn] = ts
            if isinstance(record, Trade):
                self._last_trade[record.instrument] = max(record.ts_ns, self._last_trade.get(record.instrument, 0))
            self.emit(record)
        self._dispatch(self.connector.take_actions())

    def _dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                ws = self._sockets.get(action.conn)
                if ws is not None:
                    asyncio.get_running_loop().create_task(self._send(action.conn, ws, action.frame))
            elif isinstance(action, FetchSnapshot) and action.instrument not in self._pending:
                self._pending.add(action.instrument)
                assert self._snapshots is not None
                self._snapshots.put_nowait(action)

    async def _send(self, conn: str, ws: Any, frame: str) -> None:
        try:
            await ws.send(frame)
            if self.recorder is not None:
                self.recorder.sent(self.connector.spec(conn).url, self.now_ns(), frame)
        except ConnectionClosed:
            pass  # the reader task sees the close and reconnects

    # -- one connection ---------------------------------------------------------------------------

    async def _connection(self, spec: ConnectionSpec, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            opened = False
            reason = "connect failed"
            try:
                async with websockets.connect(spec.url, open_timeout=10, close_timeout=2, max_size=2**25,
                                              ping_interval=20, ping_timeout=20) as ws:  # fmt: skip
                    opened = True
                    failures = 0
                    self.stats["connects"] += 1
                    self._sockets[spec.key] = ws
                    self.live[spec.key] = True
                    now = self.now_ns()
                    if self.recorder is not None:
                        self.recorder.opened(spec.url, now)
                    log.info("%s connection %s open: %s", self.connector.venue, spec.key, spec.url)
                    self._deliver(spec.key, self.connector.on_open(spec.key, now))
                    for frame in spec.subscribe:
                        await self._send(spec.key, ws, frame)
                    pinger = asyncio.create_task(self._pinger(spec, ws)) if spec.ping else None
                    try:
                        reason = await self._read(spec, ws)
                    finally:
                        if pinger is not None:
                            pinger.cancel()
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self._sockets.pop(spec.key, None)
                self.live[spec.key] = False
            if opened:
                self.stats["disconnects"] += 1
                self._deliver(spec.key, self.connector.on_close(spec.key, self.now_ns(), reason))
            if stop.is_set():
                return
            failures += 1
            delay = min(self.backoff_max_s, self.backoff_min_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
            log.info("%s connection %s: %s; reconnecting in %.1f s", self.connector.venue, spec.key, reason, delay)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def _read(self, spec: ConnectionSpec, ws: Any) -> str:
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout=spec.silence_timeout_s)
            except TimeoutError:
                self.stats["silence_timeouts"] += 1
                return f"no frame for {spec.silence_timeout_s} s"
            except ConnectionClosed as exc:
                return f"closed: {exc}"
            now = self.now_ns()
            self.stats["frames"] += 1
            if self.recorder is not None:
                self.recorder.received(now, raw)
            try:
                records = self.connector.on_frame(spec.key, raw, now)
            except ConnectorError as exc:
                self.stats["bad_frames"] += 1
                log.warning("%s %s: unreadable frame (%s): %.200r", self.connector.venue, spec.key, exc, raw)
                continue
            self._deliver(spec.key, records)

    async def _pinger(self, spec: ConnectionSpec, ws: Any) -> None:
        assert spec.ping is not None
        while True:
            await asyncio.sleep(spec.ping.interval_s)
            await self._send(spec.key, ws, spec.ping.frame)

    # -- REST snapshots ---------------------------------------------------------------------------

    async def _snapshot_worker(self, stop: asyncio.Event) -> None:
        assert self._snapshots is not None
        tokens = float(self.snapshot_burst)
        last = time.monotonic()
        while not stop.is_set():
            request = await self._snapshots.get()
            while True:  # the token bucket: a burst of `snapshot_burst`, then `snapshot_rate_per_s`
                now = time.monotonic()
                tokens = min(float(self.snapshot_burst), tokens + (now - last) * self.snapshot_rate_per_s)
                last = now
                if tokens >= 1:
                    tokens -= 1
                    break
                await asyncio.sleep((1 - tokens) / self.snapshot_rate_per_s)
            retry_after = await self._fetch(request)
            if retry_after is not None:
                self.stats["snapshot_retries"] += 1
                await asyncio.sleep(retry_after)
                self._snapshots.put_nowait(request)  # still pending: retried, never dropped

    async def _fetch(self, request: FetchSnapshot) -> float | None:
        """GET one snapshot and hand it over; the seconds to wait before retrying, or None."""
        try:
            response = await asyncio.to_thread(self._session.get, request.url, timeout=self.http_timeout_s)
        except requests.RequestException as exc:
            log.warning("%s snapshot of %s failed: %s", self.connector.venue, request.instrument, exc)
            return min(self.backoff_max_s, 5.0)
        if response.status_code in (418, 429) or response.status_code >= 500:
            try:
                wait = float(response.headers.get("Retry-After", "5"))
            except ValueError:
                wait = 5.0
            log.warning("%s snapshot of %s: HTTP %s, retrying in %.0f s", self.connector.venue,
                        request.instrument, response.status_code, wait)  # fmt: skip
            return wait
        self._pending.discard(request.instrument)
        now = self.now_ns()
        self.stats["snapshots"] += 1
        if response.status_code != 200:
            log.error("%s snapshot of %s: HTTP %s %.200s", self.connector.venue, request.instrument,
                      response.status_code, response.text)  # fmt: skip
            return None
        if self.recorder is not None:
            self.recorder.http(request.url, now, response.text)
        try:
            records = self.connector.on_snapshot(request.instrument, response.content, now)
        except ConnectorError as exc:
            log.error("%s snapshot of %s unreadable: %s", self.connector.venue, request.instrument, exc)
            return None
        conn = next((s.key for s in self.connector.connections() if request.instrument in s.instruments), None)
        self._deliver(conn, records)
        return None

    # -- heartbeats -------------------------------------------------------------------------------

    async def _heartbeats(self, specs: list[ConnectionSpec], stop: asyncio.Event) -> None:
        if not self.connector.with_trades:
            return
        while not stop.is_set():
            await asyncio.sleep(self.heartbeat_every_s)
            for spec in specs:
                clock = self._clock.get(spec.key)
                if not self.live.get(spec.key) or clock is None:
                    continue
                for instrument in spec.instruments:
                    if self._last_trade.get(instrument, 0) < clock:
                        self.emit(Heartbeat(instrument, clock, self.connector.venue))
