"""Layer 2: the shared G2 pool: lock-free rank reads and pins, and the coordinator's directory.

Two views of one `shmkv.shm.G2Segment`:

* `G2RankView` (rank r): finds the longest READY prefix of a list of sequence hashes through the
  shared index, pins it in its own row `pins[r]`, reads the pinned blocks, unpins. No lock, no
  RPC; it writes nothing but `pins[r, :]` (and, by convention, `rank_next_seq[r]`).
* `G2Directory` (coordinator): the single writer of everything else: reserve, commit, abort,
  evict (fenced), index maintenance, dead-rank cleanup, invariant checks.

Slot life cycle (gen is bumped on every return to FREE, so (slot, gen) names one content)::

    FREE --reserve--> RESERVED --commit--> READY --evict (no pins)--> FREE, gen+1
      ^                  |                   |  ^
      +-----abort--------+ (gen+1)           v  | pins seen: back off
                                          EVICTING

Pin protocol (Dekker handshake, shm.md §0.4)::

    rank r                                   coordinator
    g = gen[s]; state[s]==READY,              state[s] = EVICTING
      seq_hash[s]==h                          full_fence()
    pins[r, s] += 1                           if pins[:, s].any(): state[s] = READY (back off)
    full_fence()                              else: unindex; gen[s] += 1; state[s] = FREE
    state[s]==READY and gen[s]==g ? keep : pins[r, s] -= 1

Both sides store, fence, then load the other side's cell, so at least one of them sees the
other: either the coordinator sees the pin and backs off, or the rank sees EVICTING (or a later
state whose gen differs, because gen is stored before state and loaded after it) and undoes.
On x86 (TSO) loads keep their order and stores keep theirs; the fence orders a store before a
later load, which is the one reordering TSO allows.

Shared index: `index_slot[T]`, T = 2*S, open addressing with linear probing, home = hash mod T,
-1 empty, -2 tombstone. Only the coordinator writes it. Readers probe until a cell whose slot
holds their hash (`seq_hash[slot] == h`) or an empty cell; whatever they find is validated by
state, hash and gen, so a concurrent insert, delete or rebuild can cost a miss, never a wrong
block. Deleting turns a cell into a tombstone, or into empty (together with the tombstones
before it) when the next cell is empty; when empty cells fall below a quarter of T the
coordinator rebuilds the table (vectorized) and copies it in.

Batched paths (same outcome as their per-block references, compared by
tests/property/test_g2_vector_paths.py): `G2RankView.pin_prefixes` / `unpin_many` run the pin
protocol over arrays (gather gen, then state and hash; `np.add.at` on the rank's row; one
fence; gather state, then gen; undo with `np.subtract.at`); `G2Directory.reserve` (and
`reserve_many`, one slot per entry for the rank it names) evicts in rounds (the policy's
`evict_many`, EVICTING stores for all victims, one fence, one pin-row check), `commit_many`
(blocks of one rank or of several) inserts into the policy with one `insert_many`, writes all
fields, then READY, then the index; index inserts and removals of a batch are one call each
(`_index_insert` / `_index_remove`: C in `shmkv._g2index` while the core runs compiled, else
their Python twins), writing the shared table in place, and leave exactly the cells the
per-key operations leave.

The directory keeps no private copy of the table and no set of READY hashes: `ready_seqs` is
a view that probes the index (`_index_find`), and `any_ready` screens an array of hashes in
one call (`_index_find_any`), which is what the coordinator's dedup needs.

Eviction policy keys are PLHs (`shmkv.hashing.make_plh(seq_hash, parent, position)`), so the
project's Lineage backend can be plugged in unchanged; the directory keeps `plh -> slot`, except
with `shmkv.g2_lineage.G2Lineage` (the coordinator's policy), whose nodes keep their block's slot:
evictions give the slots back (`evict_slots`) and a screened batch of chains finds its PLH
duplicates while it is inserted, with no map to update (tests/property/test_g2_lineage_slots.py
compares the two). Two blocks with one PLH are duplicates (the second commit is rejected, as G2
rejects duplicates).
"""

from __future__ import annotations

import struct
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence, Set as AbstractSet
from dataclasses import dataclass
from itertools import chain, repeat
from operator import itemgetter
from types import TracebackType
from typing import Any, Final, Protocol, Self

import numpy as np
import numpy.typing as npt

from shmkv.errors import ClosedError, ConfigError, InvariantError
from shmkv.g2_lineage import G2Lineage
from shmkv.hashing import MAX_POSITION, make_plh
from shmkv.ids import U64_MASK, BlockId, DpRank, LocalHash, Plh, SeqHash
from shmkv.shm import (
    EVICTING,
    FLAG_HAS_PARENT,
    FREE,
    INDEX_EMPTY,
    INDEX_TOMBSTONE,
    NO_OWNER,
    PIN_MAX,
    READY,
    RESERVED,
    STATE_NAMES,
    G2Segment,
)

VECTOR_MIN_BLOCKS: Final = 96
"""`pin_prefix` takes the numpy path from this run length on (measured crossover ~64-128)."""

_READY_I8: Final = np.int8(READY)
_EVICTING_I8: Final = np.int8(EVICTING)
# Mode-0 PLH packing, mirrored from `shmkv.hashing.make_plh` (tests pin it against make_plh).
_FAST_PLH_END: Final = 255
_M0_FRAG_BITS: Final = 59
_M0_FRAG_MASK: Final = (1 << _M0_FRAG_BITS) - 1
_M0_POSITION_SHIFT: Final = 2 * _M0_FRAG_BITS
_M0_FRAG_MASK_U64: Final = np.uint64(_M0_FRAG_MASK)
_M0_FRAG_BITS_U64: Final = np.uint64(_M0_FRAG_BITS)
_MIN_FRAG_BITS: Final = 51
"""The narrowest current fragment of any PLH mode (`shmkv.hashing`; a test pins it)."""
_MIN_FRAG_MASK_U64: Final = np.uint64((1 << _MIN_FRAG_BITS) - 1)
_M0_HI_POSITION_SHIFT_U64: Final = np.uint64(_M0_POSITION_SHIFT - 64)
_M0_HI_PARENT_SHIFT_U64: Final = np.uint64(64 - _M0_FRAG_BITS)
_WINDOW: Final = 8
"""Index cells the numpy path gathers per key (home and the next 7); the rest probe on."""
_MAX_VECTOR_ROWS: Final = 1024
_SCALAR_UNPIN_MAX: Final = 24
"""`unpin_many` releases fewer pins than this one by one (cheaper than numpy's call cost)."""
_REBUILD_EMPTY_FRACTION: Final = 4
assert FLAG_HAS_PARENT == 1  # NOTE: `_publish` stores `has_parent` as the flags byte
"""Rebuild the index when fewer than T / 4 cells are empty."""

_FENCE_LOCK = threading.Lock()


def full_fence() -> None:
    """A full memory barrier: an uncontended `threading.Lock` acquire + release.

    The acquire is an atomic read-modify-write (a locked instruction on x86, a full barrier),
    which is what vLLM's `memory_fence()` relies on. On weakly ordered CPUs (ARM) an
    acquire/release pair is not guaranteed to order an earlier plain store before a later plain
    load; a sequentially consistent fence (e.g. `atomicshm.fence`, shm.md Part B c) is the
    safe replacement there. Kept behind this one function so it can be swapped in one place.
    """
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


# -- the coordinator's index probing: C (shmkv/_g2index.c) while the core runs compiled ---------
#
# Each function below is the Python twin of the C function of the same name without `_py`
# (tests/property/test_g2_index_probing.py pins them bit for bit). Arguments: the shared
# table (int32, written in place), keys / seq_hash (u64) and slots (int64), as C-contiguous
# arrays (numpy arrays or `array.array`s).


def _index_insert_py(table: Any, keys: Any, slots: Any, start: int, room: int) -> tuple[int, int]:
    """Insert `slots[k]` under `keys[k]` (home cell `keys[k] % len(table)`) for k = start,
    ... in order: each goes to the first tombstone before the first empty cell of its linear
    probe path, else to that empty cell. Stops after the insert that fills the `room + 1`-th
    empty cell (the caller's rebuild point), or at the end.

    Returns (inserts done, empty cells filled); the rest filled tombstones.
    """
    cells: memoryview[int] = memoryview(table)
    key_mv: memoryview[int] = memoryview(keys)
    slot_mv: memoryview[int] = memoryview(slots)
    size, count = len(cells), len(key_mv)
    if len(slot_mv) != count:
        raise ValueError("index_insert: keys and slots differ in length")
    if size <= 0 or not 0 <= start <= count:
        raise ValueError("index_insert: empty table or start out of range")
    k = start
    filled = 0
    while k < count:
        slot = slot_mv[k]
        if not 0 <= slot <= 0x7FFFFFFF:
            raise ValueError(f"index_insert: slot {slot} out of range")
        pos = key_mv[k] % size
        tombstone = -1
        left = size
        while True:
            cell = cells[pos]
            if cell == INDEX_EMPTY:
                break
            if cell == INDEX_TOMBSTONE and tombstone < 0:
                tombstone = pos
            pos += 1
            if pos == size:
                pos = 0
            left -= 1
            if not left:
                raise ValueError("index_insert: the table has no empty cell")
        if tombstone >= 0:
            pos = tombstone
        else:
            filled += 1
        cells[pos] = slot
        k += 1
        if filled > room:
            break
    return k - start, filled


def _index_remove_py(table: Any, keys: Any, slots: Any) -> tuple[int, int, int]:
    """Unindex `slots[k]` (under `keys[k]`) for every k in order: its cell becomes a
    tombstone, or, when the next cell is empty, empty together with the tombstones just before
    it. Stops at the first slot missing from its probe path.

    Returns (removals done: `len(slots)` unless one is missing, the change in the number of
    tombstones, the number of cells turned empty).
    """
    cells: memoryview[int] = memoryview(table)
    key_mv: memoryview[int] = memoryview(keys)
    slot_mv: memoryview[int] = memoryview(slots)
    size, count = len(cells), len(key_mv)
    if len(slot_mv) != count:
        raise ValueError("index_remove: keys and slots differ in length")
    if size <= 0:
        raise ValueError("index_remove: empty table")
    net_tombstones = 0
    emptied = 0
    k = 0
    while k < count:
        slot = slot_mv[k]
        if slot < 0:
            break
        pos = key_mv[k] % size
        found = False
        for _ in range(size):
            cell = cells[pos]
            if cell == slot:
                found = True
                break
            if cell == INDEX_EMPTY:
                break
            pos += 1
            if pos == size:
                pos = 0
        if not found:
            break
        k += 1
        if cells[pos + 1 if pos + 1 < size else 0] != INDEX_EMPTY:
            cells[pos] = INDEX_TOMBSTONE
            net_tombstones += 1
            continue
        cells[pos] = INDEX_EMPTY
        emptied += 1
        pos = pos - 1 if pos else size - 1
        while cells[pos] == INDEX_TOMBSTONE:
            cells[pos] = INDEX_EMPTY
            emptied += 1
            net_tombstones -= 1
            pos = pos - 1 if pos else size - 1
    return k, net_tombstones, emptied


def _find_py(cells: memoryview[int], seq_hash: memoryview[int], key: int) -> int:
    size = len(cells)
    capacity = len(seq_hash)
    pos = key % size
    for _ in range(size):
        cell = cells[pos]
        if cell == INDEX_EMPTY:
            return -1
        if 0 <= cell < capacity and seq_hash[cell] == key:
            return cell
        pos += 1
        if pos == size:
            pos = 0
    return -1


def _index_find_py(table: Any, seq_hash: Any, key: int) -> int:
    """The slot of the first cell of `key`'s probe path (before an empty cell) whose slot
    holds `key` (`seq_hash[slot] == key`), or -1."""
    cells: memoryview[int] = memoryview(table)
    if not len(cells):
        raise ValueError("index_find: empty table")
    if not 0 <= key <= U64_MASK:
        raise OverflowError(f"index_find: key {key} is not a u64")
    return _find_py(cells, memoryview(seq_hash), key)


def _index_find_any_py(table: Any, seq_hash: Any, keys: Any) -> int:
    """The first k for which `_index_find_py(table, seq_hash, keys[k])` finds a slot, or -1."""
    cells: memoryview[int] = memoryview(table)
    if not len(cells):
        raise ValueError("index_find_any: empty table")
    hashes: memoryview[int] = memoryview(seq_hash)
    for k, key in enumerate(memoryview(keys).tolist()):
        if _find_py(cells, hashes, key) >= 0:
            return k
    return -1


def _index_accelerator() -> Any:
    """The module `shmkv._g2index` while the core runs compiled and it loads, else None."""
    from shmkv import _native

    if not _native.is_compiled():
        return None
    try:
        from shmkv import _g2index
    except ImportError:  # not built: the Python twins
        return None
    return _g2index


_INDEX_ACCEL: Final[Any] = _index_accelerator()
_index_insert: Final = _index_insert_py if _INDEX_ACCEL is None else _INDEX_ACCEL.index_insert
_index_remove: Final = _index_remove_py if _INDEX_ACCEL is None else _INDEX_ACCEL.index_remove
_index_find: Final = _index_find_py if _INDEX_ACCEL is None else _INDEX_ACCEL.index_find
_index_find_any: Final = _index_find_any_py if _INDEX_ACCEL is None else _INDEX_ACCEL.index_find_any


