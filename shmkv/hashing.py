"""Layer 1: block identities, bit-identical to Dynamo's router (`behavior.md` §1).

* local hash: xxh3-64, seed 1337, over the block's tokens as little-endian u32;
* sequence hash: first block = its local hash; block i > 0 = xxh3-64, seed 1337, over the
  16 bytes `parent_seq_hash (u64 LE) || local_hash (u64 LE)`;
* positional lineage hash (PLH): a 128-bit int `[mode:2][position:P][parent:M][current:N]`.

Pure: imports only the stdlib and xxhash.
"""

from __future__ import annotations

import random
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any, Final, NamedTuple, TypeAlias

import xxhash

from shmkv.errors import ConfigError
from shmkv.ids import XXH3_SEED, LocalHash, Plh, SeqHash

# NOTE: Final: compiled (mypyc), a Final module name is a C static, not a dict lookup per call.
_xxh3: Final = xxhash.xxh3_64_intdigest
_pack_pair: Final = struct.Struct("<QQ").pack
_TOKEN_BYTES: Final = 4
assert array("I").itemsize == _TOKEN_BYTES, "array('I') must hold 32-bit tokens on this platform"

# A sequence hash's input, `parent || local` as two u64 LE, is C's `unsigned long[2]` where that
# type is 64-bit little-endian (Linux and macOS on x86-64 and ARM64). Stored as such (`array`
# "L", `struct` "LL"), an int converts through CPython's fast `PyLong_AsUnsignedLong`;
# `struct` "<QQ" and `int.to_bytes` go through its generic byte-array conversion, twice the
# instructions (callgrind). Elsewhere the fast paths are off and "<QQ" packs.
_NATIVE_PAIR: Final = sys.byteorder == "little" and array("L").itemsize == 8
_pack_seq_input: Final = struct.Struct("LL" if _NATIVE_PAIR else "<QQ").pack
_ZERO_PAIR: Final = (0, 0)

# (mode, position bits, fragment bits) by position range; see behavior.md §1.4.
_MODE_LIMITS: Final = ((256, 0, 8, 59), (1 << 16, 1, 16, 55), (1 << 24, 2, 24, 51))
MAX_POSITION: Final = (1 << 24) - 1

# Fast path of `make_plh` for positions 0..254: mode 0, 59-bit fragments for the parent and
# (since position + 1 is still mode 0) the current block.
_FAST_PLH_END: Final = 255
_M0_FRAG_BITS: Final = 59
_M0_FRAG_MASK: Final = (1 << _M0_FRAG_BITS) - 1
_M0_POSITION_SHIFT: Final = 2 * _M0_FRAG_BITS
_M0_POSITIONS: Final = tuple(p << _M0_POSITION_SHIFT for p in range(_FAST_PLH_END))


def _accelerator() -> Any:
    """The module `shmkv._blockhash` (the C loops of `_hash_mode0` and `hash_block`) while the
    core runs compiled and it loads; else None (the Python loops run; `SHMKV_PURE=1` runs them
    always)."""
    from shmkv import _native

    if not _native.is_compiled():
        return None
    try:
        from shmkv import _blockhash
    except ImportError:  # not built, or xxhash's C function not found: the Python loops
        return None
    return _blockhash


_ACCEL: Final = _accelerator()
_ACCEL_MODE0: Final[Any] = None if _ACCEL is None else _ACCEL.hash_mode0
_ACCEL_ONE: Final[Any] = None if _ACCEL is None else _ACCEL.hash_one
# The accelerator's other helpers, for the core modules that use them (None: the Python path).
ACCEL_HASH_ONE_AT: Final[Any] = None if _ACCEL is None else _ACCEL.hash_one_at
"""`hash_one_at(data, start, length, parent, position)`: `hash_block` of `length` bytes of
the buffer `data` (a token array) from byte `start`, a position below 255 (no slice)."""
ACCEL_MODE0_FRAGS: Final[Any] = None if _ACCEL is None else _ACCEL.mode0_frags
"""`mode0_frags(hashes)`: `[h & (2**59 - 1) for h in hashes]`, the mode-0 fragments."""
ACCEL_CROSSING_WORDS: Final[Any] = None if _ACCEL is None else _ACCEL.crossing_words
"""`crossing_words(rng, num_tokens, positions, offset)`: the bytes and partial ids of
`shmkv.sequence.extend_crossing_words`."""
ACCEL_EXTEND_STRIDED: Final[Any] = None if _ACCEL is None else _ACCEL.extend_strided
"""`extend_strided(dest, src, start, step)`: `dest.extend(src[start::step])` (`array('I')`s)."""
ACCEL_POP_ALL: Final[Any] = None if _ACCEL is None else _ACCEL.pop_all
"""`pop_all(d, keys)`: `[d.pop(k) if type(k) is int else None for k in keys]`, or None (and
`d` as it was, but for its order) when an int key is missing or repeats."""
ACCEL_GET_ALL: Final[Any] = None if _ACCEL is None else _ACCEL.get_all
"""`get_all(d, keys)`: `[d[k] if type(k) is int else None for k in keys]`, or None when an
int key is missing."""


