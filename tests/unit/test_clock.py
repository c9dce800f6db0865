"""Clocks: the manual one for tests and replay, the monotonic one the fleet shares."""

from __future__ import annotations

import math
import time

import pytest

from shmkv.clock import ManualClock, MonotonicClock


def test_manual_clock_moves_only_forward() -> None:
    clock = ManualClock(5.0)
    clock.advance(2.5)
    clock.set(10.0)
    assert clock.now_ms() == 10.0
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1.0)
    with pytest.raises(ValueError, match="backwards"):
        clock.set(9.0)
    assert clock.now_ms() == 10.0


@pytest.mark.parametrize("speedup", [math.inf, 0.0])
def test_a_clock_that_never_sleeps_still_waits_for_future_simulated_times(speedup: float) -> None:
    # Simulated time runs at wall speed between passes: a deadline 500 ms ahead is ~500 wall
    # ms away (callers block until then instead of spinning); a past one is <= 0.
    clock = MonotonicClock(time.monotonic() - 1.0, speedup_ratio=speedup)
    assert clock.never_sleeps
    now_ms = clock.now_ms()
    assert 1000.0 <= now_ms < 60_000.0
    assert 400.0 < clock.wall_ms_until(now_ms + 500.0) <= 500.0
    assert clock.wall_ms_until(now_ms - 1.0) < 0.0


def test_a_sped_up_clock_divides_simulated_time() -> None:
    clock = MonotonicClock(time.monotonic(), speedup_ratio=10.0)
    assert not clock.never_sleeps
    assert 900.0 < clock.wall_ms_until(10_000.0) <= 1000.0
