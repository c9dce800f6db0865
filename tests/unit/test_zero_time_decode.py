"""Zero-time steady decode (speedup inf): `run_decode_passes(..., zero_time_ok=True)` runs a
stretch of steady decode passes at one instant, exactly as calling `step` once per pass
without moving the clock; the rank accounts such a run in bulk (`_decode_pairs`)."""

from __future__ import annotations

import math

from shmkv.clock import ManualClock
from shmkv.config import EngineConfig
from shmkv.engine import _decode_pairs
from shmkv.scheduler import DecodeRun, PassResult, RankScheduler

ARRIVALS = {0: 6, 9: 2, 40: 3, 95: 1}
"""Tick -> number of requests submitted at that tick (after the previous tick's passes)."""


def _scheduler(**overrides: object) -> RankScheduler:
    fields: dict[str, object] = {
        "num_gpu_blocks": 512,
        "block_size": 4,
        "max_num_batched_tokens": 64,
        "speedup_ratio": math.inf,
    }
    fields.update(overrides)
    config = EngineConfig.from_mapping(fields)
    return RankScheduler(config, enable_events=True, emit_token_ids=True)


def _submit_due(sched: RankScheduler, tick: int, now_ms: float, next_id: list[int]) -> None:
    for _ in range(ARRIVALS.get(tick, 0)):
        request_id = next_id[0]
        next_id[0] += 1
        prompt = [(request_id * 131 + i) % 997 for i in range(5 + 3 * request_id)]
        sched.submit(request_id, prompt, 20 + 7 * request_id, now_ms)


State = tuple[list[list[int]], int, float, int, str, list[int]]


def _end_state(sched: RankScheduler, now_ms: float) -> State:
    """Tokens, pass clocks, registered blocks and the next draw of the rank's rng."""
    assert not sched.has_work()
    tokens = [list(request.seq.tokens) for request in sched._requests.values()]
    sched.submit(999, [1, 2, 3], 1, now_ms)
    return (
        tokens,
        sched._pass_index,
        sched._prev_end_ms,
        sched._cohort_pass,
        repr(sched._requests[999].seq.partial_block),
        sorted(sched.manager.registered_seq_hashes()),
    )


def _drive_with_runs(**overrides: object) -> tuple[list[str], list[list[int]], State]:
    """Every tick the clock moves 0.5 ms; at each tick the rank runs a few bursts at that
    instant, as the live rank does at speedup inf: a steady stretch in one zero-time run,
    else one `step`. Returns every pass's result, the passes of each burst per tick, the end
    state."""
    sched = _scheduler(**overrides)
    clock = ManualClock()
    passes: list[str] = []
    schedule: list[list[int]] = []
    next_id = [0]
    for tick in range(400):
        now = clock.now_ms()
        _submit_due(sched, tick, now, next_id)
        if not sched.has_work() and tick > max(ARRIVALS):
            break
        bursts: list[int] = []
        for _ in range(3):
            if not sched.has_work():
                break
            run = (
                sched.run_decode_passes(now, math.inf, now, zero_time_ok=True)
                if sched.in_steady_decode()
                else None
            )
            results = run.pass_results() if run is not None else [sched.step(now)]
            for result in results:
                assert result.start_ms == result.end_ms == now
                passes.append(repr(result))
            bursts.append(len(results))
            sched.check_invariants()
        schedule.append(bursts)
        clock.advance(0.5)
    return passes, schedule, _end_state(sched, clock.now_ms())


def _drive_with_steps(schedule: list[list[int]], **overrides: object) -> tuple[list[str], State]:
    """The reference: the same ticks, each burst of `_drive_with_runs` as that many `step`s
    at the same instant (`step` runs zero-time passes one by one, its general path)."""
    sched = _scheduler(**overrides)
    clock = ManualClock()
    passes: list[str] = []
    next_id = [0]
    for tick, bursts in enumerate(schedule):
        now = clock.now_ms()
        _submit_due(sched, tick, now, next_id)
        for count in bursts:
            passes.extend(repr(sched.step(now)) for _ in range(count))
        sched.check_invariants()
        clock.advance(0.5)
    return passes, _end_state(sched, clock.now_ms())


def _assert_runs_equal_steps(**overrides: object) -> list[int]:
    passes, schedule, state = _drive_with_runs(**overrides)
    assert _drive_with_steps(schedule, **overrides) == (passes, state)
    return [count for bursts in schedule for count in bursts]


def test_zero_time_runs_equal_stepping_pass_by_pass() -> None:
    counts = _assert_runs_equal_steps()
    assert max(counts) >= 10  # long stretches did run in one call
    assert sum(c for c in counts if c > 1) * 2 > sum(counts)


