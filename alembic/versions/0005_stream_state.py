"""Stream state for exactly-once bars on the log's clock; outages per instrument.

`stream_state` holds, per consumer group and instrument, what the aggregator's durable state
includes: the next offset of the instrument's `ticks` partition, the log's clock, the closed-until
bucket and an open gap. It is written last in each flush, after ticks, bars and outages (all
idempotent), so a restart resumes from it and skips the records it already holds: a disconnect
replayed twice would otherwise open a gap twice.

Outages become unique per (source, started_at, instruments): gaps are per instrument now, and two
instruments of one source often go quiet at the same heartbeat.

Revision ID: 0005
Revises: 0002
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STREAM_STATE = """
CREATE TABLE stream_state (
    consumer text NOT NULL,
    instrument text NOT NULL,
    topic text NOT NULL,
    "partition" integer NOT NULL,
    next_offset bigint NOT NULL,
    clock_ns bigint,
    closed_until bigint,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, instrument)
)"""


def upgrade() -> None:
    op.execute(STREAM_STATE)
    op.execute("ALTER TABLE outages DROP CONSTRAINT outages_source_started_at_key")
    op.execute("ALTER TABLE outages ADD CONSTRAINT outages_source_started_at_instruments_key"
               " UNIQUE (source, started_at, instruments)")


def downgrade() -> None:
    op.execute("ALTER TABLE outages DROP CONSTRAINT outages_source_started_at_instruments_key")
    op.execute("ALTER TABLE outages ADD CONSTRAINT outages_source_started_at_key UNIQUE (source, started_at)")
    op.execute("DROP TABLE IF EXISTS stream_state")
