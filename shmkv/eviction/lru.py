"""Layer 1: plain LRU backend (`behavior.md` §5.2).

Order = insertion order into the inactive pool; a hit removes the entry (no recency update
while inactive). Evict pops the least recently inserted PLH.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from shmkv.errors import InvariantError
from shmkv.ids import Plh


class LruBackend:
    __slots__ = ("_order",)

    def __init__(self) -> None:
        self._order: OrderedDict[Plh, None] = OrderedDict()

    def insert(self, plh: Plh) -> None:
        if plh in self._order:
            raise InvariantError(f"LRU: PLH {plh:#x} inserted twice")
        self._order[plh] = None

    def remove(self, plh: Plh) -> bool:
        return self._order.pop(plh, 0) is None

    def evict(self) -> Plh | None:
        if not self._order:
            return None
        return self._order.popitem(last=False)[0]

    def insert_many(self, plhs: Iterable[Plh]) -> None:
        order = self._order
        for plh in plhs:
            if plh in order:
                raise InvariantError(f"LRU: PLH {plh:#x} inserted twice")
            order[plh] = None

    def evict_many(self, count: int) -> list[Plh]:
        popitem = self._order.popitem
        return [popitem(False)[0] for _ in range(min(count, len(self._order)))]

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, plh: object) -> bool:
        return plh in self._order

    def check_invariants(self) -> None:
        """Nothing can disagree in a single OrderedDict."""
