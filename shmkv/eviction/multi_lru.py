"""Layer 1: the MultiLRU eviction backend (`behavior.md` §5.3).

Owns four insertion-ordered LRU levels of inactive PLHs. A PLH's level is fixed when it enters
the inactive pool, from the frequency tracker's estimate `f` at that moment: level 0 if
`f < thresholds[0]`, 1 if `f < thresholds[1]`, 2 if `f < thresholds[2]`, else 3. Eviction takes
the least recently inserted PLH of the coldest non-empty level.

The backend only *reads* the tracker; the pool touches it (registration, match hits).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from shmkv.errors import ConfigError, InvariantError
from shmkv.eviction.base import FrequencyTracker
from shmkv.ids import Plh

DEFAULT_THRESHOLDS: tuple[int, int, int] = (3, 8, 15)
LEVELS = 4


class MultiLruBackend:
    """Four LRU lists, coldest evicted first; the level comes from a TinyLFU estimate."""

    __slots__ = ("_levels", "_t0", "_t1", "_t2", "_tracker", "_where")

    def __init__(
        self, tracker: FrequencyTracker, thresholds: tuple[int, int, int] = DEFAULT_THRESHOLDS
    ) -> None:
        if len(thresholds) != LEVELS - 1 or not thresholds[0] <= thresholds[1] <= thresholds[2]:
            raise ConfigError(
                f"MultiLRU thresholds must be three non-decreasing ints, got {thresholds!r}"
            )
        self._tracker = tracker
        self._t0, self._t1, self._t2 = thresholds
        self._levels: tuple[OrderedDict[Plh, None], ...] = tuple(
            OrderedDict() for _ in range(LEVELS)
        )
        self._where: dict[Plh, OrderedDict[Plh, None]] = {}

    @property
    def thresholds(self) -> tuple[int, int, int]:
        return self._t0, self._t1, self._t2

    def level_of(self, plh: Plh) -> int | None:
        """The level holding `plh`, or None when absent."""
        level = self._where.get(plh)
        return None if level is None else self._levels.index(level)

    def level_sizes(self) -> tuple[int, ...]:
        return tuple(len(level) for level in self._levels)

    def insert(self, plh: Plh) -> None:
        where = self._where
        if plh in where:
            raise InvariantError(f"MultiLRU: PLH {plh:#x} inserted twice")
        f = self._tracker.estimate(plh)
        levels = self._levels
        if f < self._t0:
            level = levels[0]
        elif f < self._t1:
            level = levels[1]
        elif f < self._t2:
            level = levels[2]
        else:
            level = levels[3]
        level[plh] = None
        where[plh] = level

    def remove(self, plh: Plh) -> bool:
        level = self._where.pop(plh, None)
        if level is None:
            return False
        del level[plh]
        return True

    def evict(self) -> Plh | None:
        for level in self._levels:
            if level:
                plh = level.popitem(last=False)[0]
                del self._where[plh]
                return plh
        return None

    def insert_many(self, plhs: Iterable[Plh]) -> None:
        for plh in plhs:
            self.insert(plh)

    def evict_many(self, count: int) -> list[Plh]:
        victims: list[Plh] = []
        for _ in range(count):
            plh = self.evict()
            if plh is None:
                break
            victims.append(plh)
        return victims

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, plh: object) -> bool:
        return plh in self._where

    def check_invariants(self) -> None:
        total = 0
        for level in self._levels:
            total += len(level)
            for plh in level:
                if self._where.get(plh) is not level:
                    raise InvariantError(
                        f"MultiLRU: PLH {plh:#x} is in a level it is not mapped to"
                    )
        if total != len(self._where):
            raise InvariantError(f"MultiLRU: {len(self._where)} PLHs mapped, {total} in levels")
