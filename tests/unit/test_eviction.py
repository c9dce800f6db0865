"""Unit tests of the inactive-pool eviction backends (`behavior.md` §5) and the TinyLFU sketch."""

from __future__ import annotations

import pytest
import xxhash

import shmkv
from shmkv.errors import ConfigError, InvariantError
from shmkv.eviction import EVICTION_NAMES, EvictionBackend, FrequencyTracker, make_backend
from shmkv.eviction.lineage import (
    LineageBackend,
    LineageEntry,
    NodeView,
    decode_key,
    encode_key,
)
from shmkv.eviction.lru import LruBackend
from shmkv.eviction.multi_lru import MultiLruBackend
from shmkv.eviction.tinylfu import SEEDS, TinyLfuTracker
from shmkv.hashing import lineage_key, lineage_parent_key, make_plh

# The PLHs of seed test `test_block_lifecycle_stringent` (§5.4): id -> (parent id, position),
# built like the seed does, with the id itself as the sequence hash.
TREE: dict[int, tuple[int | None, int]] = {
    0: (None, 0), 1: (0, 1), 2: (1, 2), 3: (2, 3), 4: (3, 4), 5: (1, 2), 6: (5, 3),
    7: (2, 3), 8: (7, 4), 9: (8, 5), 10: (None, 0), 11: (10, 1), 12: (11, 2), 13: (None, 0),
}  # fmt: skip
P = {i: make_plh(i, parent, position) for i, (parent, position) in TREE.items()}


def drain(backend: EvictionBackend) -> list[int]:
    out: list[int] = []
    while (plh := backend.evict()) is not None:
        out.append(plh)
        backend.check_invariants()
    return out


def snapshot(backend: LineageBackend) -> tuple[object, ...]:
    return backend.forest(), backend.leaf_queue(), len(backend)


def chain(hashes: list[int], first_position: int, root_parent: int | None = None) -> list[int]:
    """PLHs of consecutive blocks with sequence hashes `hashes`, starting at `first_position`."""
    plhs: list[int] = []
    parent = root_parent
    for offset, current in enumerate(hashes):
        plhs.append(make_plh(current, parent, first_position + offset))
        parent = current
    return plhs


# ---------------------------------------------------------------------- Lineage: §5.4


def test_lineage_worked_example_block_lifecycle_stringent() -> None:
    b = LineageBackend()
    # Step 3: Deref[4,3,2,1,0] -> 4, 3, 2 enter the inactive pool in that order (t0, t1, t2).
    for i in (4, 3, 2):
        b.insert(P[i])
        b.check_invariants()
    assert b.leaf_queue() == [(0, P[4])]
    forest = b.forest()
    assert forest[lineage_key(P[1])] == NodeView(None, None, None, 1)  # placeholder ghost 1
    assert forest[lineage_key(P[2])] == NodeView(P[2], 2, lineage_key(P[1]), 1)
    assert forest[lineage_key(P[3])] == NodeView(P[3], 1, lineage_key(P[2]), 1)
    assert forest[lineage_key(P[4])] == NodeView(P[4], 0, lineage_key(P[3]), 0)
    # Step 4: Deref[6,5,1,0] -> 6 (t3), 5 (t4), 1 (t5), 0 (t6).
    for i in (6, 5, 1, 0):
        b.insert(P[i])
        b.check_invariants()
    assert b.leaf_queue() == [(0, P[4]), (3, P[6])]
    assert len(b) == 7
    assert b.forest()[lineage_key(P[1])] == NodeView(P[1], 5, lineage_key(P[0]), 2)
    assert b.forest()[lineage_key(P[0])] == NodeView(P[0], 6, None, 1)
    # Step 5: Use[0,1,2,7,8,9] -> 0, 1, 2 are inactive hits (reactivated, in match order).
    for i in (0, 1, 2):
        assert b.remove(P[i]) is True
        b.check_invariants()
    assert len(b) == 4
    assert sorted(p for p in P.values() if p in b) == sorted(P[i] for i in (3, 4, 5, 6))
    assert b.forest()[lineage_key(P[1])] == NodeView(P[1], None, lineage_key(P[0]), 2)
    assert b.leaf_queue() == [(0, P[4]), (3, P[6])]
    # Step 6: Use[10,11,12] -> three evictions.
    assert b.evict() == P[4]
    assert b.leaf_queue() == [(1, P[3]), (3, P[6])]  # 3 re-leafed with its original tick t1
    assert b.evict() == P[3]
    forest = b.forest()
    assert lineage_key(P[2]) not in forest  # childless ghost 2 pruned
    assert forest[lineage_key(P[1])] == NodeView(P[1], None, lineage_key(P[0]), 1)  # keeps 5
    assert b.evict() == P[6]
    assert b.leaf_queue() == [(4, P[5])]
    b.check_invariants()
    # Step 7: Use[13] -> evicts 5; every ghost above it is pruned.
    assert b.evict() == P[5]
    assert b.evict() is None
    assert b.forest() == {}
    assert len(b) == 0
    b.check_invariants()


