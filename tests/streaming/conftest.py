"""Streaming fixtures: one real Kafka broker per test run, unique topic names per test, a bus of each kind.

`kafka_broker` (session) is a `tests.utils.kafka.KafkaBroker`, started on first use from the jars of
`make kafka-jars`; if they are missing or the broker does not come up, the tests that need it fail
with the reason and the log file. Tests that stop or restart the broker must leave it running.
`topic_prefix` gives each test its own topic (and consumer group) names, so tests never see each
other's records; `bus` runs a test on the in-process bus and on Kafka.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from candlekeep.bus import Bus, InProcessBus, KafkaBus
from tests.utils.kafka import KafkaBroker, KafkaBrokerError


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    try:
        broker.start()
    except KafkaBrokerError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """`t<hex>-<test name>.`: unique per test, readable in broker logs, valid as a topic prefix."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", request.node.name)[:60]
    return f"t{uuid.uuid4().hex[:8]}-{name}."


@pytest.fixture(params=["inprocess", "kafka"])
def bus(request: pytest.FixtureRequest) -> Iterator[Bus]:
    if request.param == "kafka":
        instance: Bus = KafkaBus(request.getfixturevalue("kafka_bootstrap"))
    else:
        instance = InProcessBus()
    yield instance
    instance.close()
