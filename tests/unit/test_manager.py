"""The seed's KvManager tests, one counterpart each (same names, same assertions), plus the
behavior.md §16 acceptance checks. Backend-generic tests run for every eviction backend."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable

import pytest

from shmkv.errors import SignalError
from shmkv.events import BlockRemoved, BlockStored, KvEvent, StorageTier
from shmkv.eviction import EvictionBackend
from shmkv.hashing import make_plh
from shmkv.manager import KvManager, SwapInBlock
from shmkv.sequence import ActiveSequence
from shmkv.signals import Deref, FullBlock, MoveBlock, PartialBlock, Promote, Use

BACKENDS = ["lineage", "lru", "multi-lru"]


def plh(v: int) -> int:
    return make_plh(v, None, 0)


_LINEAGE = {
    0: (None, 0),
    1: (0, 1),
    2: (1, 2),
    3: (2, 3),
    4: (3, 4),
    5: (1, 2),
    6: (5, 3),
    7: (2, 3),
    8: (7, 4),
    9: (8, 5),
    10: (None, 0),
    11: (10, 1),
    12: (11, 2),
    13: (None, 0),
}


def lineage_plh(block_id: int) -> int:
    parent, position = _LINEAGE.get(block_id, (None, 0))
    return make_plh(block_id, parent, position)


def make_mgr(capacity: int, block_size: int = 16, backend: str = "lineage") -> KvManager:
    return KvManager(capacity, block_size, dp_rank=0, eviction=backend)


def use_full(mgr: KvManager, seq_hash: int, p: int) -> int:
    return mgr.process(Use([FullBlock(seq_hash)], [], [p], None, None))


def use_partial(mgr: KvManager, partial_id: int) -> int:
    return mgr.process(Use([PartialBlock(partial_id)], [], [], None, None))


def deref_full(mgr: KvManager, seq_hash: int) -> None:
    mgr.process(Deref([FullBlock(seq_hash)]))


def deref_partial(mgr: KvManager, partial_id: int) -> None:
    mgr.process(Deref([PartialBlock(partial_id)]))


def new_partial_id() -> int:
    return uuid.uuid4().int


def stored(event: KvEvent) -> BlockStored:
    assert isinstance(event, BlockStored), f"expected Stored, got {event!r}"
    return event


def removed(event: KvEvent) -> BlockRemoved:
    assert isinstance(event, BlockRemoved), f"expected Removed, got {event!r}"
    return event


@pytest.fixture(autouse=True)
def _check_after(request: pytest.FixtureRequest) -> None:
    """Nothing: invariants are checked explicitly where a manager is at hand."""


# ── the seed's tests ──────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("backend", BACKENDS)
def test_use_single_full_block(backend: str) -> None:
    mgr = make_mgr(10, backend=backend)
    assert use_full(mgr, 1, plh(100)) == 1
    assert mgr.num_active_blocks() == 1
    mgr.check_invariants()


def test_use_rejects_short_token_ids_before_mutating_state() -> None:
    mgr = make_mgr(10, 4)
    with pytest.raises(SignalError):
        mgr.process(
            Use(
                [FullBlock(1), FullBlock(2)], [101, 102], [plh(100), plh(200)], [[1, 2, 3, 4]], None
            )
        )
    assert mgr.num_active_blocks() == 0
    assert mgr.num_active_block_refs() == 0
    assert mgr.take_events() == []
    assert mgr.next_event_id == 0
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_use_bumps_refcount(backend: str) -> None:
    mgr = make_mgr(10, backend=backend)
    use_full(mgr, 1, plh(100))
    use_full(mgr, 1, plh(100))
    assert mgr.num_active_blocks() == 1
    assert mgr.num_active_block_refs() == 2
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_exhaustion_returns_partial(backend: str) -> None:
    mgr = make_mgr(4, backend=backend)
    for i in range(4):
        assert use_full(mgr, i, plh(i + 100)) == 1
    assert use_full(mgr, 4, plh(500)) == 0
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deref_returns_to_inactive(backend: str) -> None:
    mgr = make_mgr(4, backend=backend)
    use_full(mgr, 1, plh(100))
    deref_full(mgr, 1)
    assert mgr.num_active_blocks() == 0
    assert mgr.num_inactive_blocks() == 1
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inactive_reuse_via_match_blocks(backend: str) -> None:
    mgr = make_mgr(10, backend=backend)
    p = plh(100)
    use_full(mgr, 1, p)
    deref_full(mgr, 1)
    assert use_full(mgr, 2, p) == 1
    assert mgr.num_active_blocks() == 1
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eviction_frees_inactive_for_new_allocation(backend: str) -> None:
    mgr = make_mgr(4, backend=backend)
    for i in range(4):
        use_full(mgr, i, plh(i + 100))
    for i in range(4):
        deref_full(mgr, i)
    for i in range(10, 14):
        assert use_full(mgr, i, plh(i + 1000)) == 1
    assert mgr.num_active_blocks() == 4
    mgr.check_invariants()


def test_promote_basic() -> None:
    mgr = make_mgr(10)
    partial_id = new_partial_id()
    use_partial(mgr, partial_id)
    mgr.process(Promote(partial_id, 42, None, 0, plh(500), None))
    assert mgr.num_active_blocks() == 1
    assert not mgr.has_partial(partial_id)
    assert mgr.is_active(42)
    mgr.check_invariants()


def test_promote_nonexistent_panics() -> None:
    mgr = make_mgr(10)
    with pytest.raises(SignalError, match=r"Promote: partial block .* not found"):
        mgr.process(Promote(new_partial_id(), 42, None, 0, plh(500), None))
    assert mgr.num_active_blocks() == 0
    assert mgr.take_events() == []


@pytest.mark.parametrize("held", [False, True])
def test_promote_block_equals_process_promote(held: bool) -> None:
    """`promote_block(fields)` = `process(Promote(fields))`: the same blocks, events and
    free slots, a new block or a name held already (`held`: its slot goes back)."""
    managers = [make_mgr(10), make_mgr(10)]
    for mgr in managers:
        if held:
            assert use_full(mgr, 42, plh(500)) == 1
        use_partial(mgr, 7)
    fields = (7, 42, None, 5, plh(500), None, 0)
    managers[0].process(Promote(*fields))
    managers[1].promote_block(*fields)
    for mgr in managers:
        mgr.check_invariants()
    assert managers[0].take_events() == managers[1].take_events()
    assert [mgr.refcount(42) for mgr in managers] == [2 if held else 1] * 2
    assert managers[0].num_free_blocks() == managers[1].num_free_blocks()
    assert not managers[1].has_partial(7)


def test_promote_block_of_a_missing_partial_changes_nothing() -> None:
    mgr = make_mgr(10)
    use_partial(mgr, 7)
    with pytest.raises(SignalError, match=r"Promote: partial block .* not found"):
        mgr.promote_block(8, 42, None, 0, plh(500))
    with pytest.raises(SignalError, match="token_ids must hold"):
        mgr.promote_block(7, 42, None, 0, plh(500), [1, 2])
    assert mgr.has_partial(7)
    assert not mgr.is_active(42)
    mgr.check_invariants()


def test_deref_partial_returns_to_reset() -> None:
    mgr = make_mgr(10)
    partial_id = new_partial_id()
    use_partial(mgr, partial_id)
    assert mgr.has_partial(partial_id)
    assert mgr.num_active_block_refs() == 1
    deref_partial(mgr, partial_id)
    assert not mgr.has_partial(partial_id)
    assert mgr.num_active_block_refs() == 0
    assert mgr.num_active_blocks() == 0
    mgr.check_invariants()


def test_prefill_cost_no_overlap() -> None:
    mgr = make_mgr(10)
    seq = ActiveSequence(list(range(35)), 10, 16, True, False)
    cost = mgr.get_prefill_cost(seq)
    assert cost.new_blocks == len(seq.unique_blocks()) == 3
    assert cost.new_tokens == 35
    assert cost.cached_tokens == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_eviction_backend_lru_and_multi_lru(backend: str) -> None:
    mgr = make_mgr(4, backend=backend)
    for i in range(4):
        assert use_full(mgr, i, plh(i + 100)) == 1
    for i in range(4):
        deref_full(mgr, i)
    for i in range(10, 14):
        assert use_full(mgr, i, plh(i + 1000)) == 1, f"backend={backend}"
    assert mgr.num_active_blocks() == 4
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_on_max_capacity(backend: str) -> None:
    mgr = make_mgr(10, backend=backend)
    ids = list(range(10))
    assert mgr.process(Use([FullBlock(i) for i in ids], [], [plh(i) for i in ids])) == 10
    assert mgr.num_active_blocks() == 10
    assert mgr.process(Use([FullBlock(10)], [], [plh(10)])) == 0, "over-capacity Use must return 0"
    mgr.check_invariants()


def _use_blocks(mgr: KvManager, ids: list[int]) -> int:
    return mgr.process(Use([FullBlock(i) for i in ids], [], [lineage_plh(i) for i in ids]))


def _deref_blocks(mgr: KvManager, ids: list[int]) -> None:
    mgr.process(Deref([FullBlock(i) for i in ids]))


def _assert_active(mgr: KvManager, expected: list[tuple[int, int]]) -> None:
    assert mgr.num_active_blocks() == len(expected), f"distinct active mismatch; {expected}"
    assert mgr.num_active_block_refs() == sum(r for _, r in expected)
    for block, refs in expected:
        assert mgr.refcount(block) == refs, f"block {block} refcount"


def _assert_inactive(mgr: KvManager, expected: list[int]) -> None:
    assert mgr.num_inactive_blocks() == len(expected), f"inactive mismatch; {expected}"
    for block in expected:
        assert mgr.is_inactive(lineage_plh(block)), f"block {block} should be inactive"
        assert not mgr.is_active(block)


def test_block_lifecycle_stringent() -> None:
    mgr = make_mgr(10, 16, "lineage")
    assert _use_blocks(mgr, [0, 1, 2, 3, 4]) == 5
    events = mgr.take_events()
    assert len(events) == 1
    assert list(stored(events[0]).block_hashes) == [0, 1, 2, 3, 4]
    assert stored(events[0]).parent_hash is None

    assert _use_blocks(mgr, [0, 1, 5, 6]) == 4
    events = mgr.take_events()
    assert len(events) == 1
    assert list(stored(events[0]).block_hashes) == [5, 6]
    assert stored(events[0]).parent_hash == 1
    _assert_active(mgr, [(0, 2), (1, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)])

    _deref_blocks(mgr, [4, 3, 2, 1, 0])
    assert mgr.take_events() == [], "Deref should not emit KV events"
    _assert_active(mgr, [(0, 1), (1, 1), (5, 1), (6, 1)])
    _assert_inactive(mgr, [2, 3, 4])

    _deref_blocks(mgr, [6, 5, 1, 0])
    assert mgr.take_events() == []
    _assert_active(mgr, [])
    _assert_inactive(mgr, [0, 1, 2, 3, 4, 5, 6])

    assert _use_blocks(mgr, [0, 1, 2, 7, 8, 9]) == 6
    events = mgr.take_events()
    assert len(events) == 1
    assert list(stored(events[0]).block_hashes) == [7, 8, 9]
    assert stored(events[0]).parent_hash == 2
    _assert_active(mgr, [(0, 1), (1, 1), (2, 1), (7, 1), (8, 1), (9, 1)])
    _assert_inactive(mgr, [3, 4, 5, 6])

    assert _use_blocks(mgr, [10, 11, 12]) == 3
    events = mgr.take_events()
    assert len(events) == 2, "expected Stored + Removed for [10, 11, 12]"
    assert list(stored(events[0]).block_hashes) == [10, 11, 12]
    assert stored(events[0]).parent_hash is None
    assert list(removed(events[1]).block_hashes) == [4, 3, 6]
    _assert_active(mgr, [(b, 1) for b in (0, 1, 2, 7, 8, 9, 10, 11, 12)])
    _assert_inactive(mgr, [5])

    assert _use_blocks(mgr, [13]) == 1
    events = mgr.take_events()
    assert len(events) == 2
    assert list(stored(events[0]).block_hashes) == [13]
    assert stored(events[0]).parent_hash is None
    assert list(removed(events[1]).block_hashes) == [5]
    _assert_active(mgr, [(b, 1) for b in (0, 1, 2, 7, 8, 9, 10, 11, 12, 13)])
    assert mgr.num_inactive_blocks() == 0
    assert mgr.next_event_id == 7
    mgr.check_invariants()


def test_chunked_prefill_parent_hash() -> None:
    block_size = 64
    seq = ActiveSequence(list(range(512)), 100, block_size, True, False)
    mgr = make_mgr(256, block_size)
    signal = seq.prepare_allocation(256)
    assert signal is not None
    mgr.process(signal)
    seq.commit_allocation(256)
    signal = seq.prepare_allocation(512)
    assert signal is not None
    mgr.process(signal)
    seq.commit_allocation(512)
    events = mgr.take_events()
    assert len(events) == 2, "expected two Stored events"
    assert stored(events[0]).parent_hash is None, "first chunk should have no parent_hash"
    block3 = seq.unique_blocks()[3]
    assert isinstance(block3, FullBlock)
    assert stored(events[1]).parent_hash == block3.seq_hash
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_repreempt_after_partial_recompute_only_frees_reallocated_blocks(backend: str) -> None:
    seq = ActiveSequence(list(range(6)), 16, 4, True, False)
    mgr = make_mgr(16, 4, backend)
    signal = seq.take_creation_signal()
    assert signal is not None
    assert mgr.process(signal) == 2
    for _ in range(3):
        for sig in seq.generate():
            mgr.process(sig)
        if seq.generated_tokens < seq.max_output_tokens:
            seq.commit_allocation(len(seq))
    assert mgr.num_active_blocks() == 3
    for sig in seq.reset_with_signal():
        mgr.process(sig)
    assert mgr.num_active_blocks() == 0
    prompt_only = seq.prepare_allocation(seq.num_input_tokens)
    assert prompt_only is not None
    assert mgr.process(prompt_only) == 2
    seq.commit_allocation(seq.num_input_tokens)
    assert mgr.num_active_blocks() == 2
    for sig in seq.reset_with_signal():
        mgr.process(sig)
    assert mgr.num_active_blocks() == 0
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inactive_hit_does_not_republish_stored(backend: str) -> None:
    mgr = make_mgr(4, backend=backend)
    use_full(mgr, 1, plh(100))
    deref_full(mgr, 1)
    use_full(mgr, 1, plh(100))
    events = mgr.take_events()
    assert sum(isinstance(e, BlockStored) for e in events) == 1, (
        "reactivation must not re-emit Stored"
    )
    assert sum(isinstance(e, BlockRemoved) for e in events) == 0, "Deref must not emit Removed"


def test_stored_suffix_anchors_to_last_reused_block() -> None:
    mgr = make_mgr(8)
    mgr.process(Use([FullBlock(10), FullBlock(11)], [], [plh(10), plh(11)]))
    deref_full(mgr, 10)
    deref_full(mgr, 11)
    mgr.take_events()
    mgr.process(Use([FullBlock(10), FullBlock(11), FullBlock(12)], [], [plh(10), plh(11), plh(12)]))
    events = mgr.take_events()
    assert len(events) == 1, "only the new suffix should fire a Stored"
    event = stored(events[0])
    assert list(event.block_hashes) == [12], "Stored must only include C"
    assert event.parent_hash == 11, "parent_hash must anchor to the last reused full block (B=11)"


def test_swap_in_registration_anchors_suffix_to_reused_prefix_parent() -> None:
    mgr = make_mgr(8)
    slots = mgr.reserve_swap_in_destination_slots(2)
    assert isinstance(slots, list)
    entries = [
        SwapInBlock(12, plh(12), 120, [1] * 16),
        SwapInBlock(13, plh(13), 130, [2] * 16),
    ]
    assert mgr.register_swapped_in_blocks(entries, 11, slots) == 2
    events = mgr.take_events()
    assert len(events) == 1, "swap-in suffix should publish one Stored"
    event = stored(events[0])
    assert event.parent_hash == 11
    assert list(event.block_hashes) == [12, 13]
    assert list(event.tokens_hashes) == [120, 130]
    assert event.token_ids == [[1] * 16, [2] * 16]
    assert mgr.num_inactive_blocks() == 2, "registered swap-in blocks land in inactive G1"
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_prefix_distinct_vs_refcount(backend: str) -> None:
    mgr = make_mgr(8, backend=backend)
    mgr.process(Use([FullBlock(10), FullBlock(11), FullBlock(12)], [], [plh(10), plh(11), plh(12)]))
    assert mgr.num_active_blocks() == 3
    assert mgr.num_active_block_refs() == 3
    mgr.process(Use([FullBlock(10), FullBlock(11), FullBlock(13)], [], [plh(10), plh(11), plh(13)]))
    assert mgr.num_active_blocks() == 4, "shared prefix must not inflate distinct count"
    assert mgr.num_active_block_refs() == 6, "handle count reflects per-request refcount"
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_plh_stable_across_preempt_retry(backend: str) -> None:
    block_size = 16
    seq = ActiveSequence(list(range(64)), 100, block_size, False, False)
    mgr = make_mgr(8, block_size, backend)
    signal = seq.take_creation_signal()
    assert signal is not None
    assert mgr.process(signal) == 4
    assert mgr.num_active_blocks() == 4
    for sig in seq.reset_with_signal():
        mgr.process(sig)
    assert mgr.num_active_blocks() == 0
    assert mgr.num_inactive_blocks() == 4
    signal = seq.take_creation_signal()
    assert signal is not None
    assert mgr.process(signal) == 4
    assert mgr.num_active_blocks() == 4
    assert mgr.num_inactive_blocks() == 0
    events = mgr.take_events()
    assert sum(isinstance(e, BlockStored) for e in events) == 1, "self-match: no duplicate Stored"
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eviction_emits_exact_removed_event(backend: str) -> None:
    mgr = make_mgr(2, backend=backend)
    mgr.process(Use([FullBlock(10), FullBlock(11)], [], [plh(10), plh(11)]))
    deref_full(mgr, 10)
    deref_full(mgr, 11)
    assert mgr.num_active_blocks() == 0
    assert mgr.num_inactive_blocks() == 2
    mgr.take_events()
    use_full(mgr, 12, plh(12))
    events = mgr.take_events()
    removed_hashes = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert len(removed_hashes) == 1, "exactly one block should be reported as evicted"
    assert removed_hashes[0] in (10, 11)
    # Lineage and LRU evict the oldest insertion; both blocks are roots here.
    if backend != "multi-lru":
        assert removed_hashes == [10]
    assert sum(isinstance(e, BlockStored) for e in events) == 1
    assert isinstance(events[0], BlockStored), "Stored precedes Removed within one Use"
    mgr.check_invariants()


# ── beyond the seed: the anchoring fix and bad input ─────────────────────────────────────


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_hit_new_emits_one_stored_per_run_anchored_to_previous_block(backend: str) -> None:
    """Seed bug §6.4: new -> hit -> new must not announce the first new block under the hit."""
    mgr = make_mgr(8, backend=backend)
    mgr.process(Use([FullBlock(2)], [], [plh(2)]))
    mgr.take_events()
    mgr.process(
        Use(
            [FullBlock(1), FullBlock(2), FullBlock(3)],
            [11, 12, 13],
            [plh(1), plh(2), plh(3)],
            None,
            FullBlock(0),
        )
    )
    events = mgr.take_events()
    assert [(stored(e).parent_hash, list(stored(e).block_hashes)) for e in events] == [
        (0, [1]),
        (2, [3]),
    ]
    assert [list(stored(e).tokens_hashes) for e in events] == [[11], [13]]
    assert [e.event_id for e in events] == [1, 2]
    mgr.check_invariants()


@pytest.mark.parametrize(
    "signal",
    [
        Use([FullBlock(1)], [], [], None, None),  # missing PLH
        Use([FullBlock(1)], [1, 2], [plh(1)], None, None),  # too many local hashes
        Use([FullBlock(1)], [], [plh(1)], [[1, 2, 3]], None),  # short token list
        Use([FullBlock(1)], [], [plh(1)], None, PartialBlock(7)),  # partial parent
        Deref([FullBlock(99)]),
        Deref([PartialBlock(5)]),
        Promote(5, 42, None, 0, plh(42), None),
    ],
)
def test_bad_signal_raises_before_any_change(signal: Use | Deref | Promote) -> None:
    mgr = make_mgr(4, 4)
    mgr.process(Use([FullBlock(3), PartialBlock(8)], [33], [plh(3)], [[1, 2, 3, 4]]))
    mgr.take_events()
    before = (mgr.num_active_blocks(), mgr.num_active_block_refs(), mgr.num_inactive_blocks())
    with pytest.raises(SignalError):
        mgr.process(signal)
    assert (
        mgr.num_active_blocks(),
        mgr.num_active_block_refs(),
        mgr.num_inactive_blocks(),
    ) == before
    assert mgr.take_events() == []
    assert mgr.next_event_id == 1
    mgr.check_invariants()


def test_deref_of_more_handles_than_held_changes_nothing() -> None:
    mgr = make_mgr(4)
    use_full(mgr, 1, plh(1))
    with pytest.raises(SignalError):
        mgr.process(Deref([FullBlock(1), FullBlock(1)]))
    assert mgr.refcount(1) == 1
    mgr.check_invariants()


def test_events_off_consume_no_ids() -> None:
    mgr = KvManager(4, 16, enable_events=False)
    use_full(mgr, 1, plh(1))
    assert mgr.take_events() == []
    assert mgr.next_event_id == 0


def test_stored_events_carry_tier_rank_and_tokens() -> None:
    mgr = KvManager(8, 4, dp_rank=3)
    seq = ActiveSequence(list(range(9)), 4, 4, True, True)
    signal = seq.take_creation_signal()
    assert signal is not None
    assert mgr.process(signal) == 3
    (event,) = mgr.take_events()
    event = stored(event)
    assert event.dp_rank == 3
    assert event.tier is StorageTier.DEVICE
    assert list(event.block_hashes) == seq.seq_hashes
    assert list(event.tokens_hashes) == seq.local_hashes
    assert event.token_ids == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_prefill_cost_counts_active_and_inactive_prefix() -> None:
    mgr = make_mgr(16, 4)
    first = ActiveSequence(list(range(12)), 4, 4)
    signal = first.take_creation_signal()
    assert signal is not None
    mgr.process(signal)
    for sig in first.reset_with_signal():  # all three blocks inactive now
        mgr.process(sig)
    second = ActiveSequence([*range(8), 100, 101, 102, 103, 104, 105], 4, 4)
    cost = mgr.get_prefill_cost(second)
    assert (cost.new_blocks, cost.cached_tokens, cost.new_tokens, cost.active_cached_tokens) == (
        2,
        8,
        6,
        0,
    )


# ── fast paths: bulk backend calls, leading hits, lone partial blocks ────────────────────


class ScalarLoops:
    """An eviction backend whose bulk operations are the scalar loops they stand for."""

    def __init__(self, inner: EvictionBackend) -> None:
        self.inner = inner

    def insert(self, plh: int) -> None:
        self.inner.insert(plh)

    def remove(self, plh: int) -> bool:
        return self.inner.remove(plh)

    def evict(self) -> int | None:
        return self.inner.evict()

    def insert_many(self, plhs: Iterable[int]) -> None:
        for plh in plhs:
            self.inner.insert(plh)

    def evict_many(self, count: int) -> list[int]:
        victims = [self.inner.evict() for _ in range(count)]
        return [plh for plh in victims if plh is not None]

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, plh: object) -> bool:
        return plh in self.inner

    def check_invariants(self) -> None:
        self.inner.check_invariants()


def manager_run(seed: int, backend: str, fast: bool) -> list[object]:
    """Events, results and registered sets of a random workload with shared prefixes, a tight
    pool (evictions, out-of-capacity Uses), decode, preemption and tail-first frees."""
    rng = random.Random(seed)
    mgr = KvManager(40, 4, eviction=backend)
    if not fast:
        mgr._backend = ScalarLoops(mgr._backend)
        mgr._use_leading_hits = lambda blocks, plhs: 0  # type: ignore[method-assign]
        mgr._store_rest_in_bulk = lambda *args: None  # type: ignore[method-assign]

    def process(signal: MoveBlock) -> int:
        # The reference skips `process`'s lone-partial shortcut.
        return mgr._use(signal) if not fast and type(signal) is Use else mgr.process(signal)

    prefixes = [[rng.randrange(1000) for _ in range(4 * rng.randrange(1, 5))] for _ in range(3)]
    live: list[ActiveSequence] = []
    trace: list[object] = []
    for _ in range(150):
        action = rng.random()
        if action < 0.35 or not live:
            tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(40))]
            seq = ActiveSequence(tokens, rng.randrange(1, 12), 4, rng=rng)
            signal = seq.take_creation_signal()
            assert signal is not None
            held = process(signal)
            trace.append(held)
            if held == len(signal.raw_blocks):
                live.append(seq)
            elif held:  # out of capacity: release what was held, tail first
                process(Deref(list(reversed(signal.blocks[:held]))))
        elif action < 0.8:
            seq = live[rng.randrange(len(live))]
            if not mgr.num_free_blocks():
                continue
            trace.extend(process(step_signal) for step_signal in seq.generate())
            if seq.is_complete():
                live.remove(seq)
            else:
                seq.commit_allocation(len(seq))
        else:
            seq = live.pop(rng.randrange(len(live)))
            for free_signal in seq.reset_with_signal():
                process(free_signal)
        mgr.check_invariants()
        trace.append(mgr.take_events())
        trace.append(sorted(mgr.registered_seq_hashes()))
    return trace


@pytest.mark.pure_core  # turns the fast paths off by patching the manager
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_fast_paths_match_the_per_block_loops(backend: str, seed: int) -> None:
    """Bulk backend calls (`insert_many` on Deref, `evict_many` in a bulk store), the leading
    hit scan and the lone-partial shortcut change no result, event or eviction."""
    assert manager_run(seed, backend, fast=True) == manager_run(seed, backend, fast=False)


def test_deref_tail_first_goes_inactive_as_one_chain() -> None:
    """A request's tail-first free inserts its chain in that order: the tail goes first."""
    mgr = make_mgr(8, 4)
    seq = ActiveSequence(list(range(14)), 1, 4)
    signal = seq.take_creation_signal()
    assert signal is not None
    assert mgr.process(signal) == 4  # three full blocks and a partial one
    free = seq.reset_with_signal()
    assert [type(b) for b in free[0].blocks][:1] == [PartialBlock]  # type: ignore[union-attr]
    for sig in free:
        mgr.process(sig)
    assert mgr.num_inactive_blocks() == 3
    assert mgr.num_active_block_refs() == 0
    mgr.check_invariants()
    # A new sequence needs all 8 slots: the chain is evicted leaf first, tail to head.
    other = ActiveSequence(list(range(100, 132)), 1, 4)
    signal = other.take_creation_signal()
    assert signal is not None
    assert mgr.process(signal) == 8
    removed = [e for e in mgr.take_events() if isinstance(e, BlockRemoved)]
    assert [list(e.block_hashes) for e in removed] == [seq.seq_hashes[::-1]]
    mgr.check_invariants()


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([FullBlock(2), FullBlock(99), FullBlock(1)], "full block 0x63 is not held"),
        ([FullBlock(2), PartialBlock(6), FullBlock(1)], "partial block 0x6 is not held"),
        ([PartialBlock(8), FullBlock(98), FullBlock(99)], "full block 0x62 is not held"),
        ([FullBlock(1), PartialBlock(8), PartialBlock(9)], "partial block 0x9 is not held"),
        ([FullBlock(1), FullBlock(1)], "full block 0x1 is not held"),
        ([PartialBlock(8), PartialBlock(8)], "partial block 0x8 is not held"),
    ],
)
def test_bad_deref_names_the_first_block_not_held_and_changes_nothing(
    blocks: list[FullBlock | PartialBlock], message: str
) -> None:
    mgr = make_mgr(8)
    mgr.process(Use([FullBlock(1), FullBlock(2), PartialBlock(8)], [], [plh(1), plh(2)]))
    before = (mgr.num_active_blocks(), mgr.num_active_block_refs(), mgr.num_inactive_blocks())
    with pytest.raises(SignalError, match=message):
        mgr.process(Deref(blocks))
    after = (mgr.num_active_blocks(), mgr.num_active_block_refs(), mgr.num_inactive_blocks())
    assert after == before
    assert mgr.refcount(1) == 1
    assert mgr.has_partial(8)
    mgr.check_invariants()


