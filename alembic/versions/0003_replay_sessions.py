"""Replay sessions: each replay's state, replay clock, position, speed and progress.

Revision ID: 0003
Revises: 0005
Create Date: 2026-12-02

One row per session (candlekeep.storage.replay_sessions; the pure rules are candlekeep/replay.py).
Times that are replay clocks or stream positions are bigint unix nanoseconds (exact, the log's own
resolution); bookkeeping times are timestamptz. The API writes the verbs (state, speed, seek) and
the replayer writes progress, each with a conditional UPDATE, so neither overwrites the other.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
# Chained after the event-time branch's 0005 (merged in first), so there is one head.
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REPLAY_SESSIONS = """
CREATE TABLE replay_sessions (
    id text PRIMARY KEY,
    instruments text[] NOT NULL,
    bar_instruments text[] NOT NULL DEFAULT '{}',
    start_ns bigint NOT NULL,
    end_ns bigint NOT NULL,
    speed double precision,
    lateness_ns bigint NOT NULL,
    state text NOT NULL,
    clock_ns bigint NOT NULL,
    anchor_wall_ns bigint,
    position_ns bigint NOT NULL,
    position_instrument text NOT NULL DEFAULT '',
    position_rank smallint NOT NULL DEFAULT -1,
    position_trade_id text NOT NULL DEFAULT '',
    seek_epoch integer NOT NULL DEFAULT 0,
    messages_sent bigint NOT NULL DEFAULT 0,
    trades_sent bigint NOT NULL DEFAULT 0,
    trades_total bigint NOT NULL,
    bars_total bigint NOT NULL DEFAULT 0,
    rate double precision NOT NULL DEFAULT 0,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT replay_sessions_state_valid
        CHECK (state IN ('created','running','paused','stopped','finished','error')),
    CONSTRAINT replay_sessions_range_valid CHECK (end_ns > start_ns),
    CONSTRAINT replay_sessions_speed_positive CHECK (speed IS NULL OR speed > 0)
)"""


def upgrade() -> None:
    op.execute(REPLAY_SESSIONS)


def downgrade() -> None:
    op.execute("DROP TABLE replay_sessions")
