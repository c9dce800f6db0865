"""The coordinator's index probing (`shmkv.g2._index_insert_py`, `_index_remove_py`,
`_index_find_py`, `_index_find_any_py` and their C twins in `shmkv._g2index`, when built)
against a plain reference of the per-key linear probing, C against Python bit for bit, and
the directory's counters and READY view against the shared table.

The reference is the per-key `G2Directory._index_insert_one` / `_index_remove_one` as
documented in `shmkv.g2` (first tombstone before the first empty cell, else that empty cell;
a removal leaves a tombstone, or empties its cell and the tombstones just before it when the
next cell is empty), written out here independently of the code under test.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shmkv import g2, shm
from shmkv.errors import InvariantError
from shmkv.g2 import G2Directory
from shmkv.g2_lineage import G2Lineage
from shmkv.shm import G2Segment
from tests.g2index_module import g2index_module

EMPTY, TOMB = -1, -2


_C = g2index_module()
IMPLS: list[tuple[str, Any, Any]] = [("python", g2._index_insert_py, g2._index_remove_py)]
if _C is not None:
    IMPLS.append(("c", _C.index_insert, _C.index_remove))


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
    assert (shm.INDEX_EMPTY, shm.INDEX_TOMBSTONE) == (EMPTY, TOMB)


def _keys(homes: list[int], size: int, seed: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """u64 keys with the given home cells (`key % size == home`), big ones included."""
    rng = np.random.default_rng(seed)
    high = rng.integers(0, (1 << 64) // size, size=len(homes), dtype=np.uint64)
    return high * np.uint64(size) + np.array(homes, dtype=np.uint64)


@pytest.mark.parametrize(("name", "insert", "remove"), IMPLS)
@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(4, 24),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 10**6)), min_size=1, max_size=60),
    room=st.integers(0, 30),
)
def test_inserts_and_removals_match_the_per_key_reference(
    name: str, insert: Any, remove: Any, size: int, ops: list[tuple[bool, int]], room: int
) -> None:
    """Random batches of inserts (with a rebuild point `room`) and removals leave exactly the
    reference's cells in the table; the counts they return match."""
    table = np.full(size, EMPTY, dtype=np.int32)
    ref = [EMPTY] * size
    live: list[tuple[int, int, int]] = []  # (home, slot, key) currently indexed
    next_slot = 0
    for is_insert, seed in ops:
        cells = table.tolist()
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
            keys = _keys(homes, size, seed)
            slots = np.array([slot for _, slot in batch], dtype=np.int64)
            done, filled = insert(table, keys, slots, 0, room % 3)
            ref_filled = 0
            for k in range(done):
                ref_filled += _ref_insert(ref, homes[k], int(slots[k]))
            assert table.tolist() == ref
            assert filled == ref_filled
            # it stops right after the insert that fills room + 1 empty cells, else at the end
            assert done == len(batch) or filled == room % 3 + 1
            live += [(h, int(sl), int(key)) for h, sl, key in zip(homes, slots, keys, strict=True)][
                :done
            ]
        else:
            take = live[: 1 + seed % len(live)]
            del live[: len(take)]
            tombstones_before = cells.count(TOMB)
            used_before = size - cells.count(EMPTY)
            keys = np.array([key for _, _, key in take], dtype=np.uint64)
            slots = np.array([slot for _, slot, _ in take], dtype=np.int64)
            done, net, emptied = remove(table, keys, slots)
            for home, slot, _key in take:
                _ref_remove(ref, home, slot)
            after = table.tolist()
            assert done == len(take)
            assert after == ref
            assert net == after.count(TOMB) - tombstones_before
            assert emptied == used_before - (size - after.count(EMPTY))


