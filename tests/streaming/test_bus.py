"""The bus contract (streaming/bus.py), on the in-process bus and on a real Kafka broker.

`bus` runs a test on both; tests named `test_kafka_*` need the broker itself (stopping, restarting
it). Every topic and group name starts with `topic_prefix`, so tests never share data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from candlekeep.bus import BufferFull, Bus, BusConsumer, CommitFailed, InProcessBus, KafkaBus, Record, partition_for
from tests.utils.kafka import KafkaBroker, KafkaBrokerError


def drain(consumer: BusConsumer, count: int, timeout: float = 30.0) -> list[Record]:
    """Exactly `count` records or whatever came before the deadline (never more than `count`)."""
    got: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += consumer.poll_batch(max_records=count - len(got), timeout=0.5)
    return got


def keys_covering(partitions: int, per_partition: int = 2) -> list[str]:
    """Instrument-like keys, `per_partition` of them landing on each partition."""
    keys: list[str] = []
    counts = [0] * partitions
    for i in range(10_000):
        key = f"cccagg:K{i}-USD"
        p = partition_for(key, partitions)
        if counts[p] < per_partition:
            counts[p] += 1
            keys.append(key)
        if len(keys) == partitions * per_partition:
            return keys
    raise AssertionError("no keys for every partition")


def publish_all(bus: Bus, topic: str, items: list[tuple[str, bytes]]) -> None:
    producer = bus.producer(name="test")
    for key, value in items:
        producer.publish(topic, key, value)
    assert producer.flush(30) == 0
    assert (producer.delivered, producer.failed, producer.pending) == (len(items), 0, 0)


def test_round_trip_keeps_key_order_and_partitions(bus: Bus, topic_prefix: str) -> None:
    topic = topic_prefix + "ticks"
    bus.ensure_topics([topic], partitions=3)
    keys = keys_covering(3)
    publish_all(bus, topic, [(k, f"{k}|{seq}".encode()) for seq in range(40) for k in keys])

    consumer = bus.consumer(group=topic_prefix + "g", topics=[topic])
    records = drain(consumer, 40 * len(keys))
    assert consumer.poll_batch(max_records=10, timeout=0.5) == []
    consumer.close()

    assert len(records) == 40 * len(keys)
    by_key: dict[str, list[int]] = {}
    for r in records:
        assert r.topic == topic and r.key is not None
        assert r.partition == partition_for(r.key, 3), "the key's partition, as librdkafka's partitioner"
        key, seq = r.value.decode().split("|")
        assert key == r.key
        by_key.setdefault(key, []).append(int(seq))
        assert r.timestamp_ms > 1_600_000_000_000
    assert by_key == {k: list(range(40)) for k in keys}
    for p in range(3):
        offsets = [r.offset for r in records if r.partition == p]
        assert offsets == list(range(len(offsets))) and offsets


def test_new_member_resumes_exactly_after_commit(bus: Bus, topic_prefix: str) -> None:
    topic, group = topic_prefix + "ticks", topic_prefix + "g"
    bus.ensure_topics([topic])
    publish_all(bus, topic, [("cccagg:BTC-USD", str(i).encode()) for i in range(30)])

    first = bus.consumer(group=group, topics=[topic])
    head = drain(first, 10)
    assert [r.value for r in head] == [str(i).encode() for i in range(10)]
    first.commit({(topic, 0): head[-1].offset + 1})
    first.close()

    second = bus.consumer(group=group, topics=[topic])
    rest = drain(second, 20)
    assert second.poll_batch(max_records=10, timeout=1.0) == []
    assert [r.value for r in rest] == [str(i).encode() for i in range(10, 30)]
    assert [r.offset for r in rest] == list(range(10, 30))
    assert second.lag() == 0
    second.close()


def test_uncommitted_records_are_read_again(bus: Bus, topic_prefix: str) -> None:
    topic, group = topic_prefix + "ticks", topic_prefix + "g"
    bus.ensure_topics([topic], partitions=2)
    keys = keys_covering(2, per_partition=1)
    publish_all(bus, topic, [(k, f"{k}|{i}".encode()) for i in range(15) for k in keys])

    first = bus.consumer(group=group, topics=[topic])
    seen = drain(first, 30)
    assert len(seen) == 30
    first.commit({(topic, 0): 5})  # partition 1: nothing committed
    first.close()  # like a crash after reading: everything after the commit is still owed

    second = bus.consumer(group=group, topics=[topic])
    again = drain(second, 25)
    assert second.poll_batch(max_records=10, timeout=1.0) == []
    second.close()
    expected = {(r.partition, r.offset, r.value) for r in seen if r.partition == 1 or r.offset >= 5}
    assert len(again) == len(expected) == 25
    assert {(r.partition, r.offset, r.value) for r in again} == expected


def test_close_commits_through_on_revoke(bus: Bus, topic_prefix: str) -> None:
    """A graceful shutdown: `close` revokes what the consumer holds, and commits there still count."""
    topic, group = topic_prefix + "ticks", topic_prefix + "g"
    bus.ensure_topics([topic], partitions=2)
    keys = keys_covering(2, per_partition=1)
    publish_all(bus, topic, [(k, f"{k}|{i}".encode()) for i in range(10) for k in keys])
    read_to: dict[tuple[str, int], int] = {}
    revoked: list[tuple[str, int]] = []

    def on_revoke(partitions: list[tuple[str, int]]) -> None:
        revoked.extend(partitions)
        first.commit({tp: read_to[tp] for tp in partitions if tp in read_to})

    first = bus.consumer(group=group, topics=[topic], on_revoke=on_revoke)
    head = drain(first, 12)
    for r in head:
        read_to[(r.topic, r.partition)] = r.offset + 1
    first.close()
    assert sorted(revoked) == [(topic, 0), (topic, 1)]

    second = bus.consumer(group=group, topics=[topic])
    rest = drain(second, 8)
    assert second.poll_batch(max_records=10, timeout=1.0) == []
    second.close()
    assert sorted(r.value for r in head + rest) == sorted(f"{k}|{i}".encode() for i in range(10) for k in keys)


def test_commit_refused_for_partitions_not_held(bus: Bus, topic_prefix: str) -> None:
    topic = topic_prefix + "ticks"
    bus.ensure_topics([topic])
    publish_all(bus, topic, [("k", b"v")])
    consumer = bus.consumer(group=topic_prefix + "g", topics=[topic])
    assert len(drain(consumer, 1)) == 1
    with pytest.raises(CommitFailed):
        consumer.commit({(topic, 7): 1})
    consumer.close()


def test_ensure_topics_is_idempotent_and_concurrent(bus: Bus, topic_prefix: str) -> None:
    names = [topic_prefix + n for n in ("ticks", "bars", "control")]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def ensure() -> None:
        try:
            start.wait()
            bus.ensure_topics(names, partitions=2)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ensure) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    bus.ensure_topics(names, partitions=2)
    bus.ensure_topics(names[:1], partitions=4)  # exists: left with its 2 partitions

    keys = keys_covering(4)
    publish_all(bus, names[0], [(k, b"x") for k in keys])
    consumer = bus.consumer(group=topic_prefix + "g", topics=[names[0]])
    records = drain(consumer, len(keys))
    consumer.close()
    assert sorted((r.key, r.partition) for r in records) == sorted((k, partition_for(k, 2)) for k in keys)


def test_lag_reports_the_backlog(bus: Bus, topic_prefix: str) -> None:
    topic, group = topic_prefix + "ticks", topic_prefix + "g"
    bus.ensure_topics([topic], partitions=2)
    keys = keys_covering(2, per_partition=1)
    publish_all(bus, topic, [(keys[i % 2], str(i).encode()) for i in range(25)])

    consumer = bus.consumer(group=group, topics=[topic])
    head = drain(consumer, 10)
    assert len(head) == 10
    assert consumer.lag() == 15
    rest = drain(consumer, 15)
    assert len(rest) == 15
    assert consumer.lag() == 0
    consumer.commit({(topic, p): 1 + max(r.offset for r in head + rest if r.partition == p) for p in (0, 1)})
    consumer.close()

    # A new member: one partition read from, the other only committed; the lag counts from the commits.
    publish_all(bus, topic, [(keys[0], b"late")] * 3 + [(keys[1], b"late")] * 2)
    later = bus.consumer(group=group, topics=[topic])
    assert [r.value for r in drain(later, 1)] == [b"late"]
    assert later.lag() == 4
    later.close()


def test_rebalance_moves_partitions_without_loss_or_duplicates(bus: Bus, topic_prefix: str) -> None:
    topic, group = topic_prefix + "ticks", topic_prefix + "g"
    bus.ensure_topics([topic], partitions=4)
    keys = keys_covering(4, per_partition=1)
    publish_all(bus, topic, [(k, f"old|{k}|{i}".encode()) for i in range(10) for k in keys])

    held: dict[str, set[tuple[str, int]]] = {"a": set(), "b": set()}
    read_to: dict[tuple[str, int], int] = {}
    revoked_from_a: list[tuple[str, int]] = []

    def on_revoke_a(partitions: list[tuple[str, int]]) -> None:
        revoked_from_a.extend(partitions)
        a.commit({tp: read_to[tp] for tp in partitions if tp in read_to})  # what was read is done
        held["a"].difference_update(partitions)

    a = bus.consumer(group=group, topics=[topic], on_assign=held["a"].update, on_revoke=on_revoke_a)
    old = drain(a, 40)
    assert len(old) == 40 and held["a"] == {(topic, p) for p in range(4)}
    for r in old:
        read_to[(r.topic, r.partition)] = r.offset + 1

    b = bus.consumer(group=group, topics=[topic], on_assign=held["b"].update,
                     on_revoke=held["b"].difference_update)
    new: list[Record] = []
    deadline = time.monotonic() + 45
    while not (held["a"] and held["b"]) and time.monotonic() < deadline:
        new += a.poll_batch(max_records=100, timeout=0.2) + b.poll_batch(max_records=100, timeout=0.2)
    assert held["a"] and held["b"], "the second member never got partitions"
    assert held["a"].isdisjoint(held["b"]) and held["a"] | held["b"] == {(topic, p) for p in range(4)}
    assert sorted(revoked_from_a) == sorted(held["b"])

    producer = bus.producer(name="test")
    for i in range(10):
        for k in keys:
            producer.publish(topic, k, f"new|{k}|{i}".encode())
    assert producer.flush(30) == 0
    deadline = time.monotonic() + 30
    while len(new) < 40 and time.monotonic() < deadline:
        new += a.poll_batch(max_records=100, timeout=0.2) + b.poll_batch(max_records=100, timeout=0.2)
    new += a.poll_batch(max_records=100, timeout=0.5) + b.poll_batch(max_records=100, timeout=0.5)
    a.close()
    b.close()
    assert sorted(r.value for r in new) == sorted(f"new|{k}|{i}".encode() for i in range(10) for k in keys)


@pytest.mark.parametrize("kind", ["inprocess", "kafka"])
def test_failed_delivery_is_counted_logged_and_handed_back(kind: str, request: pytest.FixtureRequest,
                                                         topic_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    if kind == "kafka":
        bus: Bus = KafkaBus(request.getfixturevalue("kafka_bootstrap"), producer_config={"message.timeout.ms": 1500})
    else:
        bus = InProcessBus()
    failures: list[tuple[str, str, bytes, str]] = []
    producer = bus.producer(name="test", on_failed=lambda *args: failures.append(args))
    missing = topic_prefix + "nowhere"  # never created; the test broker does not auto-create topics
    with caplog.at_level(logging.ERROR, logger="candlekeep.bus"):
        producer.publish(missing, "cccagg:BTC-USD", b"tick")
        assert producer.pending == 1
        assert producer.flush(20) == 0
    assert (producer.delivered, producer.failed, producer.pending) == (0, 1, 0)
    assert [(t, k, v) for t, k, v, _ in failures] == [(missing, "cccagg:BTC-USD", b"tick")]
    assert failures[0][3]
    assert any("cccagg:BTC-USD" in r.getMessage() and missing in r.getMessage() for r in caplog.records)
    bus.close()


def test_buffer_full_at_the_bound_until_reports_are_served(bus: Bus, topic_prefix: str) -> None:
    topic = topic_prefix + "ticks"
    bus.ensure_topics([topic])
    producer = bus.producer(name="test", max_buffered=5)
    for i in range(5):
        producer.publish(topic, "k", str(i).encode())
    with pytest.raises(BufferFull):
        producer.publish(topic, "k", b"5")
    assert producer.pending == 5
    deadline = time.monotonic() + 10
    while producer.pending and time.monotonic() < deadline:
        producer.poll(0.1)
    producer.publish(topic, "k", b"5")
    assert producer.flush(10) == 0 and producer.delivered == 6
    consumer = bus.consumer(group=topic_prefix + "g", topics=[topic])
    assert [r.value for r in drain(consumer, 6)] == [str(i).encode() for i in range(6)]
    consumer.close()


def test_kafka_buffers_while_the_broker_is_down_and_delivers_all_after(kafka_broker: KafkaBroker,
                                                                      topic_prefix: str) -> None:
    bus = KafkaBus(kafka_broker.bootstrap)
    topic = topic_prefix + "ticks"
    bus.ensure_topics([topic])
    producer = bus.producer(name="test", max_buffered=50)
    for i in range(10):
        producer.publish(topic, "cccagg:BTC-USD", str(i).encode())
    assert producer.flush(30) == 0

    kafka_broker.stop()
    try:
        accepted = 10
        with pytest.raises(BufferFull):
            while accepted < 1000:
                producer.publish(topic, "cccagg:BTC-USD", str(accepted).encode())
                accepted += 1
                producer.poll(0)
        assert accepted == 60 and producer.pending == 50
        producer.poll(1.0)
        assert (producer.failed, producer.pending) == (0, 50), "nothing fails or vanishes while the broker is down"
    finally:
        kafka_broker.start()
    assert producer.flush(60) == 0
    assert (producer.delivered, producer.failed) == (60, 0)
    consumer = bus.consumer(group=topic_prefix + "g", topics=[topic])
    assert [r.value for r in drain(consumer, 60)] == [str(i).encode() for i in range(60)]
    bus.close()


def produce_through(bus: KafkaBus, topic: str, disrupt: Callable[[], None]) -> None:
    """Publish 27k keyed, numbered records (~10k/s) and `disrupt` the broker once 3k are delivered;
    then every record must be in the topic exactly once, each key's in order."""
    bus.ensure_topics([topic], partitions=3)
    keys = keys_covering(3, per_partition=3)
    total = 27_000
    producer = bus.producer(name="test")
    problems: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(total):
                key = keys[i % len(keys)]
                producer.publish(topic, key, f"{key}|{i // len(keys)}".encode())
                if i % 100 == 99:
                    producer.poll(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported below
            problems.append(exc)

    thread = threading.Thread(target=produce)
    thread.start()
    deadline = time.monotonic() + 30
    while producer.delivered < 3_000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert producer.delivered >= 3_000
    disrupt()
    thread.join(60)
    assert problems == []
    assert producer.flush(60) == 0
    assert (producer.delivered, producer.failed) == (total, 0)

    consumer = bus.consumer(group=topic + ".g", topics=[topic])
    records = drain(consumer, total)
    assert consumer.poll_batch(max_records=100, timeout=1.0) == [], "duplicates"
    bus.close()
    assert len(records) == total
    per_key: dict[str, list[int]] = {}
    for r in records:
        key, seq = r.value.decode().split("|")
        assert key == r.key
        per_key.setdefault(key, []).append(int(seq))
    assert per_key == {k: list(range(total // len(keys))) for k in keys}


def test_kafka_broker_restart_while_producing_delivers_each_record_once(kafka_broker: KafkaBroker,
                                                                        topic_prefix: str) -> None:
    produce_through(KafkaBus(kafka_broker.bootstrap), topic_prefix + "ticks", lambda: kafka_broker.restart(hard=True))


def test_kafka_frozen_broker_gets_retries_without_duplicates(kafka_broker: KafkaBroker, topic_prefix: str) -> None:
    """Requests time out while the broker is frozen and are retried on a new connection; on waking it
    handles the stale originals too. Only the idempotent producer keeps that from duplicating records
    (with enable.idempotence=false this test fails)."""

    def freeze() -> None:
        kafka_broker.pause()
        try:
            time.sleep(2.0)
        finally:
            kafka_broker.resume()

    produce_through(KafkaBus(kafka_broker.bootstrap, producer_config={"socket.timeout.ms": 1000}),
                    topic_prefix + "ticks", freeze)


def test_broker_without_jars_fails_loudly(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "kafka", libs=tmp_path / "no-libs")
    with pytest.raises(KafkaBrokerError, match="fetch-jars"):
        broker.start()


def test_failure_storm_is_logged_in_full_but_summarized(caplog: pytest.LogCaptureFixture) -> None:
    bus = InProcessBus()
    failures: list[str] = []
    producer = bus.producer(name="test", on_failed=lambda topic, key, value, error: failures.append(key))
    with caplog.at_level(logging.ERROR, logger="candlekeep.bus"):
        for i in range(500):
            producer.publish("nowhere", f"k{i % 2}", b"x")
        assert producer.flush(1) == 0
    assert producer.failed == 500 and len(failures) == 500
    lines = [r.getMessage() for r in caplog.records]
    assert 2 <= len(lines) <= 30
    assert lines[-1].startswith("delivery failed for 480 more records") and "key k0 x240" in lines[-1]
    assert "key k1 x240" in lines[-1]


def test_in_process_retention_is_bounded_and_never_drops_what_a_group_still_needs() -> None:
    bus = InProcessBus(retention=100, max_retention=400)
    bus.ensure_topics(["t"])
    out = bus.producer(name="p")
    reader = bus.consumer(group="g", topics=["t"])
    for k in range(300):
        out.publish("t", "k", str(k).encode())
    # Nothing committed yet: the group still needs every record, none is forgotten.
    assert bus._topics["t"][0].base == 0 and bus.trimmed == 0
    records = reader.poll_batch(max_records=250, timeout=1)
    assert [int(r.value) for r in records] == list(range(250))
    reader.commit({("t", 0): 250})
    out.publish("t", "k", b"300")
    # Committed up to 250: the partition keeps its last 100 records (of those committed, only the newest).
    part = bus._topics["t"][0]
    assert (part.base, part.end) == (201, 301) and bus.trimmed == 201
    assert [int(r.value) for r in reader.poll_batch(max_records=100, timeout=1)] == list(range(250, 301))
    # A group that never commits holds records only up to the hard bound; then it resumes at the earliest kept.
    lagging = bus.consumer(group="lagging", topics=["t"])
    for k in range(301, 1000):
        out.publish("t", "k", str(k).encode())
    assert bus._topics["t"][0].end - bus._topics["t"][0].base <= 400
    first = lagging.poll_batch(max_records=1, timeout=1)
    assert [r.offset for r in first] == [bus._topics["t"][0].base] and first[0].value == b"600"
    assert reader.lag() == 400  # it too was past the hard bound: it resumes at the earliest kept
    bus.close()
