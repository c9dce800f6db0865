"""`SharedG2Client` message handling and onboarding without a coordinator process, and the
coordinator's bookkeeping in-process (spec JSON, deferral across ranks, dead-rank cleanup
checked with `G2Directory.check_invariants`).

The client talks to a ROUTER owned by the test (a thread answers its HELLO with WELCOME); the
test plays the coordinator by committing blocks into a `G2Directory` of its own and handing
the client decoded messages.
"""

from __future__ import annotations

import math
import os
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from shmkv import transport as tp
from shmkv.clock import ManualClock
from shmkv.config import EngineConfig
from shmkv.coordinator import _SPEC_KINDS, Coordinator, CoordinatorSpec, segment_fleet_id
from shmkv.errors import ConfigError, ProtocolError, SharedMemoryError, WorkerTimeoutError
from shmkv.eviction import make_backend
from shmkv.g2 import G2Directory
from shmkv.g2_client import SharedG2Client
from shmkv.hashing import plh_position
from shmkv.offload import G2Event, G2Removed, G2Stored, OffloadItem
from shmkv.shm import G2Segment, read_next_event_seq, segment_name
from tests.multiproc._g2_client_worker import chain_items

BLOCK_SIZE = 4
Context = zmq.Context[zmq.Socket[bytes]]


@dataclass
class Harness:
    segment: G2Segment
    directory: G2Directory
    router: zmq.Socket[bytes]
    client: SharedG2Client
    clock: ManualClock
    identity: bytes

    def store(self, items: list[OffloadItem], rank: int = 0) -> dict[str, Any]:
        """Commit `items` into G2 as the coordinator would, and build the G2_EVENTS body."""
        slots = self.directory.reserve(len(items), rank)
        events: list[list[Any]] = []
        tokens = array("I")
        for item, slot in zip(items, slots, strict=True):
            meta = item.meta
            position = plh_position(item.plh)
            assert self.directory.commit(
                slot,
                meta.seq_hash,
                meta.parent_hash,
                meta.local_hash,
                position,
                meta.token_ids,
                rank,
            )
            parent = -1 if meta.parent_hash is None else meta.parent_hash
            events.append(["S", meta.seq_hash, parent, meta.local_hash, position, 1])
            tokens.extend(array("I", meta.token_ids or []))
        return {"events": events, "tokens": tokens.tobytes()}

    def deliver(self, msg_type: str, body: dict[str, Any], frames: tuple[bytes, ...] = ()) -> None:
        self.client.handle(tp.decode(tp.encode(msg_type, body, frames)))

    def deliver_events(self, stored: dict[str, Any]) -> None:
        frames = (stored["tokens"],) if stored["tokens"] else ()
        self.deliver(tp.G2_EVENTS, {"events": stored["events"]}, frames)

    def recv_offload(self) -> tp.Message:
        assert self.router.poll(2000)
        identity, *frames = self.router.recv_multipart()
        assert identity == self.identity
        return tp.decode(frames)


def _answer_hello(router: zmq.Socket[bytes], name: str, epoch: int) -> None:
    if router.poll(5000):
        identity, *frames = router.recv_multipart()
        hello = tp.decode(frames)
        assert hello.type == tp.HELLO
        assert hello.body["pid"] == os.getpid()
        body = {"segment": name, "num_ranks": 2, "epoch": epoch}
        router.send_multipart([identity, *tp.encode(tp.WELCOME, body)])


@pytest.fixture
def harness(fleet_id: str, zmq_context: Context) -> Iterator[Harness]:
    segment = G2Segment.create(fleet_id, capacity=16, block_size=BLOCK_SIZE, num_ranks=2)
    policy, _ = make_backend("lineage", 16)
    directory = G2Directory(segment, policy)
    router = zmq_context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"inproc://coord-{fleet_id}"
    router.bind(endpoint)
    thread = threading.Thread(target=_answer_hello, args=(router, segment.name, 3))
    thread.start()
    clock = ManualClock()
    config = EngineConfig(
        block_size=BLOCK_SIZE,
        num_g2_blocks=16,
        kv_bytes_per_token=250,  # 1000 B per block
        bandwidth_g2_to_g1_gbps=0.001,  # 1000 B/ms: 1 ms per block
    )
    try:
        client = SharedG2Client(
            rank=1,
            epoch=3,
            segment_name=segment.name,
            coordinator_endpoint=endpoint,
            config=config,
            clock=clock,
            context=zmq_context,
            hello_timeout_s=5.0,
        )
    finally:
        thread.join()
    try:
        yield Harness(segment, directory, router, client, clock, b"rank1-e3")
    finally:
        client.close()
        router.close(linger=0)
        directory.close()
        segment.unlink()
        segment.close()


