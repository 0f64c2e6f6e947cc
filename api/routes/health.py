"""`GET /health`: is the database reachable and migrated, and is Redis (when configured) up."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import text

from api.deps import EngineDep, SettingsDep
from api.schemas import HealthPublic
from candlekeep.storage.migrate import current_revision, head_revision

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthPublic, summary="Database, migrations and cache status")
def health(engine: EngineDep, settings: SettingsDep, response: Response) -> HealthPublic:
    database, migrations = "ok", "current"
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        current, head = current_revision(engine), head_revision()
        if current != head:
            migrations = f"behind ({current} -> {head})"
    except Exception as exc:  # health reports failures; it never raises them
        database, migrations = f"error: {type(exc).__name__}: {exc}".splitlines()[0], "unknown"
    redis_state = _redis_state(settings.redis_url)
    healthy = database == "ok" and migrations == "current" and redis_state in ("ok", "not configured")
    if not healthy:
        response.status_code = 503
    return HealthPublic(
        status="ok" if healthy else "degraded", database=database, migrations=migrations, redis=redis_state
    )


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
