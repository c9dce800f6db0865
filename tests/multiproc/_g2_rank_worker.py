"""A rank process for the G2 protocol stress test (started with the `spawn` method).

It pins and unpins random READY-looking slots through `G2RankView` (the per-block path, the
numpy path, and batches of several lists) as fast as it can and, as an oracle, re-validates
every run it holds (same generation, same hash, state READY or EVICTING, token ids derived from
the hash) right after pinning, on every loop, and just before unpinning. Any mismatch is a
violation: the coordinator evicted or reused a slot this rank held pinned.

Counters live in a shared `RawArray` (row `rank`, written only by this rank), so they survive
a SIGKILL; cell `stop_index` is the coordinator's stop flag.
"""

from __future__ import annotations

import os
import random
from typing import Final

from shmkv.errors import InvariantError
from shmkv.g2 import G2RankView, PinnedRun
from shmkv.shm import EVICTING, READY, G2Segment

STAT_FIELDS: Final = (
    "ready",
    "iterations",
    "runs",
    "blocks",
    "misses",
    "checks",
    "violations",
    "token_violations",
    "ledger_errors",
)
NUM_STATS: Final = len(STAT_FIELDS)
READY_FLAG, ITERATIONS, RUNS, BLOCKS, MISSES, CHECKS, VIOLATIONS, TOKEN_VIOLATIONS, LEDGER = range(
    NUM_STATS
)
MAX_HELD_RUNS: Final = 8
HELD_STATES: Final = (READY, EVICTING)


def tokens_of(seq_hash: int, block_size: int) -> list[int]:
    """The token ids the test coordinator stores with a block: derived from its hash."""
    return [(seq_hash >> (8 * (i % 8))) & 0xFFFF_FFFF for i in range(block_size)]


def rank_main(
    name: str,
    rank: int,
    stats: list[int],
    stop_index: int,
    seed: int,
    vectorized_share: float,
) -> None:
    """Run until the stop flag is set (or the parent dies), then unpin everything and exit."""
    base = rank * NUM_STATS
    parent = os.getppid()
    rng = random.Random(seed)
    segment = G2Segment.attach(name)
    view = G2RankView(segment, rank)
    state, gen, seq_hash = segment.cells("state"), segment.cells("gen"), segment.cells("seq_hash")
    capacity, block_size = segment.capacity, segment.block_size
    held: list[PinnedRun] = []

    def intact(run: PinnedRun) -> bool:
        stats[base + CHECKS] += 1
        for slot, slot_gen, key in zip(run.slots, run.gens, run.seq_hashes, strict=True):
            # EVICTING is fine: the coordinator is checking, it will see the pin and back off.
            if gen[slot] != slot_gen or seq_hash[slot] != key or state[slot] not in HELD_STATES:
                return False
        return True

    def tokens_intact(run: PinnedRun) -> bool:
        rows = view.read_tokens(run).tolist()
        return all(
            row == tokens_of(key, block_size) for row, key in zip(rows, run.seq_hashes, strict=True)
        )

    try:
        stats[base + READY_FLAG] = 1
        iteration = 0
        while not stats[stop_index]:
            iteration += 1
            stats[base + ITERATIONS] = stats[base + ITERATIONS] + 1
            if iteration % 1024 == 0 and os.getppid() != parent:
                break  # the coordinator died: nothing left to protect
            batch = [
                [seq_hash[rng.randrange(capacity)] for _ in range(rng.randint(1, 8))]
                for _ in range(rng.choice((1, 1, 3)))
            ]
            if len(batch) > 1:
                runs = view.pin_prefixes(batch)
            else:
                # numpy path, per-block reference, or the default (`_pin_short` from 4 blocks)
                vectorized = True if rng.random() < vectorized_share else rng.choice((False, None))
                runs = [view.pin_prefix(batch[0], vectorized=vectorized)]
            for run in runs:
                if run is None:
                    stats[base + MISSES] += 1
                    continue
                stats[base + RUNS] += 1
                stats[base + BLOCKS] += len(run)
                if not intact(run):
                    stats[base + VIOLATIONS] += 1
                if not tokens_intact(run):
                    stats[base + TOKEN_VIOLATIONS] += 1
                held.append(run)
            for kept in held:
                if not intact(kept):
                    stats[base + VIOLATIONS] += 1
            # Keep at least one run pinned at all times, so a SIGKILL always leaves pins behind.
            while len(held) > MAX_HELD_RUNS or (len(held) > 1 and rng.random() < 0.3):
                done = held.pop(rng.randrange(len(held)))
                if not intact(done):
                    stats[base + VIOLATIONS] += 1
                if not tokens_intact(done):
                    stats[base + TOKEN_VIOLATIONS] += 1
                if rng.random() < 0.5:
                    view.unpin(done)
                else:
                    view.release(done)  # validate + unpin (the onboarding path)
        try:
            view.check_ledger()
        except InvariantError:
            stats[base + LEDGER] += 1
    finally:
        view.close()
        segment.close()