def _chain(seed: int, num_blocks: int) -> list[OffloadItem]:
    tokens = [(seed * 7919 + i * 31) % 50_000 for i in range(num_blocks * BLOCK_SIZE)]
    return chain_items(tokens, BLOCK_SIZE)


# -- offload messages --------------------------------------------------------------------------


def test_offload_is_one_batched_message_and_slots_come_back_after_ack_and_done(
    harness: Harness,
) -> None:
    client = harness.client
    items = _chain(1, 3)
    assert client.enqueue_evictions(items, [10, 11, 12, 13]) == [13]
    msg = harness.recv_offload()
    assert msg.type == tp.OFFLOAD
    assert msg.body["has_tokens"] is True
    assert msg.body["packed"] is True
    assert msg.body["num_items"] == 3
    assert len(msg.frames) == 2
    seqs, parents, locals_, positions = tp.unpack_offload_items(3, msg.frames[0])
    assert seqs == [item.meta.seq_hash for item in items]
    assert parents == [None, items[0].meta.seq_hash, items[1].meta.seq_hash]
    assert locals_ == [item.meta.local_hash for item in items]
    assert positions == [0, 1, 2]
    assert array("I", msg.frames[1]).tolist() == [t for i in items for t in i.meta.token_ids or []]
    assert not harness.router.poll(10), "one message per batch"
    batch = msg.body["batch"]
    assert client.earliest_deadline_ms() == 0.0, "an un-ACKed batch is due at once"
    assert client.tick(0.0) == []
    harness.deliver(
        tp.OFFLOAD_ACK, {"batch": batch, "accepted": [0, 2], "rejected": [1], "deadline_ms": 5.0}
    )
    assert client.earliest_deadline_ms() == 0.0, "a released slot is due now"
    assert client.tick(1.0) == [11]
    assert client.earliest_deadline_ms() == 5.0
    assert client.num_quarantined == 2
    harness.deliver(tp.OFFLOAD_DONE, {"batch": batch, "items": [2]})
    assert client.tick(5.0) == [12]
    harness.deliver(tp.OFFLOAD_DONE, {"batch": batch, "items": [0]})
    assert client.tick(5.0) == [10]
    assert client.earliest_deadline_ms() is None
    assert client.num_outstanding_batches == 0
    stats = client.stats()
    assert (stats.accepted, stats.rejected, stats.done) == (2, 1, 2)


def test_an_ack_that_says_done_releases_every_slot_at_once(harness: Harness) -> None:
    client = harness.client
    client.enqueue_evictions(_chain(6, 3), [20, 21, 22])
    batch = harness.recv_offload().body["batch"]
    body = {"batch": batch, "accepted": [0, 2], "rejected": [1], "deadline_ms": 0.0, "done": True}
    harness.deliver(tp.OFFLOAD_ACK, body)
    assert sorted(client.tick(0.0)) == [20, 21, 22]
    assert client.num_outstanding_batches == 0
    assert client.num_quarantined == 0
    stats = client.stats()
    assert (stats.accepted, stats.rejected, stats.done) == (2, 1, 2)
    with pytest.raises(ProtocolError):  # no OFFLOAD_DONE may follow
        harness.deliver(tp.OFFLOAD_DONE, {"batch": batch, "items": [0]})


