"""Sensors: `instruments_sensor` keeps the `instruments` dynamic partitions in step with the instruments.

Every minute it reads the configured instruments (`CANDLEKEEP_INSTRUMENTS`) and the `instruments`
table (instruments the API or the coordinator registered) and adds the ids the Dagster instance
does not have yet as partitions. A partition whose instrument was untracked (its row says
tracked=false; `candlekeep untrack`, `DELETE /v1/instruments/{id}`) and is not configured is
removed, so no hourly run fails on it; its stored bars stay. The cursor holds the ids seen at the last tick (JSON list). If the
database cannot be reached, the configured instruments are still added and the tick says why.
"""


import json

import dagster as dg
from sqlalchemy.exc import SQLAlchemyError

from candlekeep.instruments import Instrument, InstrumentError
from pipelines.partitions import instruments_partitions
from pipelines.resources import CandlekeepResource


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def instruments_sensor(context: dg.SensorEvaluationContext, candlekeep: CandlekeepResource) -> dg.SensorResult:
    """Register new instruments (settings and the `instruments` table) as dynamic partitions."""
    configured = set(candlekeep.settings().instruments)
    wanted = set(configured)
    untracked: set[str] = set()
    try:
        stored = candlekeep.instrument_store().tracked_flags()
    except (SQLAlchemyError, OSError, RuntimeError) as exc:
        context.log.warning(f"instruments table unreadable, adding the configured instruments only: {exc}")
        stored = []
    for text, tracked in stored:
        try:
            iid = Instrument.parse(text).id
        except InstrumentError as exc:
            context.log.warning(f"skipping instrument {text!r} from the instruments table: {exc}")
            continue
        (wanted if tracked or iid in configured else untracked).add(iid)
    existing = set(context.instance.get_dynamic_partitions(instruments_partitions.name))
    new = sorted(wanted - existing)
    gone = sorted((untracked & existing) - wanted)
    cursor = json.dumps(sorted(wanted))
    requests = []
    if new:
        context.log.info(f"adding instrument partitions: {', '.join(new)}")
        requests.append(instruments_partitions.build_add_request(new))
    if gone:
        context.log.info(f"removing the partitions of untracked instruments: {', '.join(gone)}")
        requests.append(instruments_partitions.build_delete_request(gone))
    if not requests:
        return dg.SensorResult(skip_reason=f"all {len(wanted)} instruments are partitions already", cursor=cursor)
    return dg.SensorResult(dynamic_partitions_requests=requests, cursor=cursor)
