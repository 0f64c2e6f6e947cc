"""`GET /v1/status`: what the dashboard's health panel shows beside `/health`: each registered
instrument's freshness (its newest stored 1m bar), the outages of the last `OUTAGE_DAYS` days, and
each streaming daemon's dead-letter counts by reason.

Freshness is read from `bars` (BarStore.latest_start), outages from `outages` (OutageStore.list),
and dead letters from each daemon's Prometheus `/metrics` (its `*_deadletters_total{reason}`
counters, probed in parallel on the ports `/health` uses, about a second each; null for a daemon
that does not answer, empty for one with none). Market data (bar times), so it needs a key
when keys are configured, like the data routes.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from api.deps import BarStoreDep, EngineDep, SettingsDep
from api.routes.health import DAEMONS, PROBE_TIMEOUT_S
from candlekeep.bars import Interval
from candlekeep.storage.instruments import InstrumentStore
from candlekeep.storage.outages import OutageStore

OUTAGE_DAYS = 7
MAX_OUTAGES = 20

router = APIRouter(prefix="/v1", tags=["operations"])


class FreshnessPublic(BaseModel):
    instrument: str = Field(examples=["cccagg:BTC-USD"])
    tracked: bool
    last_bar: int | None = Field(description="start of the newest stored 1m bar, unix seconds; null: none")
    age_s: int | None = Field(description="seconds from the end of that bar to now; null: no bar")


class OutagePublic(BaseModel):
    source: str
    started_at: str = Field(description="ISO-8601 UTC")
    ended_at: str | None = Field(description="ISO-8601 UTC; null while it lasts")
    instruments: list[str]
    reason: str


class StatusPublic(BaseModel):
    now: int = Field(description="the server's clock, unix seconds")
    instruments: list[FreshnessPublic]
    outages: list[OutagePublic] = Field(description=f"the last {OUTAGE_DAYS} days' outages, newest first (at most {MAX_OUTAGES})")
    deadletters: dict[str, dict[str, int] | None] = Field(
        description="per daemon: records sent to deadletter by reason; null when its /metrics did not answer"
    )


@router.get("/status", response_model=StatusPublic, summary="Instrument freshness, recent outages, dead-letter counts")
def status(engine: EngineDep, bar_store: BarStoreDep, settings: SettingsDep) -> StatusPublic:
    now = int(time.time())
    with ThreadPoolExecutor(max_workers=len(DAEMONS)) as pool:
        futures = {name: pool.submit(_deadletters, i, settings.stream_port_base) for i, name in enumerate(DAEMONS)}
        store = InstrumentStore(engine)
        tracked = set(store.list_ids(tracked_only=True))
        instruments = []
        for instrument in store.list_ids():
            last = bar_store.latest_start(instrument, Interval.M1)
            age = None if last is None else max(0, now - (last + Interval.M1.seconds))
            instruments.append(FreshnessPublic(instrument=instrument, tracked=instrument in tracked, last_bar=last, age_s=age))
        since = datetime.fromtimestamp(now, UTC) - timedelta(days=OUTAGE_DAYS)
        rows = OutageStore(engine).list(start=since)[::-1][:MAX_OUTAGES]
        deadletters = {name: future.result() for name, future in futures.items()}
    outages = [
        OutagePublic(source=o.source, started_at=_iso(o.started_at), ended_at=_iso(o.ended_at) if o.ended_at else None,
                     instruments=list(o.instruments), reason=o.reason)  # fmt: skip
        for o in rows
    ]
    return StatusPublic(now=now, instruments=instruments, outages=outages, deadletters=deadletters)


def deadletter_counts(metrics_text: str) -> dict[str, int]:
    """`{reason: count}` from a daemon's Prometheus text (empty: no dead-letter counter, or none sent)."""
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics_text):
        if not family.name.endswith("_deadletters"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                reason = sample.labels.get("reason", "")
                counts[reason] = counts.get(reason, 0) + int(sample.value)
    return counts


def _deadletters(index: int, port_base: int) -> dict[str, int] | None:
    if port_base <= 0:
        return None
    url = f"http://127.0.0.1:{port_base + index}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as reply:  # noqa: S310 (fixed loopback URL)
            return deadletter_counts(reply.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
