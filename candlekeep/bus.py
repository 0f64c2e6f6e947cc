"""The message bus every daemon talks to: a real Kafka cluster (confluent-kafka) or an in-process stand-in.

`make_bus(settings)` picks `KafkaBus(settings.kafka_bootstrap_servers)` when it is set, else
`InProcessBus()` (the embedded `candlekeep stream all`). Both honour the same contract, so a daemon
cannot tell them apart:
- topics are partitioned logs; a record's partition is `partition_for(key, partitions)` (librdkafka's
  `consistent` partitioner, CRC-32 of the key), so one key's records stay in order;
- `publish` never blocks and never drops: with `max_buffered` records whose delivery report has not
  been served it raises `BufferFull` (call `poll`, publish again); every record ends as `delivered` or
  `failed`, counted when `poll`/`flush` serves its report (so `pending` includes unserved reports);
  a failure is logged with its key and handed to `on_failed(topic, key, value, error)`;
- consumers in a group share the partitions; a partition starts at the group's committed offset, or
  at the earliest record; `on_revoke(partitions)` runs on the consumer's own thread (inside
  `poll_batch` or `close`) *before* the partitions go, while `commit` for them still works, and
  `on_assign(partitions)` before records of newly added partitions are returned. Both receive the
  partitions that change, not the whole assignment;
- `commit` is synchronous and only for partitions this consumer holds (else `CommitFailed`);
  records read but not committed are read again by whoever holds the partition next.
The bus applies no topic prefix: callers pass full names (candlekeep.messages.topic).

State: KafkaBus owns one AdminClient and the consumers it made (closed by `close`); each producer
counts published/delivered/failed under a lock. InProcessBus keeps everything in memory behind one
Condition: topic -> partition -> list[Record], group -> committed offsets, members, partition owners.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from candlekeep.settings import Settings

log = logging.getLogger(__name__)

Partitions = list[tuple[str, int]]
PartitionCallback = Callable[[Partitions], None]
OnFailed = Callable[[str, str, bytes, str], None]  # (topic, key, value, error)


class Record(NamedTuple):
    """One consumed message. A named tuple, not a frozen dataclass: consumers build one per message
    (hundreds of thousands a second) and a frozen dataclass's __init__ costs several times more."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    timestamp_ms: int


class BusError(Exception):
    """The bus cannot do what was asked; the text says why."""


class BufferFull(BusError):
    """Backpressure: `max_buffered` records have no served delivery report. `poll`, then publish again."""


class CommitFailed(BusError):
    """Offsets were not committed (partition not held, rebalance, broker error): nothing was stored."""


class BusProducer(Protocol):
    def publish(self, topic: str, key: str, value: bytes) -> None: ...
    def poll(self, timeout: float = 0.0) -> None: ...
    def flush(self, timeout: float) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def delivered(self) -> int: ...
    @property
    def failed(self) -> int: ...


class BusConsumer(Protocol):
    def poll_batch(self, *, max_records: int, timeout: float) -> list[Record]: ...
    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None: ...
    def lag(self) -> int: ...
    def close(self) -> None: ...


class Bus(Protocol):
    def ensure_topics(self, names: Iterable[str], *, partitions: int = 1) -> None: ...
    def producer(self, *, name: str, max_buffered: int = 100_000, on_failed: OnFailed | None = None) -> BusProducer: ...
    def consumer(self, *, group: str, topics: Sequence[str], on_assign: PartitionCallback | None = None,
                 on_revoke: PartitionCallback | None = None) -> BusConsumer: ...
    def close(self) -> None: ...


def partition_for(key: str, partitions: int) -> int:
    """The partition of `key`: CRC-32 modulo the count, as librdkafka's `consistent` partitioner."""
    return zlib.crc32(key.encode()) % partitions


def make_bus(settings: Settings) -> Bus:
    if settings.kafka_bootstrap_servers:
        return KafkaBus(settings.kafka_bootstrap_servers)
    return InProcessBus()


