"""Helpers for replay tests: real trades stored through the normal TickStore path, an independent
expectation of the replay stream built from the CSV rows, and a reader of a session's topic."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from decimal import Decimal

from sqlalchemy import Engine

from candlekeep.bars import NS_PER_S, Bar, Disconnect, Heartbeat, Trade
from candlekeep.bus import Bus, Record
from candlekeep.messages import decode_bar, decode_tick_record, replay_topic
from candlekeep.storage.ticks import TickStore
from streaming.replayer import Replayer
from tests.utils.trades import load_freqtrade, load_tardis

BTC = "binance_futures:BTC-USDT"
ETH = "binance:ETH-USDT"
LATENESS_NS = 2 * NS_PER_S
ETH_SHIFT_NS = 1_582_329_700 * NS_PER_S - 1_675_329_600 * NS_PER_S  # ETH's real trades moved to BTC's day


def stored_trades(engine: Engine) -> dict[str, list[Trade]]:
    """The two real recordings stored through TickStore (ETH's times shifted by a constant into the
    BTC recording's span, so the two overlap and must be merged); what each instrument holds, as
    the CSV says, truncated to the microsecond like the store does."""
    btc = load_tardis(BTC)
    eth = [replace(t, ts_ns=t.ts_ns + ETH_SHIFT_NS) for t in load_freqtrade(ETH)]
    TickStore(engine).insert_trades(btc + eth)
    return {BTC: [replace(t, ts_ns=t.ts_ns // 1000 * 1000, source="replay", received_ns=None) for t in btc],
            ETH: [replace(t, ts_ns=t.ts_ns // 1000 * 1000, source="replay", received_ns=None) for t in eth]}


def expected_records(trades: dict[str, list[Trade]], instruments: list[str], start_ns: int, end_ns: int,
                     outages: dict[str, list[tuple[int, int, str]]] | None = None) -> list:  # fmt: skip
    """What `replay.<id>.ticks` must hold, built independently of candlekeep.replay: per instrument
    the trades of the range, a heartbeat at every whole second of [start, end] outside outages, a
    disconnect at each outage start, the closing heartbeat at end + lateness; sorted by time, then
    instrument, then trades (by numeric id) before disconnects before heartbeats."""
    rows = []
    for inst in instruments:
        spans = (outages or {}).get(inst, [])
        for t in trades[inst]:
            if start_ns <= t.ts_ns < end_ns:
                rows.append(((t.ts_ns, inst, 0, int(t.trade_id)), t))
        for s, _e, reason in spans:
            rows.append(((max(s, start_ns), inst, 1, 0), Disconnect(inst, max(s, start_ns), "replay", reason)))
        first = -(-start_ns // NS_PER_S)
        for sec in range(first, end_ns // NS_PER_S + 1):
            h = sec * NS_PER_S
            if not any(s <= h < e for s, e, _r in spans):
                rows.append(((h, inst, 2, 0), Heartbeat(inst, h, "replay")))
        rows.append(((end_ns + LATENESS_NS, inst, 2, 0), Heartbeat(inst, end_ns + LATENESS_NS, "replay")))
    rows.sort(key=lambda r: r[0])
    return [r[1] for r in rows]


@dataclass
class Reader:
    """Every record of one session topic, in offset order (decoded), read with a fresh group."""

    bus: Bus
    topic: str
    records: list[Record]

    def __init__(self, bus: Bus, topic: str) -> None:
        self.bus, self.topic, self.records = bus, topic, []
        bus.ensure_topics([topic], partitions=1)
        self._consumer = bus.consumer(group=f"{topic}.reader.{time.monotonic_ns()}", topics=[topic])

    def read(self, timeout: float = 0.2) -> int:
        self.records += self._consumer.poll_batch(max_records=100_000, timeout=timeout)
        return len(self.records)

    def until(self, count: int, timeout: float = 60.0) -> list:
        deadline = time.monotonic() + timeout
        while self.read() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.topic}: {len(self.records)} of {count} records after {timeout} s")
        return self.decoded()

    def quiet(self, for_s: float = 0.6, timeout: float = 30.0) -> int:
        """Read until nothing new arrives for `for_s`; the count."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.read(0.1)
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= for_s:
                return n
        raise AssertionError(f"{self.topic} never went quiet")

    def decoded(self, records: list[Record] | None = None) -> list:
        bars = self.topic.endswith(".bars")
        return [decode_bar(r.value) if bars else decode_tick_record(r.value) for r in (records or self.records)]

    def close(self) -> None:
        self._consumer.close()


def ticks_topic(prefix: str, session: str) -> str:
    return replay_topic(prefix, session, "ticks")


@contextmanager
def running(replayer: Replayer) -> Iterator[Replayer]:
    stop = threading.Event()
    thread = threading.Thread(target=replayer.run, args=(stop,), name="replayer", daemon=True)
    thread.start()
    assert replayer.ready.wait(30), "the replayer did not get ready"
    try:
        yield replayer
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the replayer did not stop"


def as_bar(bar: Bar) -> Bar:
    return replace(bar, source="replay")


def dec(text: str) -> Decimal:
    return Decimal(text)
