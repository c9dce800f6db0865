"""Layer 3: `shmkv fleet`, the supervisor of a live multi-process fleet.

    supervisor (this process): names the fleet, binds a ROUTER for control, spawns
      ├── coordinator  (when G2 is on: creates and owns the shared G2 segment; talks to
      │                 the ROUTER)
      └── rank 0..N-1  (RankEngine processes: private G1, shared G2 client, KV publisher;
                        each talks to the supervisor over its own direct channel, a socket
                        pair made per process: `shmkv.channel`, no ZMQ I/O thread)
    then drives the workload on the shared monotonic clock, feeds the report from the ranks'
    RESULTS, restarts a rank that dies, and at the end drains, collects state and stops
    everything: no process, socket or segment outlives it.

Crash policy: a dead rank is restarted with the next epoch (it reopens its event stream with
AllBlocksCleared and a seq that never rewinds); its in-flight requests are counted as failed.
A dead coordinator restarts the whole fleet on a new segment, or with `no_restart` stops with
exit code 3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq

from shmkv import transport as tp
from shmkv.channel import Channel, child_endpoint
from shmkv.clock import MonotonicClock
from shmkv.config import EngineConfig
from shmkv.driver import SessionDriver, WorkloadDriver
from shmkv.engine import EventSpec, RankSpec, read_seq_file
from shmkv.errors import BrokenWorkerError, ConfigError, ProtocolError, WorkerTimeoutError
from shmkv.events import StorageTier
from shmkv.hashing import sequence_hashes
from shmkv.replay import HOST_TIER_CREDIT
from shmkv.report import MetricsCollector
from shmkv.shm import segment_name
from shmkv.stats import record_pass
from shmkv.workload import RequestSpec, Session

logger = logging.getLogger(__name__)

WORKERS_DIR = Path(__file__).resolve().parent.parent / "workers"
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LOOP_POLL_MS = 20
"""The supervisor's loop blocks in poll at most this long (a message wakes it at once)."""
PROCESS_CHECK_S = 0.02
"""How often the supervisor's loop looks for dead processes (waitpid per process)."""
_ZMQ_POLLIN: Final = int(zmq.POLLIN)
_ZMQ_POLLOUT: Final = int(zmq.POLLOUT)
_ZMQ_POLLERR: Final = int(zmq.POLLERR)
STOP_FLUSH_S: Final = 1.0
"""At shutdown, how long the supervisor waits for a STOP to leave a rank's channel."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetOptions:
    engine: EngineConfig
    data_parallel_size: int = 2
    router_mode: str = "round_robin"
    replay_concurrency: int | None = 32
    events: EventSpec | None = None
    wait_for_subscribers_s: float | None = None
    no_restart: bool = False
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    max_sim_time_ms: float | None = None
    max_wall_s: float | None = None
    """Give up after this much wall time: requests still in flight count as failed and the
    drain is skipped (the run is reported as stalled). None: wait as long as it takes."""
    rank_extra: dict[str, Any] = field(default_factory=dict)
    """Extra options for every rank process (stress mode: invariant checks, bug injection)."""
    coordinator_extra: dict[str, Any] = field(default_factory=dict)
    fleet_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ConfigError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.router_mode not in ("round_robin", "kv"):
            raise ConfigError(f"router_mode must be round_robin or kv, got {self.router_mode!r}")


@dataclass(slots=True)
class _Proc:
    role: str
    rank: int
    popen: subprocess.Popen[bytes]
    epoch: int = 0
    ready: bool = False
    pid: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    channel: Channel | None = None
    """A rank's channel (the supervisor's end; owned by the fleet); None: the coordinator,
    which talks to the ROUTER."""


@dataclass(slots=True)
class RankStatus:
    running: int = 0
    waiting: int = 0
    active_blocks: int = 0
    num_gpu_blocks: int = 0
    preemptions_total: int = 0
    next_event_seq: int = 0
    restarts: int = 0
    violations: int = 0
    """Invariant violations this rank's processes reported (summed over its restarts)."""
    violations_base: int = 0
    g2_onboard_blocks: int = 0
    """Blocks this rank swapped in from G2 (summed over its restarts)."""
    g2_onboard_base: int = 0
    idle_s: float = 0.0
    """From the rank's last STATE: the time it held no request and waited for the supervisor,
    between its first SUBMIT and DRAIN (its latest process only)."""
    outstanding: dict[int, RequestSpec] = field(default_factory=dict)


@dataclass(slots=True)
class FleetOutcome:
    collector: MetricsCollector
    wall_time_ms: float
    final_time_ms: float
    rank_status: list[RankStatus]
    state: dict[str, Any] | None
    num_failed: int = 0
    num_rejected: int = 0
    num_rank_restarts: int = 0
    num_fleet_restarts: int = 0
    g2_stats: dict[str, Any] = field(default_factory=dict)
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    violation_examples: list[str] = field(default_factory=list)
    stalled: bool = False
    """The run hit `max_wall_s` with requests still in flight (no drain, no state)."""
    drain_wall_ms: float = 0.0
    """Of `wall_time_ms`, the end of the run: DRAIN, the coordinator's fence, STATE."""
    num_messages_received: int = 0
    """Control messages the supervisor handled during the run (RESULTS, DRAIN, STATE, ...)."""
    num_messages_sent: int = 0
    """Control messages the supervisor sent during the run (SUBMIT, DRAIN, STATE, ...)."""


class CoordinatorDiedError(BrokenWorkerError):
    """The coordinator process exited; the shared G2 pool is gone."""


def _worker_command(script: str, module: str, spec_json: str) -> list[str]:
    path = WORKERS_DIR / script
    if path.is_file():
        return [sys.executable, str(path), spec_json]
    return [sys.executable, "-m", module, spec_json]


