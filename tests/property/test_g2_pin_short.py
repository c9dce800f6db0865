"""`G2RankView.pin_prefix`'s default path for short lists (`_pin_short`: slot hints, numpy
gathers, one scatter) against the per-block reference (`pin_prefix(..., vectorized=False)`).

One pool, two ranks: rank 0 pins through the default path, rank 1 through the reference, the
same lists in the same order, while the coordinator stores, evicts (slot reuse: rank 0's hints
go stale) and removes blocks in between. After every step both ranks hold the same runs
(slots, gens, hashes), their pin rows are equal, and `release` counts what `validate` counts.
The coordinator's concurrent moves inside the fence are in the unit tests below the machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import given, settings, strategies as st

from shmkv.errors import InvariantError
from shmkv.eviction.lru import LruBackend
from shmkv.g2 import G2Directory, G2RankView, PinnedRun
from shmkv.shm import EVICTING, PIN_MAX, READY, G2Segment
from tests.g2_fence import patch_fence
from tests.g2_pool import g2_pool

CAPACITY = 48
BLOCK_SIZE = 2


@dataclass
class Pool:
    segment: G2Segment
    directory: G2Directory
    fast: G2RankView
    reference: G2RankView

    def store(self, hashes: list[int]) -> list[int]:
        """Reserve (evicting LRU blocks no rank pins) and commit a chain; returns its slots."""
        slots = self.directory.reserve(len(hashes), 0)
        parent: int | None = None
        stored: list[int] = []
        for position, (slot, seq_hash) in enumerate(zip(slots, hashes, strict=False)):
            if self.directory.commit(slot, seq_hash, parent, seq_hash ^ 0xFF, position, [1, 2], 0):
                stored.append(slot)
            parent = seq_hash
        return stored


@contextmanager
def _pool() -> Iterator[Pool]:
    with g2_pool("ps", CAPACITY, BLOCK_SIZE, 2, LruBackend()) as (segment, directory, views):
        yield Pool(segment, directory, views[0], views[1])


def _shape(run: PinnedRun | None) -> tuple[list[int], list[int], list[int]] | None:
    return None if run is None else (run.slots, run.gens, run.seq_hashes)


def _hash_pool(rng: random.Random, index_size: int) -> list[int]:
    """Random hashes, plus groups sharing a home cell of the index (long probe paths)."""
    base = [rng.getrandbits(64) for _ in range(40)]
    crowded = [(7 + k * index_size) for k in range(8)] + [
        (index_size - 1 + k * index_size)
        for k in range(4)  # wraps around the table's end
    ]
    return base + crowded


def _query(rng: random.Random, chains: list[list[int]], hashes: list[int]) -> list[int]:
    """A list to pin: usually a stored chain's prefix (maybe with a tail G2 lacks), sometimes
    a repeated hash or a random list."""
    roll = rng.random()
    if chains and roll < 0.75:
        chain = rng.choice(chains)
        keys = chain[: rng.randint(1, len(chain))]
        if rng.random() < 0.3:
            keys = keys + rng.sample(hashes, rng.randint(1, 3))
        if rng.random() < 0.1 and len(keys) > 1:
            keys.insert(rng.randrange(1, len(keys)), keys[0])  # the same hash twice
        return keys
    return rng.sample(hashes, rng.randint(0, 12))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(10, 80))
def test_the_short_path_pins_what_the_reference_pins(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    with _pool() as pool:
        hashes = _hash_pool(rng, pool.segment.index_size)
        chains: list[list[int]] = []
        held: list[tuple[PinnedRun, PinnedRun]] = []
        for _ in range(steps):
            roll = rng.random()
            if roll < 0.3:
                chain = rng.sample(hashes, rng.randint(1, 16))
                pool.store(chain)
                chains.append(chain)
            elif roll < 0.4 and chains:
                chain = rng.choice(chains)
                for seq_hash in reversed(chain):
                    pool.directory.try_remove(seq_hash)
            elif roll < 0.8:
                keys = _query(rng, chains, hashes)
                fast = pool.fast.pin_prefix(keys)
                reference = pool.reference.pin_prefix(keys, vectorized=False)
                assert _shape(fast) == _shape(reference), keys
                if fast is not None and reference is not None:
                    held.append((fast, reference))
            elif held:
                fast, reference = held.pop(rng.randrange(len(held)))
                expected = pool.reference.validate(reference)
                pool.reference.unpin(reference)
                assert pool.fast.release(fast) == expected
            assert pool.segment.pins[0].tolist() == pool.segment.pins[1].tolist()
            pool.fast.check_ledger()
        pool.fast.unpin_many([fast for fast, _ in held])
        pool.fast.check_ledger()
        assert pool.segment.pins[0].sum() == 0
        pool.directory.check_invariants()


# -- the coordinator's moves inside the rank's fence ----------------------------------------------

A, B, C, D, E = 0xA1, 0xB2, 0xC3, 0xD4, 0xE5


def _pinned_twice(pool: Pool, keys: list[int]) -> None:
    """Warm rank 0's hints (so the next pin takes the short path without probing)."""
    run = pool.fast.pin_prefix(keys)
    assert run is not None
    assert len(run) == len(keys)
    assert pool.fast.release(run) == 0


