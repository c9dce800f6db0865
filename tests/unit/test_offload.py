"""The seed's kvbm-offload tests (one counterpart each) and behavior.md §16.12-§16.14."""

from __future__ import annotations

import pytest

from shmkv.events import BlockRemoved, BlockStored, KvEvent, StorageTier
from shmkv.hashing import make_plh
from shmkv.manager import SWAP_IN_NO_HITS, KvManager, SwapInBlock, SwapInScheduled
from shmkv.offload import BlockMeta, G2Event, G2Stored, OffloadItem
from shmkv.offload_local import HostTierAnnouncer, LocalG2Engine, OffloadConfig
from shmkv.signals import Deref, FullBlock, Use

HOST = StorageTier.HOST_PINNED
DEVICE = StorageTier.DEVICE


def plh(v: int) -> int:
    return make_plh(v, None, 0)


def attach_test_offload_engine(mgr: KvManager, num_g2_blocks: int = 100_000) -> LocalG2Engine:
    engine = LocalG2Engine(
        OffloadConfig(
            num_g2_blocks=num_g2_blocks,
            block_size_bytes=1_000_000,
            bandwidth_g1_to_g2_gbps=1.0,
            bandwidth_g2_to_g1_gbps=1.0,
        )
    )
    mgr.attach_offload_engine(engine)
    return engine


def use_full_with_hash(mgr: KvManager, seq_hash: int, p: int, local: int, tokens: list[int]) -> int:
    return mgr.process(Use([FullBlock(seq_hash)], [local], [p], [tokens]))


def use_full(mgr: KvManager, seq_hash: int, p: int) -> int:
    return mgr.process(Use([FullBlock(seq_hash)], [], [p]))


def deref_full(mgr: KvManager, seq_hash: int) -> None:
    mgr.process(Deref([FullBlock(seq_hash)]))


def has_removed(events: list[KvEvent], tier: StorageTier, seq_hash: int) -> bool:
    return any(
        isinstance(e, BlockRemoved) and e.tier is tier and seq_hash in e.block_hashes
        for e in events
    )


def stored_block(
    events: list[KvEvent], tier: StorageTier, seq_hash: int
) -> tuple[BlockStored, int] | None:
    for e in events:
        if isinstance(e, BlockStored) and e.tier is tier and seq_hash in e.block_hashes:
            return e, list(e.block_hashes).index(seq_hash)
    return None


def test_fresh_manager_has_no_offload_engine() -> None:
    assert not KvManager(8, 4).has_offload_engine()


def test_attach_new_offload_engine_wires_in_after_construction() -> None:
    mgr = KvManager(16, 4)
    assert not mgr.has_offload_engine()
    mgr.attach_offload_engine(LocalG2Engine(OffloadConfig(num_g2_blocks=100_000)))
    assert mgr.has_offload_engine()


def test_g2_completion_publishes_host_pinned_stored_event() -> None:
    mgr = KvManager(1, 4)
    attach_test_offload_engine(mgr, 1)
    assert use_full_with_hash(mgr, 1, plh(1), 101, [1, 2, 3, 4]) == 1
    deref_full(mgr, 1)
    mgr.take_events()
    assert use_full_with_hash(mgr, 2, plh(2), 202, [5, 6, 7, 8]) == 0
    immediate = mgr.take_events()
    assert has_removed(immediate, DEVICE, 1), "G1 eviction publishes a Device Removed"
    assert stored_block(immediate, HOST, 1) is None, "no host Stored before the copy completes"
    deadline = mgr.earliest_offload_deadline()
    assert deadline is not None
    assert deadline == pytest.approx(1.0)
    mgr.tick_offload_engine(deadline)
    completed = mgr.take_events()
    found = stored_block(completed, HOST, 1)
    assert found is not None, "G2 completion publishes a HostPinned Stored"
    event, index = found
    assert event.tokens_hashes[index] == 101
    assert event.token_ids == [[1, 2, 3, 4]]


