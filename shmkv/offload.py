"""Layer 1: the interface between a rank's G1 `KvManager` and a host tier (G2).

Two implementations sit behind `OffloadEngine`: the in-process G2 (`shmkv.offload_local`, for
offline replay and unit tests) and the shared, multi-process G2 client (`shmkv.g2`, for the
fleet). The rank engine and the manager never know which one they hold.

Flow (behavior.md §8):

    G1 eviction -> enqueue_evictions(items, source slots)    copies start; slots quarantined
    tick(now)   -> released source slots + G2 events          copies finished or dropped
    swap-in     -> prepare_onboard(plhs) -> start_onboard()   longest contiguous G2 prefix, pinned
    tick(now)   -> take_completed_onboards()                  blocks ready to register in G1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shmkv.ids import BlockId, LocalHash, Plh, SeqHash


@dataclass(slots=True)
class BlockMeta:
    """What a router needs to announce a block in another tier."""

    seq_hash: SeqHash
    parent_hash: SeqHash | None
    local_hash: LocalHash
    token_ids: Sequence[int] | None


@dataclass(slots=True)
class OffloadItem:
    """One evicted G1 block to copy to G2."""

    plh: Plh
    meta: BlockMeta


@dataclass(frozen=True, slots=True)
class G2Stored:
    """A block finished copying into G2 (host-tier Stored, one block)."""

    meta: BlockMeta


@dataclass(frozen=True, slots=True)
class G2Removed:
    """G2 evicted a block (host-tier Removed, one block)."""

    seq_hash: SeqHash


G2Event = G2Stored | G2Removed


@dataclass(slots=True)
class OnboardPlan:
    """A pinned, contiguous G2 prefix of the requested PLHs, ready to copy into G1."""

    plhs: list[Plh]
    token: int = 0
    """Implementation-private handle (pin ledger key)."""

    @property
    def num_blocks(self) -> int:
        return len(self.plhs)


@dataclass(slots=True)
class SwapInHandle:
    """An onboarding transfer in flight. `completed` turns True at the modeled finish time."""

    transfer_id: int
    plan: OnboardPlan
    deadline_ms: float
    completed: bool = False
    metas: list[BlockMeta] = field(default_factory=list)
    """Metadata of the onboarded blocks, in order (filled by the engine)."""


class OffloadEngine(Protocol):
    """A host tier that G1 evictions are copied to and swap-ins are read from."""

    def enqueue_evictions(
        self, items: Sequence[OffloadItem], source_slots: Sequence[BlockId]
    ) -> list[BlockId]:
        """Start copying evicted blocks at the engine's current time.

        `source_slots[i]` is the quarantined G1 slot of `items[i]` (extra slots, if any, belong to
        the batch). Returns the slots whose block was filtered out (already in G2 or in flight, or
        no G2 capacity: a miss, never a stall); the caller frees those at once. The rest come back
        from `tick` when their copy completes.
        """

    def tick(self, now_ms: float) -> list[BlockId]:
        """Advance transfers to `now_ms`, register completed copies in G2, queue their events,
        and return the G1 source slots that are free again."""

    def take_events(self) -> list[G2Event]:
        """Drain host-tier events queued since the last call, in order."""

    def earliest_deadline_ms(self) -> float | None:
        """The earliest time at which some transfer of this rank completes, if any."""

    def prepare_onboard(self, plhs: Sequence[Plh]) -> OnboardPlan | None:
        """Pin the longest contiguous prefix of `plhs` held in G2; None when the first is absent."""

    def cancel_onboard(self, plan: OnboardPlan) -> None:
        """Unpin a prepared plan that will not be started."""

    def start_onboard(self, plan: OnboardPlan, now_ms: float) -> SwapInHandle:
        """Start the G2->G1 copy of a prepared plan."""

    def take_completed_onboards(self) -> list[SwapInHandle]:
        """Drain swap-ins completed by `tick`, in completion order (their G2 pins are released)."""

    def contains(self, plh: Plh) -> bool:
        """Whether G2 holds `plh` now (no pin, no touch)."""

    def close(self) -> None: ...
