"""The dynamic consumer: `dynamic.<venue>.<BASE>-<QUOTE>` topics (history on demand) -> `bars` in PostgreSQL.

    python -m streaming.runner dynamic [--port 9104]

Consumer group `dynamic` (prefixed like the topics) on the dynamic topic of every instrument in the
`instruments` table (the coordinator registers an instrument after creating its topic, on `track`
and `fetch`). The bus consumers take topic names, not patterns (the in-process bus matches names
exactly, and librdkafka only notices a new topic matching a regex at its next metadata refresh,
five minutes by default), so the table is read every `refresh_s` and, when it names a topic not
subscribed yet, that topic is ensured (idempotent) and the consumer is replaced by one subscribed
to the new list, between batches, when nothing is uncommitted (same group: committed offsets carry
over, new topics start at their first record).

Each polled batch is decoded (candlekeep.messages.decode_bar); a record that is not a bar, whose
key is not its instrument, or that sits in another instrument's topic goes to `deadletter` with the
reason. The bars are upserted (BarStore: idempotent; `source` and `final` as in the message; the
database counts revisions), the dead letters delivered, and only then the batch's offsets
committed. A failure (PostgreSQL or the broker down) enters `error`: nothing is committed, the same
batch is retried after a bounded backoff (0.5 s doubling to 30 s). Startup is recovery: the group's
committed offsets say where it stopped; records after them are written again, which changes nothing.

State (one block):
    state      idle | consuming | error (StateMachine; every transition logged)
    topics     the dynamic topics subscribed, sorted
    _retry     the batch a failure left unwritten (written before anything new is polled)
    committed  offsets committed last, per partition
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import Engine

from candlekeep.bars import Bar
from candlekeep.instruments import Instrument, InstrumentError
from candlekeep.messages import DEADLETTER, MessageError, decode_bar, dynamic_topic, encode_deadletter
from candlekeep.messages import topic as topic_name
from candlekeep.settings import Settings
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.bus import Bus, BusConsumer, BusProducer, CommitFailed, Record, publish_waiting
from streaming.health import StateMachine

log = logging.getLogger(__name__)

GROUP = "dynamic"
TRANSITIONS = {
    "idle": {"consuming", "error"},
    "consuming": {"error", "idle"},
    "error": {"consuming", "idle"},
}


class DynamicConsumer:
    def __init__(
        self,
        bus: Bus,
        bar_store: BarStore,
        instruments: InstrumentStore,
        *,
        prefix: str = "",
        group: str | None = None,
        max_records: int = 5_000,
        poll_timeout_s: float = 0.2,
        refresh_s: float = 2.0,
        max_backoff_s: float = 30.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.bus, self.bar_store, self.instruments = bus, bar_store, instruments
        self.prefix = prefix
        self.deadletter_topic = topic_name(prefix, DEADLETTER)
        self.group = group or topic_name(prefix, GROUP)
        self.max_records, self.poll_timeout_s = max_records, poll_timeout_s
        self.refresh_s, self.max_backoff_s = refresh_s, max_backoff_s
        self.registry = registry or CollectorRegistry()
        self.state = StateMachine("dynamic", TRANSITIONS, initial="idle", registry=self.registry)
        self.topics: list[str] = []
        self.committed: dict[tuple[str, int], int] = {}
        self._retry: list[Record] = []
        self._consumer: BusConsumer | None = None
        self._producer: BusProducer | None = None
        self._next_refresh = 0.0
        self._next_lag = 0.0
        self._lag = 0
        self._failures = 0
        self.last_error: str | None = None
        r, p = self.registry, "candlekeep_dynamic"
        self.m_records = Counter(f"{p}_records", "Records consumed from dynamic topics", registry=r)
        self.m_bars = Counter(f"{p}_bars_written", "Bars inserted or changed in PostgreSQL", registry=r)
        self.m_deadletters = Counter(f"{p}_deadletters", "Records sent to deadletter", registry=r)
        self.m_errors = Counter(f"{p}_errors", "Failed batches (retried with backoff)", registry=r)
        self.m_commits = Counter(f"{p}_commits", "Offset commits (each after a durable upsert)", registry=r)
        self.m_lag = Gauge(f"{p}_consumer_lag", "Records in subscribed topics not yet consumed", registry=r)
        self.m_topics = Gauge(f"{p}_topics", "Dynamic topics subscribed", registry=r)
        self.m_topics.set_function(lambda: len(self.topics))

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set; then leave the group (everything written is committed)."""
        while not stop.is_set():
            try:
                self.step()
                if self._failures:
                    self._failures = 0
                    self.state.to("consuming", reason="recovered")
            except Exception as exc:  # any failure: error state, back off, retry the batch; never exit
                self._fail(exc)
                stop.wait(min(self.max_backoff_s, 0.5 * 2 ** min(self._failures - 1, 16)))
        self._shutdown()

    def step(self) -> None:
        """Resubscribe when due, then poll (or retry) one batch and make it durable."""
        if not self._retry and time.monotonic() >= self._next_refresh:
            self._refresh()
            self._next_refresh = time.monotonic() + self.refresh_s
        if self._consumer is None:
            time.sleep(self.poll_timeout_s)
            return
        if self._retry:
            records, self._retry = self._retry, []
        else:
            records = self._consumer.poll_batch(max_records=self.max_records, timeout=self.poll_timeout_s)
        if records:
            try:
                self._write(records)
            except CommitFailed as exc:  # revoked meanwhile: the next holder writes them again (idempotent)
                log.warning("dynamic consumer could not commit: %s", exc)
            except Exception:
                self._retry = records
                raise
        self._measure_lag()

    def _refresh(self) -> None:
        """Subscribe to the dynamic topic of every registered instrument (see the module doc)."""
        wanted = set()
        for text in self.instruments.list_ids():
            try:
                wanted.add(dynamic_topic(self.prefix, Instrument.parse(text)))
            except InstrumentError:
                log.warning("instruments table holds an invalid id %r; no dynamic topic for it", text)
        topics = sorted(wanted)
        if topics == self.topics and self._consumer is not None:
            return
        if not topics:
            return
        self.bus.ensure_topics(topics)
        self.bus.ensure_topics([self.deadletter_topic])
        self._producer = self._producer or self.bus.producer(name="dynamic")
        if self._consumer is not None:
            self._consumer.close()  # nothing uncommitted: batches are committed before the next poll
            self._consumer = None
        self._consumer = self.bus.consumer(group=self.group, topics=topics, on_revoke=self._on_revoke)
        added = sorted(set(topics) - set(self.topics))
        self.topics = topics
        self.state.to("consuming", reason="subscribed", topics=len(topics), added=added[:10])

    def _on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        gone = set(partitions)
        self._retry = [r for r in self._retry if (r.topic, r.partition) not in gone]

    def _write(self, records: Sequence[Record]) -> None:
        assert self._consumer is not None and self._producer is not None
        bars: list[Bar] = []
        offsets: dict[tuple[str, int], int] = {}
        letters: list[tuple[Record, str]] = []
        for record in records:
            offsets[(record.topic, record.partition)] = record.offset + 1
            try:
                bar = decode_bar(record.value)
            except MessageError as exc:
                letters.append((record, str(exc)))
                continue
            if record.key != bar.instrument:
                letters.append((record, f"key {record.key!r} is not the instrument id {bar.instrument!r}"))
                continue
            if (home := dynamic_topic(self.prefix, Instrument.parse(bar.instrument))) != record.topic:
                letters.append((record, f"a bar of {bar.instrument} belongs in {home}, not {record.topic}"))
                continue
            bars.append(bar)
        written = self.bar_store.upsert_bars(bars).written if bars else 0
        if letters:
            failed_before = self._producer.failed
            for record, error in letters:
                log.warning("dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, error,
                            extra={"topic": record.topic, "partition": record.partition, "offset": record.offset,
                                   "error": error})  # fmt: skip
                self._publish(record.key or "", encode_deadletter(
                    topic_name=record.topic, partition=record.partition, offset=record.offset, error=error,
                    payload=record.value))  # fmt: skip
            left = self._producer.flush(30)
            if left or self._producer.failed > failed_before:
                raise RuntimeError(f"{len(letters)} dead letters not delivered")
        self._consumer.commit(offsets)
        self.committed.update(offsets)
        self.m_records.inc(len(records))
        self.m_bars.inc(written)
        self.m_deadletters.inc(len(letters))
        self.m_commits.inc()
        log.debug("dynamic consumer stored %d bars (%d written), %d dead letters", len(bars), written, len(letters))

    def _publish(self, key: str, value: bytes) -> None:
        assert self._producer is not None
        publish_waiting(self._producer, self.deadletter_topic, key, value)

    def _fail(self, exc: Exception) -> None:
        self._failures += 1
        self.m_errors.inc()
        self.last_error = self.state.fail(exc, failures=self._failures, logger=log)

    def _shutdown(self) -> None:
        try:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
            if self._producer is not None:
                self._producer.flush(10)
        except Exception as exc:  # nothing uncommitted is lost: the next run writes it again
            log.error("dynamic consumer stopped uncleanly: %s", exc)
        if self.state.state != "idle":
            self.state.to("idle", reason="stopped")

    # -- health ------------------------------------------------------------------------------

    def _measure_lag(self) -> None:
        if self._consumer is not None and time.monotonic() >= self._next_lag:
            self._next_lag = time.monotonic() + 1.0
            try:
                self._lag = self._consumer.lag()
            except Exception as exc:  # observability only
                log.debug("dynamic consumer lag unavailable: %s", exc)
                return
            self.m_lag.set(self._lag)

    def health(self) -> dict[str, Any]:
        return self.state.health(
            lag=self._lag,
            topics=len(self.topics),
            retrying=len(self._retry),
            committed={f"{t}[{p}]": o for (t, p), o in sorted(self.committed.items())},
            last_error=self.last_error,
        )


