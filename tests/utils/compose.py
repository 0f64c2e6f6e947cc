"""deploy/compose.yaml as the tests read it: parsed, merge keys resolved, variables interpolated.

    compose = load_compose(env={"CANDLEKEEP_API_KEYS": "k1", ...})
    compose.services["aggregator"]["command"]      # ['candlekeep', 'stream', 'aggregator', ...]
    compose.environment("aggregator")              # {'CANDLEKEEP_DATABASE_URL': 'postgresql://...', ...}

Interpolation follows the compose specification: `${VAR}`, `${VAR:-default}` (unset or empty),
`${VAR-default}` (unset), `${VAR:?message}` / `${VAR?message}` (required: ComposeError with the
message), `$VAR`, and `$$` for a literal `$`. YAML merge keys (`<<: *anchor`) are resolved by the
YAML loader, as compose does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class ComposeError(ValueError):
    """A required variable is unset, or the file is not what compose accepts."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """`value` with every string interpolated (recursively through lists and mappings)."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: _substitute(m, env), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def _substitute(match: re.Match[str], env: Mapping[str, str]) -> str:
    if match["escaped"]:
        return "$"
    name = match["braced"] or match["bare"]
    op, arg = match["op"], match["arg"] or ""
    value = env.get(name)
    if op in (":-", ":?"):
        missing = not value
    else:
        missing = value is None
    if op in (":-", "-"):
        return arg if missing else value  # type: ignore[return-value]
    if op in (":?", "?") and missing:
        raise ComposeError(f"required variable {name} is missing a value: {arg}")
    return value or ""


@dataclass
class Compose:
    raw: dict[str, Any]  # parsed, merge keys resolved, not interpolated
    data: dict[str, Any]  # interpolated

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return self.data["services"]

    def environment(self, service: str) -> dict[str, str]:
        env = self.services[service].get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        return {k: "" if v is None else str(v) for k, v in env.items()}

    def replicas(self, service: str) -> int:
        return int((self.services[service].get("deploy") or {}).get("replicas", 1))


def load_compose(env: Mapping[str, str], path: Path = COMPOSE_FILE) -> Compose:
    raw = yaml.safe_load(path.read_text())
    return Compose(raw=raw, data=interpolate(raw, env))
