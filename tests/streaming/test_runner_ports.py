"""`streaming.runner` ports: CANDLEKEEP_STREAM_PORT_BASE=0 means any free port for `stream all`, and a
taken port stops a daemon with one clear line, not a traceback. Real processes, real PostgreSQL."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from streaming.runner import DAEMONS, DEFAULT_PORTS

ROOT = Path(__file__).resolve().parents[2]


def _env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_")}
    return env | {"CANDLEKEEP_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT), **extra}


def test_a_taken_port_is_one_clear_line(engine: object, database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "streaming.runner", "coordinator", "--port", str(port)],
                              cwd=ROOT, env=_env(database_url), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "port is already in use" in done.stderr and "CANDLEKEEP_STREAM_PORT_BASE" in done.stderr


def test_stream_all_honours_port_base_zero(engine: object, database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "all.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "candlekeep.cli", "stream", "all"], cwd=ROOT,
                                env=_env(database_url, CANDLEKEEP_STREAM_PORT_BASE="0", CANDLEKEEP_INSTRUMENTS="cccagg:BTC-USD"),
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            ports: dict[str, int] = {}
            while len(ports) < len(DAEMONS) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
                ports = {m[0]: int(m[1]) for m in re.findall(r"([\w-]+) /health and /metrics on http://[\d.]+:(\d+)",
                                                              log.read_text())}  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    assert set(ports) == set(DAEMONS), log.read_text()[-2000:]
    assert not set(ports.values()) & set(DEFAULT_PORTS.values())
    assert len(set(ports.values())) == len(DAEMONS)
