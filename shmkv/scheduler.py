"""Layer 1: the vLLM-style scheduler of one rank (behavior.md §7, §10.2, §11).

One `step(now_ms)` is one engine pass:

    1. tick the offload engine; swap-ins that completed go back to the FRONT of `waiting`
    2. schedule RUNNING requests in order under the token budget (decode = 1 dangling token,
       an unfinished prefill = its next chunk); on G1 exhaustion preempt (LIFO/FIFO) and retry
    3. admit WAITING requests (FIFO) while fewer than max_num_seqs run and nothing was
       preempted this pass: reject / wait / park on a G2 swap-in / schedule with cached credit
    4. prefill time from the scheduled prompt work; every running request whose known tokens
       are all computed emits one token (Promote now; the new block is allocated next pass)
    5. end = now + prefill + decode; with no model work, stall-advance to an offload deadline

The scheduler never reads a clock and never does I/O: time comes in as `now_ms`, results go
out as a `PassResult`. KV events of a pass are returned with it (visible at the pass end).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from shmkv.config import EngineConfig
from shmkv.errors import ConfigError
from shmkv.events import KvEvent
from shmkv.ids import RequestId
from shmkv.manager import (
    KvManager,
    PrefillCost,
    SwapInBlock,
    SwapInBlocked,
    SwapInScheduled,
)
from shmkv.offload import OffloadEngine, SwapInHandle
from shmkv.perf_model import PerfModel
from shmkv.sequence import ActiveSequence
from shmkv.signals import Deref, Promote, RawBlock, Use


class Status(IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    SWAPPING_IN = 3
    DONE = 4


class _Request:
    __slots__ = (
        "arrival_ms",
        "blocked_until_ms",
        "last_token_ms",
        "last_token_pass",
        "num_computed_tokens",
        "num_preemptions",
        "request_id",
        "seq",
        "status",
    )

    def __init__(self, request_id: RequestId, seq: ActiveSequence, arrival_ms: float) -> None:
        self.request_id = request_id
        self.seq = seq
        self.arrival_ms = arrival_ms
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.blocked_until_ms = -1.0
        self.last_token_pass = -2
        self.last_token_ms = 0.0


@dataclass(slots=True)
class _SwapIn:
    request: _Request
    handle: SwapInHandle
    slots: list[int]
    skip_blocks: int


@dataclass(slots=True)
class PassResult:
    """What one pass did. Times are simulated milliseconds."""

    start_ms: float
    end_ms: float
    did_work: bool
    admissions: list[tuple[RequestId, int]] = field(default_factory=list)
    """(request, reused input tokens) for every admission of this pass."""
    first_tokens: list[RequestId] = field(default_factory=list)
    second_tokens: list[RequestId] = field(default_factory=list)
    num_decode_tokens: int = 0
    """Non-first tokens of requests that also emitted in the previous pass of this rank: each
    one's inter-token latency is `end_ms - prev_end_ms`."""
    prev_end_ms: float = 0.0
    token_gaps: list[tuple[RequestId, float]] = field(default_factory=list)
    """(request, ITL) of non-first tokens whose request skipped the previous pass."""
    completions: list[tuple[RequestId, int]] = field(default_factory=list)
    """(request, output tokens) of requests that finished this pass."""
    rejections: list[RequestId] = field(default_factory=list)
    preemptions: list[RequestId] = field(default_factory=list)
    events: list[KvEvent] = field(default_factory=list)


_NO_PREFIX: Final = 0


