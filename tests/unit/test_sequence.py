"""ActiveSequence (behavior.md §3): blocking, chunked allocation signals, decode growth with
Promote, terminal frees, pop, preemption, prefix caching off, planned outputs, validation."""

from __future__ import annotations

import random
from array import array

import pytest

import shmkv
from shmkv.errors import ConfigError, SignalError
from shmkv.hashing import (
    local_block_hashes,
    make_plh,
    plh_parent_fragment,
    plh_position,
    sequence_hashes,
)
from shmkv.sequence import (
    ActiveSequence,
    append_crossing_tokens,
    extend_crossing_words,
    extend_random_words,
    extend_strided,
    random_words,
)
from shmkv.signals import Deref, FullBlock, MoveBlock, PartialBlock, Promote, Use


def seq_of(
    tokens: list[int],
    max_output_tokens: int = 8,
    block_size: int = 4,
    *,
    caching: bool = True,
    emit: bool = True,
    output: list[int] | None = None,
    seed: int = 0,
) -> ActiveSequence:
    return ActiveSequence(
        tokens, max_output_tokens, block_size, caching, emit, output, rng=random.Random(seed)
    )


def expected_plhs(tokens: list[int], block_size: int) -> list[int]:
    seqs = sequence_hashes(tokens, block_size)
    return [make_plh(h, seqs[i - 1] if i else None, i) for i, h in enumerate(seqs)]


def the_partial(seq: ActiveSequence) -> PartialBlock:
    partial = seq.partial_block
    assert partial is not None
    return partial


def use_of(signal: MoveBlock | None) -> Use:
    assert isinstance(signal, Use), f"expected a Use, got {signal!r}"
    return signal


# ── blocking ─────────────────────────────────────────────────────────────────────────────


def test_blocks_full_then_partial() -> None:
    tokens = list(range(10))
    seq = seq_of(tokens, max_output_tokens=5)
    assert len(seq) == 10
    assert seq.num_input_tokens == 10
    assert seq.num_full_blocks == 2
    assert seq.num_unique_blocks == 3
    assert seq.seq_hashes == sequence_hashes(tokens, 4)
    assert seq.local_hashes == local_block_hashes(tokens, 4)
    assert seq.plhs == expected_plhs(tokens, 4)
    assert seq.positional_lineage_hashes() == seq.plhs
    partial = the_partial(seq)
    assert seq.unique_blocks() == [
        FullBlock(seq.seq_hashes[0]),
        FullBlock(seq.seq_hashes[1]),
        partial,
    ]
    assert seq.block_token_ids(1) == [4, 5, 6, 7]
    assert seq.block_token_ids(2) == [8, 9]
    assert seq.current_known_blocks() == 3
    assert seq.to_completion_blocks() == 4  # ceil((10 + 5) / 4)
    assert seq.num_allocated_tokens == 0
    assert seq.generated_tokens == 0
    assert not seq.is_complete()


def test_block_aligned_prompt_has_no_partial() -> None:
    seq = seq_of(list(range(8)))
    assert seq.partial_block is None
    assert seq.unique_blocks() == [FullBlock(h) for h in sequence_hashes(list(range(8)), 4)]
    assert seq.current_known_blocks() == 2


def test_short_prompt_is_one_partial_block() -> None:
    seq = seq_of([1, 2, 3])
    assert seq.seq_hashes == seq.local_hashes == seq.plhs == []
    assert seq.unique_blocks() == [the_partial(seq)]


def test_partial_ids_are_fresh_per_sequence() -> None:
    rng = random.Random(7)
    a = ActiveSequence([1, 2, 3], 4, 4, rng=rng)
    b = ActiveSequence([1, 2, 3], 4, 4, rng=rng)
    assert a.seq_hashes == b.seq_hashes
    assert the_partial(a) != the_partial(b)


# ── allocation signals ───────────────────────────────────────────────────────────────────


