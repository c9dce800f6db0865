"""Throughput of the shared G2 pool's rank side, the cost of creating a pool, and bytes per slot.

Measured in one process (the protocol costs the same whether or not the coordinator runs
elsewhere; contention is the subject of tests/multiproc/test_g2_protocol.py):

* `create_1m_s`: creating (sizing, fallocate, mapping, initialising) a 1 M-slot pool with
  8 ranks and 16-token blocks; median of `--repeat` runs.
* `bytes_per_slot`: shared metadata per slot excluding token ids (slot fields + index + pins),
  for 1, 2, 4 and 8 ranks, and the whole segment per slot for the 1 M pool (with token ids).
* for runs of 16 and 64 blocks, every block a hit in a full pool of `--slots` READY blocks
  (runs picked at random): `pin_unpin_*`: `pin_prefix` (lookup + pin + fence + re-check) then
  `unpin`, on the per-block path (`scalar`) and the numpy path (`vector`); `batched16x`:
  `pin_prefixes` of 16 runs at once then `unpin_many`; `lookup_*`: `lookup_prefix` (no pin)
  and `lookup_many`. Rates are blocks per wall second and per CPU second of this process (the
  rate an uncontended core would reach; on a shared machine wall-clock rates also measure the
  neighbours); median of `--repeat` runs of `--seconds` each.
* `commit_per_s`: the coordinator storing single blocks (reserve 16 + 16 commits, LRU policy).

Prints one JSON line.

    .venv/bin/python scripts/bench_g2.py [--slots 65536] [--seconds 1.0] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from shmkv.eviction.lru import LruBackend
from shmkv.g2 import VECTOR_MIN_BLOCKS, G2Directory, G2RankView
from shmkv.shm import G2Segment, bytes_per_slot

BLOCK_SIZE = 16
RUN_LENGTHS = (16, 64)
BATCH_RUNS = 16


def _fleet_id(tag: str) -> str:
    return f"bench{tag}{uuid.uuid4().hex[:8]}"


def _rate(body: Callable[[], int], seconds: float) -> tuple[float, float]:
    """Blocks per wall second and per CPU second while `body` (returning blocks done) loops."""
    blocks = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    deadline = wall0 + seconds
    while time.perf_counter() < deadline:
        blocks += body()
    wall = time.perf_counter() - wall0
    cpu = max(time.process_time() - cpu0, 1e-9)
    return blocks / wall, blocks / cpu


def _median_rate(body: Callable[[], int], seconds: float, repeat: int) -> dict[str, float]:
    runs = [_rate(body, seconds) for _ in range(repeat)]
    return {
        "per_s": round(statistics.median(r[0] for r in runs)),
        "per_cpu_s": round(statistics.median(r[1] for r in runs)),
    }


def bench_create(repeat: int) -> dict[str, Any]:
    times: list[float] = []
    total_bytes = 0
    for _ in range(repeat):
        started = time.perf_counter()
        segment = G2Segment.create(
            _fleet_id("c"), capacity=1_000_000, block_size=BLOCK_SIZE, num_ranks=8
        )
        times.append(time.perf_counter() - started)
        total_bytes = segment.total_bytes
        segment.close()
        segment.unlink()
    return {
        "create_1m_s": round(statistics.median(times), 4),
        "create_1m_s_max": round(max(times), 4),
        "segment_1m_bytes": total_bytes,
        "segment_1m_bytes_per_slot_with_tokens": round(total_bytes / 1_000_000, 1),
    }


class _RunFeeder:
    """Hands out runs in a fixed random order (so every figure sees the same access pattern)."""

    def __init__(self, runs: list[list[int]], rng: random.Random) -> None:
        self._runs = runs
        self._order = [rng.randrange(len(runs)) for _ in range(4096)]
        self._cursor = 0

    def next(self) -> list[int]:
        self._cursor = (self._cursor + 1) % len(self._order)
        return self._runs[self._order[self._cursor]]


def _fill(directory: G2Directory, rng: random.Random, length: int) -> tuple[list[list[int]], float]:
    """Store chains of `length` blocks until the pool is full; returns them and commits/s."""
    chains: list[list[int]] = []
    tokens = list(range(BLOCK_SIZE))
    elapsed_s = 0.0
    while directory.num_free >= length:
        started = time.perf_counter()
        parent: int | None = None
        chain: list[int] = []
        for position, slot in enumerate(directory.reserve(length, owner_rank=1)):
            seq_hash = rng.getrandbits(64)
            directory.commit(slot, seq_hash, parent, seq_hash ^ 1, position, tokens, owner_rank=1)
            parent = seq_hash
            chain.append(seq_hash)
        elapsed_s += time.perf_counter() - started
        chains.append(chain)
    return chains, len(chains) * length / elapsed_s


def bench_rank_side(slots: int, seconds: float, repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    rng = random.Random(11)
    with G2Segment.create(
        _fleet_id("r"), capacity=slots, block_size=BLOCK_SIZE, num_ranks=2
    ) as segment:
        directory = G2Directory(segment, LruBackend())
        view = G2RankView(segment, 0)
        try:
            chains, commit_per_s = _fill(directory, rng, max(RUN_LENGTHS))
            results["commit_per_s"] = round(commit_per_s)
            directory.check_invariants()
            for length in RUN_LENGTHS:
                feed = _RunFeeder([chain[:length] for chain in chains], rng)

                def scalar(feed: _RunFeeder = feed) -> int:
                    run = view.pin_prefix(feed.next(), vectorized=False)
                    assert run is not None
                    view.unpin(run)
                    return len(run)

                def vector(feed: _RunFeeder = feed) -> int:
                    run = view.pin_prefix(feed.next(), vectorized=True)
                    assert run is not None
                    view.unpin(run)
                    return len(run)

                def batched(feed: _RunFeeder = feed) -> int:
                    pinned = view.pin_prefixes([feed.next() for _ in range(BATCH_RUNS)])
                    held = [run for run in pinned if run is not None]
                    view.unpin_many(held)
                    return sum(len(run) for run in held)

                def lookup(feed: _RunFeeder = feed) -> int:
                    return len(view.lookup_prefix(feed.next()))

                def lookup_many(feed: _RunFeeder = feed) -> int:
                    return int((view.lookup_many(feed.next()) >= 0).sum())

                results[f"pin_unpin_scalar_run{length}"] = _median_rate(scalar, seconds, repeat)
                results[f"pin_unpin_vector_run{length}"] = _median_rate(vector, seconds, repeat)
                results[f"pin_unpin_batched{BATCH_RUNS}x_run{length}"] = _median_rate(
                    batched, seconds, repeat
                )
                results[f"lookup_prefix_run{length}"] = _median_rate(lookup, seconds, repeat)
                results[f"lookup_many_run{length}"] = _median_rate(lookup_many, seconds, repeat)
            view.check_ledger()
        finally:
            view.close()
            directory.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--slots", type=int, default=65_536, help="READY blocks in the pool")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one timed run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "bytes_per_slot": {f"ranks_{r}": bytes_per_slot(r) for r in (1, 2, 4, 8)},
        "vector_min_blocks": VECTOR_MIN_BLOCKS,
        "block_size": BLOCK_SIZE,
        "slots": args.slots,
    }
    report.update(bench_create(args.repeat))
    report.update(bench_rank_side(args.slots, args.seconds, args.repeat))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
