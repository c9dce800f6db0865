"""Layer 1: offline replay of N ranks in one process on a virtual clock (behavior.md §13).

The driver releases requests (open loop: at their timestamps; closed loop: at most
`replay_concurrency` sessions in flight, the next one released when a slot frees; later turns
of a session: `delay_ms` after the previous turn completes), routes each to a rank, and always
runs the pass of the rank that can start earliest. A rank's KV events become visible to the
router at the end of the pass that produced them. A rank in steady decode runs, in one call,
the stretch of passes the loop would give it in a row (`RankScheduler.run_decode_passes`):
the same passes and results, without a loop iteration per pass.

Pure: no clock, no I/O. Wall time, files, sockets and progress bars belong to the caller,
which can observe every pass through `on_pass` and every event batch through `on_events`.
"""

from __future__ import annotations

import gc
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from shmkv.config import EngineConfig
from shmkv.driver import SessionDriver
from shmkv.errors import ConfigError
from shmkv.events import KvEvent, StorageTier
from shmkv.hashing import BlockHashes, PrefixHashCache, token_bytes
from shmkv.indexer import KvIndex
from shmkv.offload_local import LocalG2Engine, OffloadConfig
from shmkv.report import MetricsCollector
from shmkv.scheduler import DecodeRun, PassResult, RankScheduler
from shmkv.stats import record_pass
from shmkv.workload import RequestSpec, Session

ROUTER_MODES: Final = ("round_robin", "kv")
HOST_TIER_CREDIT: Final = 0.75
"""How much a host-tier (G2) prefix block is worth to the KV router, relative to a device hit."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayOptions:
    engine: EngineConfig
    data_parallel_size: int = 1
    router_mode: str = "round_robin"
    replay_concurrency: int | None = None
    enable_events: bool = False
    """Record KV events on every rank (forced on by the kv router)."""
    emit_token_ids: bool = False
    max_sim_time_ms: float | None = None
    pause_gc: bool = True
    """Pause Python's cyclic garbage collector while `run()` runs (restored afterwards). The
    replay creates and drops hundreds of thousands of small containers but no reference
    cycles, so reference counting frees everything and the collector's passes are wasted
    time (about 10% of a replay)."""

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ConfigError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.router_mode not in ROUTER_MODES:
            raise ConfigError(
                f"router_mode must be one of {', '.join(ROUTER_MODES)}, got {self.router_mode!r}"
            )
        if self.replay_concurrency is not None and self.replay_concurrency < 1:
            raise ConfigError(f"replay_concurrency must be >= 1, got {self.replay_concurrency}")
        if self.max_sim_time_ms is not None and not self.max_sim_time_ms > 0:
            raise ConfigError(f"max_sim_time_ms must be > 0, got {self.max_sim_time_ms}")


@dataclass(slots=True)
class ReplayOutcome:
    collector: MetricsCollector
    ranks: list[RankScheduler]
    g2_engines: list[LocalG2Engine | None]
    num_passes: int = 0
    num_preemptions: int = 0
    num_rejected: int = 0
    num_incomplete: int = 0
    final_time_ms: float = 0.0
    per_rank_requests: list[int] = field(default_factory=list)

    def state_dump(self) -> dict[str, object]:
        """What every rank holds at the end: the ground truth for a router's index."""
        ranks: dict[str, dict[str, list[int]]] = {}
        for rank, scheduler in enumerate(self.ranks):
            engine = self.g2_engines[rank]
            ranks[str(rank)] = {
                StorageTier.DEVICE.value: sorted(scheduler.manager.registered_seq_hashes()),
                StorageTier.HOST_PINNED.value: sorted(engine.held_seq_hashes()) if engine else [],
            }
        return {"block_size": self.ranks[0].block_size, "ranks": ranks}


EventsHook = Callable[[int, float, list[KvEvent]], None]
"""(rank, pass end in simulated ms, events) for every pass that produced events."""
PassHook = Callable[[int, PassResult], None]


class _Rank:
    __slots__ = (
        "busy",
        "clock_ms",
        "idle_retries",
        "index",
        "num_routed",
        "scheduler",
        "stalled",
    )

    def __init__(self, index: int, scheduler: RankScheduler) -> None:
        self.index = index
        self.scheduler = scheduler
        self.clock_ms = 0.0
        self.stalled = False
        self.idle_retries = 0
        self.busy = False
        """`scheduler.has_work()`, refreshed after each of its passes and submissions (nothing
        else changes it)."""
        self.num_routed = 0


