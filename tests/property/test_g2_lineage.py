"""`shmkv.g2_lineage.G2Lineage` against `shmkv.eviction.lineage.LineageBackend`.

The G2 policy must evict exactly what Lineage evicts, in the same order, whatever the mix of
bulk inserts (parent-first chains, branches, children before parents, blocks present already,
roots, refused keys), single inserts, evictions and removals.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings, strategies as st

from shmkv.errors import InvariantError
from shmkv.eviction.lineage import LineageBackend
from shmkv.g2_lineage import G2Lineage
from shmkv.hashing import make_plh


def _chain(rng: random.Random, start: int, parent: int | None, length: int) -> list[int]:
    """PLHs of a chain stored parent first, starting at position `start` under `parent`."""
    plhs = []
    for position in range(start, start + length):
        seq = rng.choice([rng.getrandbits(64), rng.randrange(8)])  # small seqs: clashes
        plhs.append(make_plh(seq, parent, position))
        parent = seq
    return plhs


def _seq_of(plh: int) -> int:
    return plh & ((1 << 59) - 1)


def _batch(rng: random.Random, known: list[int]) -> list[int]:
    batch: list[int] = []
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.3 and known:  # extend a block seen before (it may be gone by now)
            base = rng.choice(known)
            start = ((base >> 118) & 0xFF) + 1
            batch += _chain(rng, start, _seq_of(base), rng.randint(1, 20))
        elif roll < 0.4 and known:
            batch.append(rng.choice(known))  # present already (or gone): may be refused
        elif roll < 0.45:
            batch += _chain(rng, 250, rng.getrandbits(64), 12)  # crosses into mode 1
        else:
            batch += _chain(rng, rng.choice([0, 0, 3]), rng.getrandbits(64), rng.randint(1, 30))
    if len(batch) > 1 and rng.random() < 0.15:
        rng.shuffle(batch)  # children before parents
    if len(batch) > 2 and rng.random() < 0.1:
        batch.insert(rng.randrange(len(batch)), batch[rng.randrange(len(batch))])  # twice
    return batch


def _both(ref: LineageBackend, g2: G2Lineage, op: str, arg: object) -> None:
    outcomes = []
    for policy in (ref, g2):
        try:
            outcomes.append(("ok", getattr(policy, op)(arg)))
        except InvariantError as exc:
            outcomes.append(("error", str(exc)))
    assert outcomes[0] == outcomes[1], op
    assert len(ref) == len(g2)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_g2_lineage_evicts_what_lineage_evicts(seed: int) -> None:
    rng = random.Random(seed)
    ref, g2 = LineageBackend(), G2Lineage()
    known: list[int] = []
    for _ in range(rng.randint(1, 40)):
        roll = rng.random()
        if roll < 0.45:
            batch = _batch(rng, known)
            known += batch
            _both(ref, g2, "insert_many", batch)
        elif roll < 0.7:
            _both(ref, g2, "evict_many", rng.randint(0, 40))
        elif roll < 0.8:
            _both(ref, g2, "evict_many", 1)
        elif roll < 0.9 and known:
            _both(ref, g2, "remove", rng.choice(known))
        elif known:
            _both(ref, g2, "insert", rng.choice(known))
        g2.check_invariants()
        assert [p in g2 for p in known[-50:]] == [p in ref for p in known[-50:]]
    _both(ref, g2, "evict_many", len(ref) + 1)
    assert len(g2) == 0


def _chains(rng: random.Random, known: list[int]) -> tuple[list[int], list[int]]:
    """PLHs of a few parent-first chains, and where each starts (`G2Lineage.insert_chains`)."""
    plhs: list[int] = []
    starts: list[int] = []
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.1 and known:  # blocks present already (or gone): may be refused
            for plh in rng.sample(known, min(3, len(known))):
                starts.append(len(plhs))
                plhs.append(plh)
            continue
        starts.append(len(plhs))
        if roll < 0.4 and (plhs or known):  # extend a block of this batch or seen before
            base = rng.choice(plhs if plhs and roll < 0.2 else known or plhs)
            start = ((base >> 118) & 0xFF) + 1
            plhs += _chain(rng, start, _seq_of(base), rng.randint(1, 20))
        elif roll < 0.45:
            plhs += _chain(rng, 250, rng.getrandbits(64), 12)  # crosses into mode 1
        else:
            plhs += _chain(rng, rng.choice([0, 0, 3]), rng.getrandbits(64), rng.randint(1, 30))
    return plhs, starts


def _outcome(call: Callable[..., None], *args: object) -> tuple[str, str]:
    try:
        call(*args)
    except InvariantError as exc:
        return ("error", str(exc))
    return ("ok", "")


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_insert_chains_is_insert_many(seed: int) -> None:
    """`insert_chains` (runs the caller vouches for) leaves exactly what `insert_many` does,
    refusals included, under any mix of evictions and removals."""
    rng = random.Random(seed)
    ref, g2 = G2Lineage(), G2Lineage()
    known: list[int] = []
    for _ in range(rng.randint(1, 40)):
        roll = rng.random()
        if roll < 0.5:
            plhs, starts = _chains(rng, known)
            known += plhs
            outcomes = [_outcome(ref.insert_many, plhs), _outcome(g2.insert_chains, plhs, starts)]
            assert outcomes[0] == outcomes[1]
        elif roll < 0.8:
            count = rng.randint(0, 40)
            assert ref.evict_many(count) == g2.evict_many(count)
        elif known:
            plh = rng.choice(known)
            assert ref.remove(plh) == g2.remove(plh)
        assert len(ref) == len(g2)
        assert ref.leaf_order() == g2.leaf_order()
        g2.check_invariants()
    assert ref.evict_many(len(ref) + 1) == g2.evict_many(len(g2) + 1)


def test_a_fresh_parent_first_chain_is_linked_in_one_run() -> None:
    rng = random.Random(3)
    chain = _chain(rng, 0, None, 64)
    g2 = G2Lineage()
    g2.insert_many(chain)
    g2.check_invariants()
    assert g2.leaf_order() == [chain[-1]]
    assert g2.evict_many(100) == chain[::-1]
    assert len(g2) == 0
    g2.check_invariants()


def test_a_refusal_keeps_the_blocks_before_it() -> None:
    rng = random.Random(4)
    chain = _chain(rng, 0, None, 20)
    g2 = G2Lineage()
    g2.insert(chain[10])
    with pytest.raises(InvariantError, match="inserted twice"):
        g2.insert_many(chain[:12])
    assert len(g2) == 1 + 10  # chain[10] was there; chain[:10] went in before the refusal
    g2.check_invariants()
