"""`g2._low_fragments_distinct`, the shortcut of `G2Directory._duplicates`: when it says the
blocks' low fragments differ, their PLHs must differ too, for every position (all three PLH
modes) and parent."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from shmkv import g2
from shmkv.hashing import _MODE_LIMITS, MAX_POSITION, make_plh

_U64 = st.integers(0, 2**64 - 1)
_POSITIONS = st.one_of(st.integers(0, 300), st.integers(0, 70_000), st.integers(0, MAX_POSITION))


def test_the_narrowest_fragment_is_pinned() -> None:
    assert min(frag_bits for *_rest, frag_bits in _MODE_LIMITS) == g2._MIN_FRAG_BITS


@settings(max_examples=300, deadline=None)
@given(
    seqs=st.lists(_U64, min_size=0, max_size=12),
    twins=st.lists(st.tuples(st.integers(0, 11), st.integers(51, 63)), max_size=3),
    positions=st.lists(_POSITIONS, min_size=12, max_size=12),
    parents=st.lists(st.one_of(st.none(), _U64), min_size=12, max_size=12),
)
def test_distinct_low_fragments_mean_distinct_plhs(
    seqs: list[int],
    twins: list[tuple[int, int]],
    positions: list[int],
    parents: list[int | None],
) -> None:
    for k, bit in twins:  # a block differing from another only above the narrowest fragment
        if k < len(seqs):
            seqs.append(seqs[k] ^ (1 << bit))
    seqs = list(dict.fromkeys(seqs))[:12]
    plhs = [make_plh(s, p, pos) for s, p, pos in zip(seqs, parents, positions, strict=False)]
    arr = np.array(seqs, dtype=np.uint64)
    if g2._low_fragments_distinct(arr):
        assert len(set(plhs)) == len(plhs)
    low = [s & ((1 << g2._MIN_FRAG_BITS) - 1) for s in seqs]
    assert g2._low_fragments_distinct(arr) == (len(set(low)) == len(low))
    assert g2._low_fragments_distinct(None) is False
