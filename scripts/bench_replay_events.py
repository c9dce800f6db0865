"""What publishing KV events adds to an offline replay: W1 without events, then with events,
median of `--repeats`, each mode's ratio to the run without events.

    .venv/bin/python scripts/bench_replay_events.py [--repeats 3] [--modes none json vllm ...]

Modes:
* `none`: W1 without events.
* `hook`, `hook_tokens`: the simulator produces the events (without / with token ids) and
  hands them to a hook that drops them: what producing events costs, nothing published.
* `json`, `vllm`: every pass published to a live `shmkv events` subscriber (another process,
  full decode and index), as `shmkv replay --zmq-kv-events-port` does; `vllm` with token ids
  (the vLLM wire needs them), `json` without (as before).
* `json_raw`, `vllm_raw`: the same publishing to a subscriber process that only receives and
  checks seqs: the publisher's own cost, without the consumer competing for the CPU.

One JSON line per mode: median wall ms of the replay and its ratio to `none`; median CPU ms of
the replaying process (all its threads) and its ratio to `none` (steadier than wall time on a
shared machine, but blind to the subscriber's share of the cores); the publisher's own share:
CPU ms of the replay thread inside `publish` (encode + send) and of the process's other threads
(ZMQ I/O, replay server); what the subscriber saw (events, gaps, lost batches).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import zmq

from shmkv.codec import make_codec
from shmkv.config import EngineConfig
from shmkv.events import EventBatch, KvEvent
from shmkv.publisher import EventPublisher, PublisherConfig, unpack_seq
from shmkv.replay import ReplayOptions, run_replay
from shmkv.transport import free_port_base
from shmkv.workload import Session, synthetic_sessions

MODES = ("none", "hook", "hook_tokens", "json", "vllm", "json_raw", "vllm_raw")
ENGINE = EngineConfig(num_gpu_blocks=8192, block_size=16)


def _options(tokens: bool) -> ReplayOptions:
    return ReplayOptions(engine=ENGINE, replay_concurrency=32, emit_token_ids=tokens)


class Timing(NamedTuple):
    wall_ms: float
    cpu_ms: float
    """CPU time of the replaying process, every thread (its ZMQ I/O thread included)."""
    publish_cpu_ms: float = 0.0
    """CPU time of the replay's thread inside `EventPublisher.publish` (encode + send)."""
    other_threads_cpu_ms: float = 0.0
    """CPU time of the process's other threads (the ZMQ I/O thread, the replay server)."""


class PublishingHook:
    """The replay's `on_events`: publish each pass's batch, accounting the CPU it takes."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher
        self.cpu_s = 0.0

    def __call__(self, rank: int, _end_ms: float, events: list[KvEvent]) -> None:
        start = time.thread_time()
        self.publisher.publish(EventBatch(ts_s=time.time(), dp_rank=rank, events=events))
        self.cpu_s += time.thread_time() - start


def _timed_replay(
    sessions: list[Session], options: ReplayOptions, on_events: Any | None = None
) -> Timing:
    start_cpu_s = time.process_time()
    start_thread_s = time.thread_time()
    start = time.perf_counter()
    run_replay(sessions, options, on_events=on_events)
    wall_ms = (time.perf_counter() - start) * 1000
    cpu_s = time.process_time() - start_cpu_s
    thread_s = time.thread_time() - start_thread_s
    publish_s = on_events.cpu_s if isinstance(on_events, PublishingHook) else 0.0
    return Timing(wall_ms, cpu_s * 1000, publish_s * 1000, (cpu_s - thread_s) * 1000)


def raw_subscriber(endpoint: str, control: Connection) -> None:
    """Receive until the final seq (sent on `control`); report batches and gaps."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    control.send("ready")
    expected = received = gaps = 0
    final: int | None = None
    while final is None or expected <= final:
        if final is None and control.poll():
            final = control.recv()
            continue
        if sub.poll(20, zmq.POLLIN):
            _topic, seq_frame, _payload = sub.recv_multipart()
            seq = unpack_seq(seq_frame)
            gaps += seq != expected
            expected = seq + 1
            received += 1
    sub.close(linger=0)
    context.term()
    control.send({"batches": received, "gaps": gaps})