def test_take_creation_signal_covers_everything_once() -> None:
    tokens = list(range(10))
    seq = seq_of(tokens)
    use = use_of(seq.take_creation_signal())
    assert use.blocks == seq.unique_blocks()
    assert list(use.local_hashes) == seq.local_hashes
    assert list(use.plhs) == seq.plhs
    assert use.token_ids == [[0, 1, 2, 3], [4, 5, 6, 7]], "token ids per full block only"
    assert use.parent is None
    assert seq.num_allocated_tokens == 10
    assert seq.take_creation_signal() is None, "nothing new to allocate"


def test_prepare_allocation_does_not_mutate() -> None:
    seq = seq_of(list(range(10)))
    first = seq.prepare_allocation(5)
    assert first == seq.prepare_allocation(5)
    assert seq.num_allocated_tokens == 0


def test_chunked_prefill_straddling_block_and_parent() -> None:
    tokens = list(range(14))  # blocks [0..3] [4..7] [8..11] + partial [12, 13]
    seq = seq_of(tokens)
    h = seq.seq_hashes
    # A chunk boundary inside block 1 still allocates block 1 (ceil(5 / 4) = 2 blocks).
    use = use_of(seq.prepare_allocation(5))
    assert use.blocks == [FullBlock(h[0]), FullBlock(h[1])]
    assert list(use.plhs) == seq.plhs[:2]
    assert list(use.local_hashes) == seq.local_hashes[:2]
    assert use.parent is None
    seq.commit_allocation(5)
    assert seq.prepare_allocation(6) is None, "block 1 already covers token 6"
    assert seq.prepare_allocation(8) is None
    use = use_of(seq.prepare_allocation(9))
    assert use.blocks == [FullBlock(h[2])]
    assert use.parent == FullBlock(h[1]), "parent = the block before the new slice"
    assert use.token_ids == [[8, 9, 10, 11]]
    seq.commit_allocation(9)
    use = use_of(seq.prepare_allocation(100))  # capped at the unique blocks
    assert use.blocks == [the_partial(seq)]
    assert list(use.plhs) == []
    assert list(use.local_hashes) == []
    assert use.token_ids == []
    assert use.parent == FullBlock(h[2])
    seq.commit_allocation(14)
    assert seq.prepare_allocation(14) is None


def test_commit_allocation_out_of_range_raises() -> None:
    seq = seq_of(list(range(6)))
    with pytest.raises(SignalError):
        seq.commit_allocation(7)
    with pytest.raises(SignalError):
        seq.commit_allocation(-1)
    assert seq.num_allocated_tokens == 0


def test_free_signal_covers_only_allocated_blocks_tail_first() -> None:
    seq = seq_of(list(range(10)))
    h = seq.seq_hashes
    assert seq.free_signal() == []
    seq.commit_allocation(5)
    assert seq.free_signal() == [Deref([FullBlock(h[1]), FullBlock(h[0])])]
    seq.commit_allocation(10)
    assert seq.free_signal() == [Deref([the_partial(seq), FullBlock(h[1]), FullBlock(h[0])])]


# ── decode ───────────────────────────────────────────────────────────────────────────────