@pytest.mark.parametrize("lost_at", [0, 2, 4])
@pytest.mark.parametrize("move", ["evicting", "new_gen"])
def test_a_slot_changed_across_the_fence_is_undone_as_in_the_reference(
    monkeypatch: pytest.MonkeyPatch, lost_at: int, move: str
) -> None:
    with _pool() as pool:
        slots = pool.store([A, B, C, D, E])
        _pinned_twice(pool, [A, B, C, D, E])
        runs: list[PinnedRun | None] = []
        for view, vectorized in ((pool.fast, None), (pool.reference, False)):

            def coordinator_moves() -> None:
                if move == "evicting":
                    pool.segment.state[slots[lost_at]] = EVICTING
                else:
                    pool.segment.gen[slots[lost_at]] += 1

            patch_fence(monkeypatch, coordinator_moves)
            runs.append(view.pin_prefix([A, B, C, D, E], vectorized=vectorized))
            pool.segment.state[slots[lost_at]] = READY
        fast, reference = runs
        assert _shape(fast) == _shape(reference)
        keys = [A, B, C, D, E]
        assert _shape(fast) == (
            None if lost_at == 0 else (slots[:lost_at], [0] * lost_at, keys[:lost_at])
        )
        assert pool.segment.pins[0].tolist() == pool.segment.pins[1].tolist()
        assert int(pool.segment.pins[0].sum()) == lost_at
        pool.fast.check_ledger()
        pool.fast.unpin_all()
        pool.reference.unpin_all()


def test_a_stale_hint_is_not_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    with _pool() as pool:
        slots = pool.store([A, B, C, D])
        _pinned_twice(pool, [A, B, C, D])
        # B leaves and comes back in another slot: rank 0's hint for B is stale.
        for seq_hash in (D, C, B):
            assert pool.directory.try_remove(seq_hash)
        pool.store([0x11, 0x22, 0x33])  # takes the freed slots
        new_slots = pool.store([E, B, C, D])
        assert not set(new_slots) & set(slots)
        run = pool.fast.pin_prefix([A, B, C, D])
        reference = pool.reference.pin_prefix([A, B, C, D], vectorized=False)
        assert _shape(run) == _shape(reference)
        assert run is not None
        assert run.slots == [slots[0], *new_slots[1:]]
        assert pool.fast.pin_prefix([A, B, C, D]) is not None, "the hints are right again"
        pool.fast.unpin(run)
        assert reference is not None
        pool.reference.unpin(reference)


def test_a_near_saturated_pin_cell_takes_the_reference_path() -> None:
    with _pool() as pool:
        slots = pool.store([A, B, C, D, E])
        _pinned_twice(pool, [A, B, C, D, E])
        pool.segment.pins[0, slots[3]] = PIN_MAX
        run = pool.fast.pin_prefix([A, B, C, D, E])
        assert run is not None
        assert run.slots == slots[:3]
        assert pool.segment.pins[0, slots[3]] == PIN_MAX
        pool.fast.release(run)
        pool.segment.pins[0, slots[3]] = 0
        pool.fast.check_ledger()


def test_release_counts_violations_and_refuses_a_run_it_does_not_hold() -> None:
    with _pool() as pool:
        slots = pool.store([A, B, C, D, E])
        run = pool.fast.pin_prefix([A, B, C, D, E])
        assert run is not None
        with pytest.raises(InvariantError, match="does not hold"):
            pool.reference.release(run)
        pool.segment.state[slots[1]] = EVICTING  # a back-off in progress: not a violation
        pool.segment.gen[slots[2]] += 1  # reused under the pin: a violation
        pool.segment.seq_hash[slots[3]] = 1234  # rewritten under the pin: a violation
        assert pool.fast.validate(run) == 2
        assert pool.fast.release(run) == 2
        assert pool.segment.pins[0].sum() == 0
        with pytest.raises(InvariantError, match="double unpin"):
            pool.fast.release(run)
        assert pool.segment.pins[0].sum() == 0
        pool.segment.state[slots[1]] = READY
        pool.fast.check_ledger()
