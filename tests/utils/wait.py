"""Waiting on real components in tests: poll until a condition holds, or fail saying what never came."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def eventually(check: Callable[[], object], *, timeout: float = 30.0, what: str = "condition") -> Any:
    """The first truthy value of `check()`, polled every 50 ms for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
