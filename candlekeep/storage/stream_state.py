"""What an aggregator's durable state includes, per consumer group and instrument (`stream_state`).

    store = StreamStateStore(engine)
    store.save("aggregator", [StreamState(...), ...])   # upsert; written last in a flush
    store.load("aggregator", ["coinbase:BTC-USD"])     # -> {instrument: StreamState}

The aggregator writes ticks, bars and outages (each idempotent) and then this row, so after any crash
the stored state is consistent with `next_offset`: a restart rebuilds its bar builders from it and
skips the instrument's records before that offset (kdb+'s `.u.i`: replay exactly what the state
does not hold yet).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, text


@dataclass(frozen=True, slots=True)
class StreamState:
    instrument: str
    topic: str
    partition: int
    next_offset: int  # the first record of `partition` the state does not include
    clock_ns: int | None  # the log's clock of the instrument
    closed_until: int | None  # unix s: every bucket before it was closed


class StreamStateStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def save(self, consumer: str, states: Iterable[StreamState]) -> None:
        rows = [
            {"consumer": consumer, "instrument": s.instrument, "topic": s.topic, "partition": s.partition,
             "next_offset": s.next_offset, "clock_ns": s.clock_ns, "closed_until": s.closed_until}
            for s in states
        ]  # fmt: skip
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    'INSERT INTO stream_state (consumer, instrument, topic, "partition", next_offset, clock_ns,'
                    " closed_until, updated_at) VALUES (:consumer, :instrument, :topic, :partition, :next_offset,"
                    " :clock_ns, :closed_until, now())"
                    ' ON CONFLICT (consumer, instrument) DO UPDATE SET topic = excluded.topic,'
                    ' "partition" = excluded."partition", next_offset = excluded.next_offset,'
                    " clock_ns = excluded.clock_ns, closed_until = excluded.closed_until, updated_at = now()"
                ),
                rows,
            )

    def load(self, consumer: str, instruments: Sequence[str] | None = None) -> dict[str, StreamState]:
        """The stored states of `consumer` (of `instruments`, or all)."""
        sql = ('SELECT instrument, topic, "partition", next_offset, clock_ns, closed_until FROM stream_state'
               " WHERE consumer = :consumer")  # fmt: skip
        params: dict[str, object] = {"consumer": consumer}
        if instruments is not None:
            sql += " AND instrument = ANY(:instruments)"
            params["instruments"] = list(instruments)
        with self.engine.connect() as conn:
            return {row.instrument: StreamState(*row) for row in conn.execute(text(sql), params)}
