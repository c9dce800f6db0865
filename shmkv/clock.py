"""Layer 0: clocks. The pure core never reads a clock; it is handed `now_ms`.

`MonotonicClock` is the fleet's shared time base (CLOCK_MONOTONIC is system-wide on Linux);
`ManualClock` drives tests and offline replay.
"""

from __future__ import annotations

import math
import time
from typing import Protocol


class Clock(Protocol):
    """Something that tells simulated time in milliseconds."""

    def now_ms(self) -> float: ...


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start_ms: float = 0.0) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> float:
        return self._now_ms

    def advance(self, delta_ms: float) -> None:
        if delta_ms < 0:
            raise ValueError(f"cannot move a clock backwards (delta_ms={delta_ms})")
        self._now_ms += delta_ms

    def set(self, now_ms: float) -> None:
        if now_ms < self._now_ms:
            raise ValueError(f"cannot move a clock backwards ({now_ms} < {self._now_ms})")
        self._now_ms = now_ms


class MonotonicClock:
    """Simulated ms = (monotonic - start) x speedup; speedup 0 or inf means 'never wait'."""

    def __init__(self, start_monotonic_s: float | None = None, speedup_ratio: float = 1.0) -> None:
        self.start_monotonic_s = (
            time.monotonic() if start_monotonic_s is None else start_monotonic_s
        )
        self.speedup_ratio = speedup_ratio

    @property
    def never_sleeps(self) -> bool:
        return self.speedup_ratio <= 0 or math.isinf(self.speedup_ratio)

    def now_ms(self) -> float:
        elapsed_ms = (time.monotonic() - self.start_monotonic_s) * 1000.0
        return elapsed_ms if self.never_sleeps else elapsed_ms * self.speedup_ratio

    def wall_ms_until(self, sim_ms: float) -> float:
        """Wall-clock milliseconds until simulated time `sim_ms` (<= 0 if already past).

        A clock that never sleeps still moves at wall speed between passes (a pass takes no
        simulated time), so a future `sim_ms` is that far away in wall time: callers block
        until then instead of spinning."""
        if self.never_sleeps:
            return sim_ms - self.now_ms()
        return sim_ms / self.speedup_ratio - (time.monotonic() - self.start_monotonic_s) * 1000.0
