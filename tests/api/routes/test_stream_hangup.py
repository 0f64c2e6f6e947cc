"""A client that goes away ends its `WS /v1/stream` handler, on a real uvicorn process with real Redis.

The truth is Redis's own count of subscribers on the handler's updates channel (PUBSUB NUMSUB): 1
while the client listens, 0 soon after it leaves. For a live symbol and a replay symbol alike, and
whether the client says goodbye (a close frame) or just drops the connection. A handler that
noticed the client only at its next send kept its subscription, Redis connection and task until the
channel's next message. A stopped replay session never publishes again, so that was forever, and
uvicorn's graceful shutdown waited on it too.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import redis
import websocket
from sqlalchemy import Engine

from candlekeep.bars import NS_PER_S
from candlekeep.cache import updates_channel
from candlekeep.replay_bars import updates_channel as replay_updates_channel
from candlekeep.storage.replay_sessions import ReplaySessionStore
from tests.utils.api_server import api_process
from tests.utils.replay import ETH, LATENESS_NS, stored_trades
from tests.utils.wait import eventually

START_S = 1_582_329_720  # inside ETH's recording (tests.utils.replay)


def _subscribers(client: redis.Redis, channel: str) -> int:
    ((_, count),) = client.pubsub_numsub(channel)
    return int(count)


def _listen(url: str) -> websocket.WebSocket:
    """Connected, past the snapshot: the handler is subscribed and waiting for updates."""
    ws = websocket.create_connection(url, timeout=10)
    while (message := json.loads(ws.recv()))["type"] != "live":
        assert message["type"] == "bar", message
    return ws


@pytest.mark.parametrize("leave", ["close-frame", "drop"])
def test_a_client_that_leaves_takes_its_subscription_with_it(engine: Engine, database_url: str, redis_url: str,
                                                             tmp_path: Path, leave: str) -> None:  # fmt: skip
    stored_trades(engine)
    session = ReplaySessionStore(engine).create(
        instruments=[ETH], start_ns=START_S * NS_PER_S, end_ns=(START_S + 180) * NS_PER_S, speed=10.0,
        lateness_ns=LATENESS_NS, max_active=8, wall_ns=time.time_ns())  # fmt: skip
    live = f"test:H{uuid.uuid4().hex[:8].upper()}-USD"
    streams = {
        f"/v1/stream?instrument={live}&interval=1m": updates_channel(live, "1m"),
        f"/v1/stream?instrument=replay:{session.id}:{ETH}&interval=1m": replay_updates_channel(session.id, ETH, "1m"),
    }
    client = redis.Redis.from_url(redis_url)
    env = {"CANDLEKEEP_REDIS_URL": redis_url, "CANDLEKEEP_API_RATE_LIMIT_PER_MINUTE": "0"}
    try:
        with api_process(database_url, tmp_path / "api.log", **env) as base:
            ws_base = base.replace("http://", "ws://")
            for path, channel in streams.items():
                ws = _listen(ws_base + path)
                assert _subscribers(client, channel) == 1, path
                if leave == "close-frame":
                    ws.close()
                else:
                    ws.sock.close()  # no close frame: the peer just goes
                eventually(lambda channel=channel: _subscribers(client, channel) == 0, timeout=10,
                           what=f"the handler of {path} to unsubscribe once its client left")  # fmt: skip
    finally:
        client.close()