class _Counters:
    """published/delivered/failed for one producer; pending is what has no delivery report yet.

    Every failure is logged with its topic and key, but an outage fails thousands at once: past
    `LOG_PER_SECOND` a second, failures are summed into one line per second naming every key.
    """

    LOG_PER_SECOND = 20

    def __init__(self, name: str, on_failed: OnFailed | None) -> None:
        self.name = name
        self.on_failed = on_failed
        self._lock = threading.Lock()
        self.published = self.delivered = self.failed = 0
        self._window = 0.0
        self._logged = 0
        self._suppressed: dict[tuple[str, str], int] = {}  # (topic, key) -> failures not logged yet

    @property
    def pending(self) -> int:
        return self.published - self.delivered - self.failed

    def add(self, n: int) -> None:
        with self._lock:
            self.published += n

    def ok(self) -> None:
        with self._lock:
            self.delivered += 1

    def fail(self, topic: str, key: str, value: bytes, error: str) -> None:
        self.summarize()
        with self._lock:
            self.failed += 1
            quiet = self._logged >= self.LOG_PER_SECOND
            if quiet:
                self._suppressed[(topic, key)] = self._suppressed.get((topic, key), 0) + 1
            self._logged += 1
        if not quiet:
            log.error("delivery failed: producer %s, topic %s, key %s: %s", self.name, topic, key, error,
                      extra={"producer": self.name, "topic": topic, "key": key, "error": error})
        if self.on_failed is not None:
            try:
                self.on_failed(topic, key, value, error)
            except Exception:
                log.exception("on_failed hook of producer %s raised", self.name)

    def summarize(self, *, final: bool = False) -> None:
        """Log the failures held back in the last second (at once when `final`)."""
        with self._lock:
            now = time.monotonic()
            if not final and now - self._window < 1.0:
                return
            self._window, self._logged = now, 0
            held, self._suppressed = self._suppressed, {}
        if held:
            log.error("delivery failed for %d more records: producer %s, %s", sum(held.values()), self.name,
                      ", ".join(f"{t} key {k} x{n}" for (t, k), n in sorted(held.items())),
                      extra={"producer": self.name, "failures": {f"{t}|{k}": n for (t, k), n in held.items()}})


# --- Kafka ---------------------------------------------------------------------------------------


class _CountedProducer:
    """Delivery counters for metrics, the same on both buses (`_counts` set by the subclass)."""

    _counts: _Counters

    @property
    def on_failed(self) -> OnFailed | None:
        return self._counts.on_failed

    @on_failed.setter
    def on_failed(self, hook: OnFailed | None) -> None:
        self._counts.on_failed = hook

    @property
    def pending(self) -> int:
        return self._counts.pending

    @property
    def delivered(self) -> int:
        return self._counts.delivered

    @property
    def failed(self) -> int:
        return self._counts.failed


