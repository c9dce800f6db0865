"""The stress driver's fault schedule: faults keep to their grid however late a tick runs."""

from __future__ import annotations

import math

from shmkv.stress import _next_slot


def test_a_tick_on_time_takes_the_next_slot() -> None:
    assert _next_slot(3000.0, 3000.0, 3.0) == 6000.0


def test_a_late_tick_keeps_the_grid() -> None:
    assert _next_slot(3000.0, 3500.0, 3.0) == 6000.0
    assert _next_slot(3000.0, 8999.0, 3.0) == 9000.0


def test_missed_slots_are_skipped_not_bunched() -> None:
    assert _next_slot(3000.0, 9100.0, 3.0) == 12000.0


def test_no_period_means_no_next_fault() -> None:
    assert _next_slot(3000.0, 3000.0, None) == math.inf
    assert _next_slot(3000.0, 3000.0, 0.0) == math.inf
