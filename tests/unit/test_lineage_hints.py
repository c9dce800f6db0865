"""The Lineage fields the block manager fills in from a signal's position hint (`Use.lineage_start`,
`Promote.lineage_position`) must equal what decoding the PLH gives."""

from __future__ import annotations

import random

import pytest

from shmkv import hashing
from shmkv.eviction.lineage import _UNDECODED, FAST_LINEAGE_END, FRAG_MASK, _decode
from shmkv.hashing import make_plh
from shmkv.manager import KvManager, SwapInBlock
from shmkv.sequence import ActiveSequence
from shmkv.signals import Deref, FullBlock, MoveBlock, PartialBlock, Promote, Use

BS = 4


def _tokens(rng: random.Random, prefix: list[int], count: int) -> list[int]:
    return prefix + [rng.randrange(1 << 32) for _ in range(count - len(prefix))]


def _check_fields(mgr: KvManager) -> int:
    """Every registration's decoded lineage fields are its PLH's; returns how many are set."""
    filled = 0
    for plh, rec in mgr._registered.items():
        if rec.lineage_position != _UNDECODED:
            filled += 1
            assert (rec.lineage_position, rec.lineage_frag, rec.lineage_parent_frag) == _decode(plh)
    mgr.check_invariants()
    return filled


def _new_recs_filled(mgr: KvManager, signal: MoveBlock) -> None:
    """Process `signal`; its new registrations come with their lineage fields filled in."""
    before = set(mgr._registered)
    mgr.process(signal)
    for plh, rec in mgr._registered.items():
        if plh not in before:
            assert rec.lineage_position == _decode(plh)[0]
    _check_fields(mgr)


def test_sequence_signals_carry_positions() -> None:
    rng = random.Random(1)
    seq = ActiveSequence(_tokens(rng, [], 5 * BS + 1), 2 * BS, BS)
    first = seq.prepare_allocation(2 * BS)
    assert first is not None
    assert first.lineage_start == 0
    seq.commit_allocation(2 * BS)
    rest = seq.prepare_allocation(len(seq))
    assert rest is not None
    assert rest.lineage_start == 2
    assert rest.plhs[0] == make_plh(seq.seq_hashes[2], seq.seq_hashes[1], 2)
    seq.commit_allocation(len(seq))
    promote = None
    while promote is None:
        promote = seq.generate_token()
    assert promote.lineage_position == 5
    assert promote == Promote(
        promote.partial_id, promote.seq_hash, promote.parent_hash, promote.local_hash, promote.plh
    )
    plain = Use([FullBlock(1)], [], [make_plh(1, None, 0)])
    assert plain.lineage_start == -1
    assert Use.from_raw([1], [], [plain.plhs[0]], None, None, 1, 0) == plain


def test_no_hints_without_prefix_caching() -> None:
    rng = random.Random(2)
    seq = ActiveSequence(
        _tokens(rng, [], 3 * BS + 1), 2 * BS, BS, enable_prefix_caching=False, rng=rng
    )
    use = seq.prepare_allocation(len(seq))
    assert use is not None
    assert use.lineage_start == -1
    seq.commit_allocation(len(seq))
    promote = None
    while promote is None:
        promote = seq.generate_token()
    assert promote.lineage_position == -1