def test_zero_time_runs_without_prefix_caching_stop_at_block_events() -> None:
    counts = _assert_runs_equal_steps(enable_prefix_caching=False)
    assert max(counts) > 1


def test_zero_time_runs_under_a_small_budget_and_pool() -> None:
    _assert_runs_equal_steps(num_gpu_blocks=64, max_num_batched_tokens=8, max_num_seqs=4)


def _steady(sched: RankScheduler) -> float:
    """Run `sched` (4 requests) into steady decode at time 0; returns the time."""
    for request_id in range(4):
        sched.submit(request_id, list(range(1 + request_id, 9 + request_id)), 40, 0.0)
    for _ in range(50):
        if sched.in_steady_decode() and not sched._due.get(sched._cohort_pass):
            return 0.0
        sched.step(0.0)
    raise AssertionError("no steady decode")


def test_zero_time_passes_are_refused_by_default() -> None:
    sched = _scheduler()
    now = _steady(sched)
    before = sched._pass_index
    assert sched.run_decode_passes(now, math.inf, now) is None
    assert sched._pass_index == before  # nothing changed
    run = sched.run_decode_passes(now, math.inf, now, zero_time_ok=True)
    assert run is not None
    assert run.ends_ms == [now] * len(run.ends_ms)
    assert len(run.ends_ms) > 1
    assert sched._pass_index == before + len(run.ends_ms)


def test_zero_time_run_keeps_the_callers_limits() -> None:
    sched = _scheduler()
    now = _steady(sched)
    one = sched.run_decode_passes(now, now, now, zero_time_ok=True)  # `before_ms`: one pass
    assert one is not None
    assert len(one.ends_ms) == 1
    assert sched.run_decode_passes(now, math.inf, now - 1.0, zero_time_ok=True) is not None
    # the passes with a finite duration: `until_ms == now` lets exactly one run
    timed = _scheduler(speedup_ratio=1.0)
    start = _steady(timed)
    run = timed.run_decode_passes(start, math.inf, start, zero_time_ok=True)
    assert run is not None
    assert len(run.ends_ms) == 1
    assert run.ends_ms[0] > start


def _per_pass_pairs(run: DecodeRun) -> list[float]:
    pairs: list[float] = []
    for result in run.pass_results():
        pairs += [result.end_ms - result.prev_end_ms, result.num_decode_tokens]
    return pairs


def test_bulk_decode_pairs_give_the_samples_of_one_pair_per_pass() -> None:
    runs = [
        DecodeRun(10.0, 7.0, [10.0] * 5, 3, []),  # zero time after a gap
        DecodeRun(10.0, 10.0, [10.0] * 4, 2, []),  # zero time, no gap
        DecodeRun(10.0, 7.0, [10.0], 3, []),  # one pass
        DecodeRun(10.0, 7.0, [13.0, 16.0, 19.0, 21.0, 23.0], 4, []),  # timed passes
        DecodeRun(10.0, 8.0, [11.0, 12.0, 12.0, 15.0], 1, []),
    ]
    for run in runs:
        pairs = _decode_pairs(run)
        assert _samples(pairs) == _samples(_per_pass_pairs(run))
        assert all(type(pairs[i]) is int for i in range(1, len(pairs), 2))
    assert _decode_pairs(runs[0]) == [3.0, 3, 0.0, 12]  # the zero-gap passes share a pair
    assert _decode_pairs(runs[2]) == [3.0, 3]
    assert _decode_pairs(runs[3]) == _per_pass_pairs(runs[3])  # timed passes: one per pass


def _samples(pairs: list[float]) -> list[tuple[float, int]]:
    """What the collector keeps of flat [itl_ms, num_tokens, ...] pairs: runs of equal ITL
    values with their token counts, in order."""
    out: list[tuple[float, int]] = []
    for itl_ms, count in zip(pairs[0::2], pairs[1::2], strict=True):
        if out and out[-1][0] == itl_ms:
            out[-1] = (itl_ms, out[-1][1] + int(count))
        else:
            out.append((itl_ms, int(count)))
    return out


def test_pass_results_of_a_zero_time_run() -> None:
    run = DecodeRun(5.0, 2.0, [5.0, 5.0], 3, [])
    assert run.pass_results() == [
        PassResult(5.0, 5.0, True, num_decode_tokens=3, prev_end_ms=2.0),
        PassResult(5.0, 5.0, True, num_decode_tokens=3, prev_end_ms=5.0),
    ]
