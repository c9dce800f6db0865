"""The lock-free pin protocol under real concurrency: 2 rank processes pin and unpin random READY
slots while this process, as the coordinator, stores, evicts and aborts as fast as it can,
SIGKILLs a rank once, reclaims its row and starts it again.

A violation is a slot evicted or reused while a rank held a pin on it; the ranks detect it by
re-validating (state, gen, hash, token ids) every run they hold. A negative control with a
coordinator that ignores pins shows the oracle does detect violations.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Iterator
from ctypes import c_longlong
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from shmkv.eviction.lru import LruBackend
from shmkv.g2 import DeadRankCleanup, G2Directory
from shmkv.shm import SHM_DIR, G2Segment
from tests.multiproc import _g2_rank_worker as worker

NUM_RANKS = 2
CAPACITY = 64
BLOCK_SIZE = 4
STARTUP_TIMEOUT_S = 30.0
STOP_INDEX = NUM_RANKS * worker.NUM_STATS

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(60)]


@pytest.fixture(scope="module", autouse=True)
def _resource_tracker_running() -> None:
    """Start multiprocessing's resource tracker before the per-test leak check looks.

    Spawning a process starts it on first use; it is a long-lived child of this process that
    belongs to the session, not to the test that happened to spawn first.
    """
    resource_tracker.ensure_running()


class _PinBlindDirectory(G2Directory):
    """Negative control: a coordinator that never sees pins."""

    def _is_pinned(self, slot: int) -> bool:
        return False

    def _pinned_mask(self, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        return np.zeros(idx.size, dtype=bool)


@dataclass
class Fleet:
    segment: G2Segment
    directory: G2Directory
    stats: Any  # a ctypes RawArray of c_longlong
    procs: dict[int, mp.process.BaseProcess] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(2024))
    next_seed: int = 100

    def spawn(self, rank: int) -> None:
        self.stats[rank * worker.NUM_STATS + worker.READY_FLAG] = 0
        ctx = mp.get_context("spawn")
        proc = ctx.Process(
            target=worker.rank_main,
            args=(self.segment.name, rank, self.stats, STOP_INDEX, self.next_seed, 0.3),
            name=f"g2-rank-{rank}",
            daemon=True,
        )
        self.next_seed += 1
        proc.start()
        self.procs[rank] = proc

    def wait_ready(self, rank: int) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.stats[rank * worker.NUM_STATS + worker.READY_FLAG]:
            assert self.procs[rank].is_alive(), f"rank {rank} died during startup"
            assert time.monotonic() < deadline, f"rank {rank} not ready in {STARTUP_TIMEOUT_S}s"
            time.sleep(0.01)

    def total(self, stat: int) -> int:
        return sum(int(self.stats[r * worker.NUM_STATS + stat]) for r in range(NUM_RANKS))

    def store_random(self, count: int, owner: int) -> None:
        """Reserve (batched eviction, or one fence per victim) and commit (in one batch, or
        block by block) `count` random blocks."""
        slots = self.directory.reserve(count, owner, vectorized=self.rng.random() < 0.5)
        if self.rng.random() < 0.5:
            seqs = [self.rng.getrandbits(64) for _ in slots]
            tokens = [worker.tokens_of(seq_hash, BLOCK_SIZE) for seq_hash in seqs]
            self.directory.commit_many(
                slots,
                seqs,
                [None] * len(seqs),
                [seq_hash ^ 1 for seq_hash in seqs],
                [0] * len(seqs),
                tokens,
                owner,
            )
            return
        for slot in slots:
            seq_hash = self.rng.getrandbits(64)
            self.directory.commit(
                slot,
                seq_hash,
                None,
                seq_hash ^ 1,
                0,
                worker.tokens_of(seq_hash, BLOCK_SIZE),
                owner,
            )

    def coordinator_step(self) -> None:
        """One random coordinator move: store (evicting if full), remove, or reserve+abort."""
        roll = self.rng.random()
        owner = self.rng.randrange(NUM_RANKS)
        if roll < 0.6:
            self.store_random(self.rng.randint(1, 3), owner)
        elif roll < 0.85:
            victim = int(self.segment.seq_hash[self.rng.randrange(CAPACITY)])
            self.directory.try_remove(victim)
        else:
            for slot in self.directory.reserve(1, owner):
                self.directory.abort(slot)
        self.directory.take_evicted()

    def kill_and_reclaim(self, rank: int) -> DeadRankCleanup:
        proc = self.procs[rank]
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        assert proc.exitcode == -signal.SIGKILL
        return self.directory.remove_dead_rank(rank)

    def stop(self) -> None:
        self.stats[STOP_INDEX] = 1
        for rank, proc in self.procs.items():
            proc.join(timeout=20)
            assert proc.exitcode == 0, f"rank {rank} exited with {proc.exitcode}"


def _make_fleet(fleet_id: str, directory_type: type[G2Directory]) -> Iterator[Fleet]:
    ctx = mp.get_context("spawn")
    stats = ctx.RawArray(c_longlong, STOP_INDEX + 1)
    with G2Segment.create(
        fleet_id, capacity=CAPACITY, block_size=BLOCK_SIZE, num_ranks=NUM_RANKS
    ) as segment:
        directory = directory_type(segment, LruBackend())
        fleet = Fleet(segment, directory, stats)
        try:
            fleet.store_random(CAPACITY, owner=0)
            for rank in range(NUM_RANKS):
                fleet.spawn(rank)
            for rank in range(NUM_RANKS):
                fleet.wait_ready(rank)
            yield fleet
        finally:
            stats[STOP_INDEX] = 1
            for proc in fleet.procs.values():
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            directory.close()
    assert not (SHM_DIR / segment.name).exists()


@pytest.fixture
def fleet(fleet_id: str) -> Iterator[Fleet]:
    yield from _make_fleet(fleet_id, G2Directory)


@pytest.fixture
def blind_fleet(fleet_id: str) -> Iterator[Fleet]:
    yield from _make_fleet(fleet_id, _PinBlindDirectory)


def test_no_slot_is_evicted_under_a_pin_even_across_a_sigkill(fleet: Fleet) -> None:
    duration_s, kill_at_s = 2.0, 1.0
    started = time.monotonic()
    cleanup: DeadRankCleanup | None = None
    steps = 0
    while time.monotonic() - started < duration_s:
        fleet.coordinator_step()
        steps += 1
        if cleanup is None and time.monotonic() - started >= kill_at_s:
            doomed = fleet.directory.reserve(2, owner_rank=0)
            cleanup = fleet.kill_and_reclaim(0)
            assert cleanup.slots_aborted == len(doomed)
            assert fleet.segment.pins[0].sum() == 0
            fleet.spawn(0)  # continues while the coordinator keeps working
    assert cleanup is not None
    fleet.wait_ready(0)
    time.sleep(0.2)  # let the restarted rank pin under eviction pressure too
    for _ in range(2000):
        fleet.coordinator_step()
    fleet.stop()

    assert fleet.total(worker.VIOLATIONS) == 0
    assert fleet.total(worker.TOKEN_VIOLATIONS) == 0
    assert fleet.total(worker.LEDGER) == 0
    assert cleanup.pins_released >= 1, "the killed rank always holds at least one run"
    assert cleanup.epoch == 1
    assert fleet.total(worker.RUNS) > 100
    assert fleet.total(worker.CHECKS) > fleet.total(worker.RUNS)
    stats = fleet.directory.stats()
    assert stats.num_evictions > 100
    assert stats.num_commits > 100
    # Every rank exited cleanly and unpinned: nothing is left pinned or reserved.
    assert fleet.segment.pins.sum() == 0
    assert fleet.directory.num_reserved == 0
    fleet.directory.check_invariants()


def test_negative_control_a_pin_blind_coordinator_is_caught(blind_fleet: Fleet) -> None:
    started = time.monotonic()
    while time.monotonic() - started < 1.5 and blind_fleet.total(worker.VIOLATIONS) == 0:
        for _ in range(100):
            blind_fleet.coordinator_step()
    blind_fleet.stop()
    assert blind_fleet.total(worker.VIOLATIONS) > 0
    assert blind_fleet.segment.pins.sum() == 0
