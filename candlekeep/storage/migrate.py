"""Schema migrations, run programmatically with the repository's Alembic scripts.

The scripts live in `alembic/` at the repository root, next to pyproject.toml (the package is
installed editable, so that is `candlekeep/../alembic`); `CANDLEKEEP_ALEMBIC_DIR` overrides it.
Nothing depends on the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import candlekeep


def alembic_dir() -> Path:
    """The directory holding env.py and versions/."""
    candidates = []
    if override := os.environ.get("CANDLEKEEP_ALEMBIC_DIR"):
        candidates.append(Path(override))
    candidates.append(Path(candlekeep.__file__).resolve().parent.parent / "alembic")
    for path in candidates:
        if (path / "env.py").is_file() and (path / "versions").is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise RuntimeError(
        f"Alembic scripts not found (tried {tried}); install candlekeep editable from its repository "
        "or set CANDLEKEEP_ALEMBIC_DIR"
    )


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(alembic_dir()))
    config.set_main_option("path_separator", "os")
    if url is not None:
        config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision`."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at `url` down to `revision` ("base": drop everything)."""
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_current(engine: Engine) -> bool:
    """True when the database is at the newest migration."""
    return current_revision(engine) == head_revision()
