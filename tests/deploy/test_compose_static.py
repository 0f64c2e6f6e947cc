"""deploy/ validated statically: no Docker engine runs here, and this docker client has no compose plugin.

- compose.yaml against the compose-spec JSON schema (the copy vendored in the `check-jsonschema`
  wheel, `vendor.compose-spec`), after the variables are interpolated as compose does;
- every image pinned by version; the Dockerfile's base image too;
- every command of the candlekeep image against the CLI that runs it (argparse of `candlekeep`,
  the uvicorn factory, the Dagster module and workspace file);
- Prometheus scrapes every /metrics port the compose file opens, and nothing else;
- deploy/dagster/dagster.yaml loads as a Dagster instance (Dagster's own config schema), with the
  repository's storage and concurrency (the `cryptocompare` pool) and a run launcher that passes on
  every CANDLEKEEP_* setting the services get;
- the Grafana dashboard is valid JSON on the provisioned datasource.
The process-layout test (test_compose_layout.py) runs what these files describe.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import psycopg
import pytest
import yaml

from candlekeep.cli import _parser
from candlekeep.storage.db import with_database
from streaming.runner import DAEMONS
from tests.utils.compose import COMPOSE_FILE, ComposeError, interpolate, load_compose

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# What an operator must provide (compose refuses to start without them).
REQUIRED = {"CANDLEKEEP_API_KEYS": "ck_compose_user", "CANDLEKEEP_PROMETHEUS_API_KEY": "ck_compose_prometheus"}


def compose_schema() -> dict:
    import check_jsonschema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def candlekeep_services(compose) -> dict[str, dict]:
    image = compose.data["x-candlekeep"]["image"]
    return {name: s for name, s in compose.services.items() if s.get("image") == image}


def test_compose_file_matches_the_compose_spec_schema() -> None:
    compose = load_compose(REQUIRED)
    schema = compose_schema()
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(compose.data), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_broken_file() -> None:
    """The check above can fail: a misspelt key and a wrong type are both errors."""
    compose = load_compose(REQUIRED).data
    broken = {**compose, "services": {**compose["services"], "redis": {**compose["services"]["redis"],
                                                                        "healthcheck": {"test": 5}, "restrat": "no"}}}  # fmt: skip
    errors = list(jsonschema.Draft202012Validator(compose_schema()).iter_errors(broken))
    assert len(errors) >= 2


def test_required_secrets_are_refused_when_missing() -> None:
    with pytest.raises(ComposeError, match="CANDLEKEEP_API_KEYS"):
        load_compose({})
    assert interpolate("a$${B}${C:-c}${D-d}", {"D": ""}) == "a${B}c"


def test_every_image_is_pinned_by_version() -> None:
    compose = load_compose(REQUIRED)
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    for name, service in compose.services.items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned"
    assert compose.data["x-candlekeep"]["image"] == f"candlekeep:{version}"  # the package's version
    froms = re.findall(r"^FROM\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert froms and all(re.search(r":\d+\.\d+\.\d+", f) for f in froms), froms


def test_every_command_runs_on_the_cli_it_names() -> None:
    compose = load_compose(REQUIRED)
    services = candlekeep_services(compose)
    assert {"migrate", "api", "dagster-code", "dagster-webserver", "dagster-daemon", "producer", "aggregator",
            "coordinator", "dynamic", "replayer", "books"} <= services.keys()  # fmt: skip
    for name, service in services.items():
        argv = service["command"]
        if argv[0] == "candlekeep":
            args = _parser().parse_args(argv[1:])  # argparse exits (a failure here) on a bad command
            if argv[1] == "stream":
                assert args.daemon in DAEMONS, name
        elif argv[0] == "uvicorn":
            module, _, attribute = argv[argv.index("--factory") + 1].partition(":")
            assert callable(getattr(importlib.import_module(module), attribute))
        elif argv[0] in ("dagster", "dagster-webserver", "dagster-daemon"):
            if "-m" in argv:
                assert hasattr(importlib.import_module(argv[argv.index("-m") + 1]), "defs")
            if "-w" in argv:  # the image holds the repository at /app
                workspace = ROOT / Path(argv[argv.index("-w") + 1]).relative_to("/app")
                (location,) = yaml.safe_load(workspace.read_text())["load_from"]
                server = compose.services[location["grpc_server"]["host"]]
                assert str(location["grpc_server"]["port"]) == server["command"][server["command"].index("-p") + 1]
        else:
            raise AssertionError(f"{name}: unknown program {argv[0]}")


def metrics_ports(compose) -> dict[str, int]:
    """service -> the port its /metrics is served on, from its command."""
    ports = {}
    for name, service in candlekeep_services(compose).items():
        argv = service["command"]
        if argv[:2] == ["candlekeep", "stream"]:
            ports[name] = int(argv[argv.index("--port") + 1])
        elif argv[0] == "uvicorn":
            ports[name] = int(argv[argv.index("--port") + 1])
    return ports


def test_prometheus_scrapes_every_metrics_endpoint_and_nothing_else() -> None:
    compose = load_compose(REQUIRED)
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.partition(":")
                targets[host] = int(port)
        for dns in job.get("dns_sd_configs", []):
            for host in dns["names"]:
                targets[host] = int(dns["port"])
        if job["job_name"] == "api":  # beyond loopback /metrics needs a key: the compose secret
            secret = job["authorization"]["credentials_file"].removeprefix("/run/secrets/")
            assert secret in compose.services["prometheus"]["secrets"]
            assert compose.data["secrets"][secret]["environment"] == "CANDLEKEEP_PROMETHEUS_API_KEY"
    assert targets == metrics_ports(compose)
    # Replicated services are found through DNS (every replica), never as one static target.
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            assert all(compose.replicas(t.partition(":")[0]) == 1 for t in static["targets"])


@pytest.fixture
def dagster_pg_url(pg_admin_url: str) -> Iterator[str]:
    name = f"dagster_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_admin_url, name)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_containers_dagster_instance_loads_and_keeps_the_pool(dagster_pg_url, tmp_path, monkeypatch) -> None:
    import dagster as dg

    repo = yaml.safe_load((ROOT / "pipelines" / "dagster.yaml").read_text())
    deploy = yaml.safe_load((DEPLOY / "dagster" / "dagster.yaml").read_text())
    # The same storage and the same concurrency (the cryptocompare pool) as `candlekeep up`.
    assert deploy["storage"] == repo["storage"] and deploy["concurrency"] == repo["concurrency"]
    compose = load_compose(REQUIRED)
    settings = {k for k in compose.data["x-environment"] if k.startswith("CANDLEKEEP_")}
    launcher = deploy["run_launcher"]["config"]
    assert set(launcher["env_vars"]) == settings  # a run container gets every setting the services get
    assert launcher["network"] == compose.data["networks"]["default"]["name"]
    # The Dockerfile puts this file in DAGSTER_HOME, which compose sets.
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'cp deploy/dagster/dagster.yaml "$DAGSTER_HOME/dagster.yaml"' in dockerfile
    assert re.search(r"DAGSTER_HOME=(\S+)", dockerfile).group(1) == compose.data["x-environment"]["DAGSTER_HOME"]

    shutil.copyfile(DEPLOY / "dagster" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    scheme, _, rest = dagster_pg_url.partition("://")
    monkeypatch.setenv("CANDLEKEEP_DAGSTER_PG_URL", f"postgresql+psycopg2://{rest}")
    with dg.DagsterInstance.get() as instance:  # Dagster validates the file against its schema here
        assert type(instance.run_launcher).__name__ == "DockerRunLauncher"
        assert instance.run_launcher.networks == ["candlekeep"]
        assert set(instance.run_launcher.env_vars) == settings
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 1
        assert concurrency.run_queue_config.max_concurrent_runs == 4


def test_compose_database_urls_name_the_compose_services() -> None:
    """The endpoints the layout test swaps are exactly these, and they point at compose services."""
    compose = load_compose(REQUIRED)
    env = compose.data["x-environment"]
    for key in ("CANDLEKEEP_DATABASE_URL", "CANDLEKEEP_DAGSTER_PG_URL", "CANDLEKEEP_REDIS_URL"):
        assert urlsplit(env[key]).hostname in compose.services, key
    host = env["CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS"].partition(":")[0]
    aliases = {a for s in ("kafka", "redpanda") for a in compose.services[s]["networks"]["default"]["aliases"]}
    assert aliases == {host}
    assert {tuple(compose.services[s]["profiles"]) for s in ("kafka", "redpanda")} == {("kafka",), ("redpanda",)}
    assert "COMPOSE_PROFILES=kafka" in (DEPLOY / ".env").read_text().splitlines()


def test_grafana_dashboard_is_provisioned_from_the_prometheus_datasource() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "candlekeep.json").read_text())
    datasources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert urlsplit(source["url"]).hostname == "prometheus"
    titles = {p["title"] for p in dashboard["panels"]}
    for topic in ("Ingest lag", "Bars written", "API latency", "Daemon states"):
        assert any(t.startswith(topic) for t in titles), topic
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
        assert all(t["datasource"]["uid"] == source["uid"] and t["expr"] for t in panel["targets"])
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "candlekeep.yaml").read_text())
    compose = load_compose(REQUIRED)
    mounts = dict(v.split(":")[:2] for v in compose.services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert all((COMPOSE_FILE.parent / local).exists() for local in mounts)


def dashboard_metric_names() -> set[str]:
    """Metric names the dashboard queries, as exported (histogram and counter suffixes removed)."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "candlekeep.json").read_text())
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b(candlekeep_[a-z0-9_]+)\b(?!\s*=)", target["expr"]):
                names.add(re.sub(r"_(bucket|count|sum|total)$", "", name))
    return names


def test_every_metric_the_dashboard_queries_is_defined_in_the_code() -> None:
    """Statically: each name appears in a metric definition of the source tree (the layout test also
    scrapes them from the running processes)."""
    defined: set[str] = set()
    for path in (p for d in ("streaming", "api", "candlekeep") for p in (ROOT / d).rglob("*.py")):
        source = path.read_text()
        literal = set(re.findall(r'"(candlekeep_[a-z0-9_]+?)_?"', source))
        defined |= literal  # Counter("candlekeep_api_requests", ...), or a prefix `p = "candlekeep_producer_"`
        defined |= {f"{p}_{n}" for p in literal for n in re.findall(r'f"\{p\}_?([a-z0-9_]+)"', source)}
    state = {f"candlekeep_{d}_state" for d in DAEMONS}  # StateMachine's Enum per daemon
    missing = dashboard_metric_names() - defined - state
    assert not missing, missing