def test_lru_gives_the_same_order_for_the_worked_example() -> None:
    b = LruBackend()
    for i in (4, 3, 2, 6, 5, 1, 0):
        b.insert(P[i])
    for i in (0, 1, 2):
        assert b.remove(P[i]) is True
    assert drain(b) == [P[4], P[3], P[6], P[5]]


# ---------------------------------------------------------------------- Lineage: rules


def test_lineage_real_parent_re_leafs_with_its_original_tick() -> None:
    b = LineageBackend()
    a, child = chain([0xA1, 0xA2], 0)
    other = make_plh(0xB1, None, 0)
    b.insert(a)  # t0
    b.insert(child)  # t1: a is no longer a leaf
    b.insert(other)  # t2
    assert b.leaf_queue() == [(1, child), (2, other)]
    assert b.remove(child) is True
    assert b.leaf_queue() == [(0, a), (2, other)]  # a is older than `other` again
    assert drain(b) == [a, other]


def test_lineage_evicts_leaves_only_whatever_the_insert_order() -> None:
    b = LineageBackend()
    plhs = chain([0x11, 0x12, 0x13, 0x14], 0)
    for plh in plhs:  # root first: the root is the oldest but never a leaf
        b.insert(plh)
    assert b.leaf_queue() == [(3, plhs[3])]
    assert drain(b) == plhs[::-1]


def test_lineage_prunes_a_ghost_chain_upwards() -> None:
    b = LineageBackend()
    plhs = chain([0x21, 0x22, 0x23, 0x24], 0)
    for plh in plhs:
        b.insert(plh)
    for plh in plhs[:3]:  # reactivate the prefix: ghosts keeping their links
        assert b.remove(plh) is True
    assert [b.forest()[lineage_key(p)].tick for p in plhs] == [None, None, None, 3]
    assert b.evict() == plhs[3]
    assert b.forest() == {}
    b.check_invariants()


def test_lineage_placeholder_ghost_is_pruned_with_its_last_child() -> None:
    b = LineageBackend()
    parent, child_a = chain([0x31, 0x32], 5)
    child_b = make_plh(0x33, 0x31, 6)
    b.insert(child_a)
    b.insert(child_b)
    assert b.forest()[lineage_key(parent)] == NodeView(None, None, None, 2)
    assert b.evict() == child_a
    assert b.forest()[lineage_key(parent)] == NodeView(None, None, None, 1)
    assert b.remove(child_b) is True
    assert b.forest() == {}


def test_lineage_placeholder_does_not_link_to_its_own_parent() -> None:
    # a (pos 0) is inactive, b (pos 1) is not, c (pos 2) is inactive: a stays a leaf, since the
    # placeholder for b cannot know b's parent.
    b = LineageBackend()
    a, mid, c = chain([0x41, 0x42, 0x43], 0)
    b.insert(a)
    b.insert(c)
    assert b.leaf_queue() == [(0, a), (1, c)]
    assert b.evict() == a
    # Once b is inserted it fills the placeholder and links to its parent.
    b.insert(a)  # t2
    b.insert(mid)  # t3
    assert b.leaf_queue() == [(1, c)]
    assert drain(b) == [c, mid, a]


