"""Layer 1: the device-tier (G1) KV block manager of one DP rank (behavior.md §2, §4, §6, §8).

Physical slots 0..capacity-1 are partitioned at all times:

    reset (FIFO of free slot ids)            available
    inactive registered (eviction backend)   available, matchable, evictable
    active registered (>= 1 handle)          held
    partial (mutable, no identity)           held
    quarantined offload source slots         held until the G1->G2 copy settles
    reserved swap-in destinations            held until registered

`num_active_blocks = capacity - (reset + inactive)`.

A *registration* gives a slot a PLH identity plus the router metadata (sequence hash, parent
hash, local hash, token ids) needed for events and offload. It lives in `_registered` (keyed
by PLH) from registration until eviction. `_active_full` maps a sequence hash to the
registration it names and how many request-level handles that name holds.

Hot-path representation: a registration is a `_Block` (int fields; compiled with mypyc, a
native struct); its token ids (only kept when signals carry them) live in `_token_ids`. A block
is also the `_active_full` entry of its own name (its sequence hash), counting the handles under
that name; a hit on a registered block under another name (matching is by PLH) gets an *alias*
entry, a `_Block` whose `target` is the registration.

Events (when enabled) are appended to an internal list in emission order and drained with
`take_events()`. Bad input raises `SignalError` before any state changes.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeAlias

from shmkv.errors import ConfigError, InvariantError, SignalError
from shmkv.events import BlockRemoved, BlockStored, KvEvent, StorageTier
from shmkv.eviction import make_backend
from shmkv.eviction.lineage import (
    FAST_LINEAGE_END,
    FRAG_MASK,
    BoxedInt,
    LineageBackend,
    LineageEntry,
)
from shmkv.hashing import ACCEL_GET_ALL, ACCEL_MODE0_FRAGS, ACCEL_POP_ALL
from shmkv.ids import BlockId, LocalHash, PartialId, Plh, SeqHash
from shmkv.offload import (
    BlockMeta,
    G2Event,
    G2Stored,
    OffloadEngine,
    OffloadItem,
    SwapInHandle,
)
from shmkv.signals import Deref, FullBlock, MoveBlock, PartialBlock, Promote, RawBlock, Use

if TYPE_CHECKING:
    from shmkv.sequence import ActiveSequence

_DEVICE = StorageTier.DEVICE
_HOST = StorageTier.HOST_PINNED

_NO_PARENT: Final = -1
"""`_Block.parent` of a block without a parent (hashes are unsigned, so -1 is free)."""
_NO_SLOT: Final = -1
"""`_Block.slot` while a bulk store has not assigned the slot yet."""
# The C helpers of shmkv/_blockhash.c while the core runs compiled (else None: Python loops).
_MODE0_FRAGS: Final[Any] = ACCEL_MODE0_FRAGS
_POP_ALL: Final[Any] = ACCEL_POP_ALL
_GET_ALL: Final[Any] = ACCEL_GET_ALL


class _Block(LineageEntry):
    """A registered block, and the `_active_full` entry of its own name; or an alias entry.

    Its PLH (the `_registered` key) is the `LineageEntry` part, which the Lineage backend
    decodes once and keeps: the manager hands it the records themselves."""

    __slots__ = ("handles", "local", "parent", "refs", "seq", "slot", "target")

    def __init__(
        self,
        slot: BlockId,
        plh: BoxedInt,
        seq: BoxedInt,
        parent: BoxedInt,
        local: BoxedInt,
        handles: int,
    ) -> None:
        super().__init__(plh)
        self.slot = slot
        """The physical slot (BlockId) holding the block."""
        self.seq: BoxedInt = seq
        """Its sequence hash: the name this entry counts handles for."""
        self.parent: BoxedInt = parent
        """The parent's sequence hash, or `_NO_PARENT`."""
        self.local: BoxedInt = local
        """Its local hash (0 when the signal did not carry one)."""
        self.handles = handles
        """Request-level handles held under the name `seq` (0: not an active name)."""
        self.refs = handles
        """Handles from any source (every name and prefix pin); 0 = inactive."""
        self.target: _Block | None = None
        """None for a registration; for an alias entry, the registration it names."""


def _alias(name: SeqHash, rec: _Block) -> _Block:
    """A new alias entry: one handle under `name` on the registration `rec`."""
    alias = _Block(rec.slot, rec.plh, name, rec.parent, rec.local, 1)
    alias.target = rec
    return alias


def _drop_handle(entry: _Block, released: list[LineageEntry]) -> int:
    """A Deref lets go of one handle under `entry`'s name: its registration joins `released`
    when that was its last reference. Returns the handles left under the name (0: the name
    leaves `_active_full`)."""
    handles = entry.handles - 1
    entry.handles = handles
    rec = entry.target
    if rec is None:
        rec = entry
    refs = rec.refs - 1
    rec.refs = refs
    if not refs:
        released.append(rec)
    return handles


def _restore_handle(entry: _Block) -> None:
    """Undo `_drop_handle` (the caller puts the name back into `_active_full`)."""
    entry.handles += 1
    target = entry.target
    (entry if target is None else target).refs += 1


def _set_lineage(rec: _Block, position: int, parent: BoxedInt) -> None:
    """Fill in the Lineage fields of the new block `rec` at `position` (below
    `FAST_LINEAGE_END`) whose PLH the sender vouches is `make_plh(rec.seq, parent, position)`
    (`parent`: the parent's sequence hash; anything at position 0)."""
    mask: BoxedInt = FRAG_MASK
    rec.set_lineage(position, rec.seq & mask, parent & mask if position else 0)


def _parent_of(rec: _Block) -> SeqHash | None:
    parent = rec.parent
    return None if parent == _NO_PARENT else parent


_NO_BLOCK: Final = _Block(_NO_SLOT, _NO_PARENT, _NO_PARENT, _NO_PARENT, 0, 0)
"""A placeholder where a `_Block` list item must always hold one (never registered)."""

_Evicted: TypeAlias = tuple[_Block, Sequence[int] | None]
"""An evicted registration and its token ids, on its way to the offload engine."""


class PrefillCost:
    """What admitting a sequence would cost in G1 (G2 hits are not counted).

    Immutable by convention. (A plain class rather than a frozen dataclass: compiled, a frozen
    dataclass's generated `__init__` runs interpreted, and the scheduler builds one per
    admission check; see `signals.PartialBlock`.)"""

    __slots__ = (
        "active_cached_tokens",
        "cached_blocks",
        "cached_tokens",
        "new_blocks",
        "new_tokens",
    )

    def __init__(
        self,
        new_blocks: int,
        new_tokens: int,
        cached_tokens: int,
        active_cached_tokens: int,
        cached_blocks: int = 0,
    ) -> None:
        self.new_blocks = new_blocks
        self.new_tokens = new_tokens
        self.cached_tokens = cached_tokens
        self.active_cached_tokens = active_cached_tokens
        """Cached tokens backed by blocks that are active right now (no allocation needed)."""
        self.cached_blocks = cached_blocks
        """Leading full blocks present in G1, prompt or not (`cached_tokens` stops at the
        prompt): where a swap-in from G2 must start."""

    def _fields(self) -> tuple[int, int, int, int, int]:
        return (
            self.new_blocks,
            self.new_tokens,
            self.cached_tokens,
            self.active_cached_tokens,
            self.cached_blocks,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrefillCost):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((PrefillCost, self._fields()))

    def __repr__(self) -> str:
        return (
            f"PrefillCost(new_blocks={self.new_blocks}, new_tokens={self.new_tokens}, "
            f"cached_tokens={self.cached_tokens}, "
            f"active_cached_tokens={self.active_cached_tokens}, "
            f"cached_blocks={self.cached_blocks})"
        )


