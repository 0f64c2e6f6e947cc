"""`GET /health`: the database and its migrations, Redis, Kafka, and each streaming daemon's state.

`status` (and the HTTP code: 200 ok, 503 degraded) says whether the API can serve: the database is
reachable and migrated, and Redis and Kafka answer when they are configured. The daemons are
reported, not judged: the API serves stored history without them, and a load balancer must not pull
it out because a producer is reconnecting. Each daemon's own `/health` is read on
127.0.0.1:CANDLEKEEP_STREAM_PORT_BASE + i (producer, aggregator, coordinator, dynamic); "unreachable"
when nothing answers there. Every probe has a timeout of about a second, and the daemons are probed
in parallel.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field
from sqlalchemy import text

from api.deps import EngineDep, SettingsDep
from api.schemas import HealthPublic as _HealthBase
from candlekeep.storage.migrate import current_revision, head_revision

DAEMONS = ("producer", "aggregator", "coordinator", "dynamic")  # port base + index (streaming.runner)
PROBE_TIMEOUT_S = 1.0
KAFKA_TIMEOUT_S = 1.5

router = APIRouter(tags=["operations"])


# Shapes of this route (move next to HealthPublic in api/schemas.py when convenient).
class DaemonPublic(BaseModel):
    state: str = Field(description="the daemon's state, or unreachable | unknown port", examples=["streaming"])
    healthy: bool | None = Field(description="the daemon's own verdict; null when it did not answer")
    url: str | None = Field(description="where its /health was read", examples=["http://127.0.0.1:9101/health"])
    since: str | None = Field(default=None, description="when it entered this state (ISO-8601 UTC)")
    detail: str | None = Field(default=None, description="why it is unreachable, when it is")


class HealthDetailPublic(_HealthBase):
    kafka: str = Field(description="ok | not configured | error: ...", examples=["not configured"])
    storage: str = Field(default="ok", description="ok | error: what the TimescaleDB license cannot serve "
                         "(compressed chunks, continuous aggregates under the apache license)", examples=["ok"])
    daemons: dict[str, DaemonPublic] = Field(description="producer, aggregator, coordinator, dynamic")


@router.get(
    "/health",
    response_model=HealthDetailPublic,
    summary="Database, migrations, Redis, Kafka and streaming daemons",
    responses={503: {"model": HealthDetailPublic, "description": "degraded: the API cannot serve fully"}},
)
def health(engine: EngineDep, settings: SettingsDep, response: Response) -> HealthDetailPublic:
    with ThreadPoolExecutor(max_workers=len(DAEMONS) + 1) as pool:
        daemon_futures = {name: pool.submit(_daemon_state, i, settings.stream_port_base)
                          for i, name in enumerate(DAEMONS)}  # fmt: skip
        kafka_future = pool.submit(_kafka_state, settings.kafka_bootstrap_servers)
        database, migrations = _database_state(engine)
        redis_state = _redis_state(settings.redis_url)
        kafka_state = kafka_future.result()
        daemons = {name: future.result() for name, future in daemon_futures.items()}
    storage = _storage_state(engine) if database == "ok" else "unknown"
    healthy = (
        database == "ok"
        and storage in ("ok", "unknown")
        and migrations == "current"
        and redis_state in ("ok", "not configured")
        and kafka_state in ("ok", "not configured")
    )
    if not healthy:
        response.status_code = 503
    return HealthDetailPublic(
        status="ok" if healthy else "degraded",
        database=database,
        migrations=migrations,
        redis=redis_state,
        kafka=kafka_state,
        storage=storage,
        daemons=daemons,
    )


def _storage_state(engine: object) -> str:
    """"ok", or the license conflicts (candlekeep.storage.db.license_conflicts) in one line."""
    from candlekeep.storage.db import license_conflicts

    try:
        problems = license_conflicts(engine)  # type: ignore[arg-type]
    except Exception as exc:  # health reports failures; it never raises them
        return _error(exc)
    return "error: " + "; ".join(problems) if problems else "ok"


def _database_state(engine: object) -> tuple[str, str]:
    database, migrations = "ok", "current"
    try:
        with engine.connect() as conn:  # type: ignore[attr-defined]
            conn.execute(text("SELECT 1"))
        current, head = current_revision(engine), head_revision()
        if current != head:
            migrations = f"behind ({current} -> {head})"
    except Exception as exc:  # health reports failures; it never raises them
        database, migrations = _error(exc), "unknown"
    return database, migrations


def _redis_state(url: str | None) -> str:
    if url is None:
        return "not configured"
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        client.ping()
        client.close()
        return "ok"
    except redis.RedisError as exc:
        return f"error: {exc}"


def _kafka_state(bootstrap: str | None) -> str:
    if not bootstrap:
        return "not configured"
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": int(KAFKA_TIMEOUT_S * 1000),
                             "log_level": 0, "logger": _Silent()})  # fmt: skip
        admin.list_topics(timeout=KAFKA_TIMEOUT_S)
        return "ok"
    except KafkaException as exc:
        return _error(exc)


class _Silent:
    """A logger for librdkafka that drops its connection-refused chatter (the state says it all)."""

    def log(self, *args: object, **kwargs: object) -> None:
        return None


def _daemon_state(index: int, port_base: int) -> DaemonPublic:
    if port_base <= 0:
        return DaemonPublic(state="unknown port", healthy=None, url=None,
                            detail="CANDLEKEEP_STREAM_PORT_BASE=0: the daemons picked free ports")  # fmt: skip
    url = f"http://127.0.0.1:{port_base + index}/health"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as reply:  # noqa: S310 (fixed loopback URL)
            body = json.loads(reply.read())
    except urllib.error.HTTPError as exc:  # 503: the daemon answered, unhealthy; its body says why
        try:
            body = json.loads(exc.read())
        except ValueError:
            return DaemonPublic(state="unreachable", healthy=None, url=url, detail=f"HTTP {exc.code}")
    except (OSError, ValueError) as exc:
        return DaemonPublic(state="unreachable", healthy=None, url=url, detail=_error(exc))
    if not isinstance(body, dict) or "state" not in body:
        return DaemonPublic(state="unreachable", healthy=None, url=url,
                            detail=f"something else answers there: {str(body)[:80]}")  # fmt: skip
    return DaemonPublic(
        state=str(body.get("state", "unknown")),
        healthy=body.get("healthy") if isinstance(body.get("healthy"), bool) else None,
        url=url,
        since=body.get("since"),
    )


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {exc}".splitlines()[0]
