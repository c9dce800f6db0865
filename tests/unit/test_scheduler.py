"""Scenario tests of the rank scheduler with a manual clock: exact admission, chunking,
preemption and completion order on small pools (behavior.md §7, §10.2, §11)."""

from __future__ import annotations

import bisect
import random
from array import array

import pytest

from shmkv.config import EngineConfig
from shmkv.events import BlockRemoved, BlockStored
from shmkv.offload_local import LocalG2Engine, OffloadConfig
from shmkv.perf_model import decode_ms, prefill_ms
from shmkv.replay import ReplayOptions, run_replay
from shmkv.scheduler import PassResult, RankScheduler, _position_of
from shmkv.workload import RequestSpec, Session, synthetic_sessions


def make(**overrides: object) -> RankScheduler:
    fields: dict[str, object] = {
        "num_gpu_blocks": 64,
        "block_size": 4,
        "max_num_batched_tokens": 10,
    }
    fields.update(overrides)
    return RankScheduler(EngineConfig.from_mapping(fields), enable_events=True)


def run_until_idle(
    sched: RankScheduler, start_ms: float = 0.0, limit: int = 1000
) -> list[PassResult]:
    results: list[PassResult] = []
    now = start_ms
    for _ in range(limit):
        if not sched.has_work():
            return results
        result = sched.step(now)
        results.append(result)
        now = result.end_ms
    raise AssertionError("scheduler did not go idle")


def test_chunked_prefill_admission_and_first_tokens() -> None:
    sched = make()
    sched.submit(1, list(range(12)), 3, 0.0)
    sched.submit(2, list(range(100, 108)), 2, 0.0)
    # pass 1: A takes the whole 10-token budget (3 blocks, the third straddles); B is blocked.
    first = sched.step(0.0)
    assert first.admissions == [(1, 0)]
    assert first.first_tokens == []
    assert first.end_ms == pytest.approx(prefill_ms(1, 10, 0))
    assert sched.num_running == 1
    assert sched.num_waiting == 1
    # pass 2: A finishes its prompt (2 tokens), B is admitted with the remaining 8.
    second = sched.step(first.end_ms)
    assert second.admissions == [(2, 0)]
    assert second.first_tokens == [1, 2]
    # mean isl = (12 + 8) // 2, mean prefix = (10 + 0) // 2; nothing was decoding yet.
    assert second.end_ms - second.start_ms == pytest.approx(prefill_ms(2, 10, 5))
    # pass 3: both decode one token; decode cost from their context tokens (13 + 9).
    third = sched.step(second.end_ms)
    assert third.first_tokens == []
    assert third.num_decode_tokens == 2
    assert third.second_tokens == [1, 2]
    assert third.completions == [(2, 2)]
    assert third.end_ms - third.start_ms == pytest.approx(decode_ms(2, 13 + 9, 11, 64 * 4))
    fourth = sched.step(third.end_ms)
    assert fourth.completions == [(1, 3)]
    assert not sched.has_work()
    sched.check_invariants()
    assert sched.manager.num_active_blocks() == 0


def test_lifo_preemption_self_matches_without_duplicate_stored() -> None:
    # 4 G1 blocks of 4 tokens; two 8-token prompts fill the pool; A's first decode block
    # forces a preemption of the newest running request (B).
    sched = make(num_gpu_blocks=4, max_num_batched_tokens=64)
    sched.submit(1, list(range(8)), 6, 0.0)
    sched.submit(2, list(range(50, 58)), 6, 0.0)
    results = run_until_idle(sched)
    preempted = [r for result in results for r in result.preemptions]
    assert preempted[0] == 2, "LIFO preempts the most recently admitted request"
    admissions = [a for result in results for a in result.admissions]
    readmit = [reused for request_id, reused in admissions if request_id == 2][1:]
    assert readmit, "the preempted request is admitted again"
    completions = [c for result in results for c in result.completions]
    assert sorted(request_id for request_id, _n in completions) == [1, 2]
    assert all(n == 6 for _id, n in completions)
    assert_consistent_stream(results)
    sched.check_invariants()


def assert_consistent_stream(results: list[PassResult]) -> None:
    """A block is never Stored while announced, nor Removed unless announced."""
    present: set[int] = set()
    for result in results:
        for event in result.events:
            if isinstance(event, BlockStored):
                for h in event.block_hashes:
                    assert h not in present, f"duplicate Stored of {h:#x}"
                    present.add(h)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    assert h in present, f"Removed of unannounced {h:#x}"
                    present.discard(h)


