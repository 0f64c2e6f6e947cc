"""The replay-bars daemon: `replay.<session>.ticks` -> each session's 1m bars -> Redis and `replay.<session>.bars`.

    python -m streaming.runner replay-bars [--port 9107]

The same bar code as the live aggregator, candlekeep.live.BarBuilder (one per session and
instrument, source "replay", the session's lateness, microsecond order like the `ticks` table), fed
every record of the session's log in order: bars follow the replay's clock (its trades and
heartbeats), never the wall clock, so a replayed range gives the bars of that range's stored ticks
whatever the speed, pauses or the replayer's restarts (repeats are duplicates the builder drops).
Closed and revised bars and the forming bar go to Redis under `replay:<session>:` keys
(candlekeep.replay_bars) and closed ones to `replay.<session>.bars`; never to the `bars` table.

One consumer per session, group `replay-bars.<session>` (prefixed), reading from the start of the
topic and committing nothing: a restart rebuilds every followed session from its log (kdb+ `r.q`
replaying the tickerplant log), and what it writes again is the same bars with the same revisions.
Sessions are followed from their creation until they are stopped or finished and their log is read
to the end (lag 0). Bad records go to the log as warnings and are skipped (the replayer wrote them;
nothing else writes these topics).

State (one block):
    state      idle | consuming | error (StateMachine; transitions logged)
    followers  session id -> _Follower: its consumer, builders per instrument, topics
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import Engine

from candlekeep.bars import Bar
from candlekeep.bus import Bus, BusConsumer, BusProducer, publish_waiting
from candlekeep.live import BarBuilder, Poison
from candlekeep.messages import MessageError, decode_tick_record, encode_bar, replay_topic
from candlekeep.messages import topic as topic_name
from candlekeep.replay import SessionState
from candlekeep.replay_bars import ReplayBarCache
from candlekeep.settings import Settings
from candlekeep.storage.replay_sessions import ReplaySessionStore, SessionRow
from streaming.health import StateMachine

log = logging.getLogger(__name__)

GROUP = "replay-bars"
SOURCE = "replay"
TRANSITIONS = {"idle": {"consuming", "error"}, "consuming": {"idle", "error"}, "error": {"idle", "consuming"}}
TERMINAL = (SessionState.STOPPED, SessionState.FINISHED)


@dataclass
class _Follower:
    row: SessionRow
    consumer: BusConsumer
    bars_topic: str
    builders: dict[str, BarBuilder] = field(default_factory=dict)
    records: int = 0


class ReplayBars:
    def __init__(self, bus: Bus, engine: Engine, cache: ReplayBarCache | None, *, prefix: str = "",
                 refresh_s: float = 0.5, max_records: int = 5_000, registry: CollectorRegistry | None = None) -> None:  # fmt: skip
        self.bus, self.cache, self.prefix = bus, cache, prefix
        self.store = ReplaySessionStore(engine)
        self.refresh_s, self.max_records = refresh_s, max_records
        self.registry = registry or CollectorRegistry()
        self.state = StateMachine("replay-bars", TRANSITIONS, initial="idle", registry=self.registry)
        self.followers: dict[str, _Follower] = {}
        self._producer: BusProducer | None = None
        self._next_refresh = 0.0
        self._failures = 0
        self.ready = threading.Event()
        self._bars = Counter("candlekeep_replay_bars_published", "Session bars published", registry=self.registry)
        self._followed = Gauge("candlekeep_replay_bars_sessions", "Sessions followed", registry=self.registry)

    def run(self, stop: threading.Event) -> None:
        self._producer = self.bus.producer(name="candlekeep-replay-bars")
        try:
            while not stop.is_set():
                try:
                    busy = self._step()
                    self._failures = 0
                    self.ready.set()
                except Exception as exc:  # PostgreSQL, Redis or the broker down: back off, rebuild
                    self._failures += 1
                    self.state.fail(exc, failures=self._failures, logger=log)
                    self._drop_all()
                    stop.wait(min(30.0, 0.5 * 2 ** (self._failures - 1)))
                    continue
                if not busy:
                    stop.wait(0.02)
        finally:
            self._drop_all()
            if self._producer is not None:
                self._producer.flush(30)

    def _drop_all(self) -> None:
        for follower in self.followers.values():
            follower.consumer.close()
        self.followers.clear()

    def _refresh(self) -> None:
        rows = {r.id: r for r in self.store.list()}
        for row in rows.values():
            recent = time.time() - row.updated_at.timestamp() < 60
            if row.id not in self.followers and (row.state not in TERMINAL or recent):
                ticks = replay_topic(self.prefix, row.id, "ticks")
                bars = replay_topic(self.prefix, row.id, "bars")
                self.bus.ensure_topics([ticks, bars], partitions=1)
                consumer = self.bus.consumer(group=topic_name(self.prefix, f"{GROUP}.{row.id}"), topics=[ticks])
                self.followers[row.id] = _Follower(row, consumer, bars)
                log.info("replay bars: following session %s", row.id, extra={"session": row.id})
        for session_id, follower in list(self.followers.items()):
            row = rows.get(session_id)
            if row is None or (row.state in TERMINAL and follower.records and follower.consumer.lag() == 0
                               and time.time() - row.updated_at.timestamp() > 60):  # fmt: skip
                follower.consumer.close()
                del self.followers[session_id]
            elif row is not None:
                follower.row = row
        self._followed.set(len(self.followers))
        self.state.to("consuming" if self.followers else "idle", reason=f"{len(self.followers)} sessions")

    def _step(self) -> bool:
        if time.monotonic() >= self._next_refresh:
            self._refresh()
            self._next_refresh = time.monotonic() + self.refresh_s
        busy = False
        for follower in list(self.followers.values()):
            records = follower.consumer.poll_batch(max_records=self.max_records, timeout=0)
            if records:
                busy = True
                self._apply(follower, records)
        return busy

    def _apply(self, follower: _Follower, records: list) -> None:
        changed: dict[tuple[str, int], Bar] = {}
        touched: set[str] = set()
        for record in records:
            follower.records += 1
            try:
                tick = decode_tick_record(record.value)
            except MessageError as exc:
                log.warning("replay %s: bad record at offset %d skipped: %s", follower.row.id, record.offset, exc)
                continue
            builder = follower.builders.get(tick.instrument)
            if builder is None:
                builder = follower.builders[tick.instrument] = BarBuilder(
                    tick.instrument, lateness_ns=follower.row.lateness_ns, source=SOURCE, resolution_ns=1000)
            try:
                _, bars = builder.feed(tick)
            except Poison as exc:
                log.warning("replay %s: record at offset %d skipped: %s", follower.row.id, record.offset, exc)
                continue
            touched.add(tick.instrument)
            for bar in bars:
                changed[(bar.instrument, bar.start)] = bar
        closed = sorted(changed.values(), key=lambda b: (b.instrument, b.start))
        forming = [f for i in sorted(touched) if (f := follower.builders[i].forming) is not None]
        for builder in follower.builders.values():
            builder.seal()
        producer = self._producer
        assert producer is not None
        for bar in closed:
            publish_waiting(producer, follower.bars_topic, bar.instrument, encode_bar(bar))
        producer.poll(0)
        self._bars.inc(len(closed))
        if self.cache is not None:
            self.cache.put(follower.row.id, closed=closed, forming=forming)

    def health(self) -> dict[str, Any]:
        return self.state.health(sessions={i: {"records": f.records, "instruments": sorted(f.builders)}
                                           for i, f in list(self.followers.items())},
                                 redis_pending=self.cache.pending if self.cache else 0)  # fmt: skip


def build(settings: Settings, bus: Bus, engine: Engine, **kw: Any) -> ReplayBars:
    import redis

    cache = ReplayBarCache(redis.Redis.from_url(settings.redis_url)) if settings.redis_url else None
    return ReplayBars(bus, engine, cache, prefix=settings.topic_prefix, **kw)


def main(argv: Sequence[str] | None = None, settings: Settings | None = None) -> int:
    from candlekeep.bus import make_bus
    from candlekeep.storage.db import create_engine, resolve_database_url
    from candlekeep.storage.migrate import upgrade
    from streaming.health import serve

    parser = argparse.ArgumentParser(prog="streaming.replay_bars", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="/health and /metrics address")
    parser.add_argument("--port", type=int, default=9107, help="/health and /metrics port (0: any, -1: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings or Settings()
    url = resolve_database_url(settings)
    upgrade(url)
    engine = create_engine(url)
    bus = make_bus(settings)
    daemon = build(settings, bus, engine)
    return serve(daemon, host=args.host, port=args.port, cleanup=[bus.close, engine.dispose])


if __name__ == "__main__":
    raise SystemExit(main())