@pytest.mark.parametrize("folded", [False, True])
def test_acks_in_a_g2_events_act_as_the_events_then_those_acks(
    harness: Harness, folded: bool
) -> None:
    """Protocol 2: a G2_EVENTS with "acks" is applied exactly as the G2_EVENTS followed by
    one OFFLOAD_ACK per entry (the form speedup 0 / inf used before)."""
    client = harness.client
    first, second = _chain(8, 3), _chain(9, 2)
    client.enqueue_evictions(first, [20, 21, 22])
    client.enqueue_evictions(second, [30, 31])
    batches = [harness.recv_offload().body["batch"] for _ in range(2)]
    stored = harness.store([*first, second[0]])
    body, frames = _packed_events(stored["events"])
    acks = [
        {"batch": batches[0], "accepted": [0, 1, 2], "rejected": [], "deadline_ms": 1.5,
         "done": True},
        {"batch": batches[1], "accepted": [0], "rejected": [1], "deadline_ms": 1.5, "done": True},
    ]  # fmt: skip
    assert client.earliest_deadline_ms() == 0.0
    if folded:
        harness.deliver(tp.G2_EVENTS, {**body, "acks": acks}, (*frames, stored["tokens"]))
    else:
        harness.deliver(tp.G2_EVENTS, body, (*frames, stored["tokens"]))
        for ack in acks:
            harness.deliver(tp.OFFLOAD_ACK, ack)
    assert _stream(client.take_events()) == [("S", i.meta.seq_hash) for i in [*first, second[0]]]
    assert client.tick(1.0) == [20, 21, 22, 31, 30]
    assert client.num_outstanding_batches == 0
    assert client.num_quarantined == 0
    assert client.earliest_deadline_ms() is None
    stats = client.stats()
    assert (stats.accepted, stats.rejected, stats.done) == (4, 1, 4)
    assert (stats.stores_received, stats.removals_received, stats.bad_messages) == (4, 0, 0)


def test_a_bad_ack_in_a_g2_events_is_dropped_alone(harness: Harness) -> None:
    """Each bad entry of "acks" counts as one bad message (as its own OFFLOAD_ACK would);
    the events and the good entries still apply."""
    client = harness.client
    items = _chain(10, 2)
    client.enqueue_evictions(items[:1], [40])
    client.enqueue_evictions(items[1:], [41])
    batches = [harness.recv_offload().body["batch"] for _ in range(2)]
    stored = harness.store(items)
    body, frames = _packed_events(stored["events"])
    acks = [
        {"batch": 999, "accepted": [0], "rejected": []},
        {"batch": batches[1], "accepted": [0], "rejected": [], "done": True},
        {"batch": batches[1], "accepted": [0], "rejected": [], "done": True},  # twice
        {"batch": batches[0], "accepted": [0], "rejected": [], "done": True},
    ]
    message = tp.encode(tp.G2_EVENTS, {**body, "acks": acks}, (*frames, stored["tokens"]))
    with pytest.raises(ProtocolError, match="unknown offload batch 999"):
        client.handle(tp.decode(message))
    assert client.stats().bad_messages == 1, "the second bad ACK; the caller counts the first"
    assert sorted(client.replica_seq_hashes()) == sorted(i.meta.seq_hash for i in items)
    assert client.tick(0.0) == [41, 40]
    harness.router.send_multipart([harness.identity, *message])
    deadline = time.monotonic() + 2.0
    while not client.receive():
        assert time.monotonic() < deadline
        client.socket.poll(50)
    assert client.stats().bad_messages == 1 + 4, "all four ACKs are stale now"
    assert client.stats().stores_received == 4


def _packed_events(events: list[list[Any]]) -> tuple[dict[str, Any], tuple[bytes, ...]]:
    """The packed G2_EVENTS body and events frame of JSON-form events."""

    def words(values: list[int]) -> bytes:
        return b"".join(v.to_bytes(8, "little") for v in values)

    stores = [e for e in events if e[0] == "S"]
    frame = tp.pack_g2_events(
        bytes(tp.G2_EVENT_STORED if e[0] == "S" else tp.G2_EVENT_REMOVED for e in events),
        words([e[1] for e in events]),
        words([max(0, e[2]) for e in stores]),
        words([e[3] for e in stores]),
        words(
            [
                e[4] | (tp.G2_HAS_PARENT if e[2] >= 0 else 0) | (tp.G2_HAS_TOKENS if e[5] else 0)
                for e in stores
            ]
        ),
    )
    return {"num_events": len(events), "num_stores": len(stores)}, (frame,)


