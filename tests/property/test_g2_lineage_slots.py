"""`G2Lineage` keeping each block's slot, and the directory that relies on it.

With a `G2Lineage` policy the G2 directory keeps no PLH -> slot map: the Lineage nodes hold
the slots (`insert(plh, slot)`, `evict_slots`), and a screened batch of chains finds its
duplicates while it is inserted (`insert_chains(..., duplicates=...)`). These tests pin both
to the references they replace: the Lineage against `insert_many` of the blocks a duplicate
pass keeps, and a directory over `G2Lineage` against one over `LineageBackend` (the same
policy, through the PLH -> slot map), step by step.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
from hypothesis import given, settings, strategies as st

from shmkv.errors import InvariantError
from shmkv.eviction.lineage import LineageBackend
from shmkv.g2 import G2Directory, G2RankView, PinnedRun, plhs_of
from shmkv.g2_lineage import G2Lineage
from shmkv.hashing import make_plh
from shmkv.shm import G2Segment
from tests.property.test_g2_lineage import _chains

TWIN: int = 1 << 62
"""XOR-ing a sequence hash with this keeps its PLH (the low 59 bits are the fragment)."""


def _outcome(call: Callable[..., object], *args: object) -> tuple[str, object]:
    try:
        return ("ok", call(*args))
    except InvariantError as exc:
        return ("error", str(exc))


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_insert_chains_with_duplicates_is_insert_many_of_the_rest(seed: int) -> None:
    """`insert_chains(plhs, starts, slots, duplicates, first_mode)` skips exactly the PLHs
    held already or earlier in the batch, and leaves what `insert_many` of the others (with
    their slots) leaves; evictions give back the slot each PLH was inserted with."""
    rng = random.Random(seed)
    ref, g2 = G2Lineage(), G2Lineage()
    known: list[int] = []
    slot_of: dict[int, int] = {}
    next_slot = 0
    for _ in range(rng.randint(1, 40)):
        roll = rng.random()
        if roll < 0.55:
            plhs, starts = _chains(rng, known)
            if plhs and rng.random() < 0.3:  # a PLH twice in one batch
                plhs.insert(rng.randrange(len(plhs) + 1), rng.choice(plhs))
                starts = list(range(len(plhs)))  # NOTE: runs no longer vouched for
            known += plhs
            slots = list(range(next_slot, next_slot + len(plhs)))
            next_slot += len(plhs)
            held = set()
            keep = []
            for i, plh in enumerate(plhs):
                if plh in ref or plh in held:
                    continue
                held.add(plh)
                keep.append(i)
            expected = _outcome(ref.insert_many, [plhs[i] for i in keep], [slots[i] for i in keep])
            found: list[int] = []
            first_mode = all(0 <= plh < 1 << 126 for plh in plhs)  # positions below 256
            got = _outcome(g2.insert_chains, plhs, starts, slots, found, first_mode)
            assert got == expected
            skipped = [i for i in range(len(plhs)) if i not in keep]
            if got[0] == "ok":
                assert found == skipped
            else:  # a refusal: the duplicates before it were skipped, the rest left alone
                assert found == skipped[: len(found)]
            slot_of.update(g2.slot_map())
        elif roll < 0.85:
            count = rng.randint(0, 40)
            ref_slots: list[int] = []
            g2_slots: list[int] = []
            victims = g2.evict_slots(count, g2_slots)
            assert ref.evict_slots(count, ref_slots) == victims
            assert g2_slots == ref_slots == [slot_of[plh] for plh in victims]
        elif known:
            plh = rng.choice(known)
            assert ref.remove(plh) == g2.remove(plh)
        assert len(ref) == len(g2)
        assert ref.leaf_order() == g2.leaf_order()
        assert ref.slot_map() == g2.slot_map()
        g2.check_invariants()


def test_evicted_nodes_are_reused_and_keep_nothing_linked() -> None:
    """Evicted nodes go to the spare list and come back for new chains; the forest stays
    exact through many rounds of fill and evict."""
    rng = random.Random(11)
    g2 = G2Lineage()
    slot_of: dict[int, int] = {}
    for round_ in range(30):
        plhs: list[int] = []
        starts: list[int] = []
        for _ in range(4):
            starts.append(len(plhs))
            parent = None
            for position in range(16):
                seq = rng.getrandbits(64)
                plhs.append(make_plh(seq, parent, position))
                parent = seq
        slots = list(range(64 * round_, 64 * round_ + 64))
        slot_of.update(zip(plhs, slots, strict=True))
        g2.insert_chains(plhs, starts, slots, [])
        g2.check_invariants()
        got: list[int] = []
        victims = g2.evict_slots(48 if round_ % 3 else 64, got)
        assert got == [slot_of[plh] for plh in victims]
        g2.check_invariants()
    assert 0 < len(g2._spare) <= 4096


# -- the directory: G2Lineage (slots in the nodes) against LineageBackend (PLH -> slot map) ---

CAPACITY = 24
NUM_RANKS = 2


@contextmanager
def _pools() -> Iterator[list[tuple[G2Segment, G2Directory, G2RankView]]]:
    with ExitStack() as stack:
        pools = []
        for policy in (LineageBackend(), G2Lineage()):
            segment = G2Segment.create(
                f"hl{uuid.uuid4().hex[:12]}", capacity=CAPACITY, block_size=1, num_ranks=NUM_RANKS
            )
            stack.callback(segment.close)
            stack.callback(segment.unlink)
            directory = G2Directory(segment, policy)
            stack.callback(directory.close)
            view = G2RankView(segment, 1)
            stack.callback(view.close)
            pools.append((segment, directory, view))
        yield pools


def _same(call: str, dirs: list[G2Directory], *args: object, **kwargs: object) -> object:
    outcomes = []
    for directory in dirs:
        try:
            outcomes.append(("ok", getattr(directory, call)(*args, **kwargs)))
        except InvariantError as exc:
            outcomes.append(("error", str(exc)))
    assert outcomes[0] == outcomes[1], call
    return outcomes[0][1]


def _batch(
    rng: random.Random, chains: list[list[tuple[int, int | None, int]]], count: int
) -> tuple[list[tuple[int, int | None, int]], list[int]]:
    """`count` blocks (seq, parent, position) in parent-first chains, and where each starts:
    fresh chains, chains continuing one seen before, and twins of chains seen before (new
    sequence hashes, the same PLHs: duplicates while those are READY)."""
    blocks: list[tuple[int, int | None, int]] = []
    starts: list[int] = []
    while len(blocks) < count:
        starts.append(len(blocks))
        length = min(count - len(blocks), rng.randint(1, 8))
        roll = rng.random()
        if roll < 0.3 and chains:
            old = rng.choice(chains)
            twin = [(seq ^ TWIN, parent, pos) for seq, parent, pos in old[:length]]
            # NOTE: later parents are the twins before them (same PLH fragments either way)
            blocks += [
                (s, p if k == 0 or p is None else p ^ TWIN, pos)
                for k, (s, p, pos) in enumerate(twin)
            ]
            continue
        if roll < 0.5 and chains:
            seq0, _, pos0 = rng.choice(chains)[-1]
            parent: int | None = seq0
            position = pos0 + 1
        else:
            parent, position = None, rng.choice([0, 0, 3, 252])
        chain = []
        for _ in range(length):
            seq = rng.getrandbits(64)
            chain.append((seq, parent, position))
            parent, position = seq, position + 1
        chains.append(chain)
        blocks += chain
    return blocks, starts


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_directory_over_g2_lineage_matches_one_over_the_plh_map(seed: int) -> None:
    """Reservations (evicting, with pins in the way), screened chain commits with PLH
    duplicates, per-block and list commits, removals: the same slots, duplicate flags,
    evictions and segment contents as the same policy behind the PLH -> slot map."""
    rng = random.Random(seed)
    chains: list[list[tuple[int, int | None, int]]] = []
    with _pools() as pools:
        dirs = [directory for _, directory, _ in pools]
        views = [view for _, _, view in pools]
        segments = [segment for segment, _, _ in pools]
        runs: list[list[PinnedRun | None]] = []
        stored: list[int] = []
        for _ in range(rng.randint(4, 25)):
            rank = rng.randrange(NUM_RANKS)
            vectorized = rng.random() < 0.6
            slots = _same("reserve", dirs, rng.randint(1, 12), rank, vectorized=vectorized)
            assert isinstance(slots, list)
            _same("take_evicted", dirs)
            if not slots:
                continue
            blocks, starts = _batch(rng, chains, len(slots))
            seqs = [seq for seq, _, _ in blocks]
            parents = [parent for _, parent, _ in blocks]
            positions = [pos for _, _, pos in blocks]
            ready = dirs[0].ready_seqs
            how = rng.random()
            if how < 0.5 and ready.isdisjoint(seqs) and len(set(seqs)) == len(seqs):
                committed = _same(
                    "commit_screened",
                    dirs,
                    np.asarray(slots, dtype=np.intp),
                    np.asarray(seqs, dtype=np.uint64),
                    np.asarray([0 if p is None else p for p in parents], dtype=np.uint64),
                    np.asarray([p is not None for p in parents]),
                    np.asarray(seqs, dtype=np.uint64),
                    np.asarray(positions, dtype=np.int64),
                    None,
                    rank,
                    plhs_of(seqs, parents, positions),
                    seqs,
                    chain_starts=starts,
                )
            elif how < 0.8:
                committed = _same(
                    "commit_many", dirs, slots, seqs, parents, seqs, positions, None, rank
                )
            else:
                committed = [
                    _same("commit", dirs, slot, seq, parent, seq, pos, None, rank)
                    for slot, seq, parent, pos in zip(slots, seqs, parents, positions, strict=True)
                ]
            assert isinstance(committed, list)
            stored += [seq for seq, ok in zip(seqs, committed, strict=True) if ok]
            if rng.random() < 0.3 and stored:
                wanted = rng.sample(stored, min(3, len(stored)))
                pinned = [view.pin_prefix(wanted) for view in views]
                assert (pinned[0] is None) == (pinned[1] is None)
                runs.append(pinned)
            if runs and rng.random() < 0.3:
                for view, run in zip(views, runs.pop(0), strict=True):
                    if run is not None:
                        view.unpin(run)
            if rng.random() < 0.2 and stored:
                _same("try_remove", dirs, rng.choice(stored))
                _same("take_evicted", dirs)
            assert dirs[0].stats() == dirs[1].stats()
            for name in ("state", "gen", "seq_hash", "parent_hash", "owner", "index_slot"):
                assert np.array_equal(getattr(segments[0], name), getattr(segments[1], name))
            assert dirs[0].ready_seqs == dirs[1].ready_seqs
            for directory in dirs:
                directory.check_invariants()
