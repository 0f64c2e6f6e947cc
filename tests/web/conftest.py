"""Browser tests of the dashboard: real Chromium (Debian's /usr/bin/chromium, driven by the Python
`playwright` package's bundled driver; no browser is ever downloaded) against a real API process
(`uvicorn --factory api.main:create_app` on a free loopback port) over the test PostgreSQL and
Redis, with the simulator streaming live (`python -m streaming.runner all`, the embedded bus).

Every page runs with the network closed: a route handler aborts any request that is not to
loopback and records it, and each test asserts none was made (`page_for` / `offline_requests`).
The build (web/dist) must exist: `make web` (a prerequisite of `make test`) makes it.
Screenshots of each panel go to `artifacts/web/` (git-ignored; CANDLEKEEP_TEST_ARTIFACTS moves it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Engine, text

from tests.utils.net import free_port
from tests.utils.wait import eventually

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "web" / "dist"
CHROMIUM = os.environ.get("CANDLEKEEP_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SIM_INSTRUMENT = "cccagg:BTC-USD"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def artifacts_dir() -> Path:
    path = Path(os.environ.get("CANDLEKEEP_TEST_ARTIFACTS", ROOT / "artifacts")) / "web"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _free_port_block(n: int) -> int:
    """A base port with `n` consecutive free ports (the streaming daemons' /health + /metrics)."""
    for _ in range(200):
        base = free_port()
        if base + n >= 65535:
            continue
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + i))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


@dataclass
class Process:
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _start(command: list[str], env: dict[str, str], log: Path) -> Process:
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    return Process(proc, log)


def _env(database_url: str, redis_url: str, port_base: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_")}
    env.update({
        "CANDLEKEEP_DATABASE_URL": database_url,
        "CANDLEKEEP_REDIS_URL": redis_url,
        "CANDLEKEEP_SOURCE": "simulator",
        "CANDLEKEEP_INSTRUMENTS": SIM_INSTRUMENT,
        "CANDLEKEEP_STREAM_PORT_BASE": str(port_base),
        "CANDLEKEEP_API_RATE_LIMIT_PER_MINUTE": "0",
        "CANDLEKEEP_TOPIC_PREFIX": f"web{uuid.uuid4().hex[:6]}.",
        "PYTHONPATH": str(ROOT),
    })  # fmt: skip
    env.update(extra)
    return env


@dataclass
class Api:
    url: str
    process: Process
    key: str | None = None

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path, headers={"X-API-Key": self.key} if self.key else {})
        with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 (loopback)
            return reply.read()


def start_api(database_url: str, redis_url: str, port_base: int, tmp: Path, *, port: int | None = None,
              **extra: str) -> Api:  # fmt: skip
    port = port or free_port()
    env = _env(database_url, redis_url, port_base, **extra)
    command = [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
    api = Api(f"http://127.0.0.1:{port}", _start(command, env, tmp / f"api-{port}-{uuid.uuid4().hex[:4]}.log"), extra.get("CANDLEKEEP_API_KEYS"))

    def up() -> bool:
        if api.process.proc.poll() is not None:
            raise AssertionError(f"the API exited: {api.process.tail()}")
        try:
            urllib.request.urlopen(api.url + "/health", timeout=2)  # noqa: S310
            return True
        except urllib.error.HTTPError:
            return True  # 503 degraded still answers
        except OSError:
            return False

    eventually(up, timeout=60, what="the API to answer /health")
    return api


@pytest.fixture(scope="session")
def web_build() -> Path:
    index = DIST / "index.html"
    assert index.is_file(), f"{index} is missing: build the dashboard with `make web` (npm ci && npm run build in web/)"
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install chromium (`.ci/run` does)"
    return DIST


@pytest.fixture(scope="session")
def web_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="candlekeep-web-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def port_base() -> int:
    return _free_port_block(4)


@pytest.fixture
def simulator(database_url: str, redis_url: str, port_base: int, web_tmp: Path, session_engine: Engine) -> Iterator[Process]:
    """The streaming daemons, embedded, playing the simulator's BTC-USD live (speed 1, from now).

    Only for the tests that need live data: its coordinator tracks every tracked instrument, and the
    simulator would invent history for the other tests' stored instruments, so those are
    unregistered first and the daemons stop when the test ends.
    """
    with session_engine.begin() as conn:
        conn.execute(text("DELETE FROM instruments WHERE id LIKE 'web:%'"))
    env = _env(database_url, redis_url, port_base)
    command = [sys.executable, "-m", "streaming.runner", "all", "--speed", "1", "--port-base", str(port_base)]
    process = _start(command, env, web_tmp / f"stream-{uuid.uuid4().hex[:4]}.log")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def api(database_url: str, redis_url: str, port_base: int, web_tmp: Path, web_build: Path) -> Iterator[Api]:
    """The API with no streaming daemons running beside it (tests that need them ask for `simulator`)."""
    server = start_api(database_url, redis_url, port_base, web_tmp)
    yield server
    server.process.stop()


@pytest.fixture(scope="session")
def browser(web_build: Path) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    profile = Path(tempfile.mkdtemp(prefix="candlekeep-chromium-"))
    with sync_playwright() as pw:
        # A persistent context is the only way to hand Chromium a fresh --user-data-dir of our own.
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1440, "height": 1100}, device_scale_factor=1,
        )  # fmt: skip
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Offline:
    """Requests a page tried to make beyond loopback (each one aborted)."""

    blocked: list[str] = field(default_factory=list)


# Only requests beyond loopback are routed to Python. A regex is matched inside Playwright's driver;
# a glob-all route would park every loopback request too until the (sync) test next calls into
# Playwright, so a page request made while a test polls the API over urllib would never go out.
BEYOND_LOOPBACK = re.compile(r"^(?!data:|blob:|(?:https?|wss?)://(?:127\.0\.0\.1|localhost|\[::1\])(?:[:/?#]|$))")


def block_network(page: object) -> Offline:
    offline = Offline()

    def handler(route: object) -> None:
        host = urlsplit(route.request.url).hostname or ""  # type: ignore[attr-defined]
        scheme = urlsplit(route.request.url).scheme  # type: ignore[attr-defined]
        if scheme in ("data", "blob") or host in LOOPBACK:
            route.continue_()  # type: ignore[attr-defined]
        else:
            offline.blocked.append(route.request.url)  # type: ignore[attr-defined]
            route.abort()  # type: ignore[attr-defined]

    page.route(BEYOND_LOOPBACK, handler)  # type: ignore[attr-defined]
    return offline


@pytest.fixture
def page(browser: object) -> Iterator[tuple[object, Offline]]:
    p = browser.new_page()  # type: ignore[attr-defined]
    offline = block_network(p)
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    yield p, offline
    p.close()
    assert not offline.blocked, f"the page reached beyond loopback: {offline.blocked}"
    assert not errors, f"uncaught errors in the page: {errors}"


def data_layer(page: object, expression: str) -> object:
    return page.evaluate(f"() => {{ const d = window.__candlekeep; return d && ({expression}); }}")  # type: ignore[attr-defined]


def wait_for(page: object, expression: str, timeout_s: float = 20.0) -> None:
    page.wait_for_function(f"() => {{ const d = window.__candlekeep; return !!(d && ({expression})); }}", timeout=timeout_s * 1000)  # type: ignore[attr-defined]


def shot(page: object, selector: str, name: str) -> Path:
    path = artifacts_dir() / name
    page.locator(selector).screenshot(path=str(path))  # type: ignore[attr-defined]
    return path


def now_minute() -> int:
    now = int(time.time())
    return now - now % 60