def test_deref_with_partial_blocks_anywhere_and_repeats() -> None:
    mgr = make_mgr(8)
    mgr.process(Use([FullBlock(1), FullBlock(2), PartialBlock(8)], [], [plh(1), plh(2)]))
    mgr.process(Use([FullBlock(1), PartialBlock(9)], [], [plh(1)]))
    assert mgr.refcount(1) == 2
    # Partial blocks between and after full ones; block 1 named twice (it holds two handles).
    mgr.process(Deref([FullBlock(1), PartialBlock(9), FullBlock(2), FullBlock(1), PartialBlock(8)]))
    assert mgr.num_active_block_refs() == 0
    assert mgr.num_inactive_blocks() == 2
    assert not mgr.has_partial(8)
    assert not mgr.has_partial(9)
    mgr.check_invariants()


def _two_holders_of_a_prefix() -> tuple[KvManager, ActiveSequence, ActiveSequence]:
    """Two requests sharing their first two blocks (of three each), both allocated."""
    mgr = make_mgr(16, 4)
    first = ActiveSequence(list(range(12)), 4, 4)
    second = ActiveSequence([*range(8), 200, 201, 202, 203], 4, 4)
    for seq in (first, second):
        signal = seq.take_creation_signal()
        assert signal is not None
        assert mgr.process(signal) == 3
    assert mgr.refcount(first.seq_hashes[0]) == 2
    return mgr, first, second