def _u64_column(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """`values` as a C-contiguous u64 array (no copy when it is one already)."""
    out: npt.NDArray[np.uint64] = np.ascontiguousarray(values, dtype=np.uint64)
    return out


def _i64_column(values: npt.NDArray[np.intp]) -> npt.NDArray[np.int64]:
    """`values` (slot numbers) as a C-contiguous int64 array."""
    out: npt.NDArray[np.int64] = np.ascontiguousarray(values, dtype=np.int64)
    return out


def _check_reserved_py(
    state: npt.NDArray[np.int8],
    owner: npt.NDArray[np.int16],
    idx: npt.NDArray[np.intp],
    owners: int | npt.NDArray[np.int64],
    scratch: npt.NDArray[np.intp],
) -> tuple[int, int]:
    """The checks of a commit's slots (the twin of `shmkv._g2index.check_reserved`): (1, k)
    if `idx[k]` is the first slot outside the pool, else (2, k) if slot `idx[k]` is the first
    not RESERVED by its owner (`owners[k]`, or `owners` for all), else (3, k) if a slot
    repeats (k: the first position whose slot occurred before), else (0, -1).

    The repeat test is O(n) without a sort: `scratch` (indexable by every slot; overwritten)
    gets each position's number in its slot's cell, last position first (numpy assigns in
    order, so a slot's first occurrence writes last and wins); a position that reads back
    another number repeats an earlier slot.
    """
    capacity = state.size
    outside = (idx < 0) | (idx >= capacity)
    if outside.any():
        return 1, int(outside.argmax())
    bad = (state[idx] != RESERVED) | (owner[idx] != owners)
    if bad.any():
        return 2, int(bad.argmax())
    rows = np.arange(idx.size)
    scratch[idx[::-1]] = rows[::-1]
    losers = np.flatnonzero(scratch[idx] != rows)
    return (3, int(losers[0])) if losers.size else (0, -1)


def _publish_slots_py(
    fields: tuple[npt.NDArray[Any], ...],
    idx: npt.NDArray[np.intp],
    seqs: npt.NDArray[np.uint64],
    parents: npt.NDArray[np.uint64],
    has_parent: npt.NDArray[np.bool_],
    locals_: npt.NDArray[np.uint64],
    positions: npt.NDArray[np.int64],
    tokens: npt.NDArray[np.uint32] | None,
) -> None:
    """Write the fields of slots `idx`, then turn them READY (the twin of
    `shmkv._g2index.publish_slots`). `fields`: the segment's seq_hash, parent_hash, flags,
    local_hash, position, tokens (flat) and state columns; `tokens` n x block_size, or None
    (zeros).

    Raises:
        ValueError: a slot outside the pool, or columns of different lengths (nothing is
            written then).
    """
    seq_hash, parent_hash, flags, local_hash, position, tokens_flat, state = fields
    capacity, count = state.size, idx.size
    block_size = tokens_flat.size // capacity if capacity else 0
    lengths = {len(seqs), len(parents), len(has_parent), len(locals_), len(positions), count}
    if lengths != {count} or (tokens is not None and tokens.size != count * block_size):
        raise ValueError("publish_slots: columns of different lengths")
    if count and (int(idx.min()) < 0 or int(idx.max()) >= capacity):
        raise ValueError("publish_slots: a slot outside the pool")
    seq_hash[idx] = seqs
    parent_hash[idx] = parents
    flags[idx] = has_parent  # NOTE: True is 1, FLAG_HAS_PARENT (the only flag)
    local_hash[idx] = locals_
    position[idx] = positions
    rows = tokens_flat.reshape(capacity, block_size)
    rows[idx] = 0 if tokens is None else tokens.reshape(count, block_size)
    # INVARIANT: every field is written before state turns READY (stores keep order on TSO).
    state[idx] = _READY_I8


def _release_slots_py(
    gen: npt.NDArray[np.int64],
    owner: npt.NDArray[np.int16],
    state: npt.NDArray[np.int8],
    idx: npt.NDArray[np.intp],
) -> None:
    """Free evicted slots `idx` (distinct): gen + 1 and no owner, then state FREE (the twin
    of `shmkv._g2index.release_slots`).

    Raises:
        ValueError: a slot outside the pool (nothing is written then).
    """
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= state.size):
        raise ValueError("release_slots: a slot outside the pool")
    gen[idx] += 1  # INVARIANT: gen before state (module docstring)
    owner[idx] = NO_OWNER
    state[idx] = FREE


_reserved_problem: Final = (
    _check_reserved_py if _INDEX_ACCEL is None else _INDEX_ACCEL.check_reserved
)
_publish_slots: Final = _publish_slots_py if _INDEX_ACCEL is None else _INDEX_ACCEL.publish_slots
_release_slots: Final = _release_slots_py if _INDEX_ACCEL is None else _INDEX_ACCEL.release_slots


def _intp_array(values: list[int]) -> npt.NDArray[np.intp]:
    """`values` (slot or cell numbers) as an array.

    NOTE: through `struct.pack`, which converts a list of ints at about half the
    instructions of `np.fromiter` or `array.array` (numpy's `np.array` is slower still).
    """
    raw = struct.pack(f"={len(values)}q", *values)
    out: npt.NDArray[np.intp] = np.frombuffer(raw, dtype=np.int64).astype(np.intp, copy=False)
    return out


def _low_fragments_distinct(seq_hashes: npt.NDArray[np.uint64] | None) -> bool:
    """Whether the blocks' current fragments, at the shortest width of any PLH mode
    (`_MIN_FRAG_BITS` low bits of the sequence hash), are all different: then so are their
    PLHs (each PLH ends with its block's current fragment, at least that wide), whatever
    their positions and parents. One numpy sort instead of a set of 128-bit PLHs; False
    (unknown) without the array."""
    if seq_hashes is None:
        return False
    if seq_hashes.size < 2:
        return True
    low = np.sort(seq_hashes & _MIN_FRAG_MASK_U64)
    return not bool((low[1:] == low[:-1]).any())


def plhs_of(
    seq_hashes: list[int], parent_hashes: Sequence[SeqHash | None], positions: list[int]
) -> list[Plh]:
    """`make_plh` of every block (inlined for positions of the first mode)."""
    mask = _M0_FRAG_MASK
    return [
        (pos << _M0_POSITION_SHIFT)
        | ((0 if parent is None else parent & mask) << _M0_FRAG_BITS)
        | (seq & mask)
        if 0 <= pos < _FAST_PLH_END
        else make_plh(seq, parent, pos)
        for seq, parent, pos in zip(seq_hashes, parent_hashes, positions, strict=True)
    ]


def plhs_of_columns(
    seq_hashes: npt.NDArray[np.uint64],
    parent_hashes: npt.NDArray[np.uint64],
    positions: npt.NDArray[np.integer],
    *,
    max_position: int | None = None,
) -> list[Plh]:
    """`plhs_of` of columns (`parent_hashes` 0 where a block has no parent: the same PLH).

    First-mode PLHs are built by numpy as two 64-bit words (`hi`: position and the parent
    fragment's top bits; `lo`: the rest of the parent fragment and the current fragment),
    then joined per block with one shift and one or: about a third of the per-block big-int
    work of `plhs_of`. While the core runs compiled, C builds each PLH straight from the
    columns (`shmkv._g2index.plhs_mode0`, whose twin is `_plhs_of_columns_py`).

    `max_position`: the largest position, when the caller knows it and that none is negative
    (saves two passes over a small array).
    """
    if positions.size == 0:
        return []
    if max_position is None:
        if int(positions.min()) < 0:
            return plhs_of(seq_hashes.tolist(), parent_hashes.tolist(), positions.tolist())
        max_position = int(positions.max())
    if max_position >= _FAST_PLH_END:
        return plhs_of(seq_hashes.tolist(), parent_hashes.tolist(), positions.tolist())
    if (
        _INDEX_ACCEL is not None
        and seq_hashes.dtype == np.uint64
        and parent_hashes.dtype == np.uint64
        and positions.dtype == np.int64
    ):
        plhs: list[Plh] = _INDEX_ACCEL.plhs_mode0(seq_hashes, parent_hashes, positions)
        return plhs
    return _plhs_of_columns_py(seq_hashes, parent_hashes, positions)


_PACKED_HAS_PARENT_U64: Final = np.uint64(1 << 32)
"""`shmkv.transport.PACKED_HAS_PARENT` (the wire format's flag; transport is layer 3)."""
_MAX_POSITION_U64: Final = np.uint64(MAX_POSITION)
_PACKED_BAD_BITS_U64: Final = np.uint64(U64_MASK & ~((1 << 32) | MAX_POSITION))


def packed_screen(
    items: npt.NDArray[np.uint64], starts: list[int], ordered: npt.NDArray[np.uint64]
) -> tuple[int, int]:
    """Screen packed OFFLOAD items (`items`: their words, four u64 per item: seq, parent,
    local, meta) of messages starting at `starts` (0, then ascending, each below the item
    count), `ordered` being their sequence hashes sorted. Returns (verdict, max_position):

    * verdict -1: an item is malformed (meta bits beyond position | PACKED_HAS_PARENT, or a
      parent hash without the flag); else -2: a sequence hash repeats; else 1 when every
      message is a chain stored parent first (each item after its first the child of the one
      before it, at the next position) and no message's first parent is among `ordered`;
      else 0;
    * max_position: the largest position (0 when the verdict is negative).

    C (`shmkv._g2index.packed_screen`) while the core runs compiled, else its twin
    `_packed_screen_py`.

    Raises:
        ValueError: no items, a word count not a multiple of 4, or `starts` malformed.
        TypeError: `starts` is not a list, or arrays of the wrong type.
    """
    if _INDEX_ACCEL is not None:
        verdict: tuple[int, int] = _INDEX_ACCEL.packed_screen(items, starts, ordered)
        return verdict
    return _packed_screen_py(items, starts, ordered)


def _packed_screen_py(
    items: npt.NDArray[np.uint64], starts: list[int], ordered: npt.NDArray[np.uint64]
) -> tuple[int, int]:
    """`packed_screen` with numpy (the twin of `shmkv._g2index.packed_screen`)."""
    for name, column in (("items", items), ("ordered", ordered)):
        if getattr(column, "dtype", None) != np.uint64 or getattr(column, "ndim", 0) != 1:
            raise TypeError(f"packed_screen: {name}: expected a contiguous array of u64 items")
    count = items.size // 4
    if count == 0 or items.size % 4:
        raise ValueError("packed_screen: items must be 4 words each, at least one")
    if not isinstance(starts, list):
        raise TypeError("packed_screen: starts must be a list of ints")
    if not starts or any(
        (j == 0 and at != 0) or (j > 0 and at <= starts[j - 1]) or at >= count
        for j, at in enumerate(starts)
    ):
        raise ValueError("packed_screen: starts must be 0, then ascending, below the count")
    words = items.reshape(count, 4)
    meta = words[:, 3]
    if (meta & _PACKED_BAD_BITS_U64).any():
        return -1, 0
    has_parent = (meta & _PACKED_HAS_PARENT_U64) != 0
    seqs, parents = words[:, 0], words[:, 1]
    if not has_parent.all() and parents[~has_parent].any():
        return -1, 0
    if ordered.size > 1 and bool((ordered[1:] == ordered[:-1]).any()):
        return -2, 0
    positions = (meta & _MAX_POSITION_U64).astype(np.int64)
    max_position = int(positions.max())
    links = has_parent[1:] & (parents[1:] == seqs[:-1]) & (positions[1:] == positions[:-1] + 1)
    if len(starts) > 1:
        links[np.array(starts[1:], dtype=np.intp) - 1] = True  # NOTE: message boundaries
    if not links.all():
        return 0, max_position
    firsts = np.array(starts, dtype=np.intp)
    first_parents = parents[firsts][has_parent[firsts]]
    if first_parents.size and ordered.size:
        at = np.searchsorted(ordered, first_parents)
        at[at == ordered.size] = 0
        if bool((ordered[at] == first_parents).any()):
            return 0, max_position
    return 1, max_position


def _plhs_of_columns_py(
    seq_hashes: npt.NDArray[np.uint64],
    parent_hashes: npt.NDArray[np.uint64],
    positions: npt.NDArray[np.integer],
) -> list[Plh]:
    """`plhs_of_columns` of positions 0..254 with numpy (the twin of `plhs_mode0`)."""
    parent_frag = parent_hashes & _M0_FRAG_MASK_U64
    lo = (parent_frag << _M0_FRAG_BITS_U64) | (seq_hashes & _M0_FRAG_MASK_U64)
    hi = (positions.astype(np.uint64) << _M0_HI_POSITION_SHIFT_U64) | (
        parent_frag >> _M0_HI_PARENT_SHIFT_U64
    )
    return [(high << 64) | low for high, low in zip(hi.tolist(), lo.tolist(), strict=True)]


class G2EvictionPolicy(Protocol):
    """What the directory needs from an eviction backend (a subset of `EvictionBackend`)."""

    def insert(self, plh: Plh) -> None: ...

    def remove(self, plh: Plh) -> bool: ...

    def evict(self) -> Plh | None: ...

    def insert_many(self, plhs: Iterable[Plh]) -> None:
        """`for plh in plhs: insert(plh)`; on a refusal the PLHs before it stay inserted."""

    def evict_many(self, count: int) -> list[Plh]:
        """Up to `count` victims, in the order `count` calls of `evict` would return them."""

    def __len__(self) -> int:
        """PLHs held; one more per successful insert (how a refused `insert_many` is told)."""