def test_lineage_reactivation_ghost_keeps_its_parent_link() -> None:
    b = LineageBackend()
    a, mid, c = chain([0x51, 0x52, 0x53], 0)
    for plh in (a, mid, c):
        b.insert(plh)
    assert b.remove(mid) is True
    assert b.leaf_queue() == [(2, c)]  # a still has an inactive descendant through ghost mid
    assert b.evict() == c  # mid pruned, a re-leafs
    assert b.leaf_queue() == [(0, a)]


def test_lineage_reinserting_a_reactivated_ghost_takes_a_new_tick() -> None:
    b = LineageBackend()
    a, child = chain([0x61, 0x62], 0)
    b.insert(a)  # t0
    b.insert(child)  # t1
    assert b.remove(a) is True
    b.insert(a)  # t2, refills the ghost, still linked to child
    assert b.forest()[lineage_key(a)] == NodeView(a, 2, None, 1)
    assert b.remove(child) is True
    assert b.leaf_queue() == [(2, a)]
    b.check_invariants()


@pytest.mark.parametrize("boundary", [256, 1 << 16])
def test_lineage_links_across_a_mode_boundary(boundary: int) -> None:
    # Hashes with high bits set, so that the parent's shortened current fragment matters.
    hashes = [0xFEDC_BA98_7654_3210, 0xF0F0_F0F0_F0F0_F0F1, 0x8123_4567_89AB_CDEF]
    grand, parent, child = chain(hashes, boundary - 2, root_parent=0xDEAD_BEEF_DEAD_BEEF)
    assert lineage_parent_key(child) == lineage_key(parent)
    assert lineage_key(parent)[0] == boundary - 1
    b = LineageBackend()
    b.insert(child)  # creates a placeholder at the parent's key...
    b.insert(parent)  # ...which the parent fills
    b.insert(grand)
    b.check_invariants()
    assert b.leaf_queue() == [(0, child)]
    assert b.forest()[lineage_key(parent)] == NodeView(parent, 1, lineage_key(grand), 1)
    assert drain(b) == [child, parent, grand]
    # Root first: the parent is de-leafed by its child across the boundary.
    for plh in (grand, parent, child):
        b.insert(plh)
    assert b.leaf_queue() == [(5, child)]
    assert b.remove(child) is True
    assert b.leaf_queue() == [(4, parent)]


def test_lineage_node_keys_match_the_hashing_helpers() -> None:
    for position in (0, 1, 2, 254, 255, 256, 257, 65_535, 65_536, 65_537, (1 << 24) - 1):
        plh = make_plh(0xFFFF_FFFF_FFFF_FFFF, 0xAAAA_AAAA_AAAA_AAAA, position)
        key = lineage_key(plh)
        assert decode_key(encode_key(*key)) == key
        b = LineageBackend()
        b.insert(plh)
        forest = b.forest()
        assert forest[key] == NodeView(plh, 0, lineage_parent_key(plh), 0)
        if position:
            assert forest[lineage_parent_key(plh)] == NodeView(None, None, None, 1)  # type: ignore[index]
        b.check_invariants()


def test_lineage_duplicate_insert_raises_and_changes_nothing() -> None:
    b = LineageBackend()
    plhs = chain([0x71, 0x72, 0x73], 0)
    for plh in plhs:
        b.insert(plh)
    before = snapshot(b)
    for plh in plhs:
        with pytest.raises(InvariantError, match="inserted twice"):
            b.insert(plh)
        assert snapshot(b) == before
    b.check_invariants()
    fresh = make_plh(0x74, None, 0)
    b.insert(fresh)
    assert b.forest()[lineage_key(fresh)].tick == 3  # failed inserts consumed no tick


