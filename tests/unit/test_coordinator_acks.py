"""The coordinator's "done" ACKs at speedup 0 / inf ride in the rank's G2_EVENTS (protocol
version 2): one message per rank and flush, the ACKs after every event of that flush; at a
finite speedup the ACK still goes out at once and OFFLOAD_DONE follows when the copy lands.

The coordinator runs in-process; what it sends is captured raw (decoded, not unfolded).
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq

from shmkv import coordinator as coordinator_module, transport as tp
from shmkv.coordinator import Coordinator, CoordinatorSpec
from shmkv.shm import segment_name

BLOCK_SIZE = 2
NUM_RANKS = 2


class _Capture:
    """Every message the coordinator sends to a rank, decoded, in order."""

    def __init__(self, coord: Coordinator) -> None:
        self.sent: list[tuple[int, tp.Message]] = []
        coord._send_raw = self._record  # type: ignore[method-assign]

    def _record(self, conn: Any, frames: Sequence[bytes | zmq.Frame]) -> None:
        self.sent.append((conn.rank, tp.decode(frames)))

    def take(self, rank: int) -> list[tp.Message]:
        mine = [msg for r, msg in self.sent if r == rank]
        self.sent = [(r, msg) for r, msg in self.sent if r != rank]
        return mine


@contextmanager
def _coordinator(tmp_path: Path, speedup: float) -> Iterator[tuple[Coordinator, _Capture]]:
    fleet = f"ca{uuid.uuid4().hex[:10]}"
    spec = CoordinatorSpec(
        fleet_id=fleet,
        segment_name=segment_name(fleet),
        num_g2_blocks=64,
        block_size=BLOCK_SIZE,
        num_ranks=NUM_RANKS,
        endpoint=f"ipc://{tmp_path}/c",
        supervisor_endpoint=f"ipc://{tmp_path}/s",
        start_monotonic_s=time.monotonic(),
        speedup_ratio=speedup,
        block_size_bytes=1000,
        bandwidth_g1_to_g2_gbps=0.00002,  # 20 B/ms: 50 simulated ms per block
    )
    with Coordinator(spec) as coord:
        for rank in range(NUM_RANKS):
            hello = tp.Message(tp.HELLO, {"rank": rank, "pid": os.getpid(), "epoch": 0})
            coord._handle_rank_message(f"r{rank}".encode(), hello)
        yield coord, _Capture(coord)


def _offload(coord: Coordinator, rank: int, batch: int, seqs: list[int]) -> None:
    items = [[seq, seqs[k - 1] if k else -1, seq ^ 0x77, k] for k, seq in enumerate(seqs)]
    body = {"batch": batch, "items": items, "has_tokens": True}
    frames = (bytes(4 * BLOCK_SIZE * len(items)),)
    coord._handle_rank_message(f"r{rank}".encode(), tp.Message(tp.OFFLOAD, body, frames))


def _stored(msg: tp.Message) -> list[int]:
    """The seq hashes a packed G2_EVENTS stores, in order."""
    body = msg.body
    num_events = body["num_events"]
    if not num_events:
        return []
    events = tp.unpack_g2_events(num_events, body["num_stores"], msg.frames[0])
    return [s for k, s in zip(events.kinds, events.seqs, strict=True) if k == tp.G2_EVENT_STORED]


def _ack(batch: int, accepted: list[int], rejected: list[int]) -> dict[str, Any]:
    """A "done" ACK body without its deadline."""
    return {"batch": batch, "accepted": accepted, "rejected": rejected, "done": True}


@pytest.mark.parametrize("speedup", [math.inf, 0.0])
def test_done_acks_ride_in_the_one_g2_events_of_each_rank(tmp_path: Path, speedup: float) -> None:
    with _coordinator(tmp_path, speedup) as (coord, capture):
        _offload(coord, 0, 1, [11, 12, 13])
        _offload(coord, 0, 2, [21, 22])
        _offload(coord, 1, 7, [31, 12])  # 12: READY already (rank 0's): rejected
        assert capture.sent == [], "no ACK goes out before the flush"
        coord.flush()
        (mine,) = capture.take(0)
        (theirs,) = capture.take(1)
        assert capture.sent == []
        assert mine.type == theirs.type == tp.G2_EVENTS
        assert _stored(mine) == [11, 12, 13, 21, 22, 31]
        assert mine.frames == theirs.frames, "one broadcast: the same events for every rank"
        acks0, acks1 = mine.body.pop("acks"), theirs.body.pop("acks")
        assert mine.body == theirs.body == {"num_events": 6, "num_stores": 6}
        deadlines = [ack.pop("deadline_ms") for ack in (*acks0, *acks1)]
        assert all(isinstance(d, float) and d >= 0.0 for d in deadlines), "now, when landed"
        assert acks0 == [_ack(1, [0, 1, 2], []), _ack(2, [0, 1], [])]
        assert acks1 == [_ack(7, [0], [1])]
        coord.flush()
        assert capture.sent == [], "nothing queued: nothing sent"


def test_acks_without_events_go_in_a_g2_events_of_no_events(tmp_path: Path) -> None:
    with _coordinator(tmp_path, math.inf) as (coord, capture):
        _offload(coord, 0, 1, [11, 12])
        coord.flush()
        capture.sent.clear()
        _offload(coord, 1, 4, [11, 12])  # every block READY already: all rejected
        coord.flush()
        assert capture.take(0) == []
        (msg,) = capture.take(1)
        assert msg.type == tp.G2_EVENTS
        assert msg.frames == ()
        assert msg.body == {
            "num_events": 0,
            "num_stores": 0,
            "acks": [{**_ack(4, [], [0, 1]), "deadline_ms": "inf"}],
        }


def test_only_the_last_message_of_a_split_flush_carries_the_acks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_module, "MAX_EVENTS_PER_MESSAGE", 3)
    with _coordinator(tmp_path, math.inf) as (coord, capture):
        _offload(coord, 0, 1, [1, 2, 3, 4, 5, 6, 7])
        coord.flush()
        mine, theirs = capture.take(0), capture.take(1)
        assert [m.type for m in mine] == [tp.G2_EVENTS] * 3
        assert [_stored(m) for m in mine] == [[1, 2, 3], [4, 5, 6], [7]]
        assert [m.frames for m in mine] == [m.frames for m in theirs]
        assert ["acks" in m.body for m in mine] == [False, False, True]
        assert ["acks" in m.body for m in theirs] == [False, False, False]
        assert [a["batch"] for a in mine[2].body["acks"]] == [1]


def test_a_finite_speedup_acks_at_once_and_sends_offload_done_after_the_events(
    tmp_path: Path,
) -> None:
    with _coordinator(tmp_path, 1e6) as (coord, capture):
        _offload(coord, 0, 1, [11, 12])
        (ack,) = capture.take(0)
        assert ack.type == tp.OFFLOAD_ACK
        assert set(ack.body) == {"batch", "accepted", "rejected", "deadline_ms"}
        assert (ack.body["accepted"], ack.body["rejected"]) == ([0, 1], [])
        for _ in range(100_000):  # 100 simulated ms: 0.1 wall ms
            coord.advance()
            if coord.stats.offloaded == 2:
                break
        assert coord.stats.offloaded == 2
        coord.flush()
        events, done = capture.take(0)
        assert (events.type, done.type) == (tp.G2_EVENTS, tp.OFFLOAD_DONE)
        assert "acks" not in events.body
        assert _stored(events) == [11, 12]
        assert done.body == {"batch": 1, "items": [0, 1]}
        (other,) = capture.take(1)
        assert other.type == tp.G2_EVENTS
        assert "acks" not in other.body


@pytest.mark.parametrize("num_events", [0, 3])
def test_a_spliced_g2_events_header_is_the_bytes_encode_gives(num_events: int) -> None:
    """The header with a rank's "acks" is built from the shared one by splicing (no dict per
    rank): byte for byte `transport.encode` of the body with "acks" added last, the ACKs that
    accept every item included (their list comes from a cached JSON fragment)."""
    acks = [
        {
            "batch": 7,
            "accepted": coordinator_module._every_item(3),
            "rejected": [],
            "deadline_ms": 12.5,
            "done": True,
        },
        {"batch": 8, "accepted": [0, 2], "rejected": [1], "deadline_ms": "inf", "done": True},
    ]
    plain = [{**acks[0], "accepted": [0, 1, 2]}, acks[1]]
    body: dict[str, Any] = {"num_events": num_events, "num_stores": min(num_events, 1)}
    header = tp.encode(tp.G2_EVENTS, body)[0]

    class _Conn:
        def __init__(self) -> None:
            self.acks: list[dict[str, Any]] = list(acks)

    conn: Any = _Conn()
    spliced = coordinator_module._with_acks(header, conn)
    assert spliced == tp.encode(tp.G2_EVENTS, {**body, "acks": plain})[0]
    assert conn.acks == []
    assert tp.decode([spliced]).body["acks"] == plain
    other: Any = _Conn()
    expected = tp.encode(tp.G2_EVENTS, {"num_events": 0, "num_stores": 0, "acks": plain})[0]
    assert coordinator_module._with_acks(coordinator_module._NO_EVENTS_HEADER, other) == expected