class _MappedPolicy:
    """Any other policy, with the PLH -> slot map of its READY blocks kept beside it: the
    slot-keeping interface that `G2Lineage` offers itself (`insert(plh, slot)`, `evict_slots`,
    membership), so that the directory speaks to every policy one way."""

    __slots__ = ("_slots", "policy")

    def __init__(self, policy: G2EvictionPolicy) -> None:
        self.policy = policy
        self._slots: dict[Plh, BlockId] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, plh: Plh) -> bool:
        return plh in self._slots

    def insert(self, plh: Plh, slot: int) -> None:
        """Insert `plh`, filed under `slot` (not filed when `slot < 0`: an unknown victim)."""
        self.policy.insert(plh)
        if slot >= 0:
            self._slots[plh] = slot

    def insert_many(self, plhs: list[Plh], slots: list[int]) -> None:
        """`policy.insert_many(plhs)`, the inserted ones filed under their slots (on a refusal
        the PLHs before it stay inserted and filed)."""
        held = len(self.policy)
        try:
            self.policy.insert_many(plhs)
        finally:
            done = len(self.policy) - held
            self._slots.update(zip(plhs[:done], slots[:done], strict=True))

    def insert_chains(self, plhs: list[Plh], starts: list[int], slots: list[int]) -> None:
        """`insert_many` (only `G2Lineage` makes use of the chains)."""
        self.insert_many(plhs, slots)

    def remove(self, plh: Plh) -> bool:
        removed = self.policy.remove(plh)
        self._slots.pop(plh, None)
        return removed

    def evict_slots(self, count: int, slots: list[int]) -> list[Plh]:
        """`policy.evict_many(count)`, appending each victim's slot to `slots` (-1 for one
        not filed: a policy bug) and unfiling it."""
        victims = self.policy.evict_many(count)
        slots.extend(map(self._slots.pop, victims, repeat(-1, len(victims))))
        return victims

    def holds_any(self, plhs: list[Plh]) -> bool:
        return not self._slots.keys().isdisjoint(plhs)

    def slot_map(self) -> dict[Plh, int]:
        return dict(self._slots)


@dataclass(frozen=True, slots=True)
class PinnedRun:
    """A contiguous prefix of G2 blocks pinned by one rank; hand it back to `unpin` once."""

    run_id: int
    rank: DpRank
    slots: list[BlockId]
    gens: list[int]
    seq_hashes: list[SeqHash]

    def __len__(self) -> int:
        return len(self.slots)


