"""Replay sessions in PostgreSQL (`replay_sessions`, migration 0003): the one truth about each replay.

    store = ReplaySessionStore(engine)
    row = store.create(instruments=[...], start_ns=..., end_ns=..., speed=10.0, lateness_ns=2e9,
                       max_active=8, wall_ns=time.time_ns())        # NoStoredData, TooManySessions
    store.act(row.id, "pause", wall_ns=...)                         # SessionNotFound, TransitionNotAllowed
    store.seek(row.id, ts_ns, wall_ns=...); store.set_speed(row.id, None, wall_ns=...)
    store.get(row.id); store.list()
    # the replayer's side
    store.checkpoint(row.id, epoch=..., position=..., ...)          # False: a seek came in between

Two writers share a row and never overwrite each other. The API's verbs (state, speed, seek) run
in a transaction holding the row (`SELECT ... FOR UPDATE`) and compute the new clock with the pure
rules (candlekeep.replay). The replayer writes progress with a conditional UPDATE: only while the
session is still in the state it read and its `seek_epoch` is unchanged (a seek bumps it, so
progress of the stream before the seek is discarded, and the replayer re-reads from the new
position). The row's clock is the anchor (`clock_ns` at `anchor_wall_ns`), so every reader computes
the same replay clock, and the replayer paces by it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, text

from candlekeep.replay import (
    ACTIVE,
    SEEKABLE,
    Position,
    ReplayClock,
    SessionState,
    TransitionNotAllowed,
    next_state,
    progress,
)
from candlekeep.storage.replay_source import bar_interval, count_bars, count_trades

_COLUMNS = """id, instruments, bar_instruments, start_ns, end_ns, speed, lateness_ns, state, clock_ns,
    anchor_wall_ns, position_ns, position_instrument, position_rank, position_trade_id, seek_epoch,
    messages_sent, trades_sent, trades_total, bars_total, rate, error, created_at, updated_at"""


class SessionNotFound(LookupError):
    """No replay session has this id."""


class NoStoredData(ValueError):
    """The range has no stored ticks or bars for an instrument; the text names them."""


class TooManySessions(RuntimeError):
    """The cap on active sessions (created, running, paused, error) is reached."""


@dataclass(frozen=True)
class SessionRow:
    id: str
    instruments: list[str]
    bar_instruments: list[str]  # replayed from stored bars (no ticks in the range)
    start_ns: int
    end_ns: int
    speed: float | None  # None: max
    lateness_ns: int
    state: SessionState
    clock: ReplayClock
    position: Position  # of the last record delivered, durably
    seek_epoch: int
    messages_sent: int
    trades_sent: int
    trades_total: int
    bars_total: int
    rate: float  # messages per second over the replayer's last checkpoint interval
    error: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def tick_instruments(self) -> list[str]:
        return [i for i in self.instruments if i not in self.bar_instruments]

    @property
    def final_ns(self) -> int:
        """The clock when the stream is over: the closing heartbeat at `end + lateness`."""
        return self.end_ns + self.lateness_ns

    def clock_at(self, wall_ns: int) -> int:
        """The replay clock now, kept inside [start, end + lateness]."""
        return max(self.start_ns, min(self.final_ns, self.clock.read(wall_ns)))

    @property
    def percent(self) -> float:
        """Percent of the range delivered (durably): the position, not the clock, which runs on
        even when the replayer lags."""
        if self.state == SessionState.FINISHED:
            return 100.0
        return progress(self.position.ts_ns, self.start_ns, self.end_ns)


def _row(r: Any) -> SessionRow:
    return SessionRow(
        id=r.id, instruments=list(r.instruments), bar_instruments=list(r.bar_instruments), start_ns=r.start_ns,
        end_ns=r.end_ns, speed=r.speed, lateness_ns=r.lateness_ns, state=SessionState(r.state),
        clock=ReplayClock(r.clock_ns, r.anchor_wall_ns, r.speed),
        position=Position(r.position_ns, r.position_instrument, r.position_rank, r.position_trade_id),
        seek_epoch=r.seek_epoch, messages_sent=r.messages_sent, trades_sent=r.trades_sent,
        trades_total=r.trades_total, bars_total=r.bars_total, rate=r.rate, error=r.error,
        created_at=r.created_at, updated_at=r.updated_at,
    )  # fmt: skip


class ReplaySessionStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- the API's side ----------------------------------------------------------------------

    def create(self, *, instruments: Sequence[str], start_ns: int, end_ns: int, speed: float | None,
               lateness_ns: int, max_active: int, wall_ns: int) -> SessionRow:  # fmt: skip
        """A new session in `created`, its clock held at `start_ns`. Each instrument replays its
        stored ticks of the range, or, with none, its stored bars; with neither, NoStoredData."""
        names = list(dict.fromkeys(instruments))
        if not names:
            raise ValueError("a session needs at least one instrument")
        if end_ns <= start_ns:
            raise ValueError("end must be after start")
        if speed is not None and not speed > 0:
            raise ValueError("speed must be positive")
        trades_total = bars_total = 0
        bar_only, empty = [], []
        for name in names:
            if count := count_trades(self.engine, name, start_ns, end_ns):
                trades_total += count
            elif (interval := bar_interval(self.engine, name, start_ns, end_ns)) is not None:
                bar_only.append(name)
                bars_total += count_bars(self.engine, name, interval, start_ns, end_ns)
            else:
                empty.append(name)
        if empty:
            raise NoStoredData(f"no stored ticks or bars in the range for {', '.join(empty)}")
        session_id = secrets.token_hex(6)
        with self.engine.begin() as conn:
            # One creator at a time counts the active sessions (the cap holds under concurrency).
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('candlekeep.replay_sessions'))"))
            active = conn.execute(text("SELECT count(*) FROM replay_sessions WHERE state = ANY(:s)"),
                                  {"s": [str(s) for s in ACTIVE]}).scalar_one()  # fmt: skip
            if active >= max_active:
                raise TooManySessions(f"{active} replay sessions are active (the cap is {max_active}); "
                                      "stop one first")  # fmt: skip
            row = conn.execute(text(f"""
                INSERT INTO replay_sessions (id, instruments, bar_instruments, start_ns, end_ns, speed, lateness_ns,
                    state, clock_ns, position_ns, trades_total, bars_total)
                VALUES (:id, :instruments, :bars, :start, :end, :speed, :lateness, 'created', :start, :start,
                    :trades, :bar_count)
                RETURNING {_COLUMNS}"""), {"id": session_id, "instruments": names, "bars": bar_only, "start": start_ns,
                                          "end": end_ns, "speed": speed, "lateness": lateness_ns,
                                          "trades": trades_total, "bar_count": bars_total}).one()  # fmt: skip
        return _row(row)

    def get(self, session_id: str) -> SessionRow:
        with self.engine.connect() as conn:
            row = conn.execute(text(f"SELECT {_COLUMNS} FROM replay_sessions WHERE id = :id"),
                               {"id": session_id}).one_or_none()  # fmt: skip
        if row is None:
            raise SessionNotFound(f"no replay session {session_id!r}")
        return _row(row)

    def list(self, *, states: Sequence[SessionState] | None = None) -> list[SessionRow]:
        sql = f"SELECT {_COLUMNS} FROM replay_sessions"
        params: dict[str, Any] = {}
        if states is not None:
            sql += " WHERE state = ANY(:states)"
            params["states"] = [str(s) for s in states]
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(text(sql + " ORDER BY created_at, id"), params)]

    def act(self, session_id: str, action: str, *, wall_ns: int) -> SessionRow:
        """start | pause | resume | stop (candlekeep.replay.ACTIONS), with the clock held or run."""
        with self.engine.begin() as conn:
            row = self._lock(conn, session_id)
            target = next_state(row.state, action)
            clock = row.clock.run(wall_ns) if target == SessionState.RUNNING else row.clock.hold(wall_ns)
            clock = self._clamp(row, clock)
            return self._update(conn, session_id, state=target, clock=clock, error=None)

    def seek(self, session_id: str, ts_ns: int, *, wall_ns: int) -> SessionRow:
        """Continue from `ts_ns` (inside [start, end)): the next record sent is the first stamped
        `ts_ns` or later, in any state that can still send."""
        with self.engine.begin() as conn:
            row = self._lock(conn, session_id)
            if row.state not in SEEKABLE:
                raise TransitionNotAllowed(f"cannot seek a session that is {row.state}")
            if not row.start_ns <= ts_ns < row.end_ns:
                raise ValueError(f"seek time {ts_ns} ns is outside the session's range [{row.start_ns}, {row.end_ns})")
            before = sum(count_trades(self.engine, i, row.start_ns, ts_ns) for i in row.tick_instruments)
            position = Position.before(ts_ns)
            conn.execute(text("""
                UPDATE replay_sessions SET position_ns = :ts, position_instrument = :inst, position_rank = :rank,
                    position_trade_id = :tid, trades_sent = :before, seek_epoch = seek_epoch + 1
                WHERE id = :id"""), {"id": session_id, "ts": position.ts_ns, "inst": position.instrument,
                                     "rank": position.rank, "tid": position.trade_id, "before": before})  # fmt: skip
            return self._update(conn, session_id, clock=row.clock.seek(ts_ns, wall_ns))

    def set_speed(self, session_id: str, speed: float | None, *, wall_ns: int) -> SessionRow:
        """The new speed from now on; the clock keeps its current reading."""
        if speed is not None and not speed > 0:
            raise ValueError("speed must be positive")
        with self.engine.begin() as conn:
            row = self._lock(conn, session_id)
            if row.state in (SessionState.STOPPED, SessionState.FINISHED):
                raise TransitionNotAllowed(f"cannot change the speed of a session that is {row.state}")
            clock = row.clock.with_speed(speed, wall_ns)  # from max: on from the last record sent
            return self._update(conn, session_id, speed=speed, clock=self._clamp(row, clock))

    # -- the replayer's side ------------------------------------------------------------------

    def checkpoint(self, session_id: str, *, epoch: int, position: Position,
                   messages: int, trades: int, rate: float, clock_ns: int | None = None,
                   finish: bool = False) -> bool:  # fmt: skip
        """Record delivered progress (`messages` / `trades` more sent, now at `position`); with
        `finish`, also enter `finished` (from running only). False (nothing written) when the
        session was sought since the replayer read it (or, `finish`, is no longer running)."""
        sets = ["position_ns = :ts", "position_instrument = :inst", "position_rank = :rank", "position_trade_id = :tid",
                "messages_sent = messages_sent + :messages", "trades_sent = trades_sent + :trades", "rate = :rate",
                "updated_at = now()"]  # fmt: skip
        params: dict[str, Any] = {"id": session_id, "epoch": epoch, "ts": position.ts_ns,
                                  "inst": position.instrument, "rank": position.rank, "tid": position.trade_id,
                                  "messages": messages, "trades": trades, "rate": rate}  # fmt: skip
        where = "id = :id AND seek_epoch = :epoch AND state <> 'finished'"
        if clock_ns is not None and not finish:  # at max speed the clock is the last record sent
            sets.append("clock_ns = greatest(clock_ns, :clock)")
            params["clock"] = clock_ns
        if finish:
            sets += ["state = 'finished'", "anchor_wall_ns = NULL", "clock_ns = end_ns + lateness_ns"]
            where += " AND state = 'running'"
        with self.engine.begin() as conn:
            done = conn.execute(text(f"UPDATE replay_sessions SET {', '.join(sets)} WHERE {where}"), params)
            return done.rowcount == 1

    def fail(self, session_id: str, reason: str, *, wall_ns: int) -> bool:
        """running -> error, the clock held where it was (the replayer retries after a backoff)."""
        with self.engine.begin() as conn:
            row = self._lock(conn, session_id)
            if row.state != SessionState.RUNNING:
                return False
            self._update(conn, session_id, state=SessionState.ERROR, clock=row.clock.hold(wall_ns), error=reason)
            return True

    def retry(self, session_id: str, *, wall_ns: int) -> bool:
        """error -> running again (the replayer's backoff is over), re-anchored at its position."""
        with self.engine.begin() as conn:
            row = self._lock(conn, session_id)
            if row.state != SessionState.ERROR:
                return False
            self._update(conn, session_id, state=SessionState.RUNNING, clock=self._resume_at_position(row, wall_ns))
            return True

    def recover(self, session_id: str, *, wall_ns: int) -> bool:
        """A replayer (re)starting: a running session continues from its last durable position, its
        clock re-anchored there now (the time the replayer was away does not count)."""
        with self.engine.begin() as conn:
            row = self._lock(conn, session_id)
            if row.state != SessionState.RUNNING:
                return False
            self._update(conn, session_id, clock=self._resume_at_position(row, wall_ns))
            return True

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _resume_at_position(row: SessionRow, wall_ns: int) -> ReplayClock:
        at = max(row.start_ns, min(row.position.ts_ns, row.clock.read(wall_ns)))
        return ReplayClock(at, wall_ns, row.speed)

    @staticmethod
    def _clamp(row: SessionRow, clock: ReplayClock) -> ReplayClock:
        at = max(row.start_ns, min(row.final_ns, clock.sim_ns))
        return ReplayClock(at, clock.wall_ns, clock.speed)

    def _lock(self, conn: Connection, session_id: str) -> SessionRow:
        row = conn.execute(text(f"SELECT {_COLUMNS} FROM replay_sessions WHERE id = :id FOR UPDATE"),
                           {"id": session_id}).one_or_none()  # fmt: skip
        if row is None:
            raise SessionNotFound(f"no replay session {session_id!r}")
        return _row(row)

    def _update(self, conn: Connection, session_id: str, *, clock: ReplayClock, state: SessionState | None = None,
                speed: float | None | str = "keep", error: str | None | str = "keep") -> SessionRow:  # fmt: skip
        sets = ["clock_ns = :clock", "anchor_wall_ns = :anchor", "updated_at = now()"]
        params: dict[str, Any] = {"id": session_id, "clock": clock.sim_ns, "anchor": clock.wall_ns}
        if state is not None:
            sets.append("state = :state")
            params["state"] = str(state)
        if speed != "keep":
            sets.append("speed = :speed")
            params["speed"] = speed
        if error != "keep":
            sets.append("error = :error")
            params["error"] = error
        row = conn.execute(text(f"UPDATE replay_sessions SET {', '.join(sets)} WHERE id = :id RETURNING {_COLUMNS}"),
                           params).one()  # fmt: skip
        return _row(row)
