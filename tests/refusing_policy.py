"""A G2 eviction policy that refuses one PLH, as Lineage refuses a clashing (position,
fragment). Built around an `LruBackend` rather than subclassing it: a compiled (mypyc) core
class cannot be subclassed from Python."""

from __future__ import annotations

from collections.abc import Iterable

from shmkv.errors import InvariantError
from shmkv.eviction.lru import LruBackend
from shmkv.ids import Plh


class RefusingLru:
    def __init__(self, refused: Plh) -> None:
        self._lru = LruBackend()
        self.refused = refused

    def insert(self, plh: Plh) -> None:
        if plh == self.refused:
            raise InvariantError("refused")
        self._lru.insert(plh)

    def insert_many(self, plhs: Iterable[Plh]) -> None:
        for plh in plhs:  # the PLHs before the refused one stay inserted
            self.insert(plh)

    def remove(self, plh: Plh) -> bool:
        return self._lru.remove(plh)

    def evict(self) -> Plh | None:
        return self._lru.evict()

    def evict_many(self, count: int) -> list[Plh]:
        return self._lru.evict_many(count)

    def __len__(self) -> int:
        return len(self._lru)
