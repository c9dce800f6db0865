"""Layer 1: the interface every inactive-pool eviction backend implements.

A backend orders the *inactive* registered blocks of one pool (zero handles, still matchable)
by PLH. The pool owns the blocks; the backend only decides which PLH goes first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from shmkv.ids import Plh


class EvictionBackend(Protocol):
    """Orders inactive blocks for eviction. All operations are O(1) or O(log n)."""

    def insert(self, plh: Plh) -> None:
        """A block entered the inactive pool. Inserting a present PLH is a bug (InvariantError)."""

    def remove(self, plh: Plh) -> bool:
        """A block left the inactive pool by reactivation. Returns False if it was absent."""

    def evict(self) -> Plh | None:
        """Choose a victim, remove it and return it; None when empty."""

    def insert_many(self, plhs: Iterable[Plh]) -> None:
        """`for plh in plhs: insert(plh)`, in one call."""

    def evict_many(self, count: int) -> list[Plh]:
        """Up to `count` victims, in the order `count` calls of `evict` would return them."""

    def __len__(self) -> int: ...

    def __contains__(self, plh: object) -> bool: ...

    def check_invariants(self) -> None:
        """Raise InvariantError if internal structures disagree."""


class FrequencyTracker(Protocol):
    """Access-frequency sketch (TinyLFU) consulted by frequency-aware backends."""

    def touch(self, plh: Plh) -> None: ...

    def estimate(self, plh: Plh) -> int: ...
