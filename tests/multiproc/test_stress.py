"""`shmkv stress` in CI: a short run with faults must be clean; a broken one must be caught."""

from __future__ import annotations

import pytest

from shmkv.stress import StressOptions, run_stress

pytestmark = [pytest.mark.multiproc, pytest.mark.slow, pytest.mark.timeout(240)]

LEAK_KEYS = ("leaked_slots", "leaked_pins", "leaked_processes", "leaked_segments")


def test_short_stress_with_kills_is_clean() -> None:
    report = run_stress(
        StressOptions(
            num_ranks=4,
            duration_s=30,
            kill_rank_every_s=3,
            kill_coordinator_at_s=14,
            pause_rank_every_s=5,
            seed=1,
        )
    )
    assert report["violations"] == 0, report["violations_by_kind"]
    for key in LEAK_KEYS:
        assert report[key] == 0, key
    # A rank every 3 s (slots 3, 6, ..., 27 s) plus the coordinator: at most 10. A slot passes
    # without a kill while the supervisor is busy restarting the fleet (a loaded machine).
    assert 7 <= report["kills"] <= 10, "a rank every 3 s plus the coordinator"
    assert report["fleet_restarts"] == 1
    assert report["completed_requests"] > 500
    assert report["ops_per_s"]["g2_offloads"] > 0
    assert report["ops_per_s"]["g2_onboarded_blocks"] > 0
    # Through kills and restarts every rank announces a block only after its parent: a host
    # block after its parent in the host tier, a swapped-in run after its pinned G1 prefix.
    events = report["events"]
    assert report["violations_by_kind"]["orphan_event_stores"] == 0
    assert (events["orphan_stores"], events["cross_tier_parents_host"]) == (0, 0)
    assert events["unknown_removes"] == 0


def test_inject_bug_is_reported() -> None:
    report = run_stress(StressOptions(num_ranks=2, duration_s=6, inject_bug="ignore-pins", seed=2))
    assert report["violations"] > 0
    assert report["violations_by_kind"]["rank_invariants"] > 0, "ranks saw pinned slots evicted"
    for key in LEAK_KEYS:
        assert report[key] == 0, key
