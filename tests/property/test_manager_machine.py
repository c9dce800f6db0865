"""A hypothesis state machine driving `KvManager` (optionally with a `LocalG2Engine`) through
random request lifecycles, checked against a small reference model after every step.

Rules: admit a request (prompts share prefixes so hits happen), chunked prefill
(`prepare_allocation` / `commit_allocation`, committing only what the Use processed), decode
(`generate`: Promote + Use of the new partial, terminal Derefs), preempt (`reset_with_signal`),
swap-in of G2 hits (`try_batch_swap_in` -> tick to the deadline -> `register_swapped_in_blocks`)
and time (`tick_offload_engine` with a monotone clock).

After every step: `check_invariants`, the pool partition, refcounts = handles the model holds,
every registered block is active xor inactive, and replaying every emitted event into a naive
per-tier index gives exactly the manager's registered set (device) and the G2 engine's held set
(host). Event ids are contiguous from 0; a Stored's parent was announced earlier; Stored token
lists are block_size long and hash to the announced local and chained sequence hashes.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event as hyp_event, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shmkv.events import BlockRemoved, BlockStored, KvEvent, StorageTier
from shmkv.hashing import local_block_hashes, make_plh, sequence_hash
from shmkv.manager import KvManager, SwapInBlock, SwapInScheduled
from shmkv.offload import SwapInHandle
from shmkv.offload_local import LocalG2Engine, OffloadConfig
from shmkv.sequence import ActiveSequence
from shmkv.signals import Deref, FullBlock, PartialBlock, Promote, RawBlock, Use

BS = 4
MAX_LIVE = 3
MAX_TICK_LOOPS = 64

# Prompts come from a small catalog (repeats: hits and G2 swap-ins) or are a stem prefix plus a
# short suffix from a tiny alphabet; all stems share leading blocks.
STEMS: tuple[tuple[int, ...], ...] = (
    tuple(range(1, 25)),
    (*range(1, 9), *range(40, 56)),
    (1, 2, 3, 4, *range(60, 72)),
    tuple(range(80, 96)),
    tuple(range(100, 112)),
)
CATALOG: tuple[tuple[int, ...], ...] = (
    STEMS[0],
    STEMS[0][:16],
    STEMS[0][:10],
    STEMS[0][:6],
    STEMS[1],
    STEMS[1][:13],
    STEMS[2],
    STEMS[3],
    STEMS[3][:9],
    STEMS[4],
)
prompts = st.sampled_from(CATALOG).map(list) | st.builds(
    lambda stem, cut, suffix: [*STEMS[stem][:cut], *suffix] or [0],
    st.integers(0, len(STEMS) - 1),
    st.sampled_from([0, 3, 4, 6, 8, 9, 12, 16, 24]),
    st.lists(st.integers(0, 1), max_size=4),
)
planned_outputs = st.none() | st.lists(st.integers(0, 2), min_size=8, max_size=8)


@dataclass(frozen=True)
class NewRequest:
    prompt: list[int]
    max_output: int
    caching: bool
    emit: bool
    planned: list[int] | None
    swap_in: bool
    """Try to onboard G2 hits at admission (when a G2 engine is attached)."""


new_requests = st.builds(
    NewRequest,
    prompt=prompts,
    max_output=st.integers(1, 6),
    caching=st.sampled_from([True, True, True, False]),
    emit=st.booleans(),
    planned=planned_outputs,
    swap_in=st.booleans(),
)


@dataclass
class Req:
    rid: int
    seq: ActiveSequence
    held: list[RawBlock] = field(default_factory=list)
    """What the model says this request holds in G1, in sequence order."""
    phase: str = "prefill"  # prefill | decode | swapping
    target: int = 0
    """Prefill target in tokens (the whole sequence at (re)admission)."""
    swap: SwapInHandle | None = None
    swap_slots: list[int] = field(default_factory=list)
    swap_start: int = 0
    pinned: list[int] = field(default_factory=list)


def raw(block: FullBlock | PartialBlock) -> RawBlock:
    return block.seq_hash if isinstance(block, FullBlock) else block


class ManagerMachine(RuleBasedStateMachine):
    backend = "lineage"

    def __init__(self) -> None:
        super().__init__()
        self.mgr = KvManager(8, BS, eviction=self.backend)
        self.engine: LocalG2Engine | None = None
        self.now = 0.0
        self.reqs: dict[int, Req] = {}
        self.next_rid = 0
        self.rng = random.Random(0)
        self.plh_of: dict[int, int] = {}
        """Sequence hash -> PLH of every block any request ever named."""
        self.pins: Counter[int] = Counter()
        # Event replay: the naive per-tier index a router would keep.
        self.next_event_id = 0
        self.index: dict[StorageTier, set[int]] = {t: set() for t in StorageTier}
        self.announced: set[int] = set()

    @initialize(
        capacity=st.integers(6, 12),
        g2_blocks=st.sampled_from([None, 2, 3, 5, 8]),
        seed=st.integers(0, 2**32 - 1),
        first=st.lists(new_requests, min_size=1, max_size=3),
    )
    def setup(
        self, capacity: int, g2_blocks: int | None, seed: int, first: list[NewRequest]
    ) -> None:
        self.mgr = KvManager(capacity, BS, eviction=self.backend)
        self.rng = random.Random(seed)
        if g2_blocks is not None:
            self.engine = LocalG2Engine(
                OffloadConfig(
                    num_g2_blocks=g2_blocks,
                    block_size_bytes=1_000_000,  # 1 ms per block at 1 GB/s
                    bandwidth_g1_to_g2_gbps=1.0,
                    bandwidth_g2_to_g1_gbps=1.0,
                    offload_batch_size=2,
                )
            )
            self.mgr.attach_offload_engine(self.engine)
        for spec in first:
            self._admit(spec)

    # ── helpers ──────────────────────────────────────────────────────────────────────────

    def _pick(self, index: int, *phases: str) -> Req | None:
        rids = sorted(r for r, q in self.reqs.items() if q.phase in phases)
        return self.reqs[rids[index % len(rids)]] if rids else None

    def _learn(self, req: Req) -> None:
        self.plh_of.update(zip(req.seq.seq_hashes, req.seq.plhs, strict=True))

    def _tick(self, now: float) -> None:
        assert now >= self.now
        self.now = now
        self.mgr.tick_offload_engine(now)
        if self.engine is not None:
            self.engine.take_completed_onboards()  # handles carry `completed` themselves

    def _admit(self, spec: NewRequest) -> None:
        seq = ActiveSequence(
            spec.prompt, spec.max_output, BS, spec.caching, spec.emit, spec.planned, rng=self.rng
        )
        req = Req(self.next_rid, seq, target=len(seq))
        self.next_rid += 1
        self._learn(req)
        self.reqs[req.rid] = req
        if spec.swap_in:
            self._start_swap_in(req, pin=spec.emit)

    def _prefill(self, req: Req, chunk: int) -> bool:
        """One chunk of (chunked) prefill; commit only the blocks the Use processed.
        Returns False when the Use stopped early (out of capacity or blocked on offload)."""
        seq = req.seq
        cumulative = min(req.target, seq.num_allocated_tokens + chunk)
        prev = len(req.held)
        use = seq.prepare_allocation(cumulative)
        if use is None:
            seq.commit_allocation(cumulative)
        else:
            last = req.held[-1] if req.held else None
            assert not isinstance(last, PartialBlock), "a partial block is always the last one"
            assert use.parent == (None if last is None else FullBlock(last)), "parent = last held"
            n = self.mgr.process(use)
            assert 0 <= n <= len(use.raw_blocks)
            req.held.extend(use.raw_blocks[:n])
            if n == len(use.raw_blocks):
                seq.commit_allocation(cumulative)
            else:  # out of capacity (or blocked on offload): keep what the Use processed
                hyp_event("prefill: Use stopped early")
                seq.commit_allocation(
                    max(seq.num_allocated_tokens, min(cumulative, (prev + n) * BS))
                )
                return False
        if seq.num_allocated_tokens >= req.target:
            req.phase = "decode"
        return True

    def _decode(self, req: Req) -> bool:
        """One decode step: Promote + Use of the new partial on a boundary, terminal Derefs.
        Returns False when the new partial found no room (the token is popped)."""
        seq = req.seq
        signals = seq.generate()
        self._learn(req)
        for signal in signals:
            if isinstance(signal, Promote):
                assert req.held
                assert req.held[-1] == PartialBlock(signal.partial_id)
                hit = (
                    "active hit" if self.mgr.is_active(signal.seq_hash) else "store or inactive hit"
                )
                assert self.mgr.process(signal) == 1
                hyp_event(f"decode: Promote ({hit})")
                req.held[-1] = signal.seq_hash
            elif isinstance(signal, Use):
                assert len(signal.raw_blocks) == 1
                if self.mgr.process(signal) == 0:  # no room for the new partial: undo the token
                    hyp_event("decode: no room for the new partial, pop")
                    seq.pop()
                    seq.commit_allocation(len(seq))
                    return False
                req.held.extend(signal.raw_blocks)
            else:
                assert isinstance(signal, Deref)
                assert signal.raw_blocks == req.held[::-1], "terminal Derefs are tail first"
                assert self.mgr.process(signal) == 1
                req.held.clear()
        if seq.is_complete():
            hyp_event("request completed")
            assert not req.held
            del self.reqs[req.rid]
        else:
            seq.commit_allocation(len(seq))
        return True

    def _preempt(self, req: Req, swap_in: bool) -> None:
        """Free the allocated blocks (tail first); re-admission may onboard G2 hits."""
        signals = req.seq.reset_with_signal()
        if req.held:
            assert [s.raw_blocks for s in signals if isinstance(s, Deref)] == [req.held[::-1]]
        else:
            assert signals == []
        for signal in signals:
            assert self.mgr.process(signal) == 1
        req.held.clear()
        req.phase = "prefill"
        req.target = len(req.seq)
        if swap_in:
            self._start_swap_in(req, pin=True)

    def _finish_swap_in(self, req: Req) -> None:
        """Tick to the onboard's deadline, then register the blocks in G1."""
        handle = req.swap
        assert handle is not None
        if not handle.completed:
            self._tick(max(self.now, handle.deadline_ms))
        loops = 0
        while not handle.completed:  # later onboards share the link: the deadline moves
            deadline = self.mgr.earliest_offload_deadline()
            assert deadline is not None, "a swap-in is in flight but no deadline is reported"
            self._tick(max(self.now, deadline))
            loops += 1
            assert loops < MAX_TICK_LOOPS, "swap-in never completes"
        seq = req.seq
        start = req.swap_start
        entries = [
            SwapInBlock(meta.seq_hash, plh, meta.local_hash, meta.token_ids)
            for meta, plh in zip(handle.metas, handle.plan.plhs, strict=True)
        ]
        parent = seq.seq_hashes[start - 1] if start else None
        assert self.mgr.register_swapped_in_blocks(entries, parent, req.swap_slots) == len(entries)
        hyp_event("swap-in registered")
        self._unpin(req.pinned)
        req.swap, req.swap_slots, req.pinned = None, [], []
        req.phase = "prefill"

    def _unpin(self, pinned: list[int]) -> None:
        if pinned:
            self.mgr.unpin_g1_prefix(pinned)
            self.pins.subtract(pinned)
            self.pins = +self.pins

    # ── rules ────────────────────────────────────────────────────────────────────────────

    @precondition(lambda self: len(self.reqs) < MAX_LIVE)
    @rule(spec=new_requests)
    def admit(self, spec: NewRequest) -> None:
        self._admit(spec)

    @rule(
        index=st.integers(0, MAX_LIVE),
        chunk=st.integers(1, 9),
        steps=st.integers(1, 4),
        dt=st.sampled_from([0.0, 0.5, 1.0]),
        yield_on_failure=st.booleans(),
        swap_in=st.booleans(),
    )
    def advance(
        self, index: int, chunk: int, steps: int, dt: float, yield_on_failure: bool, swap_in: bool
    ) -> None:
        """A scheduler pass: time moves by `dt`, then one request moves along its lifecycle
        (prefill chunks, decode steps, swap-in completion). A request that finds no room keeps
        what it got, or (`yield_on_failure`) is preempted like the seed-era scheduler does."""
        if self.engine is not None:
            self._tick(self.now + dt)
        for _ in range(steps):
            req = self._pick(index, "prefill", "decode", "swapping")
            if req is None:
                return
            if req.phase == "prefill" and swap_in and not req.held:
                self._start_swap_in(req, pin=True)  # (re)admission: look in G2 first
            if req.phase == "prefill":
                ok = self._prefill(req, chunk)
            elif req.phase == "decode":
                ok = self._decode(req)
            else:
                self._finish_swap_in(req)
                ok = True
            if not ok:
                if yield_on_failure:
                    self._preempt(req, swap_in=True)
                return

    @rule(index=st.integers(0, MAX_LIVE))
    def run_to_completion(self, index: int) -> None:
        """Prefill and decode one request until it completes (terminal Derefs) or is stuck."""
        req = self._pick(index, "prefill", "decode")
        if req is None:
            return
        for _ in range(4 * (len(req.seq) + req.seq.max_output_tokens)):
            if req.rid not in self.reqs:
                return
            before = (len(req.seq), req.seq.num_allocated_tokens)
            ok = self._prefill(req, 2 * BS) if req.phase == "prefill" else self._decode(req)
            if not ok or (
                req.rid in self.reqs and (len(req.seq), req.seq.num_allocated_tokens) == before
            ):
                hyp_event("run_to_completion: stuck, preempted")
                self._preempt(req, swap_in=True)
                return

    @rule(index=st.integers(0, MAX_LIVE), chunk=st.integers(1, 9))
    def prefill_chunk(self, index: int, chunk: int) -> None:
        req = self._pick(index, "prefill")
        if req is not None:
            self._prefill(req, chunk)

    @rule(index=st.integers(0, MAX_LIVE))
    def decode(self, index: int) -> None:
        req = self._pick(index, "decode")
        if req is not None:
            self._decode(req)

    @rule(index=st.integers(0, MAX_LIVE), swap_in=st.booleans())
    def preempt(self, index: int, swap_in: bool) -> None:
        req = self._pick(index, "prefill", "decode")
        if req is not None:
            self._preempt(req, swap_in)

    @rule(index=st.integers(0, MAX_LIVE), pin=st.booleans())
    def start_swap_in(self, index: int, pin: bool) -> None:
        req = self._pick(index, "prefill")
        if req is not None:
            self._start_swap_in(req, pin)

    def _start_swap_in(self, req: Req, pin: bool) -> None:
        """Onboard the longest contiguous G2 prefix after the G1 prefix (pinned, optionally)."""
        if self.engine is None or req.held or not req.seq.enable_prefix_caching:
            return
        seq = req.seq
        start = 0
        while start < seq.num_full_blocks and self.mgr.is_registered(seq.plhs[start]):
            start += 1
        remaining = seq.plhs[start:]
        if not remaining:
            return
        pinned: list[int] = []
        if pin and start:
            got = self.mgr.try_pin_g1_prefix(seq.plhs[:start])
            assert got is not None, "every block of the G1 prefix is registered"
            pinned = got
            self.pins.update(pinned)
        outcome = self.mgr.try_batch_swap_in(remaining, self.now)
        hyp_event(f"swap-in: {type(outcome).__name__}")
        if not isinstance(outcome, SwapInScheduled):
            self._unpin(pinned)
            return
        handle = outcome.handle
        n = handle.plan.num_blocks
        assert 1 <= n <= len(remaining)
        assert handle.plan.plhs == remaining[:n]
        assert [m.seq_hash for m in handle.metas] == seq.seq_hashes[start : start + n]
        assert len(outcome.destination_slots) == n
        req.phase = "swapping"
        req.swap, req.swap_slots, req.swap_start, req.pinned = (
            handle,
            outcome.destination_slots,
            start,
            pinned,
        )

    @rule(index=st.integers(0, MAX_LIVE))
    def finish_swap_in(self, index: int) -> None:
        req = self._pick(index, "swapping")
        if req is not None:
            self._finish_swap_in(req)

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]))
    def tick(self, dt: float) -> None:
        if self.engine is not None:
            self._tick(self.now + dt)

    @rule()
    def tick_to_deadline(self) -> None:
        deadline = self.mgr.earliest_offload_deadline()
        if deadline is not None:
            self._tick(max(self.now, deadline))

    # ── checks ───────────────────────────────────────────────────────────────────────────

    @invariant()
    def structures_agree(self) -> None:
        mgr = self.mgr
        mgr.check_invariants()
        if self.engine is not None:
            self.engine.check_invariants()

    @invariant()
    def model_agrees(self) -> None:
        mgr = self.mgr
        handles: Counter[int] = Counter()
        num_partials = 0
        reserved = 0
        for req in self.reqs.values():
            seq = req.seq
            count = min(-(-seq.num_allocated_tokens // BS), seq.num_unique_blocks)
            assert req.held == [raw(b) for b in seq.unique_blocks()[:count]]
            for block in req.held:
                if isinstance(block, PartialBlock):
                    num_partials += 1
                    assert mgr.has_partial(block.partial_id)
                else:
                    handles[block] += 1
            reserved += len(req.swap_slots)
        # Refcounts equal the handles outstanding in the model.
        assert mgr.num_active_block_refs() == sum(handles.values()) + num_partials
        for seq_hash, n in handles.items():
            assert mgr.refcount(seq_hash) == n
        # Every registered block is active xor inactive.
        registered = mgr.registered_seq_hashes()
        assert len(set(registered)) == len(registered)
        num_active_registered = 0
        num_inactive = 0
        for seq_hash in registered:
            plh = self.plh_of[seq_hash]
            assert mgr.is_registered(plh)
            active = mgr.is_active(seq_hash) or self.pins[plh] > 0
            inactive = mgr.is_inactive(plh)
            assert active != inactive, f"block {seq_hash:#x}: active {active}, inactive {inactive}"
            num_active_registered += active
            num_inactive += inactive
        assert set(handles) <= set(registered)
        # The pools partition the capacity.
        assert mgr.num_inactive_blocks() == num_inactive
        assert mgr.num_active_blocks() == (
            num_active_registered + num_partials + mgr.num_quarantined_blocks + reserved
        )
        free = mgr.num_free_blocks() - mgr.num_inactive_blocks()
        assert free >= 0
        assert mgr.num_active_blocks() + mgr.num_inactive_blocks() + free == mgr.max_capacity

    @invariant()
    def events_replay_to_registered_sets(self) -> None:
        for event in self.mgr.take_events():
            self._replay(event)
        assert self.mgr.next_event_id == self.next_event_id
        assert self.index[StorageTier.DEVICE] == set(self.mgr.registered_seq_hashes())
        held = set() if self.engine is None else set(self.engine.held_seq_hashes())
        assert self.index[StorageTier.HOST_PINNED] == held

    def _replay(self, event: KvEvent) -> None:
        assert event.event_id == self.next_event_id, "event ids are contiguous from 0"
        self.next_event_id += 1
        assert event.dp_rank == 0
        assert isinstance(event, BlockStored | BlockRemoved), f"unexpected event {event!r}"
        hyp_event(f"kv event: {type(event).__name__} {event.tier}")
        tier_index = self.index[event.tier]
        if isinstance(event, BlockStored):
            self._check_stored(event)
            tier_index.update(event.block_hashes)  # a repeated Stored is harmless
            self.announced.update(event.block_hashes)
        else:
            assert event.block_hashes, "empty Removed"
            for seq_hash in event.block_hashes:
                assert seq_hash in tier_index, f"{event.tier}: {seq_hash:#x} removed but not held"
                tier_index.remove(seq_hash)

    def _check_stored(self, event: BlockStored) -> None:
        hashes = list(event.block_hashes)
        assert hashes, "empty Stored"
        assert len(event.tokens_hashes) == len(hashes)
        if event.parent_hash is not None:
            assert event.parent_hash in self.announced, (
                f"{event.tier} Stored {hashes[0]:#x} under parent {event.parent_hash:#x}, never announced"
            )
        if event.token_ids is None:
            return
        assert len(event.token_ids) == len(hashes)
        parent = event.parent_hash
        for seq_hash, local, tokens in zip(
            hashes, event.tokens_hashes, event.token_ids, strict=True
        ):
            assert len(tokens) == BS, "each Stored block carries exactly block_size tokens"
            # Token ids, local hash and sequence hash agree: the block is announced under its
            # real parent (prefix caching on is the only way token ids are emitted).
            assert local_block_hashes(list(tokens), BS) == [local]
            assert seq_hash == sequence_hash(parent, local), "Stored under the wrong parent"
            parent = seq_hash


MACHINE_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class LineageMachine(ManagerMachine):
    backend = "lineage"


class LruMachine(ManagerMachine):
    backend = "lru"


class MultiLruMachine(ManagerMachine):
    backend = "multi-lru"


TestLineageMachine = LineageMachine.TestCase
TestLineageMachine.settings = MACHINE_SETTINGS
TestLruMachine = LruMachine.TestCase
TestLruMachine.settings = MACHINE_SETTINGS
TestMultiLruMachine = MultiLruMachine.TestCase
TestMultiLruMachine.settings = MACHINE_SETTINGS


# ── minimal reproductions of what the machine checks ─────────────────────────────────────


def replay(events: list[KvEvent]) -> set[int]:
    """The device-tier set a router builds from `events`."""
    held: set[int] = set()
    for event in events:
        if isinstance(event, BlockStored):
            held.update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            held.difference_update(event.block_hashes)
    return held


def test_block_evicted_and_restored_by_the_same_use_stays_announced() -> None:
    a, b, x = 0xA, 0xB, 0xC
    plh_a, plh_b, plh_x = make_plh(a, None, 0), make_plh(b, a, 1), make_plh(x, None, 0)
    mgr = KvManager(2, BS, eviction="lru")
    assert mgr.process(Use([FullBlock(a), FullBlock(b)], [], [plh_a, plh_b])) == 2
    mgr.process(Deref([FullBlock(a), FullBlock(b)]))  # LRU order: a, b
    assert mgr.process(Use([FullBlock(x)], [], [plh_x])) == 1  # evicts a
    mgr.process(Deref([FullBlock(x)]))  # LRU order: b, x
    # Storing a evicts b (the oldest); b is then stored again, evicting x.
    assert mgr.process(Use([FullBlock(a), FullBlock(b)], [], [plh_a, plh_b])) == 2
    mgr.check_invariants()
    assert sorted(mgr.registered_seq_hashes()) == [a, b]
    assert replay(mgr.take_events()) == {a, b}, "the router must still see b"
