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

Decode without a Python loop per token (the *cohort*): a running request in steady decode
(past its second token, not yet at its last, no planned outputs) joins the cohort. A pass
schedules every cohort member with one subtraction from the budget and emits their tokens
with one bulk random draw; their computed / allocated watermarks and last-token pass are
left implicit (`_leave_cohort` writes them back). Per-member work happens only at events,
bucketed by pass number in `_due`: at a block boundary (`_CROSS`: promote the full block,
open a partial one) and the pass after (`_ALLOC`: allocate that partial block), done in
running order among the other running requests ("explicit" ones, which go through the
per-request path); and `_LEAVE` for its last token. A pass that cannot be proven
order-independent (`_bulk_is_exact`) dissolves the cohort first. Results, random draws and
manager calls are exactly those of scheduling every request one by one.

Steady decode without a Python call per pass (`run_decode_passes`, used by the offline
replay, and by the live rank at speedup inf, where passes take no simulated time and a stretch
of them runs at one instant): while every running request is a cohort member and no member
leaves, a stretch of passes is run in one call. Passes with no block event cost only their
duration; passes with block crossings / allocations do what `step`'s bulk path would
(`_event_pass`: one bulk token draw, then the Promotes). The caller bounds the stretch in time
(the next arrival, other ranks' clocks), so the passes and their results are exactly those of
calling `step` once per pass. `step` itself takes this path for a steady pass.

Lazy cohort tokens: while only cohort members run, their tokens are not appended pass by pass.
A plain pass's words are owed (drawn with the next draw from the rank's rng, or before anything
else draws from it); an event pass's words go to one flat buffer, `_pending` (one word per
member per pass, in running order). A member's tokens are appended when it needs them, at its
block crossing (its block is hashed), and everyone's when the running list or the cohort
changes (`_flush_pending`, e.g. at the start of a pass that is not a steady one). The draws and
their order are those of drawing every pass's tokens at once.
"""

from __future__ import annotations

import random
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any, Final

from shmkv.config import EngineConfig
from shmkv.errors import ConfigError, InvariantError
from shmkv.events import KvEvent
from shmkv.hashing import BlockHashes, PrefixHashCache, token_bytes
from shmkv.ids import Plh, RequestId
from shmkv.manager import (
    KvManager,
    PrefillCost,
    SwapInBlock,
    SwapInBlocked,
    SwapInScheduled,
)
from shmkv.offload import OffloadEngine, SwapInHandle
from shmkv.perf_model import PerfModel
from shmkv.sequence import (
    ActiveSequence,
    RandomWords,
    append_tokens,
    extend_crossing_words,
    extend_random_words,
    extend_strided,
)
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
        "cohort_base",
        "event_kind",
        "event_pass",
        "in_cohort",
        "last_token_ms",
        "last_token_pass",
        "leave_pass",
        "num_computed_tokens",
        "num_preemptions",
        "order",
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
        self.order = -1
        """Position key in the running list (ascending), set when it starts running."""
        self.in_cohort = False
        """In steady decode: watermarks and last-token pass/time are implicit (see module doc)."""
        self.event_pass = -1
        """Cohort members: the `_cohort_pass` of their next event (`event_kind`)."""
        self.event_kind = _LEAVE
        self.leave_pass = -1
        """Cohort members: the pass that emits their last token (they leave for it)."""
        self.cohort_base = 0
        """Cohort members: `len(tokens) - _cohort_pass` at rest (constant while a member);
        tokens still in `_pending` are not counted in `len(tokens)`."""


class _SwapIn:
    """A request parked on a G2 -> G1 swap-in."""

    __slots__ = ("handle", "pinned_prefix", "request", "skip_blocks", "slots")

    def __init__(
        self,
        request: _Request,
        handle: SwapInHandle,
        slots: list[int],
        skip_blocks: int,
        pinned_prefix: list[Plh],
    ) -> None:
        self.request = request
        self.handle = handle
        self.slots = slots
        self.skip_blocks = skip_blocks
        self.pinned_prefix = pinned_prefix
        """The request's G1 prefix (blocks `[0, skip_blocks)`), held until the onboarded
        blocks are registered behind it: evicting it meanwhile would orphan them (their Stored
        would name a parent the router was told is gone)."""


class PassResult:
    """What one pass did. Times are simulated milliseconds.

    A plain class rather than a dataclass: compiled (mypyc), a dataclass's generated
    `__init__` runs as interpreted code, several times slower than this one."""

    __slots__ = (
        "admissions",
        "completions",
        "did_work",
        "end_ms",
        "events",
        "first_tokens",
        "num_decode_tokens",
        "preemptions",
        "prev_end_ms",
        "rejections",
        "second_tokens",
        "start_ms",
        "token_gaps",
    )

    def __init__(
        self,
        start_ms: float,
        end_ms: float,
        did_work: bool,
        admissions: list[tuple[RequestId, int]] | None = None,
        first_tokens: list[RequestId] | None = None,
        second_tokens: list[RequestId] | None = None,
        num_decode_tokens: int = 0,
        prev_end_ms: float = 0.0,
        token_gaps: list[tuple[RequestId, float]] | None = None,
        completions: list[tuple[RequestId, int]] | None = None,
        rejections: list[RequestId] | None = None,
        preemptions: list[RequestId] | None = None,
        events: list[KvEvent] | None = None,
    ) -> None:
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.did_work = did_work
        self.admissions: list[tuple[RequestId, int]] = [] if admissions is None else admissions
        """(request, reused input tokens) for every admission of this pass."""
        self.first_tokens: list[RequestId] = [] if first_tokens is None else first_tokens
        self.second_tokens: list[RequestId] = [] if second_tokens is None else second_tokens
        self.num_decode_tokens = num_decode_tokens
        """Non-first tokens of requests that also emitted in the previous pass of this rank:
        each one's inter-token latency is `end_ms - prev_end_ms`."""
        self.prev_end_ms = prev_end_ms
        self.token_gaps: list[tuple[RequestId, float]] = [] if token_gaps is None else token_gaps
        """(request, ITL) of non-first tokens whose request skipped the previous pass."""
        self.completions: list[tuple[RequestId, int]] = [] if completions is None else completions
        """(request, output tokens) of requests that finished this pass."""
        self.rejections: list[RequestId] = [] if rejections is None else rejections
        self.preemptions: list[RequestId] = [] if preemptions is None else preemptions
        self.events: list[KvEvent] = [] if events is None else events

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _PASS_RESULT_FIELDS)
        return f"PassResult({fields})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PassResult):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _PASS_RESULT_FIELDS)