def test_lineage_conflicting_plh_at_the_same_node_raises_and_changes_nothing() -> None:
    b = LineageBackend()
    grand, parent, child = chain([0x81, 0x82, 0x83], 0)
    conflict = make_plh(0x82, 0x99, 1)  # same (position, current fragment), other parent
    assert lineage_key(conflict) == lineage_key(parent)
    b.insert(parent)
    before = snapshot(b)
    with pytest.raises(InvariantError, match="conflicts"):
        b.insert(conflict)
    assert snapshot(b) == before
    assert conflict not in b
    assert b.remove(conflict) is False
    # A ghost left by reactivation remembers its PLH too.
    b.insert(child)
    b.insert(grand)
    assert b.remove(parent) is True
    before = snapshot(b)
    with pytest.raises(InvariantError, match="conflicts with ghost"):
        b.insert(conflict)
    assert snapshot(b) == before
    b.insert(parent)
    b.check_invariants()


def test_lineage_entries_behave_like_their_plhs_and_decode_once() -> None:
    """insert_entries / remove_entry take the same steps as insert / remove of the PLHs, also
    when an entry comes back (decoded fields kept) and after `set_plh` recycles one."""
    by_plh, by_entry = LineageBackend(), LineageBackend()
    boundary = 256
    plhs = [*chain([0x91, 0x92, 0x93], 0), *chain([0xA1, 0xA2, 0xA3], boundary - 1)]
    entries = [LineageEntry(plh) for plh in plhs]
    assert all(entry.lineage_position == -2 for entry in entries)  # not decoded yet

    def same() -> None:
        assert snapshot(by_entry) == snapshot(by_plh)
        by_entry.check_invariants()

    for plh in reversed(plhs):
        by_plh.insert(plh)
    by_entry.insert_entries(entries[::-1])
    same()
    assert [entry.lineage_position for entry in entries] == [0, 1, 2, 255, 256, 257]
    for index in (1, 4, 0):
        assert by_entry.remove_entry(entries[index]) is by_plh.remove(plhs[index])
        same()
    assert by_entry.remove_entry(entries[1]) is by_plh.remove(plhs[1]) is False
    by_plh.insert_many([plhs[0], plhs[4], plhs[1]])
    by_entry.insert_entries([entries[0], entries[4], entries[1]])
    same()
    assert by_entry.evict_many(3) == by_plh.evict_many(3)
    same()
    recycled = entries[2]  # evicted first (the oldest leaf)
    new_plh = make_plh(0xB3, 0x92, 2)
    recycled.set_plh(new_plh)
    assert recycled.lineage_position == -2
    by_plh.insert(new_plh)
    by_entry.insert_entries([recycled])
    same()
    assert by_entry.evict_many(10) == by_plh.evict_many(10)
    same()


def test_lineage_entry_with_a_bad_plh_raises_after_the_entries_before_it() -> None:
    b = LineageBackend()
    good = LineageEntry(make_plh(0xC1, None, 0))
    bad = LineageEntry(3 << 126)  # past the last mode
    with pytest.raises(InvariantError, match="not a positional lineage hash"):
        b.insert_entries([good, bad])
    assert good.plh in b
    assert len(b) == 1
    assert bad.lineage_position == -2  # left undecoded
    assert b.remove_entry(LineageEntry(-1)) is False
    b.check_invariants()


def test_lineage_membership_and_remove_of_absent_or_ghost() -> None:
    b = LineageBackend()
    a, child = chain([0x91, 0x92], 0)
    assert a not in b
    assert b.remove(a) is False
    b.insert(child)
    assert child in b
    assert a not in b  # a placeholder ghost is not a member
    assert b.remove(a) is False
    assert "x" not in b
    assert -1 not in b
    assert (3 << 126) not in b
    assert len(b) == 1
    b.insert(a)
    assert b.remove(a) is True
    assert a not in b  # a reactivation ghost is not a member either
    assert b.remove(a) is False
    assert len(b) == 1
    b.check_invariants()


def test_lineage_without_prefix_caching_behaves_like_insertion_order_lru() -> None:
    # Caching off: random current hash, no parent, any position (§1.5).
    plhs = [make_plh(0x1000 + i, None, i % 7) for i in range(40)]
    b = LineageBackend()
    for plh in plhs:
        b.insert(plh)
    for plh in plhs[::5]:
        assert b.remove(plh) is True
    assert drain(b) == [p for i, p in enumerate(plhs) if i % 5]


