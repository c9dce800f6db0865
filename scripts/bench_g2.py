"""Throughput of the shared G2 pool's rank side, the cost of creating a pool, and bytes per slot.

Measured in one process (the protocol costs the same whether or not the coordinator runs
elsewhere; contention is the subject of tests/multiproc/test_g2_protocol.py):

* `create_1m_s`: creating (sizing, fallocate, mapping, initialising) a 1 M-slot pool with
  8 ranks and 16-token blocks; median of `--repeat` runs.
* `bytes_per_slot`: shared metadata per slot excluding token ids (slot fields + index + pins),
  for 1, 2, 4 and 8 ranks, and the whole segment per slot for the 1 M pool (with token ids).
* for runs of 16 and 64 blocks, every block a hit in a full pool of `--slots` READY blocks
  (runs picked at random). Every `pin_unpin_*` figure counts blocks that went through the
  whole rank-side protocol: index lookup, validation (gen, state, hash), pin in the rank's
  row, full fence, re-check (state, gen), and unpin:
  - `scalar`: `pin_prefix(run, vectorized=False)` + `unpin`, one run per call (per block in
    Python);
  - `vector`: `pin_prefix(run, vectorized=True)` + `unpin`, one run per call (numpy, paying
    numpy's per-call cost for one run);
  - `batched16x` / `batched64x`: `pin_prefixes` of 16 / 64 runs in one call (one numpy pass,
    one fence) + `unpin_many` of what it pinned: the rank's batched path (the >= 1 M/s
    target);
  `lookup_*`: `lookup_prefix` (no pin) and `lookup_many`. Rates are blocks per wall second and
  per CPU second of this process (the rate an uncontended core would reach; on a shared
  machine wall-clock rates also measure the neighbours); median of `--repeat` runs of
  `--seconds` each.
* `commit_per_s`: filling the pool, reserve 64 + 64 `commit`s (per block); `commit_many_per_s`:
  reserve 64 + one `commit_many` of 64 (LRU policy).
* `churn_*`: a full pool under the coordinator's Lineage policy, each step reserving 64 slots
  (evicting 64 Lineage leaves, a few of them pinned by rank 0 so eviction backs off and pops
  more) and committing 64 new blocks: `scalar` = `reserve(vectorized=False)` + 64 `commit`s,
  `batched` = `reserve` (batched eviction, one fence per round) + `commit_many`.

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
from functools import partial
from typing import Any

import numpy as np

from shmkv.eviction import make_backend
from shmkv.eviction.lru import LruBackend
from shmkv.g2 import VECTOR_MIN_BLOCKS, G2Directory, G2RankView
from shmkv.shm import G2Segment, bytes_per_slot

BLOCK_SIZE = 16
RUN_LENGTHS = (16, 64)
BATCH_RUNS = (16, 64)
FILL_CHUNK = 64


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


def _fill(
    directory: G2Directory, rng: random.Random, length: int, *, batched: bool
) -> tuple[list[list[int]], float]:
    """Store chains of `length` blocks until the pool is full; returns them and commits/s."""
    chains: list[list[int]] = []
    tokens = list(range(BLOCK_SIZE))
    token_rows = np.tile(np.arange(BLOCK_SIZE, dtype=np.uint32), (length, 1))
    elapsed_s = 0.0
    while directory.num_free >= length:
        seqs = [rng.getrandbits(64) for _ in range(length)]
        parents = [None, *seqs[:-1]]
        started = time.perf_counter()
        slots = directory.reserve(length, owner_rank=1)
        if batched:
            locals_ = [seq ^ 1 for seq in seqs]
            directory.commit_many(
                slots, seqs, parents, locals_, list(range(length)), token_rows, owner_rank=1
            )
        else:
            for position, (slot, seq, parent) in enumerate(zip(slots, seqs, parents, strict=True)):
                directory.commit(slot, seq, parent, seq ^ 1, position, tokens, owner_rank=1)
        elapsed_s += time.perf_counter() - started
        chains.append(seqs)
    return chains, len(chains) * length / elapsed_s


def bench_commit(slots: int, repeat: int) -> dict[str, Any]:
    """Filling a pool: per-block commits against `commit_many`; median of `repeat` fills."""
    results: dict[str, Any] = {}
    for name, batched in (("commit_per_s", False), ("commit_many_per_s", True)):
        rates = []
        for _ in range(repeat):
            with G2Segment.create(
                _fleet_id("f"), capacity=slots, block_size=BLOCK_SIZE, num_ranks=2
            ) as segment:
                directory = G2Directory(segment, LruBackend())
                try:
                    rates.append(_fill(directory, random.Random(3), FILL_CHUNK, batched=batched)[1])
                finally:
                    directory.close()
        results[name] = round(statistics.median(rates))
    return results


def bench_churn(slots: int, seconds: float, repeat: int) -> dict[str, Any]:
    """Reserve-with-eviction + commit of 64 fresh blocks per step on a full Lineage pool."""
    results: dict[str, Any] = {}
    for name, batched in (("churn_scalar", False), ("churn_batched", True)):
        results[name], results[f"{name}_backoffs"] = _churn(slots, seconds, repeat, batched)
    return results


def _churn(slots: int, seconds: float, repeat: int, batched: bool) -> tuple[dict[str, float], int]:
    with G2Segment.create(
        _fleet_id("e"), capacity=slots, block_size=BLOCK_SIZE, num_ranks=2
    ) as segment:
        directory = G2Directory(segment, make_backend("lineage", slots)[0])
        view = G2RankView(segment, 0)
        rng = random.Random(9)
        try:
            chains, _ = _fill(directory, rng, FILL_CHUNK, batched=True)
            pinned = [view.pin_prefix(chain[:4]) for chain in chains[: len(chains) // 8]]
            token_rows = np.tile(np.arange(BLOCK_SIZE, dtype=np.uint32), (FILL_CHUNK, 1))
            tokens = list(range(BLOCK_SIZE))
            positions = list(range(FILL_CHUNK))

            def step() -> int:
                seqs = [rng.getrandbits(64) for _ in range(FILL_CHUNK)]
                parents = [None, *seqs[:-1]]
                got = directory.reserve(FILL_CHUNK, 1, vectorized=batched)
                if batched:
                    directory.commit_many(
                        got, seqs, parents, seqs, positions, token_rows, owner_rank=1
                    )
                else:
                    for pos, (slot, seq, parent) in enumerate(zip(got, seqs, parents, strict=True)):
                        directory.commit(slot, seq, parent, seq, pos, tokens, owner_rank=1)
                directory.take_evicted()
                return len(got)

            rate = _median_rate(step, seconds, repeat)
            backoffs = directory.stats().num_evict_backoffs
            directory.check_invariants()
            view.unpin_many([run for run in pinned if run is not None])
        finally:
            view.close()
            directory.close()
    return rate, backoffs


def bench_rank_side(slots: int, seconds: float, repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    rng = random.Random(11)
    with G2Segment.create(
        _fleet_id("r"), capacity=slots, block_size=BLOCK_SIZE, num_ranks=2
    ) as segment:
        directory = G2Directory(segment, LruBackend())
        view = G2RankView(segment, 0)
        try:
            chains, _ = _fill(directory, rng, max(RUN_LENGTHS), batched=True)
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

                def batched(feed: _RunFeeder = feed, runs: int = BATCH_RUNS[0]) -> int:
                    pinned = view.pin_prefixes([feed.next() for _ in range(runs)])
                    held = [run for run in pinned if run is not None]
                    view.unpin_many(held)
                    return sum(len(run) for run in held)

                def lookup(feed: _RunFeeder = feed) -> int:
                    return len(view.lookup_prefix(feed.next()))

                def lookup_many(feed: _RunFeeder = feed) -> int:
                    return int((view.lookup_many(feed.next()) >= 0).sum())

                results[f"pin_unpin_scalar_run{length}"] = _median_rate(scalar, seconds, repeat)
                results[f"pin_unpin_vector_run{length}"] = _median_rate(vector, seconds, repeat)
                for runs in BATCH_RUNS:
                    results[f"pin_unpin_batched{runs}x_run{length}"] = _median_rate(
                        partial(batched, feed, runs), seconds, repeat
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
    report.update(bench_commit(args.slots, args.repeat))
    report.update(bench_churn(args.slots, args.seconds, args.repeat))
    report.update(bench_rank_side(args.slots, args.seconds, args.repeat))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
