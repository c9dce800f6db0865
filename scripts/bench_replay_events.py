"""What publishing KV events adds to an offline replay: W1 without events, then with each codec
published to a live subscriber (`shmkv events` in another process), median of `--repeats`.

    .venv/bin/python scripts/bench_replay_events.py [--repeats 3]

One JSON line per mode: median wall ms of the replay, the ratio to the no-event run, and what
the subscriber saw (events, gaps, lost batches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from shmkv.config import EngineConfig
from shmkv.events import KvEvent
from shmkv.replay import ReplayOptions, run_replay
from shmkv.transport import free_port_base
from shmkv.workload import synthetic_sessions


def run(codec: str | None) -> tuple[float, dict[str, Any]]:
    sessions = synthetic_sessions(input_tokens=1024, output_tokens=128, request_count=1000)
    engine = EngineConfig(num_gpu_blocks=8192, block_size=16)
    if codec is None:
        start = time.perf_counter()
        run_replay(sessions, ReplayOptions(engine=engine, replay_concurrency=32))
        return (time.perf_counter() - start) * 1000, {}
    from shmkv.codec import make_codec
    from shmkv.events import EventBatch
    from shmkv.publisher import EventPublisher, PublisherConfig

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

        def on_events(rank: int, _end_ms: float, events: list[KvEvent]) -> None:
            publisher.publish(EventBatch(ts_s=time.time(), dp_rank=rank, events=events))

        options = ReplayOptions(
            engine=engine, replay_concurrency=32, emit_token_ids=codec == "vllm"
        )
        start = time.perf_counter()
        run_replay(sessions, options, on_events=on_events)
        wall_ms = (time.perf_counter() - start) * 1000
        out, _ = subscriber.communicate(timeout=180)
    return wall_ms, json.loads(out.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    baseline = None
    for codec in (None, "json", "vllm"):
        runs = [run(codec) for _ in range(args.repeats)]
        wall = statistics.median(r[0] for r in runs)
        baseline = baseline or wall
        seen = runs[-1][1]
        print(
            json.dumps(
                {
                    "bench": "replay_w1_events",
                    "codec": codec or "none",
                    "median_wall_ms": round(wall, 1),
                    "ratio_to_no_events": round(wall / baseline, 3),
                    "events_seen": seen.get("events"),
                    "gaps": seen.get("gaps"),
                    "lost_batches": seen.get("lost_batches"),
                    "runs_ms": [round(r[0], 1) for r in runs],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