def test_generate_promotes_partial_and_opens_new_partial_then_frees_tail_first() -> None:
    prompt = list(range(6))  # full [0..3] + partial [4, 5]
    out = [100, 101, 102]
    seq = seq_of(prompt, max_output_tokens=3, output=out)
    seq.take_creation_signal()
    old_partial = the_partial(seq)
    assert seq.generate() == [], "len 7: token lands in the partial block"
    assert seq.generate() == [], "len 8: block full, but no Promote until the next token"
    assert seq.partial_block == old_partial
    signals = seq.generate()  # len 9 = 1 mod 4: Promote, new partial, and (last token) Derefs
    all_tokens = prompt + out
    seqs = sequence_hashes(all_tokens, 4)
    locals_ = local_block_hashes(all_tokens, 4)
    assert len(signals) == 3
    promote, use, deref = signals
    assert promote == Promote(
        old_partial.partial_id,
        seqs[1],
        seqs[0],
        locals_[1],
        make_plh(seqs[1], seqs[0], 1),
        [4, 5, 100, 101],
    )
    new_partial = the_partial(seq)
    assert new_partial != old_partial
    assert use == Use([new_partial], [], [], None, None)
    assert deref == Deref([new_partial, FullBlock(seqs[1]), FullBlock(seqs[0])])
    assert seq.seq_hashes == seqs
    assert seq.local_hashes == locals_
    assert seq.plhs == expected_plhs(all_tokens, 4)
    assert list(seq.tokens) == all_tokens
    assert seq.is_complete()
    with pytest.raises(SignalError):
        seq.generate()


def test_generate_after_aligned_prompt_opens_partial_without_promote() -> None:
    seq = seq_of(list(range(8)), max_output_tokens=4, output=[9, 9, 9, 9])
    seq.take_creation_signal()
    signals = seq.generate()
    partial = the_partial(seq)
    assert signals == [Use([partial], [], [], None, None)], "no partial to promote"
    assert seq.num_full_blocks == 2


def test_generate_not_on_boundary_emits_nothing() -> None:
    seq = seq_of(list(range(5)), max_output_tokens=8)
    seq.take_creation_signal()
    for _ in range(3):  # lengths 6, 7, 8
        assert seq.generate() == []
    assert seq.generated_tokens == 3


def test_terminal_deref_without_boundary() -> None:
    seq = seq_of(list(range(5)), max_output_tokens=1)
    seq.take_creation_signal()
    partial = the_partial(seq)
    assert seq.generate() == [Deref([partial, FullBlock(seq.seq_hashes[0])])]


def test_random_outputs_without_plan_are_u32() -> None:
    seq = seq_of([1], max_output_tokens=20, block_size=2)
    for _ in range(20):
        seq.generate()
    assert all(0 <= t < 1 << 32 for t in seq.tokens[1:])
    assert seq.seq_hashes == sequence_hashes(list(seq.tokens), 2)


def test_planned_output_token_ids_are_used_in_order() -> None:
    out = [7, 7, 8, 8, 9, 9, 1, 2]
    seq = seq_of([1, 2], max_output_tokens=6, output=out)
    for _ in range(6):
        seq.generate()
    assert list(seq.tokens) == [1, 2, *out[:6]]
    # Length 8 is block-aligned, but block 1 is promoted only when token 9 arrives.
    assert seq.seq_hashes == sequence_hashes([1, 2, *out[:6]], 4)[:1]
    assert seq.partial_block is not None
    assert seq.num_unique_blocks == 2


def test_emit_token_ids_off_gives_no_token_ids() -> None:
    seq = seq_of(list(range(6)), max_output_tokens=3, emit=False, output=[1, 2, 3])
    use = use_of(seq.take_creation_signal())
    assert use.token_ids is None
    assert list(use.local_hashes) == seq.local_hashes, "local hashes are still sent"
    seq.generate()
    seq.generate()
    promote = seq.generate()[0]
    assert isinstance(promote, Promote)
    assert promote.token_ids is None
    assert promote.local_hash == local_block_hashes([4, 5, 1, 2], 4)[0]


# ── pop and preemption ───────────────────────────────────────────────────────────────────