@pytest.mark.parametrize("capacity", [12, 40, 400])
def test_filled_fields_match_decoding(capacity: int) -> None:
    """Shared prefixes (hits, then the bulk or per-block store), chunked prefill, decode
    promotes, frees and evictions that recycle registrations."""
    rng = random.Random(capacity)
    mgr = KvManager(capacity, BS, dp_rank=0, eviction="lineage")
    prefix = _tokens(rng, [], 3 * BS)
    for round_ in range(12):
        seq = ActiveSequence(
            _tokens(rng, prefix if round_ % 3 else [], 7 * BS + 2), 3 * BS, BS, rng=rng
        )
        chunk = 2 * BS if round_ % 2 else len(seq)  # 2-block chunks: the per-block path
        done = 0
        while done < len(seq):
            done = min(len(seq), done + chunk)
            use = seq.prepare_allocation(done)
            if use is None:
                continue
            if mgr.process(use) < len(use.raw_blocks):
                break  # pool full (small capacity): skip this request's rest
            seq.commit_allocation(done)
            _check_fields(mgr)
        else:
            while not seq.is_complete():
                signals = seq.generate()
                for signal in signals:
                    if isinstance(signal, Promote):
                        _new_recs_filled(mgr, signal)
                    else:
                        mgr.process(signal)
                    _check_fields(mgr)
            continue
        # A request cut short: release what it holds.
        mgr.process(Deref([*map(FullBlock, seq.seq_hashes[: done // BS])]))
        partial = seq.partial_block
        if done % BS and partial is not None and mgr.has_partial(partial.partial_id):
            mgr.process(Deref([PartialBlock(partial.partial_id)]))
        _check_fields(mgr)
    assert _check_fields(mgr) > 0


def test_new_blocks_are_filled_at_store() -> None:
    rng = random.Random(3)
    for chunk_blocks in (2, 6):  # the per-block path, then the bulk store
        mgr = KvManager(64, BS, dp_rank=0, eviction="lineage")
        seq = ActiveSequence(_tokens(rng, [], 6 * BS), BS, BS)
        use = seq.prepare_allocation(chunk_blocks * BS)
        assert use is not None
        _new_recs_filled(mgr, use)
        assert _check_fields(mgr) == chunk_blocks


@pytest.mark.parametrize("chunk_blocks", [2, 300])
def test_positions_from_255_on_are_decoded(chunk_blocks: int) -> None:
    """Blocks from position 255 on are decoded by the backend; a bulk store reaching there
    fills in none, the per-block path (2-block chunks) every block before."""
    rng = random.Random(4)
    mgr = KvManager(400, 2, dp_rank=0, eviction="lineage")
    seq = ActiveSequence(_tokens(rng, [], 300 * 2), 2, 2)
    done = 0
    while done < len(seq):
        done += 2 * chunk_blocks
        use = seq.prepare_allocation(done)
        assert use is not None
        mgr.process(use)
        seq.commit_allocation(done)
    positions = sorted(
        rec.lineage_position for rec in mgr._registered.values() if rec.lineage_position >= 0
    )
    assert positions == (list(range(255)) if chunk_blocks == 2 else [])
    assert _check_fields(mgr) == len(positions)
    mgr.process(Deref([*map(FullBlock, reversed(seq.seq_hashes))]))
    assert _check_fields(mgr) == 300
    assert mgr._lineage is not None
    assert len(mgr._lineage) == 300


@pytest.mark.parametrize("backend", ["lru", "multi-lru"])
def test_other_backends_ignore_hints(backend: str) -> None:
    rng = random.Random(5)
    mgr = KvManager(64, BS, dp_rank=0, eviction=backend)
    seq = ActiveSequence(_tokens(rng, [], 6 * BS), BS, BS)
    use = seq.prepare_allocation(len(seq))
    assert use is not None
    mgr.process(use)
    assert _check_fields(mgr) == 0


@pytest.mark.parametrize("lineage_start", [-1, 2, 253])
def test_swapped_in_blocks_filled_from_their_position(lineage_start: int) -> None:
    """Entries at positions below 255 are filled in, the rest decoded by the backend."""
    rng = random.Random(6)
    mgr = KvManager(16, BS, dp_rank=0, eviction="lineage")
    seq = ActiveSequence(_tokens(rng, [], (max(lineage_start, 0) + 4) * BS), BS, BS)
    start = max(lineage_start, 0)
    entries = [
        SwapInBlock(seq.seq_hashes[i], seq.plhs[i], seq.local_hashes[i], None)
        for i in range(start, start + 4)
    ]
    parent = seq.seq_hashes[start - 1] if start else None
    slots = mgr.reserve_swap_in_destination_slots(4)
    assert isinstance(slots, list)
    assert mgr.register_swapped_in_blocks(entries, parent, slots, lineage_start) == 4
    assert _check_fields(mgr) == 4  # released: every entry decoded one way or the other
    positions = sorted(rec.lineage_position for rec in mgr._registered.values())
    assert positions == list(range(start, start + 4))
    assert mgr.is_inactive(seq.plhs[start])


def test_fast_range_mirrors_hashing() -> None:
    assert FAST_LINEAGE_END == hashing._FAST_PLH_END
    assert FRAG_MASK == hashing._M0_FRAG_MASK
    seq, parent = (1 << 64) - 3, (1 << 64) - 5
    for position in (1, FAST_LINEAGE_END - 1):
        assert _decode(make_plh(seq, parent, position)) == (
            position,
            seq & FRAG_MASK,
            parent & FRAG_MASK,
        )
