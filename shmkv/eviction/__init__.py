"""Layer 1: inactive-pool eviction backends, selectable by name.

`lineage` (default, leaf-first by tick), `lru` (insertion order), `multi-lru` (four LRU levels
chosen by a TinyLFU frequency estimate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

from shmkv.errors import ConfigError
from shmkv.eviction.base import EvictionBackend, FrequencyTracker
from shmkv.eviction.lru import LruBackend

if TYPE_CHECKING:
    from shmkv.eviction.tinylfu import TinyLfuTracker

EvictionName = Literal["lineage", "lru", "multi-lru"]
EVICTION_NAMES: Final[tuple[str, ...]] = ("lineage", "lru", "multi-lru")


def make_backend(name: str, capacity: int) -> tuple[EvictionBackend, TinyLfuTracker | None]:
    """Build the backend `name` for a pool of `capacity` blocks, with its tracker if it uses one
    (typed as the one tracker there is, so a compiled caller calls it directly)."""
    if name == "lru":
        return LruBackend(), None
    if name == "lineage":
        from shmkv.eviction.lineage import LineageBackend

        return LineageBackend(), None
    if name == "multi-lru":
        from shmkv.eviction.multi_lru import MultiLruBackend
        from shmkv.eviction.tinylfu import TinyLfuTracker

        tracker = TinyLfuTracker(capacity)
        return MultiLruBackend(tracker), tracker
    raise ConfigError(
        f"unknown eviction backend {name!r}; choose one of {', '.join(EVICTION_NAMES)}"
    )


__all__ = ["EVICTION_NAMES", "EvictionBackend", "EvictionName", "FrequencyTracker", "make_backend"]
