"""deploy/compose.yaml's process layout, run without containers on this machine's real services.

Every candlekeep-image service of the compose file is started as a process (as many as its
`replicas`), with the command and the environment the compose file gives it, read from the file
here so the two cannot drift apart. Only what containers provide differently is swapped, each swap
named below: the infrastructure endpoints (the test's PostgreSQL, Kafka broker and Redis instead of
the `timescaledb`, `broker` and `redis` services), DAGSTER_HOME, listen addresses (127.0.0.1, free
ports: the compose ports would collide on one host), the workspace file's gRPC address, and a topic
prefix of the test's own. TimescaleDB, the broker, Redis, Prometheus and Grafana are not started:
they are images, not our code.

Then: the migration ran once before the rest; each daemon answers /health; both API processes
serve; the Dagster webserver loaded the code location from the gRPC code server; the three
aggregators form one consumer group over the 6 partitions of `ticks`; live simulator bars reach
PostgreSQL; and every metric the Grafana dashboard queries is exported by a running process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import yaml
from confluent_kafka.admin import AdminClient

from candlekeep.storage.db import with_database
from streaming.runner import DAEMONS
from tests.deploy.test_compose_static import REQUIRED, candlekeep_services, dashboard_metric_names
from tests.utils.compose import load_compose
from tests.utils.net import free_port
from tests.utils.wait import eventually

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INFRA = ("CANDLEKEEP_DATABASE_URL", "CANDLEKEEP_DAGSTER_PG_URL", "CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS",
         "CANDLEKEEP_REDIS_URL")  # fmt: skip
# dagster.InstigationLogger (sensor and schedule `context.log`) always adds a coloredlogs console
# handler in this format, whatever --log-format says; the same record goes to Dagster's event log.
DAGSTER_INSTIGATION_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} - dagster - [A-Z]+ - ")
PROGRAMS = {  # the image's console scripts, run from this checkout (PYTHONPATH) with this venv
    "candlekeep": [sys.executable, "-m", "candlekeep.cli"],
    "uvicorn": [sys.executable, "-m", "uvicorn"],
    "dagster": [str(BIN / "dagster")],
    "dagster-webserver": [str(BIN / "dagster-webserver")],
    "dagster-daemon": [str(BIN / "dagster-daemon")],
}


@dataclass
class Process:
    service: str
    replica: int
    argv: list[str]
    port: int | None
    log: Path
    proc: subprocess.Popen = field(repr=False, default=None)  # type: ignore[assignment]

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:] if self.log.exists() else []
        return f"--- {self.service}#{self.replica} ({self.log}):\n" + "\n".join(text)


def rewrite(argv: list[str], *, workspace: Path, code_port: int) -> tuple[list[str], int | None]:
    """The compose command as a local process: the program from this venv, 127.0.0.1, a free port."""
    out, port = [*PROGRAMS[argv[0]]], None
    args = iter(argv[1:])
    for arg in args:
        out.append(arg)
        if arg in ("--host", "-h"):
            assert next(args) == "0.0.0.0"  # noqa: S104 (the compose value)
            out.append("127.0.0.1")
        elif arg in ("--port", "-p"):
            next(args)
            port = code_port if argv[0] == "dagster" else free_port()  # the code server, or its healthcheck
            out.append(str(port))
        elif arg == "-w":
            next(args)
            out.append(str(workspace))
    return out, port


@pytest.fixture
def databases(pg_admin_url: str) -> Iterator[tuple[str, str]]:
    """A fresh Candlekeep database (unmigrated: the `migrate` service does it) and a Dagster one."""
    names = [f"candlekeep_layout_{uuid.uuid4().hex[:10]}", f"dagster_layout_{uuid.uuid4().hex[:10]}"]
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        for name in names:
            conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_admin_url, names[0]), with_database(pg_admin_url, names[1])
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


@pytest.mark.slow
def test_the_compose_layout_runs_without_containers(databases, kafka_bootstrap: str, redis_url: str,
                                                    topic_prefix: str, tmp_path: Path) -> None:  # fmt: skip
    database_url, dagster_url = databases
    compose = load_compose(REQUIRED)
    services = candlekeep_services(compose)
    unknown = {n for n, s in services.items() if s["command"][:2] == ["candlekeep", "stream"]
               and s["command"][2] not in DAEMONS}  # fmt: skip
    assert not unknown, f"services running a daemon candlekeep does not have: {unknown}"

    dagster_home = tmp_path / "dagster-home"
    dagster_home.mkdir()
    shutil.copyfile(ROOT / "deploy" / "dagster" / "dagster.yaml", dagster_home / "dagster.yaml")  # as the Dockerfile
    code_port = free_port()
    workspace = yaml.safe_load((ROOT / "deploy" / "dagster" / "workspace.yaml").read_text())
    workspace["load_from"][0]["grpc_server"].update(host="127.0.0.1", port=code_port)
    workspace_file = tmp_path / "workspace.yaml"
    workspace_file.write_text(yaml.safe_dump(workspace))
    swaps = {
        "CANDLEKEEP_DATABASE_URL": database_url,
        "CANDLEKEEP_DAGSTER_PG_URL": "postgresql+psycopg2://" + dagster_url.split("://", 1)[1],
        "CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CANDLEKEEP_REDIS_URL": redis_url,
        "DAGSTER_HOME": str(dagster_home),
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CANDLEKEEP_", "DAGSTER_"))}
    base["PYTHONPATH"] = str(ROOT)

    def environment(service: str) -> dict[str, str]:
        env = compose.environment(service)
        assert set(INFRA) | {"DAGSTER_HOME"} <= env.keys(), service
        return {**base, **env, **swaps, "CANDLEKEEP_TOPIC_PREFIX": topic_prefix}

    def start(service: str, replica: int = 0) -> Process:
        argv, port = rewrite(services[service]["command"], workspace=workspace_file, code_port=code_port)
        process = Process(service, replica, argv, port, tmp_path / f"{service}-{replica}.log")
        # stderr is the log (checked line by line below); stdout is a command's output.
        with process.log.open("wb") as log, process.log.with_suffix(".out").open("wb") as out:
            process.proc = subprocess.Popen(argv, env=environment(service), cwd=ROOT, stdout=out, stderr=log,
                                            start_new_session=True)  # fmt: skip
        return process

    running: list[Process] = []
    try:
        # `migrate` first and to completion (compose: service_completed_successfully).
        migrate = start("migrate")
        assert migrate.proc.wait(120) == 0, migrate.tail()
        assert "database migrated to" in migrate.log.with_suffix(".out").read_text()
        # `dagster-code` next, until its compose healthcheck passes (the others wait: service_healthy).
        running.append(start("dagster-code"))
        check, _ = rewrite(services["dagster-code"]["healthcheck"]["test"][1:], workspace=workspace_file,
                           code_port=code_port)  # fmt: skip
        assert all(services[n]["depends_on"]["dagster-code"]["condition"] == "service_healthy"
                   for n in ("dagster-webserver", "dagster-daemon"))  # fmt: skip

        def code_server_healthy() -> bool:
            assert running[0].proc.poll() is None, running[0].tail()
            return subprocess.run(check, env=environment("dagster-code"), capture_output=True, timeout=60).returncode == 0

        eventually(code_server_healthy, timeout=180, what="the code server's healthcheck")
        for name in [n for n in services if n not in ("migrate", "dagster-code")]:
            running += [start(name, i) for i in range(compose.replicas(name))]

        def alive() -> None:
            dead = [p for p in running if p.proc.poll() is not None]
            assert not dead, "\n".join(p.tail() for p in dead)

        daemons = [p for p in running if services[p.service]["command"][:2] == ["candlekeep", "stream"]]
        apis = [p for p in running if p.service == "api"]
        assert len([p for p in daemons if p.service == "aggregator"]) == 3 and len(apis) == 2

        def every_daemon_answers() -> bool:
            alive()
            return all(get(f"http://127.0.0.1:{p.port}/health")[0] in (200, 503) for p in daemons)

        eventually(every_daemon_answers, timeout=180, what="every daemon's /health")
        key = {"X-API-Key": REQUIRED["CANDLEKEEP_API_KEYS"]}

        def answer(url: str, headers: dict[str, str]) -> tuple[int, bytes] | None:
            alive()
            status, body = get(url, headers)
            return (status, body) if status else None

        for api in apis:
            url = f"http://127.0.0.1:{api.port}/health"
            status, body = eventually(lambda url=url: answer(url, key), timeout=120, what=f"API #{api.replica}")
            assert status == 200, body
            assert json.loads(body)["database"] == "ok"
            # Beyond loopback the key is required; the compose file gives Prometheus its own.
            prometheus = {"Authorization": f"Bearer {REQUIRED['CANDLEKEEP_PROMETHEUS_API_KEY']}"}
            assert get(f"http://127.0.0.1:{api.port}/metrics", prometheus)[0] == 200

        # The webserver loaded the code location from the gRPC code server named in the workspace.
        (webserver,) = [p for p in running if p.service == "dagster-webserver"]
        query = json.dumps({"query": "{ workspaceOrError { ... on Workspace { locationEntries { name "
                                     "locationOrLoadError { __typename } } } } }"}).encode()  # fmt: skip

        def code_location_loaded() -> bool:
            alive()
            status, body = get(f"http://127.0.0.1:{webserver.port}/graphql", {"Content-Type": "application/json"}, query)
            if status != 200:
                return False
            entries = json.loads(body)["data"]["workspaceOrError"]["locationEntries"]
            return [(e["name"], (e["locationOrLoadError"] or {}).get("__typename")) for e in entries] == [
                ("candlekeep", "RepositoryLocation")]

        eventually(code_location_loaded, timeout=180, what="the candlekeep code location loaded over gRPC")

        # One consumer group, three members, the six partitions of `ticks` split between them.
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})

        def group_members() -> list:
            alive()
            (future,) = admin.describe_consumer_groups([f"{topic_prefix}aggregator"]).values()
            group = future.result(timeout=10)
            return group.members if len(group.members) == 3 and all(m.assignment.topic_partitions
                                                                    for m in group.members) else []  # fmt: skip

        members = eventually(group_members, timeout=120, what="3 aggregators in one group")
        partitions = sorted(tp.partition for m in members for tp in m.assignment.topic_partitions
                            if tp.topic == f"{topic_prefix}ticks")  # fmt: skip
        assert partitions == list(range(6))

        # Live simulator trades -> producer -> ticks -> aggregators -> bars (the first minute closes).
        def stream_bars() -> int:
            alive()
            with psycopg.connect(database_url, autocommit=True) as conn:
                return conn.execute("SELECT count(DISTINCT instrument) FROM bars WHERE source = 'stream'").fetchone()[0]

        instruments = compose.environment("producer")["CANDLEKEEP_INSTRUMENTS"].split(",")
        eventually(lambda: stream_bars() == len(instruments), timeout=240, what="stream bars of every instrument")  # fmt: skip

        # Every metric the dashboard queries is exported by a running process.
        exported: set[str] = set()
        for p in daemons + apis:
            status, body = get(f"http://127.0.0.1:{p.port}/metrics", key if p.service == "api" else None)
            assert status == 200, p.service
            exported |= {re.sub(r"_(bucket|count|sum|total|created)$", "", line.split("{")[0].split(" ")[0])
                         for line in body.decode().splitlines() if line and not line.startswith("#")}  # fmt: skip
        missing = dashboard_metric_names() - exported
        assert not missing, missing

        # The compose file sets CANDLEKEEP_LOG_FORMAT=json (and Dagster's --log-format json): every
        # line every process wrote is one JSON object, and the library noise is not there.
        assert compose.environment("aggregator")["CANDLEKEEP_LOG_FORMAT"] == "json"
        for p in [migrate, *running]:
            for line in p.log.read_text(errors="replace").splitlines():
                if p.service.startswith("dagster") and DAGSTER_INSTIGATION_LINE.match(line):
                    continue  # Dagster's sensor/schedule console logger: fixed text format, not configurable
                try:
                    event = json.loads(line)
                except ValueError:
                    raise AssertionError(f"{p.service}#{p.replica} wrote a line that is not JSON: {line[:300]}") from None
                assert isinstance(event, dict), line
                assert "Running commandline" not in line and "is currently in beta" not in line, line
    except BaseException:
        print("\n".join(p.tail() for p in running), file=sys.stderr)
        raise
    finally:
        for p in running:
            if p.proc.poll() is None:
                os.killpg(p.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 40
        for p in running:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait(10)