def test_deref_of_a_shared_prefix_keeps_the_names_still_held() -> None:
    """A Deref whose first block is shared (compiled: its names only looked up, not popped
    and put back) releases exactly what the general loop releases."""
    mgr, first, second = _two_holders_of_a_prefix()
    for signal in first.free_signal():
        mgr.process(signal)
    shared, own = first.seq_hashes[:2], first.seq_hashes[2]
    assert [mgr.refcount(h) for h in shared] == [1, 1]
    assert not mgr.is_active(own)
    assert mgr.is_inactive(first.plhs[2])
    assert (mgr.num_active_block_refs(), mgr.num_inactive_blocks()) == (3, 1)
    mgr.check_invariants()
    for signal in second.free_signal():
        mgr.process(signal)
    assert (mgr.num_active_block_refs(), mgr.num_inactive_blocks()) == (0, 4)
    mgr.check_invariants()


@pytest.mark.parametrize("repeat", [0, 1, 2])
def test_deref_of_a_shared_prefix_naming_a_block_twice_changes_nothing(repeat: int) -> None:
    """Named twice with one handle, a block of a Deref whose first block is shared raises
    the general loop's error, and nothing changes."""
    mgr, first, _second = _two_holders_of_a_prefix()
    blocks = [FullBlock(h) for h in reversed(first.seq_hashes)]
    blocks.insert(repeat, FullBlock(first.seq_hashes[2]))
    before = (mgr.num_active_blocks(), mgr.num_active_block_refs(), mgr.num_inactive_blocks())
    with pytest.raises(SignalError, match=f"full block {first.seq_hashes[2]:#x} is not held"):
        mgr.process(Deref(blocks))
    after = (mgr.num_active_blocks(), mgr.num_active_block_refs(), mgr.num_inactive_blocks())
    assert after == before
    assert [mgr.refcount(h) for h in first.seq_hashes] == [2, 2, 1]
    mgr.check_invariants()