class Fleet:
    """One live fleet. `with Fleet(options) as fleet: outcome = fleet.run(sessions)`."""

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        self.engine = options.engine
        self._tmpdir = Path(tempfile.mkdtemp(prefix="shmkv-"))
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._endpoint = tp.bind_socket(self._router, f"ipc://{self._tmpdir}/sup")
        self._coord_endpoint = f"ipc://{self._tmpdir}/coord"
        self._start_monotonic_s = time.monotonic()
        self.clock = MonotonicClock(self._start_monotonic_s, self.engine.speedup_ratio)
        self._procs: dict[bytes, _Proc] = {}
        self.status = [RankStatus() for _ in range(options.data_parallel_size)]
        self._segment_name: str | None = None
        self._generation = 0
        self._closed = False
        self._stopping = False
        self._metrics: Any = None
        self.g2_stats: dict[str, Any] = {}
        self.num_rank_restarts = 0
        self.num_fleet_restarts = 0
        self._num_failed = 0
        self._started = False
        self.stalled = False
        self._router_index: Any = None
        self._channel_procs: dict[int, _Proc] = {}
        """The processes with an open channel, by its descriptor (what poll returns)."""
        self._channels_version = 0
        """Bumped whenever `_channel_procs` changes (the poll items are made again)."""
        self._poll_items_cache: (
            tuple[zmq.Socket[bytes] | None, int, list[tuple[Any, int]]] | None
        ) = None
        self.num_messages_received = 0
        """Control messages handled since the fleet started (every process, every kind)."""
        self.num_messages_sent = 0
        """Control messages sent since the fleet started (every process, every kind)."""

    # ── lifecycle ─────────────────────────────────────────────────────────────────────────

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def uses_g2(self) -> bool:
        return self.engine.has_g2

    def start(self) -> None:
        """Spawn the coordinator (if G2) and every rank; wait until all said READY."""
        if self._started:
            return
        self._started = True
        if self.uses_g2:
            self._spawn_coordinator()
            self._wait_ready(lambda p: p.role == "coordinator")
        for rank in range(self.options.data_parallel_size):
            self._spawn_rank(rank, epoch=0)
        self._wait_ready(lambda p: p.role == "rank")
        self._start_router_index()
        if self.options.metrics_port is not None:
            self._start_metrics()

    def _spawn_coordinator(self) -> None:
        from shmkv.coordinator import CoordinatorSpec

        self._generation += 1
        # a new segment per generation: a restarted fleet never reuses a dead coordinator's
        self._segment_name = segment_name(f"{self.options.fleet_id}-g{self._generation}")
        engine = self.engine
        spec = CoordinatorSpec(
            fleet_id=self.options.fleet_id,
            segment_name=self._segment_name,
            num_g2_blocks=engine.num_g2_blocks,
            block_size=engine.block_size,
            num_ranks=self.options.data_parallel_size,
            endpoint=self._coord_endpoint,
            supervisor_endpoint=self._endpoint,
            start_monotonic_s=self._start_monotonic_s,
            speedup_ratio=engine.speedup_ratio,
            block_size_bytes=engine.block_size_bytes,
            bandwidth_g1_to_g2_gbps=engine.bandwidth_g1_to_g2_gbps,
            bandwidth_g2_to_g1_gbps=engine.bandwidth_g2_to_g1_gbps,
            offload_batch_size=engine.offload_batch_size,
            inject_bug=self.options.coordinator_extra.get("inject_bug"),
        )
        cmd = _worker_command("coordinator_worker.py", "shmkv.coordinator", spec.to_json())
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self._procs[b"coordinator"] = _Proc("coordinator", -1, popen, pid=popen.pid)

    def _spawn_rank(self, rank: int, epoch: int) -> None:
        engine_fields = {name: getattr(self.engine, name) for name in EngineConfig.field_names()}
        if not self.uses_g2:
            engine_fields["num_g2_blocks"] = 0
        channel, child_sock = Channel.pair()
        try:
            popen = self._popen_rank(rank, epoch, engine_fields, child_sock.fileno())
        except BaseException:
            channel.close()
            raise
        finally:
            child_sock.close()  # the child holds its own copy now
        identity = f"rank{rank}".encode()
        self._procs[identity] = _Proc(
            "rank", rank, popen, epoch=epoch, pid=popen.pid, channel=channel
        )
        self._channel_procs[channel.fileno()] = self._procs[identity]
        self._channels_version += 1

    def _popen_rank(
        self, rank: int, epoch: int, engine_fields: dict[str, Any], channel_fd: int
    ) -> subprocess.Popen[bytes]:
        spec = RankSpec(
            rank=rank,
            fleet_id=self.options.fleet_id,
            engine=engine_fields,
            supervisor_endpoint=child_endpoint(channel_fd),
            start_monotonic_s=self._start_monotonic_s,
            epoch=epoch,
            coordinator_endpoint=self._coord_endpoint if self.uses_g2 else None,
            segment_name=self._segment_name,
            events=self.options.events,
            start_event_seq=self.status[rank].next_event_seq,
            extra={
                **self.options.rank_extra,
                "wait_for_subscribers_s": self.options.wait_for_subscribers_s,
                "seq_file": str(self._tmpdir / f"rank{rank}.seq"),
            },
        )
        cmd = _worker_command("rank_worker.py", "shmkv.engine", spec.to_json())
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=(channel_fd,))

    def _forget(self, identity: bytes) -> None:
        """Drop a process from the fleet's books (it is dead or stopped): close its channel."""
        proc = self._procs.pop(identity)
        self._close_channel(proc)

    def _close_channel(self, proc: _Proc) -> None:
        channel = proc.channel
        if channel is None or channel.closed:
            return
        self._channel_procs.pop(channel.fileno(), None)
        self._channels_version += 1
        channel.close()

    def _wait_ready(self, which: Callable[[_Proc], bool]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(p.ready for p in self._procs.values() if which(p)):
            # Only the coordinator and the processes waited for matter here; any other rank
            # that died is restarted by the main loop's next check.
            for proc in list(self._procs.values()):
                code = proc.popen.poll()
                if code is None:
                    continue
                if proc.role == "coordinator":
                    raise CoordinatorDiedError(
                        f"the coordinator (pid {proc.pid}) exited with code {code}"
                    )
                if which(proc):
                    raise BrokenWorkerError(
                        f"{proc.role} {proc.rank} (pid {proc.pid}) exited with code {code} "
                        "while starting"
                    )
            if time.monotonic() > deadline:
                missing = [
                    p.role + str(p.rank) for p in self._procs.values() if which(p) and not p.ready
                ]
                raise WorkerTimeoutError(
                    f"not ready after {READY_TIMEOUT_S:.0f} s: {', '.join(missing)}"
                )
            self._poll_messages(100)

    # ── messages ──────────────────────────────────────────────────────────────────────────

    def _poll_messages(self, timeout_ms: int) -> int:
        """Block up to `timeout_ms` for messages (the ranks' channels, the router, and the
        serve driver's socket), then handle every message already there; returns how many."""
        handled = 0
        router = self._router
        extra = getattr(getattr(self, "_driver", None), "socket", None)
        # zmq.zmq_poll directly (it takes raw descriptors too): a Poller's Python layer costs
        # more than the poll itself. (The extra socket is read by the caller's loop; it only
        # has to wake this wait.)
        items = self._poll_items(extra)
        ready = zmq.zmq_poll(items, timeout_ms)
        if not ready:
            return 0
        router_ready = False
        channel_procs = self._channel_procs
        for item, events in ready:
            if item is router:
                router_ready = True
            elif type(item) is int:
                proc = channel_procs.get(item)
                if proc is not None:
                    handled += self._serve_channel(proc, events)
        if not router_ready:
            return handled
        router_only = items[:1]
        while zmq.zmq_poll(router_only, 0):
            try:
                frames = tp.recv_message(router)
            except zmq.Again:
                return handled
            identity, payload = frames[0], frames[1:]
            try:
                self._handle(identity, tp.decode(payload))
            except ProtocolError as exc:
                logger.warning("supervisor: dropped a malformed message from %r: %s", identity, exc)
            handled += 1
            self.num_messages_received += 1
        return handled

    def _serve_channel(self, proc: _Proc, events: int) -> int:
        """A rank's channel is ready: send what waits, handle every message there; returns
        how many. A peer that closed its end (it died) loses its channel: the process check
        restarts it."""
        channel = proc.channel
        assert channel is not None
        try:
            if events & _ZMQ_POLLOUT:
                channel.flush()
            if not events & (_ZMQ_POLLIN | _ZMQ_POLLERR):
                return 0
            messages = channel.receive()
        except BrokenWorkerError:
            self._close_channel(proc)
            return 0
        except ProtocolError as exc:  # the stream cannot be trusted after it
            logger.warning("supervisor: rank %d's channel is broken: %s", proc.rank, exc)
            self._close_channel(proc)
            return 0
        for frames in messages:
            try:
                self._on_message(proc, tp.decode(frames))
            except ProtocolError as exc:
                logger.warning(
                    "supervisor: dropped a malformed message from rank %d: %s", proc.rank, exc
                )
        self.num_messages_received += len(messages)
        return len(messages)

    def _handle(self, identity: bytes, msg: tp.Message) -> None:
        """A message on the ROUTER: only the coordinator talks there (a rank has its channel)."""
        proc = self._procs.get(identity)
        if proc is None or proc.channel is not None:
            return  # a process from an earlier generation, or a stranger
        self._on_message(proc, msg)

    def _on_message(self, proc: _Proc, msg: tp.Message) -> None:
        if msg.type == tp.READY:
            if msg.body.get("version") != tp.PROTOCOL_VERSION:
                name = proc.role + (str(proc.rank) if proc.role == "rank" else "")
                raise BrokenWorkerError(
                    f"{name} speaks protocol {msg.body.get('version')!r}, "
                    f"supervisor {tp.PROTOCOL_VERSION}: reinstall shmkv"
                )
            if msg.body.get("epoch", proc.epoch) != proc.epoch:
                return
            proc.ready = True
            proc.info = dict(msg.body)
            if proc.role == "rank":
                status = self.status[proc.rank]
                status.next_event_seq = max(
                    status.next_event_seq, int(msg.body.get("next_event_seq", 0))
                )
        elif msg.type == tp.RESULTS and proc.role == "rank":
            self._on_results(proc, msg.body)
        elif msg.type == tp.DRAIN:
            proc.info["drained"] = True
        elif msg.type == tp.STATE:
            proc.info["state"] = _unpacked_state(msg)
        elif msg.type == tp.PONG:
            proc.info["pong"] = msg.body
        elif msg.type == tp.RESULTS and proc.role == "coordinator":
            self.g2_stats = dict(msg.body)

    def _send(
        self,
        proc: _Proc,
        msg_type: str,
        body: dict[str, Any] | None = None,
        frames: tuple[bytes, ...] = (),
    ) -> bool:
        channel = proc.channel
        try:
            if channel is None:  # the coordinator
                tp.send_frames(self._router, [b"coordinator", *tp.encode(msg_type, body, frames)])
            elif channel.closed:
                return False  # the peer is gone; the process check will notice
            else:
                channel.send(tp.encode(msg_type, body, frames))
        except zmq.ZMQError:
            return False  # the peer is gone; the process check will notice
        except BrokenWorkerError:
            self._close_channel(proc)
            return False
        self.num_messages_sent += 1
        return True

    # ── the run ───────────────────────────────────────────────────────────────────────────

    def _poll_items(self, extra: zmq.Socket[bytes] | None) -> list[tuple[Any, int]]:
        """The `zmq.zmq_poll` items of the router (first), `extra` and every open channel
        (POLLOUT too while bytes wait in it), made once per set."""
        writing = False
        for proc in self._channel_procs.values():
            if proc.channel is not None and proc.channel.wants_write:
                writing = True
                break
        version = self._channels_version
        cached = self._poll_items_cache
        if not writing and cached is not None and cached[0] is extra and cached[1] == version:
            return cached[2]
        items: list[tuple[Any, int]] = [(self._router, _ZMQ_POLLIN)]
        if extra is not None:
            items.append((extra, _ZMQ_POLLIN))
        for fd, proc in self._channel_procs.items():
            out = proc.channel is not None and proc.channel.wants_write
            items.append((fd, _ZMQ_POLLIN | _ZMQ_POLLOUT if out else _ZMQ_POLLIN))
        self._poll_items_cache = None if writing else (extra, version, items)
        return items

    def ping_ranks(self, timeout_s: float = 3.0) -> list[dict[str, Any]]:
        """Every live rank's debug state (its answer to PING): what a stalled rank waits for."""
        ranks = [p for p in self._procs.values() if p.role == "rank"]
        for proc in ranks:
            proc.info.pop("pong", None)
            self._send(proc, tp.PING)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all("pong" in p.info for p in ranks):
            self._poll_messages(50)
        return [p.info["pong"] for p in ranks if "pong" in p.info]

    def rank_endpoints(self) -> list[dict[str, Any]]:
        """Per rank (in rank order): events_endpoint, replay_endpoint, topic, pid, epoch."""
        ranks = sorted((p for p in self._procs.values() if p.role == "rank"), key=lambda p: p.rank)
        return [dict(p.info) for p in ranks]

    def rank_pid(self, rank: int) -> int:
        return self._procs[f"rank{rank}".encode()].pid

    def coordinator_pid(self) -> int | None:
        proc = self._procs.get(b"coordinator")
        return None if proc is None else proc.pid

    def audit_segment(self) -> dict[str, int]:
        """After the drain: pins and reserved slots left in the shared G2 (both must be 0)."""
        if self._segment_name is None:
            return {"pins": 0, "reserved_slots": 0, "ready_slots": 0}
        from shmkv.shm import RESERVED, G2Segment

        with G2Segment.attach(self._segment_name) as segment:
            return {
                "pins": int(segment.pins.sum()),
                "pinned_slots": int((segment.pins != 0).any(axis=0).sum()),
                "reserved_slots": int((segment.state == RESERVED).sum()),
                "ready_slots": int((segment.state == 2).sum()),
            }

    def run(
        self,
        sessions: list[Session],
        *,
        on_progress: Callable[[int], None] | None = None,
        on_tick: Callable[[Fleet, float], None] | None = None,
        driver: WorkloadDriver | None = None,
    ) -> FleetOutcome:
        """Drive `sessions` (or a custom `driver`) through the fleet until done or
        `max_sim_time_ms`; `on_tick(fleet, now_ms)` runs every loop iteration."""
        self.start()
        self.collector = MetricsCollector()
        self._driver = driver or SessionDriver(sessions, self.options.replay_concurrency)
        self._rr = 0
        self._num_rejected = 0
        self._on_progress = on_progress
        started = time.monotonic()
        received_before, sent_before = self.num_messages_received, self.num_messages_sent
        max_time = self.options.max_sim_time_ms or math.inf
        driver = self._driver
        max_wall_s = self.options.max_wall_s
        self.stalled = False
        restart = not self.options.no_restart
        next_check_s = 0.0
        while not driver.done() and not self._stopping:
            now = self.clock.now_ms()
            if now > max_time:
                break
            if max_wall_s is not None and time.monotonic() - started > max_wall_s:
                self.stalled = True
                logger.error("fleet: requests still in flight after %.0f s: giving up", max_wall_s)
                for rank_state in self.ping_ranks():
                    logger.error("stalled rank state: %s", json.dumps(rank_state))
                for rank in range(self.options.data_parallel_size):
                    self._fail_outstanding(rank)
                break
            due = driver.pop_due(now)
            if due:
                self._dispatch(due, now)
            if self._router_index is not None:
                self._router_index.poll(0)
            if on_tick is not None:
                on_tick(self, now)
            wall_s = time.monotonic()
            if wall_s >= next_check_s:
                self._check_processes(restart=restart)
                next_check_s = wall_s + PROCESS_CHECK_S
            next_arrival = driver.next_arrival_ms()
            wait_ms = LOOP_POLL_MS
            if not math.isinf(next_arrival):
                wait_ms = max(
                    0, min(LOOP_POLL_MS, math.ceil(self.clock.wall_ms_until(next_arrival)))
                )
            self._poll_messages(wait_ms)
        drain_started = time.monotonic()
        state = None if self.stalled else self._drain_and_collect()
        ended = time.monotonic()
        wall_ms = (ended - started) * 1000.0
        return FleetOutcome(
            collector=self.collector,
            wall_time_ms=wall_ms,
            final_time_ms=self.clock.now_ms(),
            rank_status=self.status,
            state=state,
            num_failed=self._num_failed,
            num_rejected=self._num_rejected,
            num_rank_restarts=self.num_rank_restarts,
            num_fleet_restarts=self.num_fleet_restarts,
            g2_stats=self.g2_stats,
            endpoints=[dict(p.info) for p in self._procs.values() if p.role == "rank"],
            violation_examples=list(getattr(self, "_violation_examples", [])),
            stalled=self.stalled,
            drain_wall_ms=(ended - drain_started) * 1000.0,
            num_messages_received=self.num_messages_received - received_before,
            num_messages_sent=self.num_messages_sent - sent_before,
        )

    def _route(self, spec: RequestSpec) -> int:
        num = self.options.data_parallel_size
        if self.options.router_mode == "round_robin" or num == 1:
            rank = self._rr % num
            self._rr += 1
            return rank
        # kv: best prefix overlap minus load. Overlap comes from the ranks' own KV events (the
        # supervisor subscribes like a KV-aware router); load from their latest reports.
        bs = self.engine.block_size
        num_blocks = -(-len(spec.tokens) // bs)
        hashes = sequence_hashes(spec.tokens, bs) if self._router_index is not None else []
        best, best_cost = 0, math.inf
        for rank in range(num):
            status = self.status[rank]
            overlap = self._overlap(rank, hashes)
            cost = (num_blocks - overlap) + status.active_blocks + (status.waiting * num_blocks)
            if cost < best_cost:
                best, best_cost = rank, cost
        self.status[best].waiting += 1
        return best

    def _overlap(self, rank: int, hashes: list[int]) -> float:
        consumer = self._router_index
        if consumer is None or not hashes:
            return 0.0
        device = consumer.index.get((rank, StorageTier.DEVICE), set())
        host = consumer.index.get((rank, StorageTier.HOST_PINNED), set())
        overlap = 0.0
        for h in hashes:
            if h in device:
                overlap += 1.0
            elif h in host:
                overlap += HOST_TIER_CREDIT
            else:
                break
        return overlap

    def _start_router_index(self) -> None:
        """kv routing with events on: subscribe to every rank's stream."""
        if self.options.router_mode != "kv" or self.options.events is None:
            return
        from shmkv.consumer import EventConsumer, RankEndpoint

        endpoints = [
            RankEndpoint(
                rank=r,
                endpoint=info["events_endpoint"],
                replay_endpoint=info.get("replay_endpoint"),
            )
            for r, info in enumerate(self.rank_endpoints())
        ]
        has_replay = all(e.replay_endpoint is not None for e in endpoints)
        self._router_index = EventConsumer(
            endpoints,
            codec="auto",
            block_size=self.engine.block_size,
            context=self._ctx,
            # with replay the router recovers what it missed while subscribing; without it,
            # it starts from the first batch it sees
            start_seq=0 if has_replay else None,
        )

    def _dispatch(self, due: list[tuple[float, RequestSpec]], now_ms: float) -> None:
        by_rank: dict[int, list[RequestSpec]] = {}
        round_robin = self.options.router_mode == "round_robin"
        route = self._route
        status = self.status
        for _time_ms, spec in due:
            rank = route(spec)
            items = by_rank.get(rank)
            if items is None:
                by_rank[rank] = items = []
            items.append(spec)
            if round_robin:
                status[rank].waiting += 1
        on_arrival = self.collector.on_arrival
        arrival_ms = now_ms
        ranks = list(by_rank)
        if len(ranks) > 1:
            # the rank holding the fewest requests first: it may sit idle, waiting for these
            # (closed loop: the completions that released them may have emptied it)
            ranks.sort(key=lambda r: len(status[r].outstanding))
        for rank in ranks:
            items = by_rank[rank]
            proc = self._procs[f"rank{rank}".encode()]
            outstanding = status[rank].outstanding
            requests: list[list[int | float]] = []
            tokens: list[array[int]] = []
            for spec in items:
                request_id = spec.request_id
                num_tokens = len(spec.tokens)
                on_arrival(
                    request_id,
                    arrival_ms,
                    num_tokens,
                    max_output_tokens=spec.max_output_tokens,
                    session_id=spec.session_id,
                    turn_index=spec.turn_index,
                )
                outstanding[request_id] = spec
                requests.append([request_id, arrival_ms, spec.max_output_tokens, num_tokens])
                tokens.append(spec.tokens)
            # one tokens frame for the whole batch (a frame per request costs per frame),
            # joined from the arrays' buffers (no `tobytes` copy per request)
            sent = self._send(proc, tp.SUBMIT, {"requests": requests}, (b"".join(tokens),))
            if not sent:  # the rank is gone: its restart fails what it held, these included
                logger.warning("could not submit %d request(s) to rank %d", len(items), rank)

    def _on_results(self, proc: _Proc, body: dict[str, Any]) -> None:
        if body.get("epoch", proc.epoch) != proc.epoch:
            # A dead predecessor's last words (same identity): its requests were failed at
            # the restart, so nothing in them may count again.
            return
        status = self.status[proc.rank]
        status.running = int(body.get("running", 0))
        status.waiting = int(body.get("waiting", 0))
        status.active_blocks = int(body.get("active_blocks", 0))
        status.num_gpu_blocks = int(body.get("num_gpu_blocks", 0))
        status.preemptions_total = int(body.get("preemptions_total", 0))
        status.next_event_seq = max(status.next_event_seq, int(body.get("next_event_seq", 0)))
        status.violations = status.violations_base + int(body.get("violations", 0))
        status.g2_onboard_blocks = status.g2_onboard_base + int(body.get("g2_onboard_blocks", 0))
        driver = self._driver
        finished = 0
        decode = body.get("decode")
        if decode:
            self._record_decode_passes(decode)
        for record in body.get("passes", []):
            (
                start,
                end,
                prev_end,
                admissions,
                first,
                second,
                n_decode,
                gaps,
                completions,
                preemptions,
                rejections,
            ) = record
            record_pass(
                self.collector,
                start_ms=start,
                end_ms=end,
                prev_end_ms=prev_end,
                admissions=admissions,
                first_tokens=first,
                second_tokens=second,
                num_decode_tokens=n_decode,
                token_gaps=gaps,
                completions=completions,
                preemptions=preemptions,
            )
            for request_id, _num_output in completions:
                if status.outstanding.pop(request_id, None) is not None:
                    driver.on_finished(request_id, end)
                    finished += 1
            for request_id in rejections:
                if status.outstanding.pop(request_id, None) is not None:
                    driver.on_finished(request_id, end, ended_session=True)
                    self._num_rejected += 1
                    finished += 1
        if finished and self._on_progress is not None:
            self._on_progress(finished)

    def _record_decode_passes(self, decode: object) -> None:
        """Plain decode passes of a RESULTS message, flat [itl_ms, num_tokens, ...]: all
        they carry is ITL samples (everything else of a pass travels in `passes`)."""
        if not isinstance(decode, list) or len(decode) % 2:
            raise ProtocolError("RESULTS: decode must be a flat list of [itl_ms, num_tokens]")
        try:
            # one C-level loop; a non-number fails the collector's typed arguments
            deque(map(self.collector.on_decode_tokens, decode[0::2], decode[1::2]), maxlen=0)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"RESULTS: bad decode entry: {exc}") from exc

    # ── failures ──────────────────────────────────────────────────────────────────────────

    def _check_processes(self, *, restart: bool) -> None:
        # The coordinator first: its death restarts every rank anyway.
        items = sorted(self._procs.items(), key=lambda item: item[1].role != "coordinator")
        for identity, proc in items:
            code = proc.popen.poll()
            if code is None:
                continue
            if proc.role == "coordinator":
                if not restart:
                    raise CoordinatorDiedError(
                        f"the coordinator (pid {proc.pid}) exited with code {code}"
                    )
                self._restart_fleet(proc, code)
                return
            logger.warning("rank %d (pid %d) exited with code %s", proc.rank, proc.pid, code)
            if not restart:
                raise BrokenWorkerError(
                    f"rank {proc.rank} (pid {proc.pid}) exited with code {code}"
                )
            self._restart_rank(identity, proc)

    def _fail_outstanding(self, rank: int) -> None:
        status = self.status[rank]
        now = self.clock.now_ms()
        for request_id in list(status.outstanding):
            status.outstanding.pop(request_id)
            self._num_failed += 1
            if hasattr(self, "_driver"):
                self._driver.on_finished(request_id, now, ended_session=True)
        status.running = status.waiting = 0

    def _restart_fleet(self, coordinator: _Proc, code: int | None) -> None:
        """The coordinator died: the shared G2 is gone. Stop every rank, remove the old
        segment, start a new coordinator on a new segment and every rank at the next epoch
        (each reopens its event stream with AllBlocksCleared, continuing its seq)."""
        logger.warning(
            "coordinator (pid %d) exited with code %s: restarting the fleet on a new segment",
            coordinator.pid,
            code,
        )
        self.num_fleet_restarts += 1
        ranks = [p for p in self._procs.values() if p.role == "rank"]
        for proc in ranks:
            if proc.popen.poll() is None:
                proc.popen.kill()
        for proc in ranks:
            proc.popen.wait()
            self._fail_outstanding(proc.rank)
        for identity in list(self._procs):
            self._forget(identity)
        self._unlink_segment()
        self._spawn_coordinator()
        self._wait_ready(lambda p: p.role == "coordinator")
        for proc in sorted(ranks, key=lambda p: p.rank):
            status = self.status[proc.rank]
            status.restarts += 1
            status.violations_base = status.violations
            status.g2_onboard_base = status.g2_onboard_blocks
            status.next_event_seq = max(
                status.next_event_seq, read_seq_file(str(self._tmpdir / f"rank{proc.rank}.seq"))
            )
            self._spawn_rank(proc.rank, epoch=proc.epoch + 1)
        self._wait_ready(lambda p: p.role == "rank")

    def _unlink_segment(self) -> None:
        if self._segment_name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{self._segment_name}")

    def _restart_rank(self, identity: bytes, proc: _Proc) -> None:
        status = self.status[proc.rank]
        self._fail_outstanding(proc.rank)
        status.violations_base = status.violations
        status.g2_onboard_base = status.g2_onboard_blocks
        status.restarts += 1
        self.num_rank_restarts += 1
        self._forget(identity)
        status.next_event_seq = max(
            status.next_event_seq, read_seq_file(str(self._tmpdir / f"rank{proc.rank}.seq"))
        )
        self._spawn_rank(proc.rank, epoch=proc.epoch + 1)
        coordinator = self._procs.get(b"coordinator")
        try:
            self._wait_ready(lambda p: p.role == "rank" and p.rank == proc.rank)
        except CoordinatorDiedError:
            # It died while this rank was coming back: restart everything on a new segment.
            if self.options.no_restart or coordinator is None:
                raise
            self._restart_fleet(coordinator, coordinator.popen.poll())

    # ── end of run ────────────────────────────────────────────────────────────────────────

    def _drain_and_collect(self) -> dict[str, Any]:
        """DRAIN every rank, fence the coordinator, then collect what each tier holds."""
        ranks = [p for p in self._procs.values() if p.role == "rank"]
        for proc in ranks:
            proc.info.pop("drained", None)
            self._send(proc, tp.DRAIN)
        self._await(lambda: all(p.info.get("drained") for p in ranks), "ranks to drain")
        host: list[int] = []
        coord = self._procs.get(b"coordinator")
        if coord is not None:
            coord.info.pop("state", None)
            self._send(coord, tp.DRAIN)
            self._await(lambda: "state" in coord.info, "the coordinator's state")
            host = list(coord.info["state"].get("host_pinned", []))
            self.g2_stats = dict(coord.info["state"].get("stats", {}))
        for proc in ranks:
            proc.info.pop("state", None)
            self._send(proc, tp.STATE)
        self._await(lambda: all("state" in p.info for p in ranks), "the ranks' state")
        self._violation_examples = [
            example for p in ranks for example in p.info["state"].get("violation_examples", [])
        ]
        for proc in ranks:
            status = self.status[proc.rank]
            status.violations = status.violations_base + int(
                proc.info["state"].get("violations", 0)
            )
            idle_s = proc.info["state"].get("idle_s", 0.0)
            status.idle_s = float(idle_s) if isinstance(idle_s, int | float) else 0.0
        dump: dict[str, Any] = {"block_size": self.engine.block_size, "ranks": {}}
        pool = set(host)
        for proc in sorted(ranks, key=lambda p: p.rank):
            body = proc.info["state"]
            # Host tier: what this rank announced (its parent chain is announced on it too),
            # which must be part of what the shared pool holds.
            announced = sorted(body.get("host_pinned", []))
            unheld = [h for h in announced if h not in pool] if coord is not None else []
            if unheld:
                self.status[proc.rank].violations += 1
                self._violation_examples.append(
                    f"rank {proc.rank} announces {len(unheld)} host block(s) G2 does not hold"
                )
            dump["ranks"][str(proc.rank)] = {
                "device": sorted(body.get("device", [])),
                "host_pinned": announced,
            }
            self.status[proc.rank].next_event_seq = int(body.get("next_event_seq", 0))
        return dump

    def _await(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while not condition():
            self._check_processes(restart=False)
            if time.monotonic() > deadline:
                raise WorkerTimeoutError(f"timed out waiting for {what}")
            self._poll_messages(50)

    def stop_processes(self) -> None:
        for proc in self._procs.values():
            if proc.popen.poll() is None:
                self._send(proc, tp.STOP)
        for proc in self._procs.values():
            if proc.channel is not None and proc.channel.wants_write:
                proc.channel.flush_blocking(STOP_FLUSH_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self._procs.values():
            remaining = max(0.1, deadline - time.monotonic())
            try:
                proc.popen.wait(remaining)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.stop_processes()
        finally:
            if self._metrics is not None:
                self._metrics.shutdown()
                self._metrics = None
            if self._router_index is not None:
                self._router_index.close()
                self._router_index = None
            for proc in self._procs.values():
                self._close_channel(proc)
            self._unlink_segment()
            self._router.close(linger=0)
            self._ctx.term()
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    # ── metrics ───────────────────────────────────────────────────────────────────────────

    def _start_metrics(self) -> None:
        from shmkv.metrics import MetricsServer

        assert self.options.metrics_port is not None
        tp.warn_if_exposed(f"tcp://{self.options.metrics_host}:0", "/metrics")
        self._metrics = MetricsServer(self, self.options.metrics_host, self.options.metrics_port)


class ServeDriver:
    """`shmkv fleet --serve`: requests from outside, over a loopback ZMQ ROUTER.

    A client (REQ or DEALER) sends one JSON object per request:
    `{"tokens": [u32, ...], "max_tokens": N}` (or `"prompt_tokens": N` for a random prompt of
    N tokens; an optional `"id"` is echoed). When the request completes the client receives
    `{"id", "request_id", "ttft_ms", "e2e_ms", "output_tokens", "failed"}`; a malformed request
    gets `{"error": ...}` at once. Runs until SIGINT/SIGTERM.
    """

    MAX_PROMPT_TOKENS = 1 << 20

    def __init__(self, fleet: Fleet, endpoint: str, block_size: int) -> None:
        import random

        self._fleet = fleet
        self.socket = fleet._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        tp.warn_if_exposed(endpoint, "--serve")
        self.endpoint = tp.bind_socket(self.socket, endpoint)
        self._rng = random.Random(0)
        self._next_id = 0
        self._clients: dict[int, tuple[list[bytes], Any]] = {}
        self.num_errors = 0
        self.stopped = False

    def next_arrival_ms(self) -> float:
        return math.inf

    def pop_due(self, now_ms: float) -> list[tuple[float, RequestSpec]]:
        due: list[tuple[float, RequestSpec]] = []
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return due
            envelope, payload = frames[:-1], frames[-1]
            try:
                spec, client_id = self._parse(payload, now_ms)
            except (ValueError, TypeError) as exc:
                self.num_errors += 1
                self.socket.send_multipart([*envelope, json.dumps({"error": str(exc)}).encode()])
                continue
            self._clients[spec.request_id] = (envelope, client_id)
            due.append((now_ms, spec))

    def _parse(self, payload: bytes, now_ms: float) -> tuple[RequestSpec, Any]:
        body = json.loads(payload)
        if not isinstance(body, dict):
            raise ValueError("a request is a JSON object")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        tokens = array("I")
        if "tokens" in body:
            raw = body["tokens"]
            if not isinstance(raw, list) or not raw or len(raw) > self.MAX_PROMPT_TOKENS:
                raise ValueError("tokens must be a non-empty list of u32")
            try:
                tokens.extend(raw)
            except (OverflowError, TypeError) as exc:
                raise ValueError(f"tokens must be u32: {exc}") from exc
        else:
            count = body.get("prompt_tokens")
            if not isinstance(count, int) or not 0 < count <= self.MAX_PROMPT_TOKENS:
                raise ValueError("give tokens or a positive prompt_tokens")
            tokens.frombytes(self._rng.randbytes(4 * count))
        request_id = self._next_id
        self._next_id += 1
        spec = RequestSpec(
            request_id=request_id,
            session_id=request_id,
            turn_index=0,
            arrival_ms=now_ms,
            delay_ms=0.0,
            tokens=tokens,
            max_output_tokens=max_tokens,
        )
        return spec, body.get("id")

    def on_finished(self, request_id: int, time_ms: float, *, ended_session: bool = False) -> None:
        envelope, client_id = self._clients.pop(request_id)
        record = self._fleet.collector.request_summary(request_id)
        reply = {"id": client_id, "request_id": request_id, **record, "failed": ended_session}
        with contextlib.suppress(zmq.ZMQError):
            self.socket.send_multipart([*envelope, json.dumps(reply).encode()])

    def done(self) -> bool:
        return self.stopped and not self._clients

    def close(self) -> None:
        self.socket.close(linger=0)


def _unpacked_state(msg: tp.Message) -> dict[str, Any]:
    """A STATE body with a rank's `device` list in place: a rank sends it as one frame of
    native u64 words (`device_packed`), the coordinator's STATE has no such frame.

    Raises:
        ProtocolError: a packed STATE without exactly one frame of whole u64 words.
    """
    body = msg.body
    if body.get("device_packed"):
        if len(msg.frames) != 1 or len(msg.frames[0]) % 8:
            raise ProtocolError("STATE: device_packed needs one frame of u64 words")
        device = array("Q")
        device.frombytes(msg.frames[0])
        body["device"] = device.tolist()
    return body


@contextlib.contextmanager
def _signals_raise_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C: the fleet is torn down by the context managers."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ── CLI ─────────────────────────────────────────────────────────────────────────────────────


def register(sub: Any) -> None:
    from shmkv import cli

    parser = sub.add_parser(
        "fleet",
        help="live multi-process fleet: rank processes sharing one G2 pool in shared memory",
        description="Launch a coordinator and --data-parallel-size rank processes on the shared "
        "monotonic clock, drive a workload through them, publish every rank's KV events over "
        "ZMQ, and write the same report as `shmkv replay` (plus per-rank and G2 figures). "
        "Use --speedup-ratio inf to run as fast as the CPU allows.",
    )
    cli.add_engine_arguments(parser)
    cli.add_workload_arguments(parser)
    cli.add_event_arguments(parser)
    cli.add_output_arguments(parser)
    g = parser.add_argument_group("fleet")
    g.add_argument(
        "--no-restart",
        action="store_true",
        help="stop with exit code 3 when a process dies instead of restarting it",
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus /metrics on this port (0 = random)",
    )
    g.add_argument(
        "--metrics-host", default="127.0.0.1", help="address of /metrics (default loopback)"
    )
    g.add_argument(
        "--serve",
        nargs="?",
        const="tcp://127.0.0.1:5600",
        default=None,
        metavar="ENDPOINT",
        help="take requests from outside instead of a workload: JSON "
        '{"tokens": [...], "max_tokens": N} on a ZMQ REQ/DEALER to ENDPOINT '
        "(default tcp://127.0.0.1:5600); runs until Ctrl-C, then reports",
    )
    parser.set_defaults(func=cmd_fleet, data_parallel_size=2)


def cmd_fleet(args: argparse.Namespace) -> int:
    from shmkv import cli
    from shmkv.report import format_jsonl, format_summary_table

    engine = cli.engine_config_from_args(args)
    cli.check_output_paths(args)
    sessions = cli.sessions_from_args(args, engine)
    events = None
    if args.zmq_kv_events_port is not None:
        host = args.event_host
        events = EventSpec(
            codec=args.event_codec,
            endpoint=f"tcp://{host}:{args.zmq_kv_events_port}",
            replay_endpoint=None
            if args.zmq_replay_port is None
            else f"tcp://{host}:{args.zmq_replay_port}",
            topic=args.event_topic,
            model_name=args.model_name,
            buffer_steps=args.event_buffer_steps,
            legacy_replay=args.legacy_replay,
            legacy_array_events=args.vllm_array_events,
        )
    elif args.zmq_replay_port is not None:
        raise cli.UsageError("--zmq-replay-port needs --zmq-kv-events-port")
    options = FleetOptions(
        engine=engine,
        data_parallel_size=args.data_parallel_size,
        router_mode=args.router_mode,
        replay_concurrency=cli.replay_concurrency(args),
        events=events,
        wait_for_subscribers_s=args.wait_for_subscribers,
        no_restart=args.no_restart,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        max_sim_time_ms=None
        if args.max_sim_time_seconds is None
        else args.max_sim_time_seconds * 1000.0,
    )
    total = sum(len(s.turns) for s in sessions)
    if args.serve is not None:
        return _serve(args, options, engine, cli)
    progress = cli.progress_bar(args, total, "fleet")
    try:
        with _signals_raise_keyboard_interrupt(), Fleet(options) as fleet:
            fleet.start()
            if not args.quiet:
                for info in fleet.rank_endpoints() if events is not None else []:
                    print(
                        f"rank {info['rank']}: KV events {info['events_endpoint']}"
                        + (
                            f", replay {info['replay_endpoint']}"
                            if info.get("replay_endpoint")
                            else ""
                        ),
                        file=sys.stderr,
                    )
                print(
                    f"fleet {options.fleet_id}: {options.data_parallel_size} ranks"
                    f"{', shared G2 of ' + str(engine.num_g2_blocks) + ' blocks' if engine.has_g2 else ''}",
                    file=sys.stderr,
                )
            outcome = fleet.run(sessions, on_progress=progress)
    except BrokenWorkerError as exc:
        print(f"shmkv fleet: {exc}; the fleet was stopped and cleaned up", file=sys.stderr)
        return cli.EXIT_WORKER_DIED
    finally:
        if progress is not None:
            progress(-1)
    report = outcome.collector.build_report(
        wall_time_ms=outcome.wall_time_ms,
        extra={
            "data_parallel_size": options.data_parallel_size,
            "router_mode": options.router_mode,
            "kv_eviction_policy": engine.eviction,
            "failed_requests": outcome.num_failed,
            "rejected_requests": outcome.num_rejected,
            "rank_restarts": outcome.num_rank_restarts,
            **{
                f"rank{r}_preemptions": s.preemptions_total
                for r, s in enumerate(outcome.rank_status)
            },
            **{f"g2_{k}": v for k, v in outcome.g2_stats.items() if isinstance(v, int | float)},
        },
    )
    if args.report:
        cli.write_atomic(args.report, json.dumps(report, indent=2) + "\n")
    if args.report_jsonl:
        cli.write_atomic(args.report_jsonl, format_jsonl(outcome.collector.per_request_records()))
    if args.dump_state and outcome.state is not None:
        cli.write_atomic(args.dump_state, json.dumps(outcome.state) + "\n")
    if not args.quiet:
        print(format_summary_table(report))
    print(json.dumps({k: report[k] for k in cli.HEADLINE if k in report}))
    return cli.EXIT_OK


def _serve(args: argparse.Namespace, options: FleetOptions, engine: EngineConfig, cli: Any) -> int:
    """`--serve`: run until SIGINT/SIGTERM, answering external requests; then report."""
    with Fleet(options) as fleet:
        fleet.start()
        driver = ServeDriver(fleet, args.serve, engine.block_size)

        def stop(signum: int, frame: object) -> None:
            driver.stopped = True

        previous = [signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)]
        try:
            print(
                f"fleet {options.fleet_id}: serving requests on {driver.endpoint} (Ctrl-C stops)",
                file=sys.stderr,
                flush=True,
            )
            try:
                outcome = fleet.run([], driver=driver)
            finally:
                driver.close()
        except BrokenWorkerError as exc:
            print(f"shmkv fleet: {exc}; the fleet was stopped and cleaned up", file=sys.stderr)
            return int(cli.EXIT_WORKER_DIED)
        finally:
            for sig, handler in zip((signal.SIGINT, signal.SIGTERM), previous, strict=True):
                signal.signal(sig, handler)
    report = outcome.collector.build_report(
        wall_time_ms=outcome.wall_time_ms, extra={"serve_errors": driver.num_errors}
    )
    if args.report:
        cli.write_atomic(args.report, json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in cli.HEADLINE if k in report}))
    return int(cli.EXIT_OK)


__all__ = ["Fleet", "FleetOptions", "FleetOutcome", "ServeDriver", "asdict"]
