"""The coordinator's compiled index probing (`shmkv.g2_lineage.index_insert_run`,
`index_remove_all`) against a plain reference of the per-key linear probing it replaces, and
the directory's private copy of the index against the shared table.

The reference is the per-key `G2Directory._index_insert` / `_index_remove` as documented in
`shmkv.g2` (first tombstone before the first empty cell, else that empty cell; a removal
leaves a tombstone, or empties its cell and the tombstones just before it when the next cell
is empty), written out here independently of the code under test.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings, strategies as st

from shmkv import shm
from shmkv.errors import InvariantError
from shmkv.g2 import G2Directory
from shmkv.g2_lineage import (
    INDEX_EMPTY,
    INDEX_TOMBSTONE,
    G2Lineage,
    index_cells_at,
    index_insert_run,
    index_remove_all,
)
from shmkv.shm import G2Segment

EMPTY, TOMB = -1, -2


def _ref_insert(cells: list[int], home: int, slot: int) -> bool:
    """Per-key insert; True if it filled an empty cell."""
    size = len(cells)
    pos, tombstone = home, -1
    while cells[pos] != EMPTY:
        if cells[pos] == TOMB and tombstone < 0:
            tombstone = pos
        pos = (pos + 1) % size
    if tombstone >= 0:
        cells[tombstone] = slot
        return False
    cells[pos] = slot
    return True


def _ref_remove(cells: list[int], home: int, slot: int) -> None:
    size = len(cells)
    pos = home
    while cells[pos] != slot:
        assert cells[pos] != EMPTY
        pos = (pos + 1) % size
    if cells[(pos + 1) % size] != EMPTY:
        cells[pos] = TOMB
        return
    cells[pos] = EMPTY
    pos = (pos - 1) % size
    while cells[pos] == TOMB:
        cells[pos] = EMPTY
        pos = (pos - 1) % size


def test_the_cell_markers_are_the_segment_s() -> None:
    assert (INDEX_EMPTY, INDEX_TOMBSTONE) == (shm.INDEX_EMPTY, shm.INDEX_TOMBSTONE) == (EMPTY, TOMB)


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(4, 24),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 10**6)), min_size=1, max_size=60),
    room=st.integers(0, 30),
)
def test_inserts_and_removals_match_the_per_key_reference(
    size: int, ops: list[tuple[bool, int]], room: int
) -> None:
    """Random batches of inserts (with a rebuild point `room`) and removals leave exactly the
    reference's cells; the counts they return match; `touched` lists every changed cell."""
    cells = [EMPTY] * size
    ref = [EMPTY] * size
    live: list[tuple[int, int]] = []  # (home, slot) currently indexed
    next_slot = 0
    for is_insert, seed in ops:
        if is_insert or not live:
            batch: list[tuple[int, int]] = []
            for k in range(1 + seed % 5):
                if cells.count(EMPTY) - len(batch) <= 1:  # keep an empty cell
                    break
                batch.append(((seed >> (3 * k)) % size, next_slot))
                next_slot += 1
            if not batch:
                continue
            homes = [home for home, _ in batch]
            slots = [slot for _, slot in batch]
            before = list(cells)
            touched: list[int] = []
            done, filled = index_insert_run(cells, homes, slots, 0, room % 3, touched)
            ref_filled = 0
            for k in range(done):
                ref_filled += _ref_insert(ref, homes[k], slots[k])
            assert cells == ref
            assert filled == ref_filled
            # it stops right after the insert that fills room + 1 empty cells, else at the end
            assert done == len(batch) or filled == room % 3 + 1
            assert sorted(touched) == sorted(i for i in range(size) if cells[i] != before[i])
            assert index_cells_at(cells, touched) == slots[:done]
            live += batch[:done]
        else:
            take = live[: 1 + seed % len(live)]
            del live[: len(take)]
            before = list(cells)
            tombstones_before = cells.count(TOMB)
            used_before = size - cells.count(EMPTY)
            touched = []
            homes = [home for home, _ in take]
            slots = [slot for _, slot in take]
            net, emptied = index_remove_all(cells, homes, slots, slots, touched)
            for home, slot in take:
                _ref_remove(ref, home, slot)
            assert cells == ref
            assert net == cells.count(TOMB) - tombstones_before
            assert emptied == used_before - (size - cells.count(EMPTY))
            assert set(touched) >= {i for i in range(size) if cells[i] != before[i]}


def test_a_missing_slot_raises_after_removing_the_ones_before_it() -> None:
    cells = [EMPTY] * 8
    touched: list[int] = []
    index_insert_run(cells, [1, 1], [10, 11], 0, 8, touched)
    touched = []
    with pytest.raises(InvariantError, match="missing from the index"):
        index_remove_all(cells, [1, 1], [10, 99], [5, 6], touched)
    assert cells == [EMPTY, TOMB, 11, EMPTY, EMPTY, EMPTY, EMPTY, EMPTY]
    assert touched == [1]


@pytest.mark.parametrize("batched", [True, False])
def test_the_private_copy_follows_the_shared_table(batched: bool) -> None:
    """Commits, evictions, removals and rebuilds keep the directory's private copy
    of the index equal to the shared table (`check_invariants` compares them)."""
    segment = G2Segment.create(
        f"hix{uuid.uuid4().hex[:10]}", capacity=16, block_size=2, num_ranks=1
    )
    directory = G2Directory(segment, G2Lineage())
    try:
        seq = 1000
        for round_ in range(40):
            count = 1 + round_ % 7
            slots = directory.reserve(count, 0, vectorized=batched)
            # home cells crowd into a few cells: long clusters, tombstones, rebuilds
            seqs = [segment.index_size * (seq + k) + (seq + k) % 4 for k in range(len(slots))]
            seq += count
            if batched:
                directory.commit_many(
                    slots, seqs, [None] * len(slots), seqs, [0] * len(slots), None, 0
                )
            else:
                for slot, s in zip(slots, seqs, strict=True):
                    directory.commit(slot, s, None, s, 0, None, 0)
            if round_ % 5 == 4:
                assert directory.try_remove(seqs[0])
            if round_ % 13 == 12:
                directory._rebuild_index()
            directory.check_invariants()
            assert segment.index_slot.tolist() == directory._index_cells
        assert directory.stats().num_evictions > 0
        assert directory.stats().num_index_rebuilds > 0
    finally:
        segment.unlink()
        directory.close()
        segment.close()
