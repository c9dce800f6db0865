"""Block identities (behavior.md §1): local and chained sequence hashes bit-identical to
Dynamo's router, PLH packing across the mode boundaries, and input validation."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given, strategies as st

from shmkv.errors import ConfigError
from shmkv.hashing import (
    MAX_POSITION,
    chain_sequence_hashes,
    hash_block,
    hash_blocks,
    lineage_key,
    lineage_parent_key,
    local_block_hashes,
    make_plh,
    plh_current_fragment,
    plh_parent_fragment,
    plh_position,
    sequence_hash,
    sequence_hashes,
    token_bytes,
)

SEED = 1337
U32_MAX = (1 << 32) - 1
U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
TOKENS = st.lists(st.integers(min_value=0, max_value=U32_MAX), max_size=80)
BLOCK_SIZES = st.integers(min_value=1, max_value=17)


# ── independent reference (xxhash + struct only, no shmkv code) ──────────────────────────


def ref_local(block: list[int]) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack(f"<{len(block)}I", *block), seed=SEED)


def ref_locals(tokens: list[int], block_size: int) -> list[int]:
    n = len(tokens) // block_size
    return [ref_local(tokens[i * block_size : (i + 1) * block_size]) for i in range(n)]


def ref_seqs(tokens: list[int], block_size: int) -> list[int]:
    out: list[int] = []
    for local in ref_locals(tokens, block_size):
        out.append(
            local
            if not out
            else xxhash.xxh3_64_intdigest(struct.pack("<QQ", out[-1], local), seed=SEED)
        )
    return out


# ── fixed vectors ────────────────────────────────────────────────────────────────────────


def test_local_hash_fixed_vector_matches_dynamo_1_6_1() -> None:
    # Checked against Dynamo 1.6.1 `compute_block_hash_for_seq(list(range(32)), 16)`.
    assert local_block_hashes(list(range(32)), 16) == [
        15310707395893867146,
        15292316782987903195,
    ]


def test_local_hash_ignores_trailing_partial_block() -> None:
    assert local_block_hashes(list(range(40)), 16) == local_block_hashes(list(range(32)), 16)
    assert local_block_hashes(list(range(15)), 16) == []
    assert local_block_hashes([], 16) == []


def test_local_hash_is_xxh3_seed_1337_over_le_u32() -> None:
    tokens = [0, 1, 0xFFFF_FFFF, 0x0102_0304]
    raw = b"\x00\x00\x00\x00\x01\x00\x00\x00\xff\xff\xff\xff\x04\x03\x02\x01"
    assert token_bytes(tokens) == raw
    assert local_block_hashes(tokens, 4) == [xxhash.xxh3_64_intdigest(raw, seed=1337)]


def test_local_hash_is_position_independent() -> None:
    block = [7, 8, 9, 10]
    hashes = local_block_hashes([1, 2, 3, 4, *block, *block], 4)
    assert hashes[1] == hashes[2] == local_block_hashes(block, 4)[0]


def test_sequence_hash_fixed_vector() -> None:
    locals_ = [15310707395893867146, 15292316782987903195]
    second = xxhash.xxh3_64_intdigest(struct.pack("<QQ", locals_[0], locals_[1]), seed=1337)
    assert sequence_hashes(list(range(32)), 16) == [locals_[0], second]
    assert second == 13769157705258532664  # pinned literal (computed with xxhash + struct)


def test_sequence_hash_chains_parent_then_local() -> None:
    tokens = list(range(100, 148))
    locals_ = local_block_hashes(tokens, 16)
    seqs = sequence_hashes(tokens, 16)
    assert seqs[0] == locals_[0], "first block: sequence hash = local hash"
    for i in range(1, 3):
        packed = struct.pack("<QQ", seqs[i - 1], locals_[i])
        assert seqs[i] == xxhash.xxh3_64_intdigest(packed, seed=1337)
        assert seqs[i] == sequence_hash(seqs[i - 1], locals_[i])
    assert sequence_hash(None, locals_[0]) == locals_[0]
    assert seqs == ref_seqs(tokens, 16)


def test_identical_block_under_different_prefix_has_different_sequence_hash() -> None:
    block = [5, 6, 7, 8]
    a = sequence_hashes([1, 1, 1, 1, *block], 4)
    b = sequence_hashes([2, 2, 2, 2, *block], 4)
    assert (
        local_block_hashes([1, 1, 1, 1, *block], 4)[1]
        == local_block_hashes([2, 2, 2, 2, *block], 4)[1]
    )
    assert a[1] != b[1]


def test_chain_sequence_hashes_continues_after_parent() -> None:
    tokens = list(range(64))
    seqs = sequence_hashes(tokens, 16)
    locals_ = local_block_hashes(tokens, 16)
    assert chain_sequence_hashes(locals_[2:], parent=seqs[1]) == seqs[2:]
    assert chain_sequence_hashes([]) == []


# ── PLH packing ──────────────────────────────────────────────────────────────────────────

# (position, mode, fragment bits of that mode)
_MODES = [(0, 0, 59), (254, 0, 59), (255, 0, 59), (256, 1, 55), (65_535, 1, 55), (65_536, 2, 51)]


@pytest.mark.parametrize(("position", "mode", "frag_bits"), _MODES)
def test_plh_fields_round_trip(position: int, mode: int, frag_bits: int) -> None:
    current, parent = 0xDEAD_BEEF_CAFE_F00D, 0x0123_4567_89AB_CDEF
    plh = make_plh(current, parent if position else None, position)
    assert plh >> 126 == mode
    assert plh < 1 << 128
    assert plh_position(plh) == position
    expected_parent = 0 if position == 0 else parent & ((1 << frag_bits) - 1)
    assert plh_parent_fragment(plh) == expected_parent
    # The current fragment is cut to what the child's parent fragment will hold.
    next_bits = {255: 55, 65_535: 51}.get(position, frag_bits)
    assert plh_current_fragment(plh) == current & ((1 << next_bits) - 1)


@pytest.mark.parametrize(
    "parent_position", [0, 254, 255, 256, 65_534, 65_535, 65_536, MAX_POSITION - 1]
)
def test_child_parent_fragment_equals_parent_current_fragment(parent_position: int) -> None:
    grand, parent_hash, child_hash = (1 << 64) - 3, (1 << 64) - 1, 0xAAAA_AAAA_AAAA_AAAA
    parent = make_plh(parent_hash, grand if parent_position else None, parent_position)
    child = make_plh(child_hash, parent_hash, parent_position + 1)
    assert plh_parent_fragment(child) == plh_current_fragment(parent)
    assert lineage_parent_key(child) == lineage_key(parent)
    assert lineage_parent_key(make_plh(child_hash, None, 0)) is None


@given(
    current=U64,
    parent=U64,
    position=st.sampled_from([0, 1, 200, 255, 256, 300, 65_535, 65_536, 70_000]),
)
def test_plh_parent_fragment_property(current: int, parent: int, position: int) -> None:
    parent_plh = make_plh(parent, current if position else None, position)
    child = make_plh(current, parent, position + 1)
    assert plh_parent_fragment(child) == plh_current_fragment(parent_plh)
    assert plh_position(child) == position + 1


@pytest.mark.parametrize(
    ("position", "mode", "pos_bits", "frag"),
    [(7, 0, 8, 59), (300, 1, 16, 55), (70_000, 2, 24, 51)],
)
def test_plh_bit_layout(position: int, mode: int, pos_bits: int, frag: int) -> None:
    """`[mode:2][position:P][parent fragment:M][current fragment:N]`, 128 bits in all."""
    current, parent = 0xFEDC_BA98_7654_3210, 0x0F1E_2D3C_4B5A_6978
    mask = (1 << frag) - 1
    assert 2 + pos_bits + 2 * frag == 128
    expected = (
        (mode << 126) | (position << (2 * frag)) | ((parent & mask) << frag) | (current & mask)
    )
    assert make_plh(current, parent, position) == expected


def test_plh_distinguishes_position_and_parent() -> None:
    assert make_plh(5, None, 0) != make_plh(5, None, 1)
    assert make_plh(5, 1, 1) != make_plh(5, 2, 1)


def test_plh_position_limits() -> None:
    assert plh_position(make_plh(1, 2, MAX_POSITION)) == MAX_POSITION
    assert plh_current_fragment(make_plh((1 << 64) - 1, 2, MAX_POSITION)) == (1 << 51) - 1
    with pytest.raises(ConfigError):
        make_plh(1, 2, MAX_POSITION + 1)
    with pytest.raises(ConfigError):
        make_plh(1, None, -1)


# ── validation ───────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("bad", [[-1], [1 << 32], [1, 2, 3, (1 << 32) + 5], [1.5]])
def test_tokens_outside_u32_raise_config_error(bad: list[int]) -> None:
    with pytest.raises(ConfigError):
        local_block_hashes(bad, 1)
    with pytest.raises(ConfigError):
        sequence_hashes(bad, 1)
    with pytest.raises(ConfigError):
        token_bytes(bad)


def test_u32_bounds_are_accepted() -> None:
    assert local_block_hashes([0, U32_MAX], 2) == [ref_local([0, U32_MAX])]


@pytest.mark.parametrize("block_size", [0, -4])
def test_bad_block_size_raises_config_error(block_size: int) -> None:
    with pytest.raises(ConfigError):
        local_block_hashes([1, 2, 3, 4], block_size)
    with pytest.raises(ConfigError):
        sequence_hashes([1, 2, 3, 4], block_size)


# ── properties ───────────────────────────────────────────────────────────────────────────


@given(tokens=TOKENS, block_size=BLOCK_SIZES, cut=st.integers(min_value=0, max_value=80))
def test_hashes_are_deterministic_and_prefix_closed(
    tokens: list[int], block_size: int, cut: int
) -> None:
    locals_ = local_block_hashes(tokens, block_size)
    seqs = sequence_hashes(tokens, block_size)
    assert locals_ == local_block_hashes(list(tokens), block_size)
    assert seqs == sequence_hashes(list(tokens), block_size)
    assert len(locals_) == len(seqs) == len(tokens) // block_size
    prefix = tokens[:cut]
    assert local_block_hashes(prefix, block_size) == locals_[: len(prefix) // block_size]
    assert sequence_hashes(prefix, block_size) == seqs[: len(prefix) // block_size]
    assert all(0 <= h < 1 << 64 for h in locals_ + seqs)


@given(tokens=TOKENS, block_size=BLOCK_SIZES)
def test_hashes_match_independent_reference(tokens: list[int], block_size: int) -> None:
    assert local_block_hashes(tokens, block_size) == ref_locals(tokens, block_size)
    assert sequence_hashes(tokens, block_size) == ref_seqs(tokens, block_size)


@given(
    tokens=st.lists(st.integers(min_value=0, max_value=U32_MAX), max_size=64),
    parent=st.none() | U64,
    position=st.sampled_from([0, 1, 200, 250, 253, 254, 255, 300, 65_534, 65_535]),
)
def test_hash_blocks_and_hash_block_pack_plhs_like_make_plh(
    tokens: list[int], parent: int | None, position: int
) -> None:
    """The inlined PLH packing (mode 0 fast paths) and the general one agree, on both sides
    of the mode boundary, with and without a parent, from bytes or a memoryview."""
    block_size = 4
    data = token_bytes(tokens)
    hashes = hash_blocks(data, block_size, parent, position)
    assert hash_blocks(memoryview(data), block_size, parent, position) == hashes
    expected_locals = ref_locals(tokens, block_size)
    assert hashes.local_hashes == expected_locals
    prev = parent
    for i, local in enumerate(expected_locals):
        seq = local if prev is None else sequence_hash(prev, local)
        plh = make_plh(seq, prev, position + i)
        assert (hashes.seq_hashes[i], hashes.plhs[i]) == (seq, plh)
        block = data[4 * block_size * i : 4 * block_size * (i + 1)]
        assert hash_block(block, prev, position + i) == (local, seq, plh)
        prev = seq


# ── optional parity with the real router package ─────────────────────────────────────────


def test_local_hashes_match_dynamo_compute_block_hash_for_seq() -> None:
    """Parity with `ai-dynamo-runtime==1.6.1` (the `interop` extra); skipped when absent."""
    dynamo = pytest.importorskip("dynamo._core")

    @given(tokens=TOKENS, block_size=st.integers(min_value=1, max_value=64))
    def check(tokens: list[int], block_size: int) -> None:
        expected = [int(h) for h in dynamo.compute_block_hash_for_seq(tokens, block_size)]
        assert local_block_hashes(tokens, block_size) == expected

    check()
    assert dynamo.compute_block_hash_for_seq(list(range(32)), 16) == local_block_hashes(
        list(range(32)), 16
    )