def test_lineage_stale_heap_entries_are_compacted() -> None:
    b = LineageBackend()
    keeper = make_plh(0xAB, None, 0)
    b.insert(keeper)
    for i in range(5_000):
        plh = make_plh(0xC000 + i, None, 3)
        b.insert(plh)
        assert b.remove(plh) is True
    assert len(b._heap) <= 2 * len(b._leaves) + 64 + 1
    b.check_invariants()
    assert drain(b) == [keeper]


def test_lineage_parked_next_victim_yields_to_an_older_reactivated_leaf() -> None:
    # evict() parks the parent its victim leaves a leaf (the next victim) outside the heap;
    # a remove() that exposes an older real leaf must still go first.
    b = LineageBackend()
    x0, x1 = chain([0xF1, 0xF2], 0)
    a0, a1 = chain([0xF3, 0xF4], 0)
    b.insert(x0)  # tick 0
    b.insert_many([a1, a0])  # ticks 1, 2
    b.insert(x1)  # tick 3: x0 is no leaf
    assert b.evict() == a1  # a0 (tick 2) is parked as the next victim
    b.check_invariants()
    assert b.remove(x1) is True  # x0 (tick 0) is a leaf again, older than a0
    b.check_invariants()
    assert drain(b) == [x0, a0]


def test_lineage_one_by_one_evictions_of_chains_match_evict_many() -> None:
    plhs = [p for i in range(4) for p in chain([0x100 * i + j for j in range(1, 6)], 0)]
    single, bulk = LineageBackend(), LineageBackend()
    for b in (single, bulk):
        for start in range(0, len(plhs), 5):
            b.insert_many(plhs[start : start + 5][::-1])
    assert drain(single) == bulk.evict_many(len(plhs))
    assert len(single) == len(bulk) == 0


def test_lineage_evict_many_beyond_its_entries_returns_them_all() -> None:
    """A count far above the entries (the victims list is sized by the entries, not by it)."""
    plhs = chain([0x501, 0x502, 0x503], 0)
    b = LineageBackend()
    b.insert_many(plhs[::-1])
    assert b.evict_many(1 << 40) == plhs[::-1]
    assert len(b) == 0
    assert b.evict_many(1 << 40) == []


def test_lineage_check_invariants_detects_corruption() -> None:
    b = LineageBackend()
    a, child = chain([0xE1, 0xE2], 0)
    b.insert(a)
    b.insert(child)
    b.check_invariants()
    b._leaves.clear()
    with pytest.raises(InvariantError, match="leaf queue"):
        b.check_invariants()
    b = LineageBackend()
    b.insert(child)
    node = b._node_at(*lineage_key(child))
    assert node is not None
    node.children = 1  # a phantom child
    with pytest.raises(InvariantError, match="children"):
        b.check_invariants()


# ---------------------------------------------------------------------- LRU


def test_lru_evicts_in_insertion_order_and_removes() -> None:
    b = LruBackend()
    plhs = [make_plh(0x100 + i, None, 0) for i in range(5)]
    for plh in plhs:
        b.insert(plh)
    assert len(b) == 5
    assert b.remove(plhs[0]) is True
    assert b.remove(plhs[0]) is False
    assert plhs[0] not in b
    assert plhs[1] in b
    with pytest.raises(InvariantError):
        b.insert(plhs[1])
    assert drain(b) == plhs[1:]
    assert b.evict() is None


# ---------------------------------------------------------------------- TinyLFU


def _fresh_slots(tracker: TinyLfuTracker, distinct: bool, start: int = 0) -> int:
    """The first PLH from `start` whose four counters are all distinct (or not)."""
    plh = start
    while (len(set(tracker.slots(plh))) == 4) != distinct:
        plh += 1
    return plh


def _counter(tracker: TinyLfuTracker, word: int, index: int) -> int:
    return (tracker.table[word] >> (4 * index)) & 15