def test_preempted_request_self_matches_its_inactive_blocks() -> None:
    # 5 blocks: A and B take 2 each; B's first decode block finds none free, so B (newest)
    # preempts itself. Its 2 blocks go inactive and B re-admits with them as a full hit.
    sched = make(num_gpu_blocks=5, max_num_batched_tokens=64)
    sched.submit(1, list(range(8)), 2, 0.0)
    sched.submit(2, list(range(50, 58)), 2, 0.0)
    results = run_until_idle(sched)
    assert [r for result in results for r in result.preemptions] == [2]
    admissions = [a for result in results for a in result.admissions if a[0] == 2]
    assert admissions[0] == (2, 0)
    assert admissions[1][1] > 0, "re-admission reuses the blocks it freed"
    stored = [
        h
        for result in results
        for e in result.events
        if isinstance(e, BlockStored)
        for h in e.block_hashes
    ]
    assert len(stored) == len(set(stored)), "self-match: no duplicate Stored"
    assert_consistent_stream(results)


def test_fifo_preemption_picks_the_oldest() -> None:
    sched = make(num_gpu_blocks=4, max_num_batched_tokens=64, preemption_mode="fifo")
    sched.submit(1, list(range(8)), 6, 0.0)
    sched.submit(2, list(range(50, 58)), 6, 0.0)
    results = run_until_idle(sched)
    preempted = [r for result in results for r in result.preemptions]
    assert preempted[0] == 1


def test_request_larger_than_g1_is_rejected() -> None:
    sched = make(num_gpu_blocks=2)
    sched.submit(7, list(range(20)), 1, 0.0)
    result = sched.step(0.0)
    assert result.rejections == [7]
    assert not sched.has_work()


def test_no_chunked_prefill_waits_for_budget() -> None:
    sched = make(enable_chunked_prefill=False, max_num_batched_tokens=8)
    sched.submit(1, list(range(12)), 1, 0.0)
    result = sched.step(0.0)
    assert result.admissions == []
    assert not result.did_work


def _g2_scheduler() -> tuple[RankScheduler, LocalG2Engine]:
    engine = LocalG2Engine(
        OffloadConfig(
            num_g2_blocks=64,
            block_size_bytes=1_000_000,
            bandwidth_g1_to_g2_gbps=1.0,
            bandwidth_g2_to_g1_gbps=1.0,
        )
    )
    sched = RankScheduler(
        EngineConfig(num_gpu_blocks=8, block_size=4, max_num_batched_tokens=64),
        offload=engine,
        enable_events=True,
    )
    return sched, engine


def test_swap_in_from_g2_parks_then_requeues_at_front() -> None:
    sched, engine = _g2_scheduler()
    prompt = list(range(16))  # 4 full blocks
    sched.submit(1, prompt, 1, 0.0)
    results = run_until_idle(sched)
    # Fill G1 with other prompts so request 1's inactive blocks are evicted to G2.
    now = results[-1].end_ms
    for i in range(2, 5):
        sched.submit(i, list(range(1000 * i, 1000 * i + 16)), 1, now)
    results += run_until_idle(sched, now)
    assert engine.num_blocks > 0, "evicted G1 blocks were offloaded to G2"
    now = results[-1].end_ms
    sched.submit(9, prompt, 1, now)
    later = run_until_idle(sched, now)
    admissions = [a for r in later for a in r.admissions]
    assert admissions[0][0] == 9
    assert admissions[0][1] > 0, "the swapped-in prefix counts as reused"
    assert engine.num_onboarded > 0
    sched.check_invariants()
    engine.check_invariants()


def test_replay_with_only_offload_work_pending_still_ends() -> None:
    sessions = synthetic_sessions(input_tokens=64, output_tokens=4, request_count=40, block_size=4)
    engine_config = EngineConfig(
        num_gpu_blocks=48,
        block_size=4,
        num_g2_blocks=32,
        kv_bytes_per_token=1 << 16,
        bandwidth_g1_to_g2_gbps=0.5,
    )
    outcome = run_replay(sessions, ReplayOptions(engine=engine_config, replay_concurrency=4))
    assert outcome.collector.num_completed == 40
    assert outcome.num_incomplete == 0
    g2 = outcome.g2_engines[0]
    assert g2 is not None
    assert g2.num_offloaded > 0
    assert g2.num_in_flight == 0


def test_multi_turn_sessions_release_next_turn_after_delay() -> None:
    turns = [
        RequestSpec(
            request_id=10 + t,
            session_id=1,
            turn_index=t,
            arrival_ms=0.0,
            delay_ms=50.0 if t else 0.0,
            tokens=_tokens(8 * (t + 1)),
            max_output_tokens=2,
        )
        for t in range(3)
    ]
    outcome = run_replay([Session(1, 0.0, turns)], ReplayOptions(engine=EngineConfig(block_size=4)))
    records = {r["request_id"]: r for r in outcome.collector.per_request_records()}
    assert set(records) == {10, 11, 12}
    for t in (1, 2):
        prev, cur = records[10 + t - 1], records[10 + t]
        assert cur["arrival_time_ms"] == pytest.approx(float(prev["terminal_time_ms"]) + 50.0)  # type: ignore[arg-type]


