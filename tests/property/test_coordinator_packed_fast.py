"""The packed fast path of an OFFLOAD group (`Coordinator._land_packed`: one commit of a whole
group of plain packed chains, straight from their arrays) against the general path it
replaces (`Coordinator.packed_fast_path = False`: every OFFLOAD materialized into lists and
staged by `_stage_batch`).

Both coordinators get the same turns of packed OFFLOADs, mostly fresh chains (the fast path's
case), mixed with what must send a group down the general path: a block already stored or
repeated, a non-chain, a first block whose parent is in the group, a batch id used twice,
PLH twins (dropped at commit), pinned blocks in a small pool (a short reservation). They must
send the same messages in the same order and end with identical segments and counters.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import zmq
from hypothesis import given, settings, strategies as st

from shmkv import transport as tp
from shmkv.coordinator import Coordinator
from shmkv.g2 import G2RankView
from tests.property.test_coordinator_batches import BLOCK_SIZE, NUM_RANKS
from tests.property.test_coordinator_groups import (
    _coordinators,
    _deferred_group,
    _differing_arrays,
)


def _chain(rng: random.Random, stored: list[int], twins: list[list[int]], batch: int) -> tp.Message:
    """A packed OFFLOAD: usually a fresh chain, sometimes one of the general path's cases."""
    count = rng.randint(1, 12)
    parent = rng.choice([None, None, *stored[-3:]]) if stored else None
    first = rng.randint(0, 3) if parent is None else 4
    seqs = [rng.getrandbits(64) for _ in range(count)]
    parents: list[int | None] = [parent, *seqs[:-1]]
    positions = list(range(first, first + count))
    roll = rng.random()
    is_twin = False
    if roll < 0.05 and stored:
        index, reused = rng.randrange(count), rng.choice(stored)
        first_parent, first_position = _first_place(twins, reused)
        # stored already (or in flight); never at its first position under another parent,
        # which would be a Lineage conflict (a 2^-59 event with real hashes)
        if positions[index] != first_position or parents[index] == first_parent:
            seqs[index] = reused
    elif roll < 0.1 and count > 2:
        positions[-1] += 1  # not a chain
    elif roll < 0.15 and count > 2:
        parents[0] = seqs[-1]  # the first block's parent later in the batch
    elif roll < 0.2 and count > 1:
        seqs[-1] = seqs[0]  # a block twice
    elif roll < 0.25 and twins:
        seq, twin_parent, position = rng.choice(twins)
        seqs, positions = [seq ^ (1 << 62)], [position]  # same PLH as a stored block
        parents = [None if twin_parent < 0 else twin_parent]
        is_twin = True
    if not is_twin:  # a twin is never sent again elsewhere: see above
        # `twins` keeps each hash's first (parent, position): a twin copies that
        known = set(stored)
        for seq, par, pos in zip(seqs, parents, positions, strict=True):
            if seq not in known:
                known.add(seq)
                twins.append([seq, -1 if par is None else par, pos])
        stored.extend(seqs)
    frame = tp.pack_offload_items(seqs, parents, [s ^ 0x33 for s in seqs], positions)
    tokens = bytes(rng.randrange(256) for _ in range(4 * BLOCK_SIZE * len(seqs)))
    body = {"batch": batch, "num_items": len(seqs), "packed": True}
    return tp.Message(tp.OFFLOAD, body, (frame, tokens))


def _first_place(twins: list[list[int]], seq: int) -> tuple[int | None, int]:
    """(parent, position) `seq` was first sent with."""
    for first_seq, parent, position in twins:
        if first_seq == seq:
            return (None if parent < 0 else parent), position
    raise AssertionError(f"{seq:#x} was never sent")


