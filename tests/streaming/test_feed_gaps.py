"""A dead feed end to end: gaps and `outages` rows, never invented bars; exact bars around them.

Real Kafka (tests/streaming/conftest.py), PostgreSQL and the daemons as they run in production:
- a producer (`python -m streaming.producer`, the simulator at high speed from a past start) killed
  with SIGKILL and restarted 3 simulated minutes later, `python -m streaming.aggregator` consuming;
  then the coordinator refills the outage from the simulator as its REST source;
- the CryptoCompare streamer against the loopback WebSocket server (tests/utils/ws_server.py): the
  server drops the connection, the client is away 2.5 s and reconnects;
- `stream all --start <two days back>` (streaming.runner.run_all, embedded) against the backfill.

The truth is never the code under test: the simulator's own trades and bars (`Simulator.trades`,
`Simulator.bars`, what the backfill writes), the frames the test server sent, aggregated with
`candlekeep.bars.aggregate_trades`; the gap's edges are read from the `ticks` log itself (the
contract: from the instrument's clock at the disconnect, the largest time of its trades and
heartbeats, to its next trade or heartbeat).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from sqlalchemy import Engine

from candlekeep.bars import NS_PER_S, Bar, Disconnect, Interval, TickRecord, Trade, aggregate_trades
from candlekeep.bus import KafkaBus
from candlekeep.instruments import Instrument
from candlekeep.messages import TICKS, decode_tick_record, topic
from candlekeep.query import OhlcvQuery
from candlekeep.serving import OhlcvService
from candlekeep.settings import Settings
from candlekeep.sources.cryptocompare_stream import StreamerClient
from candlekeep.sources.simulator import Simulator
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.storage.outages import OutageStore, from_ns
from candlekeep.storage.ticks import TickStore
from streaming.aggregator import Aggregator
from streaming.coordinator import Coordinator
from streaming.dynamic import DynamicConsumer
from streaming.producer import Producer
from streaming.runner import Embedded, run_all
from tests.utils.wait import eventually
from tests.utils.ws_server import StreamerServer, StreamerSession, trade_frame

M1 = Interval.M1
MIN_NS = 60 * NS_PER_S
LATENESS_NS = 2 * NS_PER_S  # the aggregator's default
REPO = Path(__file__).resolve().parents[2]
# Quiet simulated markets (a few trades a minute, unlike BTC's ~60): the log stays small at high speed.
SIM_INSTRUMENTS = ["cccagg:DOGE-USD", "cccagg:ADA-USD"]


# --- truth helpers -------------------------------------------------------------------------------


def micro(trade: Trade) -> Trade:
    """The trade as `ticks` stores it (time truncated to the microsecond)."""
    return replace(trade, ts_ns=trade.ts_ns - trade.ts_ns % 1000, received_ns=None)


def floor_min(ts_ns: int) -> int:
    """Unix s of the minute holding `ts_ns`."""
    return ts_ns // MIN_NS * 60


def ceil_min(ts_ns: int) -> int:
    return -(-ts_ns // MIN_NS) * 60


def closed_until(clock_ns: int) -> int:
    """Every minute before this (unix s) is closed once the instrument's clock is `clock_ns`."""
    return (clock_ns - LATENESS_NS) // MIN_NS * 60


def stream_bars(trades: list[Trade], start: int, end: int, instrument: str) -> list[Bar]:
    """What the stream must write for a live span: aggregate_trades of the trades received, provisional;
    buckets before the span's first trade have no bar (no previous close is known after a gap)."""
    bars = aggregate_trades([micro(t) for t in trades], M1, start, end, instrument=instrument, source="stream")
    return [replace(b, final=False) for b in bars]


