"""Layer 3: `shmkv stress`, concurrent eviction under fault injection, with invariant checks.

N rank processes and the coordinator run on deliberately small G1 and G2 pools with a
closed-loop workload whose prompts overlap heavily, for `--duration` seconds (then it drains
and stops by itself). Faults: SIGKILL a random rank every S seconds (the supervisor restarts
it), SIGKILL the coordinator once (the fleet restarts on a new segment), SIGSTOP/SIGCONT a
rank to model a slow process. Everything is seeded.

What is checked:
* every rank checks its G1 pools (they partition the capacity) and its G2 pin ledger every
  few passes; the coordinator reports its own invariant checks;
* a subscriber receives every rank's events; at the end its index must equal what each rank
  holds in G1 and the G2 blocks it announced (every held block whose parent chain is held),
  with no batch lost and no store whose parent the rank never announced (an orphan, which a
  router such as Dynamo's indexer drops);
* after the drain, the segment holds no pin and no reserved slot;
* after shutdown, no process and no segment of the fleet is left.
`--inject-bug` breaks something on purpose so the checker is seen to fail.
Exit code 0 only when violations and leaks are all zero.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from shmkv.config import EngineConfig
from shmkv.consumer import EventConsumer, RankEndpoint
from shmkv.engine import EventSpec
from shmkv.errors import ConfigError
from shmkv.fleet import Fleet, FleetOptions
from shmkv.transport import free_port_base
from shmkv.workload import RequestSpec

INJECT_BUGS = ("g1-leak", "ignore-pins")
STALL_GRACE_S = 30.0
"""After the load stops, how long requests may take to finish before the run is declared
stalled (a violation: something wedged)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StressOptions:
    num_ranks: int = 4
    duration_s: float = 30.0
    kill_rank_every_s: float | None = None
    kill_coordinator_at_s: float | None = None
    pause_rank_every_s: float | None = None
    pause_s: float = 0.5
    seed: int = 0
    inject_bug: str | None = None
    num_gpu_blocks: int = 48
    num_g2_blocks: int = 96
    block_size: int = 16
    concurrency_per_rank: int = 6
    check_every_passes: int = 16

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ConfigError("--data-parallel-size must be >= 1")
        if not 0 < self.duration_s <= 24 * 3600:
            raise ConfigError("--duration must be in (0, 86400] seconds")
        for name in ("kill_rank_every_s", "kill_coordinator_at_s", "pause_rank_every_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.removesuffix('_s').replace('_', '-')} must be > 0")
        if self.inject_bug is not None and self.inject_bug not in INJECT_BUGS:
            raise ConfigError(f"--inject-bug must be one of {', '.join(INJECT_BUGS)}")


class StressDriver:
    """An endless closed loop over a small pool of overlapping prompts, stopped by time."""

    def __init__(self, *, concurrency: int, stop_ms: float, block_size: int, seed: int) -> None:
        rng = random.Random(seed)
        self._rng = rng
        self._concurrency = concurrency
        self._stop_ms = stop_ms
        groups = [_random_tokens(rng, 6 * block_size) for _ in range(4)]
        tails = [_random_tokens(rng, 4 * block_size) for _ in range(24)]
        self._prompts = [g + t[: block_size * rng.randint(1, 4)] for g in groups for t in tails]
        self._next_id = 0
        self._outstanding = 0
        self._stopped = False
        self.num_released = 0
        self.num_finished = 0

    def next_arrival_ms(self) -> float:
        return (
            -math.inf if not self._stopped and self._outstanding < self._concurrency else math.inf
        )

    def pop_due(self, now_ms: float) -> list[tuple[float, RequestSpec]]:
        if now_ms >= self._stop_ms:
            self._stopped = True
        if self._stopped:
            return []
        due = []
        while self._outstanding < self._concurrency:
            request_id = self._next_id
            self._next_id += 1
            prompt = self._prompts[self._rng.randrange(len(self._prompts))]
            due.append(
                (
                    now_ms,
                    RequestSpec(
                        request_id=request_id,
                        session_id=request_id,
                        turn_index=0,
                        arrival_ms=now_ms,
                        delay_ms=0.0,
                        tokens=prompt,
                        max_output_tokens=self._rng.randint(2, 24),
                    ),
                )
            )
            self._outstanding += 1
        self.num_released += len(due)
        return due

    def on_finished(self, request_id: int, time_ms: float, *, ended_session: bool = False) -> None:
        self._outstanding -= 1
        self.num_finished += 1

    @property
    def num_outstanding(self) -> int:
        return self._outstanding

    def done(self) -> bool:
        return self._stopped and self._outstanding == 0