def _count_fast_landings(coordinator: Coordinator) -> list[int]:
    """Spy on `coordinator`'s packed fast path: the returned list gets each landed group's
    size."""
    landed: list[int] = []
    land_packed = coordinator._land_packed

    def spy(group: Any, packed: Any, slot_arr: Any, owners: Any) -> None:
        landed.append(len(group))
        land_packed(group, packed, slot_arr, owners)

    coordinator._land_packed = spy  # type: ignore[method-assign]
    return landed


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_the_packed_fast_path_matches_the_general_path(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice([16, 40, 4096])
    with _coordinators(capacity, capacity) as [(fast, f_sent), (general, g_sent)]:
        general.packed_fast_path = False
        views = [G2RankView(c.directory.segment, 1) for c in (fast, general)]
        try:
            stored: list[int] = []
            twins: list[list[int]] = []
            held: list[Any] = []
            for turn in range(rng.randint(1, 8)):
                if stored and rng.random() < 0.3:
                    keys = rng.sample(stored, min(4, len(stored)))
                    runs = [view.pin_prefix(keys, vectorized=False) for view in views]
                    assert (runs[0] is None) == (runs[1] is None)
                    if runs[0] is not None:
                        held.append(runs)
                msgs = []
                for k in range(rng.randint(1, 6)):
                    batch = 100 * turn + (k if rng.random() < 0.95 else 0)
                    msgs.append((rng.randrange(NUM_RANKS), _chain(rng, stored, twins, batch)))
                for coord in (fast, general):
                    coord.batch_min_blocks = rng.choice([1, 1, 8])
                assert _deferred_group(fast, msgs) == _deferred_group(general, msgs) == 0
                assert f_sent.sent == g_sent.sent
                assert _differing_arrays(fast, general) == []
                assert fast.stats_dict(include_pins=True) == general.stats_dict(include_pins=True)
                assert fast.directory.ready_seqs == general.directory.ready_seqs
                if held and rng.random() < 0.5:
                    for view, run in zip(views, held.pop(0), strict=True):
                        view.unpin(run)
            fast.directory.check_invariants()
            general.directory.check_invariants()
        finally:
            for view in views:
                view.close()


def test_a_group_of_fresh_chains_takes_the_packed_fast_path() -> None:
    """The usual turn (fresh chains from every rank) is what the fast path is for."""
    rng = random.Random(7)
    with _coordinators(4096, 4096) as [(fast, f_sent), (general, g_sent)]:
        general.packed_fast_path = False
        calls = _count_fast_landings(fast)
        stored: list[int] = []
        msgs = []
        for k in range(8):
            seqs = [rng.getrandbits(64) for _ in range(5)]
            parents: list[int | None] = [None, *seqs[:-1]]
            frame = tp.pack_offload_items(seqs, parents, seqs, list(range(5)))
            body = {"batch": k, "num_items": 5, "packed": True}
            tokens = bytes(4 * BLOCK_SIZE * 5)
            msgs.append((k % NUM_RANKS, tp.Message(tp.OFFLOAD, body, (frame, tokens))))
            stored.extend(seqs)
        for coord in (fast, general):
            coord.batch_min_blocks = 1
            assert _deferred_group(coord, msgs) == 0
        assert calls == [8]
        assert f_sent.sent == g_sent.sent
        assert fast.directory.ready_seqs == set(stored)
        assert _differing_arrays(fast, general) == []


def test_serve_router_claims_a_deferred_packed_groups_blocks_before_screening_more() -> None:
    """`serve_router` records the blocks of a deferred packed screening lazily (`_Claims`);
    an OFFLOAD screened after it in the same group must still find them claimed."""
    with _coordinators(4096) as [(coord, recorder)]:
        router, ctx = coord._router, coord._ctx
        assert router is not None
        assert ctx is not None
        router.bind(f"inproc://claims-{id(coord)}")  # NOTE: inproc: queued when sent
        dealer = ctx.socket(zmq.DEALER)
        try:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.IDENTITY, b"r0")
            dealer.connect(f"inproc://claims-{id(coord)}")
            seqs = [11, 12, 13]
            frame = tp.pack_offload_items(seqs, [None, 11, 12], seqs, [0, 1, 2])
            body = {"batch": 1, "num_items": 3, "packed": True}
            dealer.send_multipart(tp.encode(tp.OFFLOAD, body, (frame, bytes(4 * BLOCK_SIZE * 3))))
            items = [[12, 11, 12, 1], [99, -1, 99, 0]]  # 12: claimed by batch 1
            json_body = {"batch": 2, "items": items, "has_tokens": False}
            dealer.send_multipart(tp.encode(tp.OFFLOAD, json_body))
            assert coord.serve_router(32) == 2
            coord.flush()
        finally:
            dealer.close(linger=0)
        acks = {}
        for rank, frames in recorder.sent:
            head = orjson.loads(frames[0])
            if head["t"] == tp.OFFLOAD_ACK:
                assert rank == 0
                acks[head["batch"]] = (head["accepted"], head["rejected"])
        assert acks == {1: ([0, 1, 2], []), 2: ([1], [0])}
        assert coord.directory.ready_seqs == {11, 12, 13, 99}