def live_span(trades: list[Trade], first_ns: int, clock_ns: int, instrument: str, *, closes: bool) -> list[Bar]:
    """The bars of one live span of the feed: from its first record (`first_ns`, the end of the gap
    before it) to its clock at the disconnect that ends it (`clock_ns`). With `closes` (another
    record came after the gap that follows) every bucket up to the clock's closes: the clock's own
    bucket has a bar only if a trade lies in it (a quiet one holds the gap's start: no flat bar);
    without, only the buckets the clock passed by the lateness are closed."""
    if closes:
        end = floor_min(clock_ns) + 60
        bars = stream_bars(trades, floor_min(first_ns), end, instrument)
        if not any(floor_min(t.ts_ns) == end - 60 for t in trades):
            bars = [b for b in bars if b.start < end - 60]
        return bars
    return stream_bars(trades, floor_min(first_ns), closed_until(clock_ns), instrument)


def sim_trades(instrument: str, start_ns: int, end_ns: int, seed: int = 0) -> list[Trade]:
    return list(Simulator(seed).trades(Instrument.parse(instrument), start_ns, end_ns))


def sim_bars(instrument: str, start: int, end: int, seed: int = 0) -> list[Bar]:
    """The backfill's bars: what `Simulator.bars` gives (candlekeep.backfill writes exactly these)."""
    return [b for page in Simulator(seed).bars(Instrument.parse(instrument), M1, start, end) for b in page]


def values(bars: Iterable[Bar]) -> list[tuple]:
    """OHLCV and trades by start (source, final and revision aside)."""
    return [(b.start, b.open, b.high, b.low, b.close, b.volume, b.quote_volume, b.trades) for b in bars]


def stored(engine: Engine, instrument: str, start: int = 0, end: int = 2**33) -> list[Bar]:
    return [replace(b, revision=0) for b in BarStore(engine).read_bars(instrument, M1, start, end)]