class Replay:
    """One offline replay. Build it, then call `run()` once."""

    def __init__(
        self,
        sessions: Sequence[Session],
        options: ReplayOptions,
        *,
        on_events: EventsHook | None = None,
        on_pass: PassHook | None = None,
    ) -> None:
        self.options = options
        engine = options.engine
        want_events = options.enable_events or options.router_mode == "kv" or on_events is not None
        self._g2: list[LocalG2Engine | None] = []
        ranks: list[_Rank] = []
        for index in range(options.data_parallel_size):
            offload = None
            if engine.has_g2:
                offload = LocalG2Engine(
                    OffloadConfig(
                        num_g2_blocks=engine.num_g2_blocks,
                        block_size_bytes=engine.block_size_bytes,
                        bandwidth_g1_to_g2_gbps=engine.bandwidth_g1_to_g2_gbps,
                        bandwidth_g2_to_g1_gbps=engine.bandwidth_g2_to_g1_gbps,
                        offload_batch_size=engine.offload_batch_size,
                    )
                )
            self._g2.append(offload)
            scheduler = RankScheduler(
                engine,
                index,
                offload,
                enable_events=want_events,
                emit_token_ids=options.emit_token_ids,
            )
            ranks.append(_Rank(index, scheduler))
        self._ranks = ranks
        self._sessions = sessions
        self._on_events = on_events
        self._on_pass = on_pass
        self._index = KvIndex(len(ranks)) if options.router_mode == "kv" else None
        self._block_size = engine.block_size
        self._hash_prompts = (
            self._index is not None and len(ranks) > 1 and engine.enable_prefix_caching
        )
        """The kv router hashes each prompt to route it (the chosen rank reuses the hashes)."""
        self._prefix_hashes = PrefixHashCache(engine.block_size)
        self._pending_events: deque[tuple[float, int, list[KvEvent]]] = deque()
        self.collector = MetricsCollector()
        self._rr_next = 0

    # ── arrivals ──────────────────────────────────────────────────────────────────────────

    def _route(self, spec: RequestSpec, block_hashes: BlockHashes | None) -> _Rank:
        """Pick the rank; `block_hashes` = the prompt's identities (kv router, caching on)."""
        ranks = self._ranks
        if self._index is None or len(ranks) == 1:
            rank = ranks[self._rr_next % len(ranks)]
            self._rr_next += 1
            return rank
        bs = self._block_size
        hashes = [] if block_hashes is None else block_hashes.seq_hashes
        num_blocks = -(-len(spec.tokens) // bs)
        # cost = (num_blocks - device - HOST_TIER_CREDIT * host) + load, lowest wins, the
        # first rank on a tie. A rank's cost is at least `num_blocks - len(hashes) + load`,
        # so ranks are visited by load and the prefix walk is skipped for those that cannot
        # win: the same pick as computing every cost.
        by_load = sorted(
            (
                rank.scheduler.manager.num_active_blocks()
                + rank.scheduler.num_waiting * num_blocks,
                rank.index,
            )
            for rank in ranks
        )
        best: _Rank | None = None
        best_cost = math.inf
        floor = num_blocks - len(hashes)
        for load, index in by_load:
            lowest = floor + load
            if lowest > best_cost or (
                lowest == best_cost and best is not None and index > best.index
            ):
                break
            device, host = self._index.overlap_blocks(index, hashes)
            cost = (num_blocks - device - HOST_TIER_CREDIT * host) + load
            if cost < best_cost or (cost == best_cost and best is not None and index < best.index):
                best, best_cost = ranks[index], cost
        assert best is not None
        return best

    def _dispatch(self, time_ms: float, spec: RequestSpec) -> None:
        self._flush_events(time_ms)
        block_hashes = (
            self._prefix_hashes.hash_blocks(token_bytes(spec.tokens))
            if self._hash_prompts
            else None
        )
        rank = self._route(spec, block_hashes)
        rank.num_routed += 1
        scheduler = rank.scheduler
        if not rank.busy or rank.stalled:
            rank.clock_ms = max(rank.clock_ms, time_ms)
            rank.stalled = False
        self.collector.on_arrival(
            spec.request_id,
            time_ms,
            len(spec.tokens),
            max_output_tokens=spec.max_output_tokens,
            session_id=spec.session_id,
            turn_index=spec.turn_index,
        )
        scheduler.submit(
            spec.request_id,
            spec.tokens,
            spec.max_output_tokens,
            time_ms,
            block_hashes=block_hashes,
        )
        rank.busy = True

    def _flush_events(self, time_ms: float) -> None:
        pending = self._pending_events
        index = self._index
        while pending and pending[0][0] <= time_ms:
            _end, rank, events = pending.popleft()
            if index is not None:
                index.apply(rank, events)

    # ── the loop ──────────────────────────────────────────────────────────────────────────

    def run(self) -> ReplayOutcome:
        if not (self.options.pause_gc and gc.isenabled()):
            return self._run()
        gc.disable()
        try:
            return self._run()
        finally:
            gc.enable()

    def _run_decode_passes(
        self, rank: _Rank, next_arrival_ms: float, max_time_ms: float
    ) -> DecodeRun | None:
        """Let `rank` fast-forward through plain decode passes (`run_decode_passes`) for as
        long as the loop would keep picking it: each pass starts before the next arrival and
        before the clock of every other running rank (or at it, for a rank listed after it,
        which loses ties), and not after `max_time_ms`. Accounts the passes; None = not one."""
        before_ms = next_arrival_ms
        until_ms = max_time_ms
        index = rank.index
        for other in self._ranks:
            if other is rank or other.stalled or not other.busy:
                continue
            clock_ms = other.clock_ms
            if other.index < index:
                if clock_ms < before_ms:
                    before_ms = clock_ms
            elif clock_ms < until_ms:
                until_ms = clock_ms
        run = rank.scheduler.run_decode_passes(rank.clock_ms, before_ms, until_ms)
        if run is None:
            return None
        rank.idle_retries = 0
        rank.clock_ms = run.ends_ms[-1]
        collector = self.collector  # a direct (compiled) call, not a bound method object
        num_tokens = run.num_decode_tokens
        prev_end_ms = run.prev_end_ms
        for end_ms in run.ends_ms:
            collector.on_decode_tokens(end_ms - prev_end_ms, num_tokens)
            prev_end_ms = end_ms
        for index, events in run.events:
            end_ms = run.ends_ms[index]
            self._pending_events.append((end_ms, rank.index, events))
            if self._on_events is not None:
                self._on_events(rank.index, end_ms, events)
        if self._on_pass is not None:
            for result in run.pass_results():
                self._on_pass(rank.index, result)
        return run

    def _run(self) -> ReplayOutcome:
        options = self.options
        driver = SessionDriver(self._sessions, options.replay_concurrency)
        outcome = ReplayOutcome(self.collector, [r.scheduler for r in self._ranks], self._g2)
        collector = self.collector
        max_time = options.max_sim_time_ms if options.max_sim_time_ms is not None else math.inf
        ranks = self._ranks
        while True:
            best: _Rank | None = None
            for rank in ranks:
                if rank.stalled or not rank.busy:
                    continue
                if best is None or rank.clock_ms < best.clock_ms:
                    best = rank
            next_arrival = driver.next_arrival_ms()
            if best is None and math.isinf(next_arrival):
                break
            if best is None or next_arrival <= best.clock_ms:
                if next_arrival > max_time:
                    break
                # every request due at that time, in release order (the rank clocks cannot
                # move between them: a dispatch only wakes idle ranks at that time)
                for time_ms, spec in driver.pop_due(next_arrival):
                    self._dispatch(time_ms, spec)
                continue
            if best.clock_ms > max_time:
                break
            scheduler = best.scheduler
            if scheduler.in_steady_decode():  # even one pass is cheaper this way than `step`
                run = self._run_decode_passes(best, next_arrival, max_time)
                if run is not None:
                    outcome.num_passes += len(run.ends_ms)
                    continue
            result = scheduler.step(best.clock_ms)
            best.busy = scheduler.has_work()
            outcome.num_passes += 1
            if not result.did_work and result.end_ms <= result.start_ms:
                if result.events:  # e.g. host-tier landings this tick: the router sees them
                    self._pending_events.append((result.end_ms, best.index, result.events))
                    if self._on_events is not None:
                        self._on_events(best.index, result.end_ms, result.events)
                # A deadline at this very time (an instant transfer this pass started) lands
                # at the next tick: run again, a few times at most, before calling it a stall.
                deadline = scheduler.next_deadline_ms(result.start_ms)
                best.idle_retries += 1
                if deadline is None or deadline > result.start_ms or best.idle_retries > 3:
                    best.stalled = True  # nothing can move until the next arrival
                continue
            best.idle_retries = 0
            best.clock_ms = result.end_ms
            end = result.end_ms
            record_pass(
                collector,
                start_ms=result.start_ms,
                end_ms=end,
                prev_end_ms=result.prev_end_ms,
                admissions=result.admissions,
                first_tokens=result.first_tokens,
                second_tokens=result.second_tokens,
                num_decode_tokens=result.num_decode_tokens,
                token_gaps=result.token_gaps,
                completions=result.completions,
                preemptions=result.preemptions,
            )
            outcome.num_preemptions += len(result.preemptions)
            outcome.num_rejected += len(result.rejections)
            for request_id in result.rejections:
                driver.on_finished(request_id, end, ended_session=True)
            for request_id, _num_output in result.completions:
                driver.on_finished(request_id, end)
            if result.events:
                self._pending_events.append((end, best.index, result.events))
                if self._on_events is not None:
                    self._on_events(best.index, end, result.events)
            if self._on_pass is not None:
                self._on_pass(best.index, result)
        self._flush_events(math.inf)
        outcome.final_time_ms = max((r.clock_ms for r in ranks), default=0.0)
        outcome.num_incomplete = sum(r.scheduler.num_requests for r in ranks) + driver.num_pending
        outcome.per_rank_requests = [r.num_routed for r in ranks]
        return outcome


def run_replay(
    sessions: Sequence[Session],
    options: ReplayOptions,
    *,
    on_events: EventsHook | None = None,
    on_pass: PassHook | None = None,
) -> ReplayOutcome:
    return Replay(sessions, options, on_events=on_events, on_pass=on_pass).run()
