"""The processor-sharing link model: the vectors of behavior.md §8.2 and §16.14."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, strategies as st

from shmkv.bandwidth import BandwidthModel
from shmkv.errors import ConfigError

MB = 1_000_000  # 1 MB at 1 GB/s takes exactly 1 ms


def test_one_megabyte_at_one_gbps_takes_one_ms() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, MB, transfer_id=7)
    assert link.earliest_finish_ms() == 1.0
    assert link.deadline_ms(7) == 1.0
    assert link.advance_to(0.5) == []  # §16.14: pending at 0.5 ms
    assert link.num_active == 1
    assert link.remaining_bytes(7) == pytest.approx(MB / 2)
    assert link.advance_to(1.0) == [7]  # complete at 1.0 ms
    assert link.num_active == 0
    assert link.earliest_finish_ms() is None


def test_two_simultaneous_transfers_share_the_link() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, MB, 1)
    link.start(0.0, MB, 2)
    assert link.deadline_ms(1) == 2.0
    assert link.deadline_ms(2) == 2.0
    assert link.earliest_finish_ms() == 2.0
    assert link.advance_to(1.999) == []
    assert link.advance_to(2.0) == [1, 2]


def test_late_joiner_slows_the_first_transfer() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, MB, 1)
    assert link.advance_to(0.5) == []
    link.start(0.5, MB, 2)
    # T1 has 0.5 MB left at half speed -> 1.5 ms; T2 then runs alone -> 2.0 ms.
    assert link.deadline_ms(1) == 1.5
    assert link.deadline_ms(2) == 2.0
    assert link.advance_to(1.5) == [1]
    assert link.earliest_finish_ms() == 2.0
    assert link.advance_to(2.0) == [2]


def test_ten_simultaneous_all_finish_at_ten_ms() -> None:
    link = BandwidthModel(1.0)
    for transfer_id in range(10):
        link.start(0.0, MB, transfer_id)
    assert all(link.deadline_ms(t) == 10.0 for t in range(10))
    assert link.advance_to(9.99) == []
    assert link.advance_to(10.0) == list(range(10))


def test_one_advance_completes_several_in_completion_order() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, 3 * MB, 1)
    link.start(0.0, MB, 2)
    link.start(0.0, 2 * MB, 3)
    # 3 share until 2 finishes at 3 ms; 2 share until 3 finishes at 5 ms; 1 alone to 6 ms.
    assert link.deadline_ms(2) == 3.0
    assert link.deadline_ms(3) == 5.0
    assert link.deadline_ms(1) == 6.0
    assert link.advance_to(100.0) == [2, 3, 1]
    assert link.last_update_ms == 100.0


def test_rewind_does_nothing() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, MB, 1)
    link.advance_to(0.5)
    assert link.advance_to(0.25) == []
    assert link.last_update_ms == 0.5
    assert link.remaining_bytes(1) == pytest.approx(MB / 2)


def test_start_in_the_past_is_clamped_to_last_update() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, MB, 1)
    link.advance_to(0.5)
    link.start(0.1, MB, 2)  # a rewound clock: starts at 0.5
    assert link.deadline_ms(2) == 2.0


def test_start_ahead_of_an_unadvanced_busy_link_is_refused() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, MB, 1)
    with pytest.raises(ValueError, match="advance_to"):
        link.start(5.0, MB, 2)


def test_idle_link_moves_its_clock_on_start() -> None:
    link = BandwidthModel(1.0)
    link.start(3.0, MB, 1)
    assert link.last_update_ms == 3.0
    assert link.deadline_ms(1) == 4.0


def test_completion_tolerance() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, MB, 1)
    assert link.advance_to(1.0 - 1e-10) == [1]


def test_zero_byte_transfer_completes_at_start() -> None:
    link = BandwidthModel(1.0)
    link.start(2.0, 0, 1)
    assert link.earliest_finish_ms() == 2.0
    assert link.advance_to(2.0) == [1]


@pytest.mark.parametrize("gbps", [0.0, -1.0])
def test_non_positive_bandwidth_is_infinite(gbps: float) -> None:
    link = BandwidthModel(gbps)
    assert link.is_infinite
    link.start(5.0, 10 * MB, 1)
    link.start(5.0, MB, 2)
    assert link.deadline_ms(1) == 5.0
    assert link.earliest_finish_ms() == 5.0
    assert link.advance_to(5.0) == [1, 2]


def test_remove_cancels_and_speeds_up_the_rest() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, MB, 1)
    link.start(0.0, MB, 2)
    link.advance_to(1.0)  # each has 0.5 MB left
    assert link.remove(1) is True
    assert link.remove(1) is False
    assert link.num_active == 1
    assert link.earliest_finish_ms() == 1.5
    assert link.advance_to(1.5) == [2]


def test_transfer_ids_can_be_reused_after_completion() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, MB, 1)
    link.start(0.0, 2 * MB, 2)
    assert link.advance_to(2.0) == [1]
    link.start(2.0, MB, 1)  # the old heap entry for id 1 must not be confused with this one
    assert link.deadline_ms(1) == 4.0
    assert link.advance_to(4.0) == [2, 1]


def test_duplicate_active_id_and_bad_sizes_are_refused() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, MB, 1)
    with pytest.raises(ValueError, match="already active"):
        link.start(0.0, MB, 1)
    with pytest.raises(ValueError, match="num_bytes"):
        link.start(0.0, -1, 2)
    with pytest.raises(ValueError, match="num_bytes"):
        link.start(0.0, math.nan, 2)
    with pytest.raises(KeyError):
        link.deadline_ms(99)
    with pytest.raises(ConfigError):
        BandwidthModel(math.nan)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=10 * MB), min_size=1, max_size=12),
    gaps=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=12, max_size=12),
)
def test_deadlines_match_completions(sizes: list[int], gaps: list[float]) -> None:
    """Started at staggered times, each transfer completes at the deadline predicted after the
    last start, and all bytes are served at full link speed while the link is busy."""
    link = BandwidthModel(2.0)
    now_ms = 0.0
    for transfer_id, (size, gap) in enumerate(zip(sizes, gaps, strict=False)):
        now_ms += gap
        link.advance_to(now_ms)
        link.start(now_ms, size, transfer_id)
    predicted = {t: link.deadline_ms(t) for t in range(len(sizes)) if t in _active(link, sizes)}
    order: list[int] = []
    while (finish_ms := link.earliest_finish_ms()) is not None:
        done = link.advance_to(finish_ms)
        assert done, "advancing to the earliest finish must complete something"
        for transfer_id in done:
            assert finish_ms == pytest.approx(predicted[transfer_id], abs=1e-6)
        order.extend(done)
    assert sorted(order) == sorted(predicted)
    assert all(predicted[a] <= predicted[b] + 1e-6 for a, b in itertools.pairwise(order))


def _active(link: BandwidthModel, sizes: list[int]) -> set[int]:
    active: set[int] = set()
    for transfer_id in range(len(sizes)):
        try:
            link.remaining_bytes(transfer_id)
        except KeyError:
            continue
        active.add(transfer_id)
    return active


def test_nan_time_is_ignored() -> None:
    link = BandwidthModel(1.0)
    link.start(0.0, MB, 1)
    assert link.advance_to(math.nan) == []
    assert link.num_active == 1