def test_pop_after_boundary_drops_new_partial_keeps_promoted_block() -> None:
    seq = seq_of(list(range(6)), max_output_tokens=8, output=list(range(50, 58)))
    seq.take_creation_signal()
    seq.generate()
    seq.generate()
    seq.commit_allocation(len(seq))
    signals = seq.generate()  # Promote + Use(new partial)
    assert [type(s) for s in signals] == [Promote, Use]
    seq.pop()  # the Use failed: undo the token
    assert len(seq) == 8
    assert seq.generated_tokens == 2
    assert seq.partial_block is None
    assert seq.num_full_blocks == 2, "the Promote was processed: the block stays full"
    assert seq.num_allocated_tokens == 8
    # Retry: the same planned token comes again, opening a partial without a second Promote.
    retry = seq.generate()
    partial = the_partial(seq)
    assert retry == [Use([partial], [], [], None, None)]
    assert seq.tokens[-1] == 52


def test_pop_inside_a_block_keeps_partial() -> None:
    seq = seq_of(list(range(5)), max_output_tokens=4)
    seq.take_creation_signal()
    partial = the_partial(seq)
    seq.generate()
    seq.pop()
    assert len(seq) == 5
    assert seq.partial_block == partial
    assert seq.num_allocated_tokens == 5
    with pytest.raises(SignalError):
        seq.pop()


def test_reset_with_signal_frees_and_keeps_generated_tokens() -> None:
    prompt = list(range(6))
    seq = seq_of(prompt, max_output_tokens=8, output=[20, 21, 22, 23, 24, 25, 26, 27])
    seq.take_creation_signal()
    for _ in range(3):  # length 9: block 1 promoted, new partial holds [22]
        seq.generate()
        seq.commit_allocation(len(seq))
    h = seq.seq_hashes
    partial = the_partial(seq)
    signals = seq.reset_with_signal()
    assert signals == [Deref([partial, FullBlock(h[1]), FullBlock(h[0])])]
    assert seq.num_allocated_tokens == 0
    assert seq.generated_tokens == 3
    assert len(seq) == 9
    assert seq.reset_with_signal() == [], "nothing allocated any more"
    # Re-admission recomputes prompt + generated tokens under the same identities.
    use = use_of(seq.take_creation_signal())
    assert use.blocks == [FullBlock(h[0]), FullBlock(h[1]), partial]
    assert use.token_ids == [[0, 1, 2, 3], [4, 5, 20, 21]]
    assert use.parent is None


# ── prefix caching off ───────────────────────────────────────────────────────────────────


def test_caching_off_random_hashes_stable_across_retries() -> None:
    tokens = list(range(64))
    a = seq_of(tokens, block_size=16, caching=False, emit=True, seed=1)
    b = seq_of(tokens, block_size=16, caching=False, emit=True, seed=2)
    assert a.emit_token_ids is False, "token ids are only emitted with prefix caching"
    assert a.local_hashes == []
    assert len(a.seq_hashes) == 4
    assert a.seq_hashes != sequence_hashes(tokens, 16)
    assert set(a.seq_hashes).isdisjoint(b.seq_hashes), "identical prompts never share blocks"
    for i, plh in enumerate(a.plhs):
        assert plh == make_plh(a.seq_hashes[i], None, i)
        assert plh_parent_fragment(plh) == 0
        assert plh_position(plh) == i
    first = use_of(a.take_creation_signal())
    assert first.token_ids is None
    assert list(first.local_hashes) == []
    a.reset_with_signal()
    again = use_of(a.take_creation_signal())
    assert again == first, "random identities are stable across preemption retries"


def test_caching_off_promote_has_random_identity() -> None:
    seq = seq_of([1, 2, 3], max_output_tokens=4, caching=False, output=[4, 5, 6, 7])
    seq.take_creation_signal()
    partial = the_partial(seq)
    assert seq.generate() == []
    promote, use = seq.generate()
    assert isinstance(promote, Promote)
    assert isinstance(use, Use)
    assert promote.partial_id == partial.partial_id
    assert promote.seq_hash == seq.seq_hashes[0] != sequence_hashes([1, 2, 3, 4], 4)[0]
    assert promote.parent_hash is None
    assert promote.local_hash == 0
    assert promote.token_ids is None
    assert promote.plh == make_plh(promote.seq_hash, None, 0)
    assert seq.local_hashes == []