def _random_tokens(rng: random.Random, count: int) -> array[int]:
    tokens = array("I")
    tokens.frombytes(rng.randbytes(4 * count))
    return tokens


REPLAY_TIMEOUT_S = 5.0
"""How long the checking consumer waits on a rank's replay socket before it counts the batches
it asked for as lost: the consumer's default. At 2 s a busy rank on a loaded machine (the
test suite on more workers than cores) missed it now and then, and the run reported lost
batches that a later reply would have delivered."""


@dataclass(slots=True)
class FaultInjector:
    options: StressOptions
    rng: random.Random
    started_ms: float = 0.0
    next_kill_ms: float = math.inf
    next_pause_ms: float = math.inf
    coordinator_killed: bool = False
    paused: dict[int, float] = field(default_factory=dict)
    kills: int = 0
    coordinator_kills: int = 0
    pauses: int = 0

    def start(self, now_ms: float) -> None:
        self.started_ms = now_ms
        if self.options.kill_rank_every_s:
            self.next_kill_ms = now_ms + self.options.kill_rank_every_s * 1000
        if self.options.pause_rank_every_s:
            self.next_pause_ms = now_ms + self.options.pause_rank_every_s * 1000

    def tick(self, fleet: Fleet, now_ms: float) -> None:
        opts = self.options
        for pid, until in list(self.paused.items()):
            if now_ms >= until:
                _signal(pid, signal.SIGCONT)
                del self.paused[pid]
        if now_ms - self.started_ms >= opts.duration_s * 1000:
            return  # faults stop with the workload; the drain must see a quiet fleet
        if now_ms >= self.next_kill_ms:
            rank = self.rng.randrange(opts.num_ranks)
            pid = fleet.rank_pid(rank)
            self.paused.pop(pid, None)
            if _signal(pid, signal.SIGKILL):
                self.kills += 1
            self.next_kill_ms = _next_slot(self.next_kill_ms, now_ms, opts.kill_rank_every_s)
        if (
            opts.kill_coordinator_at_s is not None
            and not self.coordinator_killed
            and now_ms - self.started_ms >= opts.kill_coordinator_at_s * 1000
        ):
            self.coordinator_killed = True
            coordinator = fleet.coordinator_pid()
            if coordinator and _signal(coordinator, signal.SIGKILL):
                self.kills += 1
                self.coordinator_kills += 1
        if now_ms >= self.next_pause_ms:
            pid = fleet.rank_pid(self.rng.randrange(opts.num_ranks))
            if pid not in self.paused and _signal(pid, signal.SIGSTOP):
                self.paused[pid] = now_ms + opts.pause_s * 1000
                self.pauses += 1
            self.next_pause_ms = _next_slot(self.next_pause_ms, now_ms, opts.pause_rank_every_s)

    def release(self) -> None:
        for pid in list(self.paused):
            _signal(pid, signal.SIGCONT)
        self.paused.clear()


