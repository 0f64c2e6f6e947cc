"""RateLimiter: sliding windows on an injected clock (no real waiting)."""

from __future__ import annotations

import random
import threading

import pytest

from candlekeep.settings import Settings
from candlekeep.sources.ratelimit import RateLimiter, Window


class FakeClock:
    """Time that moves only when someone sleeps; safe to share between threads."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            self.now += seconds

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def limiter(clock: FakeClock, *windows: Window) -> RateLimiter:
    return RateLimiter(windows, clock=clock, sleep=clock.sleep)


def assert_within(grants: list[float], window: Window) -> None:
    """No `window.seconds`-long interval holds more than `window.calls` grants."""
    ordered = sorted(grants)
    for i, t in enumerate(ordered):
        inside = [g for g in ordered[i:] if g < t + window.seconds - 1e-9]
        assert len(inside) <= window.calls, f"{len(inside)} calls in [{t}, {t + window.seconds})"


def test_calls_within_the_budget_do_not_wait() -> None:
    clock = FakeClock()
    rl = limiter(clock, Window(3, 1))
    assert [rl.acquire() for _ in range(3)] == [0, 0, 0]
    assert clock.slept == []


def test_a_full_window_blocks_until_its_oldest_call_leaves() -> None:
    clock = FakeClock()
    rl = limiter(clock, Window(3, 1))
    for at in (0.0, 0.5, 0.9):
        clock.now = at
        rl.acquire()
    assert rl.acquire() == pytest.approx(1.0)  # the call at 0.0 leaves the window at 1.0
    assert rl.acquire() == pytest.approx(1.5)  # sliding, not a fixed 1 s bucket
    assert clock.slept == pytest.approx([0.1, 0.5])


def test_every_window_is_respected() -> None:
    clock = FakeClock()
    rl = limiter(clock, Window(2, 1), Window(3, 60))
    grants = [rl.acquire() for _ in range(4)]
    assert grants == pytest.approx([0, 0, 1, 60])


def test_sliding_windows_hold_under_random_arrivals() -> None:
    clock = FakeClock()
    windows = (Window(5, 1), Window(12, 10), Window(40, 100))
    rl = limiter(clock, *windows)
    rng = random.Random(7)
    grants = []
    for _ in range(150):
        clock.advance(rng.choice((0, 0, 0.05, 0.3, 2.0)))
        grants.append(rl.acquire())
    for window in windows:
        assert_within(grants, window)
    assert grants == sorted(grants)


def test_threads_share_one_budget() -> None:
    clock = FakeClock()
    windows = (Window(4, 1), Window(30, 60))
    rl = limiter(clock, *windows)
    grants: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            t = rl.acquire()
            with lock:
                grants.append(t)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(grants) == 80
    for window in windows:
        assert_within(grants, window)


def test_from_settings_uses_the_configured_calls() -> None:
    settings = Settings(
        cryptocompare_calls_per_second=7, cryptocompare_calls_per_minute=70, cryptocompare_calls_per_hour=700
    )
    assert RateLimiter.from_settings(settings).windows == (Window(7, 1), Window(70, 60), Window(700, 3600))


@pytest.mark.parametrize(("calls", "seconds"), [(0, 1), (5, 0), (-1, 60)])
def test_nonsense_windows_are_rejected(calls: int, seconds: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        Window(calls, seconds)


def test_a_limiter_needs_a_window() -> None:
    with pytest.raises(ValueError):
        RateLimiter([])
