"""The live fleet's CPU economy: a supervisor and ranks that block instead of spinning, and
RESULTS that carry plain decode passes compactly (issue 5, fleet scaling)."""

from __future__ import annotations

import math
import select
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
import zmq

from shmkv import transport as tp
from shmkv.channel import Channel, child_endpoint
from shmkv.config import EngineConfig
from shmkv.engine import IDLE_POLL_MS, RankEngine, RankSpec, _submitted
from shmkv.errors import ProtocolError
from shmkv.fleet import Fleet, FleetOptions, _Proc, _unpacked_state
from shmkv.report import MetricsCollector
from shmkv.scheduler import PassResult
from shmkv.workload import synthetic_sessions

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(120)]


@pytest.fixture
def pair_sockets(tmp_path: Path) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """A connected PAIR of sockets over ipc: (sender, receiver), closed after the test."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    receiver = ctx.socket(zmq.PAIR)
    sender = ctx.socket(zmq.PAIR)
    try:
        receiver.bind(f"ipc://{tmp_path}/pair")
        sender.connect(f"ipc://{tmp_path}/pair")
        yield sender, receiver
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
        ctx.term()


def _recv_all(channel: Channel, count: int, timeout_s: float = 5.0) -> list[tp.Message]:
    """The next `count` messages a rank sent to its supervisor's end of the channel."""
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout_s
    got: list[tp.Message] = []
    while True:
        got.extend(tp.decode(frames) for frames in channel.receive())
        if len(got) >= count:
            break
        left_ms = (deadline - time.monotonic()) * 1000.0
        assert left_ms > 0, f"{len(got)} of {count} messages from the rank"
        poller.poll(left_ms)
    assert len(got) == count
    return got


def _recv(channel: Channel) -> tp.Message:
    """The next message a rank sent to its supervisor's end of the channel."""
    return _recv_all(channel, 1)[0]


def _rank_spec(endpoint: str, engine: EngineConfig) -> RankSpec:
    return RankSpec(
        rank=0,
        fleet_id="perf",
        engine={name: getattr(engine, name) for name in EngineConfig.field_names()},
        supervisor_endpoint=endpoint,
        start_monotonic_s=time.monotonic(),
    )


@contextmanager
def _rank_and_supervisor(engine: EngineConfig) -> Iterator[tuple[RankEngine, Channel]]:
    """A rank in this process and the supervisor's end of its channel (both closed after)."""
    supervisor, child = Channel.pair()
    # the rank owns the child's descriptor from now on (as a rank process does)
    with supervisor, RankEngine(_rank_spec(child_endpoint(child.detach()), engine)) as rank:
        yield rank, supervisor


_INF_ENGINE = EngineConfig(num_gpu_blocks=64, block_size=16, speedup_ratio=math.inf)


@contextmanager
def _inf_rank_and_supervisor() -> Iterator[tuple[RankEngine, Channel]]:
    """A rank with a 64-block G1 whose clock never waits (speedup inf), and the supervisor's
    end of its channel."""
    with _rank_and_supervisor(_INF_ENGINE) as pair:
        yield pair


@contextmanager
def _inf_rank() -> Iterator[RankEngine]:
    with _rank_and_supervisor(_INF_ENGINE) as (rank, _supervisor):
        yield rank


def _urgent(rank: RankEngine) -> bool:
    """Read through a call, so that mypy does not narrow the flag between steps."""
    return rank._urgent


def _pass(**fields: object) -> PassResult:
    base: dict[str, object] = {"start_ms": 10.0, "end_ms": 12.5, "did_work": True}
    base.update(fields)
    return PassResult(**base)  # type: ignore[arg-type]


