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
from typing import Final

import xxhash

from shmkv.errors import ConfigError
from shmkv.ids import XXH3_SEED, LocalHash, Plh, SeqHash

_xxh3 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack
_TOKEN_BYTES: Final = 4
assert array("I").itemsize == _TOKEN_BYTES, "array('I') must hold 32-bit tokens on this platform"

# (mode, position bits, fragment bits) by position range; see behavior.md §1.4.
_MODE_LIMITS: Final = ((256, 0, 8, 59), (1 << 16, 1, 16, 55), (1 << 24, 2, 24, 51))
MAX_POSITION: Final = (1 << 24) - 1


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


def local_block_hashes(tokens: Sequence[int] | array[int], block_size: int) -> list[LocalHash]:
    """One local hash per full block of `tokens` (a trailing partial block is ignored)."""
    _check_block_size(block_size)
    data = memoryview(token_bytes(tokens))
    step = block_size * _TOKEN_BYTES
    num_full = len(data) // step
    return [_xxh3(data[i * step : (i + 1) * step], seed=XXH3_SEED) for i in range(num_full)]


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
