"""The producer daemon on a real bus (in-process and a real Kafka broker): the simulator's trades played
back arrive in `ticks` exactly (no loss, no duplicate, per-instrument order), also across a broker
outage; control track/untrack; the CryptoCompare streamer (a loopback WebSocket server) through the
daemon, its gaps marked by disconnects on `ticks` and bad frames dead-lettered. Besides trades,
`ticks` carries heartbeats (the simulator's on its own clock) and disconnects (at start, for a newly
tracked instrument, for a lost connection or refused subscription, and at stop).

The truth is always independent of the producer: `Simulator.trades` for the played range, or the
frames the test server sent.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from datetime import UTC, datetime

import pytest

from candlekeep.bars import NS_PER_S, Disconnect, Heartbeat, TickRecord, Trade
from candlekeep.instruments import Instrument
from candlekeep.messages import CONTROL, DEADLETTER, TICKS, ControlCommand, decode_tick_record, encode_control, topic
from candlekeep.sources.cryptocompare_stream import StreamerClient, trade_sub
from candlekeep.sources.simulator import Simulator
from candlekeep.bus import Bus, InProcessBus, KafkaBus, Record
from streaming.health import HealthServer
from streaming.producer import Producer, SimulatorPlayback
from tests.utils.kafka import KafkaBroker
from tests.utils.ws_server import StreamerServer, StreamerSession, trade_frame

MINUTE = 60 * NS_PER_S
START = int(datetime(2024, 3, 1, 12, 0, tzinfo=UTC).timestamp()) * NS_PER_S
INSTRUMENTS = ["cccagg:BTC-USD", "coinbase:ETH-USD", "binance:SOL-USDT"]


def expected(instruments: list[str], start_ns: int, end_ns: int, seed: int = 0) -> dict[str, list[Trade]]:
    sim = Simulator(seed)
    return {i: list(sim.trades(Instrument.parse(i), start_ns, end_ns)) for i in instruments}


def consume(bus: Bus, name: str, *, count: int, timeout: float = 30.0, settle: float = 0.5) -> list[Record]:
    """Every record of topic `name` (a fresh group), once `count` arrived and nothing more for `settle` s."""
    consumer = bus.consumer(group=f"test-{uuid.uuid4().hex[:8]}", topics=[name])
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    quiet_since = None
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll_batch(max_records=5000, timeout=0.2)
            records += batch
            if len(records) >= count:
                quiet_since = quiet_since or time.monotonic()
                if batch:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= settle:
                    break
    finally:
        consumer.close()
    return records


def log_by_instrument(records: list[Record]) -> dict[str, list[TickRecord]]:
    """Every `ticks` record (trades, heartbeats, disconnects) per instrument, in log order."""
    out: dict[str, list[TickRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        item = decode_tick_record(record.value)
        assert record.key == item.instrument
        out[item.instrument].append(item)
    return dict(out)


def ticks_by_instrument(records: list[Record]) -> dict[str, list[Trade]]:
    """The trades alone, per instrument, in log order."""
    return {i: [t for t in log if isinstance(t, Trade)] for i, log in log_by_instrument(records).items()}


def n_trades(records: list[Record]) -> int:
    return sum(map(len, ticks_by_instrument(records).values()))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.waits = 0

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        self.waits += 1
        self.now += seconds


# --- simulator playback (no bus) ------------------------------------------------------------------


def test_playback_emits_each_trade_when_sim_time_reaches_it() -> None:
    clock = FakeClock()
    playback = SimulatorPlayback(instruments=INSTRUMENTS[:2], start_ns=START + 30 * NS_PER_S, end_ns=START + 3 * MINUTE,
                                 speed=10, clock=clock, wait=clock.wait)  # fmt: skip
    emitted = []
    for event in playback.events():
        if isinstance(event, Trade):
            emitted.append((clock.now, event))
    want = expected(INSTRUMENTS[:2], START + 30 * NS_PER_S, START + 3 * MINUTE)
    got = defaultdict(list)
    for _, trade in emitted:
        got[trade.instrument].append(trade)
    assert dict(got) == want
    assert [t.ts_ns for _, t in emitted] == sorted(t.ts_ns for _, t in emitted)  # one timeline, merged
    for at, trade in emitted:  # on time: wall = wall0 + (ts - start) / speed, to the nanosecond of sim time
        due = 1000.0 + (trade.ts_ns - playback.start_ns) / NS_PER_S / 10
        assert due - 1e-6 <= at <= due + 1e-6
    assert clock.now == pytest.approx(1000.0 + 150 / 10)  # 2.5 sim minutes at x10


def test_playback_tracks_and_untracks_while_playing() -> None:
    clock = FakeClock()
    btc, eth = INSTRUMENTS[0], INSTRUMENTS[1]
    playback = SimulatorPlayback(instruments=[btc], start_ns=START, end_ns=START + 4 * MINUTE, speed=60,
                                 clock=clock, wait=clock.wait)  # fmt: skip
    got = defaultdict(list)
    subscribed = False
    for event in playback.events():
        if not isinstance(event, Trade):
            continue
        got[event.instrument].append(event)
        sim_now = playback.sim_now_ns()
        if not subscribed and sim_now >= START + 30 * NS_PER_S:
            playback.subscribe([eth])  # at sim 00:30: ETH joins at the next minute boundary, 01:00
            subscribed = True
        if event.instrument == eth and sim_now >= START + 150 * NS_PER_S:
            playback.unsubscribe([eth])  # stops at once
    want = expected([btc, eth], START, START + 4 * MINUTE)
    assert got[btc] == want[btc]
    eth_from_1m = [t for t in want[eth] if t.ts_ns >= START + MINUTE]
    assert got[eth] == eth_from_1m[: len(got[eth])] and len(got[eth]) > 10
    # The unsubscribe, on the first ETH trade at or after sim 02:30, took effect at once.
    assert got[eth][-1] == next(t for t in want[eth] if t.ts_ns >= START + 150 * NS_PER_S)


def test_playback_starts_now_by_default_and_stops_on_close() -> None:
    clock = FakeClock()
    now_ns = 1_709_294_400_123_456_789
    playback = SimulatorPlayback(instruments=INSTRUMENTS[:1], speed=1, clock=clock, wait=clock.wait,
                                 wall_ns=lambda: now_ns)  # fmt: skip
    assert playback.start_ns == now_ns
    first = None
    for event in playback.events():
        if isinstance(event, Trade):
            first = event
            playback.close()
    assert first == next(Simulator(0).trades(Instrument.parse(INSTRUMENTS[0]), now_ns, now_ns + MINUTE))
    with pytest.raises(ValueError):
        SimulatorPlayback(instruments=[], speed=0)


# --- the daemon on a real bus ---------------------------------------------------------------------


def run_in_thread(producer: Producer) -> threading.Thread:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            producer.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            errors.append(exc)
            raise

    thread = threading.Thread(target=target, name="producer-under-test", daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_playback_end_to_end_exact(bus: Bus, topic_prefix: str) -> None:
    start, end = START, START + 3 * MINUTE
    playback = SimulatorPlayback(instruments=INSTRUMENTS, start_ns=start, end_ns=end, speed=900)
    producer = Producer(bus, playback, topic_prefix=topic_prefix, ticks_partitions=3)
    began = time.monotonic()
    producer.run()  # returns once the bounded playback is done and every tick is delivered
    assert time.monotonic() - began >= 180 / 900  # paced by sim time, not as fast as possible

    want = expected(INSTRUMENTS, start, end)
    total = sum(map(len, want.values()))
    records = consume(bus, topic(topic_prefix, TICKS), count=total)
    assert n_trades(records) == total  # no loss, no duplicate
    assert ticks_by_instrument(records) == want  # exact trades, per-instrument order
    for instrument, log in log_by_instrument(records).items():
        # A disconnect opens the log (nothing known before the start) and one closes it.
        assert isinstance(log[0], Disconnect) and log[0].reason == "producer started" and log[0].ts_ns == start
        assert isinstance(log[-1], Disconnect) and log[-1].reason == "producer stopped"
        beats = [r for r in log[1:-1] if isinstance(r, Heartbeat)]
        assert not any(isinstance(r, Disconnect) for r in log[1:-1])
        # Heartbeats on the simulator's clock: every minute boundary is passed, on time, in order.
        times = [r.ts_ns for r in log[1:-1]]
        assert times == sorted(times) and {start + MINUTE, start + 2 * MINUTE, end} <= {b.ts_ns for b in beats}
        # A heartbeat only after a beat step without a trade of that instrument.
        for prev, beat in zip(log, log[1:], strict=False):
            if isinstance(beat, Heartbeat):
                assert not isinstance(prev, Trade) or prev.ts_ns < beat.ts_ns, instrument
    health = producer.health()
    assert (health["state"], health["delivered"], health["buffered"]) == ("idle", len(records), 0)
    assert health["delivery_failures"] == 0
    assert health["ticks"] == total and health["backpressure"] is False and health["healthy"] is True
    transitions = producer.registry.get_sample_value(
        "candlekeep_producer_state_transitions_total", {"from_state": "subscribing", "to_state": "streaming"})
    assert transitions == 1


def test_control_track_and_untrack(bus: Bus, topic_prefix: str) -> None:
    btc, eth = INSTRUMENTS[0], INSTRUMENTS[1]
    control = topic(topic_prefix, CONTROL)
    ticks = topic(topic_prefix, TICKS)
    bus.ensure_topics([control])
    out = bus.producer(name="test-control")
    out.publish(control, eth, encode_control(ControlCommand("track", eth, "r1")))
    out.publish(control, "*", b'{"v":1,"op":"explode"}')  # a bad command is dead-lettered, never fatal
    assert out.flush(10) == 0

    playback = SimulatorPlayback(instruments=[btc], start_ns=START, speed=120)
    producer = Producer(bus, playback, topic_prefix=topic_prefix)
    thread = run_in_thread(producer)
    try:
        seen: dict[str, list[Trade]] = defaultdict(list)
        gone: dict[str, list[Disconnect]] = defaultdict(list)
        watcher = bus.consumer(group=f"{topic_prefix}watch", topics=[ticks])

        def drain(seconds: float) -> None:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                for r in watcher.poll_batch(max_records=1000, timeout=0.1):
                    item = decode_tick_record(r.value)
                    if isinstance(item, Trade):
                        seen[r.key].append(item)
                    elif isinstance(item, Disconnect):
                        gone[r.key].append(item)

        deadline = time.monotonic() + 30
        while len(seen[eth]) < 20:  # replayed from `control` at start: ETH joins at a minute boundary
            assert time.monotonic() < deadline, f"no ETH ticks; health {producer.health()}"
            drain(0.2)
        out.publish(control, eth, encode_control(ControlCommand("untrack", eth, "r2")))
        out.flush(10)
        eth_count = -1
        deadline = time.monotonic() + 30
        while eth_count != len(seen[eth]):  # untracked: ETH stops once what was in flight has arrived
            assert time.monotonic() < deadline, "ETH ticks keep coming after untrack"
            eth_count = len(seen[eth])
            drain(1.5)
        btc_count = len(seen[btc])
        drain(1.0)
        watcher.close()
    finally:
        producer.stop()
        thread.join(30)
    assert not thread.errors  # type: ignore[attr-defined]
    assert len(seen[eth]) == eth_count  # untracked: no more ETH
    assert len(seen[btc]) > btc_count  # while BTC goes on
    first, last = seen[eth][0].ts_ns, seen[eth][-1].ts_ns
    assert first > START  # ETH was not played from the start
    joined = first - first % MINUTE  # ETH is the simulator's trades from a minute boundary on, none missing
    want_eth = list(Simulator(0).trades(Instrument.parse(eth), joined, last + 1))
    assert seen[eth] == want_eth[: len(seen[eth])]  # (the untrack may fall between fills of one order)
    assert seen[btc] == list(Simulator(0).trades(Instrument.parse(btc), START, seen[btc][-1].ts_ns + 1))
    # BTC's log opens with the producer's start; ETH's with its track (nothing known before it).
    assert gone[btc][0].reason == "producer started"
    assert gone[eth][0].reason.startswith("tracked") and gone[eth][0].ts_ns <= first
    dead = consume(bus, topic(topic_prefix, DEADLETTER), count=1)
    assert len(dead) == 1 and b"explode" in dead[0].value and dead[0].key == "*"
    assert producer.health()["state"] == "idle"


def test_every_producer_sees_every_control_command(topic_prefix: str) -> None:
    """Each producer reads `control` in a group of its own (prefixed, never shared): two producers
    both replay the track sent before they started and both follow the one sent while they run.
    (In one shared group only one of them would hold the single `control` partition.)"""
    btc, eth, sol = INSTRUMENTS
    control = topic(topic_prefix, CONTROL)
    bus = InProcessBus()
    bus.ensure_topics([control])
    out = bus.producer(name="test-control")
    out.publish(control, eth, encode_control(ControlCommand("track", eth, "r1")))
    assert out.flush(10) == 0
    playbacks = [SimulatorPlayback(instruments=[btc], start_ns=START, speed=60) for _ in range(2)]
    producers = [Producer(bus, p, topic_prefix=topic_prefix) for p in playbacks]
    groups = {p.control_group for p in producers}
    assert len(groups) == 2 and all(g.startswith(f"{topic_prefix}producer-") for g in groups)
    threads = [run_in_thread(p) for p in producers]
    try:

        def wait_tracked(instrument: str) -> None:
            deadline = time.monotonic() + 30
            while not all(instrument in p.instruments for p in playbacks):
                assert time.monotonic() < deadline, f"{instrument}: {[p.instruments for p in playbacks]}"
                time.sleep(0.05)

        wait_tracked(eth)  # replayed from `control` at start, by both
        out.publish(control, sol, encode_control(ControlCommand("track", sol, "r2")))
        assert out.flush(10) == 0
        wait_tracked(sol)  # live, by both
    finally:
        for producer in producers:
            producer.stop()
        for thread in threads:
            thread.join(30)
        bus.close()
    assert not any(t.errors for t in threads)  # type: ignore[attr-defined]
    assert all(not t.is_alive() for t in threads)


def test_broker_outage_buffers_with_backpressure_then_delivers_exactly_once(
    kafka_broker: KafkaBroker, topic_prefix: str
) -> None:
    bus = KafkaBus(kafka_broker.bootstrap, producer_config={"reconnect.backoff.max.ms": 500})
    start, end = START, START + 6 * MINUTE
    playback = SimulatorPlayback(instruments=INSTRUMENTS, start_ns=start, end_ns=end, speed=90)
    producer = Producer(bus, playback, topic_prefix=topic_prefix, max_buffered=40, local_bound=60, handoff=20)
    thread = run_in_thread(producer)
    stopped = False
    try:
        deadline = time.monotonic() + 30
        while producer.health()["delivered"] < 50:
            assert time.monotonic() < deadline and thread.is_alive(), producer.health()
            time.sleep(0.05)
        kafka_broker.stop()
        stopped = True
        deadline = time.monotonic() + 30
        while not (producer.backpressure and producer.health()["local_queue"] >= 60 and producer.source_blocked > 0):
            assert time.monotonic() < deadline and thread.is_alive(), producer.health()
            time.sleep(0.05)
        during = producer.health()
        sim_lag = playback.sim_now_ns()
        assert during["backpressure"] is True and during["buffered"] >= 100  # 40 in the bus + 60 held locally
        assert producer.registry.get_sample_value("candlekeep_producer_backpressure") == 1
        assert producer.registry.get_sample_value("candlekeep_producer_buffered") >= 100
        time.sleep(1.0)
        assert producer.health()["ticks"] <= during["ticks"] + 20  # the source is not read on meanwhile
    finally:
        if stopped:
            kafka_broker.restart()
    thread.join(120)
    assert not thread.is_alive() and not thread.errors  # type: ignore[attr-defined]
    assert sim_lag > start

    want = expected(INSTRUMENTS, start, end)
    total = sum(map(len, want.values()))
    records = consume(bus, topic(topic_prefix, TICKS), count=total, timeout=60)
    assert n_trades(records) == total  # every tick exactly once: nothing dropped, nothing duplicated
    assert ticks_by_instrument(records) == want
    health = producer.health()
    assert (health["delivered"], health["buffered"], health["backpressure"]) == (len(records), 0, False)
    bus.close()


def test_cryptocompare_stream_through_the_producer(bus: Bus, topic_prefix: str) -> None:
    btc, eth, bad = "coinbase:BTC-USD", "binance:ETH-USDT", "coinbase:NOPE-USD"
    frames = [
        trade_frame(market="Coinbase", fsym="BTC", tsym="USD", flags=1, trade_id=852793745, ts=1753190418,
                    tsns=654000000, q="0.34637342", p="119283.1", rts=1753190418, rtsns=708000000, ccseq=852777369),
        trade_frame(market="Binance", fsym="ETH", tsym="USDT", flags=2, trade_id=77, ts=1753190419, q="1.25",
                    p="3600.5"),
    ]  # fmt: skip
    after = trade_frame(market="Coinbase", fsym="BTC", tsym="USD", flags=4, trade_id=852793900, ts=1753190500,
                        q="0.5", p="119290")  # fmt: skip
    done = threading.Event()

    def first(s: StreamerSession) -> None:
        s.welcome()
        s.expect("SubAdd")
        for frame in frames:
            s.trade(frame)
        s.invalid_sub(trade_sub(bad))
        s.send("{garbage")
        s.load_complete()
        s.heartbeat()
        time.sleep(0.2)
        s.drop()

    def second(s: StreamerSession) -> None:
        s.welcome()
        s.expect("SubAdd")
        s.load_complete()
        s.trade(after)
        done.set()

    with StreamerServer([first, second]) as server:
        client = StreamerClient(instruments=[btc, eth, bad], url=server.url, min_backoff=0.2, max_backoff=0.3,
                                recv_timeout=0.05)  # fmt: skip
        producer = Producer(bus, client, topic_prefix=topic_prefix)
        thread = run_in_thread(producer)
        try:
            assert done.wait(15), producer.health()
            deadline = time.monotonic() + 15
            while (producer.registry.get_sample_value("candlekeep_producer_disconnects_total") < 6
                   or producer.health()["state"] != "streaming" or producer.health()["delivered"] < 4):
                assert time.monotonic() < deadline, producer.health()
                time.sleep(0.05)
            health = producer.health()
            server = HealthServer(producer.registry, producer.health).start()
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
                    served = json.load(response)
                with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
                    metrics = response.read().decode()
            finally:
                server.stop()
        finally:
            producer.stop()
            thread.join(15)
    assert not thread.errors  # type: ignore[attr-defined]

    records = consume(bus, topic(topic_prefix, TICKS), count=3)
    log = [decode_tick_record(r.value) for r in sorted(records, key=lambda r: (r.partition, r.offset))]
    got = [t for t in log if isinstance(t, Trade)]
    assert [(t.instrument, t.trade_id, str(t.price), str(t.size), t.side) for t in got] == [
        (btc, "852793745", "119283.1", "0.34637342", "sell"),
        (eth, "77", "3600.5", "1.25", "buy"),
        (btc, "852793900", "119290", "0.5", "unknown"),
    ]
    assert got[0].ts_ns == 1753190418_654000000 and got[0].received_ns == 1753190418_708000000
    (dead,) = consume(bus, topic(topic_prefix, DEADLETTER), count=1)
    assert b"not JSON" in dead.value and dead.key == "cryptocompare"
    assert health["state"] == "streaming" and health["failed_instruments"].keys() == {bad}
    assert served["state"] == "streaming" and served["healthy"] is True and served["delivered"] >= 4
    assert 'candlekeep_producer_state{candlekeep_producer_state="streaming"} 1.0' in metrics
    assert "candlekeep_producer_failed_subscriptions 1.0" in metrics
    assert "candlekeep_producer_deadletters_total 1.0" in metrics and "candlekeep_producer_heartbeats_total" in metrics

    # The gaps, as disconnects in each instrument's log: the start, the refused subscription, the
    # dropped connection (for the live instruments only), the stop.
    reasons = defaultdict(list)
    for item in log:
        if isinstance(item, Disconnect):
            reasons[item.instrument].append(item.reason)
    assert [r for r in reasons[bad] if r != "producer stopped"][:2] == ["producer started", reasons[bad][1]]
    assert reasons[bad][1].startswith("subscription failed")
    for instrument in (btc, eth):
        assert reasons[instrument][0] == "producer started" and reasons[instrument][-1] == "producer stopped"
        (lost,) = reasons[instrument][1:-1]
        assert lost.startswith("connection lost") or lost == "closed by server"
    # The trade after the reconnect follows the disconnect of BTC's lost connection.
    btc_log = [i for i in log if i.instrument == btc]
    lost_at = next(k for k, i in enumerate(btc_log) if isinstance(i, Disconnect) and i.reason not in
                   ("producer started", "producer stopped"))  # fmt: skip
    assert btc_log.index(got[2]) > lost_at


def test_the_simulator_publishes_its_books_which_bracket_its_trades() -> None:
    """Offline, the simulator's L2 books go to `books` beside its trades: a snapshot first, then one
    delta a second chained by sequence; each second's best bid and ask bracket the simulator's own
    trades of that second (the independent truth: Simulator.trades)."""
    from candlekeep.books import BookDelta, BookSnapshot
    from candlekeep.messages import BOOKS, decode_book

    clock = FakeClock()
    btc = INSTRUMENTS[0]
    start, end = START, START + 2 * MINUTE
    playback = SimulatorPlayback(instruments=[btc], start_ns=start, end_ns=end, speed=1, clock=clock, wait=clock.wait,
                                 book_depth=10)  # fmt: skip
    bus = InProcessBus()
    Producer(bus, playback).run()
    records = consume(bus, topic("", BOOKS), count=120)
    updates = [decode_book(r.value) for r in records]
    assert len(updates) == 120 and isinstance(updates[0], BookSnapshot)
    assert all(isinstance(u, BookDelta) == (u.ts_ns % MINUTE != 0) for u in updates)  # a snapshot a minute
    for prev, cur in zip(updates, updates[1:], strict=False):
        assert cur.sequence == prev.sequence + 1 and (cur.prev_sequence is None or cur.prev_sequence == prev.sequence)
    book: dict[str, dict] = {"bids": {}, "asks": {}}
    trades = defaultdict(list)
    for t in expected([btc], start, end)[btc]:
        trades[t.ts_ns // NS_PER_S].append(t.price)
    checked = 0
    for u in updates:
        for side in ("bids", "asks"):
            if isinstance(u, BookSnapshot):
                book[side] = {}
            for price, size in getattr(u, side):
                if size == 0:
                    book[side].pop(price, None)
                else:
                    book[side][price] = size
        best_bid, best_ask = max(book["bids"]), min(book["asks"])
        assert best_bid < best_ask
        for price in trades.get(u.ts_ns // NS_PER_S, []):
            assert best_bid <= price <= best_ask
            checked += 1
    assert checked > 10
    bus.close()
