"""Layer 1: the in-process G2 host tier of one rank (offline replay, unit tests).

Implements `OffloadEngine` (behavior.md §8.1-§8.5) in one process:

* G1->G2: presence filter (already in G2 or in flight: skip), then a capacity reservation
  (`free + evictable - reserved >= 1`, else the block is dropped: a miss, never a stall);
  accepted blocks go out in batches of `offload_batch_size` blocks, at most
  `offload_batch_size` batches in flight, each one processor-sharing transfer on the rank's
  G1->G2 link. At completion each block is registered in G2 (evicting a G2 Lineage leaf when
  full: host Removed), announced (host Stored, with its original parent and token ids), its
  reservation released, and its G1 source slot handed back.
  Host-tier order: G1 evicts leaf-first, so a child's copy often lands before its parent's. A
  block whose parent is still in flight waits (keeps its reservation) and lands right after
  the parent. Every block here is this rank's own eviction, so its parent is announced on this
  rank before it: in G1 (where G1's leaf-first eviction left it: a cross-tier parent, as in
  Dynamo's per-worker G2, behavior.md §6.2) or in G2. Every held block is announced (the state
  dump's host tier is `held_seq_hashes()`). The shared G2 of a fleet is different: its blocks
  come from every rank, so its ranks filter with `HostTierAnnouncer` (below).
* G2->G1: the longest contiguous G2 prefix is pinned (removed from the evictable pool) for
  the modeled copy time on the G2->G1 link, then unpinned (re-enters the pool, new tick).

Time: `tick(now_ms)` is the only way time moves; offloads enqueued between ticks start at the
last tick's time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from shmkv.bandwidth import BandwidthModel
from shmkv.errors import ConfigError, InvariantError
from shmkv.eviction import make_backend
from shmkv.ids import BlockId, Plh, SeqHash
from shmkv.offload import (
    BlockMeta,
    G2Event,
    G2Removed,
    G2Stored,
    OffloadItem,
    OnboardPlan,
    SwapInHandle,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class OffloadConfig:
    """G2 sizing and link speeds (behavior.md §8.1)."""

    num_g2_blocks: int
    block_size_bytes: int = 0
    """Bytes of one KV block (block_size x kv_bytes_per_token); 0 = instant transfers."""
    bandwidth_g1_to_g2_gbps: float = 14.0
    bandwidth_g2_to_g1_gbps: float = 14.0
    offload_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.num_g2_blocks <= 0:
            raise ConfigError(f"num_g2_blocks must be > 0, got {self.num_g2_blocks}")
        if self.block_size_bytes < 0:
            raise ConfigError(f"block_size_bytes must be >= 0, got {self.block_size_bytes}")
        if self.offload_batch_size <= 0:
            raise ConfigError(f"offload_batch_size must be > 0, got {self.offload_batch_size}")


@dataclass(slots=True)
class _Batch:
    items: list[OffloadItem]
    slots: list[BlockId]


class HostTierAnnouncer:
    """Which host-tier (G2) blocks one rank announces, and in which order (issue 4 §4).

    Used by every rank of a shared G2 (`shmkv.g2_client`), whose pool holds blocks offloaded
    by all ranks: a block's parent may live only in another rank's G1.

    Rule: a block is announced once its parent is announced on this rank *in the host tier*
    (a root, with no parent, at once). Feed it the pool's stores and removals in pool order;
    it appends the host-tier events the rank must publish to `out`:

    * `stored(meta)`: the block is held; if its parent is announced it is announced now,
      followed (parent first) by every held descendant that waited for it. Otherwise it waits.
    * `removed(seq)`: the block is gone. If it was announced, its announced descendants are
      withdrawn first, deepest first, then the block, so no announced block ever outlives its
      parent (a router drops a removed block's descendants with it: Dynamo's RadixTree then
      answers "block not found" for them). Descendants still held wait again and come back
      if the block does. A block never announced goes silently.

    The announced set is therefore a function of what the pool holds: every held block whose
    whole parent chain is held. Hashes are sequence hashes; a block whose parent hash equals
    its own never gets announced.
    """

    __slots__ = ("_announced", "_children", "_held")

    def __init__(self) -> None:
        self._held: dict[SeqHash, BlockMeta] = {}
        self._children: dict[SeqHash, dict[SeqHash, None]] = {}
        """parent -> held children (announced or waiting), in arrival order."""
        self._announced: set[SeqHash] = set()

    @property
    def num_held(self) -> int:
        return len(self._held)

    @property
    def num_announced(self) -> int:
        return len(self._announced)

    @property
    def num_waiting(self) -> int:
        """Held blocks not announced: their parent is not announced in the host tier."""
        return len(self._held) - len(self._announced)

    def is_announced(self, seq_hash: SeqHash) -> bool:
        return seq_hash in self._announced

    def announced_seq_hashes(self) -> list[SeqHash]:
        """What this rank's host-tier events say it holds (Stored minus Removed)."""
        return list(self._announced)

    def stored(self, meta: BlockMeta, out: list[G2Event]) -> None:
        seq = meta.seq_hash
        parent = meta.parent_hash
        if seq in self._held:
            self._held[seq] = meta
            if seq in self._announced:
                return
        else:
            self._held[seq] = meta
            if parent is not None:
                self._children.setdefault(parent, {})[seq] = None
        if parent is None or (parent != seq and parent in self._announced):
            self._announce_from(seq, out)

    def _announce_from(self, first: SeqHash, out: list[G2Event]) -> None:
        held, children, announced = self._held, self._children, self._announced
        stack = [first]
        while stack:
            seq = stack.pop()
            if seq in announced:
                continue
            announced.add(seq)
            out.append(G2Stored(held[seq]))
            waiting = children.get(seq)
            if waiting:
                stack.extend(c for c in reversed(waiting) if c not in announced)

    def removed(self, seq_hash: SeqHash, out: list[G2Event]) -> None:
        meta = self._held.pop(seq_hash, None)
        if meta is None:
            return
        parent = meta.parent_hash
        if parent is not None:
            siblings = self._children.get(parent)
            if siblings is not None:
                siblings.pop(seq_hash, None)
                if not siblings:
                    del self._children[parent]
        if seq_hash in self._announced:
            self._withdraw(seq_hash, out)

    def _withdraw(self, root: SeqHash, out: list[G2Event]) -> None:
        """Removed for `root` and its announced descendants, every child before its parent."""
        children, announced = self._children, self._announced
        order: list[SeqHash] = []
        stack = [root]
        while stack:
            seq = stack.pop()
            if seq not in announced:
                continue
            announced.discard(seq)
            order.append(seq)
            below = children.get(seq)
            if below:
                stack.extend(c for c in below if c in announced)
        out.extend(G2Removed(seq) for seq in reversed(order))

    def clear(self) -> None:
        self._held.clear()
        self._children.clear()
        self._announced.clear()


