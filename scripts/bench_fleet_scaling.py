"""The live fleet at --speedup-ratio inf on workload W1, with 1, 2 and 4 ranks.

W1 = 1000 requests x 1024 input / 128 output tokens, 32 in flight (closed loop), round robin,
8192 G1 blocks per rank, block size 16. Prints one JSON line per rank count with the median
over `--repeats` runs of simulated output tokens per wall second, and the ratio to the first
rank count. The repeats are interleaved (1, 2, 4, 1, 2, 4, ...) so a noisy neighbour slows
every rank count alike.

Each line also gives the median CPU seconds each process spent during the run (psutil
`cpu_times`, user + system, from just before `run()` to just after it): the supervisor, the
coordinator (0 when G2 is off: there is none), the ranks summed and the busiest rank (round
robin in a closed loop loads the ranks unevenly: the slower one ends up holding most of the
requests in flight), and the 1-minute load average when the line is printed. CPU seconds
depend less than wall time on how busy the machine is, so they show where the work goes even
on a shared box (a loaded 2-core VM still moves them by tens of percent: compare runs at a
similar load). `median_paired_ratio` is the median over repeats of the ratio between runs
made seconds apart (one repeat), steadier than `ratio_to_first` on a VM whose speed drifts.
`drain_ms` is the part of the wall time after the last completion (DRAIN, STATE: a fixed
cost, which weighs more the faster the run); `messages` counts the control messages the
supervisor received and sent per run (mostly RESULTS and SUBMIT: each one costs both ends a
wake-up).

`rqwait_s` (Linux) is the median time each process's threads were ready to run but waited for
a CPU (/proc/<pid>/task/*/schedstat, second field): other processes on the machine, or the
fleet's own (3 processes on 2 cores). A busiest rank whose CPU plus wait falls well short of
the wall time sat idle, waiting for requests. On a shared 2-core VM the ratio moves by tens of
percent with the neighbours' load: compare runs with similar `rqwait_s`.

`idle_s` is the median time the ranks held no request and waited for the supervisor's next
ones (each rank measures it between its first SUBMIT and DRAIN, and reports it in STATE):
summed over the ranks, and for the least idle rank, whose idle time adds to the wall time
one for one (round robin in a closed loop: the busiest rank sets the pace).

    .venv/bin/python scripts/bench_fleet_scaling.py [--ranks 1 2 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import psutil

from shmkv import core_mode
from shmkv.config import EngineConfig
from shmkv.fleet import Fleet, FleetOptions
from shmkv.workload import synthetic_sessions


def _cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def _rqwait_s(pid: int | None) -> float:
    """Seconds the threads of `pid` spent runnable but waiting for a CPU (0 if unknown)."""
    if pid is None:
        return 0.0
    total_ns = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                total_ns += int(handle.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return total_ns / 1e9


def _process_pids(fleet: Fleet, num_ranks: int) -> dict[str, int | None]:
    pids: dict[str, int | None] = {
        "supervisor": os.getpid(),
        "coordinator": fleet.coordinator_pid(),
    }
    for rank in range(num_ranks):
        pids[f"rank{rank}"] = fleet.rank_pid(rank)
    return pids


def run_once(num_ranks: int, request_count: int, num_g2_blocks: int) -> dict[str, float]:
    sessions = synthetic_sessions(input_tokens=1024, output_tokens=128, request_count=request_count)
    options = FleetOptions(
        engine=EngineConfig(
            num_gpu_blocks=8192,
            block_size=16,
            speedup_ratio=math.inf,
            num_g2_blocks=num_g2_blocks,
        ),
        data_parallel_size=num_ranks,
        replay_concurrency=32,
    )
    with Fleet(options) as fleet:
        fleet.start()  # process start-up is not part of the figure
        pids = _process_pids(fleet, num_ranks)
        cpu_before = {name: _cpu_s(pid) for name, pid in pids.items()}
        wait_before = {name: _rqwait_s(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        outcome = fleet.run(sessions)
        wall_s = time.perf_counter() - started
        cpu = {name: _cpu_s(pid) - cpu_before[name] for name, pid in pids.items()}
        wait = {name: _rqwait_s(pid) - wait_before[name] for name, pid in pids.items()}
    report = outcome.collector.build_report(wall_time_ms=wall_s * 1000)
    tokens = float(report["total_output_tokens"])
    ranks_cpu = [v for k, v in cpu.items() if k.startswith("rank")]
    ranks_wait = [v for k, v in wait.items() if k.startswith("rank")]
    return {
        "wall_s": wall_s,
        "output_tokens": tokens,
        "tokens_per_wall_s": tokens / wall_s,
        "supervisor_cpu_s": cpu["supervisor"],
        "coordinator_cpu_s": cpu["coordinator"],
        "ranks_cpu_s": sum(ranks_cpu),
        "max_rank_cpu_s": max(ranks_cpu),
        "ranks_idle_s": sum(s.idle_s for s in outcome.rank_status),
        "least_rank_idle_s": min(s.idle_s for s in outcome.rank_status),
        "supervisor_rqwait_s": wait["supervisor"],
        "ranks_rqwait_s": sum(ranks_wait),
        "drain_ms": outcome.drain_wall_ms,
        "messages_received": outcome.num_messages_received,
        "messages_sent": outcome.num_messages_sent,
    }


def _paired_ratio(runs: list[dict[str, float]], first: list[dict[str, float]]) -> float:
    """The median over repeats of this rank count's rate over the first rank count's rate in
    the same repeat (seconds apart): less moved by the VM's drift than a ratio of medians."""
    return statistics.median(
        r["tokens_per_wall_s"] / f["tokens_per_wall_s"] for r, f in zip(runs, first, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--request-count", type=int, default=1000)
    parser.add_argument(
        "--num-g2-blocks", type=int, default=0, help="shared G2 (0 = off, as in W1)"
    )
    args = parser.parse_args()
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.ranks}
    for _ in range(args.repeats):
        for num_ranks in args.ranks:
            runs[num_ranks].append(run_once(num_ranks, args.request_count, args.num_g2_blocks))
    baseline: float | None = None
    first = args.ranks[0]
    for num_ranks in args.ranks:
        rate = statistics.median(r["tokens_per_wall_s"] for r in runs[num_ranks])
        if baseline is None:
            baseline = rate

        def med(key: str, n: int = num_ranks) -> float:
            return round(statistics.median(r[key] for r in runs[n]), 3)

        print(
            json.dumps(
                {
                    "bench": "fleet_w1_scaling",
                    "core": core_mode(),
                    "ranks": num_ranks,
                    "median_output_tokens_per_wall_s": round(rate),
                    "median_wall_s": med("wall_s"),
                    "ratio_to_first": round(rate / baseline, 3),
                    "median_paired_ratio": round(_paired_ratio(runs[num_ranks], runs[first]), 3),
                    "runs": [round(r["tokens_per_wall_s"]) for r in runs[num_ranks]],
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                    "cpu_s": {
                        "supervisor": med("supervisor_cpu_s"),
                        "coordinator": med("coordinator_cpu_s"),
                        "ranks": med("ranks_cpu_s"),
                        "max_rank": med("max_rank_cpu_s"),
                    },
                    "idle_s": {
                        "ranks": med("ranks_idle_s"),
                        "least_idle_rank": med("least_rank_idle_s"),
                    },
                    "rqwait_s": {
                        "supervisor": med("supervisor_rqwait_s"),
                        "ranks": med("ranks_rqwait_s"),
                    },
                    "drain_ms": round(med("drain_ms"), 1),
                    "messages": {
                        "received": round(med("messages_received")),
                        "sent": round(med("messages_sent")),
                    },
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
