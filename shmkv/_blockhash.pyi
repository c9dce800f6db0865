"""Type stub of the C accelerator `shmkv/_blockhash.c` (built by scripts/build_core.py)."""

from array import array
from random import Random
from typing import Any

def hash_mode0(
    data: bytes, step: int, count: int, parent: int | None, position: int, /
) -> tuple[list[int], list[int], list[int]]:
    """(local hashes, sequence hashes, PLHs) of `count` blocks of `step` bytes of `data`, the
    first at block `position` after `parent`; `position + count` must not exceed 255."""

def hash_one(
    data: bytes | memoryview, parent: int | None, position: int, /
) -> tuple[int, int, int]:
    """(local hash, sequence hash, PLH) of the one block `data` at block `position` (< 255)
    after `parent`."""

def hash_one_at(
    data: bytes | memoryview | array[int],
    start: int,
    length: int,
    parent: int | None,
    position: int,
    /,
) -> tuple[int, int, int]:
    """`hash_one` of the `length` bytes of the buffer `data` from byte `start`."""

def mode0_frags(hashes: list[int], /) -> list[int]:
    """`[h & (2**59 - 1) for h in hashes]`, each hash an int in 0..2**64 - 1."""

def crossing_words(
    rng: Random, num_tokens: int, positions: list[int], offset: int, /
) -> tuple[bytes, list[int]]:
    """The token bytes and partial ids of `shmkv.sequence.extend_crossing_words`: one
    `rng.getrandbits` of `32 (num_tokens + 4 len(positions))` bits, little-endian, cut."""

def pop_all(d: dict[Any, Any], keys: list[Any], /) -> list[Any] | None:
    """`[d.pop(k) if isinstance(k, int) else None for k in keys]`; None (and `d` holding
    the same items, maybe in another order) when an int key is missing or repeats."""

def get_all(d: dict[Any, Any], keys: list[Any], /) -> list[Any] | None:
    """`[d[k] if isinstance(k, int) else None for k in keys]`; None when an int key is
    missing (`d` unchanged)."""

def extend_strided(dest: array[int], src: array[int], start: int, step: int, /) -> None:
    """`dest.extend(src[start::step])` for two arrays of 32-bit words (`array('I')`)."""
