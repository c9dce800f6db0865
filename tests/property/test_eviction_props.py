"""Stateful property tests: every eviction backend against a naive reference model.

After every step the backend must agree with the model on membership, length and the next
victim, and pass its own `check_invariants()`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import xxhash
from hypothesis import event, given, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from shmkv.errors import InvariantError
from shmkv.eviction import EVICTION_NAMES, EvictionBackend, make_backend
from shmkv.eviction.lineage import LineageBackend
from shmkv.eviction.lru import LruBackend
from shmkv.eviction.multi_lru import MultiLruBackend
from shmkv.eviction.tinylfu import SEEDS, TinyLfuTracker
from shmkv.hashing import lineage_key, lineage_parent_key, make_plh

NodeKey = tuple[int, int]

# Sequence hashes with high bits set (so fragments shortened at a mode boundary really differ)
# from a small pool (so that blocks at one position collide on their current fragment).
HASHES = [(k * 0x9E37_79B9_7F4A_7C15 + 0x0F00_0000_0000_0000) % (1 << 64) for k in range(6)]
ROOT_POSITIONS = [0, 0, 0, 3, 253, 254, 255, 65_534, 65_535]


@st.composite
def universes(draw: st.DrawFn) -> list[int]:
    """PLHs of a random block forest: chains that share prefixes, cross mode boundaries, collide.

    Every block is (sequence hash, parent block or none). A root sits at a drawn position with
    no parent (as with prefix caching off) or with a parent hash that is not a block of the
    universe (an active ancestor). The same PLH can appear twice; two different PLHs can
    share a (position, current fragment) node.
    """
    blocks: list[tuple[int, int | None, int]] = []  # (seq hash, parent seq hash, position)
    for _ in range(draw(st.integers(1, 14))):
        current = draw(st.sampled_from(HASHES))
        parent_index = draw(st.integers(-1, len(blocks) - 1)) if blocks else -1
        if parent_index < 0:
            parent = draw(st.sampled_from([None, 0xABCD_EF01_2345_6789]))
            blocks.append((current, parent, draw(st.sampled_from(ROOT_POSITIONS))))
        else:
            parent_hash, _grand, parent_position = blocks[parent_index]
            blocks.append((current, parent_hash, parent_position + 1))
    return [make_plh(current, parent, position) for current, parent, position in blocks]


index = st.integers(0, 63)


# ---------------------------------------------------------------------- Lineage


class LineageModel:
    """Naive O(n·depth) model of §5.1.

    State: the inactive blocks with their insertion ticks, and the *remembered* ghosts (blocks
    reactivated while an inactive block descended from them) with their PLHs. A block descends
    from node X if walking parent keys up from it reaches X through nodes whose PLH is known
    (inactive or remembered); a placeholder (a parent never seen) stops the walk. A block is
    evictable iff no inactive block descends from it; the victim is the smallest tick.
    """

    def __init__(self) -> None:
        self.ticks: dict[int, int] = {}  # inactive PLH -> insertion tick
        self.remembered: dict[NodeKey, int] = {}  # ghost node -> its PLH
        self.next_tick = 0

    def _known(self) -> dict[NodeKey, int]:
        known = dict(self.remembered)
        known.update((lineage_key(p), p) for p in self.ticks)
        return known

    def _with_descendants(self) -> set[NodeKey]:
        known = self._known()
        marked: set[NodeKey] = set()
        for plh in self.ticks:
            key = lineage_parent_key(plh)
            while key is not None and key in known:
                marked.add(key)
                key = lineage_parent_key(known[key])
        return marked

    def _forget_lonely_ghosts(self) -> None:
        marked = self._with_descendants()
        self.remembered = {k: p for k, p in self.remembered.items() if k in marked}

    def insert_fails(self, plh: int) -> bool:
        key = lineage_key(plh)
        clash = any(lineage_key(p) == key for p in self.ticks)
        return clash or self.remembered.get(key, plh) != plh

    def insert(self, plh: int) -> None:
        self.ticks[plh] = self.next_tick
        self.next_tick += 1
        self.remembered.pop(lineage_key(plh), None)

    def remove(self, plh: int) -> bool:
        if plh not in self.ticks:
            return False
        del self.ticks[plh]
        self.remembered[lineage_key(plh)] = plh
        self._forget_lonely_ghosts()
        return True

    def leaves(self) -> list[tuple[int, int]]:
        marked = self._with_descendants()
        return sorted((t, p) for p, t in self.ticks.items() if lineage_key(p) not in marked)

    def evict(self) -> int | None:
        leaves = self.leaves()
        if not leaves:
            return None
        victim = leaves[0][1]
        del self.ticks[victim]
        self._forget_lonely_ghosts()
        return victim


class LineageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.backend = LineageBackend()
        self.model = LineageModel()
        self.universe: list[int] = []

    @initialize(universe=universes())
    def set_universe(self, universe: list[int]) -> None:
        self.universe = universe

    def _pick(self, i: int) -> int:
        return self.universe[i % len(self.universe)]

    @rule(i=index)
    def insert(self, i: int) -> None:
        plh = self._pick(i)
        if self.model.insert_fails(plh):
            event("lineage: insert refused (duplicate or conflict)")
            before = (self.backend.forest(), self.backend.leaf_queue(), len(self.backend))
            with pytest.raises(InvariantError):
                self.backend.insert(plh)
            assert (self.backend.forest(), self.backend.leaf_queue(), len(self.backend)) == before
        else:
            self.backend.insert(plh)
            self.model.insert(plh)

    def _note_re_leaf(self, before: list[tuple[int, int]]) -> None:
        if any(entry not in before for entry in self.backend.leaf_queue()):
            event("lineage: a real parent re-entered the leaf queue")

    @rule(i=index)
    def remove(self, i: int) -> None:
        plh = self._pick(i)
        before = self.backend.leaf_queue()
        assert self.backend.remove(plh) == self.model.remove(plh)
        if self.model.remembered:
            event("lineage: a reactivation ghost is remembered")
        self._note_re_leaf(before)

    @rule()
    def evict(self) -> None:
        before = self.backend.leaf_queue()
        assert self.backend.evict() == self.model.evict()
        self._note_re_leaf(before)

    @rule(i=index)
    def insert_all_tail_first(self, i: int) -> None:
        """A Deref of a whole request: its blocks return to the pool tail first."""
        for plh in self.universe[i % len(self.universe) :][::-1]:
            if not self.model.insert_fails(plh):
                self.backend.insert(plh)
                self.model.insert(plh)

    @rule(i=index)
    def insert_many_tail_first(self, i: int) -> None:
        """The same Deref through `insert_many`: one call, the same ticks."""
        batch: list[int] = []
        for plh in self.universe[i % len(self.universe) :][::-1]:
            if not self.model.insert_fails(plh):
                self.model.insert(plh)
                batch.append(plh)
        self.backend.insert_many(batch)

    @rule(count=st.integers(0, 8))
    def evict_many(self, count: int) -> None:
        """`evict_many` returns what `count` scalar evictions would, in the same order."""
        before = self.backend.leaf_queue()
        expected: list[int] = []
        while len(expected) < count and (victim := self.model.evict()) is not None:
            expected.append(victim)
        assert self.backend.evict_many(count) == expected
        if len(expected) > 1:
            event("lineage: evict_many took several victims")
        self._note_re_leaf(before)

    @invariant()
    def agrees_with_model(self) -> None:
        self.backend.check_invariants()
        assert len(self.backend) == len(self.model.ticks)
        assert self.backend.leaf_queue() == self.model.leaves()
        for plh in self.universe:
            assert (plh in self.backend) == (plh in self.model.ticks)

    def teardown(self) -> None:
        victims = []
        while (plh := self.backend.evict()) is not None:
            victims.append(plh)
        expected = []
        while (plh := self.model.evict()) is not None:
            expected.append(plh)
        assert victims == expected
        assert self.backend.forest() == {}


TestLineageMachine = LineageMachine.TestCase


# ---------------------------------------------------------------------- LRU


class LruMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.backend = LruBackend()
        self.model: list[int] = []

    @rule(plh=index)
    def insert(self, plh: int) -> None:
        if plh in self.model:
            with pytest.raises(InvariantError):
                self.backend.insert(plh)
        else:
            self.backend.insert(plh)
            self.model.append(plh)

    @rule(plh=index)
    def remove(self, plh: int) -> None:
        present = plh in self.model
        if present:
            self.model.remove(plh)
        assert self.backend.remove(plh) == present

    @rule()
    def evict(self) -> None:
        assert self.backend.evict() == (self.model.pop(0) if self.model else None)

    @invariant()
    def agrees_with_model(self) -> None:
        self.backend.check_invariants()
        assert len(self.backend) == len(self.model)
        assert all(plh in self.backend for plh in self.model)


TestLruMachine = LruMachine.TestCase


# ---------------------------------------------------------------------- MultiLRU + TinyLFU


class MultiLruMachine(RuleBasedStateMachine):
    """The model takes the level from the same tracker at insert time, then never again."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = TinyLfuTracker(8)
        self.backend = MultiLruBackend(self.tracker)
        self.model: list[tuple[int, int]] = []  # (level, plh) in insertion order

    @staticmethod
    def _level(f: int) -> int:
        return 0 if f < 3 else 1 if f < 8 else 2 if f < 15 else 3

    @rule(plh=index, times=st.integers(1, 16))
    def touch(self, plh: int, times: int) -> None:
        for _ in range(times):
            self.tracker.touch(plh)

    @rule(plh=index)
    def insert(self, plh: int) -> None:
        if any(p == plh for _level, p in self.model):
            with pytest.raises(InvariantError):
                self.backend.insert(plh)
        else:
            self.model.append((self._level(self.tracker.estimate(plh)), plh))
            self.backend.insert(plh)

    @rule(plh=index)
    def remove(self, plh: int) -> None:
        entries = [e for e in self.model if e[1] == plh]
        for entry in entries:
            self.model.remove(entry)
        assert self.backend.remove(plh) == bool(entries)

    @rule()
    def evict(self) -> None:
        expected = None
        if self.model:
            entry = min(self.model, key=lambda e: e[0])  # first of the coldest level
            self.model.remove(entry)
            expected = entry[1]
        assert self.backend.evict() == expected

    @invariant()
    def agrees_with_model(self) -> None:
        self.backend.check_invariants()
        assert len(self.backend) == len(self.model)
        assert all(self.backend.level_of(plh) == level for level, plh in self.model)