class BlockHashes(NamedTuple):
    """The identities of consecutive full blocks, one entry per block in each list."""

    local_hashes: list[LocalHash]
    seq_hashes: list[SeqHash]
    plhs: list[Plh]


_HashLists: TypeAlias = tuple[list[LocalHash], list[SeqHash], list[Plh]]
"""A `BlockHashes`' three lists."""

# NOTE: compiled, calling the `NamedTuple` class runs its Python-level `__new__` (about 2,600
# instructions a call, callgrind); `tuple.__new__` (what its `_make` calls) builds the same
# object in C, in half of that
_new_tuple: Final = tuple.__new__


def _block_hashes(
    local_hashes: list[LocalHash], seq_hashes: list[SeqHash], plhs: list[Plh]
) -> BlockHashes:
    """`BlockHashes(local_hashes, seq_hashes, plhs)`, built by `tuple.__new__`."""
    new: Any = _new_tuple
    hashes: BlockHashes = new(BlockHashes, (local_hashes, seq_hashes, plhs))
    return hashes


def token_bytes(tokens: Sequence[int] | array[int]) -> bytes:
    """Serialize tokens as little-endian u32; raises ConfigError on a token outside u32."""
    try:
        packed = (
            tokens if isinstance(tokens, array) and tokens.typecode == "I" else array("I", tokens)
        )
    except (OverflowError, TypeError) as exc:
        raise ConfigError(f"token ids must be unsigned 32-bit ints: {exc}") from exc
    if sys.byteorder == "big":  # pragma: no cover - x86/ARM little-endian in practice
        packed = array("I", packed)
        packed.byteswap()
    return packed.tobytes()


def local_hash_of_bytes(block: bytes | memoryview) -> LocalHash:
    return _xxh3(block, seed=XXH3_SEED)


def _local_hashes_of(data: bytes, step: int, count: int) -> list[LocalHash]:
    """Local hashes of the first `count` blocks of `step` bytes in `data`."""
    # NOTE: compiled, a `while` over short ints beats a comprehension over a `range` with a
    # variable step (a generic iterator), and the `Any` hash function returns CPython ints
    # that go into the list as they are (see `_hash_mode0`)
    xxh3: Any = _xxh3
    out: list[Any] = []
    end = count * step
    start = 0
    while start < end:
        out.append(xxh3(data[start : start + step], XXH3_SEED))
        start += step
    return out