def _next_slot(slot_ms: float, now_ms: float, every_s: float | None) -> float:
    """The first slot of the `every_s` grid that `slot_ms` starts after `now_ms`: a late tick
    (a loaded machine, a fleet restart) neither shifts the later faults nor bunches the missed
    ones together."""
    if not every_s:
        return math.inf
    period_ms = every_s * 1000
    return slot_ms + period_ms * (math.floor((now_ms - slot_ms) / period_ms) + 1)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def run_stress(options: StressOptions, *, quiet: bool = True) -> dict[str, Any]:
    """Run one stress test and return its report (see the module docstring)."""
    engine = EngineConfig(
        num_gpu_blocks=options.num_gpu_blocks,
        block_size=options.block_size,
        max_num_batched_tokens=2048,
        speedup_ratio=math.inf,
        num_g2_blocks=options.num_g2_blocks,
        kv_bytes_per_token=0,
        seed=options.seed,
    )
    base, replay = free_port_base(options.num_ranks), free_port_base(options.num_ranks)
    fleet_options = FleetOptions(
        engine=engine,
        data_parallel_size=options.num_ranks,
        replay_concurrency=None,
        events=EventSpec(
            codec="json",
            endpoint=f"tcp://127.0.0.1:{base}",
            replay_endpoint=f"tcp://127.0.0.1:{replay}",
        ),
        max_sim_time_ms=None,
        max_wall_s=options.duration_s + STALL_GRACE_S,
        rank_extra={
            "check_invariants_every": options.check_every_passes,
            "inject_bug": options.inject_bug if options.inject_bug == "g1-leak" else None,
        },
        coordinator_extra={
            "inject_bug": options.inject_bug if options.inject_bug == "ignore-pins" else None,
            "check_invariants": True,
        },
    )
    injector = FaultInjector(options, random.Random(options.seed))
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    started = time.monotonic()
    report: dict[str, Any] = {}
    differences: list[str] = []
    consumer_stats: dict[str, int] = {}
    audit: dict[str, int] = {}
    with Fleet(fleet_options) as fleet:
        fleet.start()
        now0 = fleet.clock.now_ms()
        driver = StressDriver(
            concurrency=options.concurrency_per_rank * options.num_ranks,
            stop_ms=now0 + options.duration_s * 1000,
            block_size=options.block_size,
            seed=options.seed,
        )
        endpoints = [
            RankEndpoint(
                rank=r, endpoint=info["events_endpoint"], replay_endpoint=info["replay_endpoint"]
            )
            for r, info in enumerate(fleet.rank_endpoints())
        ]
        with EventConsumer(
            endpoints,
            codec="json",
            block_size=options.block_size,
            replay_timeout_s=REPLAY_TIMEOUT_S,
        ) as consumer:
            injector.start(now0)
            progress = _Progress(quiet, options.duration_s)

            def on_tick(f: Fleet, now_ms: float) -> None:
                injector.tick(f, now_ms)
                consumer.poll(0)
                progress.show(f, now_ms - now0, injector)

            try:
                outcome = fleet.run([], driver=driver, on_tick=on_tick)
            finally:
                injector.release()
            consumer.drain()
            consumer_stats = consumer.stats()
            if outcome.state is not None:
                differences = consumer.compare(outcome.state)
        audit = fleet.audit_segment()
        fleet_id = fleet_options.fleet_id
    leaked_processes = [
        p.pid
        for p in me.children(recursive=True)
        if p.pid not in before_children and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    leaked_segments = sorted(p.name for p in Path("/dev/shm").glob(f"shmkv_{fleet_id}*"))
    wall_s = time.monotonic() - started
    rank_violations = sum(s.violations for s in outcome.rank_status)
    coordinator_violations = int(outcome.g2_stats.get("violations", 0) or 0)
    stalled = 1 if outcome.stalled else 0
    violations = (
        rank_violations
        + coordinator_violations
        + len(differences)
        + consumer_stats.get("lost_batches", 0)
        + consumer_stats.get("orphan_stores", 0)
        + stalled
    )
    completed = outcome.collector.num_completed
    run_s = max(options.duration_s, 1e-9)
    report = {
        "duration_s": options.duration_s,
        "wall_time_s": round(wall_s, 3),
        "num_ranks": options.num_ranks,
        "seed": options.seed,
        "inject_bug": options.inject_bug,
        "ops_per_s": {
            "requests": completed / run_s,
            "output_tokens": sum(
                int(r.get("output_length") or 0) for r in outcome.collector.per_request_records()
            )
            / run_s,
            "g2_offloads": float(outcome.g2_stats.get("offloaded", 0) or 0) / run_s,
            "g2_onboarded_blocks": sum(s.g2_onboard_blocks for s in outcome.rank_status) / run_s,
            "g2_evictions": float(outcome.g2_stats.get("evicted", 0) or 0) / run_s,
            "events": consumer_stats.get("events", 0) / run_s,
        },
        "completed_requests": completed,
        "failed_requests": outcome.num_failed,
        "kills": injector.kills,
        "pauses": injector.pauses,
        "restarts": outcome.num_rank_restarts + outcome.num_fleet_restarts * options.num_ranks,
        "fleet_restarts": outcome.num_fleet_restarts,
        "violations": violations,
        "violations_by_kind": {
            "rank_invariants": rank_violations,
            "coordinator_invariants": coordinator_violations,
            "event_index_differences": len(differences),
            "lost_event_batches": consumer_stats.get("lost_batches", 0),
            "orphan_event_stores": consumer_stats.get("orphan_stores", 0),
            "stalled_runs": stalled,
        },
        "violation_examples": differences[:5] + outcome.violation_examples[:5],
        "leaked_slots": audit.get("reserved_slots", 0),
        "leaked_pins": audit.get("pins", 0),
        "leaked_processes": len(leaked_processes),
        "leaked_segments": len(leaked_segments),
        "g2": {k: v for k, v in outcome.g2_stats.items() if isinstance(v, int | float)},
        "events": consumer_stats,
    }
    return report


class _Progress:
    def __init__(self, quiet: bool, duration_s: float) -> None:
        self.quiet = quiet or not sys.stderr.isatty()
        self.duration_s = duration_s
        self.last = 0.0

    def show(self, fleet: Fleet, elapsed_ms: float, injector: FaultInjector) -> None:
        if self.quiet or elapsed_ms - self.last < 1000:
            return
        self.last = elapsed_ms
        violations = sum(s.violations for s in fleet.status)
        print(
            f"\r[{elapsed_ms / 1000:6.1f}/{self.duration_s:.0f}s] kills {injector.kills} "
            f"pauses {injector.pauses} restarts {fleet.num_rank_restarts} violations {violations}   ",
            end="",
            file=sys.stderr,
            flush=True,
        )


# ── CLI ─────────────────────────────────────────────────────────────────────────────────────


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "stress",
        help="concurrent offload/onboard/eviction across processes with faults and invariant checks",
        description="Run N ranks and the coordinator on small G1/G2 pools with heavily "
        "overlapping prompts for --duration seconds, inject faults, and check every invariant "
        "while it runs and at the end. Exit 0 only when violations and leaks are all zero.",
    )
    parser.add_argument(
        "--data-parallel-size", type=int, default=4, metavar="N", help="ranks (default 4)"
    )
    parser.add_argument(
        "--duration", type=float, default=30.0, metavar="S", help="seconds of load (default 30)"
    )
    parser.add_argument(
        "--kill-rank-every",
        type=float,
        default=None,
        metavar="S",
        help="SIGKILL a random rank every S seconds (the supervisor restarts it)",
    )
    parser.add_argument(
        "--kill-coordinator-at",
        type=float,
        default=None,
        metavar="S",
        help="SIGKILL the coordinator once, S seconds in (the fleet restarts)",
    )
    parser.add_argument(
        "--pause-rank-every",
        type=float,
        default=None,
        metavar="S",
        help="SIGSTOP a random rank every S seconds, SIGCONT after --pause-seconds",
    )
    parser.add_argument("--pause-seconds", type=float, default=0.5, metavar="S")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload and the faults")
    parser.add_argument(
        "--num-gpu-blocks-override",
        type=int,
        default=48,
        metavar="N",
        help="G1 blocks per rank (default 48: small on purpose)",
    )
    parser.add_argument(
        "--num-g2-blocks",
        type=int,
        default=96,
        metavar="N",
        help="shared G2 blocks (default 96: small on purpose)",
    )
    parser.add_argument(
        "--inject-bug",
        choices=INJECT_BUGS,
        default=None,
        help="break an invariant on purpose (tests that the checker can fail)",
    )
    parser.add_argument("--report", default=None, metavar="FILE", help="write the JSON report here")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=cmd_stress)