# ── construction ─────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("tokens", "max_output", "block_size", "output"),
    [
        ([1, 2], 4, 1, None),  # block_size < 2
        ([1, 2], 4, 0, None),
        ([1, 2], 4, -4, None),
        ([1, 2], 0, 4, None),  # max_output_tokens < 1
        ([1, 2], 4, 4, [1, 2, 3]),  # fewer planned tokens than max_output_tokens
        ([], 4, 4, None),  # empty prompt
        ([1, -1], 4, 4, None),  # token outside u32
        ([1, 1 << 32], 4, 4, None),
    ],
)
def test_bad_construction_raises_config_error(
    tokens: list[int], max_output: int, block_size: int, output: list[int] | None
) -> None:
    with pytest.raises(ConfigError):
        ActiveSequence(tokens, max_output, block_size, True, False, output)


def test_non_int_block_size_raises_config_error() -> None:
    # A compiled core checks the argument's type on entry: TypeError, before any state exists.
    with pytest.raises(TypeError if shmkv.core_mode() == "compiled" else ConfigError):
        ActiveSequence([1, 2], 4, 4.0)  # type: ignore[arg-type]


def test_default_block_size_is_64() -> None:
    assert ActiveSequence([1, 2], 4).block_size == 64


# ── bulk decode draws (the scheduler's cohort) ───────────────────────────────────────────


@pytest.mark.parametrize("emit", [False, True])
@pytest.mark.parametrize("positions", [[], [0], [3], [0, 1, 2, 3], [1, 3], [2]])
def test_crossing_token_draws_equal_generate_token_one_by_one(
    positions: list[int], emit: bool
) -> None:
    """`append_crossing_tokens` + `open_block` = one `generate_token` per sequence, in
    order: the same tokens, partial ids, Promotes, identities and rng state afterwards."""

    def sequences(rng: random.Random) -> list[ActiveSequence]:
        seqs = []
        for i in range(4):
            # crossing ones: 7 prompt tokens + 1 generated = a full partial block at rest
            # (the next token promotes it); the others: 6 tokens, mid-block
            length = 7 if i in positions else 6
            seq = ActiveSequence(list(range(i, i + length)), 20, 4, True, emit, rng=rng)
            if i in positions:
                seq.generate_token()
            seqs.append(seq)
        return seqs

    bulk_rng, single_rng = random.Random(5), random.Random(5)
    bulk, single = sequences(bulk_rng), sequences(single_rng)
    promotes = [seq.generate_token() for seq in single]
    ids = append_crossing_tokens([seq.tokens for seq in bulk], positions, bulk_rng)
    assert len(ids) == len(positions)
    for i, partial_id in zip(positions, ids, strict=True):
        promote = bulk[i].open_block(partial_id)
        assert promote is not None
        assert promote == promotes[i]
    assert [p for i, p in enumerate(promotes) if i not in positions] == [None] * (
        4 - len(positions)
    )
    for got, want in zip(bulk, single, strict=True):
        assert got.tokens == want.tokens
        assert got.partial_block == want.partial_block
        assert (got.local_hashes, got.seq_hashes, got.plhs) == (
            want.local_hashes,
            want.seq_hashes,
            want.plhs,
        )
    assert bulk_rng.getrandbits(64) == single_rng.getrandbits(64)


@pytest.mark.parametrize("positions", [[], [0], [2, 3]])
def test_extend_crossing_words_offset_shifts_the_positions(positions: list[int]) -> None:
    """`offset` = that many plain words owed before the step's: the same draws as the
    positions shifted by it."""
    shifted, reference = random.Random(13), random.Random(13)
    words, expected = array("I"), array("I")
    ids = extend_crossing_words(words, 2 + 4, positions, shifted, 2)
    expected_ids = extend_crossing_words(expected, 6, [2 + p for p in positions], reference)
    assert (words, ids) == (expected, expected_ids)
    assert shifted.getrandbits(64) == reference.getrandbits(64)


