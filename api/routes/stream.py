"""`WS /v1/stream?instrument=&interval=1m[&since=<unix s>]`: the forming bar as it changes, each close
and revision, after a snapshot of what the client missed; no gap and no duplicate at the seam.

On connect (the kdb+ handoff, candlekeep.live_feed):
  1. SUBSCRIBE to `ohlcv:{instrument}:{interval}:updates` (and, for intervals above 1m, the 1m
     channel: the aggregator publishes 1m bars, and a 1m update re-reads the coarser bucket holding
     it) and wait for Redis to confirm the subscription;
  2. read the snapshot through the stitched service (app.state.ohlcv, candlekeep.serving): bars
     with start >= `since` (default: the last closed bucket), forming bar last;
  3. send the snapshot in order, then `{"type": "live", ...}`, then every update that is news
     (`Seam.offer`: an update published between 1 and 2 that the snapshot already covers is dropped).
Without Redis (not configured, unreachable, or lost mid-stream) the store is polled every
`POLL_INTERVAL_S` for bars that changed among the newest `POLL_BACK` buckets: slower, still correct
for anything inside that window.

Messages (text frames, JSON):
    {"type": "bar", "state": "forming" | "provisional" | "final", "bar": {<the `bars` topic message:
            candlekeep.messages.encode_bar>}}
        `state` tells the forming bar (its bucket still open) from a closed provisional stream bar;
        prices and volumes as decimal strings; `final` false for both;
        `revision` counts published versions; the same `start` again replaces the earlier bar
    {"type": "live", "mode": "redis" | "poll", "snapshot": <bars sent in the snapshot>}
        once, between the snapshot and the live updates
Invalid parameters close the socket with code 1008 (policy violation) and a reason naming the problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import anyio
import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, WebSocket
from starlette.concurrency import run_in_threadpool

from api.security import close_reason
from api.socket_feeds import serve_until_disconnect
from api.replay_reads import replay_stream
from candlekeep.bars import Bar, Interval
from candlekeep.replay_bars import parse_replay_symbol
from candlekeep.cache import updates_channel
from candlekeep.instruments import Instrument, InstrumentError, resolve_instrument
from candlekeep.live_feed import Seam
from candlekeep.messages import MessageError, decode_bar, encode_bar
from candlekeep.query import OhlcvQuery, QueryError, parse_timestamp
from candlekeep.serving import bar_state

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["stream"])

MAX_SNAPSHOT_BARS = 10_000  # `since` further back than this many buckets: use GET /v1/ohlcv
POLL_INTERVAL_S = 1.0
POLL_BACK = 60  # buckets re-read by each poll, behind the newest sent
SUBSCRIBE_TIMEOUT_S = 2.0
POLICY_VIOLATION = 1008


class _Invalid(ValueError):
    pass


@router.websocket("/stream")
async def stream(websocket: WebSocket) -> None:
    await websocket.accept()
    if parse_replay_symbol(symbol := websocket.query_params.get("instrument", "")):  # replay sessions (issue 9)
        interval = websocket.query_params.get("interval", "1m")
        await serve_until_disconnect(websocket, replay_stream(websocket, symbol, interval),
                                     f"replay stream {symbol} {interval}")
        return
    now = int(time.time())
    try:
        instrument, interval, since = _params(websocket, now)
    except _Invalid as exc:
        await websocket.close(code=POLICY_VIOLATION, reason=close_reason(str(exc)))  # <= 123 bytes of UTF-8
        return
    feed = _Feed(websocket, instrument, interval)
    try:
        await serve_until_disconnect(websocket, feed.run(since), f"stream {instrument} {interval.value}")
    finally:
        with anyio.CancelScope(shield=True):  # see serve_until_disconnect
            await feed.close()


def _params(websocket: WebSocket, now: int) -> tuple[Instrument, Interval, int]:
    params = websocket.query_params
    unknown = set(params) - {"instrument", "interval", "since", "api_key"}  # api_key: read by api.security
    if unknown:
        raise _Invalid(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    raw_instrument = params.get("instrument")
    if not raw_instrument:
        raise _Invalid("missing parameter 'instrument' (e.g. coinbase:BTC-USD)")
    try:
        instrument = resolve_instrument(raw_instrument)
        interval = Interval.parse(params.get("interval", "1m"))
    except (InstrumentError, ValueError) as exc:
        raise _Invalid(str(exc)) from None
    current = interval.floor(now)
    raw_since = params.get("since")
    if raw_since is None:
        return instrument, interval, current - interval.seconds
    try:
        since = interval.floor(parse_timestamp(raw_since, name="since"))
    except QueryError as exc:
        raise _Invalid(str(exc)) from None
    if since > current:
        raise _Invalid(f"since ({raw_since}) is in the future")
    if (current - since) // interval.seconds > MAX_SNAPSHOT_BARS:
        raise _Invalid(f"since reaches back more than {MAX_SNAPSHOT_BARS} {interval.value} bars; use GET /v1/ohlcv")
    return instrument, interval, since


class _Feed:
    """One subscriber: subscription, snapshot, then live updates (state: `seam`, `pubsub`)."""

    def __init__(self, websocket: WebSocket, instrument: Instrument, interval: Interval) -> None:
        self.websocket = websocket
        self.instrument = instrument
        self.interval = interval
        self.service = websocket.app.state.ohlcv
        self.redis_url: str | None = websocket.app.state.settings.redis_url
        self.seam = Seam()
        self.client: aioredis.Redis | None = None
        self.pubsub = None

    async def run(self, since: int) -> None:
        live = await self._subscribe()  # FIRST: anything published from now on reaches us
        snapshot = await self._read(since, self.interval.floor(int(time.time())) + 2 * self.interval.seconds)
        sent = 0
        for bar in snapshot:
            sent += await self._offer(bar)
        await self.websocket.send_json({"type": "live", "mode": "redis" if live else "poll", "snapshot": sent})
        if live:
            try:
                await self._forward()
            except (redis.RedisError, OSError) as exc:
                log.warning("stream %s %s: redis lost (%s), polling the store", self.instrument, self.interval.value, exc)
        await self._poll(since)

    async def _subscribe(self) -> bool:
        if self.redis_url is None:
            return False
        channels = {updates_channel(self.instrument.id, self.interval.value)}
        if self.interval is not Interval.M1:
            channels.add(updates_channel(self.instrument.id, Interval.M1.value))
        try:
            self.client = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
            self.pubsub = self.client.pubsub()
            await self.pubsub.subscribe(*channels)
            confirmed: set[str] = set()
            deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
            while confirmed != channels:  # subscribed once Redis says so, not once the command is sent
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no subscription confirmation")
                msg = await self.pubsub.get_message(timeout=left)
                if msg and msg["type"] == "subscribe":
                    confirmed.add(msg["channel"].decode())
            return True
        except (redis.RedisError, OSError, TimeoutError) as exc:
            log.warning("stream %s: redis unavailable (%s), polling the store", self.instrument, exc)
            await self.close()
            return False

    async def _forward(self) -> None:
        own = updates_channel(self.instrument.id, self.interval.value)
        while True:
            msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if msg is None or msg["type"] != "message":
                continue
            try:
                bar = decode_bar(msg["data"])
            except MessageError as exc:
                log.warning("stream %s: undecodable update dropped: %s", self.instrument, exc)
                continue
            if bar.instrument != self.instrument.id:
                continue
            if msg["channel"].decode() == own and bar.interval == self.interval.value:
                await self._offer(bar)
            elif bar.interval == Interval.M1.value:  # a 1m change: re-read the coarser bucket holding it
                start = self.interval.floor(bar.start)
                for coarse in await self._read(start, start + self.interval.seconds):
                    await self._offer(coarse)

    async def _poll(self, since: int) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            newest = self.seam.newest_start
            lo = since if newest is None else max(since, newest - POLL_BACK * self.interval.seconds)
            for bar in await self._read(lo, self.interval.floor(int(time.time())) + 2 * self.interval.seconds):
                await self._offer(bar)

    async def _read(self, lo: int, hi: int) -> list[Bar]:
        query = OhlcvQuery(self.instrument, self.interval, lo, hi)
        stitched = await run_in_threadpool(self.service.read, query)  # <= MAX_SNAPSHOT_BARS + 2 buckets
        return list(stitched.bars)

    async def _offer(self, bar: Bar) -> int:
        if not self.seam.offer(bar):
            return 0
        state = bar_state(bar, now=int(time.time()))
        await self.websocket.send_text(f'{{"type":"bar","state":"{state}","bar":' + encode_bar(bar).decode() + "}")
        return 1

    async def close(self) -> None:
        if self.pubsub is not None:
            with contextlib.suppress(Exception):
                await self.pubsub.aclose()
            self.pubsub = None
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
            self.client = None