def test_packed_events_act_as_their_json_form(harness: Harness) -> None:
    client = harness.client
    items = _chain(7, 4)
    stored = harness.store(items[:3])
    events = [*stored["events"], ["R", items[2].meta.seq_hash]]
    body, frames = _packed_events(events)
    harness.deliver(tp.G2_EVENTS, body, (*frames, stored["tokens"]))
    packed = client.take_events()
    packed_replica = sorted(client.replica_seq_hashes())
    harness.deliver(tp.G2_EVENTS, {"events": [["R", i.meta.seq_hash] for i in items[:2]]})
    client.take_events()
    assert client.replica_seq_hashes() == []
    harness.deliver(tp.G2_EVENTS, {"events": events}, (stored["tokens"],))
    assert client.take_events() == packed
    assert sorted(client.replica_seq_hashes()) == packed_replica
    assert _stream(packed) == [
        *(("S", i.meta.seq_hash) for i in items[:3]),
        ("R", items[2].meta.seq_hash),
    ]
    assert isinstance(packed[1], G2Stored)
    assert list(packed[1].meta.token_ids or []) == list(items[1].meta.token_ids or [])
    stats = client.stats()
    assert (stats.stores_received, stats.removals_received) == (6, 4)


def test_an_ack_with_an_infinite_deadline_still_keeps_the_rank_ticking(harness: Harness) -> None:
    client = harness.client
    client.enqueue_evictions(_chain(2, 1), [0])
    batch = harness.recv_offload().body["batch"]
    harness.deliver(
        tp.OFFLOAD_ACK, {"batch": batch, "accepted": [0], "rejected": [], "deadline_ms": "inf"}
    )
    client.tick(7.0)
    assert client.earliest_deadline_ms() == 7.0


@pytest.mark.parametrize(
    ("msg_type", "body"),
    [
        (tp.OFFLOAD_ACK, {"batch": 99, "accepted": [0], "rejected": []}),
        (tp.OFFLOAD_ACK, {"batch": 1, "accepted": [0, 5], "rejected": []}),
        (tp.OFFLOAD_ACK, {"batch": 1, "accepted": [0], "rejected": [0]}),
        (tp.OFFLOAD_ACK, {"batch": 1, "accepted": [0], "rejected": []}),
        (tp.OFFLOAD_ACK, {"batch": 1, "accepted": [0, 1], "rejected": [], "deadline_ms": "x"}),
        (tp.OFFLOAD_DONE, {"batch": 1, "items": [0]}),
        (tp.G2_EVENTS, {"events": [["S", 1, -1, 2, 0, 1]]}),
        (tp.G2_EVENTS, {"events": [["X", 1]]}),
        (tp.G2_EVENTS, {"events": [["R", -5]]}),
        (tp.G2_EVENTS, {"events": [], "fence": 0}),
        (tp.G2_EVENTS, {"num_events": 1, "num_stores": 0}),  # no events frame
        (tp.G2_EVENTS, {"num_events": 0, "num_stores": 0, "fence": 0}),
        (tp.G2_EVENTS, {"num_events": -1, "num_stores": 0}),
        (tp.G2_EVENTS, {"num_stores": 0}),
        (tp.G2_EVENTS, {"num_events": 0, "num_stores": 0, "acks": {"batch": 1}}),
        (tp.G2_EVENTS, {"num_events": 0, "num_stores": 0, "acks": [[1, [0, 1], []]]}),
        (tp.G2_EVENTS, {"num_events": 1, "num_stores": 0, "acks": []}),  # no events frame
        (tp.OFFLOAD_ACK, {"batch": 1, "accepted": [0, 1], "rejected": [], "done": 1}),
        (tp.WELCOME, {"segment": "other", "epoch": 3}),
        (tp.SUBMIT, {}),
    ],
)
def test_malformed_messages_raise_and_change_nothing(
    harness: Harness, msg_type: str, body: dict[str, Any]
) -> None:
    client = harness.client
    client.enqueue_evictions(_chain(3, 2), [4, 5])
    harness.recv_offload()
    with pytest.raises(ProtocolError):
        harness.deliver(msg_type, body)
    assert client.tick(0.0) == []
    assert client.take_events() == []
    assert client.num_quarantined == 2
    assert client.stats().replica_size == 0


