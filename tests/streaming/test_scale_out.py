"""Aggregators as a consumer group: 3 processes over a 6-partition `ticks` topic on the real broker.

Real recorded trades (../shared/fixtures/trades, Tardis Binance futures BTC-USDT) are dealt to six
instruments, one per partition of `ticks`, moved to the last minutes (so every bucket is closable on
arrival), sent in shuffled chunks with duplicates, and consumed by three `python -m
streaming.aggregator` processes of one group (the deploy's layout: `--partitions 6`, dynamic
membership, as compose replicas run). Mid-stream one of them is killed with SIGKILL, taking its
unflushed batch with it; later a new one joins. The truth is independent of the daemon:
`candlekeep.bars.aggregate_trades` over the unique trades sent (tests.utils.trades.reference). The
stored bars must equal it bucket for bucket (nothing lost, nothing counted twice), the `ticks`
table must hold each trade once, and every offset must be committed.

Compared: the buckets every instrument's own clock has closed (up to its last trade minus the
lateness), the same under the wall-clock aggregator of today and the log-clock one of issue 7.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from sqlalchemy import Engine, text

from candlekeep.bars import NS_PER_S, Bar, Interval, Trade
from candlekeep.bus import KafkaBus, partition_for
from candlekeep.messages import BARS, DEADLETTER, TICKS, encode_tick, topic
from candlekeep.storage.bars import BarStore
from tests.utils.trades import load_tardis, reference
from tests.utils.wait import eventually

MIN_NS = 60 * NS_PER_S
PARTITIONS = 6
ROOT = Path(__file__).resolve().parents[2]


def one_instrument_per_partition() -> list[str]:
    chosen: dict[int, str] = {}
    for venue in ("binance", "coinbase", "kraken", "bitstamp", "okx", "bybit", "gemini", "bitfinex"):
        for base in ("BTC", "ETH", "SOL", "XRP"):
            chosen.setdefault(partition_for(f"{venue}:{base}-USDT", PARTITIONS), f"{venue}:{base}-USDT")
    assert sorted(chosen) == list(range(PARTITIONS))
    return [chosen[p] for p in range(PARTITIONS)]


def stored(engine: Engine, instrument: str, start: int, end: int) -> list[Bar]:
    return [replace(b, revision=0) for b in BarStore(engine).read_bars(instrument, Interval.M1, start, end)]


def test_three_aggregators_one_killed_one_added_give_the_single_aggregator_bars(
    kafka_bootstrap: str, engine: Engine, database_url: str, redis_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    rng = random.Random(14)
    now_ns = time.time_ns()
    tardis = load_tardis()
    feeds: dict[str, list[Trade]] = {}
    for k, instrument in enumerate(one_instrument_per_partition()):
        part = tardis[k * 600:(k + 1) * 600]
        shift = now_ns - 70 * NS_PER_S - k * NS_PER_S - part[-1].ts_ns
        # Stored at microsecond resolution (the `ticks` table's), as the daemon stores them.
        feeds[instrument] = [replace(t, instrument=instrument, ts_ns=(t.ts_ns + shift) // 1000 * 1000,
                                     received_ns=None) for t in part]  # fmt: skip
    trades = sorted((t for feed in feeds.values() for t in feed), key=lambda t: t.ts_ns)
    arrivals = trades + rng.sample(trades, len(trades) // 20)  # duplicates, redelivered later
    chunks = [arrivals[i:i + 60] for i in range(0, len(arrivals), 60)]
    for chunk in chunks:
        rng.shuffle(chunk)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "CANDLEKEEP_DATABASE_URL": database_url,
           "CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "CANDLEKEEP_REDIS_URL": redis_url,
           "CANDLEKEEP_TOPIC_PREFIX": topic_prefix}  # fmt: skip
    logs: list[Path] = []

    def launch() -> subprocess.Popen:
        logs.append(tmp_path / f"aggregator-{len(logs)}.log")
        with logs[-1].open("wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "streaming.aggregator", "--port", "-1", "--flush-interval", "0.2",
                 "--partitions", str(PARTITIONS)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip

    ticks = topic(topic_prefix, TICKS)
    bus = KafkaBus(kafka_bootstrap)
    bus.ensure_topics([topic(topic_prefix, BARS), topic(topic_prefix, DEADLETTER)])
    bus.ensure_topics([ticks], partitions=PARTITIONS)
    out = bus.producer(name="scale-out-feed")
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{topic_prefix}aggregator"})
    every_partition = [TopicPartition(ticks, p) for p in range(PARTITIONS)]

    def committed() -> list[int]:
        return [max(tp.offset, 0) for tp in probe.committed(every_partition, timeout=10)]

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})

    def group_sizes() -> list[int]:
        """Partitions of `ticks` held by each member of the group, smallest first."""
        (future,) = admin.describe_consumer_groups([f"{topic_prefix}aggregator"]).values()
        group = future.result(timeout=10)
        return sorted(sum(tp.topic == ticks for tp in m.assignment.topic_partitions) for m in group.members)

    sent = [0] * PARTITIONS

    def send(chunk: list[Trade]) -> None:
        for t in chunk:
            out.publish(ticks, t.instrument, encode_tick(t))
            sent[partition_for(t.instrument, PARTITIONS)] += 1
        assert out.flush(30) == 0

    members = [launch() for _ in range(3)]
    victim = members[1]
    kill_at, join_at = len(chunks) // 3, 2 * len(chunks) // 3
    try:
        for k, chunk in enumerate(chunks):
            send(chunk)
            if k == kill_at:
                # Every partition (so every member) has committed work; the victim dies mid-batch.
                eventually(lambda: all(committed()), timeout=90, what="a commit on every partition")
                eventually(lambda: group_sizes() == [2, 2, 2], timeout=60, what="3 members holding 2 partitions each")
                time.sleep(rng.uniform(0.05, 0.2))
                victim.send_signal(signal.SIGKILL)
                victim.wait(10)
            if k == join_at:
                members.append(launch())
                # The group is three again: the dead member dropped (session timeout), the new one in.
                eventually(lambda: group_sizes() == [2, 2, 2], timeout=60, what="the group rebalanced to 3 members")
            time.sleep(rng.uniform(0.02, 0.12))
        # The victim's partitions move once the group drops it (session timeout), then everything
        # sent is consumed, made durable and committed.
        eventually(lambda: committed() == sent, timeout=180, what="every offset committed")
        with engine.connect() as conn:
            stored_ticks = conn.execute(text("SELECT count(*), count(DISTINCT (instrument, trade_id)) FROM ticks"
                                             )).one()  # fmt: skip
        assert tuple(stored_ticks) == (len(trades), len(trades))
        for instrument, feed in feeds.items():
            lo = feed[0].ts_ns // MIN_NS * 60
            hi = (feed[-1].ts_ns - 3 * NS_PER_S) // MIN_NS * 60  # buckets its own clock has closed
            expected = reference(feed, lo, hi)
            assert sum(b.trades or 0 for b in expected) > 0
            eventually(lambda i=instrument, lo=lo, hi=hi, e=expected: stored(engine, i, lo, hi) == e, timeout=30,
                       what=f"bars of {instrument}")  # fmt: skip
        survivors = [m for m in members if m is not victim]
        for member in survivors:
            member.send_signal(signal.SIGTERM)
        assert [m.wait(60) for m in survivors] == [0, 0, 0]
    finally:
        probe.close()
        for member in members:
            if member.poll() is None:
                member.kill()
                member.wait(10)
        bus.close()