def test_open_block_opens_without_promote_after_a_full_prompt() -> None:
    seq = seq_of(list(range(8)), seed=3)
    seq.tokens.append(99)  # the token the bulk draw appended: it opens block 2
    assert seq.open_block(0xABC) is None
    assert seq.partial_block == PartialBlock(0xABC)
    assert seq.num_full_blocks == 2


def test_open_block_needs_a_token_opening_a_block_with_caching_on() -> None:
    seq = seq_of(list(range(6)))
    with pytest.raises(SignalError, match="open_block"):
        seq.open_block(7)  # length 6: not a block's first token
    off = seq_of(list(range(9)), caching=False)
    with pytest.raises(SignalError, match="open_block"):
        off.open_block(7)


def test_cross_block_equals_open_block_without_the_signal() -> None:
    """`cross_block` = `open_block` with the Promote's fields left in the sequence: the
    promoted id is returned, the hashes appended are the Promote's, the new partial block
    is open."""
    crossed = seq_of(list(range(7)), seed=3, emit=False)
    opened = seq_of(list(range(7)), seed=3, emit=False)
    for seq in (crossed, opened):
        seq.generate_token()  # 8 tokens: the partial block is full
        seq.tokens.append(99)  # the token the bulk draw appended: it opens block 2
    promoted = opened.partial_block
    assert promoted is not None
    promote = opened.open_block(0xABC)
    assert promote is not None
    assert crossed.cross_block(0xABC) == promoted.partial_id == promote.partial_id
    index = len(crossed.seq_hashes) - 1
    assert index == promote.lineage_position == 1
    assert (crossed.seq_hashes[index], crossed.seq_hashes[index - 1]) == (
        promote.seq_hash,
        promote.parent_hash,
    )
    assert (crossed.local_hashes[index], crossed.plhs[index]) == (
        promote.local_hash,
        promote.plh,
    )
    assert promote.token_ids is None
    assert (crossed.local_hashes, crossed.seq_hashes, crossed.plhs) == (
        opened.local_hashes,
        opened.seq_hashes,
        opened.plhs,
    )
    assert crossed.partial_block == opened.partial_block == PartialBlock(0xABC)


def test_cross_block_opens_without_promote_after_a_full_prompt() -> None:
    seq = seq_of(list(range(8)), seed=3, emit=False)
    seq.tokens.append(99)
    assert seq.cross_block(0xABC) is None
    assert seq.partial_block == PartialBlock(0xABC)
    assert seq.num_full_blocks == 2


def test_cross_block_refuses_what_open_block_refuses_and_token_ids() -> None:
    seq = seq_of(list(range(6)), emit=False)
    with pytest.raises(SignalError, match="cross_block"):
        seq.cross_block(7)  # length 6: not a block's first token
    off = seq_of(list(range(9)), caching=False, emit=False)
    with pytest.raises(SignalError, match="cross_block"):
        off.cross_block(7)
    emitting = ActiveSequence(list(range(9)), 20, 4, True, True, rng=random.Random(1))
    before = emitting.partial_block
    with pytest.raises(SignalError, match="cross_block"):
        emitting.cross_block(7)
    assert emitting.partial_block == before
    assert emitting.num_full_blocks == 2


def test_random_words_equal_one_draw_per_word() -> None:
    bulk, single = random.Random(4), random.Random(4)
    assert list(random_words(bulk, 5)) == [single.getrandbits(32) for _ in range(5)]
    assert bulk.getrandbits(32) == single.getrandbits(32)