def run_raw(sessions: list[Session], codec: str) -> tuple[Timing, dict[str, Any]]:
    config = PublisherConfig(endpoint="tcp://127.0.0.1:0", linger_ms=10_000)
    with EventPublisher(0, make_codec(codec, block_size=16), config) as publisher:
        parent_end, child_end = mp.get_context("spawn").Pipe()
        child = mp.get_context("spawn").Process(
            target=raw_subscriber, args=(publisher.endpoint, child_end), daemon=True
        )
        child.start()
        assert parent_end.recv() == "ready"
        publisher.wait_for_subscribers(1, 30)
        timing = _timed_replay(sessions, _options(codec == "vllm"), PublishingHook(publisher))
        parent_end.send(publisher.next_seq - 1)
        seen = parent_end.recv()
        child.join(timeout=30)
        sent = publisher.next_seq
    return timing, {
        "batches": seen["batches"],
        "gaps": seen["gaps"],
        "lost_batches": sent - seen["batches"],
    }


def run_consumer(sessions: list[Session], codec: str) -> tuple[Timing, dict[str, Any]]:
    port, replay = free_port_base(1), free_port_base(1)
    subscriber = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shmkv",
            "events",
            "--endpoint",
            f"tcp://127.0.0.1:{port}",
            "--replay-endpoint",
            f"tcp://127.0.0.1:{replay}",
            "--codec",
            codec,
            "--until-idle",
            "2",
            "--json",
            "--duration",
            "120",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    config = PublisherConfig(
        endpoint=f"tcp://127.0.0.1:{port}", replay_endpoint=f"tcp://127.0.0.1:{replay}"
    )
    with EventPublisher(0, make_codec(codec, block_size=16), config) as publisher:
        publisher.wait_for_subscribers(1, 30)
        publisher.start_background_replay()
        timing = _timed_replay(sessions, _options(codec == "vllm"), PublishingHook(publisher))
        out, _ = subscriber.communicate(timeout=180)
    seen: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return timing, seen


def run(mode: str) -> tuple[Timing, dict[str, Any]]:
    sessions = synthetic_sessions(input_tokens=1024, output_tokens=128, request_count=1000)
    if mode == "none":
        return _timed_replay(sessions, ReplayOptions(engine=ENGINE, replay_concurrency=32)), {}
    if mode in ("hook", "hook_tokens"):

        def drop(_rank: int, _end_ms: float, _events: list[KvEvent]) -> None:
            return None

        return _timed_replay(sessions, _options(mode == "hook_tokens"), drop), {}
    if mode.endswith("_raw"):
        return run_raw(sessions, mode.removesuffix("_raw"))
    return run_consumer(sessions, mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    modes = ["none", *(mode for mode in args.modes if mode != "none")]
    baseline: Timing | None = None
    for mode in modes:
        runs = [run(mode) for _ in range(args.repeats)]
        wall = statistics.median(r[0].wall_ms for r in runs)
        cpu = statistics.median(r[0].cpu_ms for r in runs)
        publish_cpu = statistics.median(r[0].publish_cpu_ms for r in runs)
        other_cpu = statistics.median(r[0].other_threads_cpu_ms for r in runs)
        baseline = baseline or Timing(wall, cpu)
        seen = runs[-1][1]
        print(
            json.dumps(
                {
                    "bench": "replay_w1_events",
                    "mode": mode,
                    "codec": mode.split("_")[0] if mode in MODES[3:] else "none",
                    "median_wall_ms": round(wall, 1),
                    "ratio_to_no_events": round(wall / baseline.wall_ms, 3),
                    "median_cpu_ms": round(cpu, 1),
                    "cpu_ratio_to_no_events": round(cpu / baseline.cpu_ms, 3),
                    "median_publish_cpu_ms": round(publish_cpu, 1),
                    "median_other_threads_cpu_ms": round(other_cpu, 1),
                    "events_seen": seen.get("events"),
                    "batches_seen": seen.get("batches"),
                    "gaps": seen.get("gaps"),
                    "lost_batches": seen.get("lost_batches"),
                    "runs_ms": [round(r[0].wall_ms, 1) for r in runs],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
