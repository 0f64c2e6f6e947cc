"""The books daemon on real PostgreSQL and Kafka, driven by books from the real recordings.

Truth: tests.utils.books.reference, an independent pandas rebuild of the same books; for kill -9,
the outputs of one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from sqlalchemy import Engine, text

from candlekeep.bars import NS_PER_S
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.bus import Bus, InProcessBus, KafkaBus
from candlekeep.messages import BOOKS, DEADLETTER, encode_book, topic
from candlekeep.instruments import Instrument
from candlekeep.sources.simulator import Simulator
from candlekeep.sources.simulator_book import SimulatorBooks
from candlekeep.storage.books import BookStore
from streaming.books import TRANSITIONS, BooksDaemon
from tests.utils.backend import backend
from tests.utils.books import WIDTHS, recorded_books, reference
from tests.utils.wait import eventually

ROOT = Path(__file__).resolve().parents[2]


def _publish(bus: Bus, prefix: str, records, *, raw: list[tuple[str, bytes]] = ()) -> None:
    name = topic(prefix, BOOKS)
    bus.ensure_topics([name, topic(prefix, DEADLETTER)])
    producer = bus.producer(name="test-books")
    for key, value in raw:
        producer.publish(name, key, value)
    for r in records:
        producer.publish(name, r.instrument, encode_book(r))
    assert producer.flush(30) == 0


def _drain(daemon: BooksDaemon, *, idle_polls: int = 5) -> None:
    if daemon._consumer is None:
        daemon._start()
    quiet = 0
    while quiet < idle_polls:
        before = daemon.m_records.labels("delta")._value.get() + daemon.m_records.labels("snapshot")._value.get()
        daemon.step()
        after = daemon.m_records.labels("delta")._value.get() + daemon.m_records.labels("snapshot")._value.get()
        quiet = quiet + 1 if after == before else 0
    daemon.flush()


def _stored(engine: Engine) -> dict[str, list]:
    with engine.connect() as conn:
        snaps = conn.execute(text(
            "SELECT instrument, (extract(epoch FROM ts) * 1e9)::bigint, sequence, bids, asks, mid::text, spread::text,"
            " bid_depth_10, ask_depth_10, bid_depth_50, ask_depth_50, bid_depth_100, ask_depth_100, verified, source"
            " FROM book_snapshots ORDER BY 1, 2")).all()  # fmt: skip
        buckets = conn.execute(text(
            "SELECT instrument, (extract(epoch FROM ts) * 1e9)::bigint, side, u.price, u.size, width"
            " FROM book_buckets, unnest(prices, sizes) AS u(price, size) ORDER BY 1, 2, 3, 4")).all()  # fmt: skip
        metrics = conn.execute(text("SELECT instrument, (extract(epoch FROM ts) * 1e9)::bigint, imbalance_1,"
                                    " imbalance_5, imbalance_10, imbalance_10bps, imbalance_50bps, microprice,"
                                    " weighted_mid FROM book_metrics ORDER BY 1, 2")).all()  # fmt: skip
    return {"snapshots": [tuple(r) for r in snaps], "buckets": [tuple(r) for r in buckets],
            "metrics": [tuple(r) for r in metrics]}  # fmt: skip


def test_recorded_books_match_the_pandas_reference(engine: Engine, topic_prefix: str) -> None:
    records = recorded_books(5.0)
    assert {r.instrument for r in records} == set(WIDTHS)
    bus = InProcessBus()
    _publish(bus, topic_prefix, records)
    daemon = BooksDaemon(bus, BookStore(engine), prefix=topic_prefix, widths=WIDTHS, depth=25, flush_max=50)
    _drain(daemon)
    expected = reference(records, NS_PER_S, WIDTHS, depth=25)
    stored = _stored(engine)
    assert len(expected) > 100 and len(stored["snapshots"]) == len(expected)
    by_key = {(r[0], r[1]): r for r in stored["snapshots"]}
    metrics = {(r[0], r[1]): r for r in stored["metrics"]}
    buckets: dict[tuple, dict] = {}
    for inst, ts, side, price, size, width in stored["buckets"]:
        assert width == WIDTHS[inst]
        buckets.setdefault((inst, ts), {})[(side, price)] = size
    for ref in expected:
        row = by_key[(ref.instrument, ref.ts_ns)]
        assert [(Decimal(p), Decimal(s)) for p, s in row[3]] == ref.bids
        assert [(Decimal(p), Decimal(s)) for p, s in row[4]] == ref.asks
        assert float(row[5]) == pytest.approx(ref.mid, rel=1e-15) and Decimal(row[6]) == ref.spread
        assert list(row[7:13]) == [ref.depth[f"{side}_{bps}"] for bps in (10, 50, 100) for side in ("bid", "ask")]
        assert buckets[(ref.instrument, ref.ts_ns)] == ref.buckets
        m = metrics[(ref.instrument, ref.ts_ns)]
        for got, key in zip(m[2:7], ("1", "5", "10", "10bps", "50bps"), strict=True):
            if ref.imbalance[key] is None:
                assert got is None
            else:
                assert float(got) == pytest.approx(ref.imbalance[key], rel=1e-9, abs=1e-12)
        assert float(m[7]) == pytest.approx(ref.microprice, rel=1e-12)
    assert daemon.state.state == "consuming"
    assert daemon.health()["instruments"] == dict.fromkeys(sorted(WIDTHS), "live")


def _simulated(seconds: int = 200) -> list[BookSnapshot | BookDelta]:
    """The simulator's books: a sequence chain (sequence = second) and a snapshot every 60 s."""
    sim = SimulatorBooks(Simulator(2, now=lambda: 4e9), levels=25, snapshot_every_s=60)
    start = 1_700_000_040  # a multiple of 60
    return list(sim.updates(Instrument.parse(SIM), start * NS_PER_S, (start + seconds) * NS_PER_S))