def _tokens(n: int) -> array[int]:
    return array("I", range(n))


def test_preempted_requests_with_g2_copies_do_not_livelock_on_swap_in() -> None:
    """Regression (found by `shmkv stress`): a preempted request whose generated blocks are in
    G1 and also in G2 was onboarded again and again, because the swap-in started at the end of
    the prompt instead of the end of the G1 prefix. Instant transfers, tiny G1, heavy reuse."""
    sessions = synthetic_sessions(
        input_tokens=96,
        output_tokens=40,
        request_count=300,
        shared_prefix_ratio=0.6,
        num_prefix_groups=4,
        block_size=16,
    )
    engine = EngineConfig(num_gpu_blocks=40, block_size=16, num_g2_blocks=64, kv_bytes_per_token=0)
    outcome = run_replay(sessions, ReplayOptions(engine=engine, replay_concurrency=8))
    assert outcome.collector.num_completed == 300
    assert outcome.num_incomplete == 0
    assert outcome.num_preemptions > 0
    g2 = outcome.g2_engines[0]
    assert g2 is not None
    assert 0 < g2.num_onboarded < 2000, (
        "swap-ins happen, but each block is onboarded a bounded number of times"
    )


def _lazy_decode_scenario(flush_every_pass: bool) -> tuple[list[list[int]], list[str], bool]:
    """Decode with block crossings, late submits whose prompts end in a partial block (the
    sequence draws its id from the rank's rng) and completions; with `flush_every_pass`
    every pass's cohort tokens are appended at once instead of left pending."""
    config = EngineConfig.from_mapping(
        {"num_gpu_blocks": 256, "block_size": 8, "max_num_batched_tokens": 64}
    )
    sched = RankScheduler(config, enable_events=True, emit_token_ids=True)
    seqs = []
    for request_id in range(5):
        sched.submit(request_id, [7 * request_id + i for i in range(8)], 30 + request_id, 0.0)
        seqs.append(sched._requests[request_id].seq)
    passes: list[str] = []
    lazy_seen = False
    now = 0.0
    for index in range(400):
        if index in (15, 22, 23):  # 7-token prompts: a partial block each
            request_id = len(seqs)
            sched.submit(request_id, [request_id] * 7, 25, now)
            seqs.append(sched._requests[request_id].seq)
        if not sched.has_work():
            break
        result = sched.step(now)
        lazy_seen = lazy_seen or sched._lazy
        if flush_every_pass:
            sched._flush_pending()
        sched.check_invariants()
        passes.append(repr(result))
        now = result.end_ms
    assert not sched.has_work()
    sched.submit(99, [1, 2, 3], 1, now)  # the rank's rng stream: the same next draw
    passes.append(repr(sched._requests[99].seq.partial_block))
    return [list(seq.tokens) for seq in seqs], passes, lazy_seen


def test_pending_cohort_tokens_equal_appending_them_every_pass() -> None:
    tokens, passes, lazy_seen = _lazy_decode_scenario(flush_every_pass=False)
    assert lazy_seen
    assert [len(t) for t in tokens] == [38, 39, 40, 41, 42, 32, 32, 32]
    assert _lazy_decode_scenario(flush_every_pass=True) == (tokens, passes, True)


@pytest.mark.pure_core  # patches a module constant
def test_pending_cohort_tokens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `_MAX_PENDING_WORDS` pending words a decode run appends them: the same results."""
    reference = _lazy_decode_scenario(flush_every_pass=False)
    monkeypatch.setattr("shmkv.scheduler._MAX_PENDING_WORDS", 7)
    assert _lazy_decode_scenario(flush_every_pass=False) == reference


def test_position_of_is_bisect_left_on_increasing_keys() -> None:
    """`_position_of` narrows its search with the keys' bounds: still `bisect_left` for
    every strictly increasing key list, with or without gaps, and keys in or out of it."""
    rng = random.Random(3)
    for _ in range(2000):
        count = rng.randrange(0, 12)
        first = rng.randrange(0, 6)
        orders = sorted(rng.sample(range(first, first + count + rng.randrange(0, 6)), count))
        for order in range(first - 2, first + count + 8):
            assert _position_of(orders, order) == bisect.bisect_left(orders, order)