_PASS_RESULT_FIELDS: Final = (
    "start_ms",
    "end_ms",
    "did_work",
    "admissions",
    "first_tokens",
    "second_tokens",
    "num_decode_tokens",
    "prev_end_ms",
    "token_gaps",
    "completions",
    "rejections",
    "preemptions",
    "events",
)


class DecodeRun:
    """What `RankScheduler.run_decode_passes` did: consecutive steady decode passes, pass k
    from `ends_ms[k - 1]` (`start_ms` for the first) to `ends_ms[k]`, each emitting
    `num_decode_tokens` tokens whose ITL is the pass end minus the previous pass end
    (`prev_end_ms` before the first)."""

    __slots__ = ("ends_ms", "events", "num_decode_tokens", "prev_end_ms", "start_ms")

    def __init__(
        self,
        start_ms: float,
        prev_end_ms: float,
        ends_ms: list[float],
        num_decode_tokens: int,
        events: list[tuple[int, list[KvEvent]]],
    ) -> None:
        self.start_ms = start_ms
        self.prev_end_ms = prev_end_ms
        self.ends_ms = ends_ms
        self.num_decode_tokens = num_decode_tokens
        self.events = events
        """(pass index in the run, that pass's KV events) for the passes that have some."""

    def pass_results(self) -> list[PassResult]:
        """The `PassResult` that `step` would have returned for each pass."""
        events_of = dict(self.events)
        results: list[PassResult] = []
        start, prev = self.start_ms, self.prev_end_ms
        for index, end in enumerate(self.ends_ms):
            results.append(
                PassResult(
                    start,
                    end,
                    True,
                    num_decode_tokens=self.num_decode_tokens,
                    prev_end_ms=prev,
                    events=events_of.get(index, []),
                )
            )
            start = prev = end
        return results


_array_append: Final = array.append
# NOTE: Final: compiled, calling these skips the method lookup of `tokens.append(...)`.

_MAX_PENDING_WORDS: Final = 1 << 20
"""At most about this many cohort tokens are left pending (owed or in `_pending`): past it
they are drawn / appended (bounds the memory and the size of one draw)."""

_MAX_DECODE_RUN: Final = 4096
"""At most this many passes per `run_decode_passes` call (bounds its token draw)."""

_NO_PREFIX: Final = 0

