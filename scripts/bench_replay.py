"""Wall-clock benchmark of the offline replay on the two reference workloads (issue 3).

    W1: 1 rank, 8192 G1 blocks, block 16, 1000 requests x 1024 in / 128 out,
        closed loop with 32 sessions in flight, round robin.
    W2: 4 ranks, kv router, 2000 requests x 2048 in / 128 out, 64 in flight,
        shared prefix 0.5 of the prompt blocks in 8 groups.

Each workload is generated once (timed separately) and replayed `--runs` times; only
`run_replay` is timed. Prints one JSON line per workload: median / min / max wall ms,
simulated output tokens per wall second (at the median), and the simulated metrics, which
must be identical in every run (the script fails otherwise).

With `--vs-dynamo` (needs `ai-dynamo-runtime`, the `interop` extra), Dynamo's Rust mocker
replays the same workload after each of our runs (`scripts/dynamo_reference.py`; its call
generates its workload too), and the line adds its median wall ms and our median over its:
the issue's "within 2x of Dynamo" as a ratio measured in the same minutes, which a noisy
machine moves far less than either wall time. `ratio_with_generation` also counts our
workload generation.

    .venv/bin/python scripts/bench_replay.py [--runs 5] [--workload W1|W2|all]
        [--eviction lineage|lru|multi-lru] [--vs-dynamo]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable

from shmkv import core_mode
from shmkv.config import EngineConfig
from shmkv.replay import ReplayOptions, run_replay
from shmkv.workload import Session, synthetic_sessions

DYNAMO_WALL_MS = {"W1": "64-86", "W2": "265-390"}
"""Dynamo 1.6.1's Rust mocker on this machine (issue 3)."""
TARGET_WALL_MS = {"W1": 130, "W2": 530}
METRICS = (
    "completed_requests",
    "duration_ms",
    "mean_ttft_ms",
    "mean_itl_ms",
    "prefix_cache_reused_ratio",
    "total_output_tokens",
)


def _w1(eviction: str) -> tuple[Callable[[], list[Session]], ReplayOptions]:
    def sessions() -> list[Session]:
        return synthetic_sessions(
            input_tokens=1024, output_tokens=128, request_count=1000, block_size=16
        )

    engine = EngineConfig(num_gpu_blocks=8192, block_size=16, eviction=eviction)
    return sessions, ReplayOptions(engine=engine, replay_concurrency=32)


def _w2(eviction: str) -> tuple[Callable[[], list[Session]], ReplayOptions]:
    def sessions() -> list[Session]:
        return synthetic_sessions(
            input_tokens=2048,
            output_tokens=128,
            request_count=2000,
            block_size=16,
            shared_prefix_ratio=0.5,
            num_prefix_groups=8,
        )

    engine = EngineConfig(num_gpu_blocks=8192, block_size=16, eviction=eviction)
    options = ReplayOptions(
        engine=engine, replay_concurrency=64, data_parallel_size=4, router_mode="kv"
    )
    return sessions, options


WORKLOADS = {"W1": _w1, "W2": _w2}


def _dynamo_runner(name: str) -> Callable[[], float] | None:
    """A callable timing one Dynamo replay of workload `name` (wall ms), or None without
    Dynamo."""
    import dynamo_reference  # scripts/, beside this file

    replay = dynamo_reference._load_replay()
    if replay is None:
        return None
    workload = next(w for w in dynamo_reference.WORKLOADS if w.name == name)

    def run() -> float:
        wall_ms, _summary = dynamo_reference._run_once(replay, workload)
        return wall_ms

    return run


def bench(name: str, runs: int, eviction: str, *, vs_dynamo: bool = False) -> dict[str, object]:
    dynamo = _dynamo_runner(name) if vs_dynamo else None
    if vs_dynamo and dynamo is None:
        raise SystemExit("--vs-dynamo: Dynamo is not installed (pip install '.[interop]')")
    dynamo_walls: list[float] = []
    make_sessions, options = WORKLOADS[name](eviction)
    start = time.perf_counter()
    sessions = make_sessions()
    generation_ms = (time.perf_counter() - start) * 1000
    walls: list[float] = []
    metrics: dict[str, object] | None = None
    num_passes = 0
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        outcome = run_replay(sessions, options)
        walls.append((time.perf_counter() - start) * 1000)
        report = outcome.collector.build_report(wall_time_ms=walls[-1])
        these: dict[str, object] = {key: report[key] for key in METRICS}
        if metrics is not None and these != metrics:
            raise SystemExit(f"{name}: simulated metrics differ between runs: {these} vs {metrics}")
        metrics = these
        num_passes = outcome.num_passes
        del outcome, report  # each run starts with only the workload alive, as a CLI run does
        if dynamo is not None:
            gc.collect()
            dynamo_walls.append(dynamo())
    assert metrics is not None
    median = statistics.median(walls)
    output_tokens = metrics["total_output_tokens"]
    assert isinstance(output_tokens, int)
    versus: dict[str, object] = {}
    if dynamo_walls:
        dynamo_median = statistics.median(dynamo_walls)
        versus = {
            "dynamo_median_wall_ms": round(dynamo_median, 1),
            "dynamo_walls_ms": [round(w, 1) for w in dynamo_walls],
            "ratio_to_dynamo": round(median / dynamo_median, 2),
            "ratio_with_generation": round((median + generation_ms) / dynamo_median, 2),
        }
    return {
        "workload": name,
        "core": core_mode(),
        "eviction": eviction,
        "runs": runs,
        "median_wall_ms": round(median, 1),
        "min_wall_ms": round(min(walls), 1),
        "max_wall_ms": round(max(walls), 1),
        "walls_ms": [round(w, 1) for w in walls],
        "target_wall_ms": TARGET_WALL_MS[name],
        "dynamo_wall_ms": DYNAMO_WALL_MS[name],
        "workload_generation_ms": round(generation_ms, 1),
        "sim_output_tokens_per_wall_s": round(output_tokens / (median / 1000)),
        "num_passes": num_passes,
        **versus,
        **metrics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="replays per workload (median)")
    parser.add_argument("--workload", choices=("W1", "W2", "all"), default="all")
    parser.add_argument("--eviction", choices=("lineage", "lru", "multi-lru"), default="lineage")
    parser.add_argument(
        "--vs-dynamo",
        action="store_true",
        help="after each run, time Dynamo's Rust mocker on the same workload; add the ratio",
    )
    args = parser.parse_args()
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    for name in names:
        record = bench(name, args.runs, args.eviction, vs_dynamo=args.vs_dynamo)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
