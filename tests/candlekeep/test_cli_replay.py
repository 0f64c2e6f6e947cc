"""`candlekeep replay ...` against a real PostgreSQL, over real trades stored through TickStore; the
progress bar follows a session that a real replayer (in-process bus) plays to the end."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import Engine

from candlekeep.bus import InProcessBus
from candlekeep.cli import main
from streaming.replayer import Replayer
from tests.utils.replay import BTC, ETH, running, stored_trades


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, engine: Engine, database_url: str) -> None:
    monkeypatch.setenv("CANDLEKEEP_DATABASE_URL", database_url)
    monkeypatch.setenv("CANDLEKEEP_REPLAY_MAX_SESSIONS", "2")
    stored_trades(engine)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["replay", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_verb_from_the_command_line(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "create", "--instrument", BTC, "--instrument", ETH, "--start", "2020-02-22T00:01:00Z",
                       "--end", "2020-02-22T00:10:00Z", "--speed", "10")  # fmt: skip
    assert code == 0 and " created " in out and "speed 10.0" in out
    sid = out.split()[0]
    assert run(capsys, "start", sid)[1].split()[1] == "running"
    assert run(capsys, "pause", sid)[1].split()[1] == "paused"
    code, out, _ = run(capsys, "seek", sid, "2020-02-22T00:05:00Z")
    assert code == 0 and "clock 2020-02-22T00:05:00.000000Z" in out
    assert "speed max" in run(capsys, "speed", sid, "max")[1]
    assert run(capsys, "resume", sid)[1].split()[1] == "running"
    assert run(capsys, "stop", sid)[1].split()[1] == "stopped"
    assert run(capsys, "status", sid)[1].split()[1] == "stopped"
    assert [line.split()[0] for line in run(capsys, "list")[1].splitlines()] == [sid]


@pytest.mark.parametrize("args, words", [
    (["start", "nope"], "no replay session 'nope'"),
    (["create", "--instrument", BTC, "--start", "2019-01-01", "--end", "2019-01-02"], "no stored ticks or bars"),
    (["create", "--instrument", BTC, "--start", "2020-02-22", "--end", "2020-02-23", "--speed", "0"], "positive"),
])  # fmt: skip
def test_bad_input_exits_2_with_the_reason(cli_env: None, capsys: pytest.CaptureFixture[str], args, words) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2 and words in err


def test_a_refused_transition_exits_2(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    sid = run(capsys, "create", "--instrument", BTC, "--start", "2020-02-22", "--end", "2020-02-23")[1].split()[0]
    code, _, err = run(capsys, "pause", sid)
    assert code == 2 and "cannot pause a session that is created" in err


def test_status_follow_shows_progress_until_the_session_ends(cli_env: None, engine: Engine,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    sid = run(capsys, "create", "--instrument", ETH, "--start", "2020-02-22T00:01:40Z", "--end",
              "2020-02-22T00:05:10Z", "--speed", "max")[1].split()[0]  # fmt: skip
    bus = InProcessBus()
    with running(Replayer(bus, engine)):
        run(capsys, "start", sid)
        code = main(["replay", "status", sid, "--follow"])
    out, err = capsys.readouterr()
    assert code == 0 and f"{sid}  finished" in out and "100.0%" in out
    assert re.search(r"replay \w+: .*100\.0%", err)  # tqdm's bar on stderr
    bus.close()