def test_tinylfu_table_size_and_hashes() -> None:
    assert len(TinyLfuTracker(0).table) == 1
    assert len(TinyLfuTracker(3).table) == 1
    assert len(TinyLfuTracker(8).table) == 2
    assert len(TinyLfuTracker(4097).table) == 1024
    assert len(set(SEEDS)) == 4
    tracker = TinyLfuTracker(4000)
    plh = make_plh(0x1234_5678_9ABC_DEF0, 0x0FED_CBA9_8765_4321, 300)
    data = plh.to_bytes(16, "little")
    hashes = [xxhash.xxh3_64_intdigest(data, seed=seed) for seed in SEEDS]
    assert tracker.slots(plh) == [(h % 1000, h & 15) for h in hashes]
    with pytest.raises(ConfigError):
        TinyLfuTracker(-1)


def test_tinylfu_touch_estimate_and_saturation() -> None:
    tracker = TinyLfuTracker(4096)  # reset threshold 40960: never reached here
    plh = _fresh_slots(tracker, distinct=True)
    assert tracker.estimate(plh) == 0
    tracker.touch(plh)
    assert tracker.estimate(plh) == 1
    assert tracker.size == 1
    for expected in range(2, 16):
        tracker.touch(plh)
        assert tracker.estimate(plh) == expected
    assert tracker.size == 15
    for _ in range(5):  # saturated: nothing changes, size does not grow
        tracker.touch(plh)
    assert tracker.estimate(plh) == 15
    assert tracker.size == 15
    assert all(_counter(tracker, w, c) == 15 for w, c in tracker.slots(plh))


def test_tinylfu_repeated_counter_is_incremented_once_per_hash() -> None:
    tracker = TinyLfuTracker(4)  # one word: 16 counters shared by everything
    plh = _fresh_slots(tracker, distinct=False)
    slots = tracker.slots(plh)
    tracker.touch(plh)
    for slot in set(slots):
        assert _counter(tracker, *slot) == slots.count(slot)
    assert tracker.estimate(plh) == min(slots.count(slot) for slot in slots)
    assert tracker.size == 1


def test_tinylfu_reset_halves_counters_and_size() -> None:
    tracker = TinyLfuTracker(1)  # one word, reset when size reaches 10
    plh = _fresh_slots(tracker, distinct=True)
    touched = {index for _word, index in tracker.slots(plh)}
    tracker._table[0] = 0x3333_3333_3333_3333  # every counter = 3
    tracker.size = 9
    tracker.touch(plh)  # touched counters -> 4, size -> 10 -> reset
    # Before halving: 12 odd counters (the untouched 3s) -> size = 10 // 2 - 12 // 4 = 2.
    assert tracker.size == 2
    expected = sum((2 if i in touched else 1) << (4 * i) for i in range(16))
    assert tracker.table == [expected]
    assert tracker.estimate(plh) == 2


def test_tinylfu_reset_after_ten_times_capacity_increments() -> None:
    tracker = TinyLfuTracker(2)  # one word, reset when size reaches 20
    plh = _fresh_slots(tracker, distinct=True)
    other = _fresh_slots(tracker, distinct=True, start=plh + 1)
    while set(tracker.slots(other)) & set(tracker.slots(plh)):
        other = _fresh_slots(tracker, distinct=True, start=other + 1)
    for _ in range(15):
        tracker.touch(plh)
    for _ in range(4):
        tracker.touch(other)
    assert (tracker.size, tracker.estimate(plh), tracker.estimate(other)) == (19, 15, 4)
    tracker.touch(other)  # size 20: reset
    # Odd counters before halving: plh's four 15s and other's four 5s -> size = 10 - 8 // 4.
    assert (tracker.size, tracker.estimate(plh), tracker.estimate(other)) == (8, 7, 2)


def test_tinylfu_slot_memo_overflow_is_transparent() -> None:
    tracker = TinyLfuTracker(16)  # memo of 4096 PLHs, dropped when full
    for plh in range(5_000):
        tracker.touch(plh)
    for plh in (0, 4_095, 4_096, 4_999):
        data = plh.to_bytes(16, "little")
        hashes = [xxhash.xxh3_64_intdigest(data, seed=seed) for seed in SEEDS]
        assert tracker.slots(plh) == [(h % 4, h & 15) for h in hashes]
        assert tracker.estimate(plh) == min(_counter(tracker, *slot) for slot in tracker.slots(plh))


# ---------------------------------------------------------------------- MultiLRU