def test_a_never_sleeping_rank_blocks_until_a_future_pass() -> None:
    """At speedup inf simulated time is wall time: a pass due in 500 ms is waited for in
    poll (it used to be polled for with a zero timeout, spinning a core)."""
    with _inf_rank() as rank:
        assert rank._poll_timeout_ms() == IDLE_POLL_MS  # no work: wait for a message
        rank.scheduler.submit(1, array("I", range(32)), 4, 0.0)
        rank._next_pass_ms = rank.clock.now_ms() + 500.0
        assert 100 <= rank._poll_timeout_ms() <= IDLE_POLL_MS
        rank._next_pass_ms = rank.clock.now_ms()
        assert rank._poll_timeout_ms() == 0  # due now: run it


def test_plain_decode_passes_travel_compactly_and_completions_go_at_once() -> None:
    with _inf_rank_and_supervisor() as (rank, supervisor):
        rank._after_pass(_pass(num_decode_tokens=7, prev_end_ms=12.0), 10.0)
        rank._after_pass(_pass(first_tokens=[3]), 10.0)  # a record, no hurry
        rank._after_pass(_pass(), 10.0)  # nothing to account: no record at all
        assert rank._num_pending == 2
        assert not _urgent(rank)
        rank._maybe_flush_results(force=False)
        assert rank._num_pending == 2, "not due yet: nothing sent"
        rank._after_pass(_pass(completions=[[3, 4]]), 10.0)
        assert _urgent(rank), "a completion releases the next request: report it now"
        rank._maybe_flush_results(force=_urgent(rank))
        assert rank._num_pending == 0
        assert not _urgent(rank)
        msg = _recv(supervisor)
        assert msg.type == tp.RESULTS
        assert msg.body["decode"] == [0.5, 7]
        assert [record[4] for record in msg.body["passes"]] == [[3], []]
        assert msg.body["passes"][1][8] == [[3, 4]]


def test_a_fleet_at_inf_accounts_every_token(fleet_id: str) -> None:
    """Plain decode passes arrive as ITL pairs: every non-first token is one ITL sample."""
    sessions = synthetic_sessions(input_tokens=64, output_tokens=40, request_count=24)
    options = FleetOptions(
        engine=EngineConfig(num_gpu_blocks=256, block_size=16, speedup_ratio=math.inf),
        data_parallel_size=2,
        replay_concurrency=8,
        fleet_id=fleet_id,
    )
    with Fleet(options) as fleet:
        outcome = fleet.run(sessions)
    report = outcome.collector.build_report(wall_time_ms=outcome.wall_time_ms)
    assert report["completed_requests"] == 24
    assert report["total_output_tokens"] == 24 * 40
    assert sum(outcome.collector._itl_counts) == 24 * 39
    # the run's own figures: at least a SUBMIT per rank and a DRAIN and a STATE per rank
    # sent; at least a RESULTS, a DRAIN and a STATE per rank received
    assert outcome.num_messages_sent >= 2 * 3
    assert outcome.num_messages_received >= 2 * 3
    assert 0.0 < outcome.drain_wall_ms < outcome.wall_time_ms
    # each rank's wait for requests, measured between its first SUBMIT and DRAIN
    for status in outcome.rank_status:
        assert 0.0 <= status.idle_s < outcome.wall_time_ms / 1000.0


def _serving(rank: RankEngine) -> bool:
    """Read through a call, so that mypy does not narrow the flag between messages."""
    return rank._serving


def test_a_rank_counts_its_idle_time_only_while_serving() -> None:
    """`idle_s` (in STATE) covers the span from the first SUBMIT to DRAIN: the wait for
    requests before the run and after it is not starvation."""
    with _inf_rank() as rank:
        assert not _serving(rank), "before the first SUBMIT: not serving yet"
        rank._handle(_submit_message([[1, 0.0, 2, 3]], (array("I", [1, 2, 3]).tobytes(),)))
        assert _serving(rank)
        rank._handle(tp.decode(tp.encode(tp.DRAIN)))
        assert not _serving(rank)
        assert rank.idle_s == 0.0


