"""G2Directory (coordinator) and G2RankView (rank) over one segment, in one process.

Exact outcomes: which slots a reservation gets, which blocks an eviction removes, which prefix a
pin holds, what a dead rank leaves behind. The concurrent protocol is in tests/multiproc.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

from shmkv.errors import ClosedError, ConfigError, InvariantError
from shmkv.eviction.lru import LruBackend
from shmkv.g2 import G2Directory, G2RankView, PinnedRun
from shmkv.hashing import make_plh
from shmkv.shm import (
    EVICTING,
    FREE,
    INDEX_EMPTY,
    INDEX_TOMBSTONE,
    NO_OWNER,
    PIN_MAX,
    READY,
    RESERVED,
    G2Segment,
)
from tests.g2_fence import patch_fence
from tests.refusing_policy import RefusingLru

BLOCK_SIZE = 4


@dataclass
class Pool:
    segment: G2Segment
    directory: G2Directory
    ranks: list[G2RankView]

    def store(self, hashes: list[int], rank: int = 0) -> list[int]:
        """Reserve and commit a chain of blocks (parent = previous hash); returns the slots."""
        slots = self.directory.reserve(len(hashes), rank)
        assert len(slots) == len(hashes)
        parent: int | None = None
        for position, (slot, seq_hash) in enumerate(zip(slots, hashes, strict=True)):
            committed = self.directory.commit(
                slot, seq_hash, parent, seq_hash ^ 0xFF, position, tokens_of(seq_hash), rank
            )
            assert committed
            parent = seq_hash
        return slots


def tokens_of(seq_hash: int) -> list[int]:
    return [seq_hash & 0xFFFF_FFFF, seq_hash >> 32, BLOCK_SIZE, 7]


@contextmanager
def make_pool(fleet_id: str, capacity: int, num_ranks: int = 2) -> Iterator[Pool]:
    with G2Segment.create(
        fleet_id, capacity=capacity, block_size=BLOCK_SIZE, num_ranks=num_ranks
    ) as seg:
        directory = G2Directory(seg, LruBackend())
        ranks = [G2RankView(seg, r) for r in range(num_ranks)]
        try:
            yield Pool(seg, directory, ranks)
        finally:
            for view in ranks:
                view.close()
            directory.close()


@pytest.fixture
def pool(fleet_id: str) -> Iterator[Pool]:
    with make_pool(fleet_id, capacity=8) as new_pool:
        yield new_pool


# Hashes chosen so that their home cells (hash mod 16, T = 16 for 8 slots) differ.
A, B, C, D, E, F, G, H = (0x1000 + i for i in range(8))


# -- reserve / commit / abort ------------------------------------------------------------------


def test_fresh_pool_reserves_slots_in_order(pool: Pool) -> None:
    assert pool.directory.reserve(3, owner_rank=1) == [0, 1, 2]
    assert pool.segment.state[:4].tolist() == [RESERVED, RESERVED, RESERVED, FREE]
    assert pool.segment.owner[:4].tolist() == [1, 1, 1, NO_OWNER]
    assert (pool.directory.num_free, pool.directory.num_reserved) == (5, 3)
    pool.directory.check_invariants()


def test_commit_publishes_a_ready_block(pool: Pool) -> None:
    [slot] = pool.directory.reserve(1, owner_rank=1)
    assert pool.directory.commit(slot, A, None, 0xAA, 0, tokens_of(A), owner_rank=1)
    seg = pool.segment
    assert seg.state[slot] == READY
    assert (int(seg.seq_hash[slot]), int(seg.local_hash[slot]), int(seg.position[slot])) == (
        A,
        0xAA,
        0,
    )
    assert seg.flags[slot] == 0, "no parent"
    assert seg.tokens[slot].tolist() == tokens_of(A)
    assert pool.directory.find_slot(A) == slot
    assert pool.ranks[0].lookup_prefix([A, B]) == [(slot, 0)]
    assert pool.directory.num_ready == 1
    pool.directory.check_invariants()


def test_commit_checks_the_reservation(pool: Pool) -> None:
    [slot] = pool.directory.reserve(1, owner_rank=0)
    with pytest.raises(InvariantError, match="owned by 0"):
        pool.directory.commit(slot, A, None, 1, 0, None, owner_rank=1)
    with pytest.raises(InvariantError, match="FREE"):
        pool.directory.commit(slot + 1, A, None, 1, 0, None, owner_rank=0)
    with pytest.raises(ConfigError, match="token ids"):
        pool.directory.commit(slot, A, None, 1, 0, [1, 2, 3], owner_rank=0)
    with pytest.raises(ConfigError, match="unsigned 64-bit"):
        pool.directory.commit(slot, -1, None, 1, 0, None, owner_rank=0)
    with pytest.raises(ConfigError, match="unsigned 32-bit"):
        pool.directory.commit(slot, A, None, 1, 0, [-1, 0, 0, 0], owner_rank=0)
    assert pool.segment.state[slot] == RESERVED, "a rejected commit changes nothing"
    pool.directory.check_invariants()


def test_duplicate_commit_is_rejected_and_frees_the_slot(pool: Pool) -> None:
    [first] = pool.store([A])
    [second] = pool.directory.reserve(1, owner_rank=1)
    assert not pool.directory.commit(second, A, None, 1, 0, None, owner_rank=1)
    assert pool.segment.state[second] == FREE
    assert pool.segment.gen[second] == 1
    assert pool.directory.find_slot(A) == first
    assert pool.directory.stats().num_duplicates == 1
    pool.directory.check_invariants()


def test_abort_frees_with_a_new_generation_and_is_reused_first(pool: Pool) -> None:
    slots = pool.directory.reserve(2, owner_rank=0)
    pool.directory.abort(slots[1])
    assert pool.segment.state[slots[1]] == FREE
    assert pool.segment.gen[slots[1]] == 1
    assert pool.segment.owner[slots[1]] == NO_OWNER
    with pytest.raises(InvariantError, match="not RESERVED"):
        pool.directory.abort(slots[1])
    assert pool.directory.reserve(1, owner_rank=1) == [slots[1]]
    pool.directory.check_invariants()


def test_parent_and_position_are_stored(pool: Pool) -> None:
    pool.store([A, B, C])
    run = pool.ranks[0].pin_prefix([A, B, C])
    assert run is not None
    metas = pool.ranks[0].read_blocks(run)
    assert [(m.seq_hash, m.parent_hash, m.position, m.local_hash, m.owner) for m in metas] == [
        (A, None, 0, A ^ 0xFF, 0),
        (B, A, 1, B ^ 0xFF, 0),
        (C, B, 2, C ^ 0xFF, 0),
    ]
    assert pool.ranks[0].read_tokens(run).tolist() == [tokens_of(h) for h in (A, B, C)]
    pool.ranks[0].unpin(run)


# -- eviction ----------------------------------------------------------------------------------


def test_full_pool_evicts_least_recently_stored_first(pool: Pool) -> None:
    slots = pool.store([A, B, C, D, E, F, G, H])
    assert pool.directory.num_free == 0
    assert pool.directory.reserve(2, owner_rank=1) == [slots[0], slots[1]]
    assert pool.directory.take_evicted() == [A, B]
    assert pool.directory.take_evicted() == []
    assert pool.directory.find_slot(A) == -1
    assert pool.segment.gen[slots[0]] == 1
    assert pool.segment.state[slots[0]] == RESERVED
    assert pool.directory.stats().num_evictions == 2
    pool.directory.check_invariants()


def test_a_pinned_slot_survives_eviction_pressure(pool: Pool) -> None:
    slots = pool.store([A, B, C, D, E, F, G, H])
    run = pool.ranks[1].pin_prefix([A])
    assert run is not None
    # LRU order A..H; A is pinned, so the next victims are B and C; A goes back to the tail.
    assert pool.directory.reserve(2, owner_rank=0) == [slots[1], slots[2]]
    assert pool.directory.take_evicted() == [B, C]
    assert pool.directory.stats().num_evict_backoffs == 1
    assert pool.segment.state[slots[0]] == READY
    assert pool.segment.gen[slots[0]] == 0
    assert pool.directory.find_slot(A) == slots[0]
    for slot in pool.directory.reserve(2, owner_rank=0):
        pool.directory.abort(slot)
    assert pool.directory.take_evicted() == [D, E]
    pool.ranks[1].unpin(run)
    pool.directory.check_invariants()


def test_validate_flags_only_a_pinned_slot_that_was_really_evicted(pool: Pool) -> None:
    slots = pool.store([A, B])
    view = pool.ranks[1]
    run = view.pin_prefix([A, B])
    assert run is not None
    assert view.validate(run) == 0
    # The coordinator considering a pinned victim: EVICTING, sees the pin, back to READY.
    pool.segment.state[slots[0]] = EVICTING
    assert view.validate(run) == 0, "a back-off in progress is not a violation"
    pool.segment.state[slots[0]] = READY
    # A broken coordinator that evicts it anyway bumps the generation: caught.
    pool.segment.gen[slots[1]] += 1
    assert view.validate(run) == 1
    pool.segment.gen[slots[1]] -= 1
    view.unpin(run)


def test_everything_pinned_gives_a_partial_reservation(pool: Pool) -> None:
    pool.store([A, B, C, D, E, F])
    run = pool.ranks[0].pin_prefix([A, B, C, D])
    assert run is not None
    assert len(pool.directory.reserve(5, owner_rank=1)) == 4  # 2 free + E, F
    assert pool.directory.take_evicted() == [E, F]
    assert pool.directory.reserve(1, owner_rank=1) == []
    assert pool.directory.stats().num_evict_backoffs == 8  # A..D twice
    assert pool.directory.num_ready == 4
    assert len(pool.directory.policy) == 4, "pinned victims go back into the policy"
    pool.ranks[0].unpin(run)
    for slot in np.flatnonzero(pool.segment.state == RESERVED).tolist():
        pool.directory.abort(slot)
    pool.directory.check_invariants()


def test_try_remove(pool: Pool) -> None:
    slots = pool.store([A, B])
    run = pool.ranks[0].pin_prefix([A])
    assert run is not None
    assert not pool.directory.try_remove(A), "pinned"
    assert not pool.directory.try_remove(C), "absent"
    assert pool.directory.try_remove(B)
    assert pool.directory.take_evicted() == [B]
    assert pool.segment.state[slots[1]] == FREE
    assert pool.directory.num_ready == 1
    pool.ranks[0].unpin(run)
    assert pool.directory.try_remove(A)
    pool.directory.check_invariants()


def test_generation_bump_invalidates_a_stale_lookup(pool: Pool) -> None:
    [slot] = pool.store([A])
    [(found, gen)] = pool.ranks[0].lookup_prefix([A])
    assert (found, gen) == (slot, 0)
    assert pool.directory.try_remove(A)
    [again] = pool.directory.reserve(1, owner_rank=1)
    assert again == slot
    assert pool.directory.commit(slot, B, None, 1, 0, None, owner_rank=1)
    assert pool.segment.gen[slot] == 1 != gen
    assert pool.ranks[0].pin_prefix([A]) is None
    assert pool.ranks[0].lookup_prefix([B]) == [(slot, 1)]
    pool.directory.check_invariants()


# -- pins --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vectorized", [False, True])
def test_pin_prefix_stops_at_the_first_missing_block(pool: Pool, vectorized: bool) -> None:
    slots = pool.store([A, B, D])
    view = pool.ranks[1]
    run = view.pin_prefix([A, B, C, D], vectorized=vectorized)
    assert run is not None
    assert (run.slots, run.gens, run.seq_hashes, run.rank) == (
        [slots[0], slots[1]],
        [0, 0],
        [A, B],
        1,
    )
    assert pool.segment.pins[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert pool.segment.pins[0].sum() == 0, "only the rank's own row is written"
    assert view.pin_prefix([C, A], vectorized=vectorized) is None
    assert view.pin_prefix([], vectorized=vectorized) is None
    view.check_ledger()
    view.unpin(run)
    assert pool.segment.pins.sum() == 0
    view.check_ledger()


@pytest.mark.parametrize("vectorized", [False, True])
def test_pins_count_per_rank_and_nest(pool: Pool, vectorized: bool) -> None:
    slots = pool.store([A, B])
    first = pool.ranks[0].pin_prefix([A, B], vectorized=vectorized)
    second = pool.ranks[0].pin_prefix([A], vectorized=vectorized)
    other = pool.ranks[1].pin_prefix(np.array([A, B], dtype=np.uint64), vectorized=vectorized)
    assert first is not None
    assert second is not None
    assert other is not None
    assert other.seq_hashes == [A, B]
    assert pool.segment.pins[0, slots].tolist() == [2, 1]
    assert pool.segment.pins[1, slots].tolist() == [1, 1]
    assert (pool.ranks[0].num_runs, pool.ranks[0].num_pinned_blocks) == (2, 3)
    pool.ranks[0].check_ledger()
    pool.ranks[0].unpin(first)
    assert pool.segment.pins[0, slots].tolist() == [1, 0]
    assert pool.ranks[0].unpin_all() == 1
    pool.ranks[1].unpin(other)
    assert pool.segment.pins.sum() == 0


def test_pin_prefixes_pins_each_list_in_one_batch(pool: Pool) -> None:
    slots = pool.store([A, B, C])
    view = pool.ranks[1]
    runs = view.pin_prefixes([[A, B, C], [C, A], [], [D], [B, D, A]])
    assert [None if r is None else r.seq_hashes for r in runs] == [
        [A, B, C],
        [C, A],
        None,
        None,
        [B],
    ]
    assert [None if r is None else r.slots for r in runs] == [
        slots,
        [slots[2], slots[0]],
        None,
        None,
        [slots[1]],
    ]
    assert pool.segment.pins[1, slots].tolist() == [2, 2, 2]
    assert view.pin_prefixes([]) == []
    view.check_ledger()
    held = [r for r in runs if r is not None]
    view.unpin_many(held)
    assert pool.segment.pins.sum() == 0
    assert view.num_runs == 0
    with pytest.raises(InvariantError, match="does not hold"):
        view.unpin_many(held)
    again = view.pin_prefix([A])
    assert again is not None
    with pytest.raises(InvariantError):
        view.unpin_many([again, again])
    assert pool.segment.pins[1, slots[0]] == 1, "a refused unpin_many releases nothing"
    view.unpin_many([again])


def test_pin_prefixes_lost_race_truncates_only_the_affected_list(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = pool.store([A, B, C, D])

    def coordinator_marks_c_evicting() -> None:
        pool.segment.state[slots[2]] = EVICTING

    patch_fence(monkeypatch, coordinator_marks_c_evicting)
    runs = pool.ranks[0].pin_prefixes([[A, B], [B, C, D], [C], [D]])
    assert [None if r is None else r.seq_hashes for r in runs] == [[A, B], [B], None, [D]]
    assert pool.segment.pins[0, slots].tolist() == [1, 2, 0, 1]
    pool.segment.state[slots[2]] = READY
    pool.ranks[0].check_ledger()
    pool.ranks[0].unpin_many([r for r in runs if r is not None])
    pool.directory.check_invariants()


def test_unpin_twice_or_by_another_rank_is_a_bug(pool: Pool) -> None:
    pool.store([A])
    run = pool.ranks[0].pin_prefix([A])
    assert run is not None
    with pytest.raises(InvariantError, match="does not hold"):
        pool.ranks[1].unpin(run)
    with pytest.raises(InvariantError, match="does not hold"):
        pool.ranks[1].read_tokens(run)
    pool.ranks[0].unpin(run)
    with pytest.raises(InvariantError, match="double unpin"):
        pool.ranks[0].unpin(run)
    forged = PinnedRun(999, 0, [0], [0], [A])
    with pytest.raises(InvariantError):
        pool.ranks[0].unpin(forged)
    assert pool.segment.pins.sum() == 0


def test_check_ledger_catches_a_row_that_drifted(pool: Pool) -> None:
    pool.store([A])
    run = pool.ranks[0].pin_prefix([A])
    assert run is not None
    pool.segment.pins[0, run.slots[0]] += 1
    with pytest.raises(InvariantError, match="disagrees with its ledger"):
        pool.ranks[0].check_ledger()
    pool.segment.pins[0, run.slots[0]] -= 1
    pool.ranks[0].check_ledger()
    pool.ranks[0].unpin(run)


@pytest.mark.parametrize("vectorized", [False, True])
def test_a_saturated_pin_cell_ends_the_run(pool: Pool, vectorized: bool) -> None:
    slots = pool.store([A, B])
    pool.segment.pins[0, slots[1]] = PIN_MAX
    run = pool.ranks[0].pin_prefix([A, B], vectorized=vectorized)
    assert run is not None
    assert run.slots == [slots[0]]
    pool.ranks[0].unpin(run)
    pool.segment.pins[0, slots[0]] = PIN_MAX
    assert pool.ranks[0].pin_prefix([A, B], vectorized=vectorized) is None
    pool.segment.pins[0] = 0


@pytest.mark.parametrize("vectorized", [False, True])
def test_lost_race_with_an_eviction_undoes_the_pin(
    pool: Pool, monkeypatch: pytest.MonkeyPatch, vectorized: bool
) -> None:
    slots = pool.store([A, B, C])

    def coordinator_marks_b_evicting() -> None:
        pool.segment.state[slots[1]] = EVICTING

    patch_fence(monkeypatch, coordinator_marks_b_evicting)
    run = pool.ranks[0].pin_prefix([A, B, C], vectorized=vectorized)
    assert run is not None
    assert run.slots == [slots[0]], "B lost the race; C after it is given up too"
    assert pool.segment.pins[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    pool.segment.state[slots[1]] = READY
    pool.ranks[0].unpin(run)
    pool.directory.check_invariants()


@pytest.mark.parametrize("vectorized", [False, True])
def test_a_reassigned_slot_fails_the_generation_check(
    pool: Pool, monkeypatch: pytest.MonkeyPatch, vectorized: bool
) -> None:
    slots = pool.store([A, B])

    def coordinator_reassigns_a() -> None:
        # Evicted and stored again between the rank's validation and its re-check.
        pool.segment.gen[slots[0]] += 1

    patch_fence(monkeypatch, coordinator_reassigns_a)
    assert pool.ranks[0].pin_prefix([A, B], vectorized=vectorized) is None
    assert pool.segment.pins.sum() == 0


def test_the_coordinator_backs_off_from_a_pin_it_sees(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = pool.store([A, B, C, D, E, F, G, H])

    def rank_pins_a_meanwhile() -> None:
        # The rank stored its pin before the coordinator's fence: the coordinator must see it.
        pool.segment.pins[1, slots[0]] = 1

    patch_fence(monkeypatch, rank_pins_a_meanwhile)
    assert pool.directory.reserve(1, owner_rank=0) == [slots[1]]
    assert pool.directory.take_evicted() == [B]
    assert pool.segment.state[slots[0]] == READY
    pool.segment.pins[1, slots[0]] = 0


# -- lookups -----------------------------------------------------------------------------------


def test_lookup_many_and_find_slot(pool: Pool) -> None:
    slots = pool.store([A, B, C])
    [reserved] = pool.directory.reserve(1, owner_rank=0)
    found = pool.ranks[0].lookup_many([C, D, A, B, 2**64 - 1])
    assert found.tolist() == [slots[2], -1, slots[0], slots[1], -1]
    assert pool.directory.lookup_many(np.array([B], dtype=np.uint64)).tolist() == [slots[1]]
    assert pool.ranks[1].find_slot(D) == -1
    pool.directory.abort(reserved)


def test_colliding_hashes_probe_tombstones_and_clear_them(fleet_id: str) -> None:
    with make_pool(fleet_id, capacity=8) as pool:
        size = pool.segment.index_size
        assert size == 16
        keys = [5, 5 + size, 5 + 2 * size]  # one home cell, a chain of three
        slots = pool.store(keys)
        assert pool.segment.index_slot[5:9].tolist() == [slots[0], slots[1], slots[2], INDEX_EMPTY]
        assert pool.ranks[0].lookup_many(keys).tolist() == slots
        for vectorized in (False, True):
            run = pool.ranks[0].pin_prefix(keys, vectorized=vectorized)
            assert run is not None
            assert run.slots == slots
            pool.ranks[0].unpin(run)
        assert pool.directory.try_remove(keys[1])
        assert pool.segment.index_slot[5:9].tolist() == [
            slots[0],
            INDEX_TOMBSTONE,
            slots[2],
            INDEX_EMPTY,
        ]
        assert pool.directory.find_slot(keys[2]) == slots[2], "probing passes the tombstone"
        pool.directory.check_invariants()
        assert pool.directory.try_remove(keys[2])
        # The chain now ends at cell 5: the tombstone before the freed cell is cleared too.
        assert pool.segment.index_slot[5:9].tolist() == [
            slots[0],
            INDEX_EMPTY,
            INDEX_EMPTY,
            INDEX_EMPTY,
        ]
        pool.directory.check_invariants()
        # A new key with the same home reuses the first free cell after the chain.
        [slot] = pool.directory.reserve(1, owner_rank=0)
        assert pool.directory.commit(slot, 5 + 3 * size, None, 0, 0, None, owner_rank=0)
        assert pool.segment.index_slot[6] == slot
        pool.directory.check_invariants()


def test_churn_keeps_the_index_exact_and_rebuilds_it(fleet_id: str) -> None:
    rng = np.random.default_rng(7)
    with make_pool(fleet_id, capacity=32) as pool:
        live: dict[int, int] = {}
        for step in range(3000):
            seq_hash = int(rng.integers(0, 2**64, dtype=np.uint64))
            [slot] = pool.directory.reserve(1, owner_rank=step % 2)
            for evicted in pool.directory.take_evicted():
                del live[evicted]
            assert pool.directory.commit(slot, seq_hash, None, 0, 0, None, owner_rank=step % 2)
            live[seq_hash] = slot
            if step % 7 == 0:
                victim = next(iter(live))
                assert pool.directory.try_remove(victim)
                del live[victim]
                pool.directory.take_evicted()
            if step % 500 == 0:
                pool.directory.check_invariants()
        keys = list(live)
        assert pool.ranks[0].lookup_many(keys).tolist() == [live[k] for k in keys]
        pool.directory._rebuild_index()
        assert pool.directory.stats().num_index_rebuilds >= 1
        assert pool.ranks[1].lookup_many(keys).tolist() == [live[k] for k in keys]
        pool.directory.check_invariants()


# -- dead ranks and invariants -----------------------------------------------------------------


def test_remove_dead_rank_releases_pins_and_reservations(pool: Pool) -> None:
    slots = pool.store([A, B, C])
    dead = pool.ranks[1]
    assert dead.pin_prefix([A, B]) is not None
    assert dead.pin_prefix([A]) is not None
    survivor = pool.ranks[0].pin_prefix([C])
    assert survivor is not None
    reserved = pool.directory.reserve(2, owner_rank=1)
    kept = pool.directory.reserve(1, owner_rank=0)
    cleanup = pool.directory.remove_dead_rank(1)
    assert (cleanup.rank, cleanup.pins_released, cleanup.slots_pinned) == (1, 3, 2)
    assert (cleanup.slots_aborted, cleanup.epoch) == (2, 1)
    assert int(pool.segment.rank_epoch[1]) == 1
    assert pool.segment.pins[1].sum() == 0
    assert pool.segment.pins[0, slots[2]] == 1, "other ranks' pins stay"
    assert pool.segment.state[reserved].tolist() == [FREE, FREE]
    assert pool.segment.gen[reserved].tolist() == [1, 1]
    assert pool.segment.state[kept[0]] == RESERVED
    pool.directory.abort(kept[0])
    pool.directory.check_invariants()
    # The dead rank's evicted-from-under-it slots are evictable again.
    assert pool.directory.try_remove(A)
    pool.ranks[0].unpin(survivor)
    # A real dead rank never unpins; its ledger died with its process.
    dead._ledger.clear()


def test_check_invariants_reports_corruption(pool: Pool) -> None:
    slots = pool.store([A, B])
    pool.directory.check_invariants()
    pool.segment.state[slots[0]] = FREE
    with pytest.raises(InvariantError, match="free stack"):
        pool.directory.check_invariants()
    pool.segment.state[slots[0]] = READY
    pool.segment.pins[0, 5] = 1
    with pytest.raises(InvariantError, match="pins on non-READY"):
        pool.directory.check_invariants()
    pool.segment.pins[0, 5] = 0
    pool.segment.index_slot[:] = INDEX_EMPTY
    with pytest.raises(InvariantError, match="index"):
        pool.directory.check_invariants()


def test_policy_keys_are_plhs(pool: Pool) -> None:
    pool.store([A, B])
    policy = pool.directory.policy
    assert isinstance(policy, LruBackend)
    assert make_plh(A, None, 0) in policy
    assert make_plh(B, A, 1) in policy


def test_a_policy_refusal_leaves_the_slot_reserved(fleet_id: str) -> None:
    with G2Segment.create(f"{fleet_id}p", capacity=4, block_size=BLOCK_SIZE, num_ranks=1) as seg:
        directory = G2Directory(seg, RefusingLru(make_plh(B, None, 0)))
        try:
            [slot] = directory.reserve(1, owner_rank=0)
            with pytest.raises(InvariantError, match="refused"):
                directory.commit(slot, B, None, 1, 0, None, owner_rank=0)
            assert seg.state[slot] == RESERVED
            assert directory.find_slot(B) == -1
            directory.abort(slot)
            directory.check_invariants()
        finally:
            directory.close()


def test_directory_needs_a_fresh_owned_segment(pool: Pool, fleet_id: str) -> None:
    with (
        G2Segment.attach(pool.segment.name) as attached,
        pytest.raises(ConfigError, match="creator"),
    ):
        G2Directory(attached, LruBackend())
    busy = LruBackend()
    busy.insert(1)
    with pytest.raises(ConfigError, match="empty eviction policy"):
        G2Directory(pool.segment, busy)
    pool.store([A])
    with pytest.raises(ConfigError, match="not fresh"):
        G2Directory(pool.segment, LruBackend())


def test_views_refuse_work_after_close(pool: Pool) -> None:
    view = G2RankView(pool.segment, 0)
    view.close()
    view.close()
    with pytest.raises(ClosedError):
        view.pin_prefix([A])
    with pytest.raises(ConfigError):
        G2RankView(pool.segment, 2)


def test_closing_a_rank_view_releases_its_pins(pool: Pool) -> None:
    pool.store([A, B])
    view = G2RankView(pool.segment, 1)
    assert view.pin_prefix([A, B]) is not None
    view.close()
    assert pool.segment.pins.sum() == 0
