"""The live fleet end to end: real rank processes, real sockets, the reference consumer."""

from __future__ import annotations

import math
import os
import signal

import psutil
import pytest

from shmkv.config import EngineConfig
from shmkv.consumer import EventConsumer, RankEndpoint
from shmkv.engine import EventSpec
from shmkv.fleet import Fleet, FleetOptions, FleetOutcome
from shmkv.transport import free_port_base
from shmkv.workload import synthetic_sessions

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(180)]


def run_with_consumer(
    options: FleetOptions, codec: str, request_count: int, **run_kwargs: object
) -> tuple[FleetOutcome, EventConsumer]:
    sessions = synthetic_sessions(
        input_tokens=128,
        output_tokens=8,
        request_count=request_count,
        shared_prefix_ratio=0.5,
        num_prefix_groups=3,
        block_size=16,
    )
    with Fleet(options) as fleet:
        fleet.start()
        endpoints = [
            RankEndpoint(
                rank=r, endpoint=info["events_endpoint"], replay_endpoint=info["replay_endpoint"]
            )
            for r, info in enumerate(fleet.rank_endpoints())
        ]
        consumer = EventConsumer(endpoints, codec=codec, block_size=16, replay_timeout_s=2.0)
        try:
            outcome = fleet.run(sessions, **run_kwargs)  # type: ignore[arg-type]
            consumer.drain()
        except BaseException:
            consumer.close()
            raise
    return outcome, consumer