def test_g2_eviction_publishes_host_pinned_removed_event() -> None:
    mgr = KvManager(1, 4)
    attach_test_offload_engine(mgr, 1)
    assert use_full_with_hash(mgr, 1, plh(1), 101, [1, 2, 3, 4]) == 1
    deref_full(mgr, 1)
    assert use_full_with_hash(mgr, 2, plh(2), 202, [5, 6, 7, 8]) == 0
    deadline = mgr.earliest_offload_deadline()
    assert deadline is not None
    mgr.tick_offload_engine(deadline)
    assert use_full_with_hash(mgr, 2, plh(2), 202, [5, 6, 7, 8]) == 1
    deref_full(mgr, 2)
    mgr.take_events()
    assert use_full_with_hash(mgr, 3, plh(3), 303, [9, 10, 11, 12]) == 0
    deadline = mgr.earliest_offload_deadline()
    assert deadline is not None
    mgr.tick_offload_engine(deadline)
    events = mgr.take_events()
    assert has_removed(events, HOST, 1), "G2 capacity eviction publishes HostPinned Removed"
    assert stored_block(events, HOST, 2) is not None
    kinds = [
        (type(e).__name__, e.tier)
        for e in events
        if isinstance(e, BlockStored) or (isinstance(e, BlockRemoved) and e.tier is HOST)
    ]
    assert kinds == [("BlockRemoved", HOST), ("BlockStored", HOST)], "displaced block removed first"


def test_reoffloaded_swapped_in_block_keeps_token_ids_for_g2_raw_event() -> None:
    mgr = KvManager(1, 4)
    attach_test_offload_engine(mgr, 1)
    slots = mgr.reserve_swap_in_destination_slots(1)
    assert isinstance(slots, list)
    token_ids = [1, 2, 3, 4]
    assert (
        mgr.register_swapped_in_blocks([SwapInBlock(1, plh(1), 101, token_ids)], None, slots) == 1
    )
    mgr.take_events()
    assert use_full_with_hash(mgr, 2, plh(2), 202, [5, 6, 7, 8]) == 0
    deadline = mgr.earliest_offload_deadline()
    assert deadline is not None
    mgr.tick_offload_engine(deadline)
    found = stored_block(mgr.take_events(), HOST, 1)
    assert found is not None
    assert found[0].token_ids == [token_ids]


def test_g1_eviction_offload_holds_source_slot_until_complete() -> None:
    mgr = KvManager(1, 4)
    attach_test_offload_engine(mgr)
    assert use_full(mgr, 1, plh(1)) == 1
    deref_full(mgr, 1)
    assert mgr.num_active_blocks() == 0
    assert mgr.num_inactive_blocks() == 1
    assert use_full(mgr, 2, plh(2)) == 0
    assert mgr.num_active_blocks() == 1, "quarantined source slot counts against G1 capacity"
    mgr.check_invariants()
    deadline = mgr.earliest_offload_deadline()
    assert deadline is not None, "the offload exposes a stall-advance deadline"
    mgr.tick_offload_engine(deadline)
    assert mgr.num_active_blocks() == 0, "source slot released after completion"
    assert use_full(mgr, 2, plh(2)) == 1
    assert mgr.num_active_blocks() == 1
    mgr.check_invariants()


def test_try_batch_swap_in_returns_no_hits_without_engine() -> None:
    mgr = KvManager(8, 4)
    assert mgr.try_batch_swap_in([plh(1), plh(2), plh(3)], 0.0) is SWAP_IN_NO_HITS


# ── §16.12-14 and the swap-in round trip ─────────────────────────────────────────────────


