"""Schemathesis against the API's own /openapi.json, on a real uvicorn process (`candlekeep up`'s command
line) over the test database: for every operation, generated requests (bounded: `MAX_EXAMPLES` each,
no shrinking past `DEADLINE`) must get no 5xx, a documented status code and content type, and a body
that matches the documented schema.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine

from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from tests.utils.api_server import api_process
from tests.utils.bars import make_bar

MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
T0 = 1_704_067_200


@pytest.fixture(scope="module")
def api_schema(session_engine: Engine, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    BarStore(session_engine).upsert_bars([make_bar("cccagg:BTC-USD", T0 + 60 * i, str(42000 + i)) for i in range(120)])
    InstrumentStore(session_engine).register(["cccagg:BTC-USD"], tracked=True)
    env = {"CANDLEKEEP_API_RATE_LIMIT_PER_MINUTE": "0", "CANDLEKEEP_STREAM_PORT_BASE": "0"}  # no Kafka, no Redis
    with api_process(database_url, tmp_path_factory.mktemp("schemathesis") / "api.log", **env) as base:
        yield schemathesis.openapi.from_url(base + "/openapi.json")


def test_the_api_conforms_to_its_openapi_schema(api_schema: schemathesis.schemas.BaseSchema) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10  # every route is in the schema
    failures: dict[str, str] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None)  # fmt: skip
        def run(case: schemathesis.Case) -> None:
            if case.query and "wait" in case.query:
                case.query["wait"] = 0  # nothing fetches here: a wait would only slow the run down
            case.call_and_validate(checks=CHECKS, timeout=30)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every operation runs; all failures reported
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
