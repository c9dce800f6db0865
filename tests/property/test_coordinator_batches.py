"""The coordinator's batched OFFLOAD handling against its per-item reference path.

Two in-process coordinators (copies land at once) receive the same OFFLOAD messages from the
same ranks; one handles each batch with column checks and `G2Directory.commit_many`, the other
item by item (`Coordinator.batched = False`). Every reply (ACK, DONE), every G2 event with its
token ids, and the segment's arrays must be identical. Batches mix fresh chains, blocks stored
already, blocks repeated in one batch, children before their parents, parents from earlier
batches, malformed items, and a pool small enough to evict (with pinned victims).
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import zmq
from hypothesis import given, settings, strategies as st

from shmkv import transport as tp
from shmkv.coordinator import Coordinator, CoordinatorSpec
from shmkv.errors import ProtocolError
from shmkv.g2 import G2RankView
from shmkv.shm import segment_name

BLOCK_SIZE = 2
CAPACITY = 24
NUM_RANKS = 2
FIELDS = ("state", "gen", "seq_hash", "parent_hash", "local_hash", "position", "flags", "owner",
          "tokens", "index_slot", "pins")  # fmt: skip


def _coordinator(tmp: Path, tag: str, batched: bool, capacity: int = CAPACITY) -> Coordinator:
    fleet = f"cb{uuid.uuid4().hex[:10]}"
    spec = CoordinatorSpec(
        fleet_id=fleet,
        segment_name=segment_name(fleet),
        num_g2_blocks=capacity,
        block_size=BLOCK_SIZE,
        num_ranks=NUM_RANKS,
        endpoint=f"ipc://{tmp}/{tag}c",
        supervisor_endpoint=f"ipc://{tmp}/{tag}s",
        start_monotonic_s=time.monotonic(),
        speedup_ratio=math.inf,
    )
    coord = Coordinator(spec)
    coord.batched = batched
    coord.batch_min_blocks = 1  # the batched path even for the small batches drawn here
    return coord


class _Recorder:
    """Captures what a coordinator sends to its ranks (the ROUTER would drop it: no peers)."""

    def __init__(self, coord: Coordinator) -> None:
        self.sent: list[tuple[int, list[bytes]]] = []
        coord._send_raw = self._record  # type: ignore[method-assign]

    def _record(self, conn: Any, frames: Sequence[bytes | zmq.Frame]) -> None:
        """Record a message; a G2_EVENTS's "acks" as the G2_EVENTS (none when it has no
        events: it carried only them) followed by one OFFLOAD_ACK per ack, the messages the
        receiver applies it as."""
        msg = tp.decode(frames)
        msg.body.pop("deadline_ms", None)  # "now" on the wall clock: differs between the two
        acks = msg.body.pop("acks", None) if msg.type == tp.G2_EVENTS else None
        if acks is None or msg.body["num_events"] or "fence" in msg.body:
            self.sent.append((conn.rank, [orjson.dumps({"t": msg.type, **msg.body}), *msg.frames]))
        for ack in acks or ():
            ack.pop("deadline_ms", None)
            self.sent.append((conn.rank, [orjson.dumps({"t": tp.OFFLOAD_ACK, **ack})]))


@contextmanager
def _pair() -> Iterator[tuple[Coordinator, Coordinator, _Recorder, _Recorder]]:
    tmp = Path(tempfile.mkdtemp(prefix="shmkv-cb", dir="/tmp"))
    with ExitStack() as stack:
        coords = [stack.enter_context(_coordinator(tmp, t, t == "b")) for t in ("a", "b")]
        for coord in coords:
            for rank in range(NUM_RANKS):
                hello = tp.Message(tp.HELLO, {"rank": rank, "pid": os.getpid(), "epoch": 0})
                coord._handle_rank_message(f"r{rank}".encode(), hello)
        recorders = [_Recorder(c) for c in coords]  # after the WELCOMEs (segment names)
        yield coords[0], coords[1], recorders[0], recorders[1]
    for child in tmp.iterdir():
        child.unlink(missing_ok=True)
    tmp.rmdir()


def _batch(rng: random.Random, pool: list[int], sent: list[list[Any]], batch: int) -> tp.Message:
    items: list[list[Any]] = []
    parent = rng.choice([-1, -1, *pool[-4:]]) if pool else -1
    for position in range(rng.randint(0, 10)):
        roll = rng.random()
        if roll < 0.15 and pool:
            seq = rng.choice(pool)  # stored already, or in this batch
        else:
            seq = rng.getrandbits(64)
            pool.append(seq)
        items.append([seq, parent, seq ^ 0x77, position])
        parent = seq
    if len(items) > 1 and rng.random() < 0.15:
        items[0][1] = items[-1][0]  # a parent at a later position: that block waits for it
    if items and rng.random() < 0.2:
        rng.shuffle(items)  # children before parents
    if sent and rng.random() < 0.3:
        seq, parent_of, local, position = rng.choice(sent)
        items.append([seq ^ (1 << 62), parent_of, local, position])  # same PLH: a duplicate
    sent.extend(items)
    if items and rng.random() < 0.05:
        items[rng.randrange(len(items))][3] = -5  # malformed: the whole batch is refused
    has_tokens = rng.random() < 0.8
    body = {"batch": batch, "items": items, "has_tokens": has_tokens}
    frames = (bytes(rng.randrange(256) for _ in range(4 * BLOCK_SIZE * len(items))),)
    return tp.Message(tp.OFFLOAD, body, frames if has_tokens else ())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_batched_offloads_match_the_per_item_path(seed: int) -> None:
    with _pair() as (ref, fast, ref_sent, fast_sent):
        _drive(ref, fast, ref_sent, fast_sent, random.Random(seed))


def _drive(
    ref: Coordinator,
    fast: Coordinator,
    ref_sent: _Recorder,
    fast_sent: _Recorder,
    rng: random.Random,
) -> None:
    pool: list[int] = []
    sent: list[list[Any]] = []
    views = [G2RankView(c.directory.segment, 1) for c in (ref, fast)]
    held: list[Any] = []
    try:
        for batch in range(rng.randint(1, 12)):
            rank = rng.randrange(NUM_RANKS)
            msg = _batch(rng, pool, sent, batch)
            outcomes = []
            for coord in (ref, fast):
                try:
                    coord._handle_rank_message(f"r{rank}".encode(), msg)
                    outcomes.append("ok")
                except ProtocolError as exc:
                    outcomes.append(str(exc))
                coord.flush()
            assert outcomes[0] == outcomes[1]
            if pool and rng.random() < 0.3:  # rank 1 pins a few blocks: eviction backs off
                wanted = rng.sample(pool, min(3, len(pool)))
                runs = [view.pin_prefix(wanted, vectorized=False) for view in views]
                assert (runs[0] is None) == (runs[1] is None)
                if runs[0] is not None and runs[1] is not None:
                    assert runs[0].slots == runs[1].slots
                    held.append(runs)
            if held and rng.random() < 0.3:
                for view, run in zip(views, held.pop(0), strict=True):
                    view.unpin(run)
            assert ref_sent.sent == fast_sent.sent
            seg_a, seg_b = ref.directory.segment, fast.directory.segment
            for name in FIELDS:
                assert np.array_equal(getattr(seg_a, name), getattr(seg_b, name)), name
            assert ref.stats_dict(include_pins=True) == fast.stats_dict(include_pins=True)
        ref.directory.check_invariants()
        fast.directory.check_invariants()
    finally:
        for view in views:
            view.close()