# Cohort member events (see the module doc).
_CROSS: Final = 0
"""Its token fills its partial block: promoted, a new partial block opened (emission)."""
_ALLOC: Final = 1
"""The pass after: its decode step allocates the new partial block (scheduling)."""
_LEAVE: Final = 2
"""Its last token is due (or the cohort cannot serve it): back to the per-request path."""


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
        # NOTE: compiled, reading the (interpreted) config dataclass is a generic attribute
        # lookup: the options read at every pass are copied into typed attributes.
        self._max_num_batched_tokens: int = config.max_num_batched_tokens
        self._max_num_seqs: int = config.max_num_seqs
        self._caching: bool = config.enable_prefix_caching
        self.manager = KvManager(
            config.num_gpu_blocks,
            config.block_size,
            dp_rank,
            config.eviction,
            enable_events=enable_events and config.enable_prefix_caching,
        )
        if offload is not None:
            self.manager.attach_offload_engine(offload)
        self._has_offload = offload is not None
        """Whether the manager has an offload engine (refreshed at every pass)."""
        self.perf = PerfModel(config.speedup_ratio, config.decode_speedup_ratio)
        self._total_kv_tokens = config.num_gpu_blocks * config.block_size
        self.emit_token_ids = emit_token_ids and enable_events
        self._rng = random.Random(config.seed * 1_000_003 + dp_rank)
        self._prefix_hashes = PrefixHashCache(config.block_size)
        """Prompts sharing a prefix with a recent one hash only the rest."""
        self._requests: dict[RequestId, _Request] = {}
        self._waiting: deque[_Request] = deque()
        # The running list and two parallel lists (same order): each request's `order` key
        # (ascending, to find positions by bisection) and its token array (for bulk decode).
        # Change them only through `_run_append` / `_run_remove`.
        self._running: list[_Request] = []
        self._running_orders: list[int] = []
        self._running_tokens: list[array[int]] = []
        self._next_order = 0
        self._explicit: dict[int, _Request] = {}
        """Running requests outside the cohort, by `order`."""
        self._cohort_size = 0
        self._cohort_len_base = 0
        """Sum over cohort members of `len(tokens) - _cohort_pass` (constant while a member
        decodes), so the members' total context length is `base + size * _cohort_pass`."""
        self._cohort_pass = 0
        """Number of `step()` calls so far: the cohort's clock."""
        self._due: dict[int, list[_Request]] = {}
        """`_cohort_pass` -> members whose next token is an event (stale entries are skipped)."""
        self._last_emit_ms = 0.0
        """End of the last pass that emitted tokens (the cohort's last token time)."""
        self._crossing: list[_Request] = []
        """Members whose token this pass fills their block (set at the start of `step`)."""
        self._lazy = False
        """Some cohort tokens are not yet appended to their members' token arrays: those of
        passes `_pending_start .. _cohort_pass`, one word per member per pass in running
        order, first the words in `_pending`, then `_undrawn` words not yet drawn from the
        rng (drawn before anything else draws from it). Only while every running request is
        a member; `_flush_pending` appends them."""
        self._pending: array[int] = array("I")
        self._undrawn = 0
        self._pending_start = 0
        self._pending_ragged = False
        """Some member's tokens were appended ahead of the others (at its block crossing,
        `_emit_crossing_members`)."""
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
        *,
        block_hashes: BlockHashes | None = None,
    ) -> None:
        """Queue a request. Raises ConfigError on a duplicate id or a bad request.

        `block_hashes`: the prompt's full-block identities if the caller already computed them
        (`shmkv.hashing.hash_blocks` with this rank's block size), to skip hashing it again.
        """
        if request_id in self._requests:
            raise ConfigError(f"request {request_id} is already active on rank {self.dp_rank}")
        data: bytes | None = None
        own_hashes = False
        if block_hashes is None and self._caching:
            data = token_bytes(tokens)
            block_hashes = self._prefix_hashes.hash_blocks(data)
            own_hashes = True  # fresh lists: the sequence keeps them
        if self._undrawn:  # the sequence may draw from the rng: owed words come first
            self._settle_draws()
        seq = ActiveSequence(
            tokens,
            max_output_tokens,
            self.block_size,
            self._caching,
            self.emit_token_ids,
            output_token_ids,
            self._rng,
            block_hashes=block_hashes,
            token_data=data,
            own_hashes=own_hashes,
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
        if self._cohort_size and not self._explicit:
            run = self.run_decode_passes(now_ms, now_ms, now_ms)  # one steady pass
            if run is not None:
                return run.pass_results()[0]
        return self._step(now_ms)

    def _step(self, now_ms: float) -> PassResult:
        if self._lazy:
            self._flush_pending()
        result = PassResult(now_ms, now_ms, False)
        manager = self.manager
        self._has_offload = manager.has_offload_engine()
        if self._has_offload:
            manager.tick_offload_engine(now_ms)
            self._promote_swap_ins()
        budget = self._max_num_batched_tokens
        batch = [0, 0, 0]  # prompt requests, sum of isl, sum of prefix
        scheduled: dict[int, tuple[int, int, int]] = {}
        preempted_any = False

        crossing, allocating = self._take_due_events(now_ms)
        running = self._running
        explicit: list[_Request] = []
        if self._cohort_size and (self._explicit or allocating or self._cohort_size > budget):
            explicit = [self._explicit[order] for order in sorted(self._explicit)]
            if not self._bulk_is_exact(explicit, budget, len(allocating)):
                self._dissolve_cohort()
                crossing = allocating = []
        self._crossing = crossing
        if self._cohort_size:
            # Every member takes its decode step (the fast path below: no manager call, except
            # the partial block of an `_ALLOC` member, in running order among the explicit
            # requests). By `_bulk_is_exact` nothing exhausts the budget or fails an
            # allocation, so only the order of the manager calls matters, and it is kept.
            budget -= self._cohort_size
            if allocating:
                explicit = sorted(explicit + allocating, key=_order_of)
            manager = self.manager
            for request in explicit:
                if request.in_cohort:  # an `_ALLOC` member
                    partial = request.seq.partial_block
                    if partial is None or not manager.use_partial(partial):
                        raise InvariantError(f"bulk pass: allocation failed on rank {self.dp_rank}")
                    continue
                outcome, used = self._schedule_running(
                    request, budget, scheduled, batch, result, now_ms
                )
                if outcome is _Outcome.SCHEDULED:
                    budget -= used
                elif outcome is not _Outcome.SKIPPED or result.preemptions:
                    raise InvariantError(
                        f"bulk pass: unexpected {outcome.name} on rank {self.dp_rank}"
                    )
        else:
            index = 0
            while index < len(running) and budget > 0:
                outcome, used = self._schedule_running(
                    running[index], budget, scheduled, batch, result, now_ms
                )
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
        max_seqs = self._max_num_seqs
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
        num_members = self._cohort_size
        emitted: list[_Request] = []
        end_ms = self._emit_tokens(result, decode_start, emitted)
        self._cohort_pass += 1
        for request in emitted:
            self._try_join_cohort(request)
        result.did_work = (
            bool(scheduled)
            or num_members > 0
            or bool(result.completions)
            or bool(result.rejections)
        )
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

    def in_steady_decode(self) -> bool:
        """Whether `run_decode_passes` may apply: every running request is a cohort member and
        nothing is swapping in (a cheap test, before the caller works out its limits)."""
        return bool(self._cohort_size) and not self._explicit and not self._swap_ins

    def run_decode_passes(
        self, now_ms: float, before_ms: float, until_ms: float, *, zero_time_ok: bool = False
    ) -> DecodeRun | None:
        """Fast-forward through consecutive *steady decode passes*: every running request is
        a cohort member whose next token is not its last, nothing can be admitted and there
        is no offload engine. Such a pass emits one token per member and, at most, promotes
        the blocks its tokens fill and allocates the blocks opened the pass before (in bulk,
        as `step` does). It calls no manager method that depends on another rank, and its
        result holds nothing but those tokens and the KV events of the manager calls.

        A *plain* pass (no member at a block boundary) costs no per-request work here: its
        tokens are drawn and appended for a whole stretch of such passes at once. A pass with
        block events (crossings and allocations only, prefix caching on) runs `_event_pass`:
        what `step`'s bulk path does for it, without the general machinery.

        The first pass starts at `now_ms`; each next one starts when the previous ends, and
        runs only while that start is `< before_ms` and `<= until_ms` (the caller's limits:
        e.g. the next arrival and other ranks' clocks) and the pass is still a steady one.

        Passes taking no time (speedup inf) are refused unless `zero_time_ok`: `step` then
        runs them one by one. With `zero_time_ok` (the live rank at speedup inf) they run here
        too: at inf a stretch of steady decode passes runs at one instant, every pass of the
        run starting and ending at `now_ms`. The stretch still ends where the checks above
        end it (a member's last token, an event the bulk path does not serve, admission,
        `_MAX_DECODE_RUN` passes) and at the caller's limits (`until_ms >= now_ms` lets it go
        on, `before_ms <= now_ms` stops it after one pass). That is what calling `step(now_ms)`
        once per pass without moving the clock would do: such a pass has no deadline to
        stall-advance to (no offload engine; the requests' own deadlines are checked once).

        Returns None (and changes nothing) when the pass at `now_ms` is not steady or (without
        `zero_time_ok`) one taking no time: call `step`. Otherwise the passes run are exactly
        those `step` would have run, with the same results (see `DecodeRun`).
        """
        members = self._cohort_size
        if not members or self._explicit or self._swap_ins:
            return None
        if members > self._max_num_batched_tokens or (
            self._waiting and len(self._running) < self._max_num_seqs
        ):
            return None
        manager = self.manager
        if manager.has_offload_engine():
            return None
        if zero_time_ok and self.next_deadline_ms(now_ms) is not None:
            zero_time_ok = False  # a zero-time pass would stall-advance to it: `step` does
        due = self._due
        perf = self.perf
        total_kv_tokens = self._total_kv_tokens
        base = self._cohort_len_base
        ends: list[float] = []
        events: list[tuple[int, list[KvEvent]]] = []
        num_plain = 0
        """Plain passes run but not yet committed (tokens, clocks): see `_commit_plain`."""
        clock = self._cohort_pass
        start: float = now_ms
        caching = self._caching
        prev_end_ms = self._prev_end_ms
        while len(ends) < _MAX_DECODE_RUN:
            tokens = base + members * clock
            end = start + perf.scaled_decode_ms(members, tokens, tokens // members, total_kv_tokens)
            if end <= start and not zero_time_ok:  # a pass taking no time: `step` handles it
                break
            if clock in due:
                if not (caching and self._bulk_events_only(clock, start)):
                    break
                self._commit_plain(num_plain, clock, ends)
                num_plain = 0
                pass_events = self._event_pass(start, end)
                if pass_events:
                    events.append((len(ends), pass_events))
                clock += 1
                ends.append(end)
            else:
                if not ends:  # recorded before the run: they belong to its first pass
                    early = manager.take_events()
                    if early:
                        events.append((0, early))
                num_plain += 1
                clock += 1
                ends.append(end)
            if not (end < before_ms and end <= until_ms):
                break
            start = end
        if not ends:
            return None
        self._commit_plain(num_plain, clock, ends)
        return DecodeRun(now_ms, prev_end_ms, ends, members, events)

    def _bulk_events_only(self, clock: int, start_ms: float) -> bool:
        """Whether the events due at pass `clock` are only block crossings and allocations
        that `step`'s bulk path serves (no member leaves; the allocations fit)."""
        num_allocating = 0
        for request in self._due[clock]:
            if not request.in_cohort or request.event_pass != clock:
                continue
            kind = request.event_kind
            if kind == _LEAVE:
                return False
            if kind == _ALLOC:
                if request.blocked_until_ms > start_ms:
                    return False
                num_allocating += 1
        return not num_allocating or num_allocating <= self.manager.num_free_blocks()

    def _commit_plain(self, num_passes: int, clock: int, ends: list[float]) -> None:
        """Apply the last `num_passes` plain passes of a run (ending at `ends[-1]`, the
        cohort's clock now `clock`): their tokens, one word per member per pass in running
        order, are owed (`_defer_tokens`), drawn with the next draw from the rng."""
        if not num_passes:
            return
        self._defer_tokens(self._cohort_size * num_passes)
        self._has_offload = False
        self._crossing = []
        self._cohort_pass = clock
        self._pass_index += num_passes
        self._prev_end_ms = self._last_emit_ms = ends[-1]
        self._bound_pending()

    def _event_pass(self, now_ms: float, end_ms: float) -> list[KvEvent]:
        """One steady decode pass ending at `end_ms` whose events are block crossings and
        allocations only (`_bulk_events_only`, prefix caching on): what `_step`'s bulk path
        does for it, without the general machinery. Returns the pass's KV events."""
        self._has_offload = False  # `run_decode_passes` checked it
        crossing, allocating = self._take_due_events(now_ms)
        manager = self.manager
        if allocating:  # the scheduling phase: in running order
            if len(allocating) > 1:
                _sort_by_order(allocating)
            for request in allocating:
                partial = request.seq.partial_block
                if partial is None or not manager.use_partial(partial):
                    raise InvariantError(f"bulk pass: allocation failed on rank {self.dp_rank}")
        if crossing:
            self._emit_crossing_members(crossing)
        else:
            self._draw_plain_tokens()
        self._crossing = []
        self._cohort_pass += 1
        self._pass_index += 1
        self._prev_end_ms = self._last_emit_ms = end_ms
        self._bound_pending()
        return manager.take_events()

    # ── the running list and the cohort ───────────────────────────────────────────────────

    def _defer_tokens(self, count: int) -> None:
        """Plain passes of the members ran: their `count` tokens are owed (`_lazy`)."""
        if not self._lazy:
            self._lazy = True
            self._pending_start = self._cohort_pass
        self._undrawn += count

    def _bound_pending(self) -> None:
        """Between passes of a decode run: draw / append the pending tokens past a bound."""
        if self._undrawn + len(self._pending) > _MAX_PENDING_WORDS:
            self._flush_pending()

    def _settle_draws(self) -> None:
        """Draw the owed words (before anything else draws from the rng)."""
        if self._undrawn:
            extend_random_words(self._pending, self._rng, self._undrawn)
            self._undrawn = 0

    def _flush_pending(self) -> None:
        """Append the members' tokens still pending (`_lazy`) to their token arrays."""
        if not self._lazy:
            return
        self._settle_draws()
        pending = self._pending
        num_pending = len(pending)
        running = self._running
        members = len(running)
        if num_pending == members and not self._pending_ragged:  # one pass, nobody ahead
            append_tokens(self._running_tokens, pending)
        else:
            start = self._pending_start
            for position in range(members):
                request = running[position]
                tokens = request.seq.tokens
                offset = (len(tokens) - request.cohort_base - start) * members + position
                if offset + members >= num_pending:
                    if offset < num_pending:
                        _array_append(tokens, pending[offset])
                else:
                    extend_strided(tokens, pending, offset, members)
        self._pending = array("I")
        self._pending_ragged = False
        self._lazy = False

    def _run_append(self, request: _Request) -> None:
        if self._lazy:
            self._flush_pending()
        order = self._next_order
        self._next_order = order + 1
        request.order = order
        self._running.append(request)
        self._running_orders.append(order)
        self._running_tokens.append(request.seq.tokens)
        self._explicit[order] = request

    def _run_remove(self, request: _Request) -> None:
        """Drop a running request that is not a cohort member (materialize it first)."""
        if self._lazy:
            self._flush_pending()
        index = _position_of(self._running_orders, request.order)
        if request.in_cohort or self._running[index] is not request:
            raise InvariantError(f"request {request.request_id} is not an explicit running one")
        del self._running[index]
        del self._running_orders[index]
        del self._running_tokens[index]
        del self._explicit[request.order]

    def _leave_cohort(self, request: _Request, *, scheduled: bool) -> None:
        """Write back a member's implicit state: at rest (last token emitted in the previous
        pass) or, with `scheduled`, after this pass scheduled its decode step."""
        if self._lazy:
            self._flush_pending()
        seq = request.seq
        length = len(seq.tokens)
        done = length if scheduled else length - 1
        request.num_computed_tokens = done
        seq.num_allocated_tokens = done
        request.last_token_pass = self._pass_index - 1
        request.last_token_ms = self._last_emit_ms
        request.in_cohort = False
        self._cohort_size -= 1
        self._cohort_len_base -= length - self._cohort_pass
        self._explicit[request.order] = request

    def _dissolve_cohort(self) -> None:
        for request in self._running:
            if request.in_cohort:
                self._leave_cohort(request, scheduled=False)

    def _try_join_cohort(self, request: _Request) -> None:
        """After a pass in which `request` emitted a token: join the cohort if it is past its
        second token, its next token is not its last, and nothing is planned."""
        seq = request.seq
        if request.status is not Status.RUNNING or seq.output_token_ids is not None:
            return
        length = len(seq.tokens)
        generated = length - seq.num_input_tokens
        # Passes until the one emitting its last token (which it leaves the cohort for).
        quiet = seq.max_output_tokens - 1 - generated
        if generated < 2 or quiet < 1:
            return
        if request.num_computed_tokens != length - 1 or seq.num_allocated_tokens != length - 1:
            return
        if self._lazy:
            self._flush_pending()
        request.in_cohort = True
        request.cohort_base = length - self._cohort_pass
        request.leave_pass = self._cohort_pass + quiet
        self._plan_event(request, length, self._cohort_pass)
        del self._explicit[request.order]
        self._cohort_size += 1
        self._cohort_len_base += length - self._cohort_pass

    def _plan_event(self, request: _Request, length: int, at_pass: int) -> None:
        """Bucket a member's next event, given its length at rest before pass `at_pass`."""
        offset = length % self.block_size
        if offset == 0:
            kind, event_pass = _CROSS, at_pass
        elif offset == 1:
            kind, event_pass = _ALLOC, at_pass
        else:
            kind, event_pass = _CROSS, at_pass + self.block_size - offset
        if event_pass >= request.leave_pass:
            kind, event_pass = _LEAVE, request.leave_pass
        request.event_kind = kind
        request.event_pass = event_pass
        self._due_bucket(event_pass).append(request)

    def _take_due_events(self, now_ms: float) -> tuple[list[_Request], list[_Request]]:
        """Members whose event is due this pass: the crossing ones and the allocating ones
        (next events planned already); leaving ones are made explicit."""
        crossing: list[_Request] = []
        allocating: list[_Request] = []
        clock = self._cohort_pass
        buckets = self._due
        due = buckets.get(clock)
        if due is None:
            return crossing, allocating
        del buckets[clock]
        # The next event, as `_plan_event` would plan it: a crossing member allocates its new
        # block next pass; an allocating one crosses when its token fills that block. (The
        # order within a bucket does not matter: its members are sorted when used.) Those two
        # buckets are looked up once, when first needed.
        next_pass = clock + 1
        after_alloc = clock + self.block_size - 1
        to_allocate: list[_Request] | None = None
        to_cross: list[_Request] | None = None
        has_offload = self._has_offload
        for request in due:
            if not request.in_cohort or request.event_pass != clock:
                continue  # stale: it left the cohort or was rescheduled
            kind = request.event_kind
            if kind == _CROSS:
                crossing.append(request)
                if next_pass < request.leave_pass:
                    request.event_kind = _ALLOC
                    request.event_pass = next_pass
                    if to_allocate is None:
                        to_allocate = self._due_bucket(next_pass)
                    to_allocate.append(request)
                    continue
            elif kind == _ALLOC and not (has_offload or request.blocked_until_ms > now_ms):
                allocating.append(request)
                if after_alloc < request.leave_pass:
                    request.event_kind = _CROSS
                    request.event_pass = after_alloc
                    if to_cross is None:
                        to_cross = self._due_bucket(after_alloc)
                    to_cross.append(request)
                    continue
            else:  # leaving, or an offload could block the allocation: the per-request path
                self._leave_cohort(request, scheduled=False)
                continue
            request.event_kind = _LEAVE
            request.event_pass = request.leave_pass
            self._due_bucket(request.leave_pass).append(request)
        return crossing, allocating

    def _due_bucket(self, at_pass: int) -> list[_Request]:
        """The `_due` bucket of pass `at_pass` (created empty if missing)."""
        bucket = self._due.get(at_pass)
        if bucket is None:
            bucket = []
            self._due[at_pass] = bucket
        return bucket

    def _bulk_is_exact(self, explicit: list[_Request], budget: int, num_allocating: int) -> bool:
        """True when this pass may schedule the cohort in bulk: every request's whole demand
        fits the budget (so none is cut short or blocked, whatever the order) and the
        allocations (explicit requests' counted at their maximum, one block per allocating
        member) fit the free blocks (so none fails and nothing is preempted while the running
        list is scheduled)."""
        bs = self.block_size
        demand = self._cohort_size
        blocks = num_allocating
        for request in explicit:
            seq = request.seq
            length = len(seq.tokens)
            remaining = length - request.num_computed_tokens
            if remaining <= 0:
                return False
            demand += remaining
            blocks += -(-length // bs) - seq.num_allocated_tokens // bs
        return demand <= budget and blocks <= self.manager.num_free_blocks()

    def _check_cohort(self) -> None:
        members = [r for r in self._running if r.in_cohort]
        if len(members) != self._cohort_size:
            raise InvariantError(
                f"cohort holds {len(members)} members, counted {self._cohort_size}"
            )
        if len(members) + len(self._explicit) != len(self._running):
            raise InvariantError("running requests are neither cohort members nor explicit")
        clock = self._cohort_pass
        if sum(r.cohort_base for r in members) != self._cohort_len_base:
            raise InvariantError("cohort context length disagrees with its members")
        pending = len(self._pending) + self._undrawn
        first = self._pending_start if self._lazy else clock
        if (pending or self._lazy) and (
            not self._lazy or self._explicit or pending != (clock - first) * len(members)
        ):
            raise InvariantError("pending cohort tokens out of step with the cohort")
        for request in members:  # tokens appended up to a pass in `first .. clock`
            done = len(request.seq.tokens) - request.cohort_base
            if not first <= done <= clock:
                raise InvariantError(f"cohort member {request.request_id} has lost tokens")
        if self._running_orders != sorted(self._running_orders) or self._running_orders != [
            r.order for r in self._running
        ]:
            raise InvariantError("running order keys out of step with the running list")
        if len(self._running_tokens) != len(self._running) or any(
            t is not r.seq.tokens for t, r in zip(self._running_tokens, self._running, strict=True)
        ):
            raise InvariantError("running token arrays out of step with the running list")
        for request in members:
            if request.event_pass < self._cohort_pass or request not in self._due.get(
                request.event_pass, ()
            ):
                raise InvariantError(f"cohort member {request.request_id} has no due event")

    # ── scheduling one request ────────────────────────────────────────────────────────────

    def _schedule_running(
        self,
        request: _Request,
        budget: int,
        scheduled: dict[int, tuple[int, int, int]],
        batch: list[int],
        result: PassResult,
        now_ms: float,
    ) -> tuple[_Outcome, int]:
        """Schedule a running request's next tokens (a decode step or a prefill chunk).

        `budget` must be > 0. Two decode steps take a fast path with the outcome `_schedule`
        would give: the dangling token needs no new block; or it opens one (a lone partial
        block, allocated directly; a failed attempt changes nothing, so `_schedule` then
        redoes it with preemption)."""
        seq = request.seq
        length = len(seq.tokens)
        computed = request.num_computed_tokens
        if computed == length - 1:
            if length % self.block_size != 1:
                if seq.num_allocated_tokens >= computed:
                    seq.num_allocated_tokens = length
                    request.num_computed_tokens = length
                    scheduled[id(request)] = (1, 0, 0)
                    return _Outcome.SCHEDULED, 1
            elif (
                seq.num_allocated_tokens == computed
                and computed >= seq.num_input_tokens
                and request.blocked_until_ms <= now_ms
                and not self._has_offload
            ):
                partial = seq.partial_block
                if partial is not None and self.manager.use_partial(partial):
                    seq.num_allocated_tokens = length
                    request.num_computed_tokens = length
                    scheduled[id(request)] = (1, 0, seq.num_input_tokens)
                    return _Outcome.SCHEDULED, 1
        return self._schedule(request, None, budget, scheduled, batch, result, now_ms)

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
            self._run_append(request)
            result.admissions.append((request.request_id, cached))
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
        if victim.in_cohort:  # this pass already scheduled its decode step
            self._leave_cohort(victim, scheduled=True)
        self._run_remove(victim)
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

    def _emit_tokens(
        self, result: PassResult, decode_start_ms: float, emitted: list[_Request]
    ) -> float:
        """Every running request whose known tokens are all computed emits one token.

        Decode cost follows Dynamo 1.6.1: only requests already past their first token count,
        with u = (their context tokens) / (G1 tokens); a request finishing its prefill this
        pass gets its first token from the prefill work and adds no decode cost.

        Cohort members (all scheduled, past their second token) emit in bulk between the
        explicit requests, which go one by one; `emitted` receives the explicit emitters.
        With no explicit request left running, the members' tokens are left pending (`_lazy`).
        """
        members = self._cohort_size
        if not members:
            explicit = self._running
        elif self._explicit:
            explicit = [self._explicit[order] for order in sorted(self._explicit)]
        else:
            explicit = []
        walk: list[tuple[_Request, int]] = []  # explicit requests left running, crossing members
        num_ready = 0
        num_decoding = 0
        decoding_tokens = 0
        finished: list[_Request] = []
        for request in explicit:
            seq = request.seq
            length = len(seq.tokens)
            if request.num_computed_tokens < length:
                walk.append((request, _NOT_READY))
                continue
            generated = length - seq.num_input_tokens
            if generated >= seq.max_output_tokens:
                finished.append(request)
                continue
            walk.append((request, _READY))
            num_ready += 1
            if generated:
                num_decoding += 1
                decoding_tokens += length
        for request in finished:
            self._complete(request, result)
        if not num_ready and not members:
            return decode_start_ms
        if members:
            num_decoding += members
            decoding_tokens += self._cohort_len_base + members * self._cohort_pass
        decode_ms = 0.0
        if num_decoding:
            decode_ms = self.perf.scaled_decode_ms(
                num_decoding,
                decoding_tokens,
                decoding_tokens // num_decoding,
                self._total_kv_tokens,
            )
        end_ms = decode_start_ms + decode_ms
        self._last_emit_ms = end_ms
        if not members:
            for request, kind in walk:
                if kind == _READY:
                    self._emit_one(request, result, end_ms, None)
                    emitted.append(request)
            return end_ms
        crossing = [request for request in self._crossing if request.in_cohort]
        if not walk and not crossing:  # only members run: plain tokens, in running order
            self._draw_plain_tokens()
            result.num_decode_tokens += members
            return end_ms
        if not walk and self._caching:  # only members, some crossing
            self._emit_crossing_members(crossing)
            result.num_decode_tokens += members
            return end_ms
        if crossing:
            walk = sorted(walk + [(r, _CROSSING) for r in crossing], key=_walk_order)
        # Positions are taken before any completion below shrinks the running list. All the
        # pass's random words are drawn at once, in running order: one per plain member, and
        # what each other emitter's `generate_token` draws, at its place in the stream.
        orders = self._running_orders
        positions = [_position_of(orders, request.order) for request, _ in walk]
        tokens = list(self._running_tokens)
        words = RandomWords(
            self._rng,
            members
            - len(crossing)
            + sum(request.seq.next_token_words() for request, kind in walk if kind),
        )
        manager = self.manager
        draw = words.getrandbits
        start = 0
        for index in range(len(walk)):
            request, kind = walk[index]
            position = positions[index]
            if position > start:
                append_tokens(tokens[start:position], words.take(position - start))
            if kind == _READY:
                self._emit_one(request, result, end_ms, draw)
                emitted.append(request)
            elif kind == _CROSSING:
                promote = request.seq.generate_token(draw)
                if promote is not None:
                    manager.process(promote)
            start = position + 1
        if start < len(tokens):
            append_tokens(tokens[start:], words.take(len(tokens) - start))
        if words.remaining:
            raise InvariantError(f"bulk pass: {words.remaining} random words left unused")
        result.num_decode_tokens += members
        return end_ms

    def _emit_crossing_members(self, crossing: list[_Request]) -> None:
        """A pass where only cohort members run and `crossing` ones open a new block with
        their token: every token in one bulk draw (the words `generate_token` would draw one
        by one, in running order, after the owed ones) into `_pending`, then the crossing
        members' tokens are appended and their Promotes sent, in running order."""
        if len(crossing) > 1:
            _sort_by_order(crossing)
        orders = self._running_orders
        members = len(orders)
        positions = [_position_of(orders, request.order) for request in crossing]
        if not self._lazy:
            self._lazy = True
            self._pending_start = self._cohort_pass
        undrawn = self._undrawn  # owed words first, then this pass's
        self._undrawn = 0
        pending = self._pending
        partial_ids = extend_crossing_words(
            pending, undrawn + members, positions, self._rng, undrawn
        )
        # Each crossing member gets its pending tokens (ahead of the others), then its block.
        num_pending = len(pending)
        start = self._pending_start
        manager = self.manager
        for index in range(len(crossing)):
            request = crossing[index]
            seq = request.seq
            tokens = seq.tokens
            offset = (len(tokens) - request.cohort_base - start) * members + positions[index]
            if offset + members >= num_pending:
                _array_append(tokens, pending[offset])
            else:
                extend_strided(tokens, pending, offset, members)
            if seq.emit_token_ids:
                promote = seq.open_block(partial_ids[index])
                if promote is not None:
                    manager.process(promote)
                continue
            # `open_block` and `process(promote)` without the signal in between
            promoted: Any = seq.cross_block(partial_ids[index])  # Any: passed on boxed
            if promoted is not None:
                # lists of Any: compiled, the hashes pass through boxed (no int conversions)
                seqs: list[Any] = seq.seq_hashes
                local_hashes: list[Any] = seq.local_hashes
                plhs: list[Any] = seq.plhs
                position = len(seqs) - 1
                manager.promote_block(
                    promoted,
                    seqs[position],
                    seqs[position - 1] if position else None,
                    local_hashes[position],
                    plhs[position],
                    None,
                    position,
                )
        self._pending_ragged = True

    def _draw_plain_tokens(self) -> None:
        """A pass where only cohort members run and none opens a block: their tokens, one
        word each in running order, owed (`_defer_tokens`)."""
        self._defer_tokens(self._cohort_size)

    def _emit_one(
        self,
        request: _Request,
        result: PassResult,
        end_ms: float,
        draw: Callable[[int], int] | None,
    ) -> None:
        """One explicit request emits its token (Promote on a block boundary); `draw`: the
        source of its random bits (None: the rank's rng)."""
        seq = request.seq
        promote = seq.generate_token(draw)
        if promote is not None:
            self.manager.process(promote)
        generated = len(seq.tokens) - seq.num_input_tokens
        if generated == 1:
            result.first_tokens.append(request.request_id)
        else:
            if request.last_token_pass == self._pass_index - 1:
                result.num_decode_tokens += 1
            else:
                result.token_gaps.append((request.request_id, end_ms - request.last_token_ms))
            if generated == 2:
                result.second_tokens.append(request.request_id)
        request.last_token_pass = self._pass_index
        request.last_token_ms = end_ms
        if generated >= seq.max_output_tokens:
            self._complete(request, result)

    def _complete(self, request: _Request, result: PassResult) -> None:
        self._run_remove(request)
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
        # Hold the G1 prefix first: reserving destination slots may evict inactive blocks,
        # and the prefix must outlive the transfer (behavior.md §8.4 step 2).
        pinned = self.manager.try_pin_g1_prefix(seq.plhs[:skip])
        if pinned is None:
            return False
        outcome = self.manager.try_batch_swap_in(seq.plhs[skip:], now_ms)
        if isinstance(outcome, SwapInScheduled):
            self._waiting.popleft()
            request.status = Status.SWAPPING_IN
            self._swap_ins.append(
                _SwapIn(request, outcome.handle, outcome.destination_slots, skip, pinned)
            )
            return True
        self.manager.unpin_g1_prefix(pinned)
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
            # the PLHs chain the sequence hashes (prefix caching off, each is a root's)
            self.manager.register_swapped_in_blocks(
                entries, parent, swap.slots, start if seq.enable_prefix_caching else -1
            )
            self.manager.unpin_g1_prefix(swap.pinned_prefix)
            swap.request.status = Status.WAITING
            self._waiting.appendleft(swap.request)

    # ── invariants ────────────────────────────────────────────────────────────────────────

    def check_invariants(self) -> None:
        self.manager.check_invariants()
        self._check_cohort()


_NOT_READY: Final = 0
_READY: Final = 1
_CROSSING: Final = 2
"""Kinds of the emission walk's entries (a crossing member is never an explicit request)."""


def _order_of(request: _Request) -> int:
    return request.order


def _sort_by_order(requests: list[_Request]) -> None:
    """`requests.sort(key=_order_of)`: compiled, an insertion sort of these short, mostly
    sorted lists (a pass's due members) beats the generic sort's key calls."""
    if len(requests) > _INSERTION_SORT_MAX:
        requests.sort(key=_order_of)
        return
    for index in range(1, len(requests)):
        request = requests[index]
        order = request.order
        j = index - 1
        while j >= 0 and requests[j].order > order:
            requests[j + 1] = requests[j]
            j -= 1
        requests[j + 1] = request


_INSERTION_SORT_MAX: Final = 64


def _position_of(orders: list[int], order: int) -> int:
    """`bisect_left(orders, order)` for strictly increasing int `orders` (the running order
    keys). Compiled, a native loop beats the builtin's call; and as `orders[i]` lies between
    `orders[0] + i` and `orders[-1] - (len - 1 - i)`, the search starts in a window as wide
    as the gaps in the keys (a few, as requests leave), not the whole list."""
    count = len(orders)
    if not count:
        return 0
    # orders[i] >= orders[0] + i: every i >= order - orders[0] holds a key >= order.
    high = order - orders[0]
    if high > count:
        high = count
    elif high <= 0:
        return 0
    # orders[i] <= orders[-1] - (count - 1 - i): every i below this bound holds a key < order.
    low = order - orders[count - 1] + count - 1
    if low >= high:
        return high
    if low < 0:
        low = 0
    while low < high:
        mid = (low + high) >> 1
        if orders[mid] < order:
            low = mid + 1
        else:
            high = mid
    return low


def _walk_order(entry: tuple[_Request, int]) -> int:
    return entry[0].order


class _Outcome(IntEnum):
    SCHEDULED = 0
    BLOCKED = 1
    SKIPPED = 2
    PREEMPTED = 3


class _Admission(IntEnum):
    ADMIT = 0
    WAIT = 1
    REJECT = 2


__all__ = ["DecodeRun", "PassResult", "Promote", "RankScheduler", "Status"]
