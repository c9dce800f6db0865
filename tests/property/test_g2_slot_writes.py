"""The coordinator's per-group loops over its own data: `shmkv.g2._packed_screen_py`,
`_check_reserved_py`, `_publish_slots_py`, `_release_slots_py` and their C twins in
`shmkv._g2index` (when built), C against Python bit for bit, and the screening against a
plain per-item reference written out here.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shmkv import g2, transport as tp
from shmkv.hashing import MAX_POSITION
from shmkv.shm import FREE, NO_OWNER, READY, RESERVED
from tests.g2index_module import g2index_module

_C = g2index_module()
needs_c = pytest.mark.skipif(_C is None, reason="shmkv._g2index is not built")

# -- packed_screen ------------------------------------------------------------------------------


def _group(rng: random.Random, counts: list[int], defect: str) -> tuple[np.ndarray, list[int]]:
    """Packed items of chains of `counts` blocks (each message a chain parent first), with
    one `defect` planted."""
    words: list[list[int]] = []
    starts: list[int] = []
    for count in counts:
        starts.append(len(words))
        first = rng.randrange(300)
        parent: int | None = rng.getrandbits(64) if rng.random() < 0.5 else None
        for k in range(count):
            seq = rng.getrandbits(64)
            meta = first + k if parent is None else (first + k) | tp.PACKED_HAS_PARENT
            words.append([seq, 0 if parent is None else parent, rng.getrandbits(64), meta])
            parent = seq
    n = len(words)
    at = rng.randrange(n)
    if defect == "bad-bits":
        words[at][3] |= 1 << rng.choice([24, 31, 34, 63])
    elif defect == "parent-without-flag":
        words[at][3] &= ~tp.PACKED_HAS_PARENT
        words[at][1] = words[at][1] or 1
    elif defect == "repeat" and n > 1:
        words[at][0] = words[(at + 1 + rng.randrange(n - 1)) % n][0]
    elif defect == "broken-link" and n > 1:
        k = rng.randrange(1, n)
        words[k][rng.choice([1, 3])] ^= 1 << rng.randrange(3)
    elif defect == "first-parent-inside":
        j = rng.randrange(len(starts))
        words[starts[j]][1] = words[rng.randrange(n)][0]
        words[starts[j]][3] |= tp.PACKED_HAS_PARENT
    elif defect == "position-max":
        words[at][3] = (words[at][3] & tp.PACKED_HAS_PARENT) | MAX_POSITION
    return np.array(words, dtype=np.uint64).reshape(-1), starts


def _screen_reference(words: list[list[int]], starts: list[int]) -> tuple[int, int]:
    bad_bits = ((1 << 64) - 1) & ~(tp.PACKED_HAS_PARENT | MAX_POSITION)
    for _seq, parent, _local, meta in words:
        if meta & bad_bits or (not meta & tp.PACKED_HAS_PARENT and parent):
            return -1, 0
    seqs = [w[0] for w in words]
    if len(set(seqs)) != len(seqs):
        return -2, 0
    positions = [w[3] & MAX_POSITION for w in words]
    chains = True
    for k in range(1, len(words)):
        if k not in starts:
            chains = chains and bool(
                words[k][3] & tp.PACKED_HAS_PARENT
                and words[k][1] == seqs[k - 1]
                and positions[k] == positions[k - 1] + 1
            )
    for k in starts:
        if words[k][3] & tp.PACKED_HAS_PARENT and words[k][1] in set(seqs):
            chains = False
    return (1 if chains else 0), max(positions)


DEFECTS = (
    "none", "bad-bits", "parent-without-flag", "repeat", "broken-link", "first-parent-inside",
    "position-max",
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    counts=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    defect=st.sampled_from(DEFECTS),
)
def test_packed_screen_matches_the_reference_in_both_twins(
    seed: int, counts: list[int], defect: str
) -> None:
    items, starts = _group(random.Random(seed), counts, defect)
    ordered = np.sort(items.reshape(-1, 4)[:, 0])
    expected = _screen_reference(items.reshape(-1, 4).tolist(), starts)
    assert g2._packed_screen_py(items, starts, ordered) == expected
    if _C is not None:
        assert _C.packed_screen(items, starts, ordered) == expected
    assert g2.packed_screen(items, starts, ordered) == expected


@pytest.mark.parametrize("impl", ["python", "c"])
def test_packed_screen_refuses_malformed_arguments(impl: str) -> None:
    if impl == "c" and _C is None:
        pytest.skip("shmkv._g2index is not built")
    screen: Any = g2._packed_screen_py if impl == "python" else _C.packed_screen  # type: ignore[union-attr]
    items = np.arange(8, dtype=np.uint64)
    ordered = np.sort(items.reshape(2, 4)[:, 0])
    for starts in ([], [1], [0, 0], [0, 2], [0, -1]):
        with pytest.raises(ValueError):
            screen(items, starts, ordered)
    with pytest.raises(ValueError):
        screen(np.zeros(0, dtype=np.uint64), [0], ordered)
    with pytest.raises(ValueError):
        screen(np.zeros(6, dtype=np.uint64), [0], ordered)
    with pytest.raises(TypeError):
        screen(items, (0,), ordered)
    with pytest.raises(TypeError):
        screen(items.astype(np.int32), [0], ordered)


# -- check_reserved, publish_slots, release_slots -----------------------------------------------


def _slot_arrays(rng: np.random.Generator, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    state = rng.choice(np.array([FREE, RESERVED, READY], dtype=np.int8), size=capacity)
    owner = rng.integers(-1, 3, size=capacity).astype(np.int16)
    return state, owner


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    capacity=st.integers(1, 40),
    count=st.integers(0, 12),
    one_owner=st.booleans(),
    tidy=st.booleans(),
)
def test_check_reserved_twins_agree(
    seed: int, capacity: int, count: int, one_owner: bool, tidy: bool
) -> None:
    rng = np.random.default_rng(seed)
    state, owner = _slot_arrays(rng, capacity)
    count = min(count, capacity) if tidy else count
    idx = rng.integers(-2, capacity + 2, size=count).astype(np.intp)
    owners: int | np.ndarray = 1 if one_owner else rng.integers(0, 3, size=count)
    if tidy:  # the usual case: distinct slots, reserved by their owners
        idx = rng.permutation(capacity)[:count].astype(np.intp)
        state[idx] = RESERVED
        owner[idx] = owners
    outcomes = []
    impls: list[Any] = [g2._check_reserved_py] + ([_C.check_reserved] if _C is not None else [])
    for impl in impls:
        scratch = np.zeros(capacity, dtype=np.intp)
        outcomes.append(impl(state, owner, idx, owners, scratch))
    assert all(outcome == outcomes[0] for outcome in outcomes)
    problem, at = outcomes[0]
    if tidy:
        assert (problem, at) == (0, -1)
    if problem == 3:
        assert int(idx[at]) in idx[:at].tolist()
        assert len(set(idx[:at].tolist())) == at


def _fields(capacity: int, block_size: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 2**63, size=capacity, dtype=np.uint64),
        rng.integers(0, 2**63, size=capacity, dtype=np.uint64),
        rng.integers(0, 2, size=capacity).astype(np.uint8),
        rng.integers(0, 2**63, size=capacity, dtype=np.uint64),
        rng.integers(0, 1000, size=capacity).astype(np.int32),
        rng.integers(0, 2**32, size=capacity * block_size, dtype=np.uint64).astype(np.uint32),
        rng.integers(0, 4, size=capacity).astype(np.int8),
    )


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    capacity=st.integers(1, 30),
    count=st.integers(0, 12),
    with_tokens=st.booleans(),
    bad=st.sampled_from(["none", "outside", "short-column", "short-tokens"]),
)
def test_publish_slots_twins_agree(
    seed: int, capacity: int, count: int, with_tokens: bool, bad: str
) -> None:
    block_size = 4
    rng = np.random.default_rng(seed)
    count = min(count, capacity)
    idx = rng.permutation(capacity)[:count].astype(np.intp)
    words = rng.integers(0, 2**64, size=(count, 4), dtype=np.uint64)  # strided columns
    has_parent = rng.integers(0, 2, size=count).astype(bool)
    positions = rng.integers(0, MAX_POSITION + 1, size=count).astype(np.int64)
    tokens = rng.integers(0, 2**32, size=count * block_size, dtype=np.uint64).astype(np.uint32)
    seqs = words[:, 0]
    if bad == "outside" and count:
        idx[rng.integers(count)] = capacity + int(rng.integers(0, 3))
    elif bad == "short-column" and count:
        seqs = seqs[1:]
    elif bad == "short-tokens" and count and with_tokens:
        tokens = tokens[1:]
    impls: list[Any] = [g2._publish_slots_py] + ([_C.publish_slots] if _C is not None else [])
    results: list[list[Any] | None] = []
    for impl in impls:
        fields = _fields(capacity, block_size, seed)
        before = [column.copy() for column in fields]
        args = (fields, idx, seqs, words[:, 1], has_parent, words[:, 2], positions)
        try:
            impl(*args, tokens if with_tokens else None)
        except ValueError:
            assert all(np.array_equal(a, b) for a, b in zip(fields, before, strict=True))
            results.append(None)
            continue
        results.append([column.tolist() for column in fields])
        assert fields[6][idx].tolist() == [READY] * count
        rows = fields[5].reshape(capacity, block_size)[idx]
        assert rows.reshape(-1).tolist() == (tokens.tolist() if with_tokens else [0] * rows.size)
        assert fields[2][idx].tolist() == has_parent.astype(np.uint8).tolist()
    assert all(result == results[0] for result in results)
    assert (results[0] is None) == (bad != "none" and count > 0 and not (
        bad == "short-tokens" and not with_tokens
    ))  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), capacity=st.integers(1, 30), count=st.integers(0, 12))
def test_release_slots_twins_agree(seed: int, capacity: int, count: int) -> None:
    rng = np.random.default_rng(seed)
    count = min(count, capacity)
    idx = rng.permutation(capacity)[:count].astype(np.intp)
    impls: list[Any] = [g2._release_slots_py] + ([_C.release_slots] if _C is not None else [])
    results = []
    for impl in impls:
        gen = np.arange(capacity, dtype=np.int64) * 3
        state, owner = _slot_arrays(np.random.default_rng(seed), capacity)
        impl(gen, owner, state, idx)
        results.append((gen.tolist(), owner.tolist(), state.tolist()))
        assert state[idx].tolist() == [FREE] * count
        assert owner[idx].tolist() == [NO_OWNER] * count
        assert gen[idx].tolist() == (idx * 3 + 1).tolist()
    assert all(result == results[0] for result in results)
    for impl in impls:
        gen = np.zeros(capacity, dtype=np.int64)
        state, owner = _slot_arrays(np.random.default_rng(seed), capacity)
        before = (gen.copy(), owner.copy(), state.copy())
        with pytest.raises(ValueError):
            impl(gen, owner, state, np.array([0, capacity], dtype=np.intp))
        assert all(np.array_equal(a, b) for a, b in zip((gen, owner, state), before, strict=True))


@needs_c
def test_the_slot_writers_refuse_arrays_of_the_wrong_type() -> None:
    assert _C is not None
    gen = np.zeros(4, dtype=np.int64)
    state, owner = np.zeros(4, dtype=np.int8), np.zeros(4, dtype=np.int16)
    with pytest.raises(TypeError):
        _C.release_slots(gen.astype(np.int32), owner, state, np.array([0], dtype=np.intp))
    with pytest.raises(TypeError):
        _C.check_reserved(state, owner.astype(np.int32), np.array([0]), 0, np.zeros(4, np.intp))
    with pytest.raises(TypeError):
        _C.publish_slots(_fields(4, 2, 0)[:6], np.array([0]), *([np.zeros(1)] * 5), None)
    assert gen.tolist() == [0] * 4
