"""WS /v1/stream over real Redis and PostgreSQL: snapshot, live updates, the seam, reconnects, bad params.

Updates are published as the aggregator does: bars upserted into PostgreSQL, then `BarCache.put`
(SET + PUBLISH on `ohlcv:{instrument}:1m:updates`). Bar times are around the wall clock, because the
stream's snapshot reaches up to the current bucket.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from starlette.websockets import WebSocketDisconnect

from api.main import create_app
from candlekeep.bars import Bar
from candlekeep.cache import BarCache
from candlekeep.settings import Settings
from candlekeep.storage.bars import BarStore
from tests.utils.bars import make_bar
from tests.utils.net import LOOPBACK_PEER

RECEIVE_TIMEOUT_S = 10


def _app(database_url: str, redis_url: str | None):
    return create_app(Settings(database_url=database_url, redis_url=redis_url, api_rate_limit_per_minute=0))


def _client(app, redis_url: str | None) -> TestClient:
    client = TestClient(app, client=LOOPBACK_PEER)
    client.__enter__()
    return client


@pytest.fixture
def instrument() -> str:
    return f"test:S{uuid.uuid4().hex[:8].upper()}-USD"  # fresh Redis keys and channel per test


@pytest.fixture
def cache(redis_url: str) -> Iterator[BarCache]:
    c = BarCache.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def live_client(engine: Engine, database_url: str, redis_url: str) -> Iterator[TestClient]:
    app = _app(database_url, redis_url)
    client = _client(app, redis_url)
    yield client
    client.__exit__(None, None, None)


def _receive(ws, timeout: float = RECEIVE_TIMEOUT_S) -> dict:
    async def receive():
        with anyio.fail_after(timeout):
            return await ws._send_rx.receive()  # noqa: SLF001 (the session's receive, with a deadline)

    message = ws.portal.call(receive)
    if message["type"] == "websocket.close":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    return json.loads(message["text"])


def _bars_until_live(ws) -> tuple[list[dict], dict]:
    bars = []
    while (msg := _receive(ws))["type"] == "bar":
        bars.append(msg["bar"])
    assert msg["type"] == "live"
    return bars, msg


def _now_bucket() -> int:
    now = int(time.time())
    if now % 60 > 50:  # keep each test inside one minute: the forming bucket must not move
        time.sleep(61 - now % 60)
        now = int(time.time())
    return now - now % 60


def _stream_bar(instrument: str, start: int, close: str, *, trades: int = 3, revision: int = 0) -> Bar:
    return replace(make_bar(instrument, start, close, source="stream", final=False), trades=trades, revision=revision)


def _publish(engine: Engine, cache: BarCache, *, closed: list[Bar] = (), forming: list[Bar] = ()) -> None:
    if closed:
        BarStore(engine).upsert_bars(closed)
    assert cache.put(closed=closed, forming=forming)


def test_snapshot_then_forming_updates_closes_and_revisions(live_client, engine, cache, instrument) -> None:
    now = _now_bucket()
    closed = [_stream_bar(instrument, now - 60 * k, f"{100 + k}.5") for k in (3, 2, 1)]
    BarStore(engine).upsert_bars(closed)
    with live_client.websocket_connect(f"/v1/stream?instrument={instrument}&interval=1m&since={now - 180}") as ws:
        snapshot, live = _bars_until_live(ws)
        assert [b["start"] for b in snapshot] == [now - 180, now - 120, now - 60]
        assert snapshot[0]["close"] == "103.5" and snapshot[0]["v"] == 1  # the bars topic JSON, decimal strings
        assert live == {"type": "live", "mode": "redis", "snapshot": 3}

        forming1 = _stream_bar(instrument, now, "99.5", trades=1)
        _publish(engine, cache, forming=[forming1])
        got = _receive(ws)["bar"]
        assert (got["start"], got["trades"], got["final"]) == (now, 1, False)

        forming2 = replace(forming1, close=Decimal("99.75"), high=Decimal("100.5"), trades=2)
        _publish(engine, cache, forming=[forming2])
        got = _receive(ws)["bar"]
        assert (got["start"], got["trades"], got["close"]) == (now, 2, "99.75")

        revised = replace(closed[-1], close=Decimal("101.25"), revision=1)
        _publish(engine, cache, closed=[revised])
        got = _receive(ws)["bar"]
        assert (got["start"], got["revision"], got["close"]) == (now - 60, 1, "101.25")


def test_reconnect_with_since_gets_the_missed_bars_then_live(live_client, engine, cache, instrument) -> None:
    now = _now_bucket()
    url = f"/v1/stream?instrument={instrument}&interval=1m"
    _publish(engine, cache, closed=[_stream_bar(instrument, now - 300, "50")])
    with live_client.websocket_connect(f"{url}&since={now - 300}") as ws:
        first, _ = _bars_until_live(ws)
    assert [b["start"] for b in first] == [now - 300]
    # while disconnected: three bars close
    missed = [_stream_bar(instrument, now - 60 * k, f"5{k}") for k in (4, 3, 2)]
    _publish(engine, cache, closed=missed)
    with live_client.websocket_connect(f"{url}&since={first[-1]['start'] + 60}") as ws:
        again, live = _bars_until_live(ws)
        assert [b["start"] for b in again] == [now - 240, now - 180, now - 120]
        assert live["snapshot"] == 3
        _publish(engine, cache, closed=[_stream_bar(instrument, now - 60, "60")])
        assert _receive(ws)["bar"]["start"] == now - 60


def test_no_duplicate_and_no_gap_at_the_seam(live_client, engine, cache, instrument) -> None:
    """Updates published after the subscription but before the snapshot read are in the snapshot:
    they must not come again; updates after the snapshot must all come."""
    now = _now_bucket()
    closed = _stream_bar(instrument, now - 60, "70")
    forming = _stream_bar(instrument, now, "71", trades=1)
    service = live_client.app.state.ohlcv
    real_read = service.read
    published = []

    def read_after_publishing(query, **kw):  # the aggregator publishes during the handshake
        if not published:
            _publish(engine, cache, closed=[closed], forming=[forming])
            published.append(True)
        return real_read(query, **kw)

    service.read = read_after_publishing
    try:
        with live_client.websocket_connect(f"/v1/stream?instrument={instrument}&interval=1m&since={now - 60}") as ws:
            snapshot, live = _bars_until_live(ws)
            assert [(b["start"], b["trades"]) for b in snapshot] == [(now - 60, 3), (now, 1)]
            newer = replace(forming, trades=2, volume=Decimal("3"))
            _publish(engine, cache, forming=[newer])
            sentinel = replace(closed, revision=1, close=Decimal("70.5"))
            _publish(engine, cache, closed=[sentinel])
            after = [_receive(ws)["bar"], _receive(ws)["bar"]]
            # exactly the two news, in order: the handshake's publications were not repeated
            assert [(b["start"], b["trades"], b["revision"]) for b in after] == [(now, 2, 0), (now - 60, 3, 1)]
    finally:
        service.read = real_read
    assert published


def test_coarser_interval_follows_1m_updates(live_client, engine, cache, instrument) -> None:
    now = _now_bucket()
    bucket = now - now % 300
    with live_client.websocket_connect(f"/v1/stream?instrument={instrument}&interval=5m&since={bucket}") as ws:
        snapshot, _ = _bars_until_live(ws)
        assert snapshot == []
        _publish(engine, cache, forming=[_stream_bar(instrument, now, "80", trades=4)])
        got = _receive(ws)["bar"]
        assert (got["interval"], got["start"], got["trades"], got["final"]) == ("5m", bucket, 4, False)


def test_without_redis_the_store_is_polled(engine: Engine, database_url: str, instrument: str) -> None:
    app = _app(database_url, None)
    client = _client(app, None)
    try:
        now = _now_bucket()
        with client.websocket_connect(f"/v1/stream?instrument={instrument}&interval=1m&since={now - 120}") as ws:
            snapshot, live = _bars_until_live(ws)
            assert snapshot == [] and live["mode"] == "poll"
            BarStore(engine).upsert_bars([_stream_bar(instrument, now - 60, "90")])
            assert _receive(ws)["bar"]["start"] == now - 60
            BarStore(engine).upsert_bars([replace(_stream_bar(instrument, now - 60, "91"), final=True)])
            got = _receive(ws)["bar"]
            assert (got["close"], got["final"]) == ("91", True)
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("interval=1m", "missing parameter 'instrument'"),
        ("instrument=coinbase:BTC-USD&interval=2m", "invalid interval '2m'"),
        ("instrument=not an id&interval=1m", "invalid instrument"),
        ("instrument=coinbase:BTC-USD&since=yesterday", "invalid since"),
        ("instrument=coinbase:BTC-USD&since=4000000000", "in the future"),
        ("instrument=coinbase:BTC-USD&since=1300000000", "use GET /v1/ohlcv"),
        ("instrument=coinbase:BTC-USD&foo=1", "unknown parameter(s): foo"),
    ],
)
def test_bad_params_close_with_1008(live_client, query: str, reason: str) -> None:
    with live_client.websocket_connect(f"/v1/stream?{query}") as ws, pytest.raises(WebSocketDisconnect) as exc:
        _receive(ws)
    assert exc.value.code == 1008
    assert reason in exc.value.reason
