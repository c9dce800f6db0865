"""Block-operation throughput of `KvManager` per eviction backend (issue 2).

A fixed mixed workload: `--requests` requests, `--concurrency` of them in flight, each a prompt
of `--prefix-blocks` blocks shared with its group (`--groups` groups) plus `--unique-blocks`
blocks of its own, then `--output-tokens` decode steps (Promote of each filled block, Use of
the new partial one), then the tail-first Deref of everything. The pool holds `--capacity`
blocks: the blocks of finished requests go inactive and are evicted as new ones arrive.

The signals are built once, outside the timed region, by driving `ActiveSequence`s in a fixed
interleaving; then only `KvManager.process` is timed, on a fresh manager per run. A block
operation is one block processed by a Use, Deref or Promote. The end-to-end figure also times
building the sequences (hashing) and their signals. Prints one JSON line (medians of `--runs`),
starting with the core mode (compiled or interpreted, see shmkv/_native.py).

    .venv/bin/python scripts/bench_manager.py [--runs 5] [--no-events] [--gc]

The timed loops run with Python's cyclic GC paused, as `run_replay` does (`--gc` keeps it on).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from array import array

from shmkv import core_mode
from shmkv.eviction import EVICTION_NAMES
from shmkv.manager import KvManager
from shmkv.sequence import ActiveSequence
from shmkv.signals import Deref, MoveBlock, Promote, Use

BLOCK_SIZE = 16


def build_signals(args: argparse.Namespace) -> list[MoveBlock]:
    """The workload's signals in processing order (deterministic)."""
    rng = random.Random(7)
    bs = BLOCK_SIZE
    prefixes = [rng.randbytes(4 * bs * args.prefix_blocks) for _ in range(args.groups)]
    unique_bytes = 4 * bs * args.unique_blocks

    def new_sequence() -> ActiveSequence:
        tokens = array("I")
        tokens.frombytes(prefixes[rng.randrange(args.groups)] + rng.randbytes(unique_bytes))
        return ActiveSequence(tokens, args.output_tokens, bs, rng=rng)

    signals: list[MoveBlock] = []
    in_flight: list[ActiveSequence] = []
    started = 0
    while started < args.requests or in_flight:
        while len(in_flight) < args.concurrency and started < args.requests:
            seq = new_sequence()
            creation = seq.take_creation_signal()
            assert creation is not None
            signals.append(creation)
            in_flight.append(seq)
            started += 1
        still: list[ActiveSequence] = []
        for seq in in_flight:  # one decode step each, round robin
            signals.extend(seq.generate())
            if seq.is_complete():
                continue
            seq.commit_allocation(len(seq))
            still.append(seq)
        in_flight = still
    return signals


def block_ops(signals: list[MoveBlock]) -> int:
    total = 0
    for signal in signals:
        if isinstance(signal, Use | Deref):
            total += len(signal.raw_blocks)
        elif isinstance(signal, Promote):
            total += 1
    return total


def run_manager(
    signals: list[MoveBlock], backend: str, capacity: int, events: bool, pause_gc: bool
) -> tuple[float, KvManager]:
    manager = KvManager(capacity, BLOCK_SIZE, eviction=backend, enable_events=events)
    process = manager.process
    gc.collect()
    if pause_gc:
        gc.disable()
    try:
        start = time.perf_counter()
        for signal in signals:
            process(signal)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed, manager


def check(signals: list[MoveBlock], manager: KvManager, backend: str) -> None:
    """Every Use was fully held (the pool never ran out) and everything was released."""
    if manager.num_active_block_refs() != 0:
        raise SystemExit(f"{backend}: {manager.num_active_block_refs()} refs left held")
    manager.check_invariants()
    replay = KvManager(manager.max_capacity, BLOCK_SIZE, eviction=backend, enable_events=False)
    for signal in signals:
        got = replay.process(signal)
        if isinstance(signal, Use) and got != len(signal.raw_blocks):
            raise SystemExit(f"{backend}: a Use ran out of capacity; raise --capacity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--prefix-blocks", type=int, default=32)
    parser.add_argument("--unique-blocks", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--no-events", dest="events", action="store_false")
    parser.add_argument(
        "--gc", action="store_true", help="keep the cyclic GC on (the replay pauses it)"
    )
    args = parser.parse_args()

    start = time.perf_counter()
    signals = build_signals(args)
    build_s = time.perf_counter() - start
    num_ops = block_ops(signals)
    result: dict[str, object] = {
        "core": core_mode(),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "prompt_blocks": f"{args.prefix_blocks} shared ({args.groups} groups) + "
        f"{args.unique_blocks} unique",
        "output_tokens": args.output_tokens,
        "capacity": args.capacity,
        "events": args.events,
        "gc_paused": not args.gc,
        "signals": len(signals),
        "block_ops": num_ops,
        "build_signals_ms": round(build_s * 1000, 1),
    }
    for backend in EVICTION_NAMES:
        times: list[float] = []
        manager: KvManager | None = None
        for _ in range(args.runs):
            elapsed, manager = run_manager(
                signals, backend, args.capacity, args.events, not args.gc
            )
            times.append(elapsed)
        assert manager is not None
        check(signals, manager, backend)
        median = statistics.median(times)
        result[backend] = {
            "block_ops_per_s": round(num_ops / median),
            "median_ms": round(median * 1000, 1),
            "end_to_end_block_ops_per_s": round(num_ops / (median + build_s)),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