class RankScheduler:
    """Scheduler + G1 manager (+ optional offload engine) of one DP rank.

    Args:
        config: engine options.
        dp_rank: this rank's index (stamped on its events).
        offload: an offload engine (in-process or shared G2), or None.
        enable_events: record KV events (ids are consumed only when on).
        emit_token_ids: attach token ids to Stored events (needed by the vLLM wire).
    """

    def __init__(
        self,
        config: EngineConfig,
        dp_rank: int = 0,
        offload: OffloadEngine | None = None,
        enable_events: bool = False,
        emit_token_ids: bool = False,
    ) -> None:
        self.config = config
        self.dp_rank = dp_rank
        self.block_size = config.block_size
        self.manager = KvManager(
            config.num_gpu_blocks,
            config.block_size,
            dp_rank,
            config.eviction,
            enable_events=enable_events and config.enable_prefix_caching,
        )
        if offload is not None:
            self.manager.attach_offload_engine(offload)
        self.perf = PerfModel(config.speedup_ratio, config.decode_speedup_ratio)
        self.emit_token_ids = emit_token_ids and enable_events
        self._rng = random.Random(config.seed * 1_000_003 + dp_rank)
        self._requests: dict[RequestId, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._swap_ins: list[_SwapIn] = []
        self.num_preemptions_total = 0
        self._pass_index = 0
        self._prev_end_ms = 0.0

    # ── intake ────────────────────────────────────────────────────────────────────────────

    def submit(
        self,
        request_id: RequestId,
        tokens: Sequence[int],
        max_output_tokens: int,
        arrival_ms: float,
        output_token_ids: Sequence[int] | None = None,
    ) -> None:
        """Queue a request. Raises ConfigError on a duplicate id or a bad request."""
        if request_id in self._requests:
            raise ConfigError(f"request {request_id} is already active on rank {self.dp_rank}")
        seq = ActiveSequence(
            tokens,
            max_output_tokens,
            self.block_size,
            self.config.enable_prefix_caching,
            self.emit_token_ids,
            output_token_ids,
            self._rng,
        )
        request = _Request(request_id, seq, arrival_ms)
        self._requests[request_id] = request
        self._waiting.append(request)

    # ── queries ───────────────────────────────────────────────────────────────────────────

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._swap_ins)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def has_work(self) -> bool:
        return bool(self._requests) or self.manager.earliest_offload_deadline() is not None

    def next_deadline_ms(self, now_ms: float | None = None) -> float | None:
        """The earliest time something this rank waits for can change: an offload or swap-in
        completing, or (after `now_ms`) a request blocked on an offload becoming schedulable.
        Without the latter a rank whose offloads settled would never wake for that request."""
        deadline = self.manager.earliest_offload_deadline()
        if now_ms is not None:
            for request in self._requests.values():
                until = request.blocked_until_ms
                if until > now_ms and (deadline is None or until < deadline):
                    deadline = until
        return deadline

    # ── one pass ──────────────────────────────────────────────────────────────────────────

    def step(self, now_ms: float) -> PassResult:
        result = PassResult(now_ms, now_ms, False)
        manager = self.manager
        if manager.has_offload_engine():
            manager.tick_offload_engine(now_ms)
            self._promote_swap_ins()
        budget = self.config.max_num_batched_tokens
        bs = self.block_size
        batch = [0, 0, 0]  # prompt requests, sum of isl, sum of prefix
        scheduled: dict[int, tuple[int, int, int]] = {}
        preempted_any = False

        running = self._running
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            seq = request.seq
            length = len(seq.tokens)
            computed = request.num_computed_tokens
            # Fast path: a decode step whose dangling token needs no new block.
            if (
                computed == length - 1
                and length % bs != 1
                and seq.num_allocated_tokens >= length - 1
            ):
                seq.num_allocated_tokens = length
                request.num_computed_tokens = length
                scheduled[id(request)] = (1, 0, 0)
                budget -= 1
                index += 1
                continue
            outcome, used = self._schedule(request, None, budget, scheduled, batch, result, now_ms)
            if outcome is _Outcome.SCHEDULED:
                budget -= used
                index += 1
            elif outcome is _Outcome.SKIPPED:
                index += 1
            elif outcome is _Outcome.BLOCKED:
                break
            else:  # the request itself was preempted: the list shifted under us
                preempted_any = True
            if result.preemptions:
                preempted_any = True

        waiting = self._waiting
        max_seqs = self.config.max_num_seqs
        while not preempted_any and waiting and len(running) < max_seqs:
            request = waiting[0]
            if request.blocked_until_ms > now_ms:
                break
            cost = manager.get_prefill_cost(request.seq)
            decision = self._admission(request, cost)
            if decision is _Admission.REJECT:
                waiting.popleft()
                self._finish(request)
                result.rejections.append(request.request_id)
                continue
            if decision is _Admission.WAIT:
                break
            if manager.has_offload_engine():
                parked = self._try_swap_in(request, cost, now_ms)
                if parked is True:
                    continue
                if parked is None:
                    break
            outcome, used = self._schedule(request, cost, budget, scheduled, batch, result, now_ms)
            if outcome is not _Outcome.SCHEDULED:
                break
            budget -= used
            if used == 0 and budget == 0:
                break
            if result.preemptions:
                preempted_any = True

        prefill_ms = 0.0
        if batch[0]:
            count = batch[0]
            prefill_ms = self.perf.scaled_prefill_ms(count, batch[1] // count, batch[2] // count)
        decode_start = now_ms + prefill_ms
        result.prev_end_ms = self._prev_end_ms
        end_ms = self._emit_tokens(result, decode_start)
        result.did_work = bool(scheduled) or bool(result.completions) or bool(result.rejections)
        if end_ms <= now_ms:
            deadline = self.next_deadline_ms(now_ms)
            if deadline is not None:
                end_ms = max(deadline, now_ms)
        result.end_ms = end_ms
        result.events = manager.take_events()
        if result.did_work:
            self._pass_index += 1
            self._prev_end_ms = end_ms
        return result

    # ── scheduling one request ────────────────────────────────────────────────────────────

    def _schedule(
        self,
        request: _Request,
        cost: PrefillCost | None,
        budget: int,
        scheduled: dict[int, tuple[int, int, int]],
        batch: list[int],
        result: PassResult,
        now_ms: float,
    ) -> tuple[_Outcome, int]:
        """Schedule `request`'s next tokens; returns the outcome and the tokens used."""
        if request.blocked_until_ms > now_ms:
            return _Outcome.SKIPPED, 0
        seq = request.seq
        bs = self.block_size
        from_waiting = cost is not None
        cached = 0
        if request.num_computed_tokens == 0:
            if cost is None:
                cost = self.manager.get_prefill_cost(seq)
            cached = self._recompute_rule(seq, cost.cached_tokens)
        before = request.num_computed_tokens + cached
        prompt_len = seq.num_input_tokens
        prompt_before = min(before, prompt_len)
        remaining = len(seq.tokens) - before
        prompt_remaining = prompt_len - prompt_before
        if (
            prompt_remaining > 0
            and not self.config.enable_chunked_prefill
            and prompt_remaining > budget
        ):
            return _Outcome.BLOCKED, 0
        desired = min(remaining, budget)
        if desired == 0 and remaining > 0:
            return _Outcome.BLOCKED, 0
        target = before + desired
        while True:
            if target <= seq.num_allocated_tokens:
                break
            signal = seq.prepare_allocation(target)
            if signal is None:
                seq.commit_allocation(target)
                break
            status = self._use_all_or_nothing(signal)
            if status == 1:
                seq.commit_allocation(target)
                break
            if status == 2:  # blocked on an offload: retry when it settles
                deadline = self.manager.earliest_offload_deadline()
                request.blocked_until_ms = now_ms if deadline is None else deadline
                return (_Outcome.BLOCKED if from_waiting else _Outcome.SKIPPED), 0
            victim = self._pick_victim()
            if victim is None:
                target = before
                break
            self._preempt(victim, scheduled, batch, result)
            if victim is request:
                return _Outcome.PREEMPTED, 0
        used = target - before
        if used == 0 and target < len(seq.tokens):
            return _Outcome.BLOCKED, 0
        request.num_computed_tokens = target
        prompt_tokens = min(target, prompt_len) - prompt_before
        scheduled[id(request)] = (used, prompt_tokens, prompt_before)
        if prompt_tokens > 0:
            batch[0] += 1
            batch[1] += prompt_before + prompt_tokens
            batch[2] += prompt_before
        if from_waiting:
            self._waiting.popleft()
            request.status = Status.RUNNING
            self._running.append(request)
            result.admissions.append((request.request_id, cached))
        del bs
        return _Outcome.SCHEDULED, used

    def _use_all_or_nothing(self, signal: Use) -> int:
        """1 = every block held; 0 = out of G1 capacity; 2 = blocked on an offload.
        A short Use is rolled back so allocation is all-or-nothing (Dynamo's newer contract)."""
        manager = self.manager
        processed = manager.process(signal)
        if processed == len(signal.raw_blocks):
            return 1
        blocked = manager.last_use_blocked
        if processed:
            held: list[RawBlock] = signal.raw_blocks[:processed]
            held.reverse()
            manager.process(Deref.from_raw(held))
        return 2 if blocked else 0

    def _recompute_rule(self, seq: ActiveSequence, cached_tokens: int) -> int:
        """vLLM recomputes the last block when the whole known context is cached."""
        limit = ((len(seq.tokens) - 1) // self.block_size) * self.block_size
        return min(cached_tokens, limit)

    def _admission(self, request: _Request, cost: PrefillCost) -> _Admission:
        config = self.config
        seq = request.seq
        known_blocks = seq.current_known_blocks()
        if request.status is Status.WAITING:
            if known_blocks > config.num_gpu_blocks:
                return _Admission.REJECT
            if config.max_model_len is not None and seq.num_input_tokens >= config.max_model_len:
                return _Admission.REJECT
        free = config.num_gpu_blocks - self.manager.num_active_blocks()
        if known_blocks - cost.active_cached_tokens // self.block_size > free:
            return _Admission.WAIT
        return _Admission.ADMIT

    # ── preemption ────────────────────────────────────────────────────────────────────────

    def _pick_victim(self) -> _Request | None:
        running = self._running
        order = (
            range(len(running) - 1, -1, -1)
            if self.config.preemption_mode == "lifo"
            else range(len(running))
        )
        for i in order:
            return running[i]
        return None

    def _preempt(
        self,
        victim: _Request,
        scheduled: dict[int, tuple[int, int, int]],
        batch: list[int],
        result: PassResult,
    ) -> None:
        self._running.remove(victim)
        for signal in victim.seq.reset_with_signal():
            self.manager.process(signal)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        victim.status = Status.PREEMPTED
        self.num_preemptions_total += 1
        undone = scheduled.pop(id(victim), None)
        if undone is not None and undone[1] > 0:
            batch[0] -= 1
            batch[1] -= undone[2] + undone[1]
            batch[2] -= undone[2]
        self._waiting.appendleft(victim)
        result.preemptions.append(victim.request_id)

    # ── tokens ────────────────────────────────────────────────────────────────────────────

    def _emit_tokens(self, result: PassResult, decode_start_ms: float) -> float:
        """Every running request whose known tokens are all computed emits one token.

        Decode cost follows Dynamo 1.6.1: only requests already past their first token count,
        with u = (their context tokens) / (G1 tokens); a request finishing its prefill this
        pass gets its first token from the prefill work and adds no decode cost.
        """
        running = self._running
        ready: list[_Request] = []
        num_decoding = 0
        decoding_tokens = 0
        finished: list[_Request] = []
        for request in running:
            seq = request.seq
            if request.num_computed_tokens < len(seq.tokens):
                continue
            if seq.generated_tokens >= seq.max_output_tokens:
                finished.append(request)
                continue
            ready.append(request)
            if seq.generated_tokens:
                num_decoding += 1
                decoding_tokens += len(seq.tokens)
        for request in finished:
            self._complete(request, result)
        if not ready:
            return decode_start_ms
        decode_ms = 0.0
        if num_decoding:
            bs = self.block_size
            decode_ms = self.perf.scaled_decode_ms(
                num_decoding,
                decoding_tokens,
                decoding_tokens // num_decoding,
                self.config.num_gpu_blocks * bs,
            )
        end_ms = decode_start_ms + decode_ms
        manager = self.manager
        pass_index = self._pass_index
        prev_index = pass_index - 1
        num_consecutive = 0
        for request in ready:
            seq = request.seq
            promote = seq.generate_token()
            if promote is not None:
                manager.process(promote)
            generated = seq.generated_tokens
            if generated == 1:
                result.first_tokens.append(request.request_id)
            else:
                if request.last_token_pass == prev_index:
                    num_consecutive += 1
                else:
                    result.token_gaps.append((request.request_id, end_ms - request.last_token_ms))
                if generated == 2:
                    result.second_tokens.append(request.request_id)
            request.last_token_pass = pass_index
            request.last_token_ms = end_ms
            if generated >= seq.max_output_tokens:
                self._complete(request, result)
        result.num_decode_tokens = num_consecutive
        return end_ms

    def _complete(self, request: _Request, result: PassResult) -> None:
        self._running.remove(request)
        for signal in request.seq.free_signal():
            self.manager.process(signal)
        self._finish(request)
        result.completions.append((request.request_id, request.seq.generated_tokens))

    def _finish(self, request: _Request) -> None:
        request.status = Status.DONE
        del self._requests[request.request_id]

    # ── swap-in (G2 -> G1) ────────────────────────────────────────────────────────────────

    def _try_swap_in(self, request: _Request, cost: PrefillCost, now_ms: float) -> bool | None:
        """True = parked on a swap-in; False = nothing to onboard; None = blocked on an offload."""
        seq = request.seq
        # NOTE: not cached_tokens // bs, which stops at the prompt: a preempted request's
        # generated blocks may already be in G1, and onboarding them again would requeue the
        # request forever (a livelock seen under `shmkv stress`).
        skip = cost.cached_blocks
        if skip >= len(seq.plhs):
            return False
        outcome = self.manager.try_batch_swap_in(seq.plhs[skip:], now_ms)
        if isinstance(outcome, SwapInScheduled):
            self._waiting.popleft()
            request.status = Status.SWAPPING_IN
            self._swap_ins.append(_SwapIn(request, outcome.handle, outcome.destination_slots, skip))
            return True
        if isinstance(outcome, SwapInBlocked):
            deadline = self.manager.earliest_offload_deadline()
            request.blocked_until_ms = now_ms if deadline is None else deadline
            return None
        return False

    def _promote_swap_ins(self) -> None:
        engine = self.manager.offload_engine
        if engine is None or not self._swap_ins:
            return
        done = {id(h) for h in engine.take_completed_onboards()}
        if not done:
            return
        still: list[_SwapIn] = []
        completed: list[_SwapIn] = []
        for swap in self._swap_ins:
            (completed if id(swap.handle) in done else still).append(swap)
        self._swap_ins = still
        for swap in reversed(completed):
            seq = swap.request.seq
            start = swap.skip_blocks
            count = swap.handle.plan.num_blocks
            entries = [
                SwapInBlock(
                    seq.seq_hashes[i],
                    seq.plhs[i],
                    seq.local_hashes[i] if seq.local_hashes else 0,
                    seq.block_token_ids(i) if self.emit_token_ids else None,
                )
                for i in range(start, start + count)
            ]
            parent = seq.seq_hashes[start - 1] if start > 0 else None
            self.manager.register_swapped_in_blocks(entries, parent, swap.slots)
            swap.request.status = Status.WAITING
            self._waiting.appendleft(swap.request)

    # ── invariants ────────────────────────────────────────────────────────────────────────

    def check_invariants(self) -> None:
        self.manager.check_invariants()


class _Outcome(IntEnum):
    SCHEDULED = 0
    BLOCKED = 1
    SKIPPED = 2
    PREEMPTED = 3


class _Admission(IntEnum):
    ADMIT = 0
    WAIT = 1
    REJECT = 2


__all__ = ["PassResult", "Promote", "RankScheduler", "Status"]