def test_the_supervisor_and_an_idle_rank_block_while_the_next_arrival_is_due(
    fleet_id: str,
) -> None:
    """Open loop at speedup inf, arrivals 800 ms apart: between them nobody spins."""
    sessions = synthetic_sessions(
        input_tokens=32, output_tokens=4, request_count=2, arrival_interval_ms=800.0
    )
    options = FleetOptions(
        engine=EngineConfig(num_gpu_blocks=64, block_size=16, speedup_ratio=math.inf),
        data_parallel_size=1,
        replay_concurrency=None,
        fleet_id=fleet_id,
    )
    with Fleet(options) as fleet:
        fleet.start()
        # the fleet's clock started before the processes did: arrivals from now on
        offset_ms = fleet.clock.now_ms() + 100.0
        sessions = [
            replace(
                s,
                first_arrival_ms=s.first_arrival_ms + offset_ms,
                turns=[replace(t, arrival_ms=t.arrival_ms + offset_ms) for t in s.turns],
            )
            for s in sessions
        ]
        rank = psutil.Process(fleet.rank_pid(0))
        rank_before = sum(rank.cpu_times()[:2])
        cpu_before = time.thread_time()
        wall_before = time.monotonic()
        outcome = fleet.run(sessions)
        supervisor_cpu_s = time.thread_time() - cpu_before
        wall_s = time.monotonic() - wall_before
        rank_cpu_s = sum(rank.cpu_times()[:2]) - rank_before
    assert outcome.collector.num_completed == 2
    assert wall_s >= 0.75, "the second request waited for its arrival time"
    # between the two requests the rank held none: idle, as its STATE says
    assert 0.5 <= outcome.rank_status[0].idle_s < wall_s
    assert supervisor_cpu_s < 0.3 * wall_s, f"supervisor busy {supervisor_cpu_s:.2f} s"
    assert rank_cpu_s < 0.3 * wall_s, f"rank busy {rank_cpu_s:.2f} s"


def _submit_message(requests: list[list[object]], frames: tuple[bytes, ...]) -> tp.Message:
    return tp.decode(tp.encode(tp.SUBMIT, {"requests": requests}, frames))


def test_a_submit_carries_every_request_s_tokens_in_one_frame() -> None:
    first, second = array("I", range(5)), array("I", [7, 8])
    msg = _submit_message([[3, 1.5, 4, 5], [9, 2, 1, 2]], (first.tobytes() + second.tobytes(),))
    assert _submitted(msg) == [(3, 1.5, 4, first), (9, 2.0, 1, second)]


@pytest.mark.parametrize(
    ("requests", "frames"),
    [
        ([[3, 1.5, 4, 5]], (array("I", range(4)).tobytes(),)),  # too few tokens
        ([[3, 1.5, 4, 3]], (array("I", range(4)).tobytes(),)),  # tokens left over
        ([[3, 1.5, 4, -1]], (b"",)),  # a negative count
        ([[3, 1.5, 4]], (b"",)),  # the old form: no token count
        ([[3, "x", 4, 0]], (b"",)),  # not a number
        ([[3.0, 1.5, 4, 0]], (b"",)),  # a float id
        ([[3, 1.5, True, 0]], (b"",)),  # a bool max_output
        ([[3, 1.5, 4, 1]], (b"abc",)),  # not whole u32
        ([[3, 1.5, 4, 0]], ()),  # no tokens frame
        ([[3, 1.5, 4, 0]], (b"", b"")),  # two frames
    ],
)
def test_a_malformed_submit_is_rejected_whole(
    requests: list[list[object]], frames: tuple[bytes, ...]
) -> None:
    with pytest.raises(ProtocolError):
        _submitted(_submit_message(requests, frames))


def test_a_malformed_submit_submits_nothing() -> None:
    """Validated as a whole: a bad second request leaves the first one out too."""
    with _inf_rank() as rank:
        msg = _submit_message([[1, 0.0, 4, 2], [2, 0.0, 4, 5]], (array("I", [1, 2]).tobytes(),))
        with pytest.raises(ProtocolError):
            rank._handle(msg)
        assert not rank.scheduler.has_work()


