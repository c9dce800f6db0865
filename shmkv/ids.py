"""Layer 0 vocabulary: identifier aliases and project-wide constants.

Imports nothing from shmkv. Hashes are plain unsigned 64-bit Python ints; a positional lineage
hash (PLH) is a 128-bit Python int packed as described in `shmkv.hashing`.
"""

from __future__ import annotations

from typing import Final, TypeAlias

SeqHash: TypeAlias = int
"""Chained sequence hash of a full block (router `ExternalSequenceBlockHash`, `block_hash`)."""
LocalHash: TypeAlias = int
"""Position-independent hash of one block's tokens (router `LocalBlockHash`, `tokens_hash`)."""
Plh: TypeAlias = int
"""Positional lineage hash, a packed 128-bit int (see `shmkv.hashing.make_plh`)."""
BlockId: TypeAlias = int
"""Index of a physical block slot inside one pool, 0..capacity-1."""
PartialId: TypeAlias = int
"""Identity of a partial (not yet full) block; a random 128-bit int, like a UUID v4."""
RequestId: TypeAlias = int
DpRank: TypeAlias = int

XXH3_SEED: Final = 1337
"""Seed of every xxh3-64 hash; identical to Dynamo's router so hashes are bit-identical."""
U64_MASK: Final = (1 << 64) - 1
DEFAULT_BLOCK_SIZE: Final = 16
"""The engine's default block size (vLLM's). Dynamo's mocker defaults to 64 for vLLM."""
SEQUENCE_DEFAULT_BLOCK_SIZE: Final = 64
"""`ActiveSequence`'s block size when none is given, as in the seed."""
