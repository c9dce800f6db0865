"""Layer 1: KV events as plain data (`behavior.md` §6). No I/O, no encoding.

Every event carries what both wire codecs need: event id, DP rank, storage tier, and for stores
the parent hash, the sequence and local hash of each block and, when known, its token ids.
Events of one scheduler pass are grouped into an `EventBatch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from shmkv.ids import LocalHash, SeqHash


class StorageTier(StrEnum):
    """Where a block lives. Values are Dynamo's `storage_tier` names."""

    DEVICE = "device"
    """G1, vLLM medium `GPU`."""
    HOST_PINNED = "host_pinned"
    """G2, vLLM medium `CPU_TIER1`."""


@dataclass(slots=True, init=False)
class BlockStored:
    """A chain of newly cached full blocks; block i's parent is block i-1, block 0's is `parent_hash`.

    Not keyword-only (unlike the other events), as `BlockRemoved`: the block manager builds
    one per store on its hot path, and a positional call costs half a keyword call. The
    `__init__` is written out (`init=False`): compiled with mypyc, the one `dataclass` would
    generate runs interpreted (~2.5 k instructions a call), this one natively.
    """

    event_id: int
    dp_rank: int
    tier: StorageTier
    parent_hash: SeqHash | None
    block_hashes: Sequence[SeqHash]
    """Sequence hashes, one per block, in chain order."""
    tokens_hashes: Sequence[LocalHash]
    """Local hashes, one per block."""
    token_ids: Sequence[Sequence[int]] | None
    """One token list per block (each exactly block_size long), or None when unknown."""

    def __init__(
        self,
        event_id: int,
        dp_rank: int,
        tier: StorageTier,
        parent_hash: SeqHash | None,
        block_hashes: Sequence[SeqHash],
        tokens_hashes: Sequence[LocalHash],
        token_ids: Sequence[Sequence[int]] | None,
    ) -> None:
        self.event_id = event_id
        self.dp_rank = dp_rank
        self.tier = tier
        self.parent_hash = parent_hash
        self.block_hashes = block_hashes
        self.tokens_hashes = tokens_hashes
        self.token_ids = token_ids


@dataclass(slots=True, init=False)
class BlockRemoved:
    """Blocks no longer held in `tier`. Positional construction allowed, and `__init__`
    written out, as `BlockStored`."""

    event_id: int
    dp_rank: int
    tier: StorageTier
    block_hashes: Sequence[SeqHash]

    def __init__(
        self, event_id: int, dp_rank: int, tier: StorageTier, block_hashes: Sequence[SeqHash]
    ) -> None:
        self.event_id = event_id
        self.dp_rank = dp_rank
        self.tier = tier
        self.block_hashes = block_hashes


@dataclass(slots=True, kw_only=True)
class AllBlocksCleared:
    """Everything this rank announced, in every tier, is gone (restart or reset)."""

    event_id: int
    dp_rank: int


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True, kw_only=True)
class EventBatch:
    """The events of one scheduler pass of one rank, in order."""

    ts_s: float
    """Wall-clock epoch seconds (vLLM's `ts`)."""
    dp_rank: int
    events: Sequence[KvEvent]