def test_lone_partial_use_with_stray_fields_is_still_rejected() -> None:
    """`process`'s lone-partial shortcut only takes what `_check_use` accepts."""
    mgr = make_mgr(4)
    with pytest.raises(SignalError):
        mgr.process(Use.from_raw([PartialBlock(3)], [], [plh(1)], None, None, 0))
    with pytest.raises(SignalError):
        mgr.process(Use([PartialBlock(3)], [], [], None, PartialBlock(2)))
    assert mgr.process(Use([PartialBlock(3)], [], [], None, FullBlock(2))) == 1
    assert mgr.has_partial(3)
    mgr.check_invariants()


def test_bulk_eviction_keeps_lineage_order_when_a_re_leafed_parent_is_not_next() -> None:
    """A shared prefix re-freed after another chain re-leafs with a newer tick than that
    chain's leaf: the bulk eviction must take the other chain first, as `evict` would."""
    mgr = make_mgr(10, 4)
    p1, p2, a1, a2, b1, b2, e1, e2 = range(1, 9)

    def chain_use(hashes: list[int], parent: int | None = None) -> Use:
        plhs, prev = [], parent
        for position, seq_hash in enumerate(hashes):
            plhs.append(make_plh(seq_hash, prev, position))
            prev = seq_hash
        return Use([FullBlock(h) for h in hashes], [], plhs)

    def deref(hashes: list[int]) -> None:
        mgr.process(Deref([FullBlock(h) for h in hashes]))

    mgr.process(chain_use([p1, p2, a1, a2]))
    mgr.process(chain_use([p1, p2, b1, b2]))
    mgr.process(chain_use([e1, e2]))
    deref([a2, a1, p2, p1])  # a2, a1 go inactive; the prefix is still held by b
    deref([b2, b1, p2, p1])  # b2, b1, then the prefix
    mgr.process(chain_use([p1, p2]))  # the prefix is active again (ghosts in the forest)
    deref([e2, e1])
    deref([p2, p1])  # the prefix is inactive again, newer than e's chain
    mgr.take_events()
    fresh = list(range(100, 110))
    assert mgr.process(chain_use(fresh, parent=None)) == 10
    removed = [e for e in mgr.take_events() if isinstance(e, BlockRemoved)]
    assert [list(e.block_hashes) for e in removed] == [[a2, a1, b2, b1, e2, e1, p2, p1]]
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bulk_store_gives_up_on_a_registered_plh_and_the_loop_makes_an_alias(backend: str) -> None:
    """After a miss, the rest of a Use is stored in one go only if none of it is in G1. A later
    block whose PLH is registered under another name undoes that attempt; the per-block loop
    then stores the new blocks and holds the registered one under the new name (an alias)."""
    mgr = make_mgr(16, backend=backend)
    assert mgr.process(Use([FullBlock(h) for h in (1, 2, 3)], [], [plh(1), plh(2), plh(3)])) == 3
    mgr.process(Deref([FullBlock(h) for h in (3, 2, 1)]))
    mgr.take_events()
    signal = Use([FullBlock(h) for h in (10, 11, 12)], [7, 8, 9], [plh(10), plh(11), plh(2)])
    assert mgr.process(signal) == 3
    mgr.check_invariants()
    assert [mgr.refcount(h) for h in (10, 11, 12, 2)] == [1, 1, 1, 0]
    assert mgr.is_active(12)
    assert not mgr.is_active(2)
    assert mgr.num_active_blocks() == 3  # 10, 11 and the block registered as 2
    assert mgr.num_inactive_blocks() == 2  # 1 and 3
    events = mgr.take_events()
    assert [(stored(e).block_hashes, stored(e).tokens_hashes) for e in events] == [
        ([10, 11], [7, 8])
    ]
    # The alias releases the registered block, which goes inactive again.
    mgr.process(Deref([FullBlock(12)]))
    mgr.check_invariants()
    assert mgr.num_inactive_blocks() == 3
    assert sorted(mgr.registered_seq_hashes()) == [1, 2, 3, 10, 11]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bulk_store_gives_up_on_a_repeated_block(backend: str) -> None:
    """A name repeated in the rest of a Use undoes the bulk attempt: the loop stores it once
    and its repeat takes a second handle, exactly as before."""
    mgr = make_mgr(8, backend=backend)
    signal = Use([FullBlock(h) for h in (20, 21, 20)], [], [plh(20), plh(21), plh(20)])
    assert mgr.process(signal) == 3
    mgr.check_invariants()
    assert [mgr.refcount(h) for h in (20, 21)] == [2, 1]
    assert mgr.num_active_blocks() == 2
    assert mgr.num_active_block_refs() == 3
    assert [stored(e).block_hashes for e in mgr.take_events()] == [[20, 21]]
    mgr.process(Deref([FullBlock(h) for h in (20, 21, 20)]))
    mgr.check_invariants()
    assert mgr.num_active_block_refs() == 0
    assert mgr.num_inactive_blocks() == 2