SIM = "cccagg:BTC-USD"
SIM_WIDTHS = {SIM: Decimal("10")}


def test_batches_stay_within_flush_max_inside_one_poll(engine: Engine, topic_prefix: str) -> None:
    """One poll of every record (200 s of books, 199 outputs): batches of at most `flush_max`, all stored."""
    bus = InProcessBus()
    _publish(bus, topic_prefix, _simulated())
    daemon = BooksDaemon(bus, BookStore(engine), prefix=topic_prefix, widths=SIM_WIDTHS, flush_max=7,
                         max_records=10_000)  # fmt: skip
    sizes: list[int] = []
    submit = daemon._submit
    daemon._submit = lambda: (sizes.append(len(daemon._outputs)), submit())[1]  # type: ignore[method-assign]
    daemon._start()
    daemon.step()
    daemon.flush()
    stored = daemon.m_written._value.get()
    daemon._shutdown()
    assert stored == 199 and sum(sizes) == 199 and max(sizes) == 7 and len(sizes) >= 199 // 7


def test_a_delta_before_any_snapshot_waits_and_a_break_waits_for_the_next_snapshot(
    engine: Engine, topic_prefix: str
) -> None:
    books = _simulated()
    snapshots = [i for i, r in enumerate(books) if isinstance(r, BookSnapshot)]
    assert snapshots == [0, 60, 120, 180]
    # Deltas before the first snapshot, then a break: the delta at 70 claims a wrong predecessor.
    early = [replace(d, ts_ns=books[0].ts_ns - NS_PER_S) for d in books[1:6]]
    tampered = list(books)
    tampered[70] = replace(books[70], prev_sequence=books[70].prev_sequence - 1)
    bus = InProcessBus()
    _publish(bus, topic_prefix, early + tampered, raw=[(SIM, b"not json")])
    daemon = BooksDaemon(bus, BookStore(engine), prefix=topic_prefix, widths=SIM_WIDTHS)
    _drain(daemon)
    # The truth: the reference over the feed with everything from the break to the next snapshot removed.
    truth = reference(books[:70] + books[120:], NS_PER_S, SIM_WIDTHS)
    stored = _stored(engine)
    assert [r[1] for r in stored["snapshots"]] == [r.ts_ns for r in truth]
    assert len(truth) == 70 + 79  # 1 s intervals: one output per second but the broken stretch and the last
    assert daemon.m_waiting._value.get() == len(early) + 49 and daemon.m_breaks._value.get() == 1
    assert daemon.m_deadletters._value.get() == 1
    by_ts = {r[1]: r for r in stored["snapshots"]}
    for ref in truth:
        assert [(Decimal(p), Decimal(s)) for p, s in by_ts[ref.ts_ns][3]] == ref.bids


