"""Layer 1: the TinyLFU access-frequency sketch consulted by MultiLRU (`behavior.md` §5.3).

Owns a count-min sketch of 4-bit counters packed sixteen to a 64-bit word, keyed by a PLH's
full 128-bit value. Four xxh3-64 hashes (four fixed seeds) over the PLH's 16 little-endian bytes
each pick a word (`hash % words`) and a counter in it (`hash & 15`). Counters saturate at 15; a
periodic reset halves every counter so old popularity fades.

When two of the four hashes land on the same counter it is incremented once per hash (each step
only while it is below 15), as a sequential per-hash update does.
"""

from __future__ import annotations

from typing import Final

import xxhash

from shmkv.errors import ConfigError
from shmkv.ids import Plh

_xxh3 = xxhash.xxh3_64_intdigest

SEEDS: Final = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)
"""The four fixed xxh3 seeds (one per hash function)."""
COUNTER_MAX: Final = 15
RESET_FACTOR: Final = 10
"""A reset happens once `size` reaches RESET_FACTOR * capacity."""
_HALVE_MASK: Final = 0x7777_7777_7777_7777  # after `word >> 1`, drop the bit from the next nibble
_LOW_BITS: Final = 0x1111_1111_1111_1111  # the low bit of each counter


class TinyLfuTracker:
    """Four-hash count-min sketch with 4-bit saturating counters and periodic halving."""

    __slots__ = ("_capacity", "_limit", "_table", "size")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ConfigError(f"TinyLFU capacity must be an int >= 0, got {capacity!r}")
        self._capacity = capacity
        self._limit = RESET_FACTOR * capacity
        self._table: list[int] = [0] * max(1, capacity // 4)
        self.size = 0
        """Successful increments since the last reset, adjusted by each reset."""

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def table(self) -> list[int]:
        """The packed counter words (a copy)."""
        return list(self._table)

    def slots(self, plh: Plh) -> list[tuple[int, int]]:
        """The (word index, counter index) each of the four hashes picks for `plh`."""
        data = plh.to_bytes(16, "little")
        words = len(self._table)
        return [(h % words, h & 15) for h in (_xxh3(data, seed=s) for s in SEEDS)]

    def touch(self, plh: Plh) -> None:
        data = plh.to_bytes(16, "little")
        table = self._table
        words = len(table)
        changed = False
        for seed in SEEDS:
            h = _xxh3(data, seed=seed)
            index = h % words
            shift = (h & 15) << 2
            word = table[index]
            if (word >> shift) & 15 < COUNTER_MAX:
                table[index] = word + (1 << shift)
                changed = True
        if changed:
            self.size += 1
            if self.size >= self._limit:
                self._reset()

    def estimate(self, plh: Plh) -> int:
        data = plh.to_bytes(16, "little")
        table = self._table
        words = len(table)
        best = COUNTER_MAX
        for seed in SEEDS:
            h = _xxh3(data, seed=seed)
            count = (table[h % words] >> ((h & 15) << 2)) & 15
            if count < best:
                best = count
        return best

    def _reset(self) -> None:
        table = self._table
        odd = sum((word & _LOW_BITS).bit_count() for word in table)
        for i, word in enumerate(table):
            table[i] = (word >> 1) & _HALVE_MASK
        self.size = max(0, self.size // 2 - odd // 4)
