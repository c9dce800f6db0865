"""Layer 3: the rank worker process of the live fleet.

One process per DP rank. It owns a `RankScheduler` (private G1 pool), optionally a shared-G2
client, an `EventPublisher`, and its end of a direct channel to the supervisor
(`shmkv.channel`: a socket pair the supervisor made, inherited as `fd://N`):

    supervisor --SUBMIT--> rank --step(now)--> scheduler --events--> publisher (XPUB)
    supervisor <--RESULTS-- rank  (admissions, tokens, completions per pass, batched)
    coordinator <--OFFLOAD/acks/G2 events--> rank (through the G2 client)

Time is the fleet's shared monotonic clock: simulated ms = (monotonic - fleet start) x
speedup; with speedup 0 or inf the rank never waits. A pass that ends at simulated time T
keeps the rank busy until the clock reaches T. At speedup inf a pass takes no simulated time,
and a stretch of steady decode passes (`RankScheduler.run_decode_passes`) runs at one instant:
every pass of it starts and ends at the simulated time the stretch started (its first token
gap is the time since the previous pass, the others are 0).

Shutdown protocol: DRAIN -> the rank finishes every request and offload it holds, replies
DRAINED; after the coordinator's fence it publishes the last host-tier events, flushes the
publisher and answers STATE with what G1 holds. STOP -> exit.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import mmap
import os
import struct
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import numpy as np
import orjson
import zmq

from shmkv import transport as tp
from shmkv.channel import Channel
from shmkv.clock import MonotonicClock
from shmkv.codec import make_codec
from shmkv.config import EngineConfig
from shmkv.errors import BrokenWorkerError, ClosedError, ProtocolError
from shmkv.events import EventBatch
from shmkv.g2_client import SharedG2Client
from shmkv.offload import OffloadEngine
from shmkv.offload_local import LocalG2Engine, OffloadConfig
from shmkv.publisher import EventPublisher, PublisherConfig
from shmkv.scheduler import DecodeRun, PassResult, RankScheduler

logger = logging.getLogger(__name__)

RESULTS_MAX_PASSES = 1024
"""Pending pass records that force a RESULTS message (else one goes every
`RESULTS_MAX_DELAY_S`, and soon after a completion or rejection: `RESULTS_COALESCE_S`)."""
RESULTS_MAX_DELAY_S = 0.02
RESULTS_COALESCE_S = 0.002
"""A clock that never waits: a burst goes on for up to this long after a completion or
rejection while the rank has more to run, so that the completions of the next few passes
travel in the same RESULTS (and come back as one SUBMIT per rank). A rank with nothing else
to run reports at once. Each message costs both ends a wake-up and its handling: at speedup
inf W1's completions come in groups on consecutive passes, and one RESULTS per group (plus
the SUBMITs it releases) was most of the supervisor's CPU (W1, 2 ranks: ~210 RESULTS and
~250 SUBMITs per run before, ~110 and ~170 with this).

