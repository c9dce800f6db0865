"""OFFLOADs handled as one group (`Coordinator._offload_group`, what `serve_router` does with
the OFFLOADs of one loop turn) against the same messages handled one by one.

With a pool that never fills (and no PLH twins: see `_without_twins`), the two must send the
same ACKs, DONEs and G2 events (token ids included) and end with the same READY blocks. With a small pool, pinned blocks and all, the
group path must keep every invariant: the directory's, no pinned block evicted, and an event
stream that rebuilds exactly the READY set (each "R" of a present block, each "S" of an absent
one). Packed OFFLOADs (`transport.pack_offload_items`) must be handled as their JSON twins.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson
import pytest
from hypothesis import given, settings, strategies as st

from shmkv import transport as tp
from shmkv.coordinator import Coordinator
from shmkv.errors import ProtocolError
from shmkv.g2 import G2RankView
from shmkv.shm import READY
from tests.property.test_coordinator_batches import NUM_RANKS, _batch, _coordinator, _Recorder

BIG = 4096


@contextmanager
def _coordinators(*capacities: int) -> Iterator[list[tuple[Coordinator, _Recorder]]]:
    tmp = Path(tempfile.mkdtemp(prefix="shmkv-cg", dir="/tmp"))
    with ExitStack() as stack:
        out = []
        for n, capacity in enumerate(capacities):
            coord = stack.enter_context(_coordinator(tmp, f"g{n}", True, capacity=capacity))
            for rank in range(NUM_RANKS):
                hello = tp.Message(tp.HELLO, {"rank": rank, "pid": os.getpid(), "epoch": 0})
                coord._handle_rank_message(f"r{rank}".encode(), hello)
            out.append((coord, _Recorder(coord)))
        yield out
    for child in tmp.iterdir():
        child.unlink(missing_ok=True)
    tmp.rmdir()


def _group(coord: Coordinator, msgs: list[tuple[int, tp.Message]]) -> list[str]:
    """Screen every message (sharing one claimed set), then handle the group; per message
    "ok" or the ProtocolError text, as `serve_router` does."""
    claimed: set[int] = set()
    group = []
    outcomes = []
    for rank, msg in msgs:
        try:
            group.append(coord._screen_offload(coord._ranks[rank], msg, claimed))
            outcomes.append("ok")
        except ProtocolError as exc:
            outcomes.append(str(exc))
    if group:
        coord._offload_group(group)
    coord.flush()
    return outcomes


def _one_by_one(coord: Coordinator, msgs: list[tuple[int, tp.Message]]) -> list[str]:
    outcomes = []
    for rank, msg in msgs:
        try:
            coord._handle_rank_message(f"r{rank}".encode(), msg)
            outcomes.append("ok")
        except ProtocolError as exc:
            outcomes.append(str(exc))
    coord.flush()
    return outcomes


def _messages(
    rng: random.Random, pool: list[int], sent: list[list[Any]], first: int, *, twins: bool = True
) -> list[tuple[int, tp.Message]]:
    """A few OFFLOADs from random ranks; `twins=False` leaves out the blocks that share a PLH
    with an earlier block (see `_without_twins`)."""
    msgs = []
    for k in range(rng.randint(1, 6)):
        msg = _batch(rng, pool, sent, first + k)
        msgs.append((rng.randrange(NUM_RANKS), msg if twins else _without_twins(msg, sent)))
    return msgs


def _without_twins(msg: tp.Message, sent: list[list[Any]]) -> tp.Message:
    """`msg` without its PLH twins (`seq ^ 1 << 62` of a block sent before). A twin is
    rejected at commit; a later message of the same group then finds its hash claimed and is
    rejected (a miss) where one-by-one handling would have accepted it."""
    seen = {item[0] for item in sent}
    items = msg.body["items"]
    keep = [i for i, item in enumerate(items) if item[0] ^ (1 << 62) not in seen]
    body = dict(msg.body, items=[items[i] for i in keep])
    frames = msg.frames
    if frames and items:
        row = len(frames[0]) // len(items)
        frames = (b"".join(frames[0][i * row : (i + 1) * row] for i in keep),)
    return tp.Message(tp.OFFLOAD, body, frames)


def _sorted_by_rank(sent: list[tuple[int, list[bytes]]]) -> dict[int, list[list[bytes]]]:
    """What each rank received, in order (the group sends its ACKs after all its commits)."""
    by_rank: dict[int, list[list[bytes]]] = {}
    for rank, frames in sent:
        by_rank.setdefault(rank, []).append(frames)
    return by_rank


def _acks_and_rest(frames: list[list[bytes]]) -> tuple[list[Any], list[Any]]:
    acks: list[Any] = []
    rest: list[Any] = []
    for message in frames:
        (acks if orjson.loads(message[0])["t"] == tp.OFFLOAD_ACK else rest).append(message)
    return acks, rest


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_group_matches_its_messages_one_by_one_when_nothing_is_evicted(seed: int) -> None:
    rng = random.Random(seed)
    with _coordinators(BIG, BIG) as [(grouped, g_sent), (single, s_sent)]:
        pool: list[int] = []
        sent: list[list[Any]] = []
        for turn in range(rng.randint(1, 6)):
            msgs = _messages(rng, pool, sent, 100 * turn, twins=False)
            assert _group(grouped, msgs) == _one_by_one(single, msgs)
            got, want = _sorted_by_rank(g_sent.sent), _sorted_by_rank(s_sent.sent)
            assert got.keys() == want.keys()
            for rank in got:  # same ACKs; same DONEs and events, in the same order
                g_acks, g_rest = _acks_and_rest(got[rank])
                s_acks, s_rest = _acks_and_rest(want[rank])
                assert sorted(g_acks) == sorted(s_acks)
                assert g_rest == s_rest
            assert grouped.directory.ready_seqs == single.directory.ready_seqs
            stats = grouped.stats_dict(include_pins=True)
            assert stats == single.stats_dict(include_pins=True)
        grouped.directory.check_invariants()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_group_keeps_every_invariant_in_a_small_pool(seed: int) -> None:
    rng = random.Random(seed)
    with _coordinators(12) as [(coord, recorder)]:
        view = G2RankView(coord.directory.segment, 1)
        try:
            pool: list[int] = []
            sent: list[list[Any]] = []
            replica: set[int] = set()
            held = []
            for turn in range(rng.randint(1, 10)):
                if pool and rng.random() < 0.5:
                    run = view.pin_prefix(rng.sample(pool, min(3, len(pool))), vectorized=False)
                    if run is not None:
                        held.append(run)
                # NOTE: no twins: a twin whose first copy is READY with another parent is a
                # Lineage key clash (a 59-bit fragment collision), which the policy refuses
                _group(coord, _messages(rng, pool, sent, 100 * turn, twins=False))
                for run in held:  # a pinned block is never evicted
                    assert view.validate(run) == 0
                for _rank, frames in recorder.sent:
                    body = orjson.loads(frames[0])
                    # Copies land at once: every ACK says done (after the events), no DONE.
                    assert body["t"] != tp.OFFLOAD_DONE
                    if body["t"] == tp.OFFLOAD_ACK and "error" not in body:
                        assert body["done"] is True
                    if body["t"] != tp.G2_EVENTS or _rank != 0:
                        continue
                    events = _g2_events(body, frames[1:])
                    for kind, seq in zip(events.kinds, events.seqs, strict=True):
                        if kind == tp.G2_EVENT_STORED:
                            assert seq not in replica
                            replica.add(seq)
                        else:
                            assert seq in replica
                            replica.remove(seq)
                recorder.sent.clear()
                seg = coord.directory.segment
                assert replica == set(seg.seq_hash[seg.state == READY].tolist())
                coord.directory.check_invariants()
                if held and rng.random() < 0.5:
                    view.unpin(held.pop(0))
            view.unpin_many(held)
        finally:
            view.close()


def _g2_events(body: dict[str, Any], frames: list[bytes]) -> tp.G2EventColumns:
    """The events of a packed G2_EVENTS as the coordinator sent it."""
    count, stores = body["num_events"], body["num_stores"]
    return tp.unpack_g2_events(count, stores, frames[0] if count else b"")


def _packed(msg: tp.Message) -> tp.Message:
    body = dict(msg.body)
    items = body.pop("items")
    columns = list(zip(*items, strict=True)) if items else [(), (), (), ()]
    seqs, parents, locals_, positions = (list(column) for column in columns)
    frame = tp.pack_offload_items(
        seqs, [None if p == -1 else p for p in parents], locals_, positions
    )
    body.update(num_items=len(items), packed=True)
    return tp.Message(tp.OFFLOAD, body, (frame, *msg.frames))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_packed_offloads_are_handled_as_their_json_twins(seed: int) -> None:
    rng = random.Random(seed)
    with _coordinators(24, 24) as [(packed, p_sent), (plain, j_sent)]:
        pool: list[int] = []
        sent: list[list[Any]] = []
        for turn in range(rng.randint(1, 8)):
            rank = rng.randrange(NUM_RANKS)
            msg = _without_twins(_batch(rng, pool, sent, turn), sent)  # no key clashes
            if any(item[3] < 0 for item in msg.body["items"]):
                continue  # malformed for JSON; the packed form cannot even say it
            assert _one_by_one(packed, [(rank, _packed(msg))]) == _one_by_one(plain, [(rank, msg)])
            assert p_sent.sent == j_sent.sent
            assert _differing_arrays(packed, plain) == []


def _differing_arrays(a: Coordinator, b: Coordinator) -> list[str]:
    seg_a, seg_b = a.directory.segment, b.directory.segment
    names = ("state", "seq_hash", "parent_hash", "flags", "tokens", "index_slot")
    return [n for n in names if not np.array_equal(getattr(seg_a, n), getattr(seg_b, n))]


_THREE_ITEMS: Final = (
    [1, 2**64 - 1, 7],
    [None, 1, 2**64 - 1],
    [3, 4, 5],
    [0, 1, 9],
)
"""(seqs, parents, locals_, positions) of three packed items: a root, u64 extremes."""


def test_pack_offload_items_round_trips_and_bad_frames_are_refused() -> None:
    seqs, parents, locals_, positions = _THREE_ITEMS
    frame = tp.pack_offload_items(seqs, parents, locals_, positions)
    assert len(frame) == 3 * tp.PACKED_ITEM_BYTES
    assert tp.unpack_offload_items(3, frame) == (seqs, parents, locals_, positions)
    with pytest.raises(ProtocolError, match="bytes"):
        tp.unpack_offload_items(2, frame)
    words = bytearray(frame)
    words[31] = 0x80  # an unknown flag bit in the first item's fourth word
    with pytest.raises(ProtocolError, match="flag"):
        tp.unpack_offload_items(3, bytes(words))
    words = bytearray(frame)
    words[8] = 1  # a parent word without its flag
    with pytest.raises(ProtocolError, match="parent"):
        tp.unpack_offload_items(3, bytes(words))
    with pytest.raises(ProtocolError):
        tp.pack_offload_items([1], [None], [1], [1 << 30])
    with pytest.raises(ProtocolError):
        tp.pack_offload_items([-1], [None], [1], [0])


def test_unpack_offload_columns_matches_the_lists_and_refuses_the_same_frames() -> None:
    seqs, parents, locals_, positions = _THREE_ITEMS
    frame = tp.pack_offload_items(seqs, parents, locals_, positions)
    columns = tp.unpack_offload_columns(3, frame)
    assert columns.seqs.tolist() == seqs
    assert columns.parents.tolist() == [0, 1, 2**64 - 1]
    assert columns.has_parent.tolist() == [False, True, True]
    assert columns.locals.tolist() == locals_
    assert columns.positions.tolist() == positions
    bad = [bytearray(frame), bytearray(frame)]
    bad[0][31] = 0x80  # an unknown flag bit
    bad[1][8] = 1  # a parent word without its flag
    for words, match in zip(bad, ("flag", "parent"), strict=True):
        with pytest.raises(ProtocolError, match=match):
            tp.unpack_offload_columns(3, bytes(words))
    with pytest.raises(ProtocolError, match="bytes"):
        tp.unpack_offload_columns(2, frame)


def _events_frame(events: list[tuple[int, int, int, int, int]]) -> bytes:
    """A packed G2_EVENTS frame of (kind, seq, parent | -1, local, meta-without-parent-flag)."""
    stores = [e for e in events if e[0] == tp.G2_EVENT_STORED]

    def words(values: list[int]) -> bytes:
        return b"".join(v.to_bytes(8, "little") for v in values)

    return tp.pack_g2_events(
        bytes(e[0] for e in events),
        words([e[1] for e in events]),
        words([max(0, e[2]) for e in stores]),
        words([e[3] for e in stores]),
        words([e[4] | (0 if e[2] < 0 else tp.G2_HAS_PARENT) for e in stores]),
    )


def test_packed_g2_events_round_trip_and_bad_frames_are_refused() -> None:
    S, R = tp.G2_EVENT_STORED, tp.G2_EVENT_REMOVED
    frame = _events_frame(
        [
            (R, 9, 0, 0, 0),
            (S, 1, -1, 3, 0 | tp.G2_HAS_TOKENS),
            (S, 2**64 - 1, 1, 4, 1),
            (R, 1, 0, 0, 0),
        ]
    )
    assert len(frame) == tp.g2_events_frame_bytes(4, 2)
    events = tp.unpack_g2_events(4, 2, frame)
    assert list(events.kinds) == [R, S, S, R]
    assert events.seqs == [9, 1, 2**64 - 1, 1]
    assert events.parents == [-1, 1]
    assert events.locals == [3, 4]
    assert events.positions == [0, 1]
    assert events.has_tokens == [True, False]
    assert tp.unpack_g2_events(0, 0, b"") == tp.G2EventColumns(b"", [], [], [], [], [])
    words_end = 8 * (4 + 3 * 2)
    cases = [
        ("counts", 4, 5, frame),
        ("bytes", 3, 2, frame),
        ("kinds", 4, 2, frame[:words_end] + bytes([R, S, 7, R])),
        ("stores", 4, 2, frame[:words_end] + bytes([R, S, R, R])),
        ("flag", 4, 2, frame[: 8 * 8] + (1 << 40).to_bytes(8, "little") + frame[8 * 9 :]),
        ("parent", 4, 2, frame[: 8 * 4] + (5).to_bytes(8, "little") + frame[8 * 5 :]),
    ]
    for match, count, stores, data in cases:
        with pytest.raises(ProtocolError, match=match):
            tp.unpack_g2_events(count, stores, data)
    with pytest.raises(ProtocolError):
        tp.pack_g2_events(b"\x01", b"", b"", b"", b"")


def _deferred_group(coord: Coordinator, msgs: list[tuple[int, tp.Message]]) -> int:
    """What `serve_router` does with the OFFLOADs of one turn: plain packed ones wait and are
    screened together (`_screen_pending`), any other one first screens those. Returns the
    number of messages refused as malformed."""
    claimed: set[int] = set()
    group: list[Any] = []
    pending: list[tuple[bytes, Any, tp.Message]] = []
    before = coord.stats.bad_messages
    for rank, msg in msgs:
        identity, conn = f"r{rank}".encode(), coord._ranks[rank]
        if coord._is_plain_packed(msg):
            pending.append((identity, conn, msg))
            continue
        coord._screen_pending(pending, group, claimed)
        try:
            group.append(coord._screen_offload(conn, msg, claimed))
        except ProtocolError as exc:
            coord._bad_message(identity, str(exc))
    coord._screen_pending(pending, group, claimed)
    if group:
        coord._offload_group(group)
    coord.flush()
    return coord.stats.bad_messages - before


def _corrupt(rng: random.Random, msg: tp.Message) -> tp.Message:
    """A packed OFFLOAD with an unknown flag bit or a parent word without its flag."""
    frame = bytearray(msg.frames[0])
    if not frame:
        return msg
    item = rng.randrange(len(frame) // tp.PACKED_ITEM_BYTES)
    if rng.random() < 0.5:
        frame[item * tp.PACKED_ITEM_BYTES + 31] |= 0x80
    else:
        frame[item * tp.PACKED_ITEM_BYTES + 28] &= 0xFE  # clears PACKED_HAS_PARENT (bit 32)
        frame[item * tp.PACKED_ITEM_BYTES + 8] |= 1
    return tp.Message(tp.OFFLOAD, msg.body, (bytes(frame), *msg.frames[1:]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_deferred_packed_offloads_are_screened_as_one_by_one(seed: int) -> None:
    """`serve_router`'s deferred screening of plain packed OFFLOADs (all at once when every
    item is valid and new, else one by one) sends and stores exactly what screening each
    message as it is read does, malformed frames, duplicates and small pools included."""
    rng = random.Random(seed)
    capacity = rng.choice([24, BIG])
    with _coordinators(capacity, capacity) as [(deferred, d_sent), (each, e_sent)]:
        pool: list[int] = []
        sent: list[list[Any]] = []
        for turn in range(rng.randint(1, 6)):
            msgs = []
            for k in range(rng.randint(1, 6)):
                msg = _batch(rng, pool if rng.random() < 0.5 else [], sent, 10 * turn + k)
                msg = _without_twins(msg, sent)  # no key clashes (the Lineage refuses them)
                if any(item[3] < 0 for item in msg.body["items"]):
                    continue  # malformed for JSON; the packed form cannot even say it
                packed = _packed(msg) if rng.random() < 0.9 else msg
                if packed is not msg and rng.random() < 0.1:
                    packed = _corrupt(rng, packed)
                msgs.append((rng.randrange(NUM_RANKS), packed))
            bad = _deferred_group(deferred, msgs)
            outcomes = _group(each, msgs)
            assert bad == sum(outcome != "ok" for outcome in outcomes)
            assert d_sent.sent == e_sent.sent
            assert _differing_arrays(deferred, each) == []
            d_stats, e_stats = deferred.stats_dict(), each.stats_dict()
            d_stats.pop("bad_messages"), e_stats.pop("bad_messages")
            assert d_stats == e_stats