class KafkaBus:
    """A Kafka cluster. `producer_config` / `consumer_config` override librdkafka settings (tests)."""

    def __init__(self, bootstrap: str, *, producer_config: Mapping[str, Any] | None = None,
                 consumer_config: Mapping[str, Any] | None = None, timeout: float = 30.0) -> None:
        self.bootstrap = bootstrap
        self.timeout = timeout
        self._producer_config = dict(producer_config or {})
        self._consumer_config = dict(consumer_config or {})
        self._admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _LIBRDKAFKA_LOG})
        self._consumers: weakref.WeakSet[KafkaBusConsumer] = weakref.WeakSet()
        self._producers: weakref.WeakSet[KafkaBusProducer] = weakref.WeakSet()

    def ensure_topics(self, names: Iterable[str], *, partitions: int = 1) -> None:
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return
        deadline = time.monotonic() + self.timeout
        existing = self._admin.list_topics(timeout=self.timeout).topics
        missing = [n for n in wanted if n not in existing or existing[n].error is not None]
        if missing:
            futures = self._admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=-1) for n in missing],
                operation_timeout=self.timeout, request_timeout=self.timeout)
            for name, future in futures.items():
                try:
                    future.result()
                    log.info("created topic %s (%d partitions)", name, partitions, extra={"topic": name})
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise BusError(f"cannot create topic {name}: {exc.args[0].str()}") from exc
        # Creation propagates asynchronously: wait until every partition has a leader.
        while True:
            topics = self._admin.list_topics(timeout=self.timeout).topics
            ready = [n for n in wanted if n in topics and topics[n].error is None and topics[n].partitions
                     and all(p.leader >= 0 for p in topics[n].partitions.values())]
            if len(ready) == len(wanted):
                break
            if time.monotonic() > deadline:
                raise BusError(f"topics not ready after {self.timeout:.0f} s: {sorted(set(wanted) - set(ready))}")
            time.sleep(0.1)
        for name in wanted:
            if (count := len(topics[name].partitions)) != partitions:
                log.warning("topic %s exists with %d partitions (asked for %d); left as it is", name, count, partitions)

    def producer(self, *, name: str, max_buffered: int = 100_000, on_failed: OnFailed | None = None) -> KafkaBusProducer:
        producer = KafkaBusProducer(self.bootstrap, name=name, max_buffered=max_buffered, on_failed=on_failed,
                                    config=self._producer_config)
        self._producers.add(producer)
        return producer

    def consumer(self, *, group: str, topics: Sequence[str], on_assign: PartitionCallback | None = None,
                 on_revoke: PartitionCallback | None = None) -> KafkaBusConsumer:
        consumer = KafkaBusConsumer(self.bootstrap, group=group, topics=topics, on_assign=on_assign,
                                    on_revoke=on_revoke, config=self._consumer_config)
        self._consumers.add(consumer)
        return consumer

    def close(self) -> None:
        """Close the consumers still open; producers are the caller's to flush, and any not flushed is said."""
        for consumer in list(self._consumers):
            consumer.close()
        for producer in list(self._producers):
            if producer.pending:
                log.error("bus closed while producer %s has %d undelivered records", producer.name, producer.pending)


_LIBRDKAFKA_LOG = logging.getLogger("candlekeep.bus.librdkafka")


def _on_client_error(err: KafkaError) -> None:
    # librdkafka retries on its own; fatal errors are raised by the next publish / poll_batch. A broken
    # connection is already in librdkafka's own log (FAIL), so only its summary is repeated here.
    level = logging.DEBUG if err.code() == KafkaError._TRANSPORT else logging.WARNING
    log.log(level, "kafka client: %s", err.str(), extra={"code": err.name(), "fatal": err.fatal()})


class KafkaBusProducer(_CountedProducer):
    """Idempotent producer (acks=all, in-order, no duplicates on retry); batching via linger.ms."""

    def __init__(self, bootstrap: str, *, name: str, max_buffered: int, on_failed: OnFailed | None,
                 config: Mapping[str, Any]) -> None:
        self.name = name
        self.max_buffered = max_buffered
        self._counts = _Counters(name, on_failed)
        self._fatal: str | None = None
        self._producer = Producer({
            "bootstrap.servers": bootstrap,
            "client.id": name,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 10,
            "compression.type": "lz4",
            "partitioner": "consistent",
            "queue.buffering.max.messages": max_buffered,
            "error_cb": self._on_error,
            "logger": _LIBRDKAFKA_LOG,
            **config,
        })

    def publish(self, topic: str, key: str, value: bytes) -> None:
        if self._fatal is not None:
            raise BusError(f"producer {self.name} is unusable: {self._fatal}")
        self._counts.add(1)
        try:
            self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
        except BufferError:
            self._counts.add(-1)
            raise BufferFull(f"producer {self.name}: {self.max_buffered} records await delivery") from None
        except KafkaException as exc:
            self._counts.add(-1)
            raise BusError(f"producer {self.name} cannot publish to {topic} (key {key}): {exc.args[0].str()}") from exc

    def poll(self, timeout: float = 0.0) -> None:
        self._producer.poll(timeout)
        self._counts.summarize()

    def flush(self, timeout: float) -> int:
        left = self._producer.flush(timeout)
        self._counts.summarize(final=True)
        return left

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self._counts.ok()
        else:
            key = msg.key()
            self._counts.fail(msg.topic(), key.decode(errors="replace") if key is not None else "",
                              msg.value() or b"", err.str())

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err.str()
            log.error("producer %s: fatal error %s", self.name, err.str(), extra={"producer": self.name})
        else:
            _on_client_error(err)


