"""Layer 1: a router-side KV index rebuilt from ranks' KV events.

What a KV-aware router believes: per (rank, tier), the set of sequence hashes announced
Stored and not yet Removed. `AllBlocksCleared` wipes every tier of that rank. Prefix overlap of
a request = how many of its leading block hashes a rank holds (device tier, optionally counting
host-tier blocks at a discount).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, cast

from shmkv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, StorageTier
from shmkv.ids import SeqHash

_DEVICE: Final = StorageTier.DEVICE
_HOST: Final = StorageTier.HOST_PINNED


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
            # A decode step stores (an eviction removes) one block at a time: `add` / `discard`
            # then, without the method call and iterator of a bulk update.
            if type(event) is BlockStored:
                target = device if event.tier is _DEVICE else host
                hashes = event.block_hashes
                if len(hashes) == 1:
                    target.add(hashes[0])
                else:
                    target.update(hashes)
            elif type(event) is BlockRemoved:
                target = device if event.tier is _DEVICE else host
                hashes = event.block_hashes
                if len(hashes) == 1:
                    target.discard(hashes[0])
                else:
                    target.difference_update(hashes)
            elif type(event) is AllBlocksCleared:
                device.clear()
                host.clear()

    def overlap_blocks(self, rank: int, seq_hashes: Sequence[SeqHash]) -> tuple[int, int]:
        """(leading blocks in device tier, further leading blocks in host tier)."""
        device = self._device[rank]
        host = self._host[rank]
        # NOTE: the hashes as objects: compiled, an `int` item would be unboxed and re-boxed
        # for every membership test.
        hashes = cast("list[object]", seq_hashes if isinstance(seq_hashes, list) else [*seq_hashes])
        num_device = 0
        for h in hashes:
            if h not in device:
                break
            num_device += 1
        if not host:  # the block after the device prefix is in neither tier
            return num_device, 0
        end = num_device
        num_hashes = len(hashes)
        while end < num_hashes and (hashes[end] in host or hashes[end] in device):
            end += 1
        return num_device, end - num_device

    def blocks(self, rank: int, tier: StorageTier) -> set[SeqHash]:
        return set(self._device[rank] if tier is _DEVICE else self._host[rank])