@pytest.mark.parametrize(("name", "insert", "remove"), IMPLS)
def test_a_missing_slot_stops_after_removing_the_ones_before_it(
    name: str, insert: Any, remove: Any
) -> None:
    table = np.full(8, EMPTY, dtype=np.int32)
    assert insert(table, np.array([9, 17], dtype=np.uint64), np.array([10, 11]), 0, 8) == (2, 2)
    keys = np.array([9, 17], dtype=np.uint64)
    assert remove(table, keys, np.array([10, 99])) == (1, 1, 0)
    assert table.tolist() == [EMPTY, TOMB, 11, EMPTY, EMPTY, EMPTY, EMPTY, EMPTY]
    assert remove(table, keys[:1], np.array([-1])) == (0, 0, 0)


@pytest.mark.skipif(_C is None, reason="shmkv._g2index is not built (scripts/build_core.py)")
@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 40),
    cells=st.lists(st.integers(-2, 50), max_size=40),
    hashes=st.lists(st.integers(0, (1 << 64) - 1), min_size=1, max_size=51),
    keys=st.lists(st.integers(0, (1 << 64) - 1), max_size=12),
    start=st.integers(0, 3),
    room=st.integers(-1, 5),
)
def test_the_c_functions_are_their_python_twins_bit_for_bit(
    size: int,
    cells: list[int],
    hashes: list[int],
    keys: list[int],
    start: int,
    room: int,
) -> None:
    """Same results, same table (or the same error type) for any input, odd ones included:
    slots missing or out of range, tables without an empty cell, keys that alias hashes."""
    assert _C is not None
    base = np.array((cells + [EMPTY] * size)[:size], dtype=np.int32)
    seq_hash = np.array(hashes, dtype=np.uint64)
    # keys that hit: some hashes of the table's slots
    key_arr = np.array(keys + hashes[: len(keys) // 2], dtype=np.uint64)
    slots = np.array([(k * 7) % 60 - 3 for k in range(key_arr.size)], dtype=np.int64)
    pairs: list[tuple[Any, Any, tuple[Any, ...] | None]] = [
        (_C.index_insert, g2._index_insert_py, (key_arr, slots, min(start, key_arr.size), room)),
        (_C.index_remove, g2._index_remove_py, (key_arr, slots)),
        (_C.index_find_any, g2._index_find_any_py, None),
    ]
    for c_fn, py_fn, args in pairs:
        outcomes = []
        for fn in (c_fn, py_fn):
            table = base.copy()
            call = (table, seq_hash, key_arr) if args is None else (table, *args)
            try:
                outcomes.append((fn(*call), table.tolist()))
            except (ValueError, OverflowError) as exc:
                outcomes.append((type(exc), table.tolist()))
        assert outcomes[0] == outcomes[1]
    for key in keys:
        assert _C.index_find(base, seq_hash, key) == g2._index_find_py(base, seq_hash, key)


@pytest.mark.skipif(_C is None, reason="shmkv._g2index is not built (scripts/build_core.py)")
def test_the_c_functions_refuse_arrays_of_the_wrong_type() -> None:
    assert _C is not None
    table = np.full(4, EMPTY, dtype=np.int32)
    keys = np.array([1], dtype=np.uint64)
    with pytest.raises(TypeError):
        _C.index_insert(table.astype(np.int64), keys, np.array([1]), 0, 1)
    with pytest.raises(TypeError):
        _C.index_remove(table, keys.astype(np.int64), np.array([1]))
    with pytest.raises((TypeError, BufferError, ValueError)):
        _C.index_find_any(table, np.zeros(8, dtype=np.uint64)[::2], keys)
    assert table.tolist() == [EMPTY] * 4


@pytest.mark.parametrize("batched", [True, False])
def test_the_directory_keeps_its_index_counters_and_ready_view(batched: bool) -> None:
    """Commits, evictions, removals and rebuilds keep the directory's counters equal to the
    shared table (`check_invariants` compares them) and its READY view equal to the READY
    slots' hashes."""
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
                assert seqs[0] not in directory.ready_seqs
            if round_ % 13 == 12:
                directory._rebuild_index()
            directory.check_invariants()
            ready = segment.state == shm.READY
            expected = set(segment.seq_hash[ready].tolist())
            assert directory.ready_seqs == expected
            assert set(directory.ready_seqs) == expected
            assert len(directory.ready_seqs) == len(expected)
            assert all(h in directory.ready_seqs for h in expected)
            assert directory.any_ready(np.array(sorted(expected), dtype=np.uint64))
            assert not directory.ready_seqs.isdisjoint(np.array(sorted(expected), dtype=np.uint64))
            assert directory.ready_seqs.isdisjoint([seq + 10**9, -1, "x"])
            assert not directory.any_ready(np.array([seq + 10**9], dtype=np.uint64))
        assert directory.stats().num_evictions > 0
        assert directory.stats().num_index_rebuilds > 0
    finally:
        segment.unlink()
        directory.close()
        segment.close()


def test_a_missing_index_entry_raises_after_counting_the_ones_before_it() -> None:
    segment = G2Segment.create(f"hix{uuid.uuid4().hex[:10]}", capacity=8, block_size=2, num_ranks=1)
    directory = G2Directory(segment, G2Lineage())
    try:
        slots = directory.reserve(2, 0)
        directory.commit_many(slots, [5, 6], [None, None], [5, 6], [0, 0], None, 0)
        with pytest.raises(InvariantError, match="missing from the index"):
            directory._index_remove_arrays(
                np.array([5, 7], dtype=np.uint64), np.array([slots[0], 3], dtype=np.int64)
            )
        assert 5 not in directory.ready_seqs
        assert 6 in directory.ready_seqs
        assert len(directory.ready_seqs) == 1
    finally:
        segment.unlink()
        directory.close()
        segment.close()


@settings(max_examples=200, deadline=None)
@given(
    blocks=st.lists(
        st.tuples(
            st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1), st.integers(0, 254)
        ),
        max_size=40,
    )
)
def test_plhs_of_columns_is_make_plh_in_c_and_python(blocks: list[tuple[int, int, int]]) -> None:
    """The PLHs of strided columns (as the coordinator's packed items give them): the C
    function (when built), its numpy twin and the per-block `plhs_of` agree bit for bit."""
    words = np.zeros((len(blocks), 4), dtype=np.uint64)
    for row, (seq, parent, _position) in enumerate(blocks):
        words[row, 0], words[row, 1] = seq, parent
    positions = np.array([position for _, _, position in blocks], dtype=np.int64)
    seqs, parents = words[:, 0], words[:, 1]
    expected = g2.plhs_of(
        [b[0] for b in blocks], [b[1] if b[1] else None for b in blocks], positions.tolist()
    )
    assert g2.plhs_of_columns(seqs, parents, positions) == expected
    if blocks:
        assert g2._plhs_of_columns_py(seqs, parents, positions) == expected
    if _C is not None:
        got = _C.plhs_mode0(seqs, parents, positions)
        assert got == expected
        assert all(type(plh) is int for plh in got)


@pytest.mark.skipif(_C is None, reason="shmkv._g2index is not built (scripts/build_core.py)")
def test_plhs_mode0_refuses_other_modes_and_types() -> None:
    assert _C is not None
    seqs = np.array([1, 2], dtype=np.uint64)
    with pytest.raises(ValueError, match="position 255"):
        _C.plhs_mode0(seqs, seqs, np.array([0, 255], dtype=np.int64))
    with pytest.raises(ValueError, match="position -1"):
        _C.plhs_mode0(seqs, seqs, np.array([-1, 0], dtype=np.int64))
    with pytest.raises(ValueError, match="different lengths"):
        _C.plhs_mode0(seqs, seqs[:1], np.array([0, 1], dtype=np.int64))
    with pytest.raises(TypeError):
        _C.plhs_mode0(seqs, seqs, np.array([0, 1], dtype=np.int32))
