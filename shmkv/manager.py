"""Layer 1: the device-tier (G1) KV block manager of one DP rank (behavior.md §2, §4, §6, §8).

Physical slots 0..capacity-1 are partitioned at all times:

    reset (FIFO of free slot ids)            available
    inactive registered (eviction backend)   available, matchable, evictable
    active registered (>= 1 handle)          held
    partial (mutable, no identity)           held
    quarantined offload source slots         held until the G1->G2 copy settles
    reserved swap-in destinations            held until registered

`num_active_blocks = capacity - (reset + inactive)`.

A *registration* (`_Reg`) gives a slot a PLH identity plus the router metadata (sequence hash,
parent hash, local hash, token ids) needed for events and offload. It lives in `_registered`
(keyed by PLH) from registration until eviction. `_active_full` maps a sequence hash to the
registration it names and how many request-level handles that name holds.

Events (when enabled) are appended to an internal list in emission order and drained with
`take_events()`. Bad input raises `SignalError` before any state changes.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shmkv.errors import ConfigError, InvariantError, SignalError
from shmkv.events import BlockRemoved, BlockStored, KvEvent, StorageTier
from shmkv.eviction import make_backend
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


class _Reg:
    """A registered (identified) block in a slot. `ref_cnt` = handles from any source."""

    __slots__ = ("block_id", "local_hash", "parent_hash", "plh", "ref_cnt", "seq_hash", "token_ids")

    def __init__(
        self,
        block_id: BlockId,
        plh: Plh,
        seq_hash: SeqHash,
        parent_hash: SeqHash | None,
        local_hash: LocalHash,
        token_ids: Sequence[int] | None,
    ) -> None:
        self.block_id = block_id
        self.plh = plh
        self.seq_hash = seq_hash
        self.parent_hash = parent_hash
        self.local_hash = local_hash
        self.token_ids = token_ids
        self.ref_cnt = 0

    def meta(self) -> BlockMeta:
        return BlockMeta(self.seq_hash, self.parent_hash, self.local_hash, self.token_ids)


class _Entry:
    """`active_full[seq_hash]`: the registration and the number of handles under that name."""

    __slots__ = ("num_handles", "reg")

    def __init__(self, reg: _Reg, num_handles: int) -> None:
        self.reg = reg
        self.num_handles = num_handles


@dataclass(frozen=True, slots=True)
class PrefillCost:
    """What admitting a sequence would cost in G1 (G2 hits are not counted)."""

    new_blocks: int
    new_tokens: int
    cached_tokens: int
    active_cached_tokens: int
    """Cached tokens backed by blocks that are active right now (no allocation needed)."""
    cached_blocks: int = 0
    """Leading full blocks present in G1, prompt or not (`cached_tokens` stops at the prompt):
    where a swap-in from G2 must start."""


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
        self._reset: deque[BlockId] = deque(range(max_capacity))
        self._registered: dict[Plh, _Reg] = {}
        self._active_full: dict[SeqHash, _Entry] = {}
        self._active_partial: dict[PartialId, BlockId] = {}
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
        return 0 if entry is None else entry.num_handles

    def has_partial(self, partial_id: PartialId) -> bool:
        return partial_id in self._active_partial

    def is_registered(self, plh: Plh) -> bool:
        return plh in self._registered

    def is_inactive(self, plh: Plh) -> bool:
        return plh in self._backend

    def registered_seq_hashes(self) -> list[SeqHash]:
        """Sequence hashes of every registered block (active or inactive): what a router
        should believe this rank holds in G1."""
        return [reg.seq_hash for reg in self._registered.values()]

    def get_prefill_cost(self, sequence: ActiveSequence) -> PrefillCost:
        overlap = 0
        active_overlap = 0
        if sequence.enable_prefix_caching:
            active_full = self._active_full
            registered = self._registered
            for seq_hash, plh in zip(sequence.seq_hashes, sequence.plhs, strict=True):
                if seq_hash in active_full:
                    active_overlap += 1
                else:
                    reg = registered.get(plh)
                    if reg is None:
                        break
                    if reg.ref_cnt > 0:
                        active_overlap += 1
                overlap += 1
        bs = self.block_size
        num_input = sequence.num_input_tokens
        cached = min(overlap * bs, num_input)
        return PrefillCost(
            new_blocks=sequence.num_unique_blocks - overlap,
            new_tokens=num_input - cached,
            cached_tokens=cached,
            active_cached_tokens=min(active_overlap * bs, num_input),
            cached_blocks=overlap,
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
                event_id=event_id,
                dp_rank=self.dp_rank,
                tier=tier,
                parent_hash=parent_hash,
                block_hashes=block_hashes,
                tokens_hashes=tokens_hashes,
                token_ids=token_ids,
            )
        )

    def _emit_removed(self, tier: StorageTier, block_hashes: list[SeqHash]) -> None:
        if not self._events_enabled or not block_hashes:
            return
        event_id = self.next_event_id
        self.next_event_id = event_id + 1
        self._events.append(
            BlockRemoved(
                event_id=event_id, dp_rank=self.dp_rank, tier=tier, block_hashes=block_hashes
            )
        )

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
        plhs = signal.plhs
        local_hashes = signal.local_hashes
        token_ids = signal.token_ids
        parent = signal.parent
        active_full = self._active_full
        registered = self._registered
        backend = self._backend
        tracker = self._tracker
        reset = self._reset
        offload = self._offload
        events_on = self._events_enabled

        prev_hash: SeqHash | None = None if parent is None else parent.seq_hash  # type: ignore[union-attr]
        # Runs of newly stored blocks: (parent, hashes, local hashes, token ids).
        runs: list[
            tuple[SeqHash | None, list[SeqHash], list[LocalHash], list[Sequence[int]] | None]
        ] = []
        run_hashes: list[SeqHash] | None = None
        run_locals: list[LocalHash] = []
        run_tokens: list[Sequence[int]] | None = None
        evicted: list[_Reg] = []
        blocked_evicted: list[_Reg] = []
        blocked_slots: list[BlockId] = []
        full_idx = 0
        processed = 0
        for i, block in enumerate(blocks):
            if type(block) is int:
                entry = active_full.get(block)
                if entry is not None:
                    entry.num_handles += 1
                    entry.reg.ref_cnt += 1
                    self._num_full_refs += 1
                    full_idx += 1
                    run_hashes = None
                    prev_hash = block
                    processed += 1
                    continue
                plh = plhs[full_idx]
                reg = registered.get(plh)
                if reg is not None:
                    if reg.ref_cnt == 0:
                        backend.remove(plh)
                    if tracker is not None:
                        tracker.touch(plh)
                    reg.ref_cnt += 1
                    active_full[block] = _Entry(reg, 1)
                    self._num_full_refs += 1
                    full_idx += 1
                    run_hashes = None
                    prev_hash = block
                    processed += 1
                    continue
                # NewStore: take a slot.
                if reset:
                    slot = reset.popleft()
                else:
                    victim = backend.evict()
                    if victim is None:
                        break
                    vreg = registered.pop(victim)
                    if offload is not None:
                        blocked_evicted.append(vreg)
                        blocked_slots.append(vreg.block_id)
                        self._extend_blocked_batch(
                            blocked_evicted,
                            blocked_slots,
                            1 + self._pending_allocations(blocks, i + 1, plhs, full_idx + 1),
                        )
                        break
                    evicted.append(vreg)
                    slot = vreg.block_id
                local = local_hashes[full_idx] if local_hashes else 0
                ids = token_ids[full_idx] if token_ids is not None else None
                reg = _Reg(slot, plh, block, prev_hash, local, ids)
                reg.ref_cnt = 1
                registered[plh] = reg
                if tracker is not None:
                    tracker.touch(plh)
                active_full[block] = _Entry(reg, 1)
                self._num_full_refs += 1
                if events_on:
                    if run_hashes is None:
                        run_hashes = []
                        run_locals = []
                        run_tokens = [] if token_ids is not None else None
                        runs.append((prev_hash, run_hashes, run_locals, run_tokens))
                    run_hashes.append(block)
                    run_locals.append(local)
                    if run_tokens is not None and ids is not None:
                        run_tokens.append(ids)
                full_idx += 1
                prev_hash = block
                processed += 1
            else:
                partial_id = block.partial_id  # type: ignore[union-attr]
                if partial_id not in self._active_partial:
                    if reset:
                        slot = reset.popleft()
                    else:
                        victim = backend.evict()
                        if victim is None:
                            break
                        vreg = registered.pop(victim)
                        if offload is not None:
                            blocked_evicted.append(vreg)
                            blocked_slots.append(vreg.block_id)
                            self._extend_blocked_batch(
                                blocked_evicted,
                                blocked_slots,
                                1 + self._pending_allocations(blocks, i + 1, plhs, full_idx),
                            )
                            break
                        evicted.append(vreg)
                        slot = vreg.block_id
                    self._active_partial[partial_id] = slot
                processed += 1

        for run_parent, hashes, locals_, tokens in runs:
            self._emit_stored(_DEVICE, run_parent, hashes, locals_, tokens)
        if evicted:
            # A block evicted to make room and stored again later in this same Use was just
            # re-announced by a Stored above: reporting it Removed would lose it at the router.
            restored = {h for run in runs for h in run[1]} if runs else ()
            self._emit_removed(_DEVICE, [r.seq_hash for r in evicted if r.seq_hash not in restored])
        self.last_use_blocked = bool(blocked_evicted)
        if blocked_evicted:
            self._offload_evicted(blocked_evicted, blocked_slots)
        return processed

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

    def _extend_blocked_batch(
        self, evicted: list[_Reg], slots: list[BlockId], max_slots: int
    ) -> None:
        """Keep evicting while allocations evict, so one offload batch covers the whole need."""
        while len(slots) < max_slots:
            if self._reset:
                return
            victim = self._backend.evict()
            if victim is None:
                return
            reg = self._registered.pop(victim)
            evicted.append(reg)
            slots.append(reg.block_id)

    def _offload_evicted(self, evicted: list[_Reg], slots: list[BlockId]) -> None:
        """Hand evicted blocks and their quarantined slots to the offload engine, then publish
        Device Removed and whatever host-tier events the engine queued."""
        offload = self._offload
        assert offload is not None
        items = [OffloadItem(reg.plh, reg.meta()) for reg in evicted]
        self._num_quarantined += len(slots)
        released = offload.enqueue_evictions(items, slots)
        self._release_quarantined(released)
        self._emit_removed(_DEVICE, [reg.seq_hash for reg in evicted])
        self._emit_g2_events(offload.take_events())

    def _release_quarantined(self, slots: Sequence[BlockId]) -> None:
        if not slots:
            return
        self._num_quarantined -= len(slots)
        if self._num_quarantined < 0:
            raise InvariantError("offload engine released more source slots than it held")
        self._reset.extend(slots)

    def _check_deref(self, blocks: list[RawBlock]) -> None:
        counts = Counter(blocks) if len(blocks) > 1 else None
        for block in blocks:
            if type(block) is int:
                entry = self._active_full.get(block)
                need = 1 if counts is None else counts[block]
                if entry is None or entry.num_handles < need:
                    raise SignalError(f"Deref: full block {block:#x} is not held")
            else:
                partial_id = block.partial_id  # type: ignore[union-attr]
                if partial_id not in self._active_partial or (
                    counts is not None and counts[block] > 1
                ):
                    raise SignalError(f"Deref: partial block {partial_id:#x} is not held")

    def _deref(self, blocks: list[RawBlock]) -> None:
        self._check_deref(blocks)
        active_full = self._active_full
        backend = self._backend
        for block in blocks:
            if type(block) is int:
                entry = active_full[block]
                entry.num_handles -= 1
                self._num_full_refs -= 1
                if entry.num_handles == 0:
                    del active_full[block]
                reg = entry.reg
                reg.ref_cnt -= 1
                if reg.ref_cnt == 0:
                    backend.insert(reg.plh)
            else:
                self._reset.append(self._active_partial.pop(block.partial_id))  # type: ignore[union-attr]

    def _promote(self, signal: Promote) -> None:
        slot = self._active_partial.get(signal.partial_id)
        if slot is None:
            raise SignalError(f"Promote: partial block {signal.partial_id:#x} not found")
        if signal.token_ids is not None and len(signal.token_ids) != self.block_size:
            raise SignalError(
                f"Promote: token_ids must hold {self.block_size} tokens, got {len(signal.token_ids)}"
            )
        del self._active_partial[signal.partial_id]
        seq_hash = signal.seq_hash
        entry = self._active_full.get(seq_hash)
        if entry is not None:
            self._reset.append(slot)
            entry.num_handles += 1
            entry.reg.ref_cnt += 1
            self._num_full_refs += 1
            return
        plh = signal.plh
        reg = self._registered.get(plh)
        if reg is not None:
            self._reset.append(slot)
            if reg.ref_cnt == 0:
                self._backend.remove(plh)
            if self._tracker is not None:
                self._tracker.touch(plh)
        else:
            reg = _Reg(slot, plh, seq_hash, signal.parent_hash, signal.local_hash, signal.token_ids)
            self._registered[plh] = reg
            if self._tracker is not None:
                self._tracker.touch(plh)
            self._emit_stored(
                _DEVICE,
                signal.parent_hash,
                [seq_hash],
                [signal.local_hash],
                None if signal.token_ids is None else [signal.token_ids],
            )
        reg.ref_cnt += 1
        self._active_full[seq_hash] = _Entry(reg, 1)
        self._num_full_refs += 1

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
        evicted: list[_Reg] = []
        while len(slots) < count:
            if self._reset:
                slots.append(self._reset.popleft())
                continue
            victim = self._backend.evict()
            if victim is None:
                self._reset.extend(slots)
                if evicted:
                    self._emit_removed(_DEVICE, [r.seq_hash for r in evicted])
                return None
            reg = self._registered.pop(victim)
            if self._offload is not None:
                blocked = [reg]
                blocked_slots = [reg.block_id]
                self._extend_blocked_batch(blocked, blocked_slots, 1 + count - len(slots))
                self._reset.extend(slots)
                if evicted:
                    self._emit_removed(_DEVICE, [r.seq_hash for r in evicted])
                self._offload_evicted(blocked, blocked_slots)
                return SWAP_IN_BLOCKED
            evicted.append(reg)
            slots.append(reg.block_id)
        if evicted:
            self._emit_removed(_DEVICE, [r.seq_hash for r in evicted])
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
    ) -> int:
        """Register onboarded blocks into the reserved slots, straight to the inactive pool.

        Blocks already in G1 release their slot and become the next anchor. Device Stored
        events go out in contiguous runs, the first anchored at `initial_parent_hash`.
        Returns how many entries were consumed.
        """
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
                reg = _Reg(
                    slot, entry.plh, entry.seq_hash, prev_hash, entry.local_hash, entry.token_ids
                )
                self._registered[entry.plh] = reg
                if self._tracker is not None:
                    self._tracker.touch(entry.plh)
                self._backend.insert(entry.plh)
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
        regs = [self._registered.get(plh) for plh in prefix_plhs]
        if any(reg is None for reg in regs):
            return None
        for reg in regs:
            assert reg is not None
            if reg.ref_cnt == 0:
                self._backend.remove(reg.plh)
            reg.ref_cnt += 1
            self._prefix_pins[reg.plh] += 1
        return list(prefix_plhs)

    def unpin_g1_prefix(self, pinned_plhs: Sequence[Plh]) -> None:
        needed = Counter(pinned_plhs)
        for plh, count in needed.items():
            if self._prefix_pins[plh] < count:
                raise SignalError(f"unpin: block {plh:#x} is not pinned")
        for plh in pinned_plhs:
            reg = self._registered[plh]
            self._prefix_pins[plh] -= 1
            if not self._prefix_pins[plh]:
                del self._prefix_pins[plh]
            reg.ref_cnt -= 1
            if reg.ref_cnt == 0:
                self._backend.insert(plh)

    # ── invariants ────────────────────────────────────────────────────────────────────────

    def check_invariants(self) -> None:
        """Raise InvariantError unless every structure agrees (tests call this after each step)."""
        registered_ids = [reg.block_id for reg in self._registered.values()]
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
        handles_by_reg: Counter[int] = Counter()
        for seq_hash, entry in self._active_full.items():
            if entry.num_handles <= 0:
                raise InvariantError(f"active entry {seq_hash:#x} with {entry.num_handles} handles")
            if self._registered.get(entry.reg.plh) is not entry.reg:
                raise InvariantError(f"active entry {seq_hash:#x} names an unregistered block")
            handles_by_reg[id(entry.reg)] += entry.num_handles
        if sum(handles_by_reg.values()) != self._num_full_refs:
            raise InvariantError("num_full_refs disagrees with the active entries")
        num_inactive = 0
        for plh, reg in self._registered.items():
            if reg.plh != plh:
                raise InvariantError(f"registration keyed {plh:#x} holds PLH {reg.plh:#x}")
            if reg.ref_cnt < handles_by_reg[id(reg)]:
                raise InvariantError(f"block {reg.seq_hash:#x} has fewer refs than handles")
            if (reg.ref_cnt == 0) != (plh in self._backend):
                raise InvariantError(
                    f"block {reg.seq_hash:#x}: ref_cnt {reg.ref_cnt} vs inactive pool"
                )
            num_inactive += reg.ref_cnt == 0
        if num_inactive != len(self._backend):
            raise InvariantError("the eviction backend holds blocks that are not registered")
        self._backend.check_invariants()


def partial_block(partial_id: PartialId) -> PartialBlock:
    """Convenience for tests and scripts."""
    return PartialBlock(partial_id)