The deadline outlives the burst (`RankEngine._report_by_s`): a burst cut short by a message
(in a fleet, mostly the SUBMITs the other ranks' completions release) used to send what it
had at once; the completions now wait for the deadline while the rank has work, and the
bursts in between add theirs (W1, 2 ranks: ~120 RESULTS and ~180 SUBMITs per run before,
~100 and ~160 with this; 1 rank: ~60 of each before, ~45 with this).

2 ms since the supervisor talks to each rank over a direct channel (`shmkv.channel`):
`bench_fleet_scaling.py --ranks 1 2 --repeats 7`, about 26 quiet invocations each, alternated
in the same minutes: 0.5 ms gave a median ratio of 1.57 (paired 1.54; ~118 RESULTS and ~200
SUBMITs per run), 1 ms 1.66 (1.67; ~104 and ~180), 2 ms 1.73 (1.69; ~98 and ~165)."""
IDLE_POLL_MS = 200
BURST_S = 0.002
"""A clock that never waits runs passes in bursts of up to this long between socket polls."""
SUPERVISOR_CHECK_S = 0.0003
"""Inside a burst, look for a supervisor message (new requests) this often: a request
submitted mid-burst starts within ~0.3 ms, not at the end of the burst. (A readiness check
costs ~5 us, so not after every pass.)"""
FENCE_TIMEOUT_S = 10.0
RANK_GC_THRESHOLD = 20_000
"""A rank process runs a young-generation garbage collection every this many allocations
(Python's default: 700). See `_tune_gc`."""

_ZMQ_POLLIN: Final = int(zmq.POLLIN)
_ZMQ_POLLOUT: Final = int(zmq.POLLOUT)
_ZMQ_POLLERR: Final = int(zmq.POLLERR)
_CHANNEL_CLOSE_FLUSH_S: Final = 1.0
"""At exit, how long a rank waits for its last messages to reach the supervisor."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EventSpec:
    """How a rank publishes its KV events."""

    codec: str = "json"
    endpoint: str = "tcp://127.0.0.1:0"
    replay_endpoint: str | None = None
    topic: str | None = None
    model_name: str = "shmkv-mock"
    buffer_steps: int = 10_000
    legacy_replay: bool = False
    legacy_array_events: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RankSpec:
    """Everything a rank process needs; travels as JSON on its command line."""

    rank: int
    fleet_id: str
    engine: dict[str, Any]
    supervisor_endpoint: str
    """`fd://N`: the rank's end of its channel to the supervisor (`shmkv.channel`)."""
    start_monotonic_s: float
    epoch: int = 0
    coordinator_endpoint: str | None = None
    segment_name: str | None = None
    events: EventSpec | None = None
    start_event_seq: int = 0
    version: int = tp.PROTOCOL_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["engine"] = {k: tp.encode_float(v) for k, v in self.engine.items()}
        return orjson.dumps(data).decode()

    @classmethod
    def from_json(cls, text: str) -> RankSpec:
        data = orjson.loads(text)
        events = data.pop("events", None)
        data["engine"] = {k: tp.decode_float(v) for k, v in data["engine"].items()}
        return cls(events=EventSpec(**events) if events else None, **data)


class SeqStore:
    """The rank's next event seq in an 8-byte file, written BEFORE every send, so a restarted
    rank continues from it and never reuses a seq (a crash may at most skip one)."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)

    def write(self, next_seq: int) -> None:
        struct.pack_into("<Q", self._map, 0, next_seq)

    def close(self) -> None:
        self._map.close()


def read_seq_file(path: str) -> int:
    """The seq a restarted rank must continue from (0 if the file is missing)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(8)
    except FileNotFoundError:
        return 0
    return struct.unpack("<Q", data)[0] if len(data) == 8 else 0


def _has_records(result: PassResult) -> bool:
    """Whether a pass did more than plain decode (its record must travel in full)."""
    return bool(
        result.admissions
        or result.first_tokens
        or result.second_tokens
        or result.token_gaps
        or result.completions
        or result.preemptions
        or result.rejections
    )


def _pass_record(result: PassResult) -> list[Any]:
    return [
        result.start_ms,
        result.end_ms,
        result.prev_end_ms,
        result.admissions,
        result.first_tokens,
        result.second_tokens,
        result.num_decode_tokens,
        result.token_gaps,
        result.completions,
        result.preemptions,
        result.rejections,
    ]


def _decode_pairs(run: DecodeRun) -> list[float]:
    """The ITL pairs of a run's passes, flat [itl_ms, num_tokens, ...]: one pair per pass, as
    `_after_pass` would have recorded them, except that at speedup inf (every pass after the
    first has a gap of 0) those passes share one pair: the collector adds a pair's tokens to
    the ITL samples of its value, so the report is the same. Token counts stay ints."""
    ends = run.ends_ms
    members = run.num_decode_tokens
    first = ends[0]
    pairs: list[float] = [first - run.prev_end_ms, members]
    if first == ends[-1]:  # zero-time passes (ends never decrease)
        if len(ends) > 1:
            pairs += [0.0, members * (len(ends) - 1)]
        return pairs
    prev = first
    for end in ends[1:]:
        pairs.append(end - prev)
        pairs.append(members)
        prev = end
    return pairs


def _submitted(msg: tp.Message) -> list[tuple[int, float, int, array[int]]]:
    """The requests of a SUBMIT, validated as a whole: (id, arrival_ms, max_output, tokens).

    Body {requests: [[id, arrival_ms, max_output, num_tokens], ...]} and one frame holding
    every request's tokens (u32, native order), in request order.

    Raises:
        ProtocolError: anything malformed (nothing is submitted then).
    """
    requests = tp.require(msg.body, "requests", list)
    if len(msg.frames) != 1:
        raise ProtocolError("SUBMIT: one tokens frame expected")
    frame = msg.frames[0]
    if len(frame) % 4:
        raise ProtocolError("SUBMIT: the tokens frame is not a whole number of u32")
    # each request's tokens copied once, straight from the frame (the supervisor's byte
    # order: the same host)
    view = memoryview(frame)
    num_words = len(frame) // 4
    out: list[tuple[int, float, int, array[int]]] = []
    offset = 0
    for item in requests:
        if not isinstance(item, list) or len(item) != 4:
            raise ProtocolError("SUBMIT: each request is [id, arrival_ms, max_output, num_tokens]")
        request_id, arrival_ms, max_output, num_tokens = item
        if not (
            type(request_id) is int
            and type(max_output) is int
            and type(num_tokens) is int
            and isinstance(arrival_ms, int | float)
            and not isinstance(arrival_ms, bool)
        ):
            raise ProtocolError("SUBMIT: bad request fields")
        end = offset + num_tokens
        if num_tokens < 0 or end > num_words:
            raise ProtocolError("SUBMIT: the token counts do not match the tokens frame")
        tokens = array("I")
        tokens.frombytes(view[offset * 4 : end * 4])
        out.append((request_id, float(arrival_ms), max_output, tokens))
        offset = end
    if offset != num_words:
        raise ProtocolError("SUBMIT: the token counts do not match the tokens frame")
    return out


class RankEngine:
    """The body of one rank process. Use as a context manager; `run()` until STOP."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self.config = EngineConfig.from_mapping(spec.engine)
        self.clock = MonotonicClock(spec.start_monotonic_s, self.config.speedup_ratio)
        self._chan = Channel.from_endpoint(spec.supervisor_endpoint)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._offload: OffloadEngine | None = None
        self._g2_socket: zmq.Socket[bytes] | None = None
        self.publisher: EventPublisher | None = None
        seq_file = spec.extra.get("seq_file")
        self._seq_store = SeqStore(str(seq_file)) if seq_file else None
        try:
            self._offload = self._make_offload()
            self.scheduler = RankScheduler(
                self.config,
                spec.rank,
                self._offload,
                enable_events=spec.events is not None,
                emit_token_ids=spec.events is not None,
            )
            if spec.events is not None:
                self.publisher = self._make_publisher(spec.events)
        except BaseException:
            self.close()
            raise
        self._pending: list[list[Any]] = []
        """Full records of the passes not yet reported (passes with more than decode)."""
        self._pending_decode: list[float] = []
        """Plain decode passes not yet reported, flat: [itl_ms, num_tokens, itl_ms, ...]."""
        self._num_pending = 0
        self._pending_since = 0.0
        self._urgent = False
        """A completion or rejection waits in `_pending`: the supervisor releases the next
        request on it, so it is reported at once (within a burst: after `_coalesce_s`)."""
        self._report_by_s = 0.0
        """Bursts: when the urgent records must go (`_coalesce_s` after the first; 0: not
        set). A burst that ends earlier (a message came) leaves them waiting until then
        while the rank has work: the next burst may add completions to the same RESULTS."""
        self._burst_s = BURST_S
        self._coalesce_s = RESULTS_COALESCE_S
        self._next_pass_ms = 0.0
        self._idle_pass = False
        self._draining = False
        self._stopping = False
        self._drained_sent = False
        self._num_passes = 0
        self._num_bad_messages = 0
        self._serving = False
        """Between the first SUBMIT and DRAIN: the span `idle_s` is measured over."""
        self.idle_s = 0.0
        """While serving, the time the rank held no request and waited in poll (for the
        supervisor's next requests): what a rank of a fleet loses to starvation. In STATE."""
        self._check_every = int(spec.extra.get("check_invariants_every", 0) or 0)
        self._inject_bug = str(spec.extra.get("inject_bug") or "")
        self.violations: list[str] = []
        self.num_violations = 0

    # ── construction ──────────────────────────────────────────────────────────────────────

    def _make_offload(self) -> OffloadEngine | None:
        spec, config = self.spec, self.config
        if spec.coordinator_endpoint is not None and spec.segment_name is not None:
            from shmkv.g2_client import SharedG2Client

            client = SharedG2Client(
                rank=spec.rank,
                epoch=spec.epoch,
                segment_name=spec.segment_name,
                coordinator_endpoint=spec.coordinator_endpoint,
                config=config,
                clock=self.clock,
                context=self._ctx,
            )
            self._g2_socket = client.socket
            return client
        if config.has_g2:
            return LocalG2Engine(
                OffloadConfig(
                    num_g2_blocks=config.num_g2_blocks,
                    block_size_bytes=config.block_size_bytes,
                    bandwidth_g1_to_g2_gbps=config.bandwidth_g1_to_g2_gbps,
                    bandwidth_g2_to_g1_gbps=config.bandwidth_g2_to_g1_gbps,
                    offload_batch_size=config.offload_batch_size,
                )
            )
        return None

    def _make_publisher(self, events: EventSpec) -> EventPublisher:
        codec = make_codec(
            events.codec,
            block_size=self.config.block_size,
            legacy_array_events=events.legacy_array_events,
        )
        config = PublisherConfig(
            endpoint=events.endpoint,
            replay_endpoint=events.replay_endpoint,
            topic=events.topic,
            model_name=events.model_name,
            buffer_steps=events.buffer_steps,
            legacy_replay=events.legacy_replay,
            start_seq=self.spec.start_event_seq,
        )
        for endpoint in (events.endpoint, events.replay_endpoint):
            if endpoint is not None:
                tp.warn_if_exposed(endpoint, f"rank {self.spec.rank} KV events")
        return EventPublisher(self.spec.rank, codec, config, context=self._ctx)

    # ── lifecycle ─────────────────────────────────────────────────────────────────────────

    def __enter__(self) -> RankEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                self.publisher.flush(timeout_s=2.0)
            self.publisher.close()
            self.publisher = None
        if self._offload is not None:
            self._offload.close()
            self._offload = None
        if self._seq_store is not None:
            self._seq_store.close()
            self._seq_store = None
        if not self._chan.closed:
            self._chan.flush_blocking(_CHANNEL_CLOSE_FLUSH_S)
            self._chan.close()
        self._ctx.term()

    def _send(
        self, msg_type: str, body: dict[str, Any] | None = None, frames: tuple[bytes, ...] = ()
    ) -> None:
        """Send one message to the supervisor (never blocks). A supervisor that is gone
        stops the rank."""
        try:
            self._chan.send(tp.encode(msg_type, body, frames))
        except (BrokenWorkerError, ClosedError) as exc:
            self._supervisor_gone(exc)

    def _supervisor_gone(self, exc: Exception) -> None:
        if not self._stopping:
            logger.warning("rank %d: the supervisor is gone (%s): stopping", self.spec.rank, exc)
        self._stopping = True

    def _publish(self, events: list[Any]) -> None:
        pub = self.publisher
        if pub is None or not events:
            return
        if self._seq_store is not None:
            self._seq_store.write(pub.next_seq + 1)
        pub.publish(EventBatch(ts_s=time.time(), dp_rank=self.spec.rank, events=events))
        if isinstance(self._offload, SharedG2Client):
            self._offload.record_next_event_seq(pub.next_seq)

    def _on_g2_readable(self) -> None:
        """The G2 coordinator sent something: buffer it, then let the rank act on it.

        A rank waiting for a message (no pass scheduled) runs a pass now; an idle rank ticks
        its G2 client at once, so host-tier events reach its stream without delay. (Without
        this, a readable socket nobody drains would spin the poller.)
        """
        client = self._offload
        if not isinstance(client, SharedG2Client) or not client.receive():
            return
        now = self.clock.now_ms()
        scheduler = self.scheduler
        if scheduler.has_work():
            if math.isinf(self._next_pass_ms):
                self._next_pass_ms = now
            return
        manager = scheduler.manager
        manager.tick_offload_engine(now)
        self._publish(manager.take_events())

    def run(self) -> int:
        pub = self.publisher
        if pub is not None:
            wait_s = self.spec.extra.get("wait_for_subscribers_s")
            if wait_s:
                pub.wait_for_subscribers(1, float(wait_s))
            if pub.pending_clear:
                if self._seq_store is not None:
                    self._seq_store.write(pub.next_seq + 1)
                pub.open_stream()
        self._send(
            tp.READY,
            {
                "role": "rank",
                "rank": self.spec.rank,
                "pid": os.getpid(),
                "epoch": self.spec.epoch,
                "version": tp.PROTOCOL_VERSION,
                "events_endpoint": pub.endpoint if pub else None,
                "replay_endpoint": pub.replay_endpoint if pub else None,
                "topic": pub.topic.decode() if pub else None,
                "next_event_seq": pub.next_seq if pub else 0,
            },
        )
        chan = self._chan
        chan_fd = chan.fileno()
        g2_items: list[tuple[Any, int]] = []
        if self._g2_socket is not None:
            g2_items.append((self._g2_socket, _ZMQ_POLLIN))
        # zmq.zmq_poll directly (it takes raw descriptors too): a Poller's Python layer costs
        # more than the poll itself. POLLOUT only while bytes wait to go to the supervisor.
        read_items: list[tuple[Any, int]] = [(chan_fd, _ZMQ_POLLIN), *g2_items]
        write_items: list[tuple[Any, int]] = [(chan_fd, _ZMQ_POLLIN | _ZMQ_POLLOUT), *g2_items]
        zmq_poll = zmq.zmq_poll
        monotonic = time.monotonic
        scheduler = self.scheduler
        while not self._stopping:
            sup_ready = g2_ready = False
            timeout_ms = self._poll_timeout_ms()
            poll_items = write_items if chan.wants_write else read_items
            if self._serving and not scheduler.num_requests and timeout_ms:
                waited_from_s = monotonic()
                ready = zmq_poll(poll_items, timeout_ms)
                self.idle_s += monotonic() - waited_from_s
            else:
                ready = zmq_poll(poll_items, timeout_ms)
            for item, events in ready:
                if item == chan_fd:
                    if events & _ZMQ_POLLOUT:
                        self._flush_channel()
                    sup_ready = bool(events & (_ZMQ_POLLIN | _ZMQ_POLLERR))
                else:
                    g2_ready = True
            if sup_ready:
                self._drain_supervisor()
            if g2_ready:
                self._on_g2_readable()
            if pub is not None:
                pub.serve_replay(0)
            if self.stop_requested():
                break
            now = self.clock.now_ms()
            if scheduler.has_work() and now >= self._next_pass_ms:
                if self.clock.never_sleeps:
                    self._run_burst(now)
                else:
                    self._after_pass(scheduler.step(now), now)
            self._maybe_flush_results(force=self._urgent and self._report_due(scheduler))
            if self._draining and not scheduler.has_work() and not self._drained_sent:
                self._maybe_flush_results(force=True)
                self._send(tp.DRAIN, {"rank": self.spec.rank, "drained": True})
                self._drained_sent = True
        self._maybe_flush_results(force=True)
        return 0

    def _run_burst(self, now: float) -> None:
        """A clock that never waits (speedup 0/inf): passes back to back for up to BURST_S,
        so the fixed cost of a loop turn (polls, replay service, flush checks) is shared.

        The burst ends early RESULTS_COALESCE_S after a pass reported a completion or
        rejection (the supervisor waits for it to release the next request; the caller
        reports it), when nothing moved or nothing is left to run, when the next pass is
        not due yet, or when the supervisor has sent something (looked at every
        SUPERVISOR_CHECK_S). Simulated time is wall time since the fleet start here.

        A plain decode pass (tokens, nothing else to report, no events) is accounted inline:
        what `_after_pass` would do for it, without its general machinery. In steady decode
        (`in_steady_decode`) the passes due by now run as one stretch (`run_decode_passes`
        with `zero_time_ok`): at speedup inf, where a pass takes no simulated time, that is
        every consecutive steady pass up to a member's last token or a non-bulk event, all at
        one instant `now`; at speedup 0 (passes take time) one pass. `_account_run` does
        what `_after_pass` would for each of them, in bulk.
        """
        scheduler = self.scheduler
        steady = scheduler.in_steady_decode
        run_passes = scheduler.run_decode_passes
        account_run = self._account_run
        burst_step = self._burst_step
        monotonic = time.monotonic
        zmq_poll = zmq.zmq_poll
        sup_items = [(self._chan.fileno(), _ZMQ_POLLIN)]
        start_s = self.clock.start_monotonic_s
        inline = not self._check_every
        wall_s = monotonic()
        burst_end_s = wall_s + self._burst_s
        next_check_s = wall_s + SUPERVISOR_CHECK_S
        # set at the first completion (see RESULTS_COALESCE_S), kept across bursts
        report_by_s = self._report_by_s or math.inf
        while True:
            run = run_passes(now, math.inf, now, zero_time_ok=True) if inline and steady() else None
            if run is not None:
                account_run(run, wall_s)
            elif burst_step(now, wall_s, inline):
                return
            wall_s = monotonic()
            if self._urgent:
                if report_by_s == math.inf:
                    report_by_s = self._report_by_s = wall_s + self._coalesce_s
                if wall_s >= report_by_s:
                    return
            now = (wall_s - start_s) * 1000.0
            if now < self._next_pass_ms or wall_s >= burst_end_s:
                return
            if wall_s >= next_check_s:
                if zmq_poll(sup_items, 0):
                    return
                next_check_s = wall_s + SUPERVISOR_CHECK_S

    def _burst_step(self, now: float, wall_s: float, inline: bool) -> bool:
        """One `step` of a burst and its accounting; True when the burst must end."""
        result = self.scheduler.step(now)
        if inline and result.num_decode_tokens and not result.events and not _has_records(result):
            # a plain decode pass (tokens were emitted, so it did work): only its ITL pair
            self._num_passes += 1
            self._next_pass_ms = result.end_ms
            self._idle_pass = False
            decode = self._pending_decode
            decode.append(result.end_ms - result.prev_end_ms)
            decode.append(result.num_decode_tokens)
            self._count_pending(wall_s)
            return False
        self._after_pass(result, now)
        return not result.did_work or not self.scheduler.has_work()

    def _report_due(self, scheduler: RankScheduler) -> bool:
        """Whether the urgent records must go now: no burst set a later time for them, it
        has come, or the rank has nothing left to run (see `_report_by_s`)."""
        report_by_s = self._report_by_s
        return not report_by_s or time.monotonic() >= report_by_s or not scheduler.has_work()

    def stop_requested(self) -> bool:
        return self._stopping

    def _poll_timeout_ms(self) -> int:
        """How long the loop may block in poll: until the next pass is due, the pending
        results must go, or IDLE_POLL_MS (a message wakes it earlier)."""
        limit_ms = IDLE_POLL_MS
        if self._num_pending:
            left_s = self._pending_since + RESULTS_MAX_DELAY_S - time.monotonic()
            if left_s <= 0:
                return 0
            limit_ms = min(limit_ms, math.ceil(left_s * 1000.0))
        if self._urgent and self._report_by_s:  # kept after a burst: due then at the latest
            limit_ms = min(
                limit_ms, max(0, math.ceil((self._report_by_s - time.monotonic()) * 1e3))
            )
        if not self.scheduler.has_work() or math.isinf(self._next_pass_ms):
            return limit_ms
        wait_ms = self.clock.wall_ms_until(self._next_pass_ms)
        if wait_ms <= 0:
            return 1 if self._idle_pass else 0
        return max(0, min(limit_ms, math.ceil(wait_ms)))

    def _check_invariants(self) -> None:
        """Stress mode: check the G1 pools (and the G2 client's pin ledger) every N passes."""
        if self._inject_bug == "g1-leak" and self._num_passes % 7 == 0:
            # Deliberate bug for `shmkv stress --inject-bug g1-leak`: lose a free slot.
            reset = self.scheduler.manager._reset
            if reset:
                reset.popleft()
        try:
            self.scheduler.check_invariants()
            check = getattr(self._offload, "check_invariants", None)
            if check is not None:
                check()
        except AssertionError as exc:  # InvariantError is an AssertionError
            self.num_violations += 1
            if len(self.violations) < 5:
                self.violations.append(f"rank {self.spec.rank} pass {self._num_passes}: {exc}")
                logger.error("invariant violated: %s", exc)

    def _after_pass(self, result: PassResult, now: float) -> None:
        self._num_passes += 1
        if self._check_every and self._num_passes % self._check_every == 0:
            self._check_invariants()
        if result.events:
            self._publish(result.events)
        if not result.did_work:
            deadline = self.scheduler.next_deadline_ms(now)
            # Nothing moved: wait for a message (new request, offload ack) or the deadline. A
            # deadline at or before now (an instant transfer started by this very pass) means
            # "run again now": the next tick lands it. `_idle_pass` keeps that from spinning.
            self._next_pass_ms = math.inf if deadline is None else max(deadline, now)
            self._idle_pass = True
            return
        self._next_pass_ms = result.end_ms
        self._idle_pass = False
        if _has_records(result):
            self._pending.append(_pass_record(result))
            if result.completions or result.rejections:
                self._urgent = True
        elif result.num_decode_tokens:
            self._pending_decode.append(result.end_ms - result.prev_end_ms)
            self._pending_decode.append(result.num_decode_tokens)
        else:
            return  # nothing to account (e.g. a prefill chunk that emitted no token)
        self._count_pending(time.monotonic())

    def _account_run(self, run: DecodeRun, wall_s: float) -> None:
        """A stretch of steady decode passes (`run_decode_passes`): what `_after_pass` does
        for each of them (no invariant checks: the caller runs stretches only without them),
        in bulk: their events published in pass order (one batch per pass that has some),
        one ITL pair per pass (`_decode_pairs`), every pass counted towards RESULTS."""
        ends = run.ends_ms
        num_passes = len(ends)
        self._num_passes += num_passes
        for _index, events in run.events:
            self._publish(events)
        self._next_pass_ms = ends[-1]
        self._idle_pass = False
        self._pending_decode.extend(_decode_pairs(run))
        self._count_pending(wall_s, num_passes)

    def _count_pending(self, wall_s: float, num_passes: int = 1) -> None:
        """`num_passes` more passes await the next RESULTS message (`wall_s`: about now)."""
        if not self._num_pending:
            self._pending_since = wall_s
        self._num_pending += num_passes
        if self._num_pending >= RESULTS_MAX_PASSES:
            self._urgent = True

    def _maybe_flush_results(self, *, force: bool) -> None:
        """Send the pending pass records (one RESULTS message) when forced, when the oldest
        waited RESULTS_MAX_DELAY_S, or at RESULTS_MAX_PASSES."""
        if not self._num_pending:
            return
        if (
            not force
            and self._num_pending < RESULTS_MAX_PASSES
            and time.monotonic() - self._pending_since < RESULTS_MAX_DELAY_S
        ):
            return
        scheduler = self.scheduler
        manager = scheduler.manager
        pub = self.publisher
        self._send(
            tp.RESULTS,
            {
                "rank": self.spec.rank,
                "epoch": self.spec.epoch,
                "passes": self._pending,
                "decode": self._pending_decode,
                "running": scheduler.num_running,
                "waiting": scheduler.num_waiting,
                "active_blocks": manager.num_active_blocks(),
                "num_gpu_blocks": manager.max_capacity,
                "preemptions_total": scheduler.num_preemptions_total,
                "next_event_seq": pub.next_seq if pub else 0,
                "violations": self.total_violations(),
                "g2_onboard_blocks": self._onboarded_blocks(),
            },
        )
        self._pending = []
        self._pending_decode = []
        self._num_pending = 0
        self._urgent = False
        self._report_by_s = 0.0

    def debug_state(self) -> dict[str, Any]:
        """What a stalled rank is waiting for (answer to PING)."""
        scheduler = self.scheduler
        manager = scheduler.manager
        waiting = list(getattr(scheduler, "_waiting", []))
        head = waiting[0] if waiting else None
        client = self._offload
        return {
            "rank": self.spec.rank,
            "running": scheduler.num_running,
            "waiting": len(waiting),
            "swap_ins": len(getattr(scheduler, "_swap_ins", [])),
            "has_work": scheduler.has_work(),
            "now_ms": self.clock.now_ms(),
            "next_pass_ms": tp.encode_float(self._next_pass_ms),
            "deadline_ms": tp.encode_float(manager.earliest_offload_deadline() or math.inf),
            "active_blocks": manager.num_active_blocks(),
            "free_blocks": manager.num_free_blocks(),
            "quarantined": manager.num_quarantined_blocks,
            "head_blocked_until_ms": None
            if head is None
            else tp.encode_float(head.blocked_until_ms),
            "head_known_blocks": None if head is None else head.seq.current_known_blocks(),
            "client": asdict(client.stats()) if isinstance(client, SharedG2Client) else None,
            "client_debug": client.debug_state() if isinstance(client, SharedG2Client) else None,
        }

    def total_violations(self) -> int:
        """G1 invariant failures plus pinned G2 slots found evicted or reused."""
        engine = self._offload
        pins = engine.stats().pin_violations if isinstance(engine, SharedG2Client) else 0
        return self.num_violations + pins

    def _onboarded_blocks(self) -> int:
        engine = self._offload
        if isinstance(engine, SharedG2Client):
            return engine.stats().onboard_blocks
        if isinstance(engine, LocalG2Engine):
            return engine.num_onboarded
        return 0

    # ── supervisor messages ───────────────────────────────────────────────────────────────

    def _flush_channel(self) -> None:
        try:
            self._chan.flush()
        except (BrokenWorkerError, ClosedError) as exc:
            self._supervisor_gone(exc)

    def _drain_supervisor(self) -> None:
        """Handle every message the supervisor has sent so far. Its end closed (it died) or
        a broken stream stops the rank."""
        try:
            messages = self._chan.receive()
        except (BrokenWorkerError, ClosedError) as exc:
            self._supervisor_gone(exc)
            return
        except ProtocolError as exc:  # the stream cannot be trusted after it
            self._num_bad_messages += 1
            self._supervisor_gone(exc)
            return
        for frames in messages:
            try:
                self._handle(tp.decode(frames))
            except ProtocolError as exc:
                self._num_bad_messages += 1
                logger.warning("rank %d: dropped a malformed message: %s", self.spec.rank, exc)

    def _handle(self, msg: tp.Message) -> None:
        if msg.type == tp.SUBMIT:
            self._serving = not self._draining
            for request_id, arrival_ms, max_output, tokens in _submitted(msg):
                self.scheduler.submit(request_id, tokens, max_output, arrival_ms)
            self._next_pass_ms = min(self._next_pass_ms, self.clock.now_ms())
        elif msg.type == tp.DRAIN:
            self._serving = False
            self._draining = True
            self._drained_sent = False
            self._next_pass_ms = min(self._next_pass_ms, self.clock.now_ms())
        elif msg.type == tp.STATE:
            self._report_state()
        elif msg.type == tp.STOP:
            self._stopping = True
        elif msg.type == tp.PING:
            self._send(tp.PONG, self.debug_state())
        else:
            raise ProtocolError(f"unexpected message {msg.type!r} from the supervisor")

    def _report_state(self) -> None:
        """Publish what is left (late host-tier events), flush, and say what G1 holds."""
        scheduler = self.scheduler
        manager = scheduler.manager
        client = self._offload
        if isinstance(client, SharedG2Client) and not client.wait_for_fence(FENCE_TIMEOUT_S):
            logger.warning("rank %d: no fence from the G2 coordinator", self.spec.rank)
        if manager.has_offload_engine():
            manager.tick_offload_engine(self.clock.now_ms())
            self._publish(manager.take_events())
        if self.publisher is not None:
            self.publisher.flush(timeout_s=5.0)
        engine = self._offload
        host: list[int] = []  # the host blocks this rank announced: what its stream says
        if isinstance(engine, LocalG2Engine):
            host = sorted(engine.held_seq_hashes())
        elif isinstance(engine, SharedG2Client):
            host = sorted(engine.announced_seq_hashes())
        body: dict[str, Any] = {"rank": self.spec.rank}
        device = manager.registered_seq_hashes()
        frames: tuple[bytes, ...] = ()
        try:  # thousands of u64 hashes: a raw frame, far cheaper than JSON numbers both ways
            packed = array("Q", device)
        except OverflowError:  # a hash outside u64 (not ours): the JSON list
            body["device"] = sorted(device)
        else:  # sorted as u64 (= as ints), in numpy: ~5x cheaper than `sorted` on 8 k hashes
            frames = (np.sort(np.frombuffer(packed, dtype=np.uint64)).tobytes(),)
            body["device_packed"] = True
        self._send(
            tp.STATE,
            {
                **body,
                "host_pinned": host,
                "next_event_seq": self.publisher.next_seq if self.publisher else 0,
                "passes": self._num_passes,
                "bad_messages": self._num_bad_messages,
                "idle_s": self.idle_s,
                "violations": self.total_violations(),
                "violation_examples": self.violations,
            },
            frames,
        )


def _tune_gc() -> None:
    """Before the rank's loop: its start-up objects (modules, config, sockets, the scheduler's
    pools) move to the collector's permanent generation, and young collections run every
    RANK_GC_THRESHOLD allocations. At 700 a W1 rank at speedup inf ran ~25 collections
    (~10 ms of its ~130 ms CPU); its passes make little cyclic garbage, so the wait only
    delays what there is."""
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(RANK_GC_THRESHOLD, gen1, gen2)


def rank_main(spec_json: str) -> int:
    """Entry point of a rank process (see workers/rank_worker.py)."""
    spec = RankSpec.from_json(spec_json)
    logging.basicConfig(
        level=os.environ.get("SHMKV_LOG_LEVEL", "WARNING"),
        format=f"%(levelname)s rank{spec.rank}[%(process)d] %(name)s: %(message)s",
    )
    with RankEngine(spec) as engine:
        _tune_gc()
        if os.environ.get("SHMKV_PROFILE_DIR"):
            import cProfile

            # SHMKV_PROFILE_CPU=1: this thread's CPU time (a loaded machine inflates wall time)
            timer = time.thread_time if os.environ.get("SHMKV_PROFILE_CPU") else time.perf_counter
            prof = cProfile.Profile(timer)
            code = prof.runcall(engine.run)
            prof.dump_stats(f"{os.environ['SHMKV_PROFILE_DIR']}/rank{spec.rank}.prof")
            return code
        return engine.run()