def ranges(minutes: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted minute starts -> merged [lo, hi) ranges (as `Stitched.gaps` gives them)."""
    out: list[list[int]] = []
    for m in sorted(set(minutes)):
        if out and out[-1][1] == m:
            out[-1][1] = m + 60
        else:
            out.append([m, m + 60])
    return [(lo, hi) for lo, hi in out]


def gaps_of(engine: Engine, instrument: str, start: int, end: int) -> list[tuple[int, int]]:
    service = OhlcvService(bar_store=BarStore(engine), cache=None, outages=OutageStore(engine))
    return service.read(OhlcvQuery(Instrument.parse(instrument), M1, start, end)).gaps


def outage_rows(engine: Engine, instrument: str) -> list[tuple]:
    return [(o.started_at, o.ended_at, o.reason) for o in OutageStore(engine).list(instrument=instrument)]


class Spans:
    """One instrument's `ticks` log cut at its disconnects: for each live span its first record's
    time, its clock at the disconnect ending it (largest trade / heartbeat time) and its trades."""

    def __init__(self, log: list[TickRecord]) -> None:
        self.disconnects: list[Disconnect] = []
        self.spans: list[dict] = []
        for item in log:
            if isinstance(item, Disconnect):
                self.disconnects.append(item)
                self.spans.append({"first": None, "clock": None, "trades": []})
                continue
            span = self.spans[-1]
            span["first"] = item.ts_ns if span["first"] is None else span["first"]
            span["clock"] = item.ts_ns if span["clock"] is None else max(span["clock"], item.ts_ns)
            if isinstance(item, Trade):
                span["trades"].append(item)
        self.spans = [s for s in self.spans if s["first"] is not None]


# --- Kafka helpers -------------------------------------------------------------------------------


class TopicTail:
    """Every record of a one-partition topic, from the beginning, decoded, in log order."""

    def __init__(self, bootstrap: str, name: str) -> None:
        self.name = name
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"tail-{os.getpid()}-{time.time_ns()}",
                                  "enable.auto.commit": False})  # fmt: skip
        self.consumer.assign([TopicPartition(name, 0, OFFSET_BEGINNING)])
        self.records: list[TickRecord] = []
        self.next_offset = 0

    def poll(self, timeout: float = 0.1) -> list[TickRecord]:
        new = []
        for message in self.consumer.consume(5000, timeout):
            if message.error():
                continue
            item = decode_tick_record(message.value())
            assert message.key().decode() == item.instrument
            new.append(item)
            self.next_offset = message.offset() + 1
        self.records += new
        return new

    def high(self) -> int:
        return self.consumer.get_watermark_offsets(TopicPartition(self.name, 0), timeout=10)[1]

    def drain(self, timeout: float = 30.0) -> list[TickRecord]:
        """Read up to the current end of the topic."""
        end = self.high()
        deadline = time.monotonic() + timeout
        while self.next_offset < end:
            assert time.monotonic() < deadline, f"{self.name}: read {self.next_offset} of {end}"
            self.poll(0.2)
        return self.records

    def of(self, instrument: str) -> list[TickRecord]:
        return [r for r in self.records if r.instrument == instrument]

    def close(self) -> None:
        self.consumer.close()


def committed(bootstrap: str, group: str, name: str) -> int:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return probe.committed([TopicPartition(name, 0)], timeout=10)[0].offset
    finally:
        probe.close()


@contextmanager
def running(daemon, *, stop_timeout: float = 60) -> Iterator[object]:
    """`daemon.run(stop)` on a thread."""
    stop = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        stop.set()
        thread.join(stop_timeout)
        assert not thread.is_alive(), f"{type(daemon).__name__} did not stop"


# --- 3. past-start simulator: `stream all --start` two days back -----------------------------------


def test_stream_all_from_two_days_back_gives_the_backfills_bars(engine: Engine, database_url: str,
                                                                 topic_prefix: str) -> None:  # fmt: skip
    """`stream all --start <two days back> --speed 5000 --end ...` (embedded: one in-process bus)
    closes every minute on the simulator's own clock, so the stored stream bars equal the backfill's
    (`Simulator.bars`) in OHLCV and trades, flat bars included, for every minute from the first full
    live minute to the end. The minute holding the start is a gap edge: the stream holds only its
    trades after the start (aggregate_trades of those), and `gaps` lists it until the coordinator's
    refill makes it the simulator's final bar. Nothing is written for the minute the playback's
    clock never closes, nor after it."""
    now_min = int(time.time()) // 60 * 60
    start_ns = (now_min - 2 * 86_400) * NS_PER_S + 30 * NS_PER_S  # mid-minute: the first minute is partial
    first_full = floor_min(start_ns) + 60
    end_min = now_min - 3600  # settled history: the refill makes it final
    # The playback's last beats are at end_min (a minute boundary: all instruments) and end_min + 61 s
    # (quiet ones only): the clock passes end_min + lateness, never end_min + 60 + lateness.
    end_ns = (end_min + 61) * NS_PER_S
    speed = 5000.0
    settings = Settings(database_url=database_url, kafka_bootstrap_servers=None, redis_url=None, source="simulator",
                        instruments=SIM_INSTRUMENTS, topic_prefix=topic_prefix, simulator_seed=0)  # fmt: skip
    systems: list[Embedded] = []
    stop = threading.Event()
    result: list[int] = []
    began = time.monotonic()
    thread = threading.Thread(target=lambda: result.append(run_all(
        settings, speed=speed, start_ns=start_ns, end_ns=end_ns, ports=dict.fromkeys(
            ("producer", "aggregator", "coordinator", "dynamic"), -1), stop=stop, ready=systems.append)),
        daemon=True)  # fmt: skip
    thread.start()
    truth = {i: sim_bars(i, first_full, end_min) for i in SIM_INSTRUMENTS}
    try:
        def done() -> bool:
            for instrument in SIM_INSTRUMENTS:
                bars = [b for b in stored(engine, instrument, first_full, end_min + 3600) if b.source == "stream"]
                if not bars or bars[-1].start < end_min - 60:
                    return False
            return bool(systems) and not systems[0].aggregator.health()["pending_bars"]

        eventually(done, timeout=240, what="the stream closed every minute up to the end")
        played = time.monotonic() - began
        health = systems[0].aggregator.health()
        gaps_seen = {i: gaps_of(engine, i, floor_min(start_ns), end_min) for i in SIM_INSTRUMENTS}
    finally:
        stop.set()
        thread.join(120)
    assert not thread.is_alive() and result == [0], "stream all did not stop cleanly"
    print(f"\nstream all: {(end_ns - start_ns) / NS_PER_S / 86_400:.2f} sim days at x{speed:g} in {played:.1f} s "
          f"(ideal {(end_ns - start_ns) / NS_PER_S / speed:.1f} s); aggregator health {health['committed']}")

    sim = Simulator(0)
    for instrument in SIM_INSTRUMENTS:
        bars = stored(engine, instrument)
        stream = [b for b in bars if b.source == "stream"]
        assert all(not b.final for b in stream)
        # After the start's gap the stream knows no previous close until its first trade: quiet
        # minutes before it have no bar (gaps, not flat bars); from that minute on, every minute is
        # the backfill's bar, flat ones included.
        first_known = max(first_full, floor_min(next(iter(sim.trades(Instrument.parse(instrument), start_ns,
                                                                       end_ns))).ts_ns))  # fmt: skip
        unknown = [m for m in range(first_full, first_known, 60)]
        got = [b for b in stream if b.start >= first_full]
        assert values(got) == values(b for b in truth[instrument] if b.start >= first_known), instrument
        assert len(got) == (end_min - first_known) // 60 and any(b.trades == 0 for b in got)  # quiet minutes: flat
        assert all(b.trades == 0 for b in truth[instrument] if b.start < first_known)  # quiet in the backfill too
        print(f"{instrument}: {len(got)} minutes equal the backfill's; {len(unknown)} quiet minute(s) after the "
              f"start's gap have no bar (gaps)")
        assert not [b for b in bars if b.start >= end_min]  # never closed by the log's clock: no bar
        # The minute holding the start: only the trades after the start reached the stream.
        edge = floor_min(start_ns)
        partial = stream_bars(sim_trades(instrument, start_ns, (edge + 60) * NS_PER_S), edge, edge + 60, instrument)
        (edge_bar,) = [b for b in bars if b.start == edge] or [None]
        full = sim_bars(instrument, edge, edge + 60)
        if edge_bar is not None and edge_bar.final:  # the coordinator refilled it: the backfill's bar
            assert values([edge_bar]) == values(full) and edge_bar.source == sim.name
        else:  # still the stream's partial bar (or none: no trade after the start), and reported as a gap
            assert values([edge_bar] if edge_bar else []) == values(partial)
            assert gaps_seen[instrument] == ranges([edge, *unknown]), gaps_seen[instrument]
        if sim_trades(instrument, edge * NS_PER_S, start_ns):  # trades before the start: partial indeed
            assert values(partial) != values(full)
        # Nothing else in the range was ever a gap.
        assert gaps_seen[instrument] in (ranges(unknown), ranges([edge, *unknown])), gaps_seen[instrument]
        # The start is a recorded outage (its edge); the playback's end leaves one open.
        rows = outage_rows(engine, instrument)
        assert rows[0][0] == from_ns(start_ns) and rows[0][2] == "producer started"
        assert rows[-1][1] is None and rows[-1][2] == "producer stopped" and len(rows) == 2


# --- 1. a producer killed for 3 minutes ------------------------------------------------------------


def wait_for_clock(tail: TopicTail, ts_ns: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Until the log's clock (any instrument's trade or heartbeat) reaches `ts_ns`."""
    deadline = time.monotonic() + timeout
    while not any(not isinstance(r, Disconnect) and r.ts_ns >= ts_ns for r in tail.poll(0.1)):
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the log's clock never reached {from_ns(ts_ns)}"


def test_a_producer_killed_for_3_minutes_is_one_outage_no_invented_bar_then_refilled(
    kafka_bootstrap: str, engine: Engine, database_url: str, topic_prefix: str, tmp_path: Path
) -> None:  # fmt: skip
    """`python -m streaming.producer --speed 60 --start <a day back>` (the simulator) and
    `python -m streaming.aggregator` as processes; the producer is SIGKILLed, then restarted with
    `--start` 3 simulated minutes after the last record it got onto `ticks`, later stopped.

    Per instrument: exactly one `outages` row for the dead span, from the clock at the kill to the
    first record after the restart; no bar inside it (no invented flat bar); every bar outside it is
    aggregate_trades of the simulator's trades received (flat where the simulator is quiet), and
    equals the backfill's bar where the minute was live throughout; `OhlcvService.read` reports the
    minutes holding the span's edges (and the dead ones) as gaps; the coordinator, with the simulator
    as its REST source, refills the span with final bars and the gaps are gone."""
    ticks = topic(topic_prefix, TICKS)
    bus = KafkaBus(kafka_bootstrap)
    bus.ensure_topics([ticks], partitions=1)
    env = {**os.environ, "CANDLEKEEP_DATABASE_URL": database_url, "CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "CANDLEKEEP_TOPIC_PREFIX": topic_prefix, "CANDLEKEEP_INSTRUMENTS": ",".join(SIM_INSTRUMENTS),
           "CANDLEKEEP_SOURCE": "simulator", "CANDLEKEEP_SIMULATOR_SEED": "0"}  # fmt: skip
    env.pop("CANDLEKEEP_REDIS_URL", None)
    logs = {name: tmp_path / f"{name}.log" for name in ("aggregator", "producer")}

    def launch(module: str, *args: str) -> subprocess.Popen:
        name = module.rsplit(".", 1)[-1]
        with logs[name].open("ab") as out:
            return subprocess.Popen([sys.executable, "-m", module, "--port", "-1", *args], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip

    start_s = int(time.time()) // 60 * 60 - 86_400 + 17  # a day back (settled history), mid-minute
    speed = "60"  # a simulated minute per second; heartbeats at every minute boundary
    tail = TopicTail(kafka_bootstrap, ticks)
    began = time.monotonic()
    aggregator = launch("streaming.aggregator", "--flush-interval", "0.2")
    producer = launch("streaming.producer", "--speed", speed, "--start", str(start_s))
    try:
        wait_for_clock(tail, (start_s + 5 * 60 + 20) * NS_PER_S, producer, logs["producer"])
        producer.send_signal(signal.SIGKILL)
        producer.wait(10)
        time.sleep(1.0)
        tail.drain()
        killed_at = max(r.ts_ns for r in tail.records if not isinstance(r, Disconnect))  # the last record's time
        restart_s = -(-(killed_at + 180 * NS_PER_S) // NS_PER_S)  # 3 simulated minutes later (whole seconds)
        producer = launch("streaming.producer", "--speed", speed, "--start", str(restart_s))
        wait_for_clock(tail, (restart_s + 4 * 60 + 30) * NS_PER_S, producer, logs["producer"])
        producer.send_signal(signal.SIGTERM)
        assert producer.wait(30) == 0, logs["producer"].read_text()[-3000:]
        tail.drain()
        end = tail.high()
        eventually(lambda: committed(kafka_bootstrap, f"{topic_prefix}aggregator", ticks) == end, timeout=60,
                   what="the aggregator committed the whole log")  # fmt: skip
        aggregator.send_signal(signal.SIGTERM)
        assert aggregator.wait(30) == 0, logs["aggregator"].read_text()[-3000:]
    finally:
        for proc in (producer, aggregator):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        tail.close()
    streamed = time.monotonic() - began

    spans: dict[str, tuple[dict, dict]] = {}
    for instrument in SIM_INSTRUMENTS:
        log = Spans(tail.of(instrument))
        assert [(d.reason, d.ts_ns) for d in log.disconnects[:2]] == [
            ("producer started", start_s * NS_PER_S), ("producer started", restart_s * NS_PER_S)]
        assert [d.reason for d in log.disconnects[2:]] == ["producer stopped"]
        first, second = log.spans
        # What reached `ticks` is the simulator's trades, in order, up to the kill and from the restart.
        for span, since in ((first, start_s), (second, restart_s)):
            want = sim_trades(instrument, since * NS_PER_S, span["clock"] + 1)
            assert span["trades"] == want[:len(span["trades"])] and span["trades"], instrument
            assert len(span["trades"]) >= len([t for t in want if t.ts_ns < span["clock"]])
        assert second["first"] - first["clock"] >= 180 * NS_PER_S
        spans[instrument] = first, second

        # Exactly one outage for the dead span, exactly where the contract puts it; one at the first
        # start (nothing known before it) and one left open by the stop.
        assert outage_rows(engine, instrument) == [
            (from_ns(start_s * NS_PER_S), from_ns(first["first"]), "producer started"),
            (from_ns(first["clock"]), from_ns(second["first"]), "producer started"),
            (from_ns(second["clock"]), None, "producer stopped"),
        ]

        # The bars: exactly the received trades' aggregates; none in the dead span.
        expected = (live_span(first["trades"], first["first"], first["clock"], instrument, closes=True)
                    + live_span(second["trades"], second["first"], second["clock"], instrument, closes=False))
        bars = stored(engine, instrument)
        assert bars == expected, instrument
        dead = range(floor_min(first["clock"]) + 60, floor_min(second["first"]), 60)
        assert len(dead) >= 2 and not [b for b in bars if b.start in dead]
        # Minutes live throughout equal the backfill's bars (an independent second truth).
        for lo, hi in ((max(floor_min(start_s * NS_PER_S) + 60, floor_min(first["trades"][0].ts_ns)),
                        floor_min(first["clock"])),
                       (max(floor_min(second["first"]) + 60, floor_min(second["trades"][0].ts_ns)),
                        closed_until(second["clock"]))):  # fmt: skip
            assert values(b for b in bars if lo <= b.start < hi) == values(sim_bars(instrument, lo, hi))
            assert hi - lo >= 120

    # Serving: the minutes holding the dead span's edges, and those inside it, are gaps until refilled.
    window: dict[str, tuple[int, int, int, int]] = {}
    for instrument, (first, second) in spans.items():
        lo, hi = floor_min(start_s * NS_PER_S) + 60, closed_until(second["clock"])
        edges = set(range(floor_min(first["clock"]), ceil_min(second["first"]), 60))
        starts = {b.start for b in stored(engine, instrument)}
        unknown = {m for m in range(lo, hi, 60) if m not in starts} - edges  # quiet after a gap: no close known
        assert gaps_of(engine, instrument, lo, hi) == ranges(edges | unknown), instrument
        window[instrument] = lo, hi, min(edges), max(edges) + 60

    coordinator = Coordinator(bus, Simulator(0), InstrumentStore(engine), BarStore(engine), OutageStore(engine),
                              prefix=topic_prefix, poll_timeout_s=0.05, max_backoff_s=0.2)  # fmt: skip
    dynamic = DynamicConsumer(bus, BarStore(engine), InstrumentStore(engine), prefix=topic_prefix, refresh_s=0.2,
                              poll_timeout_s=0.05, max_backoff_s=0.2)  # fmt: skip
    refill_began = time.monotonic()
    with running(coordinator), running(dynamic):
        for instrument, (_, _, a, b) in window.items():
            eventually(lambda i=instrument, a=a, b=b: len(stored(engine, i, a, b)) == (b - a) // 60
                       and all(x.final for x in stored(engine, i, a, b)), timeout=60, what=f"{instrument} refilled")
    refilled = time.monotonic() - refill_began
    try:
        for instrument, (lo, hi, a, b) in window.items():
            got = stored(engine, instrument, a, b)
            assert values(got) == values(sim_bars(instrument, a, b)) and {x.source for x in got} == {"simulator"}
            starts = {x.start for x in stored(engine, instrument)}
            still = [m for m in range(lo, hi, 60) if m not in starts]  # not in any outage: an API read fetches them
            assert gaps_of(engine, instrument, lo, hi) == ranges(still), instrument
            print(f"\n{instrument}: dead span {from_ns(spans[instrument][0]['clock'])} .. "
                  f"{from_ns(spans[instrument][1]['first'])}, refill window {(b - a) // 60} minutes, "
                  f"{len(still)} quiet minute(s) after it without a bar")
    finally:
        bus.close()
    print(f"producer kill: streamed in {streamed:.1f} s, refilled in {refilled:.1f} s")


# --- 2. a streamer disconnect ----------------------------------------------------------------------


class SimClock:
    """Unix ns running `speed` times faster than the wall from `base_ns`: the streamer's receive
    clock and the test server's trade times (one clock, as a venue and its client share UTC)."""

    def __init__(self, base_ns: int, speed: float) -> None:
        self.base_ns, self.speed, self.mark = base_ns, speed, time.monotonic()

    def __call__(self) -> int:
        return self.base_ns + int((time.monotonic() - self.mark) * self.speed * NS_PER_S)


def test_a_streamer_disconnect_is_one_outage_no_invented_bar_and_exact_bars_around_it(
    kafka_bootstrap: str, engine: Engine, topic_prefix: str
) -> None:  # fmt: skip
    """The CryptoCompare streamer against the loopback server, through the producer daemon into
    `ticks` (real Kafka), the aggregator consuming. The server drops the connection; the client
    stays away 2.5 s (its backoff) and reconnects; trades flow again. The receive clock runs 60 times
    faster than the wall (2024-03-01 from 12:00:05), so the 2.5 s away are 150 simulated seconds:
    whatever the alignment, at least one whole minute lies inside the gap.

    Per instrument: one `outages` row for the dead span (from the clock at the drop to the first
    record after the reconnect, inside what the server did: after its last trade before the drop,
    before its first trade after), no bar inside it, and every other bar exactly aggregate_trades of
    the trade frames the server sent (flat while the feed is live and quiet); `gaps` lists the
    edges' minutes and the dead ones."""
    speed = 60.0
    clock = SimClock(int(datetime(2024, 3, 1, 12, 0, 5, tzinfo=UTC).timestamp()) * NS_PER_S, speed)
    markets = {"coinbase:BTC-USD": ("Coinbase", "BTC", "USD", Decimal("61000.00")),
               "binance:ETH-USDT": ("Binance", "ETH", "USDT", Decimal("3400.10"))}  # fmt: skip
    rng = random.Random(5)
    sent: dict[str, list[list[Trade]]] = {i: [[], []] for i in markets}
    prices = {i: m[3] for i, m in markets.items()}
    next_id = dict.fromkeys(markets, 1000)
    dropped_at: list[int] = []
    done = threading.Event()

    def trades_for(s: StreamerSession, session: int, seconds: float) -> None:
        """A trade of each market every 0.1 s (6 simulated s), times from the clock, to the microsecond."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            for instrument, (market, fsym, tsym, _) in markets.items():
                now = clock() // 1000 * 1000
                prices[instrument] += Decimal(rng.randint(-40, 40)) / 100
                size = Decimal(rng.randint(1, 50_000)) / 10_000
                next_id[instrument] += 1
                p, q, tid = str(prices[instrument]), str(size), next_id[instrument]
                s.trade(trade_frame(market=market, fsym=fsym, tsym=tsym, flags=rng.choice([1, 2]), trade_id=tid,
                                    ts=now // NS_PER_S, tsns=now % NS_PER_S, q=q, p=p))  # fmt: skip
                sent[instrument][session].append(Trade(instrument, now, Decimal(p), size, "buy", str(tid), "cc"))
            time.sleep(0.1)

    def subscribed(s: StreamerSession) -> None:
        s.welcome()
        for sub in s.expect("SubAdd")["subs"]:
            s.subscribe_complete(sub)
        s.load_complete()

    def first(s: StreamerSession) -> None:
        subscribed(s)
        trades_for(s, 0, 3.0)
        dropped_at.append(clock())
        s.drop()

    def second(s: StreamerSession) -> None:
        subscribed(s)
        trades_for(s, 1, 3.0)
        done.set()  # then silent: the client's heartbeats say the feed is live (and quiet)

    bus = KafkaBus(kafka_bootstrap)
    ticks = topic(topic_prefix, TICKS)
    bus.ensure_topics([ticks], partitions=1)
    aggregator = Aggregator(bus, BarStore(engine), TickStore(engine), None, prefix=topic_prefix,
                            flush_interval_s=0.05, poll_timeout_s=0.05)  # fmt: skip
    tail = TopicTail(kafka_bootstrap, ticks)
    began = time.monotonic()
    try:
        with running(aggregator), StreamerServer([first, second]) as server:
            client = StreamerClient(instruments=list(markets), url=server.url, min_backoff=2.5, max_backoff=2.5,
                                    recv_timeout=0.02, heartbeat_s=0.2, latency_bound_s=3.0,
                                    clock_ns=clock)  # fmt: skip
            producer = Producer(bus, client, topic_prefix=topic_prefix)
            thread = threading.Thread(target=producer.run, daemon=True)
            thread.start()
            try:
                assert done.wait(30), producer.health()
                time.sleep(2.5)  # 150 simulated s of a live, quiet feed: a whole minute closes flat
            finally:
                producer.stop()
                thread.join(30)
            assert not thread.is_alive() and producer.health()["buffered"] == 0
            tail.drain()
            end = tail.high()
            eventually(lambda: aggregator.committed.get((ticks, 0)) == end and not aggregator.health()["pending_bars"],
                       timeout=30, what="the aggregator committed the whole log")  # fmt: skip
        assert len(server.sessions) == 2
        gap_s = server.sessions[1].connected_at - server.sessions[0].closed_at
    finally:
        tail.close()
        bus.close()
    print(f"\nstreamer disconnect: {time.monotonic() - began:.1f} s; away {gap_s:.2f} s")

    for instrument in markets:
        log = Spans(tail.of(instrument))
        reasons = [d.reason for d in log.disconnects]
        assert reasons[0] == "producer started" and reasons[-1] == "producer stopped" and len(reasons) == 3
        assert reasons[1].startswith("connection lost") or reasons[1] == "closed by server", reasons
        first_span, second_span = log.spans
        # The log holds exactly the frames the server sent, each once, in order.
        for span, truth in zip((first_span, second_span), sent[instrument], strict=True):
            assert [(t.trade_id, t.ts_ns, t.price, t.size) for t in span["trades"]] == [
                (t.trade_id, t.ts_ns, t.price, t.size) for t in truth]
        gap_from, gap_to = first_span["clock"], second_span["first"]
        # The gap lies within what the server did: after its last trade before the drop, before its
        # first after the reconnect; at least the 2.5 s away (150 simulated s) less the latency bound.
        assert sent[instrument][0][-1].ts_ns <= gap_from <= dropped_at[0]
        assert gap_to <= sent[instrument][1][0].ts_ns and gap_to - gap_from >= 147 * NS_PER_S
        assert outage_rows(engine, instrument) == [
            # Nothing before the start: the gap opens at the disconnect's own time; the first heartbeat
            # (receive clock - latency bound) may be older than that: the gap then ends where it begins.
            (from_ns(log.disconnects[0].ts_ns), from_ns(max(first_span["first"], log.disconnects[0].ts_ns)),
             "producer started"),
            (from_ns(gap_from), from_ns(gap_to), reasons[1]),
            (from_ns(second_span["clock"]), None, "producer stopped"),
        ]
        expected = (live_span(sent[instrument][0], first_span["first"], gap_from, instrument, closes=True)
                    + live_span(sent[instrument][1], gap_to, second_span["clock"], instrument, closes=False))
        bars = stored(engine, instrument)
        assert [replace(b, source="x") for b in bars] == [replace(b, source="x") for b in expected], instrument
        assert {b.source for b in bars} == {"stream"} and any(b.trades == 0 for b in bars)  # flat while live
        dead = range(floor_min(gap_from) + 60, floor_min(gap_to), 60)
        assert len(dead) >= 1 and not [b for b in bars if b.start in dead]
        lo, hi = floor_min(first_span["first"]) + 60, closed_until(second_span["clock"])
        edges = set(range(floor_min(gap_from), ceil_min(gap_to), 60))
        starts = {b.start for b in bars}
        unknown = {m for m in range(lo, hi, 60) if m not in starts} - edges
        assert gaps_of(engine, instrument, lo, hi) == ranges(edges | unknown) and not unknown, instrument