def test_receive_counts_and_drops_garbage(harness: Harness) -> None:
    harness.router.send_multipart([harness.identity, b"garbage"])
    harness.router.send_multipart([harness.identity, *tp.encode(tp.PONG)])
    deadline = time.monotonic() + 2.0
    received = 0
    while received < 2 and time.monotonic() < deadline:
        harness.client.socket.poll(50)
        received += harness.client.receive()
    assert received == 2
    assert harness.client.stats().bad_messages == 1


# -- events, replica and onboarding -------------------------------------------------------------


def test_events_build_the_replica_and_onboard_pins_reads_and_unpins(harness: Harness) -> None:
    client, clock = harness.client, harness.clock
    items = _chain(4, 4)
    harness.deliver_events(harness.store(items[:3]))
    events = client.take_events()
    assert [type(e) for e in events] == [G2Stored] * 3
    assert isinstance(events[1], G2Stored)
    assert events[1].meta.parent_hash == items[0].meta.seq_hash
    assert list(events[1].meta.token_ids or []) == list(items[1].meta.token_ids or [])
    assert client.contains(items[2].plh)
    assert not client.contains(items[3].plh)
    plan = client.prepare_onboard([i.plh for i in items])
    assert plan is not None
    assert plan.plhs == [i.plh for i in items[:3]]
    assert int(harness.segment.pins[1].sum()) == 3
    client.check_invariants()
    clock.set(10.0)
    handle = client.start_onboard(plan, 10.0)
    assert handle.deadline_ms == pytest.approx(13.0)  # 3 blocks x 1000 B at 1000 B/ms
    assert [m.seq_hash for m in handle.metas] == [i.meta.seq_hash for i in items[:3]]
    assert client.earliest_deadline_ms() == pytest.approx(13.0)
    client.tick(12.9)
    assert client.take_completed_onboards() == []
    assert int(harness.segment.pins[1].sum()) == 3
    client.tick(13.0)
    assert client.take_completed_onboards() == [handle]
    assert handle.completed
    assert int(harness.segment.pins[1].sum()) == 0
    assert client.earliest_deadline_ms() is None


def test_a_stale_replica_costs_a_miss_never_wrong_data(harness: Harness) -> None:
    client = harness.client
    items = _chain(5, 2)
    harness.deliver_events(harness.store(items))
    # The coordinator evicts both blocks, but the Removed events have not arrived yet.
    assert harness.directory.try_remove(items[1].meta.seq_hash)
    assert harness.directory.try_remove(items[0].meta.seq_hash)
    assert client.prepare_onboard([i.plh for i in items]) is None
    assert client.stats().onboard_misses == 1
    assert int(harness.segment.pins[1].sum()) == 0
    harness.deliver(tp.G2_EVENTS, {"events": [["R", items[1].meta.seq_hash]]})
    assert not client.contains(items[1].plh)
    assert isinstance(client.take_events()[-1], G2Removed)
    assert sorted(client.replica_seq_hashes()) == [items[0].meta.seq_hash]


def _stream(events: list[G2Event]) -> list[tuple[str, int]]:
    return [
        ("S", e.meta.seq_hash) if isinstance(e, G2Stored) else ("R", e.seq_hash) for e in events
    ]


