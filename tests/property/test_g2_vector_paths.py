"""The vectorized G2 paths against their per-block reference, step by step.

Two pools receive the same operations: pool A takes the per-block paths (`reserve(...,
vectorized=False)`, `commit` one block at a time, `pin_prefix(..., vectorized=False)` one list
at a time), pool B the batched ones (`reserve`, `commit_many`, `pin_prefixes`, `unpin_many`).
After every step both return the same values (slots, duplicate flags, runs, evicted hashes in
order, raised errors) and the segments are byte-for-byte equal, index cells included.

Hashes come from a small pool that collides on purpose: on home cells of the index, on PLHs
(same low 59 bits), on Lineage nodes (same position and current fragment under different
parents, which Lineage refuses), and positions cross the first PLH mode (255).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shmkv.errors import InvariantError
from shmkv.eviction import make_backend
from shmkv.eviction.lru import LruBackend
from shmkv.g2 import G2Directory, G2RankView, PinnedRun, plhs_of, plhs_of_columns
from shmkv.hashing import make_plh
from shmkv.shm import G2Segment
from tests.g2_pool import g2_pool
from tests.refusing_policy import RefusingLru

CAPACITY = 10
NUM_RANKS = 2
BLOCK_SIZE = 2
INDEX_SIZE = 32  # 2 * 10 rounded up to a cache line of int32 cells
FIELDS = (
    "state",
    "flags",
    "owner",
    "position",
    "gen",
    "seq_hash",
    "parent_hash",
    "local_hash",
    "pins",
    "index_slot",
    "tokens",
)

_rng = random.Random(7)
HASH_POOL: tuple[int, ...] = (
    *(_rng.getrandbits(64) for _ in range(10)),
    5,
    5 + INDEX_SIZE,
    5 + 2 * INDEX_SIZE,  # one home cell
    31,
    31 + INDEX_SIZE,  # wraps around the end of the index
    1 << 60,
    (1 << 60) | (1 << 62),  # same low 59 bits: the same PLH at the same position and parent
)
hashes = st.sampled_from(HASH_POOL)
parents = st.one_of(st.none(), hashes)
positions = st.sampled_from((0, 1, 2, 254, 255, 300))
ranks = st.integers(0, NUM_RANKS - 1)


@dataclass
class Pool:
    segment: G2Segment
    directory: G2Directory
    views: list[G2RankView]


@contextmanager
def _pool(policy: str) -> Iterator[Pool]:
    backend = LruBackend() if policy == "lru" else make_backend("lineage", CAPACITY)[0]
    with g2_pool("hv", CAPACITY, BLOCK_SIZE, NUM_RANKS, backend) as (segment, directory, views):
        yield Pool(segment, directory, views)


def _outcome(call: object, *args: object, **kwargs: object) -> tuple[str, object]:
    """("ok", value) or ("raised", exception type and message)."""
    assert callable(call)
    try:
        return "ok", call(*args, **kwargs)
    except Exception as exc:
        return "raised", (type(exc).__name__, str(exc))


def _runs(runs: list[PinnedRun | None]) -> list[tuple[list[int], list[int], list[int]] | None]:
    return [None if r is None else (r.slots, r.gens, r.seq_hashes) for r in runs]


class VectorPaths(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._stack = ExitStack()
        self.reserved: dict[int, int] = {}  # slot -> rank (identical in both pools)
        self.runs: list[list[tuple[PinnedRun, PinnedRun]]] = [[] for _ in range(NUM_RANKS)]

    @initialize(policy=st.sampled_from(("lineage", "lru")))
    def make_pools(self, policy: str) -> None:
        self.a = self._stack.enter_context(_pool(policy))
        self.b = self._stack.enter_context(_pool(policy))

    def teardown(self) -> None:
        self._stack.close()

    def _same_reservations(self) -> None:
        for slot in list(self.reserved):
            if self.b.segment.state[slot] != 1:  # committed or freed
                del self.reserved[slot]

    @rule(count=st.integers(0, 5), rank=ranks)
    def reserve(self, count: int, rank: int) -> None:
        got_a = self.a.directory.reserve(count, rank, vectorized=False)
        got_b = self.b.directory.reserve(count, rank)
        assert got_a == got_b
        assert self.a.directory.take_evicted() == self.b.directory.take_evicted()
        for slot in got_a:
            self.reserved[slot] = rank

    @precondition(lambda self: self.reserved)
    @rule(data=st.data(), with_tokens=st.booleans(), pass_plhs=st.booleans())
    def commit(self, data: st.DataObject, with_tokens: bool, pass_plhs: bool) -> None:
        rank = data.draw(st.sampled_from(sorted(set(self.reserved.values()))))
        mine = [slot for slot, owner in self.reserved.items() if owner == rank]
        slots = data.draw(st.permutations(mine))[: data.draw(st.integers(1, len(mine)))]
        seqs = [data.draw(hashes) for _ in slots]
        pars = [data.draw(parents) for _ in slots]
        poss = [data.draw(positions) for _ in slots]
        locs = [seq ^ 0xF0F0 for seq in seqs]
        toks = [[seq & 0xFFFF, pos] for seq, pos in zip(seqs, poss, strict=True)]
        plhs = [make_plh(s, p, q) for s, p, q in zip(seqs, pars, poss, strict=True)]
        assert plhs_of(seqs, pars, poss) == plhs
        assert (
            plhs_of_columns(
                np.array(seqs, dtype=np.uint64),
                np.array([0 if p is None else p for p in pars], dtype=np.uint64),
                np.array(poss, dtype=np.int64),
            )
            == plhs
        )
        expected: list[object] = []
        raised: tuple[str, object] | None = None
        for i, slot in enumerate(slots):
            kind, value = _outcome(
                self.a.directory.commit,
                slot,
                seqs[i],
                pars[i],
                locs[i],
                poss[i],
                toks[i] if with_tokens else None,
                rank,
            )
            if kind == "raised":
                raised = (kind, value)
                break
            expected.append(value)
        got = _outcome(
            self.b.directory.commit_many,
            slots,
            seqs,
            pars,
            locs,
            poss,
            np.asarray(toks, dtype=np.uint32) if with_tokens else None,
            rank,
            plhs=plhs if pass_plhs else None,
        )
        assert got == (raised if raised is not None else ("ok", expected))
        self._same_reservations()

    @precondition(lambda self: self.reserved)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.reserved)))
        del self.reserved[slot]
        self.a.directory.abort(slot)
        self.b.directory.abort(slot)

    @rule(rank=ranks, lists=st.lists(st.lists(hashes, max_size=5), max_size=5))
    def pin(self, rank: int, lists: list[list[int]]) -> None:
        view_a, view_b = self.a.views[rank], self.b.views[rank]
        runs_a = [view_a.pin_prefix(wanted, vectorized=False) for wanted in lists]
        runs_b = view_b.pin_prefixes(lists)
        assert _runs(runs_a) == _runs(runs_b)
        for run_a, run_b in zip(runs_a, runs_b, strict=True):
            if run_a is not None and run_b is not None:
                self.runs[rank].append((run_a, run_b))

    @precondition(lambda self: any(self.runs))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        rank = data.draw(st.sampled_from([r for r in range(NUM_RANKS) if self.runs[r]]))
        count = data.draw(st.integers(1, len(self.runs[rank])))
        chosen, self.runs[rank] = self.runs[rank][:count], self.runs[rank][count:]
        for run_a, _ in chosen:
            self.a.views[rank].unpin(run_a)
        self.b.views[rank].unpin_many([run_b for _, run_b in chosen])

    @rule(seq_hash=hashes)
    def try_remove(self, seq_hash: int) -> None:
        assert self.a.directory.try_remove(seq_hash) == self.b.directory.try_remove(seq_hash)
        assert self.a.directory.take_evicted() == self.b.directory.take_evicted()

    @rule(rank=ranks)
    def rank_dies(self, rank: int) -> None:
        assert self.a.directory.remove_dead_rank(rank) == self.b.directory.remove_dead_rank(rank)
        for pool in (self.a, self.b):
            pool.views[rank]._ledger.clear()
            pool.views[rank].close()
            pool.views[rank] = G2RankView(pool.segment, rank)
        self.runs[rank].clear()
        self._same_reservations()

    @invariant()
    def pools_are_identical(self) -> None:
        for name in FIELDS:
            assert np.array_equal(getattr(self.a.segment, name), getattr(self.b.segment, name)), (
                name
            )
        assert self.a.directory.stats() == self.b.directory.stats()
        assert len(self.a.directory.policy) == len(self.b.directory.policy)
        self.a.directory.check_invariants()
        self.b.directory.check_invariants()
        found = self.b.views[0].lookup_many(list(HASH_POOL)).tolist()
        assert found == [self.a.directory.find_slot(h) for h in HASH_POOL]


VectorPaths.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestVectorPaths = VectorPaths.TestCase


# -- a big pool: many blocks per batch, long probe chains, rebuilds ---------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 200))
def test_big_batches_match_the_per_block_path(seed: int, batch: int) -> None:
    """Fill and churn a 512-slot pool whose hashes crowd a few home cells: windows overflow,
    targets repeat inside a batch, and the index rebuilds mid-batch."""
    rng = random.Random(seed)
    capacity = 512
    with ExitStack() as stack:
        pools = []
        for _ in range(2):
            segment = G2Segment.create(
                f"hb{uuid.uuid4().hex[:12]}", capacity=capacity, block_size=1, num_ranks=1
            )
            stack.callback(segment.close)
            stack.callback(segment.unlink)
            directory = G2Directory(segment, make_backend("lineage", capacity)[0])
            stack.callback(directory.close)
            view = G2RankView(segment, 0)
            stack.callback(view.close)
            pools.append((segment, directory, view))
        (seg_a, dir_a, view_a), (seg_b, dir_b, view_b) = pools
        index_size = seg_a.index_size
        crowd = [rng.randrange(8) + index_size * k for k in range(1, 40)]
        stored: list[int] = []
        for _ in range(12):
            count = rng.randint(1, batch)
            slots = dir_a.reserve(count, 0, vectorized=False)
            assert slots == dir_b.reserve(count, 0)
            assert dir_a.take_evicted() == dir_b.take_evicted()
            seqs = [rng.choice(crowd) if rng.random() < 0.3 else rng.getrandbits(64) for _ in slots]
            expected = [
                dir_a.commit(slot, seq, None, seq, 0, [seq & 0xFF], 0)
                for slot, seq in zip(slots, seqs, strict=True)
            ]
            tokens = np.asarray([[seq & 0xFF] for seq in seqs], dtype=np.uint32).reshape(-1, 1)
            assert dir_b.commit_many(slots, seqs, [None] * len(seqs), seqs, [0] * len(seqs),
                                     tokens, 0) == expected  # fmt: skip
            stored.extend(seq for seq, ok in zip(seqs, expected, strict=True) if ok)
            lists = [rng.sample(stored, min(len(stored), rng.randint(0, 6))) for _ in range(8)]
            runs_a = [view_a.pin_prefix(w, vectorized=False) for w in lists]
            runs_b = view_b.pin_prefixes(lists)
            assert _runs(runs_a) == _runs(runs_b)
            if rng.random() < 0.5:
                for run in runs_a:
                    if run is not None:
                        view_a.unpin(run)
                view_b.unpin_many([r for r in runs_b if r is not None])
            for name in FIELDS:
                assert np.array_equal(getattr(seg_a, name), getattr(seg_b, name)), name
            assert dir_a.stats() == dir_b.stats()
        dir_b.check_invariants()
        assert dir_b.stats().num_index_rebuilds == dir_a.stats().num_index_rebuilds


def test_commit_many_refuses_bad_input_and_changes_nothing(fleet_id: str) -> None:
    with G2Segment.create(fleet_id, capacity=4, block_size=2, num_ranks=1) as segment:
        directory = G2Directory(segment, LruBackend())
        try:
            slots = directory.reserve(2, 0)
            before = {name: getattr(segment, name).copy() for name in FIELDS}
            bad_calls = [
                ([slots[0], slots[0]], [1, 2], [None, None], [1, 2], [0, 0], None),
                (slots, [1, -2], [None, None], [1, 2], [0, 0], None),
                (slots, [1, 2], [None, None], [1, 2], [0, -1], None),
                (slots, [1, 2], [None], [1, 2], [0, 0], None),
                (slots, [1, 2], [None, None], [1, 2], [0, 0], np.zeros((2, 3), np.uint32)),
                (slots, [1, 2], [None, None], [1, 2], [0, 0], [[1, 2], [1, 2, 3]]),
                ([slots[0], 3], [1, 2], [None, None], [1, 2], [0, 0], None),
            ]
            for call in bad_calls:
                with pytest.raises((InvariantError, ValueError)) as info:
                    directory.commit_many(*call, owner_rank=0)
                assert type(info.value).__name__ in ("InvariantError", "ConfigError")
                for name in FIELDS:
                    assert np.array_equal(getattr(segment, name), before[name]), name
            with pytest.raises(InvariantError):
                directory.commit_many(slots, [1, 2], [None, None], [1, 2], [0, 0], None, 1)
            assert directory.commit_many([], [], [], [], [], None, 0) == []
            assert directory.commit_many(slots, [1, 2], [None, 1], [1, 2], [0, 1], None, 0) == [
                True,
                True,
            ]
            directory.check_invariants()
        finally:
            directory.close()


@pytest.mark.parametrize("refused_at", [0, 2, 4])
def test_a_policy_refusal_mid_batch_stops_where_the_per_block_path_stops(refused_at: int) -> None:
    seqs = [11, 12, 11, 13, 14, 15]  # the third is a duplicate of the first
    refused = make_plh(seqs[refused_at], None, 0)
    with ExitStack() as stack:
        segs, dirs = [], []
        for _ in range(2):
            seg = G2Segment.create(
                f"hr{uuid.uuid4().hex[:12]}", capacity=8, block_size=2, num_ranks=1
            )
            stack.callback(seg.close)
            stack.callback(seg.unlink)
            directory = G2Directory(seg, RefusingLru(refused))
            stack.callback(directory.close)
            segs.append(seg)
            dirs.append(directory)
        slots = dirs[0].reserve(len(seqs), 0, vectorized=False)
        assert dirs[1].reserve(len(seqs), 0) == slots
        tokens: list[list[int] | None] = [[s, s] if s % 2 else None for s in seqs]
        for slot, seq, row in zip(slots, seqs, tokens, strict=True):
            try:
                dirs[0].commit(slot, seq, None, seq, 0, row, 0)
            except InvariantError:
                break
        with pytest.raises(InvariantError, match="refused"):
            dirs[1].commit_many(slots, seqs, [None] * 6, seqs, [0] * 6, tokens, 0)
        for name in FIELDS:
            assert np.array_equal(getattr(segs[0], name), getattr(segs[1], name)), name
        assert dirs[0].stats() == dirs[1].stats()
        for directory in dirs:
            for slot in slots:
                if directory.segment.state[slot] == 1:
                    directory.abort(slot)
            directory.check_invariants()


def test_churn_rebuilds_the_index_mid_batch_like_the_per_block_path() -> None:
    """Removals leave tombstones until a batch of inserts crosses the rebuild threshold."""
    rng = random.Random(3)
    with ExitStack() as stack:
        segs, dirs = [], []
        for _ in range(2):
            seg = G2Segment.create(
                f"hc{uuid.uuid4().hex[:12]}", capacity=64, block_size=1, num_ranks=1
            )
            stack.callback(seg.close)
            stack.callback(seg.unlink)
            directory = G2Directory(seg, LruBackend())
            stack.callback(directory.close)
            segs.append(seg)
            dirs.append(directory)
        rebuilds_mid_batch = 0
        for _ in range(200):
            count = rng.randint(1, 40)
            slots = dirs[0].reserve(count, 0, vectorized=False)
            assert dirs[1].reserve(count, 0) == slots
            seqs = [rng.getrandbits(64) for _ in slots]
            before = dirs[1].stats().num_index_rebuilds
            expected = [
                dirs[0].commit(s, q, None, q, 0, None, 0) for s, q in zip(slots, seqs, strict=True)
            ]
            assert dirs[1].commit_many(slots, seqs, [None] * count, seqs, [0] * count, None, 0) == (
                expected
            )
            rebuilds_mid_batch += dirs[1].stats().num_index_rebuilds - before
            for seq in rng.sample(seqs, len(seqs) // 2):
                assert dirs[0].try_remove(seq) == dirs[1].try_remove(seq)
            for name in FIELDS:
                assert np.array_equal(getattr(segs[0], name), getattr(segs[1], name)), name
            assert dirs[0].stats() == dirs[1].stats()
            assert dirs[0].take_evicted() == dirs[1].take_evicted()
        assert rebuilds_mid_batch > 0
        dirs[1].check_invariants()