def test_a_burst_accounts_plain_decode_passes_like_after_pass() -> None:
    """The burst's inline accounting of plain decode passes: ITL pairs (one per pass, or one
    per zero-time stretch), every non-first token counted once, the rest in full pass
    records."""
    engine = EngineConfig(num_gpu_blocks=256, block_size=16, speedup_ratio=math.inf)
    with _rank_and_supervisor(engine) as (rank, _supervisor):
        for request_id in range(4):
            rank.scheduler.submit(request_id, array("I", range(40 + request_id)), 20, 0.0)
        while rank.scheduler.has_work():
            rank._run_burst(rank.clock.now_ms())
            rank._urgent = False
        records = rank._pending
        decode = rank._pending_decode
        plain_tokens = sum(int(n) for n in decode[1::2])
        record_tokens = sum(int(r[6]) for r in records) + sum(len(r[7]) for r in records)
        assert sum(len(r[4]) for r in records) == 4  # first tokens
        # every token but the first of each request is an ITL sample: 4 x 19
        assert plain_tokens + record_tokens == 4 * 19
        assert plain_tokens > 0
        # a pass is a record or (plain decode) an ITL pair; zero-time passes of one stretch
        # share a pair (`_decode_pairs`)
        assert len(records) + len(decode) // 2 <= rank._num_pending <= rank._num_passes
        assert sorted(c[0] for r in records for c in r[8]) == [0, 1, 2, 3]