class KafkaBusConsumer:
    """Group member with manual, synchronous commits and cooperative (incremental) rebalancing."""

    def __init__(self, bootstrap: str, *, group: str, topics: Sequence[str], on_assign: PartitionCallback | None,
                 on_revoke: PartitionCallback | None, config: Mapping[str, Any]) -> None:
        self.group = group
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._assigned: set[tuple[str, int]] = set()  # changed by callbacks; lag() may run on another thread
        self._lock = threading.Lock()
        self._closed = False
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "client.id": f"candlekeep-{group}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 6_000,  # the lowest a default broker accepts: a dead member goes fast
            "heartbeat.interval.ms": 1_000,
            "error_cb": _on_client_error,
            "logger": _LIBRDKAFKA_LOG,
            **config,
        })
        self._consumer.subscribe(list(topics), on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lost)

    def poll_batch(self, *, max_records: int, timeout: float) -> list[Record]:
        if self._closed:
            raise BusError(f"consumer {self.group} is closed")
        # consume(n, t) waits for n messages or t; poll(t) returns at the first, then take what is ready.
        first = self._consumer.poll(timeout)
        if first is None:
            return []
        messages = [first]
        if max_records > 1:
            messages += self._consumer.consume(max_records - 1, 0)
        records = []
        for msg in messages:
            err = msg.error()
            if err is None:
                key = msg.key()
                records.append(Record(msg.topic(), msg.partition(), msg.offset(),
                                      key.decode(errors="replace") if key is not None else None,
                                      msg.value() or b"", msg.timestamp()[1]))
            elif err.fatal():
                raise BusError(f"consumer {self.group}: fatal error {err.str()}")
            else:
                log.warning("consumer %s: %s", self.group, err.str(), extra={"group": self.group, "code": err.name()})
        return records

    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        if not offsets:
            return
        with self._lock:
            foreign = sorted(set(offsets) - self._assigned)
        if foreign:
            raise CommitFailed(f"consumer {self.group} does not hold {foreign}")
        try:
            result = self._consumer.commit(
                offsets=[TopicPartition(t, p, off) for (t, p), off in offsets.items()], asynchronous=False)
        except KafkaException as exc:
            raise CommitFailed(f"consumer {self.group}: {exc.args[0].str()}") from exc
        errors = [f"{tp.topic}[{tp.partition}]: {tp.error.str()}" for tp in result or [] if tp.error is not None]
        if errors:
            raise CommitFailed(f"consumer {self.group}: {'; '.join(errors)}")

    def lag(self) -> int:
        with self._lock:
            held = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        if not held:
            return 0
        positions = self._consumer.position(held)
        unread = [TopicPartition(tp.topic, tp.partition) for tp in positions if tp.offset < 0]
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in (self._consumer.committed(unread, timeout=10) if unread else [])}
        total = 0
        for tp in positions:
            part = TopicPartition(tp.topic, tp.partition)
            position = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
            # The high watermark as of the last fetch response (<= fetch.wait.max.ms old). Asking the
            # broker instead queues behind the connection's long-polling fetch: ~0.5 s per partition.
            low, high = self._consumer.get_watermark_offsets(part, cached=True) or (-1, -1)
            if high < 0 or (position < 0 and low < 0):
                marks = self._consumer.get_watermark_offsets(part, timeout=10)
                if marks is None:
                    raise BusError(f"consumer {self.group}: no watermarks for {tp.topic}[{tp.partition}]")
                low, high = marks
            total += max(0, high - (position if position >= 0 else low))
        return total

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._consumer.close()  # serves on_revoke for what it holds, then leaves the group

    # librdkafka calls these from poll/consume/close; partitions are the incremental change.
    def _assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        added = [(tp.topic, tp.partition) for tp in partitions]
        with self._lock:
            self._assigned.update(added)
        log.info("consumer %s assigned %s", self.group, added, extra={"group": self.group})
        if self._on_assign is not None and added:
            self._on_assign(added)

    def _revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        removed = [(tp.topic, tp.partition) for tp in partitions]
        log.info("consumer %s revoked %s", self.group, removed, extra={"group": self.group})
        try:
            if self._on_revoke is not None and removed:
                self._on_revoke(removed)  # may still commit these
        finally:
            with self._lock:
                self._assigned.difference_update(removed)

    def _lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost (session expired): others may own them already, so commits for them are refused.
        removed = [(tp.topic, tp.partition) for tp in partitions]
        with self._lock:
            self._assigned.difference_update(removed)
        log.warning("consumer %s lost %s", self.group, removed, extra={"group": self.group})
        if self._on_revoke is not None and removed:
            self._on_revoke(removed)


