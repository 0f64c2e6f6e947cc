"""The deploy tests use the streaming tests' real Kafka broker and per-test topic prefix."""

from tests.streaming.conftest import kafka_bootstrap, kafka_broker, topic_prefix  # noqa: F401
