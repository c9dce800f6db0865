"""The shared-G2 coordinator as a real process (spawned as the fleet spawns it), driven by
`SharedG2Client`s in this process and by a rank process that is SIGKILLed mid-run.

This process plays the supervisor: a ROUTER that receives the coordinator's READY, sends
DRAIN / STATE / STOP and reads STATE. Segment names come from the `fleet_id` fixture, so the
leak check of `tests/conftest.py` fails a test that leaves a segment or a process behind.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import zmq

from shmkv import transport as tp
from shmkv.clock import MonotonicClock
from shmkv.config import EngineConfig
from shmkv.coordinator import BAD_MESSAGE_LIMIT, CoordinatorSpec
from shmkv.g2_client import SharedG2Client
from shmkv.offload import G2Event, G2Removed, G2Stored
from shmkv.shm import FREE, NO_OWNER, READY, RESERVED, SHM_DIR, G2Segment, segment_name
from tests.multiproc._g2_client_worker import chain_items

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "workers" / "coordinator_worker.py"
BLOCK_SIZE = 4
READY_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 10.0
INF = math.inf

Context = zmq.Context[zmq.Socket[bytes]]


def _tokens(rng: random.Random, num_blocks: int) -> list[int]:
    return [rng.randrange(1, 50_000) for _ in range(num_blocks * BLOCK_SIZE)]


@dataclass
class CoordinatorProcess:
    """A coordinator child process plus the supervisor ROUTER this test talks to it with."""

    spec: CoordinatorSpec
    popen: subprocess.Popen[bytes]
    sup: zmq.Socket[bytes]
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def segment(self) -> str:
        return self.spec.segment_name

    @property
    def endpoint(self) -> str:
        return self.spec.endpoint

    def recv(self, want: str, timeout_s: float = REPLY_TIMEOUT_S) -> tp.Message:
        """The next message of type `want` (RESULTS on the way are kept in `results`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sup.poll(max(1, int(left * 1000))):
                raise TimeoutError(f"no {want} from the coordinator within {timeout_s} s")
            identity, *frames = self.sup.recv_multipart()
            assert identity == b"coordinator"
            msg = tp.decode(frames)
            if msg.type == tp.RESULTS:
                self.results.append(msg.body)
            if msg.type == want:
                return msg

    def send(self, msg_type: str) -> None:
        self.sup.send_multipart([b"coordinator", *tp.encode(msg_type)])

    def state(self) -> dict[str, Any]:
        self.send(tp.STATE)
        return self.recv(tp.STATE).body

    def drain(self) -> dict[str, Any]:
        self.send(tp.DRAIN)
        return self.recv(tp.STATE).body

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.send(tp.STOP)
            try:
                return self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(10)


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shmkv-t", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink(missing_ok=True)
    path.rmdir()


@pytest.fixture
def start_coordinator(
    zmq_context: Context, fleet_id: str, ipc_dir: Path
) -> Iterator[Callable[..., CoordinatorProcess]]:
    started: list[CoordinatorProcess] = []

    def start(**overrides: Any) -> CoordinatorProcess:
        sup = zmq_context.socket(zmq.ROUTER)
        sup.setsockopt(zmq.LINGER, 0)
        sup_endpoint = tp.bind_socket(sup, f"ipc://{ipc_dir}/sup{len(started)}")
        fields: dict[str, Any] = {
            "fleet_id": fleet_id,
            "segment_name": segment_name(f"{fleet_id}-{len(started)}"),
            "num_g2_blocks": 64,
            "block_size": BLOCK_SIZE,
            "num_ranks": 2,
            "endpoint": f"ipc://{ipc_dir}/coord{len(started)}",
            "supervisor_endpoint": sup_endpoint,
            "start_monotonic_s": time.monotonic(),
            "speedup_ratio": INF,
            "stats_interval_s": 0.25,
        }
        fields.update(overrides)
        spec = CoordinatorSpec(**fields)
        popen = subprocess.Popen([sys.executable, str(WORKER), spec.to_json()], cwd=ROOT)
        proc = CoordinatorProcess(spec, popen, sup)
        started.append(proc)
        ready = proc.recv(tp.READY, READY_TIMEOUT_S).body
        assert ready["role"] == "coordinator"
        assert ready["segment"] == spec.segment_name
        assert ready["pid"] == popen.pid
        return proc

    yield start
    for proc in started:
        proc.stop()
        proc.sup.close(linger=0)
        assert not (SHM_DIR / proc.segment).exists(), "the coordinator left its segment behind"


@dataclass
class Rank:
    """An in-process rank: a client plus what it got back."""

    client: SharedG2Client
    clock: MonotonicClock
    released: list[int] = field(default_factory=list)
    events: list[G2Event] = field(default_factory=list)

    def tick(self) -> None:
        self.released.extend(self.client.tick(self.clock.now_ms()))
        self.events.extend(self.client.take_events())

    def stored(self) -> list[int]:
        return [e.meta.seq_hash for e in self.events if isinstance(e, G2Stored)]

    def removed(self) -> list[int]:
        return [e.seq_hash for e in self.events if isinstance(e, G2Removed)]


@pytest.fixture
def connect(zmq_context: Context) -> Iterator[Callable[..., Rank]]:
    ranks: list[Rank] = []

    def make(coord: CoordinatorProcess, rank: int, epoch: int = 0) -> Rank:
        spec = coord.spec
        config = EngineConfig(
            block_size=spec.block_size,
            num_g2_blocks=spec.num_g2_blocks,
            kv_bytes_per_token=spec.block_size_bytes // spec.block_size,
            bandwidth_g2_to_g1_gbps=spec.bandwidth_g2_to_g1_gbps,
            speedup_ratio=spec.speedup_ratio,
        )
        clock = MonotonicClock(spec.start_monotonic_s, spec.speedup_ratio)
        client = SharedG2Client(
            rank=rank,
            epoch=epoch,
            segment_name=spec.segment_name,
            coordinator_endpoint=spec.endpoint,
            config=config,
            clock=clock,
            context=zmq_context,
            hello_timeout_s=REPLY_TIMEOUT_S,
        )
        handle = Rank(client, clock)
        ranks.append(handle)
        return handle

    yield make
    for handle in ranks:
        handle.client.close()


def pump(ranks: list[Rank], until: Callable[[], bool], timeout_s: float = REPLY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for rank in ranks:
            rank.tick()
        if until():
            return
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached while pumping the clients")
        poller = zmq.Poller()
        for rank in ranks:
            poller.register(rank.client.socket, zmq.POLLIN)
        poller.poll(5)


def wait_stats(
    coord: CoordinatorProcess, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 5.0
) -> dict[str, Any]:
    """Ask for STATE until its stats satisfy `predicate` (messages on other connections race)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats: dict[str, Any] = coord.state()["stats"]
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"coordinator stats never matched: {stats}")
        time.sleep(0.01)


def assert_parent_first(events: list[G2Event]) -> None:
    """Every stored block whose parent is also stored comes after that parent."""
    stored: set[int] = set()
    all_stored = {e.meta.seq_hash for e in events if isinstance(e, G2Stored)}
    for event in events:
        if isinstance(event, G2Stored):
            parent = event.meta.parent_hash
            if parent is not None and parent in all_stored:
                assert parent in stored, "a host-tier Stored came before its parent's"
            stored.add(event.meta.seq_hash)


# ---------------------------------------------------------------------------------------------


def test_two_ranks_offload_one_prefix_and_g2_stores_it_once(
    start_coordinator: Callable[..., CoordinatorProcess], connect: Callable[..., Rank]
) -> None:
    coord = start_coordinator()
    r0, r1 = connect(coord, 0), connect(coord, 1)
    items = chain_items(_tokens(random.Random(1), 12), BLOCK_SIZE)
    seqs = [item.meta.seq_hash for item in items]
    leaf_first = list(reversed(items))  # G1 evicts leaves first
    assert r0.client.enqueue_evictions(leaf_first, list(range(12))) == []
    assert r1.client.enqueue_evictions(leaf_first, [*range(100, 112), 999]) == [999]
    pump([r0, r1], lambda: len(r0.released) == 12 and len(r1.released) == 12)
    pump([r0, r1], lambda: len(r0.stored()) == 12 and len(r1.stored()) == 12)
    assert sorted(r0.released) == list(range(12))
    assert sorted(r1.released) == list(range(100, 112))
    for rank in (r0, r1):
        assert sorted(rank.stored()) == sorted(seqs), "one host Stored per block"
        assert_parent_first(rank.events)
        assert rank.client.num_quarantined == 0
        assert rank.client.earliest_deadline_ms() is None
    assert r0.stored() == r1.stored(), "both ranks see one order"
    tokens_by_seq = {e.meta.seq_hash: list(e.meta.token_ids or []) for e in r1.events}  # type: ignore[union-attr]
    assert all(tokens_by_seq[i.meta.seq_hash] == list(i.meta.token_ids or []) for i in items)
    state = coord.drain()
    assert state["host_pinned"] == sorted(seqs)
    stats = state["stats"]
    assert stats["offloaded"] == 12
    assert stats["deduped"] == 12
    assert stats["ready"] == 12
    assert stats["reserved"] == 0
    assert stats["bad_messages"] == 0
    assert r0.client.wait_for_fence(REPLY_TIMEOUT_S)
    assert r1.client.wait_for_fence(REPLY_TIMEOUT_S)
    results = coord.results or [coord.recv(tp.RESULTS, timeout_s=5.0).body]
    assert results[-1]["capacity"] == 64, "periodic RESULTS reach the supervisor"


def test_a_rank_onboards_what_another_rank_offloaded(
    start_coordinator: Callable[..., CoordinatorProcess], connect: Callable[..., Rank]
) -> None:
    coord = start_coordinator()
    r0, r1 = connect(coord, 0), connect(coord, 1)
    items = chain_items(_tokens(random.Random(2), 6), BLOCK_SIZE)
    r0.client.enqueue_evictions(items[:5], list(range(5)))
    pump([r0, r1], lambda: len(r1.stored()) == 5)
    assert r1.client.contains(items[0].plh)
    assert not r1.client.contains(items[5].plh)
    plan = r1.client.prepare_onboard([item.plh for item in items])
    assert plan is not None
    assert plan.plhs == [item.plh for item in items[:5]]
    with G2Segment.attach(coord.segment) as seg:
        assert int(seg.pins[1].sum()) == 5
        handle = r1.client.start_onboard(plan, r1.clock.now_ms())
        assert [m.seq_hash for m in handle.metas] == [i.meta.seq_hash for i in items[:5]]
        assert [list(m.token_ids or []) for m in handle.metas] == [
            list(i.meta.token_ids or []) for i in items[:5]
        ]
        done: list[Any] = []

        def completed() -> bool:
            done.extend(r1.client.take_completed_onboards())
            return bool(done)

        pump([r1], completed)
        assert done == [handle]
        assert handle.completed
        assert int(seg.pins.sum()) == 0, "completion unpins"
    assert r1.client.prepare_onboard([items[5].plh]) is None


def test_a_pinned_slot_survives_eviction_pressure(
    start_coordinator: Callable[..., CoordinatorProcess], connect: Callable[..., Rank]
) -> None:
    coord = start_coordinator(num_g2_blocks=8)
    r0, r1 = connect(coord, 0), connect(coord, 1)
    rng = random.Random(3)
    first = chain_items(_tokens(rng, 8), BLOCK_SIZE)
    r0.client.enqueue_evictions(first, list(range(8)))
    pump([r0, r1], lambda: len(r1.stored()) == 8 and len(r0.released) == 8)
    plan = r1.client.prepare_onboard([item.plh for item in first[:3]])
    assert plan is not None
    assert plan.num_blocks == 3
    pinned = {item.meta.seq_hash for item in first[:3]}
    # One batch of 8 finds only 5 unpinned victims: 3 blocks are dropped.
    r0.client.enqueue_evictions(chain_items(_tokens(rng, 8), BLOCK_SIZE), list(range(100, 108)))
    for n in range(2):
        chain = chain_items(_tokens(rng, 4), BLOCK_SIZE)
        r0.client.enqueue_evictions(chain, list(range(110 + 4 * n, 114 + 4 * n)))
    pump([r0], lambda: len(r0.released) == 8 + 16)
    state = coord.state()
    stats = state["stats"]
    assert pinned <= set(state["host_pinned"]), "pinned blocks were evicted"
    assert pinned.isdisjoint(r1.removed())
    assert stats["dropped"] == 3, "a full G2 with everything else pinned drops, never stalls"
    assert stats["evict_backoffs"] > 0
    assert stats["pinned"] == 3
    assert stats["ready"] <= 8
    r1.client.cancel_onboard(plan)
    r0.client.enqueue_evictions(chain_items(_tokens(rng, 8), BLOCK_SIZE), list(range(200, 208)))
    pump([r0, r1], lambda: len(r0.released) == 32)
    pump([r0, r1], lambda: not pinned & set(coord.state()["host_pinned"]), timeout_s=5)
    assert coord.state()["stats"]["pinned"] == 0


def test_host_events_are_parent_first_on_a_timed_link(
    start_coordinator: Callable[..., CoordinatorProcess], connect: Callable[..., Rank]
) -> None:
    # 40 kB per block at 1 MB/s: each block takes 40 ms of simulated (= wall) time.
    coord = start_coordinator(
        speedup_ratio=1.0,
        block_size_bytes=40_000,
        bandwidth_g1_to_g2_gbps=0.001,
        offload_batch_size=3,
    )
    r0, r1 = connect(coord, 0), connect(coord, 1)
    items = chain_items(_tokens(random.Random(4), 6), BLOCK_SIZE)
    sent_ms = r0.clock.now_ms()
    r0.client.enqueue_evictions(list(reversed(items)), list(range(6)))
    assert r0.client.earliest_deadline_ms() is not None, "an un-ACKed batch is due at once"
    pump([r0], lambda: r0.client.stats().accepted == 6)
    deadline = r0.client.earliest_deadline_ms()
    assert deadline is not None
    # Two chunks of 3 blocks (120 ms each alone) share the link: both land after 240 ms.
    assert deadline - sent_ms == pytest.approx(240.0, abs=60.0)
    pump([r0, r1], lambda: len(r0.released) == 6 and len(r1.stored()) == 6)
    assert r0.clock.now_ms() >= deadline - 1.0, "copies land no earlier than the model says"
    for rank in (r0, r1):
        assert rank.stored() == [item.meta.seq_hash for item in items]
        assert_parent_first(rank.events)
    assert coord.drain()["stats"]["deferred"] > 0


def test_sigkill_of_a_rank_leaks_no_pin_reservation_or_slot(
    start_coordinator: Callable[..., CoordinatorProcess], connect: Callable[..., Rank]
) -> None:
    # 400 B per block at 10 kB/s: 40 ms per block, so the killed rank's 32 blocks are in flight.
    coord = start_coordinator(
        num_g2_blocks=64,
        speedup_ratio=1.0,
        block_size_bytes=400,
        bandwidth_g1_to_g2_gbps=0.00001,
    )
    r0 = connect(coord, 0)
    rng = random.Random(5)
    pin_tokens = _tokens(rng, 4)
    r0.client.enqueue_evictions(chain_items(pin_tokens, BLOCK_SIZE), list(range(4)))
    pump([r0], lambda: len(r0.released) == 4)
    args = {
        "segment": coord.segment,
        "endpoint": coord.endpoint,
        "rank": 1,
        "epoch": 0,
        "start_monotonic_s": coord.spec.start_monotonic_s,
        "speedup_ratio": 1.0,
        "block_size": BLOCK_SIZE,
        "num_g2_blocks": 64,
        "pin_tokens": pin_tokens,
        "offload_tokens": _tokens(rng, 32),
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.multiproc._g2_client_worker", orjson.dumps(args).decode()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().decode()
        assert line.startswith("READY "), line
        report = orjson.loads(line.split(" ", 1)[1])
        assert report == {"pinned": 4, "accepted": 32}
        with G2Segment.attach(coord.segment) as seg:
            assert int(seg.pins[1].sum()) == 4
            assert int(np.count_nonzero((seg.state == RESERVED) & (seg.owner == 1))) == 32
            killed_at = time.monotonic()
            os.kill(child.pid, signal.SIGKILL)
            while int(seg.pins[1].sum()) or np.any((seg.state == RESERVED) & (seg.owner == 1)):
                assert time.monotonic() - killed_at < 2.0, "the dead rank was not cleaned up"
                time.sleep(0.001)
            detect_s = time.monotonic() - killed_at
            print(f"dead rank cleaned up {detect_s * 1000:.1f} ms after SIGKILL")
            assert detect_s < 0.5
        child.wait(10)
        # The fleet goes on: rank 0 still offloads, and a restarted rank 1 gets the snapshot.
        more = chain_items(_tokens(rng, 3), BLOCK_SIZE)
        r0.client.enqueue_evictions(more, [10, 11, 12])
        pump([r0], lambda: len(r0.released) == 7)
        r1 = connect(coord, 1, epoch=1)
        pump([r1], lambda: len(r1.stored()) == 7)
        assert_parent_first(r1.events)
        state = coord.drain()
        stats = state["stats"]
        assert stats["dead_rank_cleanups"] == 1
        assert stats["dead_rank_pins_released"] == 4
        assert stats["dead_rank_slots_aborted"] == 32
        assert stats["dead_rank_transfers_dropped"] == 32
        assert stats["reserved"] == 0
        assert stats["in_flight"] == 0
        assert stats["pins_total"] == 0
        assert stats["ready"] == 7 == len(state["host_pinned"])
        assert stats["used"] == stats["ready"], "no slot leaked"
        with G2Segment.attach(coord.segment) as seg:
            state_arr = seg.state.copy()
            assert set(np.unique(state_arr).tolist()) <= {FREE, READY}
            free = state_arr == FREE
            assert not seg.pins[:, free].any()
            assert np.all(seg.owner[free] == NO_OWNER)
            assert int(np.count_nonzero(state_arr == READY)) == 7
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


def test_malformed_messages_are_counted_and_the_coordinator_keeps_serving(
    start_coordinator: Callable[..., CoordinatorProcess],
    connect: Callable[..., Rank],
    zmq_context: Context,
) -> None:
    coord = start_coordinator()
    r0 = connect(coord, 0)
    raw = zmq_context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.IDENTITY, b"rank1-e0")
    raw.connect(coord.endpoint)
    try:
        garbage: list[list[bytes]] = [
            [b"not json"],
            [b"[1, 2]"],
            [orjson.dumps({"v": 99, "t": tp.HELLO})],
            [orjson.dumps({"v": tp.PROTOCOL_VERSION, "t": "nonsense"})],
            tp.encode(tp.HELLO, {"rank": 7, "pid": os.getpid(), "epoch": 0}),
            tp.encode(tp.HELLO, {"rank": "one", "pid": os.getpid(), "epoch": 0}),
            tp.encode(tp.WELCOME, {"segment": "x"}),
        ]
        for frames in garbage:
            raw.send_multipart(frames)
        # Unregistered: an OFFLOAD is dropped as stale, not served.
        raw.send_multipart(tp.encode(tp.OFFLOAD, {"batch": 1, "items": []}))
        raw.send_multipart(tp.encode(tp.HELLO, {"rank": 1, "pid": os.getpid(), "epoch": 0}))
        assert raw.poll(int(REPLY_TIMEOUT_S * 1000))
        assert tp.decode(raw.recv_multipart()).type == tp.WELCOME
        bad_items = {"batch": 5, "items": [[1, -1, 2, 0]], "has_tokens": True}
        raw.send_multipart(tp.encode(tp.OFFLOAD, bad_items, (b"\x00" * 3,)))
        assert raw.poll(int(REPLY_TIMEOUT_S * 1000))
        ack = tp.decode(raw.recv_multipart())
        assert ack.type == tp.OFFLOAD_ACK
        assert ack.body["rejected"] == [0]
        assert ack.body["accepted"] == []
        assert "error" in ack.body
        stats = coord.state()["stats"]
        assert stats["bad_messages"] == len(garbage) - 1 + 1  # the WELCOME is merely stale
        assert stats["stale_messages"] == 2  # the WELCOME and the unregistered OFFLOAD
        # Still serving the honest rank.
        items = chain_items(_tokens(random.Random(6), 3), BLOCK_SIZE)
        r0.client.enqueue_evictions(items, [0, 1, 2])
        pump([r0], lambda: len(r0.released) == 3 and len(r0.stored()) == 3)
        # A peer that keeps sending garbage is ignored from then on.
        for _ in range(BAD_MESSAGE_LIMIT):
            raw.send_multipart([b"\xff garbage"])
        raw.send_multipart(tp.encode(tp.PING))
        wait_stats(coord, lambda st: st["ignored_messages"] >= 1)
        answers = []
        while raw.poll(100):
            answers.append(tp.decode(raw.recv_multipart()).type)
        assert tp.PONG not in answers, "an ignored peer gets no answer"
    finally:
        raw.close(linger=0)


def test_stale_epoch_hello_is_dropped_and_sigterm_cleans_up(
    start_coordinator: Callable[..., CoordinatorProcess],
    connect: Callable[..., Rank],
    zmq_context: Context,
) -> None:
    coord = start_coordinator()
    connect(coord, 1, epoch=2)
    stale = zmq_context.socket(zmq.DEALER)
    stale.setsockopt(zmq.LINGER, 0)
    stale.connect(coord.endpoint)
    try:
        stale.send_multipart(tp.encode(tp.HELLO, {"rank": 1, "pid": os.getpid(), "epoch": 1}))
        wait_stats(coord, lambda st: st["stale_messages"] == 1)
        assert not stale.poll(100), "a stale epoch gets no WELCOME"
    finally:
        stale.close(linger=0)
    coord.popen.send_signal(signal.SIGTERM)
    assert coord.popen.wait(10) == 0
    assert not (SHM_DIR / coord.segment).exists()
