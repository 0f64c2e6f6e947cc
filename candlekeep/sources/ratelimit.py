"""Client-side call budget: a thread-safe sliding-window limiter with several windows.

Runs inside whichever process calls a REST source; `acquire()` blocks the calling thread until a
call fits in every window (e.g. 20/s, 300/min, 3000/h, CryptoCompare's free plan), then records it.
The clock and the sleep are injected so tests step through time without waiting.

State (guarded by one lock): per window, the monotonic times of the calls granted inside it,
oldest first, at most `calls` of them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from candlekeep.settings import Settings


@dataclass(frozen=True, slots=True)
class Window:
    """At most `calls` calls in any `seconds`-long interval."""

    calls: int
    seconds: float

    def __post_init__(self) -> None:
        if self.calls <= 0 or self.seconds <= 0:
            raise ValueError(f"rate window needs positive calls and seconds, got {self.calls}/{self.seconds}s")


class RateLimiter:
    def __init__(
        self,
        windows: Sequence[Window],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not windows:
            raise ValueError("a rate limiter needs at least one window")
        self.windows = tuple(windows)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._granted = [deque[float](maxlen=w.calls) for w in self.windows]

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        return cls(
            [
                Window(settings.cryptocompare_calls_per_second, 1),
                Window(settings.cryptocompare_calls_per_minute, 60),
                Window(settings.cryptocompare_calls_per_hour, 3600),
            ]
        )

    def acquire(self) -> float:
        """Block until one more call fits in every window; record it and return its clock time."""
        while True:
            with self._lock:
                now = self._clock()
                wait = self._wait_needed(now)
                if wait <= 0:
                    for granted in self._granted:
                        granted.append(now)
                    return now
            # Sleep outside the lock so other threads can check (and queue) meanwhile.
            self._sleep(wait)

    def _wait_needed(self, now: float) -> float:
        """Seconds until the oldest call of every full window has left it (0 when none is full)."""
        wait = 0.0
        for window, granted in zip(self.windows, self._granted, strict=True):
            if len(granted) == window.calls:
                wait = max(wait, granted[0] + window.seconds - now)
        return wait