def cmd_stress(args: argparse.Namespace) -> int:
    from shmkv import cli

    options = StressOptions(
        num_ranks=args.data_parallel_size,
        duration_s=args.duration,
        kill_rank_every_s=args.kill_rank_every,
        kill_coordinator_at_s=args.kill_coordinator_at,
        pause_rank_every_s=args.pause_rank_every,
        pause_s=args.pause_seconds,
        seed=args.seed,
        inject_bug=args.inject_bug,
        num_gpu_blocks=args.num_gpu_blocks_override,
        num_g2_blocks=args.num_g2_blocks,
    )
    if args.report:
        cli.check_output_paths(args)
    from shmkv.fleet import _signals_raise_keyboard_interrupt

    with _signals_raise_keyboard_interrupt():
        report = run_stress(options, quiet=args.quiet)
    if args.report:
        cli.write_atomic(args.report, json.dumps(report, indent=2) + "\n")
    keys = (
        "violations",
        "kills",
        "restarts",
        "leaked_slots",
        "leaked_pins",
        "leaked_processes",
        "leaked_segments",
    )
    if not args.quiet:
        print("", file=sys.stderr)
        print(json.dumps({"ops_per_s": {k: round(v, 1) for k, v in report["ops_per_s"].items()}}))
        for example in report["violation_examples"]:
            print(f"violation: {example}", file=sys.stderr)
    print(" ".join(f"{k}={report[k]}" for k in keys))
    clean = all(report[k] == 0 for k in keys if k not in ("kills", "restarts"))
    return cli.EXIT_OK if clean else cli.EXIT_FAILURE
