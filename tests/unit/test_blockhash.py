"""The C accelerator of the hashing loop (`shmkv/_blockhash.c`): bit for bit the slow reference
(`local_block_hashes`, `chain_sequence_hashes`, `make_plh`), typed errors on bad input, and used
exactly when the core runs compiled."""

from __future__ import annotations

import os
import random
from array import array
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


# ── the other helpers: hash_one_at, mode0_frags, crossing_words, pop_all, get_all ────────


@given(
    block_tokens=st.sampled_from([1, 16]),
    num_blocks=st.integers(min_value=1, max_value=5),
    parent=st.one_of(st.none(), st.sampled_from(EDGE_PARENTS), st.integers(0, U64_MAX)),
    position=st.integers(min_value=0, max_value=254),
    seed=st.integers(0, 1 << 30),
    data=st.data(),
)
def test_one_block_in_place_equals_one_block(
    block_tokens: int,
    num_blocks: int,
    parent: int | None,
    position: int,
    seed: int,
    data: st.DataObject,
) -> None:
    hash_one_at = _accelerator("hash_one_at")
    hash_one = _accelerator("hash_one")
    rng = random.Random(seed)
    tokens = array("I", [rng.getrandbits(32) for _ in range(num_blocks * block_tokens + 1)])
    index = data.draw(st.integers(min_value=0, max_value=num_blocks - 1))
    step = 4 * block_tokens
    block = tokens[index * block_tokens : (index + 1) * block_tokens].tobytes()
    expected = hash_one(block, parent, position)
    assert hash_one_at(tokens, index * step, step, parent, position) == expected
    assert hash_one_at(tokens.tobytes(), index * step, step, parent, position) == expected


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((bytes(64), 0, 64, None, 255), ValueError, "position < 255"),
        ((bytes(64), -1, 64, None, 0), ValueError, "start >= 0"),
        ((bytes(64), 0, -1, None, 0), ValueError, "length >= 0"),
        ((bytes(64), 1, 64, None, 0), ValueError, "bytes 1..65 lie beyond the 64 bytes"),
        ((bytes(64), 0, 64, -1, 0), OverflowError, "negative"),
        (("tokens", 0, 4, None, 0), TypeError, "bytes-like object is required"),
        ((bytes(64), 0, 64, None), TypeError, "takes 5 arguments \\(4 given\\)"),
    ],
)
def test_one_block_in_place_bad_input_raises_a_typed_error(
    args: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    hash_one_at = _accelerator("hash_one_at")
    with pytest.raises(error, match=match):
        hash_one_at(*args)


@given(st.lists(st.one_of(st.sampled_from(EDGE_PARENTS), st.integers(0, U64_MAX)), max_size=20))
def test_fragments_are_the_masked_hashes(hashes: list[int]) -> None:
    mode0_frags = _accelerator("mode0_frags")
    assert mode0_frags(hashes) == [h & ((1 << 59) - 1) for h in hashes]


@pytest.mark.parametrize(
    ("arg", "error", "match"),
    [
        ((1, 2), TypeError, "needs a list of ints"),
        ([1, "2"], TypeError, "needs a list of ints"),
        ([-1], OverflowError, "negative"),
        ([1 << 64], OverflowError, "too big"),
    ],
)
def test_fragments_bad_input_raises_a_typed_error(
    arg: Any, error: type[Exception], match: str
) -> None:
    mode0_frags = _accelerator("mode0_frags")
    with pytest.raises(error, match=match):
        mode0_frags(arg)


def _crossing_reference(
    rng: random.Random, num_tokens: int, positions: list[int], offset: int
) -> tuple[bytes, list[int]]:
    """The Python path of `extend_crossing_words`, cut by hand."""
    data = rng.randbytes(4 * (num_tokens + 4 * len(positions)))
    tokens = b""
    ids = []
    start = 0
    for j, position in enumerate(positions):
        end = 4 * (offset + position + 1) + 16 * j
        tokens += data[start:end]
        ids.append(int.from_bytes(data[end : end + 16], "little"))
        start = end + 16
    return tokens + data[start:], ids


@given(
    num_tokens=st.integers(min_value=0, max_value=300),
    seed=st.integers(0, 1 << 30),
    data=st.data(),
)
def test_crossing_words_equal_the_python_draw(
    num_tokens: int, seed: int, data: st.DataObject
) -> None:
    crossing_words = _accelerator("crossing_words")
    offset = data.draw(st.integers(min_value=0, max_value=num_tokens))
    positions = sorted(
        data.draw(st.sets(st.integers(min_value=0, max_value=max(0, num_tokens - offset - 1))))
    )
    if offset >= num_tokens:
        positions = []
    ours, theirs = random.Random(seed), random.Random(seed)
    assert crossing_words(ours, num_tokens, positions, offset) == _crossing_reference(
        theirs, num_tokens, positions, offset
    )
    assert ours.getrandbits(64) == theirs.getrandbits(64)  # the same stream goes on


def test_crossing_words_ids_keep_their_high_words() -> None:
    crossing_words = _accelerator("crossing_words")

    class Fixed(random.Random):
        def getrandbits(self, k: int) -> int:
            return (1 << k) - 1  # all ones: each id is 2**128 - 1

    tokens, ids = crossing_words(Fixed(), 2, [0, 1], 0)
    assert tokens == b"\xff" * 8
    assert ids == [(1 << 128) - 1] * 2


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((3, [1, 0], 0), ValueError, "positions must ascend"),
        ((3, [3], 0), ValueError, "offset \\+ position < num_tokens"),
        ((3, [1], 2), ValueError, "offset \\+ position < num_tokens"),
        ((3, [-1], 0), ValueError, "positions must ascend"),
        ((-1, [], 0), ValueError, "num_tokens >= 0"),
        ((3, [], -1), ValueError, "offset >= 0"),
        ((3, (0,), 0), TypeError, "positions must be a list"),
        ((3, ["0"], 0), TypeError, "an integer is required"),
        ((3, []), TypeError, "takes 4 arguments \\(3 given\\)"),
    ],
)
def test_crossing_words_bad_input_raises_a_typed_error_and_draws_nothing(
    args: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    crossing_words = _accelerator("crossing_words")
    rng = random.Random(5)
    with pytest.raises(error, match=match):
        crossing_words(rng, *args)
    assert rng.getrandbits(32) == random.Random(5).getrandbits(32)


def test_crossing_words_reject_a_bad_draw() -> None:
    crossing_words = _accelerator("crossing_words")

    class TooBig(random.Random):
        def getrandbits(self, k: int) -> int:
            return 1 << k

    class Negative(random.Random):
        def getrandbits(self, k: int) -> int:
            return -1

    class NotAnInt(random.Random):
        def getrandbits(self, k: int) -> Any:
            return "bits"

    with pytest.raises(OverflowError, match="too many bits"):
        crossing_words(TooBig(), 3, [], 0)
    with pytest.raises(OverflowError, match="negative"):
        crossing_words(Negative(), 3, [], 0)
    with pytest.raises(TypeError, match="no int"):
        crossing_words(NotAnInt(), 3, [], 0)


def test_pop_all_pops_the_int_keys_in_order() -> None:
    pop_all = _accelerator("pop_all")
    marker = object()
    d: dict[Any, Any] = {1: "a", 1 << 64: "b", 1 << 127: "c", 7: "d"}
    assert pop_all(d, [1 << 127, marker, 1, 7]) == ["c", None, "a", "d"]
    assert d == {1 << 64: "b"}
    assert pop_all(d, []) == []


@pytest.mark.parametrize("keys", [[1, 2, 3], [1, 1], [2, 3, 1, 1]])
def test_pop_all_puts_everything_back_on_a_missing_key(keys: list[int]) -> None:
    pop_all = _accelerator("pop_all")
    d = {1: "a", 2: "b", 3: None, 4: "d"}
    if keys == [1, 2, 3]:
        del d[3]
    before = dict(d)
    assert pop_all(d, keys) is None
    assert d == before


def test_pop_all_bad_input_raises_a_typed_error() -> None:
    pop_all = _accelerator("pop_all")
    with pytest.raises(TypeError, match="needs a dict and a list"):
        pop_all({}, (1,))
    with pytest.raises(TypeError, match="needs a dict and a list"):
        pop_all([], [1])
    with pytest.raises(TypeError, match="takes 2 arguments"):
        pop_all({})


def test_get_all_looks_the_int_keys_up_in_order() -> None:
    get_all = _accelerator("get_all")
    marker = object()
    d: dict[Any, Any] = {1: "a", 1 << 64: "b", 1 << 127: "c", 7: "d"}
    before = dict(d)
    assert get_all(d, [1 << 127, marker, 1, 7, 1]) == ["c", None, "a", "d", "a"]
    assert d == before
    assert get_all(d, []) == []


def test_get_all_is_none_on_a_missing_key() -> None:
    get_all = _accelerator("get_all")
    d = {1: "a", 2: "b"}
    assert get_all(d, [1, 3, 2]) is None
    assert d == {1: "a", 2: "b"}


def test_get_all_bad_input_raises_a_typed_error() -> None:
    get_all = _accelerator("get_all")
    with pytest.raises(TypeError, match="needs a dict and a list"):
        get_all({}, (1,))
    with pytest.raises(TypeError, match="needs a dict and a list"):
        get_all([], [1])
    with pytest.raises(TypeError, match="takes 2 arguments"):
        get_all({})


@pytest.mark.parametrize(
    "value",
    [0, 1, 256, 257, (1 << 30) - 1, 1 << 30, (1 << 60) - 1, 1 << 60, (1 << 64) - 1, 1 << 64],
)
def test_crossing_ids_of_every_size_are_exact(value: int) -> None:
    """The ints the accelerator builds digit by digit, at the digit-count boundaries."""
    crossing_words = _accelerator("crossing_words")

    class Fixed(random.Random):
        def getrandbits(self, k: int) -> int:
            assert k == 32 * 5
            return value << 32  # token word 0, then the id

    tokens, ids = crossing_words(Fixed(), 1, [0], 0)
    assert tokens == bytes(4)
    assert ids == [value]


@pytest.mark.parametrize(
    "value", [0, 5, 256, (1 << 30) - 1, 1 << 30, (1 << 59) - 1, 1 << 59, (1 << 64) - 1]
)
def test_fragments_of_every_size_are_exact(value: int) -> None:
    mode0_frags = _accelerator("mode0_frags")
    (frag,) = mode0_frags([value])
    assert frag == value & ((1 << 59) - 1)
    assert frag + 0 == frag  # a well-formed int: arithmetic agrees
    assert str(frag) == str(value & ((1 << 59) - 1))


@given(
    src=st.lists(st.integers(0, (1 << 32) - 1), max_size=40),
    head=st.lists(st.integers(0, (1 << 32) - 1), max_size=3),
    start=st.integers(0, 45),
    step=st.integers(1, 12),
)
def test_extend_strided_is_extend_of_a_strided_slice(
    src: list[int], head: list[int], start: int, step: int
) -> None:
    extend_strided = _accelerator("extend_strided")
    ours, theirs = array("I", head), array("I", head)
    extend_strided(ours, array("I", src), start, step)
    theirs.extend(array("I", src)[start::step])
    assert ours == theirs
    same = array("I", src)
    extend_strided(same, same, start, step)  # onto itself
    assert same == array("I", src) + array("I", src)[start::step]


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((array("I"), array("I"), -1, 1), ValueError, "start >= 0"),
        ((array("I"), array("I"), 0, 0), ValueError, "step > 0"),
        ((array("I"), array("H"), 0, 1), TypeError, "two arrays of 32-bit words"),
        ((array("H"), array("I"), 0, 1), TypeError, "two arrays of 32-bit words"),
        ((array("i"), array("i"), 0, 1), TypeError, "two arrays of 32-bit words"),
        (([], array("I"), 0, 1), TypeError, "two arrays of 32-bit words"),
        ((array("I"), array("I"), 0), TypeError, "takes 4 arguments \\(3 given\\)"),
    ],
)
def test_extend_strided_bad_input_raises_a_typed_error_and_changes_nothing(
    args: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    extend_strided = _accelerator("extend_strided")
    before = list(args[0])
    with pytest.raises(error, match=match):
        extend_strided(*args)
    assert list(args[0]) == before


def test_crossing_words_share_the_generator_with_every_other_draw() -> None:
    """Interleaved with the rng's own draws, across several regenerations of its 624-word
    state, and after `setstate`, the stream is exactly `getrandbits`'."""
    crossing_words = _accelerator("crossing_words")
    ours, theirs = random.Random(7), random.Random(7)
    for round_ in range(12):
        num_tokens = 37 * round_ + 200
        positions = list(range(0, num_tokens, 9))
        assert crossing_words(ours, num_tokens, positions, 0) == _crossing_reference(
            theirs, num_tokens, positions, 0
        )
        assert ours.getrandbits(32) == theirs.getrandbits(32)
        assert ours.random() == theirs.random()
        if round_ == 5:
            state = ours.getstate()
            ours.setstate(state)
            theirs.setstate(state)
    assert ours.getstate() == theirs.getstate()


def test_crossing_words_of_a_random_subclass_call_its_getrandbits() -> None:
    crossing_words = _accelerator("crossing_words")

    class Sub(random.Random):
        pass

    ours, theirs = Sub(3), random.Random(3)
    assert crossing_words(ours, 50, [4, 9], 1) == _crossing_reference(theirs, 50, [4, 9], 1)
    assert ours.getstate() == theirs.getstate()


def test_pop_all_takes_a_list_subclass() -> None:
    pop_all = _accelerator("pop_all")

    class Blocks(list[Any]):
        pass

    d = {1: "a", 2: "b"}
    assert pop_all(d, Blocks([2])) == ["b"]
    assert d == {1: "a"}