# --- in-process ----------------------------------------------------------------------------------


class _Log:
    """One partition in memory: the records from offset `base` on (older ones were trimmed)."""

    __slots__ = ("base", "records")

    def __init__(self) -> None:
        self.base = 0
        self.records: list[Record] = []

    @property
    def end(self) -> int:
        return self.base + len(self.records)

    def read(self, position: int, count: int) -> list[Record]:
        start = max(position, self.base) - self.base
        return self.records[start:start + count]

    def trim(self, below: int) -> int:
        """Forget the records before offset `below`; how many went."""
        drop = min(max(below - self.base, 0), len(self.records))
        if drop:
            del self.records[:drop]
            self.base += drop
        return drop


class InProcessBus:
    """Kafka's semantics in memory, for the embedded single-process deployment and tests.

    Retention is bounded, as a broker's is: past `retention` records a partition forgets the ones
    every group reading it has committed; past `max_retention` it forgets the oldest regardless
    (logged: a consumer that far behind resumes at the earliest record kept, like Kafka's
    `auto.offset.reset=earliest`)."""

    def __init__(self, *, retention: int = 100_000, max_retention: int = 2_000_000) -> None:
        if not 0 < retention <= max_retention:
            raise ValueError("retention bounds must satisfy 0 < retention <= max_retention")
        self._cond = threading.Condition()
        self._topics: dict[str, list[_Log]] = {}
        self._groups: dict[str, _Group] = {}
        self.retention, self.max_retention = retention, max_retention
        self.trimmed = 0

    def ensure_topics(self, names: Iterable[str], *, partitions: int = 1) -> None:
        with self._cond:
            for name in dict.fromkeys(names):
                if name not in self._topics:
                    self._topics[name] = [_Log() for _ in range(partitions)]
                    log.info("created topic %s (%d partitions)", name, partitions, extra={"topic": name})
                elif (count := len(self._topics[name])) != partitions:
                    log.warning("topic %s exists with %d partitions (asked for %d); left as it is",
                                name, count, partitions)
            self._cond.notify_all()

    def producer(self, *, name: str, max_buffered: int = 100_000, on_failed: OnFailed | None = None) -> InProcessProducer:
        return InProcessProducer(self, name=name, max_buffered=max_buffered, on_failed=on_failed)

    def consumer(self, *, group: str, topics: Sequence[str], on_assign: PartitionCallback | None = None,
                 on_revoke: PartitionCallback | None = None) -> InProcessConsumer:
        return InProcessConsumer(self, group=group, topics=topics, on_assign=on_assign, on_revoke=on_revoke)

    def close(self) -> None:
        with self._cond:
            members = [m for g in self._groups.values() for m in g.members]
        for member in members:
            member.close()

    def _append(self, topic: str, key: str, value: bytes) -> str | None:
        """Append one record; the error text when the topic does not exist."""
        with self._cond:
            log_ = self._topics.get(topic)
            if log_ is None:
                return f"Broker: Unknown topic or partition ({topic} does not exist)"
            partition = partition_for(key, len(log_))
            part = log_[partition]
            part.records.append(Record(topic, partition, part.end, key, value, time.time_ns() // 1_000_000))
            if len(part.records) > self.retention:
                self._trim(topic, partition, part)
            self._cond.notify_all()
            return None

    def _trim(self, topic: str, partition: int, part: _Log) -> None:
        """Bounded retention (see the class docstring); under the lock."""
        tp = (topic, partition)
        readers = [g for g in self._groups.values() if tp in g.committed or any(topic in m.topics for m in g.members)]
        safe = min((g.committed.get(tp, 0) for g in readers), default=part.end)
        below = min(safe, part.end - self.retention)
        if part.end - max(below, part.base) > self.max_retention:
            forced = part.end - self.max_retention
            log.warning("in-process topic %s[%d] holds more than %d records: forgetting the oldest, uncommitted "
                        "ones included", topic, partition, self.max_retention)  # fmt: skip
            below = max(below, forced)
        self.trimmed += part.trim(below)

    def _target(self, group: _Group) -> dict[tuple[str, int], InProcessConsumer]:
        """Who should hold each partition: Kafka's range assignor over the members in join order."""
        target: dict[tuple[str, int], InProcessConsumer] = {}
        for topic in sorted({t for m in group.members for t in m.topics}):
            if topic not in self._topics:
                continue
            subscribers = [m for m in group.members if topic in m.topics]
            count = len(self._topics[topic])
            for partition in range(count):
                target[(topic, partition)] = subscribers[partition * len(subscribers) // count]
        return target


class InProcessProducer(_CountedProducer):
    """Records are in the log at once; delivery reports wait for `poll`/`flush`, like librdkafka's."""

    def __init__(self, bus: InProcessBus, *, name: str, max_buffered: int, on_failed: OnFailed | None) -> None:
        self.name = name
        self.max_buffered = max_buffered
        self._bus = bus
        self._counts = _Counters(name, on_failed)
        self._reports: deque[tuple[str, str, bytes, str | None]] = deque()
        self._cond = threading.Condition()

    def publish(self, topic: str, key: str, value: bytes) -> None:
        with self._cond:
            if len(self._reports) >= self.max_buffered:
                raise BufferFull(f"producer {self.name}: {self.max_buffered} records await delivery")
            error = self._bus._append(topic, key, value)
            self._reports.append((topic, key, value, error))
            self._counts.add(1)
            self._cond.notify_all()

    def poll(self, timeout: float = 0.0) -> None:
        with self._cond:
            if not self._reports and timeout > 0:
                self._cond.wait(timeout)
            reports = list(self._reports)
            self._reports.clear()
        for topic, key, value, error in reports:
            if error is None:
                self._counts.ok()
            else:
                self._counts.fail(topic, key, value, error)
        self._counts.summarize()

    def flush(self, timeout: float) -> int:
        self.poll(0)
        self._counts.summarize(final=True)
        return self.pending


@dataclass
class _Group:
    members: list[InProcessConsumer]
    committed: dict[tuple[str, int], int]
    owner: dict[tuple[str, int], InProcessConsumer]


class InProcessConsumer:
    """A group member. A partition moves only after its holder revoked it (cooperative protocol)."""

    def __init__(self, bus: InProcessBus, *, group: str, topics: Sequence[str], on_assign: PartitionCallback | None,
                 on_revoke: PartitionCallback | None) -> None:
        self.group = group
        self.topics = tuple(topics)
        self._bus = bus
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._positions: dict[tuple[str, int], int] = {}  # held partitions -> next offset to read
        self._closed = False
        self._cursor = 0
        with bus._cond:
            self._group = bus._groups.setdefault(group, _Group([], {}, {}))
            self._group.members.append(self)
            bus._cond.notify_all()

    def poll_batch(self, *, max_records: int, timeout: float) -> list[Record]:
        if self._closed:
            raise BusError(f"consumer {self.group} is closed")
        deadline = time.monotonic() + timeout
        cond = self._bus._cond
        while True:
            self._rebalance()
            with cond:
                records = self._take(max_records)
                if records:
                    return records
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                if not self._rebalance_due():
                    cond.wait(remaining)

    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        with self._bus._cond:
            foreign = sorted(set(offsets) - set(self._positions))
            if self._closed or foreign:
                raise CommitFailed(f"consumer {self.group} does not hold {foreign or sorted(offsets)}")
            self._group.committed.update(offsets)

    def lag(self) -> int:
        with self._bus._cond:
            return sum(self._bus._topics[t][p].end - max(pos, self._bus._topics[t][p].base)
                       for (t, p), pos in self._positions.items())

    def close(self) -> None:
        if self._closed:
            return
        held = sorted(self._positions)
        if held and self._on_revoke is not None:
            self._on_revoke(held)
        with self._bus._cond:
            self._closed = True
            for tp in held:
                self._group.owner.pop(tp, None)
            self._positions.clear()
            self._group.members.remove(self)
            self._bus._cond.notify_all()

    def _rebalance_due(self) -> bool:
        target = self._bus._target(self._group)
        return (any(target.get(tp) is not self for tp in self._positions)
                or any(m is self and tp not in self._positions and tp not in self._group.owner
                       for tp, m in target.items()))

    def _rebalance(self) -> None:
        """Serve this member's part of a rebalance, callbacks on this thread and outside the lock."""
        cond = self._bus._cond
        with cond:
            target = self._bus._target(self._group)
            revoked = sorted(tp for tp in self._positions if target.get(tp) is not self)
        if revoked:
            log.info("consumer %s revoked %s", self.group, revoked, extra={"group": self.group})
            if self._on_revoke is not None:
                self._on_revoke(revoked)  # still held: commits for them work
            with cond:
                for tp in revoked:
                    del self._positions[tp]
                    self._group.owner.pop(tp, None)
                cond.notify_all()
        with cond:
            target = self._bus._target(self._group)
            added = sorted(tp for tp, m in target.items()
                           if m is self and tp not in self._positions and tp not in self._group.owner)
            for tp in added:
                self._group.owner[tp] = self
                self._positions[tp] = self._group.committed.get(tp, 0)
        if added:
            log.info("consumer %s assigned %s", self.group, added, extra={"group": self.group})
            if self._on_assign is not None:
                self._on_assign(added)

    def _take(self, max_records: int) -> list[Record]:
        held = sorted(self._positions)
        if not held:
            return []
        self._cursor = (self._cursor + 1) % len(held)  # rotate so no partition starves another
        out: list[Record] = []
        for tp in held[self._cursor:] + held[:self._cursor]:
            part = self._bus._topics[tp[0]][tp[1]]
            position = max(self._positions[tp], part.base)  # trimmed past: the earliest kept
            chunk = part.read(position, max_records - len(out))
            out += chunk
            self._positions[tp] = position + len(chunk)
            if len(out) >= max_records:
                break
        return out


def publish_waiting(producer: BusProducer, topic: str, key: str, value: bytes, *, timeout: float = 30.0) -> None:
    """Publish, serving delivery reports while the buffer is full (backpressure), for up to `timeout`
    seconds; then BufferFull is raised to the caller, which never drops the record itself."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            producer.publish(topic, key, value)
            return
        except BufferFull:
            if time.monotonic() > deadline:
                raise
            producer.poll(0.05)