@dataclass(frozen=True, slots=True)
class SwapInBlock:
    """One block to register in G1 after a swap-in."""

    seq_hash: SeqHash
    plh: Plh
    local_hash: LocalHash
    token_ids: Sequence[int] | None


@dataclass(slots=True)
class SwapInScheduled:
    handle: SwapInHandle
    destination_slots: list[BlockId]


class SwapInNoHits:
    """Nothing in G2 (or no G1 room for it): fall back to a normal allocation."""


class SwapInBlocked:
    """Making room for the swap-in evicted G1 blocks that must be offloaded first: retry later."""


SWAP_IN_NO_HITS = SwapInNoHits()
SWAP_IN_BLOCKED = SwapInBlocked()
SwapInOutcome = SwapInScheduled | SwapInNoHits | SwapInBlocked


class KvManager:
    """G1 block manager of one DP rank.

    Args:
        max_capacity: number of physical G1 blocks (> 0).
        block_size: tokens per block (> 0).
        dp_rank: the rank whose events this manager stamps.
        eviction: `lineage` (default), `lru` or `multi-lru`.
        enable_events: record KV events (and consume event ids); off = no ids consumed.
    """

    def __init__(
        self,
        max_capacity: int,
        block_size: int,
        dp_rank: int = 0,
        eviction: str = "lineage",
        enable_events: bool = True,
    ) -> None:
        if max_capacity <= 0:
            raise ConfigError(f"max_capacity must be > 0, got {max_capacity}")
        if block_size <= 0:
            raise ConfigError(f"block_size must be > 0, got {block_size}")
        self.max_capacity = max_capacity
        self.block_size = block_size
        self.dp_rank = dp_rank
        self.eviction = eviction
        self._backend, self._tracker = make_backend(eviction, max_capacity)
        backend = self._backend
        self._lineage = backend if isinstance(backend, LineageBackend) else None
        """The backend again when it is Lineage: it takes the block records themselves."""
        self._reset: deque[BlockId] = deque(range(max_capacity))
        self._registered: dict[Plh, _Block] = {}
        self._token_ids: dict[Plh, Sequence[int]] = {}
        """Token ids of the registered blocks whose signals carried them."""
        self._active_full: dict[SeqHash, _Block] = {}
        """Active names: each name's registration, or an alias entry (see `_Block`)."""
        self._active_partial: dict[PartialId, BlockId] = {}
        self._spare_recs: list[_Block] = []
        """Records of blocks a bulk store or a lone partial block's allocation evicted (none
        still refers to them), recycled by the next bulk stores and Promotes."""
        self._num_full_refs = 0
        self._num_quarantined = 0
        self._num_reserved = 0
        self._events_enabled = enable_events
        self._events: list[KvEvent] = []
        self.next_event_id = 0
        self._offload: OffloadEngine | None = None
        self._prefix_pins: Counter[Plh] = Counter()
        self.last_use_blocked = False
        """True when the last Use stopped because its allocation started an offload batch."""

    # ── queries ───────────────────────────────────────────────────────────────────────────

    def num_active_blocks(self) -> int:
        return self.max_capacity - len(self._reset) - len(self._backend)

    def num_active_block_refs(self) -> int:
        return len(self._active_partial) + self._num_full_refs

    def num_inactive_blocks(self) -> int:
        return len(self._backend)

    def num_free_blocks(self) -> int:
        """Slots available to allocate right now (reset + evictable inactive)."""
        return len(self._reset) + len(self._backend)

    def get_active_perc(self) -> float:
        return self.num_active_blocks() / self.max_capacity

    def is_active(self, seq_hash: SeqHash) -> bool:
        return seq_hash in self._active_full

    def refcount(self, seq_hash: SeqHash) -> int:
        entry = self._active_full.get(seq_hash)
        return 0 if entry is None else entry.handles

    def has_partial(self, partial_id: PartialId) -> bool:
        return partial_id in self._active_partial

    def is_registered(self, plh: Plh) -> bool:
        return plh in self._registered

    def is_inactive(self, plh: Plh) -> bool:
        return plh in self._backend

    def registered_seq_hashes(self) -> list[SeqHash]:
        """Sequence hashes of every registered block (active or inactive): what a router
        should believe this rank holds in G1."""
        return [rec.seq for rec in self._registered.values()]

    def get_prefill_cost(self, sequence: ActiveSequence) -> PrefillCost:
        overlap = 0
        active_overlap = 0
        if sequence.enable_prefix_caching:
            active_full = self._active_full
            registered = self._registered
            seq_hashes: list[BoxedInt] = sequence.seq_hashes
            plhs: list[BoxedInt] = sequence.plhs  # one per sequence hash
            for i in range(len(seq_hashes)):
                seq_hash = seq_hashes[i]
                plh = plhs[i]
                if seq_hash in active_full:
                    active_overlap += 1
                else:
                    rec = registered.get(plh)
                    if rec is None:
                        break
                    if rec.refs > 0:
                        active_overlap += 1
                overlap += 1
        bs = self.block_size
        num_input = sequence.num_input_tokens
        cached = min(overlap * bs, num_input)
        return PrefillCost(
            sequence.num_unique_blocks - overlap,
            num_input - cached,
            cached,
            min(active_overlap * bs, num_input),
            overlap,
        )

    # ── events ────────────────────────────────────────────────────────────────────────────

    def take_events(self) -> list[KvEvent]:
        events = self._events
        self._events = []
        return events

    def _emit_stored(
        self,
        tier: StorageTier,
        parent_hash: SeqHash | None,
        block_hashes: list[SeqHash],
        tokens_hashes: list[LocalHash],
        token_ids: list[Sequence[int]] | None,
    ) -> None:
        if not self._events_enabled:
            return
        event_id = self.next_event_id
        self.next_event_id = event_id + 1
        self._events.append(
            BlockStored(
                event_id, self.dp_rank, tier, parent_hash, block_hashes, tokens_hashes, token_ids
            )
        )

    def _emit_removed(self, tier: StorageTier, block_hashes: list[SeqHash]) -> None:
        if not self._events_enabled or not block_hashes:
            return
        event_id = self.next_event_id
        self.next_event_id = event_id + 1
        self._events.append(BlockRemoved(event_id, self.dp_rank, tier, block_hashes))

    def _emit_g2_events(self, events: list[G2Event]) -> None:
        for event in events:
            if type(event) is G2Stored:
                meta = event.meta
                self._emit_stored(
                    _HOST,
                    meta.parent_hash,
                    [meta.seq_hash],
                    [meta.local_hash],
                    None if meta.token_ids is None else [meta.token_ids],
                )
            else:
                self._emit_removed(_HOST, [event.seq_hash])  # type: ignore[union-attr]

    # ── signals ───────────────────────────────────────────────────────────────────────────

    def process(self, signal: MoveBlock) -> int:
        """Apply a signal. Use returns how many blocks it processed (fewer = out of capacity,
        blocks before the failure stay held); Deref and Promote return 1."""
        if type(signal) is Use:
            blocks = signal.raw_blocks
            if (
                len(blocks) == 1
                and type(blocks[0]) is PartialBlock
                and self._offload is None
                and not signal.num_full
                and not signal.plhs
                and not signal.local_hashes
                and not signal.token_ids
                and signal.parent is None
            ):  # a decode step opening a new block: what `_check_use` would accept
                return self._use_partial(blocks[0])
            return self._use(signal)
        if type(signal) is Deref:
            self._deref(signal.raw_blocks)
            return 1
        if type(signal) is Promote:
            self._promote(signal)
            return 1
        raise SignalError(f"not a block signal: {signal!r}")

    def _check_use(self, signal: Use) -> None:
        num_full = signal.num_full
        if len(signal.plhs) != num_full:
            raise SignalError(f"Use: {len(signal.plhs)} PLHs for {num_full} full blocks")
        if signal.local_hashes and len(signal.local_hashes) != num_full:
            raise SignalError(
                f"Use: local_hashes must be empty or one per full block ({len(signal.local_hashes)} vs {num_full})"
            )
        token_ids = signal.token_ids
        if token_ids is not None:
            if len(token_ids) != num_full:
                raise SignalError(
                    f"Use: token_ids must be absent or one list per full block ({len(token_ids)} vs {num_full})"
                )
            bs = self.block_size
            for ids in token_ids:
                if len(ids) != bs:
                    raise SignalError(
                        f"Use: a block's token_ids must hold {bs} tokens, got {len(ids)}"
                    )
        if signal.parent is not None and type(signal.parent) is not FullBlock:
            raise SignalError("Use: the parent block cannot be a partial block")

    def _use(self, signal: Use) -> int:
        self._check_use(signal)
        blocks = signal.raw_blocks
        if len(blocks) == 1 and self._offload is None:
            only = blocks[0]
            if type(only) is PartialBlock:
                return self._use_partial(only)
        plhs = signal.plhs
        local_hashes = signal.local_hashes
        token_ids = signal.token_ids
        parent = signal.parent
        active_full = self._active_full
        registered = self._registered
        tracker = self._tracker
        reset = self._reset
        offload = self._offload
        token_map = self._token_ids

        prev = _NO_PARENT if parent is None else parent.seq_hash  # type: ignore[union-attr]
        num_hits = self._use_leading_hits(blocks, plhs)
        if num_hits:
            prev = blocks[num_hits - 1]
        # Runs of newly stored blocks, as (parent, first full index, end full index).
        runs: list[tuple[int, int, int]] = []
        run_start = -1
        run_parent = _NO_PARENT
        evicted: list[SeqHash] = []
        blocked: list[_Evicted] = []
        blocked_slots: list[BlockId] = []
        full_idx = num_hits
        processed = num_hits
        num_refs = num_hits
        try_bulk = offload is None and tracker is None and signal.num_full > 2
        # The position of full block 0, when the Lineage fields of new blocks can be filled in
        # from their hashes (see `_set_lineage`), else -1.
        lineage_start = signal.lineage_start if self._lineage is not None else -1
        for block in blocks[num_hits:] if num_hits else blocks:
            if type(block) is int:
                plh = plhs[full_idx]
                if not self._take_hit(block, plh):  # NewStore: take a slot
                    if try_bulk:  # only at the first miss: store the rest in one go?
                        try_bulk = False
                        stored = self._store_rest_in_bulk(signal, processed, full_idx, prev)
                        if stored is not None:
                            count, tail = stored
                            evicted += tail
                            num_refs += count
                            if run_start < 0:
                                run_start = full_idx
                                run_parent = prev
                            full_idx += count
                            processed += count
                            if processed < len(blocks):  # the trailing partial block
                                processed += self._use_tail_partial(blocks[-1], evicted)
                            break
                    if reset:
                        slot = reset.popleft()
                    else:
                        taken = self._evict_for_slot(
                            blocks,
                            processed + 1,
                            plhs,
                            full_idx + 1,
                            evicted,
                            blocked,
                            blocked_slots,
                        )
                        if taken is None:
                            break
                        slot = taken
                    local = local_hashes[full_idx] if local_hashes else 0
                    rec = _Block(slot, plh, block, prev, local, 1)
                    if 0 <= lineage_start < FAST_LINEAGE_END - full_idx:
                        _set_lineage(rec, lineage_start + full_idx, prev)
                    registered[plh] = rec
                    if token_ids is not None:
                        token_map[plh] = token_ids[full_idx]
                    if tracker is not None:
                        tracker.touch(plh)
                    active_full[block] = rec
                    num_refs += 1
                    if run_start < 0:
                        run_start = full_idx
                        run_parent = prev
                    full_idx += 1
                    prev = block
                    processed += 1
                    continue
                # A hit ends the current run of new blocks.
                num_refs += 1
                if run_start >= 0:
                    runs.append((run_parent, run_start, full_idx))
                    run_start = -1
                full_idx += 1
                prev = block
                processed += 1
            else:
                partial_id = block.partial_id  # type: ignore[union-attr]
                if partial_id not in self._active_partial:
                    if reset:
                        slot = reset.popleft()
                    else:
                        taken = self._evict_for_slot(
                            blocks, processed + 1, plhs, full_idx, evicted, blocked, blocked_slots
                        )
                        if taken is None:
                            break
                        slot = taken
                    self._active_partial[partial_id] = slot
                processed += 1
        if run_start >= 0:
            runs.append((run_parent, run_start, full_idx))
        self._num_full_refs += num_refs

        if self._events_enabled and (runs or evicted):
            self._emit_use_events(signal, runs, evicted)
        self.last_use_blocked = bool(blocked)
        if blocked:
            self._offload_evicted(blocked, blocked_slots)
        return processed

    def _use_leading_hits(self, blocks: list[RawBlock], plhs: Sequence[BoxedInt]) -> int:
        """Take one more handle on each leading full block already in G1, exactly as `_use`'s
        per-block loop would, and return how many: a block active under its name (a shared
        prompt prefix held by a request in flight) or a registered block (a cached prefix,
        maybe inactive: it leaves the eviction backend). No slot, no event, and no run of new
        blocks has started yet, so the loop's run bookkeeping is not needed."""
        plh_list: list[BoxedInt] = plhs if type(plhs) is list else list(plhs)
        num_hits = 0  # = the full index: every block before this one was a full block
        block: BoxedInt  # see `_deref`
        for block in blocks:
            if type(block) is PartialBlock or not self._take_hit(block, plh_list[num_hits]):
                break
            num_hits += 1
        return num_hits

    def _take_hit(self, block: BoxedInt, plh: BoxedInt) -> bool:
        """One more handle on full block `block` (PLH `plh`) if G1 holds it, for `_use` and
        `_use_leading_hits`: active under this name, or registered (a cached block, maybe
        inactive: it leaves the eviction backend). False on a miss, with nothing changed."""
        active_full = self._active_full
        entry = active_full.get(block)
        if entry is not None:  # hit on a block active under this name
            entry.handles += 1
            target = entry.target
            (entry if target is None else target).refs += 1
            return True
        found = self._registered.get(plh)
        if found is None:
            return False
        if not found.refs:
            self._reactivate(found)
        tracker = self._tracker
        if tracker is not None:
            tracker.touch(plh)
        found.refs += 1
        seq = found.seq
        if seq is block or seq == block:  # `is`: often the very same object
            found.handles = 1
            active_full[block] = found
        else:
            active_full[block] = _alias(block, found)
        return True

    def _release(self, rec: _Block) -> None:
        """Put the block `rec`, left without handles, into the eviction backend."""
        lineage = self._lineage
        if lineage is not None:
            lineage.insert_entries([rec])
        else:
            self._backend.insert(rec.plh)

    def _reactivate(self, rec: _Block) -> None:
        """Take the inactive block `rec` out of the eviction backend (it gains a handle)."""
        lineage = self._lineage
        if lineage is not None:
            lineage.remove_entry(rec)
        else:
            self._backend.remove(rec.plh)

    def _store_rest_in_bulk(
        self, signal: Use, start: int, full_idx: int, prev: BoxedInt
    ) -> tuple[int, list[SeqHash]] | None:
        """Register every full block of `signal` from `start` (full index `full_idx`) on as a
        new block, in one pass, when that is exactly what the per-block loop would do: none
        of them is held or registered, none repeats, G1 has room for all of them, and no
        offload engine or frequency tracker watches the allocations. At most one partial
        block may follow (left to the caller). Returns (blocks stored, sequence hashes
        evicted; only collected when events are on), or None to fall back to the per-block
        loop."""
        blocks = signal.raw_blocks
        count = signal.num_full - full_idx
        extra = len(blocks) - start - count
        if extra > 1 or (extra == 1 and type(blocks[-1]) is int):
            return None
        reset = self._reset
        backend = self._backend
        if len(reset) + len(backend) < count:
            return None
        # Lists of BoxedInt: compiled, the hashes pass through as the boxed ints they are.
        hashes: list[BoxedInt] = (
            blocks if not start and count == len(blocks) else blocks[start : start + count]
        )
        # The signal's own lists when the rest is all of them (read only here): no copies.
        all_plhs = signal.plhs
        plhs: list[BoxedInt] = (
            (all_plhs if not full_idx else all_plhs[full_idx:])
            if type(all_plhs) is list
            else list(all_plhs[full_idx:])
        )
        all_locals = signal.local_hashes
        local_hashes: list[BoxedInt] = (
            [0] * count
            if not all_locals
            else (all_locals if not full_idx else all_locals[full_idx:])
            if type(all_locals) is list
            else list(all_locals[full_idx:])
        )
        active_full = self._active_full
        registered = self._registered
        spare = self._spare_recs
        # The Lineage fields of the new blocks, from their hashes (see `_set_lineage`), when the
        # signal vouches for their positions and all of them lie below `FAST_LINEAGE_END`.
        position = signal.lineage_start + full_idx
        fill = (
            self._lineage is not None
            and signal.lineage_start >= 0
            and position + count <= FAST_LINEAGE_END
        )
        mask: BoxedInt = FRAG_MASK
        parent_frag: BoxedInt = 0 if not fill or not position else prev & mask
        mode0_frags: Any = _MODE0_FRAGS
        # the fragments of the new blocks in one C call, when the accelerator is there
        frags: list[BoxedInt] | None = (
            mode0_frags(hashes) if fill and mode0_frags is not None else None
        )
        # Optimistic: register as we go; a block held, registered or repeated undoes it all.
        new = [_NO_BLOCK] * count  # filled by index: a store costs less than an append
        parent = prev
        # The spare records are taken from the end, as `pop()` would, and cut off in one go.
        num_spare = len(spare)
        for i in range(count):
            seq_hash = hashes[i]
            plh = plhs[i]
            if num_spare:  # `_new_rec`, inlined (the hot loop of a request's prompt)
                num_spare -= 1
                rec = spare[num_spare]
                rec.slot = _NO_SLOT
                rec.seq = seq_hash
                rec.parent = parent
                rec.local = local_hashes[i]
                rec.handles = 1
                rec.refs = 1
                if fill:  # `set_lineage` below: no `set_plh` needed
                    rec.plh = plh
                else:
                    rec.set_plh(plh)
            else:
                rec = _Block(_NO_SLOT, plh, seq_hash, parent, local_hashes[i], 1)
            if fill:  # `set_lineage`, inlined
                frag: BoxedInt = seq_hash & mask if frags is None else frags[i]
                rec.lineage_position = position
                rec.lineage_frag = frag
                rec.lineage_parent_frag = parent_frag
                parent_frag = frag
                position += 1
            if active_full.setdefault(seq_hash, rec) is not rec:
                del spare[num_spare:]
                self._unstore(new[:i])
                return None
            if registered.setdefault(plh, rec) is not rec:
                del active_full[seq_hash]
                del spare[num_spare:]
                self._unstore(new[:i])
                return None
            new[i] = rec
            parent = seq_hash
        del spare[num_spare:]
        # Slots go straight into the new records, free ones first, in order.
        num_reset = min(count, len(reset))
        filled = 0
        if num_reset == len(reset):  # take every free slot (none, once the pool has filled)
            for slot in reset:
                new[filled].slot = slot
                filled += 1
            reset.clear()
        else:
            popleft = reset.popleft
            while filled < num_reset:
                new[filled].slot = popleft()
                filled += 1
        evicted: list[SeqHash] = []
        if num_reset < count:
            token_map = self._token_ids
            has_tokens = bool(token_map)
            report = self._events_enabled  # the evicted hashes only feed Removed events
            lineage = self._lineage
            num_victims = count - num_reset
            victims: list[BoxedInt] = (
                backend.evict_many(num_victims)
                if lineage is None
                else lineage.evict_many(num_victims)
            )
            pop_all: Any = _POP_ALL
            # every victim's record, unregistered in one C call when the accelerator is there
            vrecs: list[_Block] = (
                [registered.pop(victim) for victim in victims]
                if pop_all is None
                else pop_all(registered, victims)
            )
            for v in range(len(vrecs)):
                vrec = vrecs[v]
                new[filled].slot = vrec.slot
                filled += 1
                if report:
                    evicted.append(vrec.seq)
            spare.extend(vrecs)  # recycled, in eviction order
            if has_tokens:
                for victim in victims:
                    token_map.pop(victim, None)
        if filled != count:
            raise InvariantError(f"bulk store: {filled} slots for {count} blocks")
        if signal.token_ids is not None:
            self._token_ids.update(zip(plhs, signal.token_ids[full_idx:], strict=True))
        return count, evicted

    def _unstore(self, new: list[_Block]) -> None:
        """Unregister the blocks a bulk store registered before it gave up."""
        for rec in new:
            del self._active_full[rec.seq]
            del self._registered[rec.plh]

    def _use_tail_partial(self, block: RawBlock, evicted: list[SeqHash]) -> int:
        """The partial block ending a bulk-stored Use (no offload engine): 1 if held."""
        partial_id = block.partial_id  # type: ignore[union-attr]
        if partial_id not in self._active_partial:
            if self._reset:
                slot = self._reset.popleft()
            else:
                victim = self._backend.evict()
                if victim is None:
                    return 0
                rec, _ids = self._take_victim(victim)
                evicted.append(rec.seq)
                slot = rec.slot
            self._active_partial[partial_id] = slot
        return 1

    def use_partial(self, block: PartialBlock) -> int:
        """`process(Use([block]))` for a lone partial block (a decode step opening a new
        block), without building the signal: 1 when held, 0 when G1 is full. On a manager
        with an offload engine this goes through the general path."""
        if self._offload is not None:
            return self._use(Use.from_raw([block], (), (), None, None, 0))
        return self._use_partial(block)

    def _use_partial(self, block: PartialBlock) -> int:
        """`_use` of a lone partial block without an offload engine: the same outcome,
        without the general loop. A failure changes nothing."""
        self.last_use_blocked = False
        # Typed Any: compiled, the id (a u128) and the slot stay boxed (no int conversions).
        partial_id: BoxedInt = block.partial_id
        active_partial: dict[Any, Any] = self._active_partial
        if partial_id in active_partial:
            return 1
        reset: deque[Any] = self._reset
        if reset:
            active_partial[partial_id] = reset.popleft()
            return 1
        lineage = self._lineage
        victim: BoxedInt = self._backend.evict() if lineage is None else lineage.evict()
        if victim is None:
            return 0
        vrec = self._registered.pop(victim)
        if self._token_ids:
            self._token_ids.pop(victim, None)
        active_partial[partial_id] = vrec.slot
        if self._events_enabled:
            self._emit_removed(_DEVICE, [vrec.seq])
        self._spare_recs.append(vrec)  # nothing refers to it any more: recycled
        return 1

    def _emit_use_events(
        self, signal: Use, runs: list[tuple[int, int, int]], evicted: list[SeqHash]
    ) -> None:
        """Stored, one per run of new blocks anchored to the block before it, then Removed."""
        blocks = signal.raw_blocks
        full_hashes: list[SeqHash] = (
            blocks  # type: ignore[assignment]
            if signal.num_full == len(blocks)
            else [b for b in blocks if isinstance(b, int)]
        )
        local_hashes = signal.local_hashes
        token_ids = signal.token_ids
        for run_parent, start, end in runs:
            if local_hashes:
                run_locals = local_hashes[start:end]
                if type(run_locals) is not list:
                    run_locals = list(run_locals)
            else:
                run_locals = [0] * (end - start)
            self._emit_stored(
                _DEVICE,
                None if run_parent == _NO_PARENT else run_parent,
                full_hashes[start:end],
                run_locals,
                None if token_ids is None else list(token_ids[start:end]),
            )
        if evicted:
            # A block evicted to make room and stored again later in this same Use was just
            # re-announced by a Stored above: reporting it Removed would lose it at the router.
            # Every block this Use stored holds a handle under its name now, so unless an
            # evicted hash is an active name, none of them was stored again.
            if runs and not self._active_full.keys().isdisjoint(evicted):
                stored = {h for _, start, end in runs for h in full_hashes[start:end]}
                evicted = [h for h in evicted if h not in stored]
            self._emit_removed(_DEVICE, evicted)

    def _pending_allocations(
        self, blocks: list[RawBlock], start: int, plhs: Sequence[Plh], full_idx: int
    ) -> int:
        """How many more slots the rest of a Use would need (blocks not already in G1)."""
        count = 0
        for block in blocks[start:]:
            if type(block) is int:
                plh = plhs[full_idx]
                full_idx += 1
                if block not in self._active_full and plh not in self._registered:
                    count += 1
            elif block.partial_id not in self._active_partial:  # type: ignore[union-attr]
                count += 1
        return count

    def _evict_for_slot(
        self,
        blocks: list[RawBlock],
        next_start: int,
        plhs: Sequence[Plh],
        next_full_idx: int,
        evicted: list[SeqHash],
        blocked: list[_Evicted],
        blocked_slots: list[BlockId],
    ) -> BlockId | None:
        """No free slot for the Use's block: evict one. Returns the freed slot, or None when
        the Use stops at this block: nothing is evictable, or an offload engine must copy the
        victims to G2 first (then one batch is evicted for everything the rest of the Use
        still needs, from `next_start` / `next_full_idx` on, and the Use is blocked)."""
        victim = self._backend.evict()
        if victim is None:
            return None
        taken = self._take_victim(victim)
        rec = taken[0]
        if self._offload is not None:
            blocked.append(taken)
            blocked_slots.append(rec.slot)
            pending = self._pending_allocations(blocks, next_start, plhs, next_full_idx)
            self._extend_blocked_batch(blocked, blocked_slots, 1 + pending)
            return None
        evicted.append(rec.seq)
        return rec.slot

    def _take_victim(self, victim: Plh) -> _Evicted:
        """Unregister an evicted block; returns its record and token ids."""
        rec = self._registered.pop(victim)
        return rec, self._token_ids.pop(victim, None) if self._token_ids else None

    def _extend_blocked_batch(
        self, evicted: list[_Evicted], slots: list[BlockId], max_slots: int
    ) -> None:
        """Keep evicting while allocations evict, so one offload batch covers the whole need."""
        while len(slots) < max_slots:
            if self._reset:
                return
            victim = self._backend.evict()
            if victim is None:
                return
            taken = self._take_victim(victim)
            evicted.append(taken)
            slots.append(taken[0].slot)

    def _offload_evicted(self, evicted: list[_Evicted], slots: list[BlockId]) -> None:
        """Hand evicted blocks and their quarantined slots to the offload engine, then publish
        Device Removed and whatever host-tier events the engine queued."""
        offload = self._offload
        assert offload is not None
        items = [
            OffloadItem(rec.plh, BlockMeta(rec.seq, _parent_of(rec), rec.local, token_ids))
            for rec, token_ids in evicted
        ]
        self._num_quarantined += len(slots)
        released = offload.enqueue_evictions(items, slots)
        self._release_quarantined(released)
        self._emit_removed(_DEVICE, [rec.seq for rec, _ in evicted])
        self._emit_g2_events(offload.take_events())

    def _release_quarantined(self, slots: Sequence[BlockId]) -> None:
        if not slots:
            return
        self._num_quarantined -= len(slots)
        if self._num_quarantined < 0:
            raise InvariantError("offload engine released more source slots than it held")
        self._reset.extend(slots)

    def _check_deref_counted(self, blocks: list[RawBlock]) -> None:
        """Deref validation when blocks repeat: each name must hold that many handles."""
        counts = Counter(blocks)
        for block in blocks:
            if type(block) is int:
                entry = self._active_full.get(block)
                if entry is None or entry.handles < counts[block]:
                    raise SignalError(f"Deref: full block {block:#x} is not held")
            else:
                partial_id = block.partial_id  # type: ignore[union-attr]
                if partial_id not in self._active_partial or counts[block] > 1:
                    raise SignalError(f"Deref: partial block {partial_id:#x} is not held")

    def _check_deref_in_order(self, blocks: list[RawBlock]) -> None:
        """Deref validation block by block, raising for the first block that is not held."""
        for block in blocks:
            if type(block) is int:
                if block not in self._active_full:
                    raise SignalError(f"Deref: full block {block:#x} is not held")
            elif block.partial_id not in self._active_partial:  # type: ignore[union-attr]
                raise SignalError(
                    f"Deref: partial block {block.partial_id:#x} is not held"  # type: ignore[union-attr]
                )

    def _deref(self, blocks: list[RawBlock]) -> None:
        pop_all: Any = _POP_ALL
        if pop_all is not None:
            # Every full block's entry in one C call, when each of their names is held: taken
            # out of `active_full` (once in this Deref), or only looked up when a shared prefix
            # keeps most of the names (`_prefers_lookups`). `_deref_found` goes on from there.
            get_all: Any = _GET_ALL
            looked_up = self._prefers_lookups(blocks)
            found: list[_Block | None] | None = (
                get_all(self._active_full, blocks)
                if looked_up
                else pop_all(self._active_full, blocks)
            )
            if found is not None:
                self._deref_found(blocks, found, looked_up)
                return
        active_full = self._active_full
        released: list[LineageEntry] = []  # blocks going inactive, in Deref order
        taken: list[_Block] = []  # the entry of each full block, in order (to undo)
        partials: list[PartialBlock] = []
        # Typed BoxedInt (and tested for the partial type, so that it is not narrowed to
        # `int`): compiled, a full block's u64 hash stays the boxed int the dict needs.
        block: BoxedInt
        # Optimistic: release handle by handle; a block not held undoes it all, then raises.
        for block in blocks:
            if type(block) is PartialBlock:
                partials.append(block)
                continue
            entry = active_full.get(block)
            if entry is None:
                self._undo_deref(taken)
                self._raise_deref_error(blocks)
            if not _drop_handle(entry, released):
                del active_full[block]
            taken.append(entry)
        if partials and not self._partials_held(partials):
            self._undo_deref(taken)
            self._raise_deref_error(blocks)
        self._finish_deref(partials, len(taken), released)

    def _prefers_lookups(self, blocks: list[RawBlock]) -> bool:
        """Whether `_deref` should look the names of `blocks` up rather than take them all
        out and put back those still held: the block 30% of the way into the request (Derefs
        go tail first) is a name other handles hold too, so (prompt prefixes are shared from
        the first block on) about 30% of the names or more outlive this Deref, past which the
        lookups cost less (callgrind). Either way ends in the same state and errors."""
        if not blocks or self._num_full_refs == len(self._active_full):
            return False  # (as many handles as names: no name has two)
        probe: BoxedInt = blocks[len(blocks) * 7 // 10]
        if type(probe) is not int:
            return False
        entry = self._active_full.get(probe)
        return entry is not None and entry.handles > 1

    def _deref_found(
        self, blocks: list[RawBlock], found: list[_Block | None], looked_up: bool
    ) -> None:
        """`_deref` once the entry of each full block of `blocks` is at hand (`found`: one per
        block, None for a partial one): taken out of `_active_full` by `pop_all` (the names
        still held after this Deref go back in), or only looked up (`looked_up`: the names
        left without handles go out)."""
        active_full = self._active_full
        released: list[LineageEntry] = []
        partials: list[PartialBlock] = []
        block: BoxedInt  # see `_deref`
        i = 0
        repeated = False
        try:
            for i in range(len(blocks)):
                block = blocks[i]  # compiled: TypeError for a stray object (then undone)
                if type(block) is PartialBlock:
                    partials.append(block)
                    continue
                entry = found[i]
                if entry is None:  # neither an int nor a partial block
                    raise SignalError(f"Deref: {block!r} is not a block")
                if looked_up and not entry.handles:  # a name that went earlier in this Deref
                    repeated = True
                    break
                if _drop_handle(entry, released):  # still held under this name
                    if not looked_up:
                        active_full[block] = entry
                elif looked_up:
                    del active_full[block]
        except (SignalError, TypeError):
            self._undo_found(found, i)  # the blocks before `i` were released
            raise
        if repeated or (partials and not self._partials_held(partials)):
            self._undo_found(found, i if repeated else len(found))
            self._raise_deref_error(blocks)
        self._finish_deref(partials, len(blocks) - len(partials), released)

    def _undo_found(self, found: list[_Block | None], num_released: int) -> None:
        """Undo a `_deref_found` that released the handles of the entries before index
        `num_released` of `found`: every entry is back in `_active_full`, as it was."""
        active_full = self._active_full
        for i in range(len(found)):
            entry = found[i]
            if entry is None:
                continue
            if i < num_released:
                _restore_handle(entry)
            active_full[entry.seq] = entry  # a full block's name is its entry's `seq`

    def _partials_held(self, partials: list[PartialBlock]) -> bool:
        """Whether a Deref may release its partial blocks: each held, none repeated."""
        if len(partials) == 1:  # a request's Deref: no set to build
            return partials[0].partial_id in self._active_partial
        ids = {block.partial_id for block in partials}
        return len(ids) == len(partials) and ids <= self._active_partial.keys()

    def _finish_deref(
        self, partials: list[PartialBlock], num_full: int, released: list[LineageEntry]
    ) -> None:
        """The end of a Deref (checked) whose `num_full` full blocks let go of their handles:
        release its partial blocks and the blocks left without handles (`released`)."""
        self._num_full_refs -= num_full
        if released:
            lineage = self._lineage
            if lineage is not None:
                lineage.insert_entries(released)
            else:
                self._backend.insert_many([rec.plh for rec in released])
        active_partial = self._active_partial
        for block in partials:
            self._reset.append(active_partial.pop(block.partial_id))

    def _undo_deref(self, taken: list[_Block]) -> None:
        """Give back the handles a failing Deref released (`taken`, in Deref order)."""
        active_full = self._active_full
        for entry in reversed(taken):
            _restore_handle(entry)
            active_full[entry.seq] = entry  # back in, if its last handle had removed it

    def _raise_deref_error(self, blocks: list[RawBlock]) -> NoReturn:
        """Raise the SignalError of a Deref that cannot apply (nothing has changed)."""
        if len(set(blocks)) != len(blocks):
            self._check_deref_counted(blocks)
        self._check_deref_in_order(blocks)
        raise InvariantError("Deref failed, yet every block is held")

    def _promote(self, signal: Promote) -> None:
        self.promote_block(
            signal.partial_id,
            signal.seq_hash,
            signal.parent_hash,
            signal.local_hash,
            signal.plh,
            signal.token_ids,
            signal.lineage_position,
        )

    def promote_block(
        self,
        partial_id: BoxedInt,
        seq_hash: BoxedInt,
        parent_hash: SeqHash | None,
        local_hash: BoxedInt,
        plh: BoxedInt,
        token_ids: Sequence[int] | None = None,
        lineage_position: int = -1,
    ) -> None:
        """`process(Promote(partial_id, seq_hash, parent_hash, local_hash, plh, token_ids,
        lineage_position))` without building the signal (a decode crossing's path). A failure
        changes nothing."""
        active_partial = self._active_partial
        if token_ids is None:  # one lookup takes the slot out (nothing else can fail)
            slot = active_partial.pop(partial_id, None)
            if slot is None:
                raise SignalError(f"Promote: partial block {partial_id:#x} not found")
        else:
            slot = active_partial.get(partial_id)
            if slot is None:
                raise SignalError(f"Promote: partial block {partial_id:#x} not found")
            if len(token_ids) != self.block_size:
                raise SignalError(
                    f"Promote: token_ids must hold {self.block_size} tokens, got {len(token_ids)}"
                )
            del active_partial[partial_id]
        parent: BoxedInt = _NO_PARENT if parent_hash is None else parent_hash
        spare = self._spare_recs
        rec = self._new_rec(slot, plh, seq_hash, parent, local_hash, 1)
        # One lookup for the check and the store: `rec` is the name's entry if it is new.
        entry = self._active_full.setdefault(seq_hash, rec)
        if entry is not rec:  # the name is held already: one more handle, the slot goes back
            spare.append(rec)
            self._reset.append(slot)
            entry.handles += 1
            target = entry.target
            (entry if target is None else target).refs += 1
            self._num_full_refs += 1
            return
        tracker = self._tracker
        found = self._registered.setdefault(plh, rec)  # one lookup for the check and the store
        if found is rec:  # a new block
            if self._lineage is not None and 0 <= lineage_position < FAST_LINEAGE_END:
                _set_lineage(rec, lineage_position, parent)
            if token_ids is not None:
                self._token_ids[plh] = token_ids
            if tracker is not None:
                tracker.touch(plh)
            if self._events_enabled:
                self._emit_stored(
                    _DEVICE,
                    parent_hash,
                    [seq_hash],
                    [local_hash],
                    None if token_ids is None else [token_ids],
                )
        else:  # registered already (under this name or another): the slot goes back
            spare.append(rec)
            self._reset.append(slot)
            if not found.refs:
                self._reactivate(found)
            if tracker is not None:
                tracker.touch(plh)
            found.refs += 1
            if found.seq == seq_hash:
                found.handles = 1
                self._active_full[seq_hash] = found
            else:
                self._active_full[seq_hash] = _alias(seq_hash, found)
        self._num_full_refs += 1

    def _new_rec(
        self,
        slot: BlockId,
        plh: BoxedInt,
        seq: BoxedInt,
        parent: BoxedInt,
        local: BoxedInt,
        handles: int,
    ) -> _Block:
        """A registration record holding `handles` handles under its own name, not registered
        yet: an evicted block's record recycled (see `_spare_recs`), else a new one."""
        spare = self._spare_recs
        if not spare:
            return _Block(slot, plh, seq, parent, local, handles)
        rec = spare.pop()
        rec.set_plh(plh)
        rec.slot = slot
        rec.seq = seq
        rec.parent = parent
        rec.local = local
        rec.handles = handles
        rec.refs = handles
        return rec

    # ── offload engine (G2) ───────────────────────────────────────────────────────────────

    def attach_offload_engine(self, engine: OffloadEngine) -> None:
        self._offload = engine

    def has_offload_engine(self) -> bool:
        return self._offload is not None

    @property
    def offload_engine(self) -> OffloadEngine | None:
        return self._offload

    def tick_offload_engine(self, now_ms: float) -> None:
        """Advance transfers; free settled source slots; publish queued host-tier events."""
        engine = self._offload
        if engine is None:
            return
        self._release_quarantined(engine.tick(now_ms))
        self._emit_g2_events(engine.take_events())

    def earliest_offload_deadline(self) -> float | None:
        return None if self._offload is None else self._offload.earliest_deadline_ms()

    @property
    def num_quarantined_blocks(self) -> int:
        return self._num_quarantined

    def reserve_swap_in_destination_slots(self, count: int) -> list[BlockId] | SwapInBlocked | None:
        """Reserve `count` G1 slots for a swap-in; None when G1 cannot hold them.

        With an offload engine, any allocation that evicts starts an offload batch instead and
        the reservation is abandoned (SWAP_IN_BLOCKED: retry after the copy settles).
        """
        slots: list[BlockId] = []
        evicted: list[SeqHash] = []
        while len(slots) < count:
            if self._reset:
                slots.append(self._reset.popleft())
                continue
            victim = self._backend.evict()
            if victim is None:
                self._reset.extend(slots)
                self._emit_removed(_DEVICE, evicted)
                return None
            taken = self._take_victim(victim)
            if self._offload is not None:
                blocked = [taken]
                blocked_slots = [taken[0].slot]
                self._extend_blocked_batch(blocked, blocked_slots, 1 + count - len(slots))
                self._reset.extend(slots)
                self._emit_removed(_DEVICE, evicted)
                self._offload_evicted(blocked, blocked_slots)
                return SWAP_IN_BLOCKED
            evicted.append(taken[0].seq)
            slots.append(taken[0].slot)
        self._emit_removed(_DEVICE, evicted)
        self._num_reserved += len(slots)
        return slots

    def release_reserved_slots(self, slots: Sequence[BlockId]) -> None:
        self._num_reserved -= len(slots)
        self._reset.extend(slots)

    def try_batch_swap_in(self, remaining_plhs: Sequence[Plh], now_ms: float) -> SwapInOutcome:
        """Start onboarding the longest contiguous G2 prefix of `remaining_plhs` into G1."""
        engine = self._offload
        if engine is None or not remaining_plhs:
            return SWAP_IN_NO_HITS
        plan = engine.prepare_onboard(remaining_plhs)
        if plan is None:
            return SWAP_IN_NO_HITS
        reserved = self.reserve_swap_in_destination_slots(plan.num_blocks)
        if not isinstance(reserved, list):
            engine.cancel_onboard(plan)
            return SWAP_IN_BLOCKED if reserved is SWAP_IN_BLOCKED else SWAP_IN_NO_HITS
        return SwapInScheduled(engine.start_onboard(plan, now_ms), reserved)

    def register_swapped_in_blocks(
        self,
        entries: Sequence[SwapInBlock],
        initial_parent_hash: SeqHash | None,
        destination_slots: list[BlockId],
        lineage_start: int = -1,
    ) -> int:
        """Register onboarded blocks into the reserved slots, straight to the inactive pool.

        Blocks already in G1 release their slot and become the next anchor. Device Stored
        events go out in contiguous runs, the first anchored at `initial_parent_hash`.
        `lineage_start`: the position of the first entry when the caller vouches that entry
        k's PLH is `make_plh(its hash, the previous entry's (initial_parent_hash for the
        first), lineage_start + k)`, else -1 (see `Use.lineage_start`).
        Returns how many entries were consumed.
        """
        if self._lineage is None:
            lineage_start = -1
        if len(destination_slots) < len(entries):
            raise SignalError(
                f"swap-in: {len(entries)} blocks but only {len(destination_slots)} reserved slots"
            )
        run_parent = initial_parent_hash
        prev_hash = initial_parent_hash
        run_hashes: list[SeqHash] = []
        run_locals: list[LocalHash] = []
        run_tokens: list[Sequence[int]] = []

        def flush() -> None:
            if run_hashes:
                tokens = list(run_tokens) if len(run_tokens) == len(run_hashes) else None
                self._emit_stored(_DEVICE, run_parent, list(run_hashes), list(run_locals), tokens)
                run_hashes.clear()
                run_locals.clear()
                run_tokens.clear()

        consumed = 0
        for entry, slot in zip(entries, destination_slots, strict=False):
            self._num_reserved -= 1
            if entry.seq_hash in self._active_full or entry.plh in self._registered:
                self._reset.append(slot)
                flush()
                run_parent = entry.seq_hash
            else:
                rec = _Block(
                    slot,
                    entry.plh,
                    entry.seq_hash,
                    _NO_PARENT if prev_hash is None else prev_hash,
                    entry.local_hash,
                    0,
                )
                if 0 <= lineage_start < FAST_LINEAGE_END - consumed:
                    _set_lineage(rec, lineage_start + consumed, rec.parent)
                self._registered[entry.plh] = rec
                if entry.token_ids is not None:
                    self._token_ids[entry.plh] = entry.token_ids
                if self._tracker is not None:
                    self._tracker.touch(entry.plh)
                self._release(rec)
                run_hashes.append(entry.seq_hash)
                run_locals.append(entry.local_hash)
                if entry.token_ids is not None:
                    run_tokens.append(entry.token_ids)
            prev_hash = entry.seq_hash
            consumed += 1
        flush()
        leftover = destination_slots[consumed:]
        if leftover:
            self.release_reserved_slots(leftover)
        return consumed

    def try_pin_g1_prefix(self, prefix_plhs: Sequence[Plh]) -> list[Plh] | None:
        """Hold every block of a G1 prefix (all must be registered) so it cannot be evicted."""
        recs = [self._registered.get(plh) for plh in prefix_plhs]
        if any(rec is None for rec in recs):
            return None
        for rec in recs:
            assert rec is not None
            if rec.refs == 0:
                self._reactivate(rec)
            rec.refs += 1
            self._prefix_pins[rec.plh] += 1
        return list(prefix_plhs)

    def unpin_g1_prefix(self, pinned_plhs: Sequence[Plh]) -> None:
        needed = Counter(pinned_plhs)
        for plh, count in needed.items():
            if self._prefix_pins[plh] < count:
                raise SignalError(f"unpin: block {plh:#x} is not pinned")
        for plh in pinned_plhs:
            rec = self._registered[plh]
            self._prefix_pins[plh] -= 1
            if not self._prefix_pins[plh]:
                del self._prefix_pins[plh]
            rec.refs -= 1
            if rec.refs == 0:
                self._release(rec)

    # ── invariants ────────────────────────────────────────────────────────────────────────

    def check_invariants(self) -> None:
        """Raise InvariantError unless every structure agrees (tests call this after each step)."""
        registered_ids = [rec.slot for rec in self._registered.values()]
        held = (
            len(self._reset)
            + len(registered_ids)
            + len(self._active_partial)
            + self._num_quarantined
            + self._num_reserved
        )
        if held != self.max_capacity:
            raise InvariantError(
                f"pools hold {held} slots, capacity {self.max_capacity} "
                f"(reset {len(self._reset)}, registered {len(registered_ids)}, "
                f"partial {len(self._active_partial)}, quarantined {self._num_quarantined}, "
                f"reserved {self._num_reserved})"
            )
        visible = list(self._reset) + registered_ids + list(self._active_partial.values())
        if len(set(visible)) != len(visible):
            raise InvariantError("a slot is in two pools at once")
        handles_by_rec: Counter[int] = Counter()
        for seq_hash, entry in self._active_full.items():
            handles = entry.handles
            if handles <= 0:
                raise InvariantError(f"active entry {seq_hash:#x} with {handles} handles")
            rec = entry if entry.target is None else entry.target
            if entry.seq != seq_hash or (entry.target is None) != (rec.seq == seq_hash):
                raise InvariantError(f"active entry {seq_hash:#x} is malformed")
            if self._registered.get(rec.plh) is not rec:
                raise InvariantError(f"active entry {seq_hash:#x} names an unregistered block")
            handles_by_rec[id(rec)] += handles
        if sum(handles_by_rec.values()) != self._num_full_refs:
            raise InvariantError("num_full_refs disagrees with the active entries")
        num_inactive = 0
        for plh, rec in self._registered.items():
            if rec.plh != plh or rec.target is not None:
                raise InvariantError(f"registration keyed {plh:#x} is malformed")
            if rec.handles and self._active_full.get(rec.seq) is not rec:
                raise InvariantError(f"block {rec.seq:#x} counts handles under an inactive name")
            refs = rec.refs
            if refs < handles_by_rec[id(rec)]:
                raise InvariantError(f"block {rec.seq:#x} has fewer refs than handles")
            if (refs == 0) != (plh in self._backend):
                raise InvariantError(f"block {rec.seq:#x}: ref_cnt {refs} vs inactive pool")
            num_inactive += refs == 0
        if num_inactive != len(self._backend):
            raise InvariantError("the eviction backend holds blocks that are not registered")
        if not self._token_ids.keys() <= self._registered.keys():
            raise InvariantError("token ids are kept for blocks that are not registered")
        self._backend.check_invariants()


def partial_block(partial_id: PartialId) -> PartialBlock:
    """Convenience for tests and scripts."""
    return PartialBlock(partial_id)