def test_states_and_health(engine: Engine, topic_prefix: str) -> None:
    bus = InProcessBus()
    books = _simulated(30)
    _publish(bus, topic_prefix, books[1:4])
    daemon = BooksDaemon(bus, BookStore(engine), prefix=topic_prefix, widths=SIM_WIDTHS)
    assert daemon.state.state == "idle" and set(TRANSITIONS) == {"idle", "syncing", "consuming", "error"}
    _drain(daemon)
    assert daemon.state.state == "syncing" and daemon.health()["instruments"] == {SIM: "waiting"}
    _publish(bus, topic_prefix, books)
    _drain(daemon)
    assert daemon.state.state == "consuming"
    stop = threading.Event()
    stop.set()
    daemon.run(stop)
    assert daemon.state.state == "idle"


def test_kill_9_then_restart_gives_the_outputs_of_an_uninterrupted_run(
    kafka_bootstrap: str, engine: Engine, database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    rng = random.Random(11)
    records = recorded_books(2.0)
    widths = ",".join(f"{k}={v}" for k, v in WIDTHS.items())
    # The uninterrupted run, in process, on the same records: its rows are the truth.
    clean_bus = InProcessBus()
    _publish(clean_bus, topic_prefix, records)
    clean = BooksDaemon(clean_bus, BookStore(engine), prefix=topic_prefix, widths=WIDTHS)
    _drain(clean)
    restart_at = clean.restart_offsets()[(topic(topic_prefix, BOOKS), 0)]
    truth = _stored(engine)
    assert len(truth["snapshots"]) > 100
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE book_snapshots, book_buckets, book_metrics"))

    env = {**os.environ, "CANDLEKEEP_DATABASE_URL": database_url, "CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "CANDLEKEEP_TOPIC_PREFIX": topic_prefix, "CANDLEKEEP_BOOK_BUCKET_WIDTHS": widths,
           # Kraken's recording is of 2021, OKX's of 2022: 30 days of retention on the book clock would drop
           # the 2021 day once the 2022 records arrive (as it should; the retention test covers that).
           "CANDLEKEEP_BOOK_RETENTION_DAYS": "36500", "PYTHONPATH": str(ROOT)}  # fmt: skip
    log_path = tmp_path / "books.log"

    def launch() -> subprocess.Popen:
        with log_path.open("ab") as log:
            return subprocess.Popen([sys.executable, "-m", "streaming.books", "--port", "-1", "--flush-interval", "0.1",
                                     "--instance-id", "kill-test"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip

    bus = KafkaBus(kafka_bootstrap)
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{topic_prefix}books"})
    from confluent_kafka import TopicPartition

    def committed() -> int:
        return probe.committed([TopicPartition(topic(topic_prefix, BOOKS), 0)], timeout=5)[0].offset

    chunks = [records[i:i + 100] for i in range(0, len(records), 100)]
    kills = sorted(rng.sample(range(2, len(chunks) - 1), 3))
    proc = launch()
    try:
        for k, chunk in enumerate(chunks):
            _publish(bus, topic_prefix, chunk)
            if k == 1:
                eventually(lambda: committed() > 0, timeout=60, what="first commit")
            time.sleep(rng.uniform(0.1, 0.5))
            if k in kills:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                proc = launch()
        # Done when the group committed where the uninterrupted run would restart from (writes come first).
        eventually(lambda: committed() == restart_at, timeout=120, what="the final commit")
        got = _stored(engine)
        for name in truth:
            assert len(got[name]) == len(truth[name]), name
        assert got == truth
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        probe.close()
        if proc.poll() is None:
            proc.kill()
        bus.close()
    assert log_path.read_text().count("books /health") == 0  # --port -1: no server; sanity of the log
    json.dumps(truth["snapshots"][0][3])  # stored levels are JSON arrays of decimal strings


def _book_days(engine: Engine) -> set[str]:
    """The UTC days holding a `book_snapshots` partition (native) or chunk (TimescaleDB), from the catalogs."""
    with engine.connect() as conn:
        if backend(engine) == "native":
            names = conn.execute(text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                                      " WHERE i.inhparent = 'book_snapshots'::regclass")).scalars()  # fmt: skip
            return {n.rsplit("_p", 1)[1] for n in names}
        starts = conn.execute(text("SELECT range_start FROM timescaledb_information.chunks"
                                   " WHERE hypertable_name = 'book_snapshots'")).scalars()  # fmt: skip
        return {f"{s.astimezone(UTC):%Y%m%d}" for s in starts}


def _stored_days(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYYMMDD'), count(*) FROM book_snapshots"
                                 " GROUP BY 1")).all()  # fmt: skip
    return {day: n for day, n in rows}


def _seconds_of_books(start_s: int, seconds: int) -> list[BookSnapshot]:
    """One snapshot per second of book time (each second's book is an output at the next one)."""
    sim = SimulatorBooks(Simulator(3, now=lambda: 4e9), levels=10)
    out = []
    for s in range(start_s, start_s + seconds):
        bids, asks = sim.book_at(Instrument.parse(SIM), s)
        out.append(BookSnapshot(SIM, s * NS_PER_S, None, s, None, bids, asks, "simulator", True))
    return out


def test_retention_drops_whole_days_before_the_book_clock_bounded_by_the_wall_clock(
    engine: Engine, topic_prefix: str
) -> None:
    now = datetime.now(UTC)
    old_s = int((now - timedelta(days=40)).timestamp()) // 86_400 * 86_400 + 3_600  # 01:00 UTC, 40 days ago
    recent_s = int((now - timedelta(hours=2)).timestamp()) // 3_600 * 3_600  # 4 s from an hour's start: one day
    old_day = f"{datetime.fromtimestamp(old_s, UTC):%Y%m%d}"
    recent_day = f"{datetime.fromtimestamp(recent_s, UTC):%Y%m%d}"
    old, recent = _seconds_of_books(old_s, 4), _seconds_of_books(recent_s, 4)

    # A feed whose book clock is 40 days old keeps what it writes: nothing is older than ITS 30 days.
    bus = InProcessBus()
    _publish(bus, topic_prefix, old)
    daemon = BooksDaemon(bus, BookStore(engine), prefix=topic_prefix, widths=SIM_WIDTHS, retention_days=30)
    _drain(daemon)
    assert _stored_days(engine) == {old_day: 3} and old_day in _book_days(engine)

    # The book clock reaches today, but the wall clock says it is still that old day: the earlier
    # clock wins (a record stamped ahead of the wall cannot drop anything younger than retention).
    _publish(bus, topic_prefix, recent)
    behind = BooksDaemon(bus, BookStore(engine), prefix=topic_prefix, widths=SIM_WIDTHS, retention_days=30,
                         group=f"{topic_prefix}behind", wall_clock=lambda: old_s + 86_400.0)  # fmt: skip
    _drain(behind)  # from the start of the log: the old book's last second is an output now (4 rows)
    assert _stored_days(engine) == {old_day: 4, recent_day: 3} and old_day in _book_days(engine)

    # Both clocks today: the old day's partition (or chunk) goes, with its rows, in all three tables;
    # today's stay. Run again: nothing more to drop (once per cutoff day).
    _drain(daemon)
    assert daemon.retention_clock() == datetime.fromtimestamp(recent_s + 3, UTC)
    days = _book_days(engine)
    assert old_day not in days and recent_day in days
    assert _stored_days(engine) == {recent_day: 3}
    with engine.connect() as conn:
        for table in ("book_buckets", "book_metrics"):
            assert conn.execute(text(f"SELECT count(*) FROM {table} WHERE ts < :t"),
                                {"t": datetime.fromtimestamp(recent_s - 86_400, UTC)}).scalar() == 0  # fmt: skip
    dropped = daemon.m_dropped._value.get()
    assert dropped >= 3  # that day of each of the three tables (more when older days were made by others)
    daemon.flush()
    assert daemon.m_dropped._value.get() == dropped
    assert daemon.health()["retained_from"] == f"{(datetime.fromtimestamp(recent_s, UTC) - timedelta(days=30)).date()}"


def test_only_a_venue_that_cuts_its_book_at_a_subscribed_depth_is_cut(engine: Engine) -> None:
    """Kraken (subscribed depth 1000: no delete for a level pushed out of scope) is cut at 1000 per side,
    however shallow its snapshot; a venue whose deletes come on the wire is never cut."""
    daemon = BooksDaemon(InProcessBus(), BookStore(engine), widths={"BTC-USD": Decimal("10")})
    d = Decimal
    for instrument in ("kraken:BTC-USD", "coinbase:BTC-USD"):
        bids = [(d(100 - i), d(1)) for i in range(3)]
        asks = [(d(101 + i), d(1)) for i in range(3)]
        daemon.apply(BookSnapshot(instrument, NS_PER_S, None, None, None, tuple(bids), tuple(asks), "t", True),
                     ("books", 0, 0))  # fmt: skip
        # A shallow book grows: nothing falls out of a 1000-level subscription, so nothing may be cut.
        daemon.apply(BookDelta(instrument, NS_PER_S, None, None, None, ((d(97), d(2)),), ((d(104), d(2)),), "t", True),
                     ("books", 0, 1))  # fmt: skip
        book = daemon._books[instrument].book
        assert (book.bid_count, book.ask_count) == (4, 4), instrument
        # Past the subscribed depth only Kraken's copy is cut, to its best 1000 levels per side.
        many = tuple((d(101 + i), d(1)) for i in range(1200))
        daemon.apply(BookDelta(instrument, NS_PER_S, None, None, None, (), many, "t", True), ("books", 0, 2))
        expected = 1000 if instrument.startswith("kraken:") else 1200
        assert book.ask_count == expected and book.asks(1)[0][0] == d(101), instrument
        assert book.asks()[-1][0] == d(101 + expected - 1)


def test_a_failed_write_commits_nothing_and_the_same_outputs_are_written_on_retry(
    engine: Engine, pg_admin_url: str, topic_prefix: str
) -> None:
    from candlekeep.storage.db import create_engine, with_database

    books = _simulated(20)
    bus = InProcessBus()
    _publish(bus, topic_prefix, books)
    nowhere = create_engine(with_database(pg_admin_url, f"missing_{topic_prefix.strip('.')}"))
    daemon = BooksDaemon(bus, BookStore(nowhere), prefix=topic_prefix, widths=SIM_WIDTHS)
    daemon._start()
    while daemon.m_records.labels("snapshot")._value.get() + daemon.m_records.labels("delta")._value.get() < 20:
        records = daemon._consumer.poll_batch(max_records=100, timeout=0.5)
        for r in records:
            daemon._ingest(r)
            daemon._offsets[(r.topic, r.partition)] = r.offset + 1
    made = daemon.health()["pending_outputs"]
    assert made == 19
    with pytest.raises(RuntimeError, match="books writer failed"):
        daemon.flush()
    assert daemon.committed == {} and daemon.health()["pending_outputs"] == made  # all kept, in order
    daemon.store = BookStore(engine)  # the database is back
    daemon.flush()
    assert daemon.committed == daemon.restart_offsets()
    stored = _stored(engine)["snapshots"]
    assert [r[1] for r in stored] == [r.ts_ns for r in reference(books, NS_PER_S, SIM_WIDTHS)]
    daemon._shutdown()
    nowhere.dispose()