def test_a_failing_deref_gives_back_every_handle_it_released() -> None:
    """A Deref is applied block by block and undone when a later block is not held: the
    handles, refcounts and inactive pool are exactly as before."""
    mgr = make_mgr(8)
    mgr.process(Use([FullBlock(1), FullBlock(2), PartialBlock(8)], [], [plh(1), plh(2)]))
    mgr.process(Use([FullBlock(1)], [], [plh(1)]))
    with pytest.raises(SignalError, match="full block 0x2 is not held"):
        mgr.process(Deref([FullBlock(1), FullBlock(1), FullBlock(2), FullBlock(2)]))
    with pytest.raises(SignalError, match="partial block 0x9 is not held"):
        mgr.process(Deref([FullBlock(2), FullBlock(1), PartialBlock(9)]))
    mgr.check_invariants()
    assert [mgr.refcount(1), mgr.refcount(2)] == [2, 1]
    assert mgr.has_partial(8)
    assert mgr.num_inactive_blocks() == 0
    assert mgr.num_active_block_refs() == 4


def _chain_use(hashes: list[int], first_position: int = 0) -> Use:
    plhs = [
        make_plh(h, hashes[i - 1] if i else None, first_position + i) for i, h in enumerate(hashes)
    ]
    return Use([FullBlock(h) for h in hashes], [], plhs, None, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bulk_stores_recycle_evicted_records_exactly(backend: str) -> None:
    """Records of blocks a bulk store evicts are reused by later stores: every block keeps
    its own identity (hits, evictions and events as if each record were new)."""
    mgr = make_mgr(6, backend=backend)
    first = [0x101, 0x102, 0x103, 0x104, 0x105]
    second = [0x201, 0x202, 0x203, 0x204]
    third = [0x301, 0x302, 0x303]
    for hashes in (first, second, third, first):
        use = _chain_use(hashes)
        assert mgr.process(use) == len(hashes)
        mgr.check_invariants()
        assert all(mgr.is_active(h) for h in hashes)
        mgr.process(Deref([FullBlock(h) for h in reversed(hashes)]))
        mgr.check_invariants()
    registered = set(mgr.registered_seq_hashes())
    assert set(first) <= registered
    assert len(registered) == 6
    # A hit on a recycled record reactivates that block, not the one it replaced.
    assert mgr.process(_chain_use(first[:2])) == 2
    assert mgr.refcount(first[1]) == 1
    assert mgr.num_inactive_blocks() == 4
    mgr.check_invariants()


def _vouched_chain_use(hashes: list[int], vouched: bool) -> Use:
    """`_chain_use(hashes)` whose positions the sender vouches for (`lineage_start` 0) or not."""
    plhs = [make_plh(h, hashes[i - 1] if i else None, i) for i, h in enumerate(hashes)]
    raw: list[int | PartialBlock] = list(hashes)
    return Use.from_raw(raw, [], plhs, None, None, len(hashes), 0 if vouched else -1)


def test_bulk_stores_fill_recycled_records_like_the_lineage_decoding() -> None:
    """A bulk store of vouched positions fills the Lineage fields of its records (recycled
    ones too) from their hashes; the same run with the PLHs decoded instead leaves the same
    forest, leaf queue and registrations at every step, including a bulk attempt that gives
    up midway (the third block repeats the first) and is redone by the per-block loop."""
    runs = [
        [0x101, 0x102, 0x103, 0x104, 0x105],
        [0x201, 0x202, 0x203, 0x204],
        [0x301, 0x302, 0x303],
        [0x401, 0x402, 0x401],  # the bulk gives up at the repeat, the loop goes on
        [0x101, 0x102, 0x103, 0x104, 0x105],
    ]
    managers = {vouched: make_mgr(6) for vouched in (True, False)}
    for hashes in runs:
        for vouched, mgr in managers.items():
            assert mgr.process(_vouched_chain_use(hashes, vouched)) == len(hashes)
            mgr.check_invariants()
            mgr.process(Deref([FullBlock(h) for h in reversed(hashes)]))
            mgr.check_invariants()
        fast, decoded = (managers[v] for v in (True, False))
        assert fast._backend.forest() == decoded._backend.forest()  # type: ignore[attr-defined]
        assert fast._backend.leaf_queue() == decoded._backend.leaf_queue()  # type: ignore[attr-defined]
        assert sorted(fast.registered_seq_hashes()) == sorted(decoded.registered_seq_hashes())


def test_prefill_cost_is_a_value() -> None:
    from shmkv.manager import PrefillCost

    cost = PrefillCost(3, 40, 8, 0, cached_blocks=1)
    assert cost == PrefillCost(3, 40, 8, 0, 1)
    assert cost != PrefillCost(3, 40, 8, 0)
    assert hash(cost) == hash(PrefillCost(3, 40, 8, 0, 1))
    assert repr(cost) == (
        "PrefillCost(new_blocks=3, new_tokens=40, cached_tokens=8, active_cached_tokens=0,"
        " cached_blocks=1)"
    )


@pytest.mark.parametrize(
    "raw",
    [
        [2, 1, "not a block"],  # a stray object after blocks already released
        [1, 2, PartialBlock(8), PartialBlock(8)],  # a repeated partial block at the end
        [2, 1, 1, 1],  # more handles than held
        [1, 3],  # a name not held
    ],
)
def test_a_failing_deref_restores_shared_names_exactly(raw: list[object]) -> None:
    """Deref of names held twice (a shared prefix) failing anywhere: every name, handle and
    refcount is as before, and later Derefs release them normally."""
    mgr = make_mgr(8)
    mgr.process(Use([FullBlock(1), FullBlock(2), PartialBlock(8)], [], [plh(1), make_plh(2, 1, 1)]))
    mgr.process(Use([FullBlock(1), FullBlock(2)], [], [plh(1), make_plh(2, 1, 1)]))
    mgr.process(Use([FullBlock(7)], [], [plh(1)]))  # another name for block 1: an alias
    with pytest.raises((SignalError, AttributeError, TypeError)):  # TypeError: compiled
        mgr.process(Deref.from_raw(raw))  # type: ignore[arg-type]
    mgr.check_invariants()
    assert [mgr.refcount(h) for h in (1, 2, 7)] == [2, 2, 1]
    assert mgr.num_active_block_refs() == 6  # and the partial block
    assert mgr.num_inactive_blocks() == 0
    assert mgr.has_partial(8)
    mgr.process(Deref.from_raw([2, 1, PartialBlock(8)]))
    mgr.process(Deref.from_raw([7]))
    assert [mgr.refcount(h) for h in (1, 2, 7)] == [1, 1, 0]
    assert mgr.num_inactive_blocks() == 0
    mgr.process(Deref.from_raw([2, 1]))
    assert mgr.num_inactive_blocks() == 2
    assert mgr.num_active_block_refs() == 0
    mgr.check_invariants()