def options_for(fleet_id: str, codec: str, **overrides: object) -> FleetOptions:
    base, replay = free_port_base(2), free_port_base(2)
    fields: dict[str, object] = {
        "engine": EngineConfig(num_gpu_blocks=96, block_size=16, speedup_ratio=math.inf),
        "data_parallel_size": 2,
        "replay_concurrency": 6,
        "events": EventSpec(
            codec=codec,
            endpoint=f"tcp://127.0.0.1:{base}",
            replay_endpoint=f"tcp://127.0.0.1:{replay}",
        ),
        "fleet_id": fleet_id,
    }
    fields.update(overrides)
    return FleetOptions(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", ["json", "vllm"])
def test_consumer_index_equals_the_state_dump(fleet_id: str, codec: str) -> None:
    outcome, consumer = run_with_consumer(options_for(fleet_id, codec), codec, 60)
    with consumer:
        assert outcome.collector.num_completed == 60
        assert outcome.state is not None
        assert consumer.compare(outcome.state) == []
        stats = consumer.stats()
        assert stats["lost_batches"] == 0
        assert stats["orphan_stores"] == 0, "every parent was announced on its rank first"
        assert stats["blocks_stored"] > 0
        assert stats["blocks_removed"] > 0, "the small G1 pool evicted blocks"


def test_rank_killed_mid_run_is_restarted_and_its_stream_continues(fleet_id: str) -> None:
    options = options_for(fleet_id, "json")
    killed: list[int] = []
    holder: dict[str, Fleet] = {}

    def on_progress(_count: int) -> None:
        fleet = holder.get("fleet")
        # kill rank 1 once it has published something (else no AllBlocksCleared is owed)
        if fleet is not None and not killed and fleet.status[1].next_event_seq > 0:
            pid = fleet.rank_pid(1)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    sessions = synthetic_sessions(
        input_tokens=128, output_tokens=16, request_count=80, block_size=16
    )
    with Fleet(options) as fleet:
        holder["fleet"] = fleet
        fleet.start()
        endpoints = [
            RankEndpoint(
                rank=r, endpoint=info["events_endpoint"], replay_endpoint=info["replay_endpoint"]
            )
            for r, info in enumerate(fleet.rank_endpoints())
        ]
        with EventConsumer(
            endpoints, codec="json", block_size=16, replay_timeout_s=2.0
        ) as consumer:
            outcome = fleet.run(sessions, on_progress=on_progress)
            consumer.drain()
            assert killed
            assert outcome.num_rank_restarts == 1
            assert outcome.collector.num_completed + outcome.num_failed == 80
            assert outcome.state is not None
            assert consumer.compare(outcome.state) == []
            assert consumer.rank_stats()[1]["clears"] >= 1, (
                "the restarted rank opened with AllBlocksCleared"
            )
            assert consumer.stats()["duplicates"] == 0, (
                "a restarted publisher never rewinds its seq"
            )
            assert consumer.stats()["orphan_stores"] == 0


def _unix_sockets(pid: int) -> int:
    return len(psutil.Process(pid).net_connections(kind="unix"))


def test_a_restarted_rank_gets_a_fresh_channel_and_no_descriptor_leaks(fleet_id: str) -> None:
    """Each rank talks to the supervisor over its own socket pair (no other process holds an
    end: a rank's death is an EOF at once); a restarted rank gets a new pair, the old one is
    closed, and nothing is left open after the fleet."""
    fds_before = len(os.listdir("/proc/self/fd"))
    options = options_for(fleet_id, "json", events=None)
    sessions = synthetic_sessions(input_tokens=64, output_tokens=16, request_count=60)
    killed: list[int] = []
    holder: dict[str, Fleet] = {}

    def on_progress(_count: int) -> None:
        fleet = holder["fleet"]
        if not killed:
            killed.append(fleet.rank_pid(0))
            os.kill(killed[0], signal.SIGKILL)

    with Fleet(options) as fleet:
        holder["fleet"] = fleet
        fleet.start()
        # a rank's only unix socket is its end of its channel (none of the other rank's)
        assert [_unix_sockets(fleet.rank_pid(r)) for r in (0, 1)] == [1, 1]
        outcome = fleet.run(sessions, on_progress=on_progress)
        assert outcome.num_rank_restarts == 1
        assert outcome.collector.num_completed + outcome.num_failed == 60
        assert fleet.rank_pid(0) != killed[0]
        assert _unix_sockets(fleet.rank_pid(0)) == 1
        assert len(fleet._channel_procs) == 2, "the dead rank's channel was closed"
        for fd, proc in fleet._channel_procs.items():
            assert proc.channel is not None
            assert proc.channel.fileno() == fd
    assert not fleet._channel_procs
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_no_restart_stops_with_a_clear_error(fleet_id: str) -> None:
    from shmkv.errors import BrokenWorkerError

    options = options_for(fleet_id, "json", no_restart=True, events=None)
    sessions = synthetic_sessions(
        input_tokens=64, output_tokens=64, request_count=200, block_size=16
    )
    with Fleet(options) as fleet:
        fleet.start()
        target = fleet.rank_pid(0)

        def on_progress(_count: int) -> None:
            if target:
                os.kill(target, signal.SIGKILL)

        with pytest.raises(BrokenWorkerError, match="rank 0"):
            fleet.run(sessions, on_progress=on_progress)


def test_serve_answers_external_requests(fleet_id: str) -> None:
    import json
    import threading

    import zmq

    from shmkv.fleet import ServeDriver

    options = options_for(fleet_id, "json", events=None, data_parallel_size=1)
    replies: list[dict[str, object]] = []
    with Fleet(options) as fleet:
        fleet.start()
        driver = ServeDriver(fleet, "tcp://127.0.0.1:0", 16)

        def client() -> None:
            ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(driver.endpoint)
            try:
                for body in [
                    {"id": 0, "prompt_tokens": 64, "max_tokens": 3},
                    {"tokens": [1, 2]},
                    {"id": 2, "tokens": list(range(40)), "max_tokens": 2},
                ]:
                    sock.send(json.dumps(body).encode())
                    if sock.poll(20_000):
                        replies.append(json.loads(sock.recv()))
            finally:
                sock.close()
                ctx.term()
                driver.stopped = True

        thread = threading.Thread(target=client)
        thread.start()
        try:
            outcome = fleet.run([], driver=driver)
        finally:
            thread.join(30)
            driver.close()
    assert [r.get("id") for r in replies] == [0, None, 2]
    assert replies[0]["output_tokens"] == 3
    assert "error" in replies[1]
    assert replies[2]["output_tokens"] == 2
    assert outcome.collector.num_completed == 2


@pytest.mark.parametrize("codec", ["json", "vllm"])
def test_four_ranks_with_a_shared_g2_rebuild_the_dump(fleet_id: str, codec: str) -> None:
    engine = EngineConfig(
        num_gpu_blocks=40,
        block_size=16,
        speedup_ratio=math.inf,
        num_g2_blocks=192,
        kv_bytes_per_token=1 << 14,
    )
    base, replay = free_port_base(4), free_port_base(4)
    options = FleetOptions(
        engine=engine,
        data_parallel_size=4,
        replay_concurrency=8,
        router_mode="round_robin",
        events=EventSpec(
            codec=codec,
            endpoint=f"tcp://127.0.0.1:{base}",
            replay_endpoint=f"tcp://127.0.0.1:{replay}",
        ),
        fleet_id=fleet_id,
    )
    outcome, consumer = run_with_consumer(options, codec, 160)
    with consumer:
        assert outcome.collector.num_completed == 160
        assert outcome.state is not None
        assert consumer.compare(outcome.state) == []
        stats = consumer.stats()
        assert stats["lost_batches"] == 0
        # Every rank republishes the shared pool's host tier, a block only after its parent
        # (same rank, same tier), and a swap-in holds its G1 prefix until the onboarded run
        # is registered behind it: no orphan in any tier, no host block off another tier.
        assert (stats["orphan_stores"], stats["cross_tier_parents_host"]) == (0, 0)
        host = outcome.state["ranks"]["0"]["host_pinned"]
        assert host, "evicted G1 blocks were offloaded into the shared G2 and announced"
        # What a rank announces depends only on what the pool holds (every held block whose
        # parent chain is held), so every rank reports the same host tier.
        assert all(outcome.state["ranks"][str(r)]["host_pinned"] == host for r in range(4))
        assert len(host) <= outcome.g2_stats["ready"]
        assert outcome.g2_stats["offloaded"] > 0
        assert outcome.g2_stats["deduped"] > 0, "ranks offloading the same prefix store it once"


def test_instant_swap_ins_under_g1_pressure_never_park_a_rank(fleet_id: str) -> None:
    """Regression: at speedup inf an onboard completes at the very time it starts; the rank
    must run the next pass that lands it instead of waiting forever."""
    engine = EngineConfig(
        num_gpu_blocks=128,
        block_size=16,
        speedup_ratio=math.inf,
        num_g2_blocks=1024,
        kv_bytes_per_token=1 << 16,
    )
    options = FleetOptions(
        engine=engine, data_parallel_size=4, replay_concurrency=16, max_wall_s=90, fleet_id=fleet_id
    )
    sessions = synthetic_sessions(
        input_tokens=512,
        output_tokens=16,
        request_count=240,
        shared_prefix_ratio=0.5,
        num_prefix_groups=8,
        block_size=16,
    )
    with Fleet(options) as fleet:
        outcome = fleet.run(sessions)
    assert not outcome.stalled
    assert outcome.collector.num_completed == 240
    assert sum(s.g2_onboard_blocks for s in outcome.rank_status) > 0, "swap-ins happened"


def test_metrics_endpoint_exposes_rank_and_g2_figures(fleet_id: str) -> None:
    import urllib.request

    engine = EngineConfig(
        num_gpu_blocks=64,
        block_size=16,
        speedup_ratio=math.inf,
        num_g2_blocks=128,
        kv_bytes_per_token=1 << 12,
    )
    options = FleetOptions(
        engine=engine, data_parallel_size=2, replay_concurrency=4, metrics_port=0, fleet_id=fleet_id
    )
    sessions = synthetic_sessions(
        input_tokens=256, output_tokens=8, request_count=40, block_size=16
    )
    with Fleet(options) as fleet:
        fleet.run(sessions)
        server = fleet._metrics
        assert server is not None
        assert server.host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    for name in (
        'vllm:num_requests_running{dp_rank="0"}',
        'vllm:num_requests_waiting{dp_rank="1"}',
        'vllm:gpu_cache_usage_perc{dp_rank="0"}',
        'vllm:num_preemptions_total{dp_rank="1"}',
        "shmkv:g2_capacity 128.0",
        "shmkv:g2_offloaded",
        "shmkv:g2_dropped",
        "shmkv:g2_pins_total",
    ):
        assert name in text, name