def test_offload_then_swap_in_round_trip() -> None:
    """Evict two chained blocks to G2, swap them back in, and see them as inactive G1 hits."""
    mgr = KvManager(2, 4)
    engine = attach_test_offload_engine(mgr, 8)
    a, b = 0xA, 0xB
    pa, pb = make_plh(a, None, 0), make_plh(b, a, 1)
    assert mgr.process(Use([FullBlock(a), FullBlock(b)], [1, 2], [pa, pb], [[1] * 4, [2] * 4])) == 2
    mgr.process(Deref([FullBlock(b), FullBlock(a)]))
    # A two-block newcomer evicts both (one offload batch of 2 x 1 MB at 1 GB/s = 2 ms).
    assert (
        mgr.process(Use([FullBlock(0xC), FullBlock(0xD)], [], [plh(0xC), make_plh(0xD, 0xC, 1)]))
        == 0
    )
    assert mgr.earliest_offload_deadline() == pytest.approx(2.0)
    mgr.tick_offload_engine(2.0)
    assert engine.contains(pa)
    assert engine.contains(pb)
    events = mgr.take_events()
    host_stores = [
        (e.parent_hash, list(e.block_hashes))
        for e in events
        if isinstance(e, BlockStored) and e.tier is HOST
    ]
    assert host_stores == [(None, [a]), (a, [b])], "host Stored keep each block's original parent"

    outcome = mgr.try_batch_swap_in([pa, pb], 2.0)
    assert isinstance(outcome, SwapInScheduled)
    assert outcome.handle.deadline_ms == pytest.approx(4.0)
    assert engine.num_pinned == 2
    mgr.tick_offload_engine(3.0)
    assert engine.take_completed_onboards() == []
    mgr.tick_offload_engine(4.0)
    (done,) = engine.take_completed_onboards()
    assert done is outcome.handle
    assert done.completed
    assert engine.num_pinned == 0
    entries = [SwapInBlock(a, pa, 1, [1] * 4), SwapInBlock(b, pb, 2, [2] * 4)]
    assert mgr.register_swapped_in_blocks(entries, None, outcome.destination_slots) == 2
    (event,) = mgr.take_events()
    assert isinstance(event, BlockStored)
    assert event.tier is DEVICE
    assert list(event.block_hashes) == [a, b]
    assert mgr.num_inactive_blocks() == 2
    mgr.check_invariants()
    engine.check_invariants()


def test_full_g2_drops_instead_of_stalling() -> None:
    engine = LocalG2Engine(OffloadConfig(num_g2_blocks=1, block_size_bytes=0))
    meta = BlockMeta(1, None, 11, None)
    released = engine.enqueue_evictions(
        [OffloadItem(plh(1), meta), OffloadItem(plh(2), BlockMeta(2, None, 22, None))], [5, 6]
    )
    assert released == [6], "the second block has no G2 room: dropped, its slot freed at once"
    assert engine.num_dropped == 1
    assert engine.tick(0.0) == [5]
    assert engine.enqueue_evictions([OffloadItem(plh(1), meta)], [7]) == [7], (
        "already in G2: deduped"
    )
    engine.check_invariants()


def test_pinned_g2_block_is_not_evicted() -> None:
    engine = LocalG2Engine(OffloadConfig(num_g2_blocks=1, block_size_bytes=0))
    engine.enqueue_evictions([OffloadItem(plh(1), BlockMeta(1, None, 11, None))], [0])
    engine.tick(0.0)
    plan = engine.prepare_onboard([plh(1)])
    assert plan is not None
    assert plan.plhs == [plh(1)]
    # G2 is full and its only block is pinned: a new offload is dropped, never evicts it.
    assert engine.enqueue_evictions([OffloadItem(plh(2), BlockMeta(2, None, 22, None))], [1]) == [1]
    assert engine.contains(plh(1))
    engine.cancel_onboard(plan)
    engine.check_invariants()


# -- the host-tier announcement policy of one rank (issue 4 §4) ---------------------------------


def _meta(seq: int, parent: int | None) -> BlockMeta:
    return BlockMeta(seq, parent, seq + 1000, None)


