"""The fast hashing paths (`hash_blocks`' one-loop mode 0 path, `hash_block`, the native-u64
sequence-hash input, `PrefixHashCache`) pinned bit for bit to the slow reference
(`local_block_hashes`, `chain_sequence_hashes`, `make_plh`), over random data and at every
position near the PLH mode boundaries (255/256, 65535/65536, the last position)."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings, strategies as st

from shmkv.hashing import (
    MAX_POSITION,
    BlockHashes,
    PrefixHashCache,
    _chain,
    _common_blocks,
    _pack_seq_input,
    chain_sequence_hashes,
    hash_block,
    hash_blocks,
    local_block_hashes,
    make_plh,
    token_bytes,
)

U64_MAX = (1 << 64) - 1
U64 = st.integers(min_value=0, max_value=U64_MAX)
# parents with every bit pattern that matters to a 59-, 55- or 51-bit fragment
EDGE_PARENTS = [0, 1, (1 << 51) - 1, 1 << 51, (1 << 59) - 1, 1 << 59, 1 << 63, U64_MAX]
BOUNDARY_POSITIONS = [
    0,
    1,
    200,
    253,
    254,
    255,
    256,
    257,
    65_533,
    65_534,
    65_535,
    65_536,
    65_537,
    MAX_POSITION - 2,
    MAX_POSITION - 1,
    MAX_POSITION,
]


def reference(tokens: list[int], block_size: int, parent: int | None, position: int) -> BlockHashes:
    """`hash_blocks` rebuilt from the slow public functions, one block at a time."""
    locals_ = local_block_hashes(tokens, block_size)
    seqs = chain_sequence_hashes(locals_, parent)
    parents = [parent, *seqs][: len(seqs)]
    plhs = [
        make_plh(seq, up, position + i)
        for i, (seq, up) in enumerate(zip(seqs, parents, strict=True))
    ]
    return BlockHashes(locals_, seqs, plhs)


def random_tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.getrandbits(32) for _ in range(count)]


@settings(max_examples=300)
@given(
    seed=st.integers(min_value=0, max_value=1 << 30),
    block_size=st.integers(min_value=1, max_value=20),
    num_blocks=st.integers(min_value=0, max_value=12),
    extra_tokens=st.integers(min_value=0, max_value=3),
    parent=st.none() | st.sampled_from(EDGE_PARENTS) | U64,
    anchor=st.sampled_from(BOUNDARY_POSITIONS),
    shift=st.integers(min_value=-12, max_value=2),
)
def test_hash_blocks_equals_the_slow_reference_near_mode_boundaries(
    seed: int,
    block_size: int,
    num_blocks: int,
    extra_tokens: int,
    parent: int | None,
    anchor: int,
    shift: int,
) -> None:
    """Chains that start, end or cross a mode boundary, from bytes and from a memoryview."""
    position = max(0, min(anchor + shift, MAX_POSITION + 1 - max(1, num_blocks)))
    tokens = random_tokens(random.Random(seed), num_blocks * block_size + extra_tokens % block_size)
    data = token_bytes(tokens)
    expected = reference(tokens, block_size, parent, position)
    assert hash_blocks(data, block_size, parent, position) == expected
    assert hash_blocks(memoryview(data), block_size, parent, position) == expected


@pytest.mark.parametrize("position", [0, 1, 100, 254])
@pytest.mark.parametrize("parent", [None, *EDGE_PARENTS])
def test_hash_blocks_mode0_fast_path_up_to_the_last_mode0_block(
    position: int, parent: int | None
) -> None:
    """The one-loop path covers chains that end at position 254 exactly (`_FAST_PLH_END`)."""
    block_size = 3
    num_blocks = 255 - position
    tokens = random_tokens(random.Random(position), num_blocks * block_size)
    expected = reference(tokens, block_size, parent, position)
    assert hash_blocks(token_bytes(tokens), block_size, parent, position) == expected


@settings(max_examples=300)
@given(
    tokens=st.lists(st.integers(min_value=0, max_value=(1 << 32) - 1), min_size=1, max_size=20),
    parent=st.none() | st.sampled_from(EDGE_PARENTS) | U64,
    position=st.sampled_from(BOUNDARY_POSITIONS) | st.integers(min_value=0, max_value=300),
)
def test_hash_block_equals_the_slow_reference(
    tokens: list[int], parent: int | None, position: int
) -> None:
    [local] = local_block_hashes(tokens, len(tokens))
    [current] = chain_sequence_hashes([local], parent)
    expected = (local, current, make_plh(current, parent, position))
    data = token_bytes(tokens)
    assert hash_block(data, parent, position) == expected
    assert hash_block(memoryview(data), parent, position) == expected


@given(first=U64, second=U64)
def test_sequence_hash_input_is_two_u64_little_endian(first: int, second: int) -> None:
    assert _pack_seq_input(first, second) == struct.pack("<QQ", first, second)


@given(locals_=st.lists(U64, max_size=10), parent=st.none() | U64)
def test_chain_equals_chain_sequence_hashes(locals_: list[int], parent: int | None) -> None:
    assert _chain(locals_, parent) == chain_sequence_hashes(locals_, parent)


# ── PrefixHashCache ───────────────────────────────────────────────────────────────────────


def brute_common_blocks(a: bytes, b: bytes, step: int, limit: int) -> int:
    shared = 0
    while (
        shared < limit
        and a[shared * step : (shared + 1) * step] == b[shared * step : (shared + 1) * step]
    ):
        shared += 1
    return shared


@given(
    shared=st.integers(min_value=1, max_value=40),
    tail_a=st.integers(min_value=0, max_value=5),
    tail_b=st.integers(min_value=0, max_value=5),
    step=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=1 << 30),
    guess=st.integers(min_value=0, max_value=50),
)
def test_common_blocks_equals_a_linear_scan(
    shared: int, tail_a: int, tail_b: int, step: int, seed: int, guess: int
) -> None:
    """With any guess (right, one off either way, beyond the limit or none)."""
    rng = random.Random(seed)
    prefix = rng.randbytes(shared * step)
    a = prefix + bytes([1]) * (tail_a * step)
    b = prefix + bytes([2]) * (tail_b * step)
    limit = min(len(a), len(b)) // step
    expected = brute_common_blocks(a, b, step, limit)
    for hint in (guess, expected - 1, expected, expected + 1, limit):
        assert _common_blocks(a, b, step, limit, hint) == expected


@settings(max_examples=60)
@given(
    seed=st.integers(min_value=0, max_value=1 << 30),
    block_size=st.integers(min_value=1, max_value=6),
    max_prompts=st.integers(min_value=1, max_value=4),
    max_blocks=st.integers(min_value=0, max_value=60),
)
def test_prefix_hash_cache_equals_hash_blocks_over_a_prompt_stream(
    seed: int, block_size: int, max_prompts: int, max_blocks: int
) -> None:
    """Prompts that share system prompts and chat histories (identical, extended, cut, with a
    trailing partial block): every result equals `hash_blocks`, and is a fresh copy."""
    rng = random.Random(seed)
    systems = [random_tokens(rng, rng.randrange(0, 6 * block_size)) for _ in range(3)]
    cache = PrefixHashCache(block_size, max_prompts=max_prompts, max_blocks=max_blocks)
    history: list[list[int]] = []
    for _ in range(25):
        roll = rng.random()
        if history and roll < 0.3:
            tokens = rng.choice(history) + random_tokens(rng, rng.randrange(0, 3 * block_size))
        elif history and roll < 0.4:
            old = rng.choice(history)
            tokens = old[: rng.randrange(0, len(old) + 1)]
        else:
            tokens = rng.choice(systems) + random_tokens(rng, rng.randrange(0, 8 * block_size))
        history.append(tokens)
        data = token_bytes(tokens)
        got = cache.hash_blocks(data)
        assert got == hash_blocks(data, block_size)
        got.local_hashes.append(1)  # a caller may keep and extend the lists
        got.seq_hashes.clear()
        got.plhs.append(2)


@pytest.mark.parametrize("num_tokens", [0, 3, 8, 9])
def test_hash_blocks_and_the_cache_return_a_block_hashes_of_fresh_lists(num_tokens: int) -> None:
    """`BlockHashes` built by `tuple.__new__` (the fast construction) is the named tuple itself:
    its type, fields, equality and unpacking; the cache's lists are not its own."""
    data = token_bytes(random_tokens(random.Random(num_tokens), num_tokens))
    cache = PrefixHashCache(4)
    for got in (hash_blocks(data, 4), cache.hash_blocks(data), cache.hash_blocks(data)):
        assert type(got) is BlockHashes
        assert got._fields == ("local_hashes", "seq_hashes", "plhs")
        local_hashes, seq_hashes, plhs = got
        assert got == BlockHashes(local_hashes, seq_hashes, plhs)
        assert (got.local_hashes, got.seq_hashes, got.plhs) == (local_hashes, seq_hashes, plhs)
        assert all(type(part) is list for part in got)
        assert len(seq_hashes) == len(local_hashes) == len(plhs) == num_tokens // 4
    first, second = cache.hash_blocks(data), cache.hash_blocks(data)
    assert first == second
    assert all(a is not b for a, b in zip(first, second, strict=True))
