"""The replay panel in real Chromium against issue 9's `/v1/replays` (enable at merge: the routes and
the replayer daemon of `stream all` come with that issue; on a main without them this module
fails at its first request, by design, rather than being skipped).

Stored ticks of a past hour (the simulator's own trades, written through TickStore as the
aggregator writes them) are replayed at 60x: the panel creates the session, starts it, and the
chart switches to `replay:<id>:<instrument>`. Pause holds the replay clock, resume moves it on,
seek puts it at the slider's time, stop ends the session; every clock is read from the API itself
(`GET /v1/replays/{id}`), not from the page, and compared with what the page shows.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

from candlekeep.instruments import resolve_instrument
from candlekeep.sources.simulator import Simulator
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.storage.ticks import TickStore
from tests.utils.wait import eventually
from tests.web.conftest import data_layer, shot, wait_for

SPEED = 60


def _seconds(value: object) -> float | None:
    """A session's time field as unix seconds (the API may give ISO-8601 or numbers)."""
    if isinstance(value, (int, float)):
        return value / 1e9 if value > 1e12 else float(value)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).timestamp()
    return None


def _clock(session: dict) -> float | None:
    return _seconds(session.get("clock", session.get("replay_clock")))


def _busy_instrument(hour: int, target: int) -> tuple[str, list]:
    """A fresh instrument whose simulated hour has over 100 trades, 10 of them after the seek target
    (the simulator's rate depends on the name, and some names are quiet at night)."""
    for _ in range(50):
        instrument = f"web:R{uuid.uuid4().hex[:6].upper()}-USD"
        trades = list(Simulator(seed=0).trades(resolve_instrument(instrument), hour * 10**9, (hour + 3600) * 10**9))
        if len(trades) > 100 and sum(t.ts_ns >= target * 10**9 for t in trades) >= 10:
            return instrument, trades
    raise AssertionError("no simulated instrument with over 100 trades in the hour in 50 names")


def _input(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M")


def test_replay_controls_move_the_replay_clock(api, simulator, session_engine, page) -> None:
    page, _ = page
    hour = int(time.time()) // 3600 * 3600 - 2 * 3600
    target = hour + 45 * 60
    instrument, trades = _busy_instrument(hour, target)
    InstrumentStore(session_engine).register([instrument])
    TickStore(session_engine).insert_trades(trades)

    page.goto(f"{api.url}/#instrument={instrument}&interval=1m")
    wait_for(page, "d.chart.loaded")
    page.fill("#replay-instruments", instrument)
    page.fill("#replay-start", _input(hour))
    page.fill("#replay-end", _input(hour + 3600))
    page.select_option("#replay-speed", str(SPEED))
    page.click("#replay-create")
    wait_for(page, "d.replay.session && d.replay.session.id", timeout_s=20)
    session_id = data_layer(page, "d.replay.session.id")

    def session() -> dict:
        return json.loads(api.get(f"/v1/replays/{session_id}"))

    assert session()["state"] == "created"
    wait_for(page, f"d.chart.instrument === 'replay:{session_id}:{instrument}'")

    page.click("#replay-do-start")
    eventually(lambda: session()["state"] == "running", timeout=20, what="the session running")
    c0 = eventually(lambda: _clock(session()), timeout=20, what="a replay clock")
    eventually(lambda: _clock(session()) > c0 + 10, timeout=20, what="the clock moving at 60x")

    page.click("#replay-do-pause")
    eventually(lambda: session()["state"] == "paused", timeout=10, what="paused")
    held = _clock(session())
    time.sleep(2.0)
    assert _clock(session()) == held  # pause holds the clock
    wait_for(page, f"d.replay.clock !== null && Math.abs(d.replay.clock - {held}) < 1", timeout_s=5)

    page.click("#replay-do-resume")
    eventually(lambda: _clock(session()) > held + 10, timeout=20, what="the clock moving after resume")

    sought_at = time.monotonic()
    page.evaluate(f"""() => {{ const s = document.getElementById('replay-seek'); s.value = '{target}';
        s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change')); }}""")

    def at_target() -> bool:
        # after the seek the clock runs on at SPEED from the target: never before it, and never
        # further past it than SPEED times the wall time since the slider moved (+1 s of slack)
        clock, elapsed = _clock(session()), time.monotonic() - sought_at
        return target <= clock <= target + SPEED * (elapsed + 1)

    eventually(at_target, timeout=20, what="the clock at the seek target")
    wait_for(page, f"d.replay.clock >= {target}", timeout_s=5)
    wait_for(page, "d.chart.bars.length > 0", timeout_s=30)  # the replay's own bars on the chart
    assert all(hour <= b["time"] < hour + 3600 for b in data_layer(page, "d.chart.bars"))
    shot(page, "#panel-replay", "replay.png")
    shot(page, "#panel-chart", "chart-replay.png")

    page.click("#replay-do-stop")
    eventually(lambda: session()["state"] in ("stopped", "finished"), timeout=10, what="stopped")
    assert data_layer(page, "d.replay.error") is None