def test_send_frames_sends_one_multipart_message(
    pair_sockets: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    sender, receiver = pair_sockets
    frames = tp.encode(tp.SUBMIT, {"requests": []}, (b"",))
    tp.send_frames(sender, frames)
    tp.send_frames(sender, [b"single"])
    shared = zmq.Frame(b"x" * 20_000, copy=True)  # sent twice without a copy
    tp.send_frames(sender, [b"head", shared])
    tp.send_frames(sender, [b"head", shared])
    assert receiver.poll(5000)
    assert receiver.recv_multipart() == frames
    assert receiver.recv_multipart() == [b"single"]
    assert receiver.recv_multipart() == [b"head", b"x" * 20_000]
    assert receiver.recv_multipart() == [b"head", b"x" * 20_000]


def test_a_rank_s_state_carries_its_device_hashes_in_one_frame() -> None:
    hashes = [1, 2**63 + 5, 2**64 - 1]
    packed = tp.decode(
        tp.encode(tp.STATE, {"rank": 0, "device_packed": True}, (array("Q", hashes).tobytes(),))
    )
    assert _unpacked_state(packed)["device"] == hashes
    plain = tp.decode(tp.encode(tp.STATE, {"host_pinned": [4]}))  # the coordinator's form
    assert _unpacked_state(plain) == {"host_pinned": [4]}
    for frames in [(), (b"1234567",), (b"", b"")]:
        with pytest.raises(ProtocolError):
            _unpacked_state(tp.decode(tp.encode(tp.STATE, {"device_packed": True}, frames)))


def _completion_passes(rank: RankEngine) -> list[list[int]]:
    """The request ids completed by each pending pass record that has completions."""
    return [[c[0] for c in record[8]] for record in rank._pending if record[8]]


def _submit_staggered(rank: RankEngine) -> None:
    """Four requests that end on four different passes (1, 2, 3 and 4 output tokens)."""
    for request_id in range(4):
        rank.scheduler.submit(request_id, array("I", range(32)), request_id + 1, 0.0)


def test_a_burst_reports_the_completions_of_the_next_passes_together() -> None:
    """A completion no longer ends the burst at once: the rank runs on (for up to
    RESULTS_COALESCE_S) while it has work, so completions of consecutive passes travel in
    one RESULTS and come back as one SUBMIT."""
    with _inf_rank() as rank:
        rank._burst_s = rank._coalesce_s = 3600.0  # no clock decides in this test
        _submit_staggered(rank)
        rank._run_burst(rank.clock.now_ms())
        assert not rank.scheduler.has_work(), "the burst ran until nothing was left"
        assert _urgent(rank)
        assert _completion_passes(rank) == [[0], [1], [2], [3]]


def test_without_a_coalescing_window_a_burst_ends_at_the_first_completion() -> None:
    with _inf_rank() as rank:
        rank._burst_s = 3600.0
        rank._coalesce_s = 0.0
        _submit_staggered(rank)
        rank._run_burst(rank.clock.now_ms())
        assert _urgent(rank)
        assert _completion_passes(rank) == [[0]]
        assert rank.scheduler.has_work()


def test_a_rank_s_state_lists_its_device_hashes_sorted() -> None:
    """STATE's device frame: every hash G1 holds, in ascending order (sorted as u64)."""
    with _inf_rank_and_supervisor() as (rank, supervisor):
        for request_id in range(3):
            tokens = array("I", range(request_id * 1000, request_id * 1000 + 80))
            rank.scheduler.submit(request_id, tokens, 4, 0.0)
        while rank.scheduler.has_work():
            rank._run_burst(rank.clock.now_ms())
        held = rank.scheduler.manager.registered_seq_hashes()
        assert len(held) >= 15
        rank._report_state()
        msg = _recv(supervisor)
        assert msg.type == tp.STATE
        assert msg.body["device_packed"] is True
        assert _unpacked_state(msg)["device"] == sorted(held)


def test_recv_message_takes_one_whole_multipart_message(
    pair_sockets: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    sender, receiver = pair_sockets
    with pytest.raises(zmq.Again):
        tp.recv_message(receiver)  # nothing there yet
    big = bytes(range(256)) * 1024  # over pyzmq's copy threshold
    sender.send_multipart([b"head", b"", big])
    sender.send_multipart([b"single"])
    assert receiver.poll(5000)
    assert tp.recv_message(receiver) == [b"head", b"", big]
    assert receiver.poll(5000)
    assert tp.recv_message(receiver) == [b"single"]
    with pytest.raises(zmq.Again):
        tp.recv_message(receiver)


def test_a_burst_cut_short_keeps_the_coalescing_deadline() -> None:
    """A burst that ends before RESULTS_COALESCE_S is up (a SUBMIT came: the other rank's
    completions release requests to this one) no longer sends the completions at once: they
    wait for the deadline the burst set while the rank has work, and the next burst may add
    more to the same RESULTS. A rank with nothing left to run reports at once."""
    with _inf_rank_and_supervisor() as (rank, supervisor):
        rank._burst_s = 3600.0
        rank._coalesce_s = 0.0  # the first completion ends the burst and sets the deadline
        _submit_staggered(rank)
        rank._run_burst(rank.clock.now_ms())
        assert _urgent(rank)
        assert rank._report_by_s > 0.0
        rank._report_by_s = time.monotonic() + 3600.0  # as if the burst had been cut short
        assert not rank._report_due(rank.scheduler), "work left: wait for the deadline"
        assert rank._poll_timeout_ms() == 0, "the next pass is due now"
        rank._report_by_s = time.monotonic() - 1.0
        assert rank._report_due(rank.scheduler), "the deadline has come"
        rank._maybe_flush_results(force=True)
        assert rank._report_by_s == 0.0
        assert rank._report_due(rank.scheduler), "no deadline set: as before"
        assert _recv(supervisor).type == tp.RESULTS


def test_a_rank_with_nothing_left_reports_its_completions_at_once() -> None:
    with _inf_rank() as rank:
        rank._urgent = True
        rank._report_by_s = time.monotonic() + 3600.0
        assert not rank.scheduler.has_work()
        assert rank._report_due(rank.scheduler)


def test_a_rank_stops_when_its_supervisor_is_gone() -> None:
    """The supervisor's end of the channel closed (it died): the rank's next look at the
    channel stops it, and what it still has to send is dropped without an error."""
    with _inf_rank_and_supervisor() as (rank, supervisor):
        supervisor.send(tp.encode(tp.PING))
        supervisor.close()
        rank._drain_supervisor()  # the PING first: its PONG fails to go, which stops the rank
        assert rank.stop_requested()
        assert rank._num_bad_messages == 0
        rank._send(tp.RESULTS, {"rank": 0})  # no error
        assert rank.run() == 0, "returns at once"


def test_a_rank_answers_over_its_channel_and_stops_on_stop() -> None:
    with _inf_rank_and_supervisor() as (rank, supervisor):
        supervisor.send(tp.encode(tp.PING))
        supervisor.send(tp.encode(tp.STOP))
        assert rank.run() == 0
        ready, pong = _recv_all(supervisor, 2)
        assert ready.type == tp.READY
        assert ready.body["rank"] == 0
        assert pong.type == tp.PONG
        assert pong.body["rank"] == 0


def test_a_dispatch_submits_to_the_rank_holding_the_fewest_requests_first(
    fleet_id: str,
) -> None:
    """Closed loop: the completions that released these requests may have emptied a rank,
    which then waits for its SUBMIT; the busy one looks for its own between passes."""
    options = FleetOptions(
        engine=EngineConfig(num_gpu_blocks=64, block_size=16, speedup_ratio=math.inf),
        data_parallel_size=2,
        fleet_id=fleet_id,
    )
    specs = synthetic_sessions(input_tokens=16, output_tokens=2, request_count=6)
    requests = [session.turns[0] for session in specs]
    with Fleet(options) as fleet:
        fleet.collector = MetricsCollector()
        fleet._rr = 0
        order: list[int] = []

        def send(proc: _Proc, msg_type: str, *_args: object) -> bool:
            order.append(proc.rank)
            return True

        fleet._send = send  # type: ignore[method-assign, assignment]
        for rank in (0, 1):
            fleet._procs[f"rank{rank}".encode()] = _Proc("rank", rank, cast("Any", None))
        fleet.status[0].outstanding = {r.request_id: r for r in requests[4:]}
        try:
            fleet._dispatch([(0.0, r) for r in requests[:2]], 0.0)  # rank 0, then rank 1
            assert order == [1, 0], "rank 1 holds nothing: it goes first"
            fleet.status[0].outstanding.clear()  # now rank 0 holds nothing
            order.clear()
            fleet._dispatch([(0.0, r) for r in requests[2:4]], 0.0)
            assert order == [0, 1]
        finally:
            fleet._procs.clear()


def test_the_supervisor_flushes_a_message_bigger_than_the_socket_buffer(fleet_id: str) -> None:
    """A SUBMIT the socket does not take at once waits in the channel; the supervisor's poll
    asks for POLLOUT on that channel (only while bytes wait) and sends the rest as the rank
    reads. Neither side blocks."""
    options = FleetOptions(
        engine=EngineConfig(num_gpu_blocks=64, block_size=16, speedup_ratio=math.inf),
        data_parallel_size=1,
        fleet_id=fleet_id,
    )
    with Fleet(options) as fleet:
        supervisor_end, child_sock = Channel.pair()
        proc = _Proc("rank", 0, cast("Any", None), channel=supervisor_end)
        fleet._procs[b"rank0"] = proc
        fleet._channel_procs[supervisor_end.fileno()] = proc
        fleet._channels_version += 1
        try:
            with Channel(child_sock) as rank_end:
                tokens = bytes(range(256)) * (32 * 1024)  # 8 MiB
                assert fleet._send(proc, tp.SUBMIT, {"requests": []}, (tokens,))
                assert supervisor_end.wants_write, "more than the socket takes at once"
                fd = supervisor_end.fileno()
                assert (fd, zmq.POLLIN | zmq.POLLOUT) in fleet._poll_items(None)
                got: list[list[bytes]] = []
                deadline = time.monotonic() + 10.0
                while not got and time.monotonic() < deadline:
                    got.extend(rank_end.receive())  # the rank reads: room for more
                    fleet._poll_messages(50)  # POLLOUT: the supervisor sends more
                assert len(got) == 1
                assert tp.decode(got[0]).frames == (tokens,)
                assert supervisor_end.pending_bytes == 0
                assert (fd, zmq.POLLIN) in fleet._poll_items(None)
        finally:
            fleet._close_channel(proc)
            fleet._procs.clear()
