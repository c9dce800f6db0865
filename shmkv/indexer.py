"""Layer 1: a router-side KV index rebuilt from ranks' KV events.

What a KV-aware router believes: per (rank, tier), the set of sequence hashes announced
Stored and not yet Removed. `AllBlocksCleared` wipes every tier of that rank. Prefix overlap of
a request = how many of its leading block hashes a rank holds (device tier, optionally counting
host-tier blocks at a discount).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import takewhile

from shmkv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, StorageTier
from shmkv.ids import SeqHash

_DEVICE = StorageTier.DEVICE
_HOST = StorageTier.HOST_PINNED


class KvIndex:
    """Per-rank, per-tier block sets, updated by applying events in stream order."""

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self._device: list[set[SeqHash]] = [set() for _ in range(num_ranks)]
        self._host: list[set[SeqHash]] = [set() for _ in range(num_ranks)]
        self.num_events = 0

    def apply(self, rank: int, events: Iterable[KvEvent]) -> None:
        device = self._device[rank]
        host = self._host[rank]
        for event in events:
            self.num_events += 1
            if type(event) is BlockStored:
                (device if event.tier is _DEVICE else host).update(event.block_hashes)
            elif type(event) is BlockRemoved:
                target = device if event.tier is _DEVICE else host
                target.difference_update(event.block_hashes)
            elif type(event) is AllBlocksCleared:
                device.clear()
                host.clear()

    def overlap_blocks(self, rank: int, seq_hashes: Sequence[SeqHash]) -> tuple[int, int]:
        """(leading blocks in device tier, further leading blocks in host tier)."""
        device = self._device[rank]
        host = self._host[rank]
        num_device = len(list(takewhile(device.__contains__, seq_hashes)))
        if not host:  # the block after the device prefix is in neither tier
            return num_device, 0
        num_host = 0
        for h in seq_hashes[num_device:]:
            if h not in host and h not in device:
                break
            num_host += 1
        return num_device, num_host

    def blocks(self, rank: int, tier: StorageTier) -> set[SeqHash]:
        return set(self._device[rank] if tier is _DEVICE else self._host[rank])
