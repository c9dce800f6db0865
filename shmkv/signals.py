"""Layer 1: the block signals a request sends to a `KvManager` (seed `MoveBlock`).

`FullBlock` / `PartialBlock` name a block; `Use`, `Deref`, `Promote` act on them.
Internally a signal keeps full blocks as raw sequence-hash ints and partial blocks as
`PartialBlock` objects, so the hot path never builds one object per block; the `blocks`
property gives the seed-style view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shmkv.ids import LocalHash, PartialId, Plh, SeqHash


@dataclass(frozen=True, slots=True)
class FullBlock:
    seq_hash: SeqHash


class PartialBlock:
    """A block still being filled, named by its id. Immutable by convention, hashable by id.

    (A plain class rather than a frozen dataclass: compiled, a frozen dataclass's generated
    `__init__` runs interpreted, about 4x the cost; the scheduler builds one per block.)"""

    __slots__ = ("partial_id",)

    def __init__(self, partial_id: PartialId) -> None:
        self.partial_id = partial_id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PartialBlock):
            return NotImplemented
        return self.partial_id == other.partial_id

    def __hash__(self) -> int:
        return hash((PartialBlock, self.partial_id))

    def __repr__(self) -> str:
        return f"PartialBlock(partial_id={self.partial_id!r})"


UniqueBlock = FullBlock | PartialBlock
RawBlock = int | PartialBlock
"""Internal block form: a full block is its sequence-hash int."""


def to_raw(block: UniqueBlock) -> RawBlock:
    if isinstance(block, FullBlock):
        return block.seq_hash
    return block


def from_raw(block: RawBlock) -> UniqueBlock:
    if isinstance(block, int):
        return FullBlock(block)
    return block


class Use:
    """Acquire blocks for a request: hits bump refcounts, misses allocate and register.

    Args:
        blocks: the blocks, in sequence order.
        local_hashes: empty, or one local hash per full block.
        plhs: one positional lineage hash per full block.
        token_ids: None, or one token list per full block.
        parent: the full block just before `blocks[0]` in the sequence, if any.

    `lineage_start` (set by `from_raw`) is the sequence position of the first full block when
    the sender vouches that every full block's PLH is `make_plh(its hash, the hash of the full
    block before it (`parent` for the first), lineage_start + its full index)`, else -1: the
    block manager then fills the Lineage fields of new blocks without decoding their PLHs.
    It is a hint about the other fields, not part of the signal's value (`==` ignores it).
    """

    __slots__ = (
        "lineage_start",
        "local_hashes",
        "num_full",
        "parent",
        "plhs",
        "raw_blocks",
        "token_ids",
    )

    def __init__(
        self,
        blocks: Sequence[UniqueBlock],
        local_hashes: Sequence[LocalHash] = (),
        plhs: Sequence[Plh] = (),
        token_ids: Sequence[Sequence[int]] | None = None,
        parent: UniqueBlock | None = None,
    ) -> None:
        raw = [to_raw(b) for b in blocks]
        self._init(raw, local_hashes, plhs, token_ids, parent, None)
        self.lineage_start = -1

    def _init(
        self,
        raw_blocks: list[RawBlock],
        local_hashes: Sequence[LocalHash],
        plhs: Sequence[Plh],
        token_ids: Sequence[Sequence[int]] | None,
        parent: UniqueBlock | None,
        num_full: int | None,
    ) -> None:
        self.raw_blocks = raw_blocks
        self.num_full = (
            sum(1 for b in raw_blocks if type(b) is int) if num_full is None else num_full
        )
        self.local_hashes = local_hashes
        self.plhs = plhs
        self.token_ids = token_ids
        self.parent = parent

    @classmethod
    def from_raw(
        cls,
        raw_blocks: list[RawBlock],
        local_hashes: Sequence[LocalHash],
        plhs: Sequence[Plh],
        token_ids: Sequence[Sequence[int]] | None,
        parent: UniqueBlock | None,
        num_full: int | None = None,
        lineage_start: int = -1,
    ) -> Use:
        """Build from internal blocks without conversion. `num_full`, when given, must be the
        number of int (full) blocks in `raw_blocks`: the caller vouches for it, as for
        `lineage_start` (see the class docstring)."""
        self = cls(())
        self._init(raw_blocks, local_hashes, plhs, token_ids, parent, num_full)
        self.lineage_start = lineage_start
        return self

    @property
    def blocks(self) -> list[UniqueBlock]:
        return [from_raw(b) for b in self.raw_blocks]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Use):
            return NotImplemented
        return (
            self.raw_blocks == other.raw_blocks
            and list(self.local_hashes) == list(other.local_hashes)
            and list(self.plhs) == list(other.plhs)
            and _opt_lists(self.token_ids) == _opt_lists(other.token_ids)
            and self.parent == other.parent
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Use(blocks={self.blocks!r}, local_hashes={list(self.local_hashes)!r}, "
            f"plhs=<{len(self.plhs)}>, token_ids={'None' if self.token_ids is None else len(self.token_ids)}, "
            f"parent={self.parent!r})"
        )


class Deref:
    """Release one handle per listed block (tail first for request frees). Never emits events."""

    __slots__ = ("raw_blocks",)

    def __init__(self, blocks: Sequence[UniqueBlock]) -> None:
        self.raw_blocks: list[RawBlock] = [to_raw(b) for b in blocks]

    @classmethod
    def from_raw(cls, raw_blocks: list[RawBlock]) -> Deref:
        self = cls(())
        self.raw_blocks = raw_blocks
        return self

    @property
    def blocks(self) -> list[UniqueBlock]:
        return [from_raw(b) for b in self.raw_blocks]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Deref):
            return NotImplemented
        return self.raw_blocks == other.raw_blocks

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Deref(blocks={self.blocks!r})"


class Promote:
    """Turn a held partial block into the full block `seq_hash` (decode crossed a boundary).

    Immutable by convention (a plain class for the same reason as `PartialBlock`).
    `lineage_position` is the block's sequence position when the sender vouches that `plh` is
    `make_plh(seq_hash, parent_hash, lineage_position)`, else -1 (see `Use`; `==` ignores it).
    """

    __slots__ = (
        "lineage_position",
        "local_hash",
        "parent_hash",
        "partial_id",
        "plh",
        "seq_hash",
        "token_ids",
    )

    def __init__(
        self,
        partial_id: PartialId,
        seq_hash: SeqHash,
        parent_hash: SeqHash | None,
        local_hash: LocalHash,
        plh: Plh,
        token_ids: Sequence[int] | None = None,
        lineage_position: int = -1,
    ) -> None:
        self.partial_id = partial_id
        self.seq_hash = seq_hash
        self.parent_hash = parent_hash
        self.local_hash = local_hash
        self.plh = plh
        self.token_ids = token_ids
        self.lineage_position = lineage_position

    def _fields(self) -> tuple[object, ...]:
        return (
            self.partial_id,
            self.seq_hash,
            self.parent_hash,
            self.local_hash,
            self.plh,
            self.token_ids,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Promote):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Promote(partial_id={self.partial_id!r}, seq_hash={self.seq_hash!r}, "
            f"parent_hash={self.parent_hash!r}, local_hash={self.local_hash!r}, "
            f"plh={self.plh!r}, token_ids={self.token_ids!r})"
        )


MoveBlock = Use | Deref | Promote


def _opt_lists(value: Sequence[Sequence[int]] | None) -> list[list[int]] | None:
    return None if value is None else [list(v) for v in value]
