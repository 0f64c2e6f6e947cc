"""`candlekeep up` on the embedded defaults, as a new user meets it (issue 8, items 7-9): no Kafka and no
configured Redis. The real process layout: Dagster webserver and daemon, one process holding the API
and the streaming daemons over the in-process bus (streaming/together.py), the embedded Redis.

- the banner is printed once the Dagster UI and the API both answer;
- `WS /v1/stream` shows the forming bar within 1 s of each trade (truth: the trades' own timestamps
  in `ticks`, written by the aggregator), told apart from closed bars by `state`;
- a missing past range is fetched on demand and answered within `wait` (truth: the simulator's bars);
- a garbage instrument is refused with 404 and creates nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import requests
from websockets.sync.client import connect

from candlekeep.bars import Interval
from candlekeep.instruments import Instrument
from candlekeep.sources.simulator import Simulator
from tests.utils.net import free_port

ROOT = Path(__file__).resolve().parents[2]
BTC = "cccagg:BTC-USD"
WATCH_S = 45


def _wait_for_banner(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Candlekeep is up" in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"candlekeep up exited early:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no banner within {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_up_on_the_embedded_defaults(engine: object, database_url: str, tmp_path: Path) -> None:
    api_port, dagster_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CANDLEKEEP_", "DAGSTER_"))}
    env |= {"CANDLEKEEP_DATABASE_URL": database_url, "CANDLEKEEP_DATA_DIR": str(tmp_path / "data"),
            "CANDLEKEEP_API_PORT": str(api_port), "CANDLEKEEP_DAGSTER_PORT": str(dagster_port),
            "CANDLEKEEP_STREAM_PORT_BASE": "0", "CANDLEKEEP_INSTRUMENTS": BTC, "PYTHONPATH": str(ROOT)}  # fmt: skip
    log = tmp_path / "up.log"
    api = f"http://127.0.0.1:{api_port}"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "candlekeep.cli", "up"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_for_banner(proc, log)
        # Item 9: the printed links answer the moment the banner is out.
        assert requests.get(f"{api}/openapi.json", timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{dagster_port}/server_info", timeout=5).status_code == 200

        # Item 8: the forming bar, live, within 1 s of each trade.
        received: list[tuple[float, dict]] = []
        connected_at = time.time()
        with connect(f"ws://127.0.0.1:{api_port}/v1/stream?instrument={BTC}&interval=1m", open_timeout=10) as ws:
            deadline = time.monotonic() + WATCH_S
            while time.monotonic() < deadline:
                try:
                    raw = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    break
                received.append((time.time(), json.loads(raw)))
        live = [m for _, m in received if m["type"] == "live"]
        assert live and live[0]["mode"] == "redis", received[:3]
        forming = [(at, m["bar"]) for at, m in received if m["type"] == "bar" and m["state"] == "forming"]
        assert all(not b["final"] for _, b in forming)
        assert {m["state"] for _, m in received if m["type"] == "bar"} <= {"forming", "provisional", "final"}
        trades = _trades_after(database_url, connected_at + 0.5, time.time() - 1.5)
        assert len(trades) >= 5, "the simulator plays about 21 BTC trades a minute"
        for ts, minute, k in trades:
            seen = [at for at, b in forming if b["start"] == minute and (b["trades"] or 0) >= k]
            assert seen, f"trade {k} of minute {minute} at {ts} never showed in a forming bar"
            assert min(seen) - ts < 1.0, f"trade {k} of minute {minute} showed {min(seen) - ts:.2f} s later"

        # Item 7: a missing past range is fetched on demand and answered within `wait`.
        start = Interval.H1.floor(int(time.time())) - 2 * 86_400
        began = time.monotonic()
        answer = requests.get(f"{api}/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "start": start,
                                                          "end": start + 3600, "wait": 25}, timeout=40)  # fmt: skip
        assert answer.status_code == 200 and time.monotonic() - began < 27
        body = answer.json()
        assert body["complete"], body["gaps"]
        truth = [b for page in Simulator(0).bars(Instrument.parse(BTC), Interval.M1, start, start + 3600) for b in page]
        assert [(b["time"], b["close"]) for b in body["bars"]] == [(b.start, str(b.close)) for b in truth]

        # Item 1 at the front door: garbage is refused, nothing created.
        garbage = requests.get(f"{api}/v1/ohlcv", params={"instrument": "cccagg:FOO-BAR", "interval": "1m",
                                                           "start": start, "end": start + 60}, timeout=10)  # fmt: skip
        assert garbage.status_code == 404 and "cccagg:FOO-BAR" in garbage.json()["detail"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(90)
    assert proc.returncode == 0, log.read_text()[-4000:]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM instruments WHERE id = 'cccagg:FOO-BAR'").fetchone()[0] == 0


def _trades_after(database_url: str, since: float, until: float) -> list[tuple[float, int, int]]:
    """(ts, minute start, rank within its minute) of the BTC trades with since <= ts < until, from `ticks`."""
    deadline = time.monotonic() + 90  # the aggregator writes ticks at each flush (a minute's close at most)
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT extract(epoch FROM ts)::float8, rank FROM (SELECT ts, row_number() OVER "
                "(PARTITION BY date_trunc('minute', ts) ORDER BY ts, trade_id) AS rank FROM ticks "
                "WHERE instrument = %s AND ts >= to_timestamp(%s) - interval '1 minute') t "
                "WHERE ts >= to_timestamp(%s) AND ts < to_timestamp(%s) ORDER BY ts",
                (BTC, since, since, until),
            ).fetchall()
            newest = conn.execute("SELECT max(ts) FROM ticks WHERE instrument = %s", (BTC,)).fetchone()[0]
            if newest is not None and newest >= datetime.fromtimestamp(until, UTC):
                return [(ts, int(ts // 60) * 60, int(rank)) for ts, rank in rows]
            assert time.monotonic() < deadline, "ticks were not written"
            time.sleep(1)
