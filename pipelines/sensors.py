"""Sensors: `instruments_sensor` keeps the `instruments` dynamic partitions in step with the instruments.

Every minute it reads the configured instruments (`CANDLEKEEP_INSTRUMENTS`) and the `instruments`
table (instruments the API or the coordinator registered) and adds the ids the Dagster instance
does not have yet as partitions. The cursor holds the ids seen at the last tick (JSON list). If the
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
    wanted = set(candlekeep.settings().instruments)
    try:
        stored = candlekeep.instrument_store().list_ids()
    except (SQLAlchemyError, OSError, RuntimeError) as exc:
        context.log.warning(f"instruments table unreadable, adding the configured instruments only: {exc}")
        stored = []
    for text in stored:
        try:
            wanted.add(Instrument.parse(text).id)
        except InstrumentError as exc:
            context.log.warning(f"skipping instrument {text!r} from the instruments table: {exc}")
    existing = set(context.instance.get_dynamic_partitions(instruments_partitions.name))
    new = sorted(wanted - existing)
    cursor = json.dumps(sorted(wanted))
    if not new:
        return dg.SensorResult(skip_reason=f"all {len(wanted)} instruments are partitions already", cursor=cursor)
    context.log.info(f"adding instrument partitions: {', '.join(new)}")
    return dg.SensorResult(dynamic_partitions_requests=[instruments_partitions.build_add_request(new)], cursor=cursor)