def test_host_blocks_wait_for_their_parent_to_be_announced_on_this_rank(
    harness: Harness,
) -> None:
    """Another rank offloads the tail of a chain whose head is still in its own G1: this rank
    never announced the head, so the tail waits (no orphan store on this rank's stream)."""
    client = harness.client
    items = _chain(7, 4)
    seqs = [i.meta.seq_hash for i in items]
    harness.deliver_events(harness.store(items[2:], rank=0))
    assert client.take_events() == []
    assert client.contains(items[2].plh), "the replica knows the blocks: onboarding is unchanged"
    assert (client.stats().host_announced, client.stats().host_waiting) == (0, 2)
    # A removal of a block this rank never announced is not republished.
    assert harness.directory.try_remove(seqs[3])
    harness.deliver(tp.G2_EVENTS, {"events": [["R", seqs[3]]]})
    assert client.take_events() == []
    # The head lands: it, then the waiting block, parent first.
    harness.deliver_events(harness.store(items[:2], rank=0))
    assert _stream(client.take_events()) == [("S", seqs[0]), ("S", seqs[1]), ("S", seqs[2])]
    assert sorted(client.announced_seq_hashes()) == sorted(seqs[:3])
    assert (client.stats().host_announced, client.stats().host_waiting) == (3, 0)
    # The middle block leaves (its child was pinned): the child is withdrawn first.
    assert harness.directory.try_remove(seqs[2])
    assert harness.directory.try_remove(seqs[1])
    harness.deliver(tp.G2_EVENTS, {"events": [["R", seqs[1]]]})
    assert _stream(client.take_events()) == [("R", seqs[2]), ("R", seqs[1])]
    assert sorted(client.announced_seq_hashes()) == [seqs[0]]
    harness.deliver(tp.G2_EVENTS, {"events": [["R", seqs[2]]]})
    assert client.take_events() == [], "already withdrawn"
    assert client.replica_seq_hashes() == [seqs[0]]


def test_cancel_and_close_release_every_pin(harness: Harness) -> None:
    client = harness.client
    items = _chain(6, 3)
    harness.deliver_events(harness.store(items))
    plan = client.prepare_onboard([i.plh for i in items])
    assert plan is not None
    client.cancel_onboard(plan)
    assert int(harness.segment.pins[1].sum()) == 0
    with pytest.raises(ProtocolError):
        client.cancel_onboard(plan)
    assert client.prepare_onboard([i.plh for i in items]) is not None
    assert int(harness.segment.pins[1].sum()) == 3
    client.close()
    assert int(harness.segment.pins[1].sum()) == 0
    client.close()  # idempotent


def test_fence_and_event_seq_cell(harness: Harness) -> None:
    client = harness.client
    assert not client.wait_for_fence(0.05)
    harness.router.send_multipart(
        [harness.identity, *tp.encode(tp.G2_EVENTS, {"events": [], "fence": 1})]
    )
    assert client.wait_for_fence(2.0)
    assert not client.wait_for_fence(0.05), "each fence satisfies one wait"
    client.record_next_event_seq(1234)
    assert read_next_event_seq(harness.segment.name, 1) == 1234


# -- the coordinator in-process -----------------------------------------------------------------


def test_coordinator_spec_round_trips_infinite_speedup() -> None:
    spec = CoordinatorSpec(
        fleet_id="f",
        segment_name=segment_name("abc-1"),
        num_g2_blocks=8,
        block_size=4,
        num_ranks=2,
        endpoint="ipc:///tmp/x",
        supervisor_endpoint="ipc:///tmp/y",
        start_monotonic_s=12.5,
        speedup_ratio=math.inf,
    )
    again = CoordinatorSpec.from_json(spec.to_json())
    assert again == spec
    assert set(_SPEC_KINDS) == set(CoordinatorSpec.__dataclass_fields__)
    assert segment_fleet_id(spec.segment_name) == "abc-1"
    with pytest.raises(ConfigError):
        segment_fleet_id("shmkv_abcg1")
    with pytest.raises(ConfigError):
        CoordinatorSpec.from_json(spec.to_json().replace('"num_ranks":2', '"num_ranks":"2"'))
    with pytest.raises(ConfigError):
        CoordinatorSpec.from_json('{"nope": 1}')


