"""A newly tracked instrument: its fetched history and its first live minutes meet with no gap.

The real daemons in real time on the in-process bus (the simulator's producer, the aggregator, the
coordinator with the simulator as its REST source, the dynamic consumer): a `track` of a new
instrument fetches its history up to the minute of the command, and the live feed joins after it.
The minutes between them hold the producer's disconnect (nothing was known before the track) and
the first record after it: a gap, reported, until the coordinator refills them from the source. Then the read across the seam has
no gap, and the open hour is neither final nor complete. The truth is the simulator's own bars.
"""

from __future__ import annotations

import threading
import time
import uuid

from sqlalchemy import Engine

from candlekeep.bars import Interval
from candlekeep.bus import InProcessBus
from candlekeep.instruments import Instrument
from candlekeep.messages import CONTROL, ControlCommand, encode_control, topic
from candlekeep.query import build_query
from candlekeep.serving import CLOSING_S, OhlcvService
from candlekeep.sources.simulator import Simulator
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.storage.outages import OutageStore
from candlekeep.storage.ticks import TickStore
from streaming.aggregator import Aggregator
from streaming.coordinator import Coordinator
from streaming.dynamic import DynamicConsumer
from streaming.producer import Producer, SimulatorPlayback
from tests.utils.wait import eventually

NEW = "coinbase:BTC-USD"  # busy enough that every live minute has a trade


def test_a_new_instrument_s_history_and_live_minutes_meet_without_a_hole(engine: Engine) -> None:
    bus = InProcessBus()
    stores = BarStore(engine), InstrumentStore(engine), OutageStore(engine)
    playback = SimulatorPlayback(instruments=[], speed=1)
    producer = Producer(bus, playback)
    daemons = [
        Aggregator(bus, stores[0], TickStore(engine), flush_interval_s=0.2),
        Coordinator(bus, Simulator(0), stores[1], stores[0], stores[2], history_s=3600, settle_s=0,
                    refill_interval_s=0.5, scan_interval_s=0.5),
        DynamicConsumer(bus, stores[0], stores[1], refresh_s=0.2),
    ]  # fmt: skip
    stop = threading.Event()
    threads = [threading.Thread(target=producer.run, daemon=True)]
    threads += [threading.Thread(target=d.run, args=(stop,), daemon=True) for d in daemons]
    for thread in threads:
        thread.start()
    try:
        # Track it a few seconds into a minute: that minute is the seam.
        while time.time() % 60 > 40 or time.time() % 60 < 3:
            time.sleep(0.2)
        control = topic("", CONTROL)
        bus.ensure_topics([control])
        out = bus.producer(name="test-track")
        out.publish(control, NEW, encode_control(ControlCommand("track", NEW, uuid.uuid4().hex)))
        assert out.flush(10) == 0
        tracked_at = time.time()
        seam = Interval.M1.floor(int(tracked_at))
        service = OhlcvService(bar_store=stores[0], cache=None, outages=stores[2])
        query = build_query(instrument=NEW, interval="1m", start=str(seam - 600), end=str(seam + 180))
        # The live feed joins at the next minute; once the minute after it has closed, the read is whole.
        eventually(lambda: time.time() >= seam + 180 + CLOSING_S and not service.read(query).gaps,
                   timeout=240, what="history and live minutes meet")  # fmt: skip
        answer = service.read(query)
    finally:
        producer.stop()
        stop.set()
        for thread in threads:
            thread.join(30)
        bus.close()
    assert answer.complete and [b.start for b in answer.bars] == list(range(seam - 600, seam + 180, 60))
    truth = {b.start: b for page in Simulator(0).bars(Instrument.parse(NEW), Interval.M1, seam - 600, seam + 180)
             for b in page}  # fmt: skip
    for bar in answer.bars:
        expected = truth[bar.start]
        assert (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.trades) == (
            expected.open, expected.high, expected.low, expected.close, expected.volume, expected.trades), bar.start
    history = [b for b in answer.bars if b.start < seam]
    assert all(b.final and b.source == "simulator" for b in history)
    # The seam minute and the one holding the gap's end came back from the source (refilled); the
    # first whole live minute is the stream's.
    assert [(b.final, b.source) for b in answer.bars if b.start in (seam, seam + 60)] == [(True, "simulator")] * 2
    (live_bar,) = [b for b in answer.bars if b.start == seam + 120]
    assert live_bar.source == "stream" and not live_bar.final
    # The hour holding the live minute is provisional: never "final" over minutes the stream still
    # owns. (Not the seam's hour: a seam in an hour's last two minutes leaves that hour all refilled.)
    live_hour = Interval.H1.floor(live_bar.start)
    hour = build_query(instrument=NEW, interval="1h", start=str(live_hour), end=str(live_hour + 3600))
    (hour_bar,) = OhlcvService(bar_store=stores[0], cache=None, outages=stores[2]).read(hour).bars
    assert not hour_bar.final