def _announce(announcer: HostTierAnnouncer, *steps: tuple[str, int, int | None]) -> list[str]:
    """Feed ("S", seq, parent) / ("R", seq, None) steps; the events as "S<seq>" / "R<seq>"."""
    out: list[G2Event] = []
    for kind, seq, parent in steps:
        if kind == "S":
            announcer.stored(_meta(seq, parent), out)
        else:
            announcer.removed(seq, out)
    return [f"S{e.meta.seq_hash}" if isinstance(e, G2Stored) else f"R{e.seq_hash}" for e in out]


def test_a_root_is_announced_at_once_and_a_child_waits_for_its_parent() -> None:
    announcer = HostTierAnnouncer()
    assert _announce(announcer, ("S", 1, None)) == ["S1"]
    # 3's parent 2 was never stored here (it lives in another rank's G1): it waits.
    assert _announce(announcer, ("S", 3, 2), ("S", 4, 3)) == []
    assert (announcer.num_held, announcer.num_announced, announcer.num_waiting) == (3, 1, 2)
    # 2 arrives under 1: it and everything that waited below it, parent first.
    assert _announce(announcer, ("S", 2, 1)) == ["S2", "S3", "S4"]
    assert sorted(announcer.announced_seq_hashes()) == [1, 2, 3, 4]
    assert announcer.num_waiting == 0


def test_removal_withdraws_announced_descendants_first_and_they_come_back_with_it() -> None:
    announcer = HostTierAnnouncer()
    chain = [("S", 1, None), ("S", 2, 1), ("S", 3, 2), ("S", 5, 2), ("S", 4, 3)]
    assert _announce(announcer, *chain) == ["S1", "S2", "S3", "S5", "S4"]
    # 2 leaves the pool (its children were pinned): 4 before 3, both before 2; 5 before 2.
    removed = _announce(announcer, ("R", 2, None))
    assert sorted(removed) == ["R2", "R3", "R4", "R5"]
    assert removed[-1] == "R2"
    assert removed.index("R4") < removed.index("R3")
    assert sorted(announcer.announced_seq_hashes()) == [1]
    assert announcer.num_waiting == 3, "3, 4 and 5 are still held, waiting for 2"
    assert _announce(announcer, ("S", 2, 1)) == ["S2", "S3", "S4", "S5"]


def test_blocks_never_announced_leave_silently() -> None:
    announcer = HostTierAnnouncer()
    assert _announce(announcer, ("S", 7, 6), ("S", 8, 7), ("R", 7, None), ("R", 99, None)) == []
    assert announcer.num_held == 1
    # 8 still waits for 7, which may come back.
    assert _announce(announcer, ("S", 6, None), ("S", 7, 6)) == ["S6", "S7", "S8"]
    assert _announce(announcer, ("S", 7, 6)) == [], "a duplicate store announces nothing"


def test_a_self_parented_block_is_never_announced() -> None:
    announcer = HostTierAnnouncer()
    assert _announce(announcer, ("S", 1, None), ("S", 5, 5), ("R", 5, None)) == ["S1"]
    assert announcer.num_held == 1


def test_any_arrival_order_announces_the_same_set_parent_first() -> None:
    """The announced set depends only on what the pool holds; every announcement follows
    its parent's (the stream a restarted rank rebuilds from the snapshot)."""
    stores = [("S", 1, None), ("S", 2, 1), ("S", 3, 2), ("S", 4, 2), ("S", 6, 5), ("S", 7, 1)]
    for order in (stores, stores[::-1], stores[2:] + stores[:2]):
        announcer = HostTierAnnouncer()
        events = _announce(announcer, *order)
        assert sorted(events) == ["S1", "S2", "S3", "S4", "S7"]
        parents = {seq: parent for _, seq, parent in stores}
        for position, event in enumerate(events):
            parent = parents[int(event[1:])]
            assert parent is None or events.index(f"S{parent}") < position