TestMultiLruMachine = MultiLruMachine.TestCase


# ---------------------------------------------------------------------- bulk = scalar loops

Op = tuple[str, int, tuple[int, ...]]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["insert", "tail_first", "remove", "evict", "touch"]),
        st.integers(0, 12),
        st.lists(index, max_size=8).map(tuple),
    ),
    max_size=40,
)


def _outcome(action: Callable[[], object]) -> object:
    try:
        return action()
    except InvariantError:
        return InvariantError


def _state(backend: EvictionBackend) -> object:
    if isinstance(backend, LineageBackend):
        return backend.forest(), backend.leaf_queue(), len(backend)
    if isinstance(backend, MultiLruBackend):
        return backend.level_sizes(), len(backend)
    return len(backend)


@pytest.mark.parametrize("name", EVICTION_NAMES)
@given(universe=universes(), ops=OPS)
def test_bulk_operations_equal_scalar_loops(name: str, universe: list[int], ops: list[Op]) -> None:
    """`insert_many` / `evict_many` leave a backend exactly as the scalar loops leave a twin:
    the same victims in the same order, the same refusals, the same state afterwards."""
    scalar, scalar_tracker = make_backend(name, 16)
    bulk, bulk_tracker = make_backend(name, 16)

    def pick(i: int) -> int:
        return universe[i % len(universe)]

    def insert_each(plhs: list[int]) -> None:
        for plh in plhs:
            scalar.insert(plh)

    def evict_each(count: int) -> list[int]:
        victims = [scalar.evict() for _ in range(count)]
        return [plh for plh in victims if plh is not None]

    for action, number, picks in ops:
        if action in ("insert", "tail_first"):
            plhs = [pick(i) for i in picks] if action == "insert" else universe[number:][::-1]
            expected = _outcome(lambda: insert_each(plhs))  # noqa: B023
            assert _outcome(lambda: bulk.insert_many(plhs)) == expected  # noqa: B023
        elif action == "remove":
            assert bulk.remove(pick(number)) == scalar.remove(pick(number))
        elif action == "evict":
            assert bulk.evict_many(number) == evict_each(number)
        elif scalar_tracker is not None and bulk_tracker is not None:
            for i in picks:
                scalar_tracker.touch(pick(i))
                bulk_tracker.touch(pick(i))
        bulk.check_invariants()
        assert _state(bulk) == _state(scalar)
        assert all((plh in bulk) == (plh in scalar) for plh in universe)
    assert bulk.evict_many(len(bulk) + 1) == evict_each(len(scalar) + 1)


