"""`dagster dev` in the repository root, a Dagster user's first habit: it comes up (on a temporary
instance; `candlekeep up` keeps the real one in PostgreSQL), and its UI's GraphQL shows the served
1h / 1d bars as derived from `bars_1m`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.utils.net import free_port

ROOT = Path(__file__).resolve().parents[2]
LINEAGE = "{ assetNodes { assetKey { path } dependencyKeys { path } } }"


def test_dagster_dev_in_the_root_comes_up_and_shows_the_lineage(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CANDLEKEEP_", "DAGSTER_"))}
    env["PYTHONPATH"] = str(ROOT)
    before = set(ROOT.glob(".tmp_dagster_home_*"))
    log = (tmp_path / "dagster-dev.log").open("wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "dev", "-p", str(port)], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        nodes = None
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                reply = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": LINEAGE}, timeout=5)
                nodes = reply.json()["data"]["assetNodes"]
                if nodes:
                    break
            except (requests.RequestException, KeyError, TypeError, ValueError):
                pass
            time.sleep(1)
        assert nodes, f"dagster dev did not serve the assets:\n{(tmp_path / 'dagster-dev.log').read_text()[-3000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for left in set(ROOT.glob(".tmp_dagster_home_*")) - before:
            shutil.rmtree(left, ignore_errors=True)
    deps = {"/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]} for n in nodes}
    assert {"bars_1m", "bars_1h", "bars_1d"} <= set(deps)
    assert deps["ohlcv_1h"] == {"bars_1m", "bars_1h"}
    assert deps["ohlcv_1d"] == {"bars_1m", "bars_1d"}
