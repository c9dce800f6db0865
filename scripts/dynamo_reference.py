"""Reference figures from NVIDIA Dynamo 1.6.1's Rust mocker (offline synthetic replay).

Runs the fidelity workloads through `dynamo._core.run_mocker_synthetic_trace_replay`, several
repetitions each, and prints one JSON line per workload: the median wall time of the call
(time.perf_counter around it), the median of the report's own `wall_time_ms`, and the median over
repetitions of the report's key metrics (mean/median/p99 TTFT, TTST, ITL, TPOT, E2E, reuse
ratios, duration, throughputs). `spread` gives [min, max] over repetitions for every metric that
varied (the kv_router replay is not deterministic run to run; round_robin is).

Dynamo is optional: without it the script says so and exits 0. It is run from the scratch venv:

    /tmp/dynvenv/bin/python scripts/dynamo_reference.py [--reps 5] [--workloads W1 W2]
    /tmp/dynvenv/bin/python scripts/dynamo_reference.py --dump-report W2   # one full report

The Rust KV router logs every routing decision at INFO; unless DYN_LOG is already set the script
sets DYN_LOG=warn before importing dynamo, otherwise the logging dominates the kv_router wall time.
See docs/dynamo_reference.md for the figures and what each report field means.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

REPS = 5

# One rank's engine: vLLM-style mocker, default polynomial timing model.
ENGINE: dict[str, Any] = {
    "block_size": 16,
    "num_gpu_blocks": 8192,
    "max_num_seqs": 256,
    "max_num_batched_tokens": 8192,
    "enable_prefix_caching": True,
    "enable_chunked_prefill": True,
}

# Report keys printed per workload (all present in a 1.6.1 offline summary).
LATENCIES = ("ttft", "ttst", "itl", "tpot", "e2e_latency")
STATS = ("mean", "median", "p99")
KEY_METRICS: tuple[str, ...] = (
    *(f"{stat}_{lat}_ms" for lat in LATENCIES for stat in STATS),
    "prefix_cache_reused_ratio",
    "first_admission_prefix_cache_reused_ratio",
    "completed_requests",
    "duration_ms",
    "wall_time_ms",
    "request_throughput_rps",
    "input_throughput_tok_s",
    "output_throughput_tok_s",
    "total_throughput_tok_s",
)


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    # Keyword arguments of run_mocker_synthetic_trace_replay, passed verbatim.
    kwargs: dict[str, Any] = field(default_factory=dict)


WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "W1",
        "1 worker, 1000 x 1024/128, concurrency 32, round_robin",
        {
            "input_tokens": 1024,
            "output_tokens": 128,
            "request_count": 1000,
            "extra_engine_args": {"engine": ENGINE},
            "num_workers": 1,
            "replay_concurrency": 32,
            "replay_mode": "offline",
            "router_mode": "round_robin",
        },
    ),
    Workload(
        "W2",
        "4 workers (num_workers=4), 2000 x 2048/128, concurrency 64, kv_router, 8 prefix groups x 0.5",
        {
            "input_tokens": 2048,
            "output_tokens": 128,
            "request_count": 2000,
            "extra_engine_args": {"engine": ENGINE},
            "num_workers": 4,
            "replay_concurrency": 64,
            "replay_mode": "offline",
            "router_mode": "kv_router",
            "shared_prefix_ratio": 0.5,
            "num_prefix_groups": 8,
        },
    ),
    Workload(
        "W2_dp4",
        "W2 with one worker of dp_size 4 (4 lockstep DP ranks) instead of num_workers=4",
        {
            "input_tokens": 2048,
            "output_tokens": 128,
            "request_count": 2000,
            "extra_engine_args": {"engine": ENGINE, "dp_size": 4},
            "num_workers": 1,
            "replay_concurrency": 64,
            "replay_mode": "offline",
            "router_mode": "kv_router",
            "shared_prefix_ratio": 0.5,
            "num_prefix_groups": 8,
        },
    ),
    Workload(
        "W2_rr",
        "W2 with router round_robin (deterministic control for the kv_router run)",
        {
            "input_tokens": 2048,
            "output_tokens": 128,
            "request_count": 2000,
            "extra_engine_args": {"engine": ENGINE},
            "num_workers": 4,
            "replay_concurrency": 64,
            "replay_mode": "offline",
            "router_mode": "round_robin",
            "shared_prefix_ratio": 0.5,
            "num_prefix_groups": 8,
        },
    ),
)
DEFAULT_WORKLOADS = ("W1", "W2", "W2_dp4")

Replay = Callable[..., Any]


def _load_replay() -> Replay | None:
    """Return Dynamo's synthetic replay entry point, or None when dynamo is not installed."""
    os.environ.setdefault("DYN_LOG", "warn")
    try:
        import dynamo._core as core
    except ImportError:
        return None
    replay: Replay = core.run_mocker_synthetic_trace_replay
    return replay


def _run_once(replay: Replay, workload: Workload) -> tuple[float, dict[str, Any]]:
    """One replay: (wall ms measured around the call, the report's summary dict)."""
    start = time.perf_counter()
    result = replay(**workload.kwargs)
    wall_ms = (time.perf_counter() - start) * 1000.0
    # Offline replay returns a native result object; its `summary` is the report dict.
    summary = result.summary if hasattr(result, "summary") else result
    return wall_ms, dict(summary)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _measure(replay: Replay, workload: Workload, reps: int) -> dict[str, Any]:
    walls: list[float] = []
    summaries: list[dict[str, Any]] = []
    for _ in range(reps):
        wall_ms, summary = _run_once(replay, workload)
        walls.append(wall_ms)
        summaries.append(summary)
    metrics: dict[str, float | int | None] = {}
    spread: dict[str, list[float]] = {}
    for key in KEY_METRICS:
        values = [s[key] for s in summaries if isinstance(s.get(key), int | float)]
        if not values:
            metrics[key] = None
            continue
        metrics[key] = values[0] if isinstance(values[0], int) else _median(values)
        if min(values) != max(values):
            spread[key] = [min(values), max(values)]
    return {
        "workload": workload.name,
        "description": workload.description,
        "reps": reps,
        "wall_ms_median": round(_median(walls), 3),
        "wall_ms_all": [round(w, 3) for w in walls],
        "report_wall_time_ms_median": metrics.get("wall_time_ms"),
        "metrics": metrics,
        "spread": spread,
        "call": _describe_call(workload.kwargs),
    }


def _describe_call(kwargs: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"run_mocker_synthetic_trace_replay({args})"


def main(argv: list[str] | None = None) -> int:
    names = [w.name for w in WORKLOADS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=REPS, help="repetitions per workload")
    parser.add_argument(
        "--workloads", nargs="+", choices=names, default=list(DEFAULT_WORKLOADS), metavar="NAME"
    )
    parser.add_argument(
        "--dump-report",
        choices=names,
        metavar="NAME",
        help="run NAME once and print its full report (every key) as indented JSON",
    )
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")

    replay = _load_replay()
    if replay is None:
        print("dynamo is not installed (pip install ai-dynamo-runtime==1.6.1); nothing to measure")
        return 0

    by_name = {w.name: w for w in WORKLOADS}
    if args.dump_report is not None:
        workload = by_name[args.dump_report]
        wall_ms, summary = _run_once(replay, workload)
        out: dict[str, Any] = {
            "workload": workload.name,
            "call": _describe_call(workload.kwargs),
            "wall_ms": round(wall_ms, 3),
            "report": summary,
        }
        print(json.dumps(out, indent=2, sort_keys=False))
        return 0

    for name in args.workloads:
        print(json.dumps(_measure(replay, by_name[name], args.reps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
