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

_xxh3: Final = xxhash.xxh3_64_intdigest

SEEDS: Final = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)
"""The four fixed xxh3 seeds (one per hash function)."""
_SEED0: Final = SEEDS[0]
_SEED1: Final = SEEDS[1]
_SEED2: Final = SEEDS[2]
_SEED3: Final = SEEDS[3]
COUNTER_MAX: Final = 15
RESET_FACTOR: Final = 10
"""A reset happens once `size` reaches RESET_FACTOR * capacity."""
_HALVE_MASK: Final = 0x7777_7777_7777_7777  # after `word >> 1`, drop the bit from the next nibble
_LOW_BITS: Final = 0x1111_1111_1111_1111  # the low bit of each counter
_MEMO_MIN: Final = 4096


class TinyLfuTracker:
    """Four-hash count-min sketch with 4-bit saturating counters and periodic halving.

    The four (word, bit shift) slots of recently seen PLHs are memoized (touch at registration
    and estimate at release hit the same PLH); the memo is dropped whole when it fills up.
    """

    __slots__ = ("_capacity", "_limit", "_memo", "_memo_limit", "_table", "size")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ConfigError(f"TinyLFU capacity must be >= 0, got {capacity!r}")
        self._capacity = capacity
        self._limit = RESET_FACTOR * capacity
        self._table: list[int] = [0] * max(1, capacity // 4)
        self._memo: dict[Plh, tuple[int, int, int, int, int, int, int, int]] = {}
        self._memo_limit = max(_MEMO_MIN, 2 * capacity)
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
        i0, s0, i1, s1, i2, s2, i3, s3 = self._slots(plh)
        return [(i0, s0 >> 2), (i1, s1 >> 2), (i2, s2 >> 2), (i3, s3 >> 2)]

    def _slots(self, plh: Plh) -> tuple[int, int, int, int, int, int, int, int]:
        """(word index, bit shift) x 4 for `plh`, memoized."""
        found = self._memo.get(plh)
        if found is not None:
            return found
        data = plh.to_bytes(16, "little")
        words = len(self._table)
        # NOTE: unrolled, seeds positional: compiled, a generator or keywords are generic calls
        h0 = _xxh3(data, _SEED0)
        h1 = _xxh3(data, _SEED1)
        h2 = _xxh3(data, _SEED2)
        h3 = _xxh3(data, _SEED3)
        found = (
            h0 % words, (h0 & 15) << 2, h1 % words, (h1 & 15) << 2,
            h2 % words, (h2 & 15) << 2, h3 % words, (h3 & 15) << 2,
        )  # fmt: skip
        if len(self._memo) >= self._memo_limit:
            self._memo.clear()
        self._memo[plh] = found
        return found

    def touch(self, plh: Plh) -> None:
        table = self._table
        i0, s0, i1, s1, i2, s2, i3, s3 = self._slots(plh)
        # One step per hash, in order (unrolled): a counter picked twice is incremented twice.
        changed = False
        word = table[i0]
        if (word >> s0) & 15 < COUNTER_MAX:
            table[i0] = word + (1 << s0)
            changed = True
        word = table[i1]
        if (word >> s1) & 15 < COUNTER_MAX:
            table[i1] = word + (1 << s1)
            changed = True
        word = table[i2]
        if (word >> s2) & 15 < COUNTER_MAX:
            table[i2] = word + (1 << s2)
            changed = True
        word = table[i3]
        if (word >> s3) & 15 < COUNTER_MAX:
            table[i3] = word + (1 << s3)
            changed = True
        if changed:
            self.size += 1
            if self.size >= self._limit:
                self._reset()

    def estimate(self, plh: Plh) -> int:
        table = self._table
        i0, s0, i1, s1, i2, s2, i3, s3 = self._slots(plh)
        return min(
            (table[i0] >> s0) & 15,
            (table[i1] >> s1) & 15,
            (table[i2] >> s2) & 15,
            (table[i3] >> s3) & 15,
        )

    def _reset(self) -> None:
        """Halve every counter; size = size // 2 - (odd counters before halving) // 4."""
        table = self._table
        odd = sum((word & _LOW_BITS).bit_count() for word in table)
        for i, word in enumerate(table):
            table[i] = (word >> 1) & _HALVE_MASK
        # Never negative when capacity >= 1 (size // 2 >= 5 * capacity >= odd // 4); clamp for 0.
        self.size = max(0, self.size // 2 - odd // 4)
