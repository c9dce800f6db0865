"""The live fleet at --speedup-ratio inf on workload W1, with 1, 2 and 4 ranks.

W1 = 1000 requests x 1024 input / 128 output tokens, 32 in flight (closed loop), round robin,
8192 G1 blocks per rank, block size 16. Prints one JSON line per rank count with the median
over `--repeats` runs of simulated output tokens per wall second, and the ratio to 1 rank.

    .venv/bin/python scripts/bench_fleet_scaling.py [--ranks 1 2 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

from shmkv.config import EngineConfig
from shmkv.fleet import Fleet, FleetOptions
from shmkv.workload import synthetic_sessions


def run_once(num_ranks: int, request_count: int) -> dict[str, float]:
    sessions = synthetic_sessions(input_tokens=1024, output_tokens=128, request_count=request_count)
    options = FleetOptions(
        engine=EngineConfig(num_gpu_blocks=8192, block_size=16, speedup_ratio=math.inf),
        data_parallel_size=num_ranks,
        replay_concurrency=32,
    )
    with Fleet(options) as fleet:
        fleet.start()  # process start-up is not part of the figure
        started = time.perf_counter()
        outcome = fleet.run(sessions)
        wall_s = time.perf_counter() - started
    report = outcome.collector.build_report(wall_time_ms=wall_s * 1000)
    tokens = float(report["total_output_tokens"])
    return {"wall_s": wall_s, "output_tokens": tokens, "tokens_per_wall_s": tokens / wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--request-count", type=int, default=1000)
    args = parser.parse_args()
    baseline: float | None = None
    for num_ranks in args.ranks:
        runs = [run_once(num_ranks, args.request_count) for _ in range(args.repeats)]
        rate = statistics.median(r["tokens_per_wall_s"] for r in runs)
        if baseline is None:
            baseline = rate
        print(
            json.dumps(
                {
                    "bench": "fleet_w1_scaling",
                    "ranks": num_ranks,
                    "median_output_tokens_per_wall_s": round(rate),
                    "median_wall_s": round(statistics.median(r["wall_s"] for r in runs), 3),
                    "ratio_to_first": round(rate / baseline, 3),
                    "runs": [round(r["tokens_per_wall_s"]) for r in runs],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
