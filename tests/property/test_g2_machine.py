"""A hypothesis state machine driving `G2Directory` and two `G2RankView`s over one segment,
checked against a plain-dict model after every step.

Rules: reserve (free slots first, then LRU victims, pinned victims skipped and re-queued),
commit (duplicates by hash or PLH rejected), abort, pin a prefix (either path) or several at
once, unpin one or several runs, remove a block on purpose, and declare a rank dead. Hashes come from a small pool, some sharing a home
cell of the index, so hits, misses, duplicates, probing and tombstones all happen.

After every step: `check_invariants`, every rank's ledger equals its pin row, the pin rows equal
the model's, and `lookup_many` over the whole pool gives exactly the model's READY slots.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shmkv.eviction.lru import LruBackend
from shmkv.g2 import G2Directory, G2RankView, PinnedRun
from shmkv.hashing import make_plh
from shmkv.shm import FREE, G2Segment

CAPACITY = 6
NUM_RANKS = 2
INDEX_SIZE = 16  # 2 * 6 rounded up to a cache line of int32 cells

_rng = random.Random(5)
HASH_POOL: tuple[int, ...] = (
    *(_rng.getrandbits(64) for _ in range(8)),
    3,
    3 + INDEX_SIZE,
    3 + 2 * INDEX_SIZE,  # three keys with one home cell
    15,
    15 + INDEX_SIZE,  # wraps around the end of the index
    1 << 60,
    (1 << 60) | (1 << 62),  # same low 59 bits: the same PLH at position 0
)

hashes = st.sampled_from(HASH_POOL)
ranks = st.integers(0, NUM_RANKS - 1)


class G2Machine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        fleet_id = f"hm{uuid.uuid4().hex[:12]}"
        self.segment = G2Segment.create(
            fleet_id, capacity=CAPACITY, block_size=2, num_ranks=NUM_RANKS
        )
        self.directory = G2Directory(self.segment, LruBackend())
        self.views = [G2RankView(self.segment, r) for r in range(NUM_RANKS)]
        # The model.
        self.ready: dict[int, int] = {}  # hash -> slot
        self.lru: list[int] = []  # hashes, least recently stored first
        self.reserved: dict[int, int] = {}  # slot -> rank
        self.runs: list[list[PinnedRun]] = [[] for _ in range(NUM_RANKS)]

    def teardown(self) -> None:
        self.segment.unlink()
        for view in self.views:
            view.close()
        self.directory.close()
        self.segment.close()

    # -- model helpers -------------------------------------------------------------------------

    def pinned_slots(self) -> Counter[int]:
        return Counter(slot for runs in self.runs for run in runs for slot in run.slots)

    def num_free(self) -> int:
        return CAPACITY - len(self.ready) - len(self.reserved)

    # -- rules ---------------------------------------------------------------------------------

    @rule(count=st.integers(0, 3), rank=ranks)
    def reserve(self, count: int, rank: int) -> None:
        from_free = min(count, self.num_free())
        pinned = self.pinned_slots()
        expected_evicted: list[int] = []
        skipped: list[int] = []
        queue = list(self.lru)
        while from_free + len(expected_evicted) < count and queue:
            victim = queue.pop(0)
            if pinned[self.ready[victim]]:
                skipped.append(victim)
            else:
                expected_evicted.append(victim)
        expected_slots = {self.ready[h] for h in expected_evicted}

        slots = self.directory.reserve(count, rank)

        assert self.directory.take_evicted() == expected_evicted
        assert len(slots) == from_free + len(expected_evicted)
        assert len(set(slots)) == len(slots)
        assert expected_slots <= set(slots)
        self.lru = queue + skipped
        for victim in expected_evicted:
            del self.ready[victim]
        for slot in slots:
            self.reserved[slot] = rank

    @precondition(lambda self: self.reserved)
    @rule(data=st.data(), seq_hash=hashes)
    def commit(self, data: st.DataObject, seq_hash: int) -> None:
        slot = data.draw(st.sampled_from(sorted(self.reserved)))
        rank = self.reserved.pop(slot)
        plhs = {make_plh(h, None, 0) for h in self.ready}
        duplicate = seq_hash in self.ready or make_plh(seq_hash, None, 0) in plhs
        committed = self.directory.commit(slot, seq_hash, None, seq_hash ^ 1, 0, [slot, rank], rank)
        assert committed == (not duplicate)
        if committed:
            self.ready[seq_hash] = slot
            self.lru.append(seq_hash)
        else:
            assert self.segment.state[slot] == FREE

    @precondition(lambda self: self.reserved)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.reserved)))
        del self.reserved[slot]
        self.directory.abort(slot)

    @rule(rank=ranks, wanted=st.lists(hashes, min_size=0, max_size=4), vectorized=st.booleans())
    def pin(self, rank: int, wanted: list[int], vectorized: bool) -> None:
        prefix: list[int] = []
        for seq_hash in wanted:
            if seq_hash not in self.ready:
                break
            prefix.append(seq_hash)
        run = self.views[rank].pin_prefix(wanted, vectorized=vectorized)
        if not prefix:
            assert run is None
            return
        assert run is not None
        assert run.seq_hashes == prefix
        assert run.slots == [self.ready[h] for h in prefix]
        assert run.rank == rank
        assert self.views[rank].lookup_prefix(wanted) == list(zip(run.slots, run.gens, strict=True))
        self.runs[rank].append(run)

    @rule(rank=ranks, lists=st.lists(st.lists(hashes, max_size=4), max_size=4))
    def pin_many(self, rank: int, lists: list[list[int]]) -> None:
        runs = self.views[rank].pin_prefixes(lists)
        assert len(runs) == len(lists)
        for wanted, run in zip(lists, runs, strict=True):
            prefix: list[int] = []
            for seq_hash in wanted:
                if seq_hash not in self.ready:
                    break
                prefix.append(seq_hash)
            if not prefix:
                assert run is None
                continue
            assert run is not None
            assert run.seq_hashes == prefix
            assert run.slots == [self.ready[h] for h in prefix]
            self.runs[rank].append(run)

    @precondition(lambda self: any(len(runs) > 1 for runs in self.runs))
    @rule(data=st.data())
    def unpin_many(self, data: st.DataObject) -> None:
        rank = data.draw(st.sampled_from([r for r in range(NUM_RANKS) if len(self.runs[r]) > 1]))
        count = data.draw(st.integers(1, len(self.runs[rank])))
        chosen, self.runs[rank] = self.runs[rank][:count], self.runs[rank][count:]
        self.views[rank].unpin_many(chosen)

    @precondition(lambda self: any(self.runs))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        rank = data.draw(st.sampled_from([r for r in range(NUM_RANKS) if self.runs[r]]))
        run = self.runs[rank].pop(data.draw(st.integers(0, len(self.runs[rank]) - 1)))
        self.views[rank].unpin(run)

    @rule(seq_hash=hashes)
    def try_remove(self, seq_hash: int) -> None:
        expected = seq_hash in self.ready and not self.pinned_slots()[self.ready[seq_hash]]
        assert self.directory.try_remove(seq_hash) == expected
        if expected:
            assert self.directory.take_evicted() == [seq_hash]
            del self.ready[seq_hash]
            self.lru.remove(seq_hash)

    @rule(rank=ranks)
    def rank_dies(self, rank: int) -> None:
        pins = sum(len(run) for run in self.runs[rank])
        owned = [slot for slot, owner in self.reserved.items() if owner == rank]
        cleanup = self.directory.remove_dead_rank(rank)
        assert cleanup.pins_released == pins
        assert cleanup.slots_aborted == len(owned)
        for slot in owned:
            del self.reserved[slot]
        # The process is gone: so are its ledger and runs. A new view takes the rank over.
        self.views[rank]._ledger.clear()
        self.views[rank].close()
        self.views[rank] = G2RankView(self.segment, rank)
        self.runs[rank].clear()

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def directory_is_consistent(self) -> None:
        self.directory.check_invariants()
        assert self.directory.num_ready == len(self.ready)
        assert self.directory.num_reserved == len(self.reserved)
        assert self.directory.num_free == self.num_free()

    @invariant()
    def pins_match_the_ledgers(self) -> None:
        expected = np.zeros((NUM_RANKS, CAPACITY), dtype=np.int64)
        for rank, runs in enumerate(self.runs):
            for run in runs:
                np.add.at(expected[rank], run.slots, 1)
        assert np.array_equal(self.segment.pins, expected)
        for view in self.views:
            view.check_ledger()

    @invariant()
    def lookups_match_the_model(self) -> None:
        found = self.views[0].lookup_many(list(HASH_POOL)).tolist()
        assert found == [self.ready.get(h, -1) for h in HASH_POOL]


TestG2Machine = G2Machine.TestCase
