"""The dashboard's files at `/`, `/docs` and `/redoc` with local assets (api/web.py), their place in
the key policy, and `GET /v1/status` (api/routes/status.py) over the real test database."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, generate_latest

from api.main import create_app
from api.routes.status import deadletter_counts
from api.web import DOCS_ASSETS, install_web
from candlekeep.settings import Settings
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.storage.outages import OutageStore
from tests.utils.bars import make_bar
from tests.utils.net import LOOPBACK_PEER


def _dist(tmp_path: Path) -> Path:
    (tmp_path / "assets").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "index.html").write_text('<!doctype html><script type="module" src="/assets/app.js"></script>')
    (tmp_path / "assets" / "app.js").write_text("console.log('candlekeep')")
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon-32x32.png"):
        (tmp_path / "docs" / name).write_text(f"/* {name} */")
    return tmp_path


def _app(dist: Path) -> FastAPI:
    app = FastAPI(title="Candlekeep", docs_url=None, redoc_url=None)
    install_web(app, dist)
    return app


def test_the_page_and_its_assets_are_served_from_the_build(tmp_path: Path) -> None:
    client = TestClient(_app(_dist(tmp_path)), client=LOOPBACK_PEER)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/assets/app.js" in page.text
    assert client.get("/assets/app.js").text == "console.log('candlekeep')"
    assert client.get("/assets/missing.js").status_code == 404


def test_docs_and_redoc_load_every_file_from_this_server(tmp_path: Path) -> None:
    client = TestClient(_app(_dist(tmp_path)), client=LOOPBACK_PEER)
    for path in ("/docs", "/redoc"):
        html = client.get(path).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url\(([^)]+)\)", html)
        assert urls, path
        for url in urls:
            assert url.startswith("/"), f"{path} loads {url} from elsewhere"
            if url.startswith(DOCS_ASSETS):
                assert client.get(url).status_code == 200, url
        assert "fonts.googleapis" not in html and "cdn.jsdelivr" not in html


def test_a_missing_build_says_how_to_make_one(tmp_path: Path) -> None:
    client = TestClient(_app(tmp_path / "nothing-here"), client=LOOPBACK_PEER)
    for path in ("/", "/docs", "/redoc"):
        answer = client.get(path)
        assert answer.status_code == 503
        assert "make web" in answer.text


def test_page_files_are_open_and_data_still_needs_a_key(engine, database_url: str) -> None:
    app = create_app(Settings(database_url=database_url, redis_url=None, api_keys="s3cret", api_rate_limit_per_minute=0))
    with TestClient(app, client=LOOPBACK_PEER) as client:
        assert client.get("/").status_code in (200, 503)  # built or not: never 401
        assert client.get("/assets/anything.js").status_code != 401
        assert client.get(f"{DOCS_ASSETS}/swagger-ui.css").status_code != 401
        assert client.get("/v1/status").status_code == 401
        assert client.get("/v1/status", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/", headers={"X-API-Key": "wrong"}).status_code == 401  # a wrong key is refused anywhere


def test_status_reports_freshness_outages_and_unreachable_daemons(engine, database_url: str) -> None:
    now = int(time.time()) // 60 * 60
    InstrumentStore(engine).register(["test:AAA-USD"], tracked=True)
    InstrumentStore(engine).register(["test:BBB-USD"])
    BarStore(engine).upsert_bars([make_bar("test:AAA-USD", now - 600, "10"), make_bar("test:AAA-USD", now - 300, "11")])
    started = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    OutageStore(engine).record(source="s1", started_at=started, instruments=["test:AAA-USD"], reason="quiet")
    OutageStore(engine).record(source="s2", started_at=started - timedelta(days=30), ended_at=started - timedelta(days=29),
                               instruments=["test:AAA-USD"], reason="old")  # fmt: skip
    # port base 0: the daemons' ports are unknown, so none is probed
    app = create_app(Settings(database_url=database_url, redis_url=None, api_rate_limit_per_minute=0, stream_port_base=0))
    with TestClient(app, client=LOOPBACK_PEER) as client:
        body = client.get("/v1/status").json()
    rows = {r["instrument"]: r for r in body["instruments"]}
    assert rows["test:AAA-USD"]["tracked"] is True and rows["test:AAA-USD"]["last_bar"] == now - 300
    assert abs(rows["test:AAA-USD"]["age_s"] - (body["now"] - (now - 240))) <= 1
    assert rows["test:BBB-USD"] == {"instrument": "test:BBB-USD", "tracked": False, "last_bar": None, "age_s": None}
    assert [o["reason"] for o in body["outages"]] == ["quiet"]  # the 30-day-old one is past the window
    assert body["outages"][0]["ended_at"] is None
    assert body["deadletters"] == {"producer": None, "aggregator": None, "coordinator": None, "dynamic": None}


def test_deadletter_counts_read_a_real_prometheus_exposition() -> None:
    registry = CollectorRegistry()
    counter = Counter("candlekeep_aggregator_deadletters", "Records sent to deadletter", ["reason"], registry=registry)
    counter.labels("invalid").inc(3)
    counter.labels("future").inc()
    Counter("candlekeep_aggregator_trades", "Trades", registry=registry).inc(99)
    assert deadletter_counts(generate_latest(registry).decode()) == {"invalid": 3, "future": 1}
    assert deadletter_counts("") == {}