def local_block_hashes(tokens: Sequence[int] | array[int], block_size: int) -> list[LocalHash]:
    """One local hash per full block of `tokens` (a trailing partial block is ignored)."""
    _check_block_size(block_size)
    data = token_bytes(tokens)
    step = block_size * _TOKEN_BYTES
    return _local_hashes_of(data, step, len(data) // step)


def chain_sequence_hashes(
    local_hashes: Iterable[LocalHash], parent: SeqHash | None = None
) -> list[SeqHash]:
    """Chain local hashes into sequence hashes, continuing after `parent` when given."""
    out: list[SeqHash] = []
    prev = parent
    for local in local_hashes:
        prev = local if prev is None else _xxh3(_pack_pair(prev, local), seed=XXH3_SEED)
        out.append(prev)
    return out


def sequence_hash(parent: SeqHash | None, local: LocalHash) -> SeqHash:
    return local if parent is None else _xxh3(_pack_pair(parent, local), seed=XXH3_SEED)


def sequence_hashes(tokens: Sequence[int] | array[int], block_size: int) -> list[SeqHash]:
    """One chained sequence hash per full block of `tokens`."""
    return chain_sequence_hashes(local_block_hashes(tokens, block_size))


def hash_blocks(
    data: bytes | memoryview,
    block_size: int,
    parent: SeqHash | None = None,
    position: int = 0,
) -> BlockHashes:
    """Local hash, sequence hash and PLH of every full block of `data`, in one pass.

    Args:
        data: token bytes (`token_bytes`) starting at a block boundary; a trailing partial
            block is ignored.
        block_size: tokens per block.
        parent: the sequence hash of the block just before `data`, if any.
        position: the block position of the first block of `data`.

    Raises:
        ConfigError: a bad block size, or the last block lies beyond `MAX_POSITION`.
    """
    locals_, seqs, plhs = _hash_lists(data, block_size, parent, position)
    return _block_hashes(locals_, seqs, plhs)


def _hash_lists(
    data: bytes | memoryview, block_size: int, parent: SeqHash | None, position: int
) -> _HashLists:
    """`hash_blocks` as a plain tuple (compiled: a C struct, where a `NamedTuple` is built by
    a Python-level `__new__`)."""
    _check_block_size(block_size)
    step = block_size * _TOKEN_BYTES
    count = len(data) // step
    if position + count - 1 > MAX_POSITION:
        raise ConfigError(f"sequence longer than {MAX_POSITION + 1} blocks")
    # NOTE: typed `bytes`, compiled slicing is a direct call (a union goes through a slice object)
    raw = data if isinstance(data, bytes) else bytes(data)
    if _NATIVE_PAIR and position >= 0 and position + count <= _FAST_PLH_END:
        accel: Any = _ACCEL_MODE0
        if accel is not None:
            hashed: _HashLists = accel(raw, step, count, parent, position)
            return hashed
        return _hash_mode0(raw, step, count, parent, position)
    locals_ = _local_hashes_of(raw, step, count)
    seqs = _chain(locals_, parent)
    return locals_, seqs, chain_plhs(seqs, parent, position)


def _chain(locals_: list[LocalHash], parent: SeqHash | None) -> list[SeqHash]:
    """`chain_sequence_hashes(locals_, parent)`, with `Any` ints (see `_hash_mode0`)."""
    xxh3: Any = _xxh3
    pack: Any = _pack_seq_input
    seqs: list[Any] = []
    prev: Any = parent
    for local in locals_:
        prev = local if prev is None else xxh3(pack(prev, local), XXH3_SEED)
        seqs.append(prev)
    return seqs


def _hash_mode0(
    data: bytes, step: int, count: int, parent: SeqHash | None, position: int
) -> _HashLists:
    """`hash_blocks` of `count` blocks of `step` bytes that all lie in mode 0 (`position +
    count <= _FAST_PLH_END`), in one loop; needs `_NATIVE_PAIR`.

    The PLH is `position << 118 | parent_frag << 59 | frag`: its three fields are disjoint,
    so `+` packs them like `|`."""
    # NOTE: the 64-bit hashes and 128-bit PLHs do not fit mypyc's short ints. Typed `Any`
    # (and the hash function too, so that its result stays as it is), compiled code keeps
    # CPython's int objects and applies CPython's own int operators to them, with none of
    # mypyc's tagged-int conversions (and this changes nothing interpreted).
    xxh3: Any = _xxh3
    if not count:
        return [], [], []
    # NOTE: filled by index: compiled, a store is a third of an `append`
    locals_: list[Any] = [None] * count
    seqs: list[Any] = [None] * count
    plhs: list[Any] = [None] * count
    slot = 0
    mask: Any = _M0_FRAG_MASK
    frag_bits: Any = _M0_FRAG_BITS
    positions: tuple[Any, ...] = _M0_POSITIONS
    # NOTE: the input of each sequence hash (see `_NATIVE_PAIR`), rewritten in place: two
    # item stores cost less than packing a new `bytes`, and allocate nothing
    pair = array("L", _ZERO_PAIR)
    index = position
    end = position + count
    start = 0
    prev: Any
    frag: Any
    shifted_parent: Any
    if parent is None:
        prev = xxh3(data[:step], XXH3_SEED)
        frag = prev & mask
        locals_[0] = prev
        seqs[0] = prev
        plhs[0] = positions[index] + frag
        shifted_parent = frag << frag_bits
        slot = 1
        index += 1
        start = step
    else:
        prev = parent
        shifted_parent = (prev & mask) << frag_bits
    pair[0] = prev
    while index < end:
        local: Any = xxh3(data[start : start + step], XXH3_SEED)
        pair[1] = local
        prev = xxh3(pair, XXH3_SEED)
        pair[0] = prev
        frag = prev & mask
        plhs[slot] = positions[index] + shifted_parent + frag
        shifted_parent = frag << frag_bits
        locals_[slot] = local
        seqs[slot] = prev
        start += step
        index += 1
        slot += 1
    return locals_, seqs, plhs


class PrefixHashCache:
    """`hash_blocks` for a stream of prompts that share prefixes (system prompts, chat
    histories, prefix groups): a prompt whose first block matches a recent prompt's reuses
    the hashes of their common prefix and hashes only the rest. Results are identical to
    `hash_blocks(data, block_size)`; the returned lists are fresh (the caller may keep them).

    Args:
        block_size: tokens per block.
        max_prompts: how many recent prompts (distinct first blocks) to remember.
        max_blocks: bound on the full blocks of the remembered prompts (memory: about 100
            bytes per block with a block of 16 tokens); the oldest prompts go first.
    """

    __slots__ = ("_block_size", "_max_blocks", "_max_prompts", "_num_blocks", "_recent")

    def __init__(self, block_size: int, max_prompts: int = 256, max_blocks: int = 1 << 17) -> None:
        _check_block_size(block_size)
        self._block_size = block_size
        self._max_prompts = max(1, max_prompts)
        self._max_blocks = max(0, max_blocks)
        self._num_blocks = 0
        # first block -> (token bytes, blocks shared with the prompt it replaced, local hashes,
        # sequence hashes, PLHs), oldest first
        self._recent: dict[bytes, tuple[bytes, int, list[LocalHash], list[SeqHash], list[Plh]]] = {}

    def hash_blocks(self, data: bytes) -> BlockHashes:
        """`hash_blocks(data, block_size)`, reusing a recent prompt's common prefix."""
        block_size = self._block_size
        step = block_size * _TOKEN_BYTES
        count = len(data) // step
        if not count:
            return hash_blocks(data, block_size)
        first = data[:step]
        recent = self._recent.get(first)
        if recent is None:
            shared = 0
            locals_, seqs, plhs = _hash_lists(data, block_size, None, 0)
        else:
            old_data, old_shared, old_locals, old_seqs, old_plhs = recent
            limit = min(count, len(old_seqs))
            shared = _common_blocks(old_data, data, step, limit, old_shared)
            rest_locals, rest_seqs, rest_plhs = _hash_lists(
                data[shared * step : count * step], block_size, old_seqs[shared - 1], shared
            )
            self._num_blocks -= len(old_seqs)
            # NOTE: the remembered lists are the cache's own (callers get copies): cut and
            # extended in place, they need no copy of the shared prefix
            locals_ = old_locals
            del locals_[shared:]
            locals_ += rest_locals
            seqs = old_seqs
            del seqs[shared:]
            seqs += rest_seqs
            plhs = old_plhs
            del plhs[shared:]
            plhs += rest_plhs
            del self._recent[first]  # re-inserted below as the most recent
        self._recent[first] = (data, shared, locals_, seqs, plhs)
        self._num_blocks += count
        while len(self._recent) > self._max_prompts or (
            self._num_blocks > self._max_blocks and self._recent
        ):
            dropped = self._recent.pop(next(iter(self._recent)))
            self._num_blocks -= len(dropped[3])
        return _block_hashes(list(locals_), list(seqs), list(plhs))


def _common_blocks(a: bytes, b: bytes, step: int, limit: int, guess: int = 0) -> int:
    """How many leading blocks of `step` bytes `a` and `b` share (their first one must match),
    at most `limit`: a binary search over prefix comparisons (prefix equality is monotone).

    Its first probes are `guess` and `guess + 1` (when `1 < guess <= limit`): the prompts of a
    prefix group share as many blocks with each other, so the last answer is usually the next.
    """
    low, high = 1, limit  # invariant: the first `low` blocks match, and at most `high` do
    if 1 < guess <= limit:
        if not a.startswith(b[: guess * step]):
            high = guess - 1
        elif guess == limit or not a.startswith(b[: (guess + 1) * step]):
            return guess
        else:
            low = guess + 1
    while low < high:
        mid = (low + high + 1) // 2
        # NOTE: `startswith` (`len(a) >= mid * step`) copies one prefix per probe, not two
        if a.startswith(b[: mid * step]):
            low = mid
        else:
            high = mid - 1
    return low


def hash_block(
    data: bytes | memoryview, parent: SeqHash | None, position: int
) -> tuple[LocalHash, SeqHash, Plh]:
    """(local hash, sequence hash, PLH) of the one block whose token bytes are `data`, at
    `position` after `parent` (a decode step filling a block)."""
    accel: Any = _ACCEL_ONE
    if accel is not None and 0 <= position < _FAST_PLH_END:
        hashed: tuple[LocalHash, SeqHash, Plh] = accel(data, parent, position)
        return hashed
    # NOTE: `Any` for the hashes and the big ints, `+` for disjoint fields: see `_hash_mode0`
    xxh3: Any = _xxh3
    pack: Any = _pack_seq_input
    local: Any = xxh3(data, XXH3_SEED)
    head: Any = parent
    current: Any = local if head is None else xxh3(pack(head, local), XXH3_SEED)
    if 0 <= position < _FAST_PLH_END:
        mask: Any = _M0_FRAG_MASK
        positions: tuple[Any, ...] = _M0_POSITIONS
        plh: Any = positions[position] + (current & mask)
        if head is not None:
            plh += (head & mask) << _M0_FRAG_BITS
        return local, current, plh
    return local, current, make_plh(current, parent, position)


def chain_plhs(seq_hashes: Sequence[SeqHash], parent: SeqHash | None, position: int) -> list[Plh]:
    """PLHs of a chain of blocks: block i sits at `position + i`, its parent is block i - 1
    (`parent` for block 0)."""
    if position < 0:
        raise ConfigError(f"block position must be >= 0, got {position}")
    count = len(seq_hashes)
    fast = max(0, min(count, _FAST_PLH_END - position))
    plhs: list[Plh] = []
    if fast:
        mask = _M0_FRAG_MASK
        frags = [h & mask for h in islice(seq_hashes, fast)]
        parent_frags = [0 if parent is None else parent & mask]
        parent_frags += frags[:-1]
        plhs = [
            pos | (parent_frag << _M0_FRAG_BITS) | frag
            for pos, parent_frag, frag in zip(
                _M0_POSITIONS[position : position + fast], parent_frags, frags, strict=True
            )
        ]
    for i in range(fast, count):
        plhs.append(make_plh(seq_hashes[i], seq_hashes[i - 1] if i else parent, position + i))
    return plhs


def _mode(position: int) -> tuple[int, int, int]:
    for limit, mode, pos_bits, frag_bits in _MODE_LIMITS:
        if position < limit:
            return mode, pos_bits, frag_bits
    raise ConfigError(f"block position {position} exceeds the lineage limit {MAX_POSITION}")


def make_plh(current: SeqHash, parent: SeqHash | None, position: int) -> Plh:
    """Pack a positional lineage hash.

    The current fragment keeps as many bits as the *child's* parent fragment will, so a child's
    parent fragment always equals its parent's current fragment across mode boundaries.
    """
    if 0 <= position < _FAST_PLH_END:
        parent_frag = 0 if parent is None else parent & _M0_FRAG_MASK
        return (
            (position << _M0_POSITION_SHIFT)
            | (parent_frag << _M0_FRAG_BITS)
            | (current & _M0_FRAG_MASK)
        )
    if position < 0:
        raise ConfigError(f"block position must be >= 0, got {position}")
    mode, _pos_bits, frag_bits = _mode(position)
    cur_bits = frag_bits if position >= MAX_POSITION else min(frag_bits, _mode(position + 1)[2])
    parent_frag = 0 if parent is None else parent & ((1 << frag_bits) - 1)
    cur_frag = current & ((1 << cur_bits) - 1)
    return (mode << 126) | (position << (2 * frag_bits)) | (parent_frag << frag_bits) | cur_frag


def _frag_bits_of(plh: Plh) -> tuple[int, int]:
    mode = plh >> 126
    _limit, _mode_id, pos_bits, frag_bits = _MODE_LIMITS[mode]
    return pos_bits, frag_bits


def plh_position(plh: Plh) -> int:
    pos_bits, frag_bits = _frag_bits_of(plh)
    return (plh >> (2 * frag_bits)) & ((1 << pos_bits) - 1)


def plh_parent_fragment(plh: Plh) -> int:
    _pos_bits, frag_bits = _frag_bits_of(plh)
    return (plh >> frag_bits) & ((1 << frag_bits) - 1)


def plh_current_fragment(plh: Plh) -> int:
    _pos_bits, frag_bits = _frag_bits_of(plh)
    return plh & ((1 << frag_bits) - 1)


def lineage_key(plh: Plh) -> tuple[int, int]:
    """(position, current fragment): the node identity the Lineage backend uses."""
    return plh_position(plh), plh_current_fragment(plh)


def lineage_parent_key(plh: Plh) -> tuple[int, int] | None:
    """(position - 1, parent fragment), or None for a root (position 0)."""
    position = plh_position(plh)
    return None if position == 0 else (position - 1, plh_parent_fragment(plh))


def random_u64(rng: random.Random) -> int:
    return rng.getrandbits(64)


def check_block_size(block_size: int) -> None:
    _check_block_size(block_size)


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise ConfigError(f"block_size must be a positive int, got {block_size!r}")