@dataclass(frozen=True, slots=True, kw_only=True)
class G2BlockMeta:
    """Metadata of one READY G2 slot, as a rank reads it while the slot is pinned."""

    slot: BlockId
    seq_hash: SeqHash
    parent_hash: SeqHash | None
    local_hash: LocalHash
    position: int
    owner: DpRank
    """The rank that stored the block."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadRankCleanup:
    """What `G2Directory.remove_dead_rank` reclaimed."""

    rank: DpRank
    pins_released: int
    """Sum of the dead rank's pin row before it was zeroed."""
    slots_pinned: int
    """Number of distinct slots the dead rank had pinned."""
    slots_aborted: int
    """RESERVED slots it owned, returned to FREE."""
    epoch: int
    """The rank's epoch after the bump (`rank_epoch[rank]`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class G2DirectoryStats:
    """Counters of one `G2Directory` since it was made."""

    num_free: int
    num_reserved: int
    num_ready: int
    num_commits: int
    num_duplicates: int
    """Commits rejected because the sequence hash (or PLH) was already READY."""
    num_aborts: int
    num_evictions: int
    num_evict_backoffs: int
    """Eviction attempts abandoned because a rank held a pin."""
    num_index_rebuilds: int


# ---------------------------------------------------------------------------------------------
# Shared reading logic (both sides).


class _IndexReader:
    """Lock-free lookups over the shared index; the base of both views."""

    def __init__(self, segment: G2Segment) -> None:
        if segment.closed:
            raise ClosedError(f"segment {segment.name} is closed")
        self._segment = segment
        self._capacity = segment.capacity
        self._index_size = segment.index_size
        self._index_size_u64 = np.uint64(segment.index_size)
        self._window_offsets = np.arange(_WINDOW, dtype=np.intp)
        self._rows = np.arange(_MAX_VECTOR_ROWS, dtype=np.intp)
        self._state_mv = segment.cells("state")
        self._gen_mv = segment.cells("gen")
        self._seq_hash_mv = segment.cells("seq_hash")
        self._index_mv = segment.cells("index_slot")
        self._state_np: npt.NDArray[np.int8] = segment.state
        self._gen_np: npt.NDArray[np.int64] = segment.gen
        self._seq_hash_np: npt.NDArray[np.uint64] = segment.seq_hash
        self._index_np: npt.NDArray[np.int32] = segment.index_slot
        self._closed = False

    @property
    def segment(self) -> G2Segment:
        return self._segment

    @property
    def closed(self) -> bool:
        return self._closed

    def _drop_views(self) -> None:
        self._closed = True
        for attr in [a for a in vars(self) if a.endswith(("_mv", "_np"))]:
            delattr(self, attr)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} over {self._segment.name} is closed")

    def _probe(self, key: SeqHash, start: int) -> int:
        """The slot whose seq_hash is `key`, probing from cell `start`; -1 if absent."""
        index = self._index_mv
        seq_hash = self._seq_hash_mv
        size = self._index_size
        pos = start
        left = size  # NOTE: bounded, in case a concurrent rebuild leaves no empty cell in view
        while left:
            cell = index[pos]
            if cell == INDEX_EMPTY:
                return -1
            if cell >= 0 and seq_hash[cell] == key:
                return cell
            pos += 1
            if pos == size:
                pos = 0
            left -= 1
        return -1

    def find_slot(self, seq_hash: SeqHash) -> int:
        """The slot indexed under `seq_hash` if it is READY right now, else -1 (advisory)."""
        self._check_open()
        slot = self._probe(seq_hash, seq_hash % self._index_size)
        if slot < 0 or self._state_mv[slot] != READY or self._seq_hash_mv[slot] != seq_hash:
            return -1
        return slot

    def lookup_many(
        self, seq_hashes: Sequence[int] | npt.NDArray[np.uint64]
    ) -> npt.NDArray[np.int64]:
        """Vectorized `find_slot`: the READY slot of each hash, -1 where absent (advisory).

        One numpy gather of each key's first `_WINDOW` probe cells settles almost every key
        (present, or absent because an empty cell ends its probe path first); the rare key
        whose window is all occupied cells without a match takes the scalar probe.
        """
        self._check_open()
        keys = np.asarray(seq_hashes, dtype=np.uint64)
        slots = self._indexed(keys)
        ok = (
            (slots >= 0) & (self._state_np[slots] == _READY_I8) & (self._seq_hash_np[slots] == keys)
        )
        found: npt.NDArray[np.int64] = np.where(ok, slots, -1).astype(np.int64, copy=False)
        return found

    def _indexed(self, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        """`_probe` of every key (from its home cell), vectorized: the first slot on its probe
        path that holds its hash, -1 if an empty cell comes first. A candidate only."""
        slots, unresolved = self._locate(keys)
        if unresolved.any():
            size = self._index_size
            for i in np.flatnonzero(unresolved).tolist():
                key = int(keys[i])
                slots[i] = self._probe(key, key % size)
        return slots

    def _locate(
        self, keys: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """Within each key's first `_WINDOW` probe cells: the slot of the first cell whose slot
        holds the key's hash, if no empty cell comes before it (else -1), and whether the
        window settled nothing (no match, no empty cell: the scalar probe must go on).

        NOTE: empty (-1) and tombstone (-2) cells index the hash array from its end; those
        reads are harmless (an empty cell stops the probe anyway).
        """
        cells = self._window_cells(keys)
        # The probe stops at the first cell holding the key or empty; a tombstone whose alias
        # (slot T-2 from the end) happens to hold the key is left to the scalar probe.
        stop = (self._seq_hash_np[cells] == keys[:, None]) | (cells == INDEX_EMPTY)
        first = stop.argmax(axis=1)
        rows = self._row_numbers(keys.size)
        picked = cells[rows, first].astype(np.intp)
        slots: npt.NDArray[np.intp] = np.where(picked >= 0, picked, -1)
        unresolved: npt.NDArray[np.bool_] = ~stop[rows, first] | (picked == INDEX_TOMBSTONE)
        return slots, unresolved

    def _window_cells(self, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.int32]:
        """The contents of the first `_WINDOW` cells of each key's probe path (shape
        (len(keys), _WINDOW); `np.take` wraps around the end of the table)."""
        home = (keys % self._index_size_u64).view(np.intp)  # < T < 2**63: same bits
        cells: npt.NDArray[np.int32] = np.take(
            self._index_np, home[:, None] + self._window_offsets, mode="wrap"
        )
        return cells

    def _row_numbers(self, count: int) -> npt.NDArray[np.intp]:
        rows: npt.NDArray[np.intp] = (
            self._rows[:count] if count <= self._rows.size else np.arange(count)
        )
        return rows


# ---------------------------------------------------------------------------------------------
# Rank side.


class G2RankView(_IndexReader):
    """Rank r's lock-free window on the shared G2 pool. Not thread-safe: one per rank thread.

    Writes only `pins[r, :]`. Keeps a private ledger of the runs it holds, so that
    `pins[r] == Σ ledger` can be checked; `close()` releases every pin still held.
    """

    def __init__(self, segment: G2Segment, rank: DpRank) -> None:
        if not 0 <= rank < segment.num_ranks:
            raise ConfigError(f"rank {rank} outside 0..{segment.num_ranks - 1} of {segment.name}")
        super().__init__(segment)
        self._rank = rank
        self._row_mv = segment.cells("pins", row=rank)
        self._row_np: npt.NDArray[np.int16] = segment.pins[rank]
        self._tokens_np: npt.NDArray[np.uint32] = segment.tokens
        self._ledger: dict[int, PinnedRun] = {}
        self._next_run_id = 1
        self._slot_hints: dict[SeqHash, BlockId] = {}
        """Where this view last found each hash (a guess, validated like an index probe)."""
        self._max_slot_hints = max(self._HINTS_MIN, min(2 * self._capacity, self._HINTS_MAX))
        self._run_cells: dict[int, tuple[npt.NDArray[np.intp], bytes, bytes]] = {}
        """Runs pinned by `_pin_short`: their slots as an array, gens and hashes as bytes."""
        self._ready_bytes = bytes([READY]) * VECTOR_MIN_BLOCKS
        """`state` bytes of that many READY slots."""

    _HINTS_MIN: Final = 1024
    _HINTS_MAX: Final = 1 << 18
    """`_slot_hints` is emptied when it would grow past 2 x capacity, within these bounds."""
    _SHORT_MIN_BLOCKS: Final = 4
    """`_pin_short` leaves shorter runs to `_pin_scalar` (cheaper than numpy's call cost)."""

    @property
    def rank(self) -> DpRank:
        return self._rank

    @property
    def num_runs(self) -> int:
        """Runs currently pinned by this view."""
        return len(self._ledger)

    @property
    def num_pinned_blocks(self) -> int:
        """Pins currently held by this view (a slot pinned twice counts twice)."""
        return sum(len(run) for run in self._ledger.values())

    # -- lookups -------------------------------------------------------------------------------

    def lookup_prefix(self, seq_hashes: Sequence[SeqHash]) -> list[tuple[BlockId, int]]:
        """`(slot, gen)` of the longest contiguous prefix that is READY right now (advisory).

        Nothing is pinned: the slots may be evicted at any moment; use `pin_prefix` to hold them.
        """
        self._check_open()
        state, gen, seq_hash = self._state_mv, self._gen_mv, self._seq_hash_mv
        size = self._index_size
        found: list[tuple[BlockId, int]] = []
        for key in seq_hashes:
            slot = self._probe(key, key % size)
            if slot < 0:
                break
            slot_gen = gen[slot]  # INVARIANT: gen before state and hash (see module docstring)
            if state[slot] != READY or seq_hash[slot] != key:
                break
            found.append((slot, slot_gen))
        return found

    # -- pins ----------------------------------------------------------------------------------

    def pin_prefix(
        self,
        seq_hashes: Sequence[SeqHash] | npt.NDArray[np.uint64],
        *,
        vectorized: bool | None = None,
    ) -> PinnedRun | None:
        """Pin the longest contiguous READY prefix of `seq_hashes` in this rank's row.

        Each block is pinned only if its slot is READY with that hash, and kept only if, after a
        full fence, the slot is still READY at the same generation; the run stops at the first
        block that fails (its pin and all later ones are undone). Returns None when not even the
        first block could be pinned.

        Args:
            seq_hashes: chained sequence hashes, first block first.
            vectorized: force the numpy path (True, `pin_prefixes` with one run) or the
                per-block reference loop (False); by default runs of at least
                `VECTOR_MIN_BLOCKS` hashes take the numpy path, shorter ones `_pin_short`
                (the reference loop's steps done for all blocks at once).
        """
        self._check_open()
        hashes = seq_hashes.tolist() if isinstance(seq_hashes, np.ndarray) else seq_hashes
        if vectorized is None:
            if len(hashes) >= VECTOR_MIN_BLOCKS:
                return self.pin_prefixes([hashes])[0]
            return self._pin_short(hashes if type(hashes) is list else list(hashes))
        if vectorized:
            return self.pin_prefixes([hashes])[0]
        pinned = self._pin_scalar(hashes)
        if pinned is None:
            return None
        slots, gens = pinned
        return self._record(slots, gens, list(hashes[: len(slots)]))

    def _record(self, slots: list[int], gens: list[int], hashes: list[int]) -> PinnedRun:
        run = PinnedRun(self._next_run_id, self._rank, slots, gens, hashes)
        self._next_run_id += 1
        self._ledger[run.run_id] = run
        return run

    def pin_prefixes(
        self, prefixes: Sequence[Sequence[SeqHash] | npt.NDArray[np.uint64]]
    ) -> list[PinnedRun | None]:
        """`pin_prefix` for several hash lists at once: the batched, vectorized path.

        The pin protocol over arrays: one numpy pass finds every key of every list and reads
        its slot's gen, then state and hash (gen first); the longest validated prefix of each
        list is pinned with one `np.add.at` on this rank's row; one full fence; one numpy pass
        re-reads state, then gen, of every pinned slot; each list keeps its pins up to its
        first slot that changed, and the rest are undone with one `np.subtract.at`. Same
        stores, fence and loads, in the same order, as the per-block path, so the same safety
        against a concurrent eviction; in one process the same runs as calling
        `pin_prefix(..., vectorized=False)` for each list in order.

        Returns:
            One entry per list, in order: its pinned run, or None if its first block missed.
        """
        self._check_open()
        lengths = [len(prefix) for prefix in prefixes]
        results: list[PinnedRun | None] = [None] * len(prefixes)
        total = sum(lengths)
        if total == 0:
            return results
        keys = np.fromiter(chain.from_iterable(prefixes), dtype=np.uint64, count=total)
        which = [i for i, length in enumerate(lengths) if length]
        starts = np.cumsum([0, *lengths[:-1]], dtype=np.intp)[which]
        ends = starts + np.asarray([lengths[i] for i in which], dtype=np.intp)
        slots, gens, stop = self._validated_prefixes(keys, starts, ends)
        pinned_lengths = stop - starts
        if not pinned_lengths.any():
            return results
        take = self._row_numbers(total) < np.repeat(stop, ends - starts)
        pin_slots, pin_gens = slots[take], gens[take]
        row = self._row_np
        if int(row[pin_slots].max()) + pin_slots.size >= PIN_MAX:
            # NOTE: near saturation: the per-block path handles it exactly (rare).
            for i in which:
                results[i] = self.pin_prefix(prefixes[i], vectorized=False)
            return results
        np.add.at(row, pin_slots, 1)
        full_fence()
        # INVARIANT: states gathered before gens (the left operand is evaluated first).
        good = (self._state_np[pin_slots] == _READY_I8) & (self._gen_np[pin_slots] == pin_gens)
        nonzero = pinned_lengths > 0
        run_starts = np.cumsum(pinned_lengths) - pinned_lengths
        kept = pinned_lengths
        if not good.all():
            bad_at = np.where(good, pin_slots.size, np.arange(pin_slots.size))
            first_bad = np.full(pinned_lengths.size, pin_slots.size, dtype=np.intp)
            first_bad[nonzero] = np.minimum.reduceat(bad_at, run_starts[nonzero])
            kept = np.minimum(first_bad - run_starts, pinned_lengths)
            undo = np.arange(pin_slots.size) >= np.repeat(run_starts + kept, pinned_lengths)
            np.subtract.at(row, pin_slots[undo], 1)
        slot_list: list[int] = pin_slots.tolist()
        gen_list: list[int] = pin_gens.tolist()
        key_list: list[int] = keys[take].tolist()
        for i, begin, count in zip(which, run_starts.tolist(), kept.tolist(), strict=True):
            if count:
                stop_at = begin + count
                results[i] = self._record(
                    slot_list[begin:stop_at], gen_list[begin:stop_at], key_list[begin:stop_at]
                )
        return results

    def _validated_prefixes(
        self,
        keys: npt.NDArray[np.uint64],
        starts: npt.NDArray[np.intp],
        ends: npt.NDArray[np.intp],
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64], npt.NDArray[np.intp]]:
        """(slot, gen) of every key and, per non-empty list `[start, end)` of `keys`, where its
        READY prefix stops (exclusive). Keys the window cannot settle take the scalar probe,
        but only when they are the first unsettled key of a list still going."""
        slots, unresolved = self._locate(keys)
        gens = self._gen_np[slots]  # INVARIANT: gen gathered before state and hash
        ok = (
            (slots >= 0) & (self._state_np[slots] == _READY_I8) & (self._seq_hash_np[slots] == keys)
        )
        positions = self._row_numbers(keys.size)
        while True:
            stop = np.minimum.reduceat(np.where(ok, keys.size, positions), starts)
            stop = np.minimum(stop, ends)
            open_ = np.flatnonzero(stop < ends)
            pending = [int(stop[i]) for i in open_.tolist() if unresolved[stop[i]]]
            if not pending:
                return slots, gens, stop
            for j in pending:
                unresolved[j] = False
                found = self._resolve(int(keys[j]))
                if found is not None:
                    slots[j], gens[j] = found
                    ok[j] = True

    def _resolve(self, key: SeqHash) -> tuple[int, int] | None:
        """(slot, gen) of `key` by the scalar probe if READY right now, else None."""
        slot = self._probe(key, key % self._index_size)
        if slot < 0:
            return None
        slot_gen = self._gen_mv[slot]  # INVARIANT: gen before state and hash
        if self._state_mv[slot] != READY or self._seq_hash_mv[slot] != key:
            return None
        return slot, slot_gen

    def _pin_scalar(self, seq_hashes: Sequence[SeqHash]) -> tuple[list[int], list[int]] | None:
        """The per-block path: find, validate and pin each block, then one fence, then confirm."""
        index, seq_hash, state, gen, row = (
            self._index_mv,
            self._seq_hash_mv,
            self._state_mv,
            self._gen_mv,
            self._row_mv,
        )
        size = self._index_size
        ready = READY
        pin_max = PIN_MAX
        slots: list[int] = []
        gens: list[int] = []
        add_slot, add_gen = slots.append, gens.append
        for key in seq_hashes:
            pos = key % size
            slot = index[pos]
            if slot < 0:
                if slot == INDEX_EMPTY:
                    break
                slot = self._probe(key, pos)
                if slot < 0:
                    break
            # INVARIANT: gen is read before state and hash (module docstring).
            slot_gen = gen[slot]
            if state[slot] != ready or seq_hash[slot] != key:
                # Not the home cell's slot (or not READY): probe on, then validate again.
                slot = self._probe(key, pos)
                if slot < 0:
                    break
                slot_gen = gen[slot]
                if state[slot] != ready or seq_hash[slot] != key:
                    break
            pins = row[slot]
            if pins >= pin_max:  # NOTE: a saturated cell: treat the rest as a miss
                break
            row[slot] = pins + 1
            add_slot(slot)
            add_gen(slot_gen)
        if not slots:
            return None
        full_fence()
        kept = 0
        for slot, slot_gen in zip(slots, gens, strict=True):
            # INVARIANT: state before gen: a READY seen after an eviction comes with a new gen.
            if state[slot] != ready or gen[slot] != slot_gen:
                break
            kept += 1
        if kept < len(slots):
            for slot in slots[kept:]:
                row[slot] -= 1
            del slots[kept:], gens[kept:]
        return (slots, gens) if slots else None

    def _pin_short(self, keys: list[SeqHash]) -> PinnedRun | None:
        """`pin_prefix` of a short list: `_pin_scalar`'s protocol with each step done for all
        blocks at once (numpy gathers and one scatter over the slot list, compared as bytes):
        per slot the same loads and stores in the same order (gen, then state and hash; the
        pin; one fence for all; state, then gen), and the same run
        (tests/property/test_g2_pin_short.py).

        A slot comes from `_slot_hints` (where this view last found the hash) or, without a
        hint, from the index probe; either way it counts only if READY with the hash, and
        READY with a given hash is one slot at most (the directory rejects duplicates), so a
        valid hint is the slot the probe would find. Anything off the common path (a stale
        hint, a missing or not-READY block, a slot named twice, a saturated pin cell) goes to
        `_pin_scalar` before anything is written; a slot that changed across the fence is
        undone exactly as there. The run keeps its slot array for `release`.
        """
        hints = self._slot_hints
        try:
            slots = list(map(hints.__getitem__, keys))
        except KeyError:  # NOTE: a hash without a hint (seen for the first time here)
            slots = self._probe_unhinted(keys, list(map(hints.get, keys, repeat(-1))))
        num = len(slots)
        if num < self._SHORT_MIN_BLOCKS or len(set(slots)) != num:
            return self._pin_reference(keys)
        idx = np.fromiter(slots, dtype=np.intp, count=num)
        # INVARIANT: gen is gathered before state and hash (module docstring).
        gens = self._gen_np[idx]
        ready = self._ready_bytes[:num]
        if self._state_np[idx].tobytes() != ready:
            return self._pin_reference(keys)
        hashes = self._seq_hash_np[idx]
        pinned_keys = keys if num == len(keys) else keys[:num]
        if hashes.tolist() != pinned_keys:
            return self._pin_reference(keys)
        row = self._row_np
        pins = row[idx]
        if max(pins.tolist()) >= PIN_MAX:
            return self._pin_reference(keys)
        row[idx] = pins + 1  # NOTE: distinct slots: one store per slot
        full_fence()
        gen_bytes = gens.tobytes()
        # INVARIANT: states gathered before gens (the left operand is evaluated first).
        if self._state_np[idx].tobytes() == ready and self._gen_np[idx].tobytes() == gen_bytes:
            run = self._record(slots, gens.tolist(), list(pinned_keys))
            self._run_cells[run.run_id] = (idx, gen_bytes, hashes.tobytes())
            return run
        confirmed = self._confirm(slots, gens.tolist())
        if confirmed is None:
            return None
        kept_slots, kept_gens = confirmed
        return self._record(kept_slots, kept_gens, keys[: len(kept_slots)])

    def _probe_unhinted(self, keys: list[SeqHash], slots: list[int]) -> list[int]:
        """Fill the hint-less (-1) entries of `slots` by the index probe (a candidate,
        remembered as the key's hint); cut `slots` at the first key the index does not hold."""
        hints = self._slot_hints
        size = self._index_size
        for i in range(slots.index(-1), len(slots)):
            if slots[i] >= 0:
                continue
            key = keys[i]
            slot = self._probe(key, key % size)
            if slot < 0:
                del slots[i:]
                break
            slots[i] = slot
            if len(hints) >= self._max_slot_hints:
                hints.clear()
            hints[key] = slot
        return slots

    def _pin_reference(self, keys: list[SeqHash]) -> PinnedRun | None:
        """`_pin_scalar`, then the hints it proves right are kept and the hint of the key where
        it stopped is dropped (so a stale one is not followed again)."""
        pinned = self._pin_scalar(keys)
        hints = self._slot_hints
        kept = 0
        if pinned is not None:
            kept = len(pinned[0])
            if len(hints) + kept > self._max_slot_hints:
                hints.clear()
            hints.update(zip(keys, pinned[0], strict=False))
        if kept < len(keys):
            hints.pop(keys[kept], None)
        if pinned is None:
            return None
        slots, gens = pinned
        return self._record(slots, gens, keys[:kept])

    def _confirm(self, slots: list[int], gens: list[int]) -> tuple[list[int], list[int]] | None:
        """The reference re-check after the fence (state, then gen, slot by slot); the pins from
        the first slot that changed on are undone."""
        state, gen, row = self._state_mv, self._gen_mv, self._row_mv
        kept = 0
        for slot, slot_gen in zip(slots, gens, strict=True):
            if state[slot] != READY or gen[slot] != slot_gen:
                break
            kept += 1
        for slot in slots[kept:]:
            row[slot] -= 1
        del slots[kept:], gens[kept:]
        return (slots, gens) if slots else None

    def _unpin_slots(self, run: PinnedRun) -> None:
        """`pins[r, s] -= 1` for each slot of a run taken off the ledger."""
        cells = self._run_cells.pop(run.run_id, None)
        if cells is not None:  # NOTE: distinct slots (checked when pinned): one store each
            self._row_np[cells[0]] -= 1
            return
        row = self._row_mv
        for slot in run.slots:
            row[slot] -= 1

    def release(self, run: PinnedRun) -> int:
        """`validate(run)`, then `unpin(run)`; returns the validate count.

        Raises:
            InvariantError: the run is not held by this view (nothing is released then).
        """
        self._check_open()
        ledger = self._ledger
        if ledger.get(run.run_id) is not run:
            raise InvariantError(
                f"rank {self._rank} does not hold run {run.run_id} (double unpin, or a run "
                "pinned by another view)"
            )
        cells = self._run_cells.get(run.run_id)
        if cells is None or not self._unchanged(*cells):
            bad = self._violations(run)
        else:
            bad = 0
        del ledger[run.run_id]
        self._unpin_slots(run)
        return bad

    def _unchanged(self, idx: npt.NDArray[np.intp], gen_bytes: bytes, hash_bytes: bytes) -> bool:
        """Whether every slot still holds the pinned gen and hash, READY (`_violations` is 0
        then; False means: count them)."""
        return (
            self._gen_np[idx].tobytes() == gen_bytes
            and self._seq_hash_np[idx].tobytes() == hash_bytes
            and self._state_np[idx].tobytes() == self._ready_bytes[: idx.size]
        )

    def unpin(self, run: PinnedRun) -> None:
        """Release a run pinned by this view.

        Raises:
            InvariantError: the run is not held by this view (already unpinned, or another's).
        """
        self._check_open()
        if self._ledger.pop(run.run_id, None) is not run:
            raise InvariantError(
                f"rank {self._rank} does not hold run {run.run_id} (double unpin, or a run "
                "pinned by another view)"
            )
        self._unpin_slots(run)

    def validate(self, run: PinnedRun) -> int:
        """How many slots of a run this view still pins are no longer what was pinned: each one
        is a pinned slot that was evicted or reused, the one thing the pin protocol must never
        allow. Call it before `unpin`.

        An eviction always bumps the generation before the slot leaves READY, so the check is
        generation and hash; the state may read EVICTING while the coordinator is backing off
        from this very pin (EVICTING -> sees the pin -> READY), which is not a violation.
        """
        self._check_open()
        return self._violations(run)

    def _violations(self, run: PinnedRun) -> int:
        slots = run.slots
        num = len(slots)
        state, gen, seq = self._state_mv, self._gen_mv, self._seq_hash_mv
        if num >= 2:  # NOTE: the common all-good case in three gathers
            get = itemgetter(*slots)
            if get(gen) == tuple(run.gens) and get(seq) == tuple(run.seq_hashes):
                states: tuple[int, ...] = get(state)
                if states.count(READY) + states.count(EVICTING) == num:
                    return 0
        bad = 0
        for slot, pinned_gen, seq_hash in zip(slots, run.gens, run.seq_hashes, strict=True):
            if (
                gen[slot] != pinned_gen
                or seq[slot] != seq_hash
                or state[slot] not in (READY, EVICTING)
            ):
                bad += 1
        return bad

    def unpin_many(self, runs: Sequence[PinnedRun]) -> None:
        """Release several runs pinned by this view (the batched counterpart of `unpin`).

        Raises:
            InvariantError: a run is not held by this view (nothing is released then).
        """
        self._check_open()
        ledger = self._ledger
        if len({run.run_id for run in runs}) != len(runs) or any(
            ledger.get(run.run_id) is not run for run in runs
        ):
            raise InvariantError(
                f"rank {self._rank} does not hold every run it was asked to unpin (double "
                "unpin, or a run pinned by another view)"
            )
        run_cells = self._run_cells
        for run in runs:
            del ledger[run.run_id]
            run_cells.pop(run.run_id, None)
        total = sum(len(run.slots) for run in runs)
        if total < _SCALAR_UNPIN_MAX:
            row = self._row_mv
            for run in runs:
                for slot in run.slots:
                    row[slot] -= 1
            return
        slots = np.fromiter(
            chain.from_iterable(run.slots for run in runs), dtype=np.intp, count=total
        )
        np.subtract.at(self._row_np, slots, 1)

    def unpin_all(self) -> int:
        """Release every run this view holds; returns the number of pins released."""
        self._check_open()
        released = 0
        for run in list(self._ledger.values()):
            released += len(run)
            self.unpin(run)
        return released

    # -- reading pinned blocks -----------------------------------------------------------------

    def _held(self, run: PinnedRun) -> PinnedRun:
        self._check_open()
        if self._ledger.get(run.run_id) is not run:
            raise InvariantError(f"rank {self._rank} does not hold run {run.run_id}")
        return run

    def read_tokens(self, run: PinnedRun) -> npt.NDArray[np.uint32]:
        """A private copy of the token ids of a pinned run, shape (len(run), block_size)."""
        held = self._held(run)
        return self._tokens_np[np.asarray(held.slots, dtype=np.intp)].copy()

    def read_blocks(self, run: PinnedRun) -> list[G2BlockMeta]:
        """Metadata of the blocks of a pinned run, in prefix order."""
        held = self._held(run)
        seg = self._segment
        idx = np.asarray(held.slots, dtype=np.intp)
        parents = seg.parent_hash[idx].tolist()
        has_parent = (seg.flags[idx] & FLAG_HAS_PARENT).tolist()
        return [
            G2BlockMeta(
                slot=slot,
                seq_hash=seq,
                parent_hash=parent if flag else None,
                local_hash=local,
                position=position,
                owner=owner,
            )
            for slot, seq, parent, flag, local, position, owner in zip(
                held.slots,
                seg.seq_hash[idx].tolist(),
                parents,
                has_parent,
                seg.local_hash[idx].tolist(),
                seg.position[idx].tolist(),
                seg.owner[idx].tolist(),
                strict=True,
            )
        ]

    def check_ledger(self) -> None:
        """Raise InvariantError unless `pins[rank]` equals the pins recorded in the ledger."""
        self._check_open()
        expected = np.zeros(self._capacity, dtype=np.int64)
        for run in self._ledger.values():
            np.add.at(expected, np.asarray(run.slots, dtype=np.intp), 1)
        actual = self._segment.pins[self._rank].astype(np.int64)
        wrong = np.flatnonzero(actual != expected)
        if wrong.size:
            sample = [(int(s), int(actual[s]), int(expected[s])) for s in wrong[:5]]
            raise InvariantError(
                f"rank {self._rank}: pin row disagrees with its ledger at {wrong.size} slot(s); "
                f"(slot, row, ledger): {sample}"
            )

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release every pin still held and drop the views. Idempotent."""
        if self._closed:
            return
        self.unpin_all()
        self._drop_views()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Coordinator side.


class _ReadySeqs(AbstractSet[SeqHash]):
    """The sequence hashes of a directory's READY slots, i.e. the keys of the shared index's
    live entries: a read-only set view that probes the index (`G2Directory.ready_seqs`)."""

    __slots__ = ("_directory",)

    def __init__(self, directory: G2Directory) -> None:
        self._directory = directory

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, int | np.integer):
            return False
        value = int(key)
        return 0 <= value <= U64_MASK and self._directory.is_ready(value)

    def __len__(self) -> int:
        return self._directory._num_indexed()

    def __iter__(self) -> Iterator[SeqHash]:
        directory = self._directory
        cells = directory._index_np
        hashes: list[SeqHash] = directory._seq_hash_np[cells[cells >= 0]].tolist()
        return iter(hashes)

    def isdisjoint(self, other: Iterable[object]) -> bool:
        """Whether no hash of `other` is READY (a u64 array: one probe pass, in C when the
        core runs compiled)."""
        if isinstance(other, np.ndarray) and other.dtype == np.uint64 and other.ndim == 1:
            return not self._directory.any_ready(other)
        return not any(key in self for key in other)


class G2Directory(_IndexReader):
    """The coordinator's single-writer control of a G2 segment it created.

    Owns (privately) the free stack, the eviction policy and `plh -> slot`; writes `state`,
    `gen`, hashes, `owner`, `position`, `flags`, `tokens`, the index, and — only for a dead rank
    — that rank's pin row. Expected outcomes (a full pool, a duplicate) are return values.
    """

    def __init__(self, segment: G2Segment, policy: G2EvictionPolicy) -> None:
        """Take control of a freshly created segment.

        Raises:
            ConfigError: the segment was attached rather than created, or is not fresh.
        """
        if not segment.is_owner:
            raise ConfigError(
                f"G2Directory needs the segment's creator; {segment.name} is attached"
            )
        if len(policy):
            raise ConfigError("G2Directory needs an empty eviction policy")
        if np.any(segment.state != FREE) or np.any(segment.index_slot != INDEX_EMPTY):
            raise ConfigError(f"segment {segment.name} is not fresh: create a new one")
        super().__init__(segment)
        self._policy = policy
        self._num_ranks = segment.num_ranks
        self._block_size = segment.block_size
        self._owner_mv = segment.cells("owner")
        self._position_mv = segment.cells("position")
        self._flags_mv = segment.cells("flags")
        self._parent_hash_mv = segment.cells("parent_hash")
        self._local_hash_mv = segment.cells("local_hash")
        self._pin_rows_mv = [segment.cells("pins", row=r) for r in range(segment.num_ranks)]
        self._owner_np: npt.NDArray[np.int16] = segment.owner
        self._pins_np: npt.NDArray[np.int16] = segment.pins
        self._tokens_mv = segment.cells("tokens")
        self._zero_tokens = array("I", bytes(4 * segment.block_size))
        # Free stack: pops from the end, so a fresh pool hands out slots 0, 1, 2, ...
        self._free_stack = np.arange(self._capacity - 1, -1, -1, dtype=np.int32)
        self._slot_scratch = np.zeros(self._capacity, dtype=np.intp)
        """Work array of `_reserved_problem` (slot numbers)."""
        if not segment.tokens.flags.c_contiguous:  # pragma: no cover - the layout makes it so
            raise ConfigError("the segment's token rows must be contiguous")
        self._fields_np = (
            segment.seq_hash, segment.parent_hash, segment.flags, segment.local_hash,
            segment.position, segment.tokens.reshape(-1), segment.state,
        )  # fmt: skip
        """The columns `_publish_slots` writes (tokens flat: a view, the rows being contiguous)."""
        self._num_free = self._capacity
        self._num_reserved = 0
        self._lineage: G2Lineage | None = policy if isinstance(policy, G2Lineage) else None
        """The policy, when it is a `G2Lineage` (a screened batch of chains finds its
        duplicates while it inserts: see `_commit_body`)."""
        self._slotted: G2Lineage | _MappedPolicy = (
            self._lineage if self._lineage is not None else _MappedPolicy(policy)
        )
        """The policy with each READY block's slot: a `G2Lineage`'s nodes keep them (their
        evictions give them back), any other policy gets a PLH -> slot map beside it."""
        self._ready_seqs = _ReadySeqs(self)
        """Sequence hashes of the READY slots, i.e. of the index's entries: a view that
        probes the index (in C while the core runs compiled)."""
        self._evicted_parts: list[list[SeqHash] | npt.NDArray[np.uint64]] = []
        """Sequence hashes evicted since the last `take_evicted`, in order, in parts."""
        self._index_used = 0
        """Non-empty index cells: live entries plus tombstones."""
        self._num_tombstones = 0
        self._rebuild_at = self._index_size - self._index_size // _REBUILD_EMPTY_FRACTION
        self._num_commits = 0
        self._num_duplicates = 0
        self._num_aborts = 0
        self._num_evictions = 0
        self._num_evict_backoffs = 0
        self._num_index_rebuilds = 0

    # -- counts --------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_reserved(self) -> int:
        return self._num_reserved

    @property
    def num_ready(self) -> int:
        return len(self._slotted)

    @property
    def policy(self) -> G2EvictionPolicy:
        return self._policy

    @property
    def ready_seqs(self) -> AbstractSet[SeqHash]:
        """The sequence hashes of the READY slots (a live, read-only view)."""
        return self._ready_seqs

    def is_ready(self, seq_hash: SeqHash) -> bool:
        """Whether a READY slot holds `seq_hash` (`seq_hash in ready_seqs`)."""
        return _index_find(self._index_np, self._seq_hash_np, seq_hash) >= 0

    def any_ready(self, seq_hashes: npt.NDArray[np.uint64]) -> bool:
        """Whether a READY slot holds any of `seq_hashes` (one probe each, in C when
        compiled): `not ready_seqs.isdisjoint(seq_hashes)`."""
        if not len(seq_hashes):
            return False
        keys = _u64_column(seq_hashes)
        return bool(_index_find_any(self._index_np, self._seq_hash_np, keys) >= 0)

    def _num_indexed(self) -> int:
        """Live index entries (= READY slots, between operations)."""
        return self._index_used - self._num_tombstones

    def stats(self) -> G2DirectoryStats:
        return G2DirectoryStats(
            num_free=self._num_free,
            num_reserved=self._num_reserved,
            num_ready=self.num_ready,
            num_commits=self._num_commits,
            num_duplicates=self._num_duplicates,
            num_aborts=self._num_aborts,
            num_evictions=self._num_evictions,
            num_evict_backoffs=self._num_evict_backoffs,
            num_index_rebuilds=self._num_index_rebuilds,
        )

    # -- reserve / commit / abort --------------------------------------------------------------

    def reserve(
        self, num_blocks: int, owner_rank: DpRank, *, vectorized: bool = True
    ) -> list[BlockId]:
        """Reserve up to `num_blocks` slots for `owner_rank` (state RESERVED, owner set).

        FREE slots go first (lowest slot number first on a fresh pool), then READY slots the
        policy picks, each evicted only if no rank pins it (pinned victims are put back into the
        policy after this call). Evicted sequence hashes are queued for `take_evicted`. Returns
        fewer slots than asked when every READY slot is pinned: a partial reservation, which
        the caller may `abort` in part or in whole.

        Args:
            num_blocks: slots wanted.
            owner_rank: the rank the slots are reserved for.
            vectorized: True (default) evicts victims in batches: every victim of a batch is
                marked EVICTING, one full fence, one numpy check of all pin rows, then the
                unpinned ones are freed together. False takes the per-victim reference path
                (one fence per victim). Both give the same slots and the same evictions in the
                same order; they differ only in how many fences they pay.
        """
        self._check_open()
        self._check_rank(owner_rank)
        if num_blocks < 0:
            raise ConfigError(f"cannot reserve {num_blocks} blocks")
        idx = self._take_slots(num_blocks, vectorized)
        slots: list[BlockId] = idx.tolist()
        if not vectorized:
            state, owner = self._state_mv, self._owner_mv
            for slot in slots:
                state[slot] = RESERVED
                owner[slot] = owner_rank
        elif slots:
            self._state_np[idx] = RESERVED
            self._owner_np[idx] = owner_rank
        self._num_reserved += len(slots)
        return slots

    def reserve_many(self, owner_ranks: Sequence[DpRank] | npt.NDArray[np.int64]) -> list[BlockId]:
        """`reserve` of one slot per entry of `owner_ranks`, for that rank, in one batched pass
        (as `reserve(len(owner_ranks), ...)`, vectorized). When the pool runs short the first
        entries get the slots: slot k belongs to `owner_ranks[k]`."""
        slots: list[BlockId] = self.reserve_many_array(owner_ranks).tolist()
        return slots

    def reserve_many_array(
        self, owner_ranks: Sequence[DpRank] | npt.NDArray[np.int64]
    ) -> npt.NDArray[np.intp]:
        """`reserve_many`, the slots as an array (no list to convert for numpy callers)."""
        self._check_open()
        if len(owner_ranks) == 0:
            return np.zeros(0, dtype=np.intp)
        owners = np.asarray(owner_ranks, dtype=np.int64)
        if owners.ndim != 1 or int(owners.min()) < 0 or int(owners.max()) >= self._num_ranks:
            raise ConfigError(f"ranks must be in 0..{self._num_ranks - 1}")
        return self._reserve_owned(owners)

    def _reserve_owned(self, owners: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
        """Reserve up to one slot per entry of `owners` (checked ranks), in order, for them."""
        idx = self._take_slots(int(owners.size), True)
        if idx.size:
            self._state_np[idx] = RESERVED
            self._owner_np[idx] = owners[: idx.size]
            self._num_reserved += int(idx.size)
        return idx

    def reserve_runs(
        self, ranks: Sequence[DpRank], counts: Sequence[int]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
        """`reserve_many_array` of `counts[k]` slots for `ranks[k]`, run after run (the ranks
        checked one per run, not one per block); returns the slots and the owner of each
        requested slot (as many as asked: the first `len(slots)` got one).

        Raises:
            ConfigError: a rank outside the segment's ranks, a negative count or mismatched
                lengths (nothing changes then).
        """
        self._check_open()
        if len(ranks) != len(counts):
            raise ConfigError(f"reserve_runs: {len(ranks)} ranks for {len(counts)} counts")
        for rank, count in zip(ranks, counts, strict=True):
            self._check_rank(rank)
            if count < 0:
                raise ConfigError(f"cannot reserve {count} blocks")
        owners = np.repeat(np.array(ranks, dtype=np.int64), counts)
        if owners.size == 0:
            return np.zeros(0, dtype=np.intp), owners
        return self._reserve_owned(owners), owners

    def _take_slots(self, num_blocks: int, vectorized: bool) -> npt.NDArray[np.intp]:
        """Up to `num_blocks` slots: FREE ones first, then evicted ones (not marked yet)."""
        take = min(num_blocks, self._num_free)
        top = self._num_free
        slots = self._free_stack[top - take : top][::-1].astype(np.intp)
        self._num_free = top - take
        if take < num_blocks:
            wanted = num_blocks - take
            if vectorized:
                evicted = self._evict_many_for(wanted)
            else:
                evicted = np.array(self._evict_for(wanted), dtype=np.intp)
            if evicted.size:
                slots = np.concatenate((slots, evicted)) if take else evicted
        return slots

    def _evict_for(self, wanted: int) -> list[int]:
        """The per-victim reference path of eviction (one fence per victim)."""
        slotted = self._slotted
        freed: list[int] = []
        backed_off: list[tuple[Plh, int]] = []
        try:
            while len(freed) < wanted:
                got: list[int] = []
                victims = slotted.evict_slots(1, got)
                if not victims:
                    break
                plh, slot = victims[0], got[0]
                if slot < 0:
                    raise InvariantError(f"eviction policy returned unknown PLH {plh:#x}")
                seq_hash = self._seq_hash_mv[slot]
                if self._try_evict(slot):
                    self._evicted_one(seq_hash)
                    freed.append(slot)
                else:
                    backed_off.append((plh, slot))
        finally:
            self._reinsert(backed_off)
        return freed

    def _reinsert(self, backed_off: list[tuple[Plh, int]]) -> None:
        """Put victims that were not evicted (pinned) back into the policy, in order."""
        insert = self._slotted.insert
        for plh, slot in backed_off:
            insert(plh, slot)

    def _evict_many_for(self, wanted: int) -> npt.NDArray[np.intp]:
        """Batched eviction: pop victims from the policy (in its order), check them in one
        fenced numpy pass, free the unpinned ones, pop again for the pinned ones' places.

        The policy pops exactly the PLHs the per-victim path would pop (pinned victims are put
        back only at the end in both), so evictions and their order are the same.
        """
        slotted = self._slotted
        freed: list[npt.NDArray[np.intp]] = []
        num_freed = 0
        backed_off: list[tuple[Plh, int]] = []
        try:
            while num_freed < wanted:
                need = wanted - num_freed
                slots: list[int] = []
                victims = slotted.evict_slots(need, slots)
                if not victims:
                    break
                unknown: Plh | None = None
                if -1 in slots:  # a policy bug: free the known ones before it, then raise
                    cut = slots.index(-1)
                    unknown = victims[cut]
                    backed_off.extend(zip(victims[cut + 1 :], slots[cut + 1 :], strict=True))
                    del victims[cut:], slots[cut:]
                if slots:
                    pinned, idx, keys = self._try_evict_many(slots)
                    if pinned is not None:
                        for plh, slot, held in zip(victims, slots, pinned, strict=True):
                            if held:
                                backed_off.append((plh, slot))
                    if idx.size:
                        self._evicted_parts.append(keys)
                        freed.append(idx)
                        num_freed += int(idx.size)
                if unknown is not None:
                    raise InvariantError(f"eviction policy returned unknown PLH {unknown:#x}")
                if len(victims) < need:
                    break  # the policy ran dry
        finally:
            self._reinsert(backed_off)
        if len(freed) == 1:
            return freed[0]
        return np.concatenate(freed) if freed else np.zeros(0, dtype=np.intp)

    def _try_evict_many(
        self, slots: list[int]
    ) -> tuple[list[bool] | None, npt.NDArray[np.intp], npt.NDArray[np.uint64]]:
        """The fenced eviction check for many READY slots at once.

        Stores EVICTING into every slot, one full fence, then loads every rank's pins of them
        (the coordinator's half of the Dekker handshake, batched: every store precedes the
        fence, every load follows it). Pinned slots go back to READY; the others are unindexed,
        get gen+1 and turn FREE. Returns (pinned? per slot, or None when none was pinned;
        the freed slots and their sequence hashes, in order).
        """
        idx = _intp_array(slots)
        state = self._state_np
        state[idx] = _EVICTING_I8
        full_fence()
        pinned = self._pinned_mask(idx)
        keys = self._seq_hash_np[idx]
        if pinned is not None:  # (None: no slot of idx is pinned)
            num_pinned = int(np.count_nonzero(pinned))
            state[idx[pinned]] = _READY_I8
            self._num_evict_backoffs += num_pinned
            free = ~pinned
            idx, keys = idx[free], keys[free]
        self._index_remove_arrays(keys, _i64_column(idx))
        _release_slots(self._gen_np, self._owner_np, state, idx)
        self._num_evictions += int(idx.size)
        return (None if pinned is None else pinned.tolist()), idx, keys

    def _pinned_mask(self, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_] | None:
        """Whether any rank's row pins each slot of `idx` (read after the fence); None when
        none is pinned (the usual case: one flat test instead of a reduction per column)."""
        rows = self._pins_np[:, idx]
        if not rows.any():
            return None
        mask: npt.NDArray[np.bool_] = np.any(rows, axis=0)
        return mask

    def _try_evict(self, slot: BlockId) -> bool:
        """The fenced eviction check; on success the slot is FREE (gen+1) and unindexed."""
        state = self._state_mv
        state[slot] = EVICTING
        full_fence()
        if self._is_pinned(slot):
            state[slot] = READY
            self._num_evict_backoffs += 1
            return False
        seq_hash = self._seq_hash_mv[slot]
        self._index_remove_one(seq_hash, slot)
        self._gen_mv[slot] += 1
        self._owner_mv[slot] = NO_OWNER
        state[slot] = FREE
        self._num_evictions += 1
        return True

    def ignore_pins_for_testing(self) -> None:
        """Negative control only (`--inject-bug ignore-pins`): from now on eviction treats
        every slot as unpinned, on both paths, so the ranks' oracles must report violations."""
        self._is_pinned = lambda slot: False  # type: ignore[method-assign]
        self._pinned_mask = lambda idx: None  # type: ignore[method-assign]

    def _is_pinned(self, slot: BlockId) -> bool:
        """Whether any rank's row pins `slot` (read after the fence)."""
        return any(row[slot] for row in self._pin_rows_mv)

    def commit(
        self,
        slot: BlockId,
        seq_hash: SeqHash,
        parent_hash: SeqHash | None,
        local_hash: LocalHash,
        position: int,
        token_ids: Sequence[int] | npt.NDArray[np.uint32] | None,
        owner_rank: DpRank,
        *,
        plh: Plh | None = None,
    ) -> bool:
        """Publish a RESERVED slot as READY under `seq_hash` and index it.

        Returns False, and frees the slot, when the block is a duplicate: its sequence hash (or
        its PLH) is already READY in another slot.

        Args:
            slot: a slot `reserve` gave `owner_rank`.
            seq_hash: the block's chained sequence hash (the index key).
            parent_hash: the previous block's sequence hash; None for a first block.
            local_hash: the hash of the block's own tokens.
            position: the block's index in its sequence (0 for a first block).
            token_ids: exactly block_size ids, or None to store zeros.
            owner_rank: the rank that reserved the slot and stores the block.
            plh: `make_plh(seq_hash, parent_hash, position)` if the caller has it already
                (saves recomputing it; `check_invariants` verifies it).

        Raises:
            InvariantError: the slot is not RESERVED by `owner_rank`.
            ConfigError: a hash is not u64, the position is out of range, or `token_ids` does
                not hold exactly block_size unsigned 32-bit ids.
        """
        self._check_open()
        self._check_reserved(slot, owner_rank)
        if not (0 <= seq_hash <= U64_MASK and 0 <= local_hash <= U64_MASK) or not (
            parent_hash is None or 0 <= parent_hash <= U64_MASK
        ):
            raise ConfigError(
                f"hashes must be unsigned 64-bit ints, got seq {seq_hash}, parent "
                f"{parent_hash}, local {local_hash}"
            )
        if plh is None:
            plh = make_plh(seq_hash, parent_hash, position)
        block_size = self._block_size
        tokens = self._zero_tokens
        if token_ids is not None:
            try:
                tokens = array("I", token_ids)
            except (OverflowError, TypeError) as exc:
                raise ConfigError(f"token ids must be unsigned 32-bit ints: {exc}") from exc
            if len(tokens) != block_size:
                raise ConfigError(f"a G2 block holds {block_size} token ids, got {len(tokens)}")
        if self._holds_plh(plh) or self._probe(seq_hash, seq_hash % self._index_size) >= 0:
            self._num_duplicates += 1
            self.abort(slot)
            return False
        # NOTE: the policy first: if it refuses the key (raises), the slot is still RESERVED.
        self._slotted.insert(plh, slot)
        self._seq_hash_mv[slot] = seq_hash
        if parent_hash is None:
            self._parent_hash_mv[slot] = 0
            self._flags_mv[slot] = 0
        else:
            self._parent_hash_mv[slot] = parent_hash
            self._flags_mv[slot] = FLAG_HAS_PARENT
        self._local_hash_mv[slot] = local_hash
        self._position_mv[slot] = position
        start = slot * block_size
        self._tokens_mv[start : start + block_size] = tokens
        # INVARIANT: every field is written before state turns READY (stores keep order on TSO).
        self._state_mv[slot] = READY
        self._index_insert_one(seq_hash, slot)
        self._num_reserved -= 1
        self._num_commits += 1
        return True

    def commit_many(
        self,
        slots: Sequence[BlockId] | npt.NDArray[np.integer],
        seq_hashes: Sequence[SeqHash] | npt.NDArray[np.uint64],
        parent_hashes: Sequence[SeqHash | None],
        local_hashes: Sequence[LocalHash] | npt.NDArray[np.uint64],
        positions: Sequence[int] | npt.NDArray[np.integer],
        token_ids: npt.NDArray[np.uint32] | Sequence[Sequence[int] | None] | None,
        owner_rank: DpRank | Sequence[DpRank],
        *,
        plhs: Sequence[Plh] | None = None,
    ) -> list[bool]:
        """`commit` of many blocks, in one vectorized pass.

        The outcome is exactly that of calling `commit` for each block in order: the same
        duplicates (by sequence hash or PLH, including against earlier blocks of the batch),
        freed in the same order, the same policy insertions in the same order, the same
        index cells. Every field of every committed block is written before any of them turns
        READY; each is indexed after.

        Args:
            slots: slots `reserve` gave `owner_rank`, all different.
            seq_hashes, parent_hashes, local_hashes, positions: per block, as for `commit`.
            token_ids: an array of shape (n, block_size), a list with one entry per block
                (block_size ids, or None for zeros), or None (zeros for all).
            owner_rank: the rank that reserved the slots, or one rank per block (blocks
                reserved by several ranks, e.g. through `reserve_many`).
            plhs: the blocks' PLHs if the caller has them.

        Returns:
            Per block, True if committed, False if it was a duplicate (its slot is FREE).

        Raises:
            InvariantError: a slot is not RESERVED by `owner_rank`, or appears twice.
            ConfigError: columns of different lengths, a hash that is not u64, a position out
                of range, or token ids of the wrong shape or range. Nothing changes then.
            Whatever the policy raises on an insert: the blocks before the refused one are
                committed (or freed as duplicates), it and the later ones stay RESERVED.
        """
        self._check_open()
        count = len(slots)
        if count == 0:
            return []
        lengths = {len(seq_hashes), len(parent_hashes), len(local_hashes), len(positions)}
        if plhs is not None:
            lengths.add(len(plhs))
        if lengths != {count}:
            raise ConfigError(f"commit_many: columns of different lengths ({count}, {lengths})")
        idx = self._checked_reserved(slots, owner_rank)
        seq_arr, parent_arr, has_parent, local_arr, pos_arr = self._hash_columns(
            seq_hashes, parent_hashes, local_hashes, positions
        )
        tokens = self._token_rows(token_ids, count)
        seq_list: list[int] = seq_arr.tolist()
        if plhs is None:
            plhs = plhs_of(seq_list, parent_hashes, pos_arr.tolist())
        return self._commit_arrays(
            idx, seq_arr, parent_arr, has_parent, local_arr, pos_arr, tokens,
            list(plhs), seq_list, screened=False,
        )  # fmt: skip

    def commit_screened(
        self,
        slots: npt.NDArray[np.intp],
        seq_hashes: npt.NDArray[np.uint64],
        parent_hashes: npt.NDArray[np.uint64],
        has_parent: npt.NDArray[np.bool_],
        local_hashes: npt.NDArray[np.uint64],
        positions: npt.NDArray[np.int64],
        token_ids: npt.NDArray[np.uint32] | None,
        owner_ranks: DpRank | npt.NDArray[np.int64],
        plhs: list[Plh],
        seq_list: list[SeqHash] | None = None,
        *,
        chain_starts: list[int] | None = None,
        max_position: int | None = None,
    ) -> list[bool]:
        """`commit_many` of columns the caller built and screened already: arrays of one
        length (`parent_hashes` 0 where `has_parent` is False, positions in range), `plhs`
        and `seq_list` (optional: the sequence hashes as ints) matching them, and no sequence
        hash READY
        or repeated in the batch (the coordinator's dedup guarantees it). Only PLH duplicates
        are looked for; slots, owners and token shapes are checked as by `commit_many`.

        `chain_starts` (optional): the blocks form runs starting at these indexes (ascending,
        the first 0), each a chain stored parent first (every block's parent hash is the
        sequence hash of the block before it, its position the next one). The caller vouches
        for it; a policy with `insert_chains` (`G2Lineage`) then skips decoding the links.
        `max_position` (optional): the largest of `positions`, if the caller has it.

        Raises:
            InvariantError, ConfigError: as `commit_many` (nothing changes then).
        """
        self._check_open()
        count = len(slots)
        if count == 0:
            return []
        lengths = {
            len(seq_hashes), len(parent_hashes), len(has_parent), len(local_hashes),
            len(positions), len(plhs), count if seq_list is None else len(seq_list),
        }  # fmt: skip
        if lengths != {count}:
            raise ConfigError(f"commit_screened: columns of different lengths ({count}, {lengths})")
        idx = self._checked_reserved(slots, owner_ranks)
        tokens = self._token_rows(token_ids, count)
        return self._commit_arrays(
            idx, seq_hashes, parent_hashes, has_parent, local_hashes, positions, tokens,
            plhs, seq_list, screened=True, chain_starts=chain_starts, max_position=max_position,
        )  # fmt: skip

    def _commit_arrays(
        self,
        idx: npt.NDArray[np.intp],
        seq_arr: npt.NDArray[np.uint64],
        parent_arr: npt.NDArray[np.uint64],
        has_parent: npt.NDArray[np.bool_],
        local_arr: npt.NDArray[np.uint64],
        pos_arr: npt.NDArray[np.int64],
        tokens: npt.NDArray[np.uint32] | None,
        plh_list: list[Plh],
        seq_list: list[SeqHash] | None,
        *,
        screened: bool,
        chain_starts: list[int] | None = None,
        max_position: int | None = None,
    ) -> list[bool]:
        """The body of `commit_many` / `commit_screened` (checked columns).

        With a `G2Lineage` policy, a screened batch of chains (`chain_starts`) finds its
        duplicates (PLHs held already, or earlier in the batch: all a screened batch can have)
        while the Lineage inserts it, `insert_chains(..., duplicates=...)`: the same ones in
        the same order, without a pass of its own. `seq_list`: `seq_arr` as ints, if the caller
        has it."""
        count = len(seq_arr)
        slot_list: list[int] = idx.tolist()
        policy, lineage = self._policy, self._lineage
        held_before = len(policy)
        failure: BaseException | None = None
        if lineage is not None and screened and chain_starts is not None:
            found: list[int] = []
            try:
                if max_position is None:
                    max_position = int(pos_arr.max())
                first_mode = max_position < _FAST_PLH_END  # NOTE: screened: none < 0
                lineage.insert_chains(plh_list, chain_starts, slot_list, found, first_mode)
            except BaseException as exc:  # NOTE: finish the blocks before the refused one
                failure = exc
            duplicate = [False] * count
            for i in found:
                duplicate[i] = True
            keep = [i for i, dup in enumerate(duplicate) if not dup] if found else None
            done = len(policy) - held_before
        else:
            if seq_list is None:
                seq_list = seq_arr.tolist()
            duplicate = self._duplicates(seq_list, plh_list, screened, seq_arr)
            keep = [i for i, dup in enumerate(duplicate) if not dup] if any(duplicate) else None
            keep_plhs = plh_list if keep is None else [plh_list[i] for i in keep]
            keep_slots = slot_list if keep is None else [slot_list[i] for i in keep]
            done = len(keep_plhs)
            try:
                if keep is None and chain_starts is not None:
                    self._slotted.insert_chains(keep_plhs, chain_starts, keep_slots)
                else:
                    self._slotted.insert_many(keep_plhs, keep_slots)
            except BaseException as exc:  # NOTE: finish the blocks before the refused one
                failure = exc
                done = len(policy) - held_before
        limit = count if failure is None else (done if keep is None else keep[done])
        committed = list(range(done)) if keep is None else keep[:done]
        if committed:
            rows = (
                np.asarray(committed, dtype=np.intp) if keep is not None or done < count else None
            )
            self._publish(
                idx if rows is None else idx[rows],
                seq_arr if rows is None else seq_arr[rows],
                parent_arr if rows is None else parent_arr[rows],
                has_parent if rows is None else has_parent[rows],
                local_arr if rows is None else local_arr[rows],
                pos_arr if rows is None else pos_arr[rows],
                tokens if tokens is None or rows is None else tokens[rows],
            )
        if keep is not None:
            for i in range(limit):
                if duplicate[i]:
                    self._num_duplicates += 1
                    self.abort(int(idx[i]))
        if failure is not None:
            raise failure
        if keep is None:  # NOTE: no duplicate (either branch): no per-block pass
            return [True] * count
        return [not dup for dup in duplicate]

    def _checked_reserved(
        self,
        slots: Sequence[BlockId] | npt.NDArray[np.integer],
        owner_rank: DpRank | Sequence[DpRank] | npt.NDArray[np.int64],
    ) -> npt.NDArray[np.intp]:
        try:
            idx = np.ascontiguousarray(slots, dtype=np.intp)
        except (OverflowError, TypeError, ValueError) as exc:
            raise InvariantError(f"commit_many: slots are not slot numbers: {exc}") from exc
        if idx.ndim != 1:
            raise InvariantError("commit_many: slots must be one-dimensional")
        if isinstance(owner_rank, int | np.integer):
            owners: int | npt.NDArray[np.int64] = int(owner_rank)
        else:
            owners = np.ascontiguousarray(owner_rank, dtype=np.int64)
            if owners.shape != idx.shape:
                outside = (idx < 0) | (idx >= self._capacity)
                if outside.any():
                    slot = int(idx[outside.argmax()])
                    raise InvariantError(f"slot {slot} outside 0..{self._capacity - 1}")
                raise ConfigError(f"commit_many: {owners.size} owner ranks for {idx.size} slots")
        problem, at = _reserved_problem(
            self._state_np, self._owner_np, idx, owners, self._slot_scratch
        )
        if problem == 1:
            raise InvariantError(f"slot {int(idx[at])} outside 0..{self._capacity - 1}")
        if problem == 2:
            owner = owners if isinstance(owners, int) else int(owners[at])
            self._check_reserved(int(idx[at]), owner)  # raises with the details
        if problem == 3:
            raise InvariantError("commit_many: a slot appears twice in one batch")
        return idx

    def _hash_columns(
        self,
        seq_hashes: Sequence[SeqHash] | npt.NDArray[np.uint64],
        parent_hashes: Sequence[SeqHash | None],
        local_hashes: Sequence[LocalHash] | npt.NDArray[np.uint64],
        positions: Sequence[int] | npt.NDArray[np.integer],
    ) -> tuple[
        npt.NDArray[np.uint64],
        npt.NDArray[np.uint64],
        npt.NDArray[np.bool_],
        npt.NDArray[np.uint64],
        npt.NDArray[np.int64],
    ]:
        try:
            seq_arr = np.asarray(seq_hashes, dtype=np.uint64)
            local_arr = np.asarray(local_hashes, dtype=np.uint64)
            has_parent = np.fromiter(
                (p is not None for p in parent_hashes), dtype=bool, count=len(parent_hashes)
            )
            parent_arr = np.asarray([0 if p is None else p for p in parent_hashes], dtype=np.uint64)
            pos_arr = np.asarray(positions, dtype=np.int64)
        except (OverflowError, TypeError, ValueError) as exc:
            raise ConfigError(f"hashes must be unsigned 64-bit ints: {exc}") from exc
        if ((pos_arr < 0) | (pos_arr > MAX_POSITION)).any():
            raise ConfigError(f"block positions must be in 0..{MAX_POSITION}")
        return seq_arr, parent_arr, has_parent, local_arr, pos_arr

    def _token_rows(
        self,
        token_ids: npt.NDArray[np.uint32] | Sequence[Sequence[int] | None] | None,
        count: int,
    ) -> npt.NDArray[np.uint32] | None:
        """Token ids as a (count, block_size) u32 array, or None for zeros."""
        if token_ids is None:
            return None
        block_size = self._block_size
        if isinstance(token_ids, np.ndarray):
            if token_ids.shape != (count, block_size) or token_ids.dtype != np.uint32:
                raise ConfigError(
                    f"token ids must be a ({count}, {block_size}) uint32 array, got "
                    f"{token_ids.shape} {token_ids.dtype}"
                )
            return token_ids
        if len(token_ids) != count:
            raise ConfigError(f"{len(token_ids)} token rows for {count} blocks")
        rows = np.zeros((count, block_size), dtype=np.uint32)
        for i, row in enumerate(token_ids):
            if row is None:
                continue
            try:
                ids = array("I", row)
            except (OverflowError, TypeError) as exc:
                raise ConfigError(f"token ids must be unsigned 32-bit ints: {exc}") from exc
            if len(ids) != block_size:
                raise ConfigError(f"a G2 block holds {block_size} token ids, got {len(ids)}")
            rows[i] = np.frombuffer(ids, dtype=np.uint32)
        return rows

    def _duplicates(
        self,
        seq_list: list[int],
        plh_list: list[Plh],
        screened: bool,
        seq_arr: npt.NDArray[np.uint64] | None = None,
    ) -> list[bool]:
        """Which blocks `commit` would reject, in order (earlier blocks of the batch count).
        `screened`: the caller guarantees no sequence hash is READY or repeated (only PLHs
        are checked at set speed; the per-block pass below still checks everything).
        `seq_arr`: `seq_list` as an array, if the caller has it."""
        count = len(seq_list)
        ready_seqs = self._ready_seqs
        if (
            (_low_fragments_distinct(seq_arr) or len(set(plh_list)) == count)
            and not self._slotted.holds_any(plh_list)
            and (
                screened
                or (
                    (
                        not self.any_ready(seq_arr)
                        if seq_arr is not None
                        else ready_seqs.isdisjoint(seq_list)
                    )
                    and len(set(seq_list)) == count
                )
            )
        ):
            return [False] * count
        duplicate: list[bool] = []
        seen_plh: set[Plh] = set()
        seen_seq: set[int] = set()
        for seq, plh in zip(seq_list, plh_list, strict=True):
            if seq in ready_seqs or self._holds_plh(plh) or plh in seen_plh or seq in seen_seq:
                duplicate.append(True)
            else:
                duplicate.append(False)
                seen_plh.add(plh)
                seen_seq.add(seq)
        return duplicate

    def _publish(
        self,
        idx: npt.NDArray[np.intp],
        seq_arr: npt.NDArray[np.uint64],
        parent_arr: npt.NDArray[np.uint64],
        has_parent: npt.NDArray[np.bool_],
        local_arr: npt.NDArray[np.uint64],
        pos_arr: npt.NDArray[np.int64],
        tokens: npt.NDArray[np.uint32] | None,
    ) -> None:
        """Write the fields of reserved slots already in the policy (and filed under their
        slots there), turn them READY, index. `parent_arr` is 0 where `has_parent` is False
        (as every caller builds it: `_hash_columns`, or `commit_screened`'s contract)."""
        _publish_slots(
            self._fields_np, idx, seq_arr, parent_arr, has_parent, local_arr, pos_arr,
            None if tokens is None else np.ascontiguousarray(tokens).reshape(-1),
        )  # fmt: skip
        self._index_insert_arrays(_u64_column(seq_arr), _i64_column(idx))
        self._num_reserved -= int(idx.size)
        self._num_commits += int(idx.size)

    def _holds_plh(self, plh: Plh) -> bool:
        """Whether a READY block has PLH `plh`."""
        return plh in self._slotted

    def abort(self, slot: BlockId) -> None:
        """Return a RESERVED slot to FREE (gen+1).

        Raises:
            InvariantError: the slot is not RESERVED.
        """
        self._check_open()
        if not 0 <= slot < self._capacity or self._state_mv[slot] != RESERVED:
            raise InvariantError(f"abort of slot {slot}, which is not RESERVED")
        self._release(slot)
        self._num_reserved -= 1
        self._num_aborts += 1

    def _release(self, slot: BlockId) -> None:
        self._gen_mv[slot] += 1
        self._owner_mv[slot] = NO_OWNER
        self._state_mv[slot] = FREE
        self._free_stack[self._num_free] = slot
        self._num_free += 1

    def try_remove(self, seq_hash: SeqHash) -> bool:
        """Evict one READY block on purpose; False if absent or pinned by some rank."""
        self._check_open()
        slot = self._probe(seq_hash, seq_hash % self._index_size)
        if slot < 0:
            return False
        plh = self._plh_of(slot)
        if not self._try_evict(slot):
            return False
        self._slotted.remove(plh)
        self._free_stack[self._num_free] = slot
        self._num_free += 1
        self._evicted_one(seq_hash)
        return True

    def _evicted_one(self, seq_hash: SeqHash) -> None:
        parts = self._evicted_parts
        if parts and isinstance(parts[-1], list):
            parts[-1].append(seq_hash)
        else:
            parts.append([seq_hash])

    def take_evicted(self) -> list[SeqHash]:
        """Drain the sequence hashes evicted since the last call (for host-tier Removed events)."""
        evicted: list[SeqHash] = self.take_evicted_array().tolist()
        return evicted

    def take_evicted_array(self) -> npt.NDArray[np.uint64]:
        """`take_evicted` as an array (no list of Python ints in between)."""
        parts, self._evicted_parts = self._evicted_parts, []
        arrays = [np.asarray(part, dtype=np.uint64) for part in parts]
        if len(arrays) == 1:
            return arrays[0]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint64)

    def _plh_of(self, slot: BlockId) -> Plh:
        parent = self._parent_hash_mv[slot] if self._flags_mv[slot] & FLAG_HAS_PARENT else None
        return make_plh(self._seq_hash_mv[slot], parent, self._position_mv[slot])

    def _check_rank(self, rank: DpRank) -> None:
        if not 0 <= rank < self._num_ranks:
            raise ConfigError(f"rank {rank} outside 0..{self._num_ranks - 1}")

    def _check_reserved(self, slot: BlockId, owner_rank: DpRank) -> None:
        if not 0 <= slot < self._capacity:
            raise InvariantError(f"slot {slot} outside 0..{self._capacity - 1}")
        state = self._state_mv[slot]
        if state != RESERVED or self._owner_mv[slot] != owner_rank:
            raise InvariantError(
                f"commit of slot {slot} by rank {owner_rank}: it is {STATE_NAMES[state]} "
                f"owned by {self._owner_mv[slot]}"
            )

    # -- crash recovery ------------------------------------------------------------------------

    def remove_dead_rank(self, rank: DpRank) -> DeadRankCleanup:
        """Reclaim what a dead rank held: zero its pin row, abort its reservations, bump its epoch.

        Call only once the rank's process is known to be gone (it must not write its row again).
        """
        self._check_open()
        self._check_rank(rank)
        row = self._pins_np[rank]
        pins_released = int(row.sum(dtype=np.int64))
        slots_pinned = int(np.count_nonzero(row))
        row[:] = 0
        reserved = np.flatnonzero((self._state_np == RESERVED) & (self._owner_np == rank))
        for slot in reserved.tolist():
            self.abort(slot)
        epochs = self._segment.rank_epoch
        epochs[rank] += np.uint64(1)
        return DeadRankCleanup(
            rank=rank,
            pins_released=pins_released,
            slots_pinned=slots_pinned,
            slots_aborted=int(reserved.size),
            epoch=int(epochs[rank]),
        )

    # -- index maintenance (single writer) -----------------------------------------------------

    def _index_insert_one(self, key: SeqHash, slot: BlockId) -> None:
        """Index `slot` under `key`: at the first tombstone before the first empty cell of
        the linear probe path from `key mod T`, else at that empty cell; the table is rebuilt
        when fewer than T / 4 cells stay empty."""
        self._index_insert_arrays(array("Q", (key,)), array("q", (slot,)))

    def _index_remove_one(self, key: SeqHash, slot: BlockId) -> None:
        """Unindex `slot` (under `key`): its cell becomes a tombstone, or empty together with
        the tombstones just before it when the next cell is empty (no probe path crosses it).

        Raises:
            InvariantError: the slot is not in the index.
        """
        self._index_remove_arrays(array("Q", (key,)), array("q", (slot,)))

    def _index_insert_arrays(
        self, keys: npt.NDArray[np.uint64] | array[int], slots: npt.NDArray[np.int64] | array[int]
    ) -> None:
        """`_index_insert_one` of every (key, slot) in order (C-contiguous u64 and int64
        arrays), writing the shared table in place (`_index_insert`). A rebuild happens right
        after the insert that crosses the threshold, leaving out the slots not inserted yet
        (they are inserted into the new table after)."""
        count = len(slots)
        start = 0
        while start < count:
            room = self._rebuild_at - self._index_used
            done, filled = _index_insert(self._index_np, keys, slots, start, room)
            self._index_used += filled
            self._num_tombstones -= done - filled
            start += done
            if filled > room:
                self._rebuild_index(skip=np.asarray(slots[start:], dtype=np.intp))

    def _index_remove_arrays(
        self, keys: npt.NDArray[np.uint64] | array[int], slots: npt.NDArray[np.int64] | array[int]
    ) -> None:
        """`_index_remove_one` of every (key, slot) in order (C-contiguous u64 and int64
        arrays), writing the shared table in place (`_index_remove`).

        Raises:
            InvariantError: a slot is not in the index (the ones before it are removed).
        """
        if not len(slots):
            return
        done, net_tombstones, emptied = _index_remove(self._index_np, keys, slots)
        self._num_tombstones += net_tombstones
        self._index_used -= emptied
        if done < len(slots):
            raise InvariantError(
                f"slot {int(slots[done])} (hash {int(keys[done]):#x}) is missing from the index"
            )

    def _rebuild_index(self, skip: npt.NDArray[np.intp] | None = None) -> None:
        """Re-place every READY slot without tombstones (vectorized), then copy the table in.

        Readers probing during the copy may miss (never mis-hit): acceptable for a cache.

        Args:
            skip: READY slots to leave out (a batch's slots not indexed yet: the per-block
                path would not have made them READY by now).
        """
        size = self._index_size
        ready = np.flatnonzero(self._state_np == READY)
        if skip is not None and skip.size:
            ready = np.setdiff1d(ready, skip, assume_unique=True)
        keys = self._seq_hash_np[ready]
        pos = (keys % np.uint64(size)).astype(np.int64)
        slots = ready.astype(np.int32)
        table = np.full(size, INDEX_EMPTY, dtype=np.int32)
        pending = np.arange(ready.size)
        while pending.size:
            cells = pos[pending]
            empty = np.flatnonzero(table[cells] == INDEX_EMPTY)
            # One winner per empty cell; everyone else moves one cell on (linear probing).
            _, first = np.unique(cells[empty], return_index=True)
            winners = empty[first]
            table[cells[winners]] = slots[pending[winners]]
            keep = np.ones(pending.size, dtype=bool)
            keep[winners] = False
            pending = pending[keep]
            moved = pos[pending] + 1
            moved[moved == size] = 0
            pos[pending] = moved
        self._index_np[:] = table
        self._index_used = int(ready.size)
        self._num_tombstones = 0
        self._num_index_rebuilds += 1

    # -- invariants ----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise InvariantError unless the segment and the private structures agree.

        Meant for quiescent moments (no rank mid-pin): a rank undoing a lost race briefly holds
        a pin on a non-READY slot.
        """
        self._check_open()
        # NOTE: collected in a helper, so the raising frame holds no view of the segment.
        problems = self._invariant_problems()
        if problems:
            raise InvariantError("G2 directory: " + "; ".join(problems))

    def _invariant_problems(self) -> list[str]:
        problems: list[str] = []
        state = self._state_np.copy()
        bad_state = np.flatnonzero((state != FREE) & (state != RESERVED) & (state != READY))
        if bad_state.size:
            problems.append(f"slots in state EVICTING or invalid: {bad_state[:8].tolist()}")
        free = state == FREE
        reserved = state == RESERVED
        ready = state == READY
        stack = np.sort(self._free_stack[: self._num_free])
        if not np.array_equal(stack, np.flatnonzero(free)):
            problems.append(
                f"free stack ({self._num_free}) disagrees with FREE slots ({int(free.sum())})"
            )
        if int(reserved.sum()) != self._num_reserved:
            problems.append(f"{int(reserved.sum())} RESERVED slots, counted {self._num_reserved}")
        owner = self._owner_np
        if np.any(owner[free] != NO_OWNER):
            problems.append("a FREE slot has an owner")
        bad_owner = reserved & ((owner < 0) | (owner >= self._num_ranks))
        if bad_owner.any():
            problems.append(
                f"RESERVED slots without a valid owner: {np.flatnonzero(bad_owner)[:8]}"
            )
        pins = self._pins_np
        if np.any(pins < 0):
            problems.append("a negative pin count")
        pinned_not_ready = np.flatnonzero(pins.any(axis=0) & ~ready)
        if pinned_not_ready.size:
            problems.append(f"pins on non-READY slots: {pinned_not_ready[:8].tolist()}")
        problems.extend(self._index_problems(ready))
        ready_slots = set(np.flatnonzero(ready).tolist())
        plh_to_slot = self._slotted.slot_map()
        if set(plh_to_slot.values()) != ready_slots or len(plh_to_slot) != len(ready_slots):
            problems.append("plh -> slot map disagrees with the READY slots")
        if len(self._ready_seqs) != int(ready.sum()):
            problems.append("the index's live entries disagree with the READY slots")
        if len(self._policy) != len(ready_slots):
            problems.append(f"policy holds {len(self._policy)} keys, {len(ready_slots)} READY")
        else:
            for plh, slot in plh_to_slot.items():
                if self._plh_of(slot) != plh:
                    problems.append(f"slot {slot} is filed under a PLH that is not its own")
                    break
        return problems

    def _index_problems(self, ready: npt.NDArray[np.bool_]) -> list[str]:
        problems: list[str] = []
        cells = self._index_np.copy()
        if np.any((cells < INDEX_TOMBSTONE) | (cells >= self._capacity)):
            problems.append("index cell out of range")
            return problems
        live = cells[cells >= 0]
        if np.unique(live).size != live.size:
            problems.append("a slot is indexed more than once")
        if not np.array_equal(np.sort(live), np.flatnonzero(ready)):
            problems.append(
                f"indexed slots ({live.size}) differ from READY slots ({int(ready.sum())})"
            )
        used = int(np.count_nonzero(cells != INDEX_EMPTY))
        tombstones = int(np.count_nonzero(cells == INDEX_TOMBSTONE))
        if used != self._index_used or tombstones != self._num_tombstones:
            problems.append(
                f"index counters off: used {used} vs {self._index_used}, tombstones "
                f"{tombstones} vs {self._num_tombstones}"
            )
        ready_slots = np.flatnonzero(ready)
        found = self.lookup_many(self._seq_hash_np[ready_slots])
        if not np.array_equal(found, ready_slots):
            problems.append("a READY slot is not reachable through the index")
        return problems

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the views (the segment itself is closed and unlinked by its owner). Idempotent."""
        if not self._closed:
            self._drop_views()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = [
    "VECTOR_MIN_BLOCKS",
    "DeadRankCleanup",
    "G2BlockMeta",
    "G2Directory",
    "G2DirectoryStats",
    "G2EvictionPolicy",
    "G2RankView",
    "PinnedRun",
    "full_fence",
    "packed_screen",
    "plhs_of",
    "plhs_of_columns",
]
