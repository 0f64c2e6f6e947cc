"""`GET /health`: the database and its migrations, Redis, Kafka, and each streaming daemon's state.

`status` (and the HTTP code: 200 ok, 503 degraded) says whether the API can serve: the database is
reachable and migrated, and Kafka answers when it is configured. Redis is a cache: the API serves
without it (slower), so Redis down is reported, never a 503. The daemons are
reported, not judged: the API serves stored history without them, and a load balancer must not pull
it out because a producer is reconnecting. Each daemon's own `/health` is read on
127.0.0.1:CANDLEKEEP_STREAM_PORT_BASE + i (producer, aggregator, coordinator, dynamic); "unreachable"
when nothing answers there. Every probe has a timeout of about a second, and the daemons are probed
in parallel.

Anonymous callers beyond loopback (no key; api.security marks the others `trusted`) get only
`{"status": ...}`, from one database ping shared by every such caller for `BRIEF_TTL_S`: cheap and
bounded, and no error text, socket path or daemon address reaches them.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import text

from api.deps import EngineDep, SettingsDep
from api.schemas import HealthPublic as _HealthBase
from candlekeep.storage.migrate import current_revision, head_revision

DAEMONS = ("producer", "aggregator", "coordinator", "dynamic")  # port base + index (streaming.runner)
PROBE_TIMEOUT_S = 1.0
KAFKA_TIMEOUT_S = 1.5
BRIEF_TTL_S = 2.0
KAFKA_OK_TTL_S = 5.0

router = APIRouter(tags=["operations"])


# Shapes of this route (move next to HealthPublic in api/schemas.py when convenient).
class DaemonPublic(BaseModel):
    state: str = Field(description="the daemon's state, or unreachable | unknown port", examples=["streaming"])
    healthy: bool | None = Field(description="the daemon's own verdict; null when it did not answer")
    url: str | None = Field(description="where its /health was read", examples=["http://127.0.0.1:9101/health"])
    since: str | None = Field(default=None, description="when it entered this state (ISO-8601 UTC)")
    detail: str | None = Field(default=None, description="why it is unreachable, when it is")


class HealthBriefPublic(BaseModel):
    status: str = Field(description="ok | degraded (the detail needs a key beyond loopback)", examples=["ok"])


class HealthDetailPublic(_HealthBase):
    kafka: str = Field(description="ok | not configured | error: ...", examples=["not configured"])
    storage: str = Field(default="ok", description="ok | error: what the TimescaleDB license cannot serve "
                         "(compressed chunks, continuous aggregates under the apache license)", examples=["ok"])
    daemons: dict[str, DaemonPublic] = Field(description="producer, aggregator, coordinator, dynamic")


@router.get(
    "/health",
    response_model=HealthDetailPublic | HealthBriefPublic,
    summary="Database, migrations, Redis, Kafka and streaming daemons",
    description="The full detail for loopback callers and callers with a key; `status` alone for others.",
    responses={503: {"model": HealthDetailPublic | HealthBriefPublic,
                     "description": "degraded: the API cannot serve fully"}},
)  # fmt: skip
def health(request: Request, engine: EngineDep, settings: SettingsDep,
           response: Response) -> HealthDetailPublic | HealthBriefPublic:  # fmt: skip
    if not request.scope.get("state", {}).get("trusted", False):
        ok = _brief(request.app.state, engine)
        if not ok:
            response.status_code = 503
        return HealthBriefPublic(status="ok" if ok else "degraded")
    with ThreadPoolExecutor(max_workers=len(DAEMONS) + 1) as pool:
        daemon_futures = {name: pool.submit(_daemon_state, i, settings.stream_port_base)
                          for i, name in enumerate(DAEMONS)}  # fmt: skip
        kafka_future = pool.submit(_kafka_state_cached, request.app.state, settings.kafka_bootstrap_servers)
        database, migrations = _database_state(engine)
        redis_state = _redis_state(settings.redis_url)
        kafka_state = kafka_future.result()
        daemons = {name: future.result() for name, future in daemon_futures.items()}
    storage = _storage_state(engine) if database == "ok" else "unknown"
    healthy = (
        database == "ok"
        and storage in ("ok", "unknown")
        and migrations == "current"
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
_brief_lock = threading.Lock()


def _brief(state: object, engine: object) -> bool:
    """Database reachable and migrated, probed at most once per BRIEF_TTL_S for all anonymous callers."""
    with _brief_lock:
        cached = getattr(state, "health_brief", None)
        if cached is not None and time.monotonic() - cached[0] < BRIEF_TTL_S:
            return cached[1]
        database, migrations = _database_state(engine)
        ok = database == "ok" and migrations == "current"
        state.health_brief = (time.monotonic(), ok)  # type: ignore[attr-defined]
        return ok


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


def _kafka_state_cached(state: object, bootstrap: str | None) -> str:
    """`_kafka_state`, an "ok" kept for KAFKA_OK_TTL_S: a broker client per call costs more than the
    rest of /health together, and a probe must stay cheap however often it is called."""
    cached = getattr(state, "health_kafka", None)
    if cached is not None and time.monotonic() - cached[0] < KAFKA_OK_TTL_S:
        return cached[1]
    value = _kafka_state(bootstrap)
    if value == "ok":
        state.health_kafka = (time.monotonic(), value)  # type: ignore[attr-defined]
    return value


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
