"""The C accelerator of the hashing loop (`shmkv/_blockhash.c`): bit for bit the slow reference
(`local_block_hashes`, `chain_sequence_hashes`, `make_plh`), typed errors on bad input, and used
exactly when the core runs compiled."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from hypothesis import given, strategies as st

import shmkv
from shmkv import hashing
from shmkv.hashing import chain_sequence_hashes, local_block_hashes, make_plh

U64_MAX = (1 << 64) - 1
EDGE_PARENTS = [0, 1, (1 << 59) - 1, 1 << 59, 1 << 63, U64_MAX]


def _accelerator(name: str = "hash_mode0") -> Any:
    accel = hashing._ACCEL
    if accel is None:
        pytest.skip("the core runs from source: no C accelerator in use")
    return getattr(accel, name)


def _reference(
    data: bytes, step: int, count: int, parent: int | None, position: int
) -> tuple[list[int], list[int], list[int]]:
    tokens = [int.from_bytes(data[i : i + 4], "little") for i in range(0, count * step, 4)]
    locals_ = local_block_hashes(tokens, step // 4)
    seqs = chain_sequence_hashes(locals_, parent)
    plhs = [make_plh(seq, seqs[i - 1] if i else parent, position + i) for i, seq in enumerate(seqs)]
    return locals_, seqs, plhs


def test_the_compiled_core_uses_the_accelerator() -> None:
    if os.environ.get("SHMKV_EXPECT_COMPILED") != "1":
        pytest.skip("no compiled core expected here (scripts/test.sh sets SHMKV_EXPECT_COMPILED)")
    assert shmkv.core_mode() == "compiled"
    assert hashing._ACCEL_MODE0 is not None
    assert hashing._ACCEL_ONE is not None


@pytest.mark.pure_core
def test_the_source_core_runs_the_python_loop() -> None:
    assert hashing._ACCEL is hashing._ACCEL_MODE0 is hashing._ACCEL_ONE is None


@given(
    count=st.integers(min_value=0, max_value=40),
    block_tokens=st.sampled_from([1, 2, 3, 16]),
    parent=st.one_of(st.none(), st.sampled_from(EDGE_PARENTS), st.integers(0, U64_MAX)),
    seed=st.integers(0, 1 << 30),
    extra=st.integers(min_value=0, max_value=3),
    data=st.data(),
)
def test_it_equals_the_reference(
    count: int, block_tokens: int, parent: int | None, seed: int, extra: int, data: st.DataObject
) -> None:
    accel = _accelerator()
    step = 4 * block_tokens
    position = data.draw(st.integers(min_value=0, max_value=255 - count))
    raw = random.Random(seed).randbytes(count * step + extra)  # a trailing partial is ignored
    assert accel(raw, step, count, parent, position) == _reference(
        raw, step, count, parent, position
    )


def test_its_first_block_without_parent_is_its_own_sequence_hash() -> None:
    accel = _accelerator()
    locals_, seqs, plhs = accel(bytes(range(64)), 64, 1, None, 7)
    assert seqs == locals_
    assert plhs == [make_plh(seqs[0], None, 7)]
    assert accel(b"", 64, 0, None, 0) == ([], [], [])


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((bytes(64), 64, 1, None, 255), ValueError, "position \\+ count <= 255"),
        ((bytes(128), 64, 2, None, 254), ValueError, "position \\+ count <= 255"),
        ((bytes(64), 64, 1, None, -1), ValueError, "0 <= position"),
        ((bytes(64), 0, 1, None, 0), ValueError, "step > 0"),
        ((bytes(64), 64, -1, None, 0), ValueError, "count >= 0"),
        ((bytes(127), 64, 2, None, 0), ValueError, "127 bytes hold fewer than 2 blocks of 64"),
        ((bytes(64), 64, 1, -1, 0), OverflowError, "negative"),
        ((bytes(64), 64, 1, 1 << 64, 0), OverflowError, "too big"),
        ((bytes(64), 64, 1, "parent", 0), TypeError, "an integer is required"),
        (("tokens", 64, 1, None, 0), TypeError, "bytes-like object is required"),
        ((bytes(64), 64, 1, None), TypeError, "takes 5 arguments \\(4 given\\)"),
    ],
)
def test_bad_input_raises_a_typed_error(
    args: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    accel = _accelerator()
    with pytest.raises(error, match=match):
        accel(*args)


@given(
    block_tokens=st.sampled_from([0, 1, 16, 17]),
    parent=st.one_of(st.none(), st.sampled_from(EDGE_PARENTS), st.integers(0, U64_MAX)),
    position=st.integers(min_value=0, max_value=254),
    seed=st.integers(0, 1 << 30),
)
def test_one_block_equals_the_reference(
    block_tokens: int, parent: int | None, position: int, seed: int
) -> None:
    hash_one = _accelerator("hash_one")
    raw = random.Random(seed).randbytes(4 * block_tokens)
    local = hashing.local_hash_of_bytes(raw)
    seq = hashing.sequence_hash(parent, local)
    expected = (local, seq, make_plh(seq, parent, position))
    assert hash_one(raw, parent, position) == expected
    assert hash_one(memoryview(raw), parent, position) == expected


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((bytes(64), None, 255), ValueError, "position < 255"),
        ((bytes(64), None, -1), ValueError, "0 <= position"),
        ((bytes(64), -1, 0), OverflowError, "negative"),
        (("tokens", None, 0), TypeError, "bytes-like object is required"),
        ((bytes(64), None), TypeError, "takes 3 arguments \\(2 given\\)"),
    ],
)
def test_one_block_bad_input_raises_a_typed_error(
    args: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    hash_one = _accelerator("hash_one")
    with pytest.raises(error, match=match):
        hash_one(*args)