class ReferenceSketch:
    """TinyLFU (§5.3) written the obvious way: a flat list of counters per word."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.counters = [[0] * 16 for _ in range(max(1, capacity // 4))]
        self.size = 0

    def _slots(self, plh: int) -> list[tuple[int, int]]:
        data = plh.to_bytes(16, "little")
        hashes = [xxhash.xxh3_64_intdigest(data, seed=seed) for seed in SEEDS]
        return [(h % len(self.counters), h & 15) for h in hashes]

    def touch(self, plh: int) -> None:
        changed = False
        for word, index in self._slots(plh):
            if self.counters[word][index] < 15:
                self.counters[word][index] += 1
                changed = True
        if changed:
            self.size += 1
            if self.size >= 10 * self.capacity:
                odd = sum(c % 2 for word in self.counters for c in word)
                self.counters = [[c // 2 for c in word] for word in self.counters]
                self.size = max(0, self.size // 2 - odd // 4)

    def estimate(self, plh: int) -> int:
        return min(self.counters[w][i] for w, i in self._slots(plh))

    def packed(self) -> list[int]:
        return [sum(c << (4 * i) for i, c in enumerate(word)) for word in self.counters]


@given(capacity=st.integers(0, 12), touches=st.lists(st.integers(0, 40), max_size=300))
def test_tinylfu_matches_reference_sketch(capacity: int, touches: list[int]) -> None:
    tracker = TinyLfuTracker(capacity)
    reference = ReferenceSketch(capacity)
    for plh in touches:
        tracker.touch(plh)
        reference.touch(plh)
        assert tracker.size == reference.size
        assert tracker.estimate(plh) == reference.estimate(plh)
    assert tracker.table == reference.packed()