class FakeTracker:
    """A FrequencyTracker whose estimates the test sets; counts touches."""

    def __init__(self) -> None:
        self.freq: dict[int, int] = {}
        self.touches = 0

    def touch(self, plh: int) -> None:
        self.touches += 1

    def estimate(self, plh: int) -> int:
        return self.freq.get(plh, 0)


def test_multi_lru_level_placement_by_threshold() -> None:
    tracker = FakeTracker()
    b = MultiLruBackend(tracker)
    expected = {0: 0, 2: 0, 3: 1, 7: 1, 8: 2, 14: 2, 15: 3}
    for f in expected:
        tracker.freq[f] = f
        b.insert(f)
    assert {f: b.level_of(f) for f in expected} == expected
    assert b.level_sizes() == (2, 2, 2, 1)
    assert b.level_of(99) is None
    assert tracker.touches == 0  # the backend never touches the tracker
    b.check_invariants()


def test_multi_lru_evicts_coldest_level_first_lru_within() -> None:
    tracker = FakeTracker()
    b = MultiLruBackend(tracker)
    tracker.freq.update({10: 15, 11: 9, 12: 0, 13: 4, 14: 1, 15: 9})
    for plh in (10, 11, 12, 13, 14, 15):
        b.insert(plh)
    tracker.freq[12] = 15  # the level is fixed at insertion
    assert drain(b) == [12, 14, 13, 11, 15, 10]
    assert b.evict() is None


def test_multi_lru_remove_duplicate_and_membership() -> None:
    tracker = FakeTracker()
    b = MultiLruBackend(tracker, thresholds=(2, 6, 15))
    tracker.freq.update({1: 1, 2: 2, 3: 6, 4: 15})
    for plh in (1, 2, 3, 4):
        b.insert(plh)
    assert [b.level_of(p) for p in (1, 2, 3, 4)] == [0, 1, 2, 3]
    assert b.remove(3) is True
    assert b.remove(3) is False
    assert 3 not in b
    assert 4 in b
    assert len(b) == 3
    with pytest.raises(InvariantError):
        b.insert(4)
    assert len(b) == 3
    b.check_invariants()
    assert drain(b) == [1, 2, 4]


def test_multi_lru_rejects_bad_thresholds() -> None:
    with pytest.raises(ConfigError):
        MultiLruBackend(FakeTracker(), thresholds=(8, 3, 15))
    # A compiled core checks the argument's type on entry: TypeError, before any state exists.
    with pytest.raises(TypeError if shmkv.core_mode() == "compiled" else ConfigError):
        MultiLruBackend(FakeTracker(), thresholds=(3, 8))  # type: ignore[arg-type]


def test_multi_lru_with_tinylfu_puts_frequent_blocks_in_the_hot_level() -> None:
    tracker = TinyLfuTracker(4096)
    b = MultiLruBackend(tracker)
    hot = _fresh_slots(tracker, distinct=True)
    cold = _fresh_slots(tracker, distinct=True, start=hot + 1)
    for _ in range(15):
        tracker.touch(hot)
    b.insert(hot)
    b.insert(cold)
    assert (b.level_of(hot), b.level_of(cold)) == (3, 0)
    assert drain(b) == [cold, hot]


# ---------------------------------------------------------------------- factory


def test_make_backend_builds_each_backend() -> None:
    kinds = {}
    for name in EVICTION_NAMES:
        backend, tracker = make_backend(name, 64)
        kinds[name] = (type(backend), type(tracker))
        backend.insert(P[0])
        assert P[0] in backend
        assert backend.evict() == P[0]
    assert kinds == {
        "lineage": (LineageBackend, type(None)),
        "lru": (LruBackend, type(None)),
        "multi-lru": (MultiLruBackend, TinyLfuTracker),
    }
    backend, tracker = make_backend("multi-lru", 64)
    assert isinstance(tracker, TinyLfuTracker)
    assert isinstance(backend, MultiLruBackend)
    _check_protocol(tracker)


def _check_protocol(tracker: FrequencyTracker) -> None:
    tracker.touch(1)
    assert tracker.estimate(1) >= 1
