"""`/v1/replays` over real PostgreSQL: every verb and every error code, with real trades stored
through TickStore (no replayer runs here: the rows are what the API owns)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.main import create_app
from candlekeep.bars import NS_PER_S
from candlekeep.settings import Settings
from tests.utils.net import LOOPBACK_PEER
from tests.utils.replay import BTC, ETH, stored_trades

START = "2020-02-22T00:01:00Z"
END = "2020-02-22T00:10:00Z"


@pytest.fixture
def client(engine: Engine, database_url: str) -> Iterator[TestClient]:
    stored_trades(engine)
    settings = Settings(database_url=database_url, redis_url=None, api_rate_limit_per_minute=0, replay_max_sessions=3,
                        topic_prefix="px.")  # fmt: skip
    with TestClient(create_app(settings), client=LOOPBACK_PEER) as test_client:
        yield test_client


def create(client: TestClient, **body) -> dict:
    answer = client.post("/v1/replays", json={"instruments": [BTC, ETH], "start": START, "end": END, "speed": 10,
                                              **body})  # fmt: skip
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_create_answers_201_with_the_session_in_created(client: TestClient) -> None:
    body = create(client)
    assert body["state"] == "created" and body["speed"] == 10
    assert body["instruments"] == [BTC, ETH] and body["bar_instruments"] == []
    assert body["start_ns"] == 1582329660 * NS_PER_S and body["clock_ns"] == body["start_ns"]
    assert body["position"]["trades_sent"] == 0
    # The stored trades of the range, counted from the CSV rows, not from the store.
    assert body["position"]["trades_total"] == count_csv_trades(1582329660, 1582330200)
    assert body["topics"] == {"ticks": f"px.replay.{body['id']}.ticks", "bars": f"px.replay.{body['id']}.bars"}
    assert body["symbols"] == [f"replay:{body['id']}:{BTC}", f"replay:{body['id']}:{ETH}"]
    assert client.get(f"/v1/replays/{body['id']}").json()["id"] == body["id"]
    assert [s["id"] for s in client.get("/v1/replays").json()["sessions"]] == [body["id"]]


def count_csv_trades(lo_s: int, hi_s: int) -> int:
    from tests.utils.replay import ETH_SHIFT_NS
    from tests.utils.trades import load_freqtrade, load_tardis

    btc = [t for t in load_tardis() if lo_s * NS_PER_S <= t.ts_ns < hi_s * NS_PER_S]
    eth = [t for t in load_freqtrade() if lo_s * NS_PER_S <= t.ts_ns + ETH_SHIFT_NS < hi_s * NS_PER_S]
    return len(btc) + len(eth)


def test_every_transition_and_the_clock_it_leaves(client: TestClient) -> None:
    sid = create(client)["id"]
    running = client.post(f"/v1/replays/{sid}/start").json()
    assert running["state"] == "running"
    time.sleep(0.3)
    paused = client.post(f"/v1/replays/{sid}/pause").json()
    assert paused["state"] == "paused"
    held = paused["clock_ns"]
    assert held >= running["start_ns"] + 2 * NS_PER_S  # 0.3 s at speed 10 is 3 simulated seconds
    time.sleep(0.2)
    assert client.get(f"/v1/replays/{sid}").json()["clock_ns"] == held  # held while paused
    resumed = client.post(f"/v1/replays/{sid}/resume").json()
    assert resumed["state"] == "running" and resumed["clock_ns"] >= held
    faster = client.patch(f"/v1/replays/{sid}", json={"speed": "max"}).json()
    assert faster["speed"] == "max" and faster["state"] == "running"
    sought = client.post(f"/v1/replays/{sid}/seek", json={"time": "2020-02-22T00:05:00.25Z"}).json()
    assert sought["clock_ns"] == 1582329900 * NS_PER_S + 250_000_000
    assert sought["position"]["at_ns"] == sought["clock_ns"]
    # Trades before the seek time count as sent (1 ms steps: the CSV has millisecond times).
    assert sought["position"]["trades_sent"] == count_csv_trades(1582329660, 1582329900) + csv_trades_between(
        1582329900 * NS_PER_S, 1582329900 * NS_PER_S + 250_000_000)  # fmt: skip
    stopped = client.post(f"/v1/replays/{sid}/stop").json()
    assert stopped["state"] == "stopped"


def csv_trades_between(lo_ns: int, hi_ns: int) -> int:
    from tests.utils.replay import ETH_SHIFT_NS
    from tests.utils.trades import load_freqtrade, load_tardis

    return (sum(1 for t in load_tardis() if lo_ns <= t.ts_ns < hi_ns)
            + sum(1 for t in load_freqtrade() if lo_ns <= t.ts_ns + ETH_SHIFT_NS < hi_ns))  # fmt: skip


@pytest.mark.parametrize("path, body", [("start", None), ("pause", None), ("resume", None), ("stop", None),
                                        ("seek", {"time": START})])  # fmt: skip
def test_an_unknown_session_is_404(client: TestClient, path: str, body) -> None:
    answer = client.post(f"/v1/replays/nope/{path}", json=body)
    assert answer.status_code == 404 and "nope" in answer.json()["detail"]
    assert client.get("/v1/replays/nope").status_code == 404
    assert client.patch("/v1/replays/nope", json={"speed": 2}).status_code == 404


def test_transitions_the_state_does_not_allow_are_409(client: TestClient) -> None:
    sid = create(client)["id"]
    for verb in ("pause", "resume"):
        answer = client.post(f"/v1/replays/{sid}/{verb}")
        assert answer.status_code == 409 and "created" in answer.json()["detail"]
    client.post(f"/v1/replays/{sid}/start")
    assert client.post(f"/v1/replays/{sid}/start").status_code == 409
    assert client.post(f"/v1/replays/{sid}/resume").status_code == 409
    client.post(f"/v1/replays/{sid}/stop")
    for verb in ("start", "pause", "resume", "stop"):
        answer = client.post(f"/v1/replays/{sid}/{verb}")
        assert answer.status_code == 409 and "stopped" in answer.json()["detail"]
    assert client.post(f"/v1/replays/{sid}/seek", json={"time": START}).status_code == 409
    assert client.patch(f"/v1/replays/{sid}", json={"speed": 5}).status_code == 409


@pytest.mark.parametrize("body, words", [
    ({"start": "2019-01-01", "end": "2019-01-02"}, "no stored ticks or bars"),
    ({"instruments": ["coinbase:DOGE-USD"]}, "coinbase:DOGE-USD"),
    ({"speed": 0}, "positive"),
    ({"speed": -3}, "positive"),
    ({"start": END, "end": START}, "after start"),
    ({"start": "yesterday"}, "invalid start"),
    ({"instruments": ["not an instrument!"]}, "invalid instrument"),
    ({"start": 2.7107347474130206e183, "end": 2.7107347474130206e183}, "out of range"),  # was a 500 (schemathesis)
    ({"end": "9999-12-31"}, "out of range"),
])  # fmt: skip
def test_bad_input_is_422_with_the_reason(client: TestClient, body: dict, words: str) -> None:
    answer = client.post("/v1/replays", json={"instruments": [BTC], "start": START, "end": END, "speed": 1, **body})
    assert answer.status_code == 422 and words in str(answer.json()["detail"])


def test_bad_speed_and_seek_time_are_422(client: TestClient) -> None:
    sid = create(client)["id"]
    assert client.patch(f"/v1/replays/{sid}", json={"speed": 0}).status_code == 422
    assert client.patch(f"/v1/replays/{sid}", json={"speed": "fast"}).status_code == 422
    answer = client.post(f"/v1/replays/{sid}/seek", json={"time": "2020-02-22T01:00:00Z"})
    assert answer.status_code == 422 and "outside" in answer.json()["detail"]


def test_the_sessions_cap_is_429_and_a_stopped_session_frees_its_place(client: TestClient) -> None:
    ids = [create(client)["id"] for _ in range(3)]
    answer = client.post("/v1/replays", json={"instruments": [BTC], "start": START, "end": END})
    assert answer.status_code == 429 and "cap is 3" in answer.json()["detail"]
    client.post(f"/v1/replays/{ids[0]}/stop")
    assert create(client)["state"] == "created"