def test_a_child_waiting_for_a_dead_ranks_parent_lands_and_nothing_leaks(
    fleet_id: str, zmq_context: Context
) -> None:
    """Rank 1's block waits for its parent, in flight from rank 0; rank 0 dies: the child lands,
    rank 0's pins and reservations are gone, and the directory's invariants hold."""
    ipc = Path("/tmp") / f"shmkv-{fleet_id}"
    ipc.mkdir()
    spec = CoordinatorSpec(
        fleet_id=fleet_id,
        segment_name=segment_name(fleet_id),
        num_g2_blocks=32,
        block_size=BLOCK_SIZE,
        num_ranks=2,
        endpoint=f"ipc://{ipc}/coord",
        supervisor_endpoint=f"ipc://{ipc}/sup",
        start_monotonic_s=time.monotonic(),
        speedup_ratio=1.0,
        block_size_bytes=1000,
        bandwidth_g1_to_g2_gbps=0.00002,  # 20 B/ms: 50 ms per block
    )
    socks: list[zmq.Socket[bytes]] = []
    try:
        with Coordinator(spec) as coord:
            for rank in (0, 1):
                sock = zmq_context.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IDENTITY, f"r{rank}".encode())
                sock.connect(coord.endpoint)
                socks.append(sock)
                hello = {"rank": rank, "pid": os.getpid(), "epoch": 0}
                sock.send_multipart(tp.encode(tp.HELLO, hello))
            _serve_until(coord, lambda: coord.stats.hellos == 2)
            parent_chain = _chain(7, 20)  # rank 0: 20 blocks in one chunk, 1 s
            child = _chain(7, 21)[20]  # rank 1: the 21st block alone, 50 ms
            _send_offload(socks[0], 1, parent_chain)
            _send_offload(socks[1], 1, [child])
            _serve_until(coord, lambda: coord.stats.accepted == 21)
            time.sleep(0.07)
            coord.advance()
            assert coord.stats.deferred == 1, "the child waits for its in-flight parent"
            assert coord.stats.offloaded == 0
            coord.on_rank_death(0)
            assert coord.stats.offloaded == 1, "the orphan landed"
            stats = coord.stats_dict(include_pins=True)
            assert stats["dead_rank_slots_aborted"] == 20
            assert stats["reserved"] == 0
            assert stats["in_flight"] == 0
            assert stats["ready"] == 1
            coord.directory.check_invariants()
            coord.flush()
            # Rank 1 hears about the store and gets its OFFLOAD_DONE.
            types = _drain_types(socks[1])
            assert tp.G2_EVENTS in types
            assert tp.OFFLOAD_DONE in types
    finally:
        for sock in socks:
            sock.close(linger=0)
        for child_path in ipc.iterdir():
            child_path.unlink()
        ipc.rmdir()


def _send_offload(sock: zmq.Socket[bytes], batch: int, items: list[OffloadItem]) -> None:
    wire = []
    tokens = array("I")
    for item in items:
        meta = item.meta
        parent = -1 if meta.parent_hash is None else meta.parent_hash
        position = plh_position(item.plh)
        wire.append([meta.seq_hash, parent, meta.local_hash, position])
        tokens.extend(array("I", meta.token_ids or []))
    body = {"batch": batch, "items": wire, "has_tokens": True}
    sock.send_multipart(tp.encode(tp.OFFLOAD, body, (tokens.tobytes(),)))


def _serve_until(coord: Coordinator, condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        coord.serve_router(64)
        time.sleep(0.002)


def _drain_types(sock: zmq.Socket[bytes]) -> list[str]:
    types: list[str] = []
    while sock.poll(200):
        types.append(tp.decode(sock.recv_multipart()).type)
    return types


def test_no_welcome_times_out_and_releases_everything(fleet_id: str, zmq_context: Context) -> None:
    with G2Segment.create(fleet_id, capacity=8, block_size=BLOCK_SIZE, num_ranks=1) as segment:
        with pytest.raises(WorkerTimeoutError):
            SharedG2Client(
                rank=0,
                epoch=0,
                segment_name=segment.name,
                coordinator_endpoint=f"inproc://nobody-{fleet_id}",
                config=EngineConfig(block_size=BLOCK_SIZE, num_g2_blocks=8),
                clock=ManualClock(),
                context=zmq_context,
                hello_timeout_s=0.1,
            )
        with pytest.raises(SharedMemoryError):
            SharedG2Client(
                rank=0,
                epoch=0,
                segment_name=segment.name,
                coordinator_endpoint=f"inproc://nobody-{fleet_id}",
                config=EngineConfig(block_size=8, num_g2_blocks=8),
                clock=ManualClock(),
                context=zmq_context,
            )
