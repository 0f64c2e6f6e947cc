"""Instruments known to the platform, and which of them are tracked (fetched and streamed).

Registering is idempotent: an instrument is added once; registering it as tracked marks it
tracked, registering it untracked leaves its flag alone (untracking is `set_tracked`).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Engine, text

from candlekeep.instruments import Instrument


class InstrumentStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def register(self, instruments: Iterable[Instrument | str], *, tracked: bool = False) -> list[str]:
        """Upsert `instruments` (Instrument or canonical id); return the ids newly added, sorted."""
        unique = {i.id: i for i in (x if isinstance(x, Instrument) else Instrument.parse(x) for x in instruments)}
        if not unique:
            return []
        rows = [
            {"id": i.id, "venue": i.venue, "base": i.base, "quote": i.quote, "tracked": tracked}
            for i in unique.values()
        ]
        added = []
        with self.engine.begin() as conn:
            for row in rows:
                result = conn.execute(
                    text(
                        "INSERT INTO instruments (id, venue, base, quote, tracked)"
                        " VALUES (:id, :venue, :base, :quote, :tracked)"
                        " ON CONFLICT (id) DO UPDATE SET tracked = true"
                        " WHERE excluded.tracked AND NOT instruments.tracked"
                        " RETURNING xmax = 0 AS inserted"
                    ),
                    row,
                ).first()
                if result is not None and result.inserted:
                    added.append(row["id"])
        return sorted(added)

    def set_tracked(self, instrument: Instrument | str, tracked: bool) -> bool:
        """Set the tracked flag of a registered instrument; False when it is not registered."""
        with self.engine.begin() as conn:
            result = conn.execute(
                text("UPDATE instruments SET tracked = :tracked WHERE id = :id"),
                {"id": str(instrument), "tracked": tracked},
            )
            return result.rowcount == 1

    def is_registered(self, instrument: Instrument | str) -> bool:
        """Whether the instrument has a row (registered by configuration, a track, or an operator)."""
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT EXISTS (SELECT 1 FROM instruments WHERE id = :id)"),
                                {"id": str(instrument)}).scalar_one()  # fmt: skip

    def list_ids(self, *, tracked_only: bool = False) -> list[str]:
        sql = "SELECT id FROM instruments" + (" WHERE tracked" if tracked_only else "") + " ORDER BY id"
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql)).scalars())

    def tracked_flags(self) -> list[tuple[str, bool]]:
        """(id, tracked) of every registered instrument, by id."""
        with self.engine.connect() as conn:
            return [(r[0], bool(r[1])) for r in conn.execute(text("SELECT id, tracked FROM instruments ORDER BY id"))]