class LocalG2Engine:
    """A private G2 pool with a processor-sharing link in each direction."""

    def __init__(self, config: OffloadConfig) -> None:
        self.config = config
        self._num_free = config.num_g2_blocks
        self._blocks: dict[Plh, BlockMeta] = {}
        self._backend, _tracker = make_backend("lineage", config.num_g2_blocks)
        self._pins: dict[Plh, int] = {}
        self._pending: set[Plh] = set()
        self._pending_seq: set[int] = set()
        self._deferred: dict[int, list[OffloadItem]] = {}
        self._num_reserved = 0
        self._offload_link = BandwidthModel(config.bandwidth_g1_to_g2_gbps)
        self._onboard_link = BandwidthModel(config.bandwidth_g2_to_g1_gbps)
        self._next_transfer_id = 0
        self._waiting: deque[_Batch] = deque()
        self._inflight: dict[int, _Batch] = {}
        self._onboards: dict[int, SwapInHandle] = {}
        self._completed_onboards: list[SwapInHandle] = []
        self._events: list[G2Event] = []
        self._now_ms = 0.0
        self.num_offloaded = 0
        self.num_dropped = 0
        self.num_deduped = 0
        self.num_onboarded = 0

    # ── G1 -> G2 ──────────────────────────────────────────────────────────────────────────

    def enqueue_evictions(
        self, items: Sequence[OffloadItem], source_slots: Sequence[BlockId]
    ) -> list[BlockId]:
        released: list[BlockId] = list(source_slots[len(items) :])
        accepted = _Batch([], [])
        for item, slot in zip(items, source_slots, strict=False):
            plh = item.plh
            if plh in self._blocks or plh in self._pending:
                self.num_deduped += 1
                released.append(slot)
            elif self._num_free + len(self._backend) - self._num_reserved >= 1:
                self._num_reserved += 1
                self._pending.add(plh)
                self._pending_seq.add(item.meta.seq_hash)
                accepted.items.append(item)
                accepted.slots.append(slot)
            else:
                self.num_dropped += 1
                released.append(slot)
        size = self.config.offload_batch_size
        for start in range(0, len(accepted.items), size):
            self._waiting.append(
                _Batch(accepted.items[start : start + size], accepted.slots[start : start + size])
            )
        self._start_waiting_batches()
        return released

    def _start_waiting_batches(self) -> None:
        while self._waiting and len(self._inflight) < self.config.offload_batch_size:
            batch = self._waiting.popleft()
            transfer_id = self._new_transfer_id()
            self._inflight[transfer_id] = batch
            self._offload_link.start(
                self._now_ms, len(batch.items) * self.config.block_size_bytes, transfer_id
            )

    def _new_transfer_id(self) -> int:
        transfer_id = self._next_transfer_id
        self._next_transfer_id += 1
        return transfer_id

    def _complete_offload(self, batch: _Batch) -> None:
        for item in batch.items:
            self._land(item)

    def _land(self, item: OffloadItem) -> None:
        """Register one copied block in G2, unless its parent's copy is still in flight."""
        meta = item.meta
        parent = meta.parent_hash
        if parent is not None and parent in self._pending_seq:
            self._deferred.setdefault(parent, []).append(item)
            return
        self._pending.discard(item.plh)
        self._pending_seq.discard(meta.seq_hash)
        self._num_reserved -= 1
        if self._num_free > 0:
            self._num_free -= 1
            self._register(item)
        else:
            victim = self._backend.evict()
            if victim is None:  # every evictable block got pinned meanwhile: a miss
                self.num_dropped += 1
            else:
                self._events.append(G2Removed(self._blocks.pop(victim).seq_hash))
                self._register(item)
        for child in self._deferred.pop(meta.seq_hash, ()):
            self._land(child)

    def _register(self, item: OffloadItem) -> None:
        self._blocks[item.plh] = item.meta
        self._backend.insert(item.plh)
        self._events.append(G2Stored(item.meta))
        self.num_offloaded += 1

    # ── time ──────────────────────────────────────────────────────────────────────────────

    def tick(self, now_ms: float) -> list[BlockId]:
        self._now_ms = max(self._now_ms, now_ms)
        released: list[BlockId] = []
        for transfer_id in self._offload_link.advance_to(self._now_ms):
            batch = self._inflight.pop(transfer_id)
            self._complete_offload(batch)
            released.extend(batch.slots)
        self._start_waiting_batches()
        self._advance_onboards(self._now_ms)
        return released

    def _advance_onboards(self, now_ms: float) -> None:
        for transfer_id in self._onboard_link.advance_to(now_ms):
            handle = self._onboards.pop(transfer_id)
            handle.completed = True
            self._unpin(handle.plan.plhs)
            self.num_onboarded += len(handle.plan.plhs)
            self._completed_onboards.append(handle)

    def take_events(self) -> list[G2Event]:
        events = self._events
        self._events = []
        return events

    def earliest_deadline_ms(self) -> float | None:
        deadlines = [
            d
            for d in (
                self._offload_link.earliest_finish_ms(),
                self._onboard_link.earliest_finish_ms(),
            )
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    # ── G2 -> G1 ──────────────────────────────────────────────────────────────────────────

    def prepare_onboard(self, plhs: Sequence[Plh]) -> OnboardPlan | None:
        prefix: list[Plh] = []
        for plh in plhs:
            if plh not in self._blocks:
                break
            prefix.append(plh)
        if not prefix:
            return None
        for plh in prefix:
            count = self._pins.get(plh, 0)
            if count == 0:
                self._backend.remove(plh)
            self._pins[plh] = count + 1
        return OnboardPlan(prefix)

    def _unpin(self, plhs: Sequence[Plh]) -> None:
        for plh in plhs:
            count = self._pins.get(plh, 0)
            if count <= 0:
                raise InvariantError(f"G2: unpin of unpinned block {plh:#x}")
            if count == 1:
                del self._pins[plh]
                self._backend.insert(plh)
            else:
                self._pins[plh] = count - 1

    def cancel_onboard(self, plan: OnboardPlan) -> None:
        self._unpin(plan.plhs)

    def start_onboard(self, plan: OnboardPlan, now_ms: float) -> SwapInHandle:
        self._advance_onboards(now_ms)
        transfer_id = self._new_transfer_id()
        self._onboard_link.start(
            now_ms, plan.num_blocks * self.config.block_size_bytes, transfer_id
        )
        handle = SwapInHandle(
            transfer_id,
            plan,
            self._onboard_link.deadline_ms(transfer_id),
            metas=[self._blocks[plh] for plh in plan.plhs],
        )
        self._onboards[transfer_id] = handle
        return handle

    def take_completed_onboards(self) -> list[SwapInHandle]:
        done = self._completed_onboards
        self._completed_onboards = []
        return done

    # ── queries ───────────────────────────────────────────────────────────────────────────

    def contains(self, plh: Plh) -> bool:
        return plh in self._blocks

    def held_seq_hashes(self) -> list[int]:
        return [meta.seq_hash for meta in self._blocks.values()]

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_pinned(self) -> int:
        return len(self._pins)

    @property
    def num_in_flight(self) -> int:
        return len(self._pending)

    def check_invariants(self) -> None:
        capacity = self.config.num_g2_blocks
        if self._num_free + len(self._blocks) != capacity:
            raise InvariantError(
                f"G2: free {self._num_free} + held {len(self._blocks)} != capacity {capacity}"
            )
        if len(self._backend) + len(self._pins) != len(self._blocks):
            raise InvariantError("G2: evictable + pinned != held")
        if self._num_reserved != len(self._pending):
            raise InvariantError("G2: reservations disagree with in-flight blocks")
        self._backend.check_invariants()

    def close(self) -> None:
        """Nothing to release: the pool lives in this process."""