@pytest.mark.parametrize("count", [0, 1, 3, 64])
def test_random_words_consume_the_stream_like_randbytes(count: int) -> None:
    """`random_words` draws with `getrandbits` what `Random.randbytes` would (the same bytes,
    the same generator state after)."""
    bulk, reference = random.Random(9), random.Random(9)
    data = reference.randbytes(4 * count)
    expected = [int.from_bytes(data[i : i + 4], "little") for i in range(0, 4 * count, 4)]
    assert list(random_words(bulk, count)) == expected
    assert bulk.getrandbits(64) == reference.getrandbits(64)


@pytest.mark.parametrize("positions", [[], [0], [5], [1, 2], [0, 3, 5]])
def test_extend_crossing_words_appends_the_tokens_and_returns_the_ids(
    positions: list[int],
) -> None:
    """One bulk step of 6 sequences (those at `positions` open a block): the words one
    `getrandbits(32)` per token and one `getrandbits(128)` per crossing, in order, would give,
    appended after what `words` held; plain words likewise (`extend_random_words`)."""
    bulk, single = random.Random(11), random.Random(11)
    words = array("I", [7, 8])
    ids = extend_crossing_words(words, 6, positions, bulk)
    expected_tokens = [7, 8]
    expected_ids = []
    for i in range(6):
        expected_tokens.append(single.getrandbits(32))
        if i in positions:
            expected_ids.append(single.getrandbits(128))
    assert (list(words), ids) == (expected_tokens, expected_ids)
    extend_random_words(words, bulk, 3)
    assert list(words) == expected_tokens + [single.getrandbits(32) for _ in range(3)]
    assert bulk.getrandbits(64) == single.getrandbits(64)


@pytest.mark.parametrize(("start", "step"), [(0, 1), (2, 3), (5, 4), (9, 2), (40, 1)])
def test_extend_strided_takes_every_step_th_word(start: int, step: int) -> None:
    src = array("I", range(100, 110))
    dest = array("I", [7])
    extend_strided(dest, src, start, step)
    assert dest == array("I", [7]) + src[start::step]


@pytest.mark.parametrize(
    ("num_tokens", "positions", "offset"), [(3, [1, 0], 0), (3, [3], 0), (3, [1], 2), (3, [-1], 0)]
)
def test_extend_crossing_words_rejects_bad_positions_and_draws_nothing(
    num_tokens: int, positions: list[int], offset: int
) -> None:
    rng = random.Random(11)
    words = array("I", [5])
    with pytest.raises(SignalError, match="out of order or beyond"):
        extend_crossing_words(words, num_tokens, positions, rng, offset)
    assert words == array("I", [5])
    assert rng.getrandbits(32) == random.Random(11).getrandbits(32)


def test_a_sequence_keeps_the_fresh_hash_lists_it_is_given() -> None:
    """`own_hashes`: the sequence adopts the caller's fresh lists (no copies) and `token_data`
    stands for `token_bytes(tokens)`; it behaves exactly like one that copies and encodes."""
    from shmkv.hashing import PrefixHashCache, token_bytes

    tokens = list(range(1, 11))  # two full blocks of 4 and a partial one
    data = token_bytes(tokens)
    given = PrefixHashCache(4).hash_blocks(data)
    adopted = ActiveSequence(
        tokens,
        3,
        4,
        rng=random.Random(5),
        block_hashes=given,
        token_data=data,
        own_hashes=True,
    )
    copied = ActiveSequence(tokens, 3, 4, rng=random.Random(5), block_hashes=given)
    assert adopted.seq_hashes is given.seq_hashes
    assert adopted.plhs is given.plhs
    assert adopted.local_hashes is given.local_hashes
    assert copied.seq_hashes is not given.seq_hashes
    assert copied.seq_hashes == adopted.seq_hashes == sequence_hashes(tokens, 4)
    assert list(copied.tokens) == list(adopted.tokens) == tokens
    assert copied.plhs == expected_plhs(tokens, 4)
    for _ in range(3):
        assert adopted.generate_token() == copied.generate_token()
    assert adopted.seq_hashes == copied.seq_hashes
    assert list(adopted.tokens) == list(copied.tokens)
