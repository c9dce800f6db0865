"""shmkv: a KV-cache fleet simulator.

The pure core (block manager, sequences, hashing, events) is importable without numpy or zmq:

    from shmkv import KvManager, ActiveSequence, Use, Deref, Promote, FullBlock, PartialBlock
"""

from __future__ import annotations

# NOTE: first: importing _native selects the compiled (mypyc) core if current, else the sources.
from shmkv._native import core_mode
from shmkv.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, StorageTier
from shmkv.hashing import local_block_hashes, sequence_hashes
from shmkv.manager import KvManager, PrefillCost
from shmkv.sequence import ActiveSequence
from shmkv.signals import Deref, FullBlock, PartialBlock, Promote, Use

__version__ = "0.1.0"

__all__ = [
    "ActiveSequence",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "Deref",
    "EventBatch",
    "FullBlock",
    "KvManager",
    "PartialBlock",
    "PrefillCost",
    "Promote",
    "StorageTier",
    "Use",
    "__version__",
    "core_mode",
    "local_block_hashes",
    "sequence_hashes",
]