# -- construction and entry point -----------------------------------------------------------------


def build(settings: Settings, bus: Bus, engine: Engine, **kw: Any) -> DynamicConsumer:
    """The dynamic consumer of `settings` on `bus` and `engine` (streaming.runner and `main` share it)."""
    return DynamicConsumer(bus, BarStore(engine), InstrumentStore(engine), prefix=settings.topic_prefix, **kw)


def main(argv: Sequence[str] | None = None, settings: Settings | None = None) -> int:
    """`python -m streaming.dynamic` (or `streaming.runner dynamic`): settings from CANDLEKEEP_*."""
    from candlekeep.storage.db import create_engine, resolve_database_url
    from candlekeep.storage.migrate import upgrade
    from candlekeep.bus import make_bus
    from candlekeep.logs import configure as configure_logging
    from streaming.health import serve

    parser = argparse.ArgumentParser(prog="streaming.dynamic", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="/health and /metrics address")
    parser.add_argument("--port", type=int, default=9104, help="/health and /metrics port (0: any, -1: none)")
    args = parser.parse_args(argv)
    settings = settings or Settings()
    configure_logging(settings.log_format, settings.log_level)
    url = resolve_database_url(settings)
    upgrade(url)
    engine = create_engine(url)
    bus = make_bus(settings)
    consumer = build(settings, bus, engine)
    return serve(consumer, host=args.host, port=args.port, cleanup=[bus.close, engine.dispose])


if __name__ == "__main__":
    raise SystemExit(main())
