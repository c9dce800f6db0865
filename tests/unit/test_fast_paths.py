"""The replay's fast paths change no result: bulk decode (the scheduler's cohort), the direct
allocation of a decode step's new partial block, the manager's bulk store of a run of new
blocks, one-pass prompt hashing and bulk token draws. Each is checked against the plain
per-request / per-block / per-token path it replaces, on workloads that exercise
preemption, budget exhaustion, chunking, G2 offload, prefix caching off and the kv router."""

from __future__ import annotations

import hashlib
import math
import random
import struct
from array import array
from collections.abc import Callable

import pytest
import xxhash

from shmkv.config import EngineConfig
from shmkv.hashing import (
    BlockHashes,
    PrefixHashCache,
    chain_plhs,
    hash_block,
    hash_blocks,
    make_plh,
    token_bytes,
)
from shmkv.manager import KvManager
from shmkv.replay import HOST_TIER_CREDIT, Replay, ReplayOptions
from shmkv.scheduler import PassResult, RankScheduler
from shmkv.sequence import ActiveSequence, RandomWords, append_random_tokens
from shmkv.signals import Deref, MoveBlock
from shmkv.workload import RequestSpec, Session, synthetic_sessions

pytestmark = pytest.mark.pure_core  # turns fast paths off by patching core methods

# ── workloads ────────────────────────────────────────────────────────────────────────────


def varied_sessions(
    count: int,
    seed: int,
    prompt: tuple[int, int],
    output: tuple[int, int],
    *,
    turns: int = 1,
    prefix_groups: int = 0,
    prefix_tokens: int = 0,
) -> list[Session]:
    rng = random.Random(seed)
    prefixes = [rng.randbytes(4 * prefix_tokens) for _ in range(prefix_groups)]
    sessions: list[Session] = []
    request_id = 0
    for session_id in range(count):
        specs: list[RequestSpec] = []
        tokens = array("I")
        if prefix_groups:
            tokens.frombytes(prefixes[rng.randrange(prefix_groups)])
        for turn in range(turns):
            tokens = array("I", tokens)
            tokens.frombytes(rng.randbytes(4 * rng.randint(*prompt)))
            specs.append(
                RequestSpec(
                    request_id=request_id,
                    session_id=session_id,
                    turn_index=turn,
                    arrival_ms=0.0,
                    delay_ms=25.0 if turn else 0.0,
                    tokens=tokens,
                    max_output_tokens=rng.randint(*output),
                )
            )
            request_id += 1
        sessions.append(Session(session_id=session_id, first_arrival_ms=0.0, turns=specs))
    return sessions


E = EngineConfig
WORKLOADS: dict[str, tuple[Callable[[], list[Session]], ReplayOptions]] = {
    "steady": (
        lambda: synthetic_sessions(input_tokens=200, output_tokens=40, request_count=40),
        ReplayOptions(engine=E(num_gpu_blocks=400), replay_concurrency=12),
    ),
    "preempt_lifo": (
        lambda: varied_sessions(40, 1, (40, 300), (10, 90)),
        ReplayOptions(engine=E(num_gpu_blocks=120), replay_concurrency=12),
    ),
    "preempt_fifo": (
        lambda: varied_sessions(40, 2, (40, 300), (10, 90)),
        ReplayOptions(engine=E(num_gpu_blocks=120, preemption_mode="fifo"), replay_concurrency=12),
    ),
    "tiny_budget": (
        lambda: varied_sessions(25, 3, (5, 80), (20, 60)),
        ReplayOptions(
            engine=E(num_gpu_blocks=500, block_size=4, max_num_batched_tokens=7),
            replay_concurrency=10,
        ),
    ),
    "chunked_and_unchunked": (
        lambda: varied_sessions(30, 4, (20, 250), (3, 40)),
        ReplayOptions(
            engine=E(num_gpu_blocks=600, max_num_batched_tokens=256, enable_chunked_prefill=False),
            replay_concurrency=10,
        ),
    ),
    "g2": (
        lambda: varied_sessions(60, 5, (50, 400), (5, 60), prefix_groups=3, prefix_tokens=160),
        ReplayOptions(
            engine=E(
                num_gpu_blocks=300,
                num_g2_blocks=2000,
                kv_bytes_per_token=1024,
                bandwidth_g1_to_g2_gbps=2.0,
                bandwidth_g2_to_g1_gbps=3.0,
                offload_batch_size=8,
            ),
            replay_concurrency=12,
        ),
    ),
    "caching_off_multiturn": (
        lambda: varied_sessions(15, 6, (10, 120), (1, 40), turns=3),
        ReplayOptions(
            engine=E(num_gpu_blocks=300, enable_prefix_caching=False, block_size=3),
            replay_concurrency=8,
        ),
    ),
    "kv_router": (
        lambda: synthetic_sessions(
            input_tokens=160,
            output_tokens=30,
            request_count=60,
            shared_prefix_ratio=0.5,
            num_prefix_groups=3,
        ),
        ReplayOptions(
            engine=E(num_gpu_blocks=200, eviction="lru", speedup_ratio=math.inf),
            replay_concurrency=16,
            data_parallel_size=3,
            router_mode="kv",
            emit_token_ids=True,
        ),
    ),
}


def replay_digest(name: str, *, check: bool = False) -> str:
    """A digest of every pass result (with its events) and of the final report and state."""
    make, options = WORKLOADS[name]
    digest = hashlib.sha256()
    holder: list[Replay] = []

    def on_pass(rank: int, result: PassResult) -> None:
        digest.update(
            repr(
                (
                    rank,
                    result.start_ms,
                    result.end_ms,
                    result.did_work,
                    result.admissions,
                    result.first_tokens,
                    result.second_tokens,
                    result.num_decode_tokens,
                    result.token_gaps,
                    result.completions,
                    result.rejections,
                    result.preemptions,
                    [repr(event) for event in result.events],
                )
            ).encode()
        )
        if check:
            holder[0]._ranks[rank].scheduler.check_invariants()

    replay = Replay(make(), options, on_pass=on_pass)
    holder.append(replay)
    outcome = replay.run()
    report = outcome.collector.build_report(wall_time_ms=0.0)
    digest.update(repr(sorted(report.items())).encode())
    digest.update(repr(outcome.collector.per_request_records()).encode())
    digest.update(repr(outcome.state_dump()).encode())
    digest.update(repr((outcome.num_passes, outcome.num_preemptions)).encode())
    return digest.hexdigest()


# ── scheduler ────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_cohort_and_decode_fast_paths_change_nothing(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = replay_digest(name, check=True)
    # Plain path: no request ever joins the cohort, and the direct partial-block
    # allocation always defers to the general `_schedule` (a failed attempt changes nothing).
    monkeypatch.setattr(RankScheduler, "_try_join_cohort", lambda self, request: None)
    monkeypatch.setattr(KvManager, "use_partial", lambda self, block: 0)
    assert replay_digest(name) == fast


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_decode_runs_change_nothing(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast-forwarding through plain decode passes (`run_decode_passes`, also behind `step`)
    gives the same passes, events, report and state as running each pass through `step`'s
    general path."""
    fast = replay_digest(name, check=True)
    monkeypatch.setattr(RankScheduler, "run_decode_passes", lambda self, *args: None)
    assert replay_digest(name) == fast


def test_decode_runs_cover_most_passes_of_a_steady_decode() -> None:
    make_sessions, options = WORKLOADS["steady"]
    runs: list[int] = []
    original = RankScheduler.run_decode_passes

    def spy(self: RankScheduler, now_ms: float, before_ms: float, until_ms: float) -> object:
        run = original(self, now_ms, before_ms, until_ms)
        if run is not None:
            runs.append(len(run.ends_ms))
        return run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RankScheduler, "run_decode_passes", spy)
        outcome = Replay(make_sessions(), options).run()
    assert max(runs) >= 5
    assert sum(runs) * 2 > outcome.num_passes


def test_decode_run_stops_at_the_callers_limits() -> None:
    """A run covers exactly the passes the replay loop would give this rank in a row."""
    sched = RankScheduler(E(num_gpu_blocks=400, block_size=16))
    for request_id in range(4):
        sched.submit(request_id, list(range(1 + request_id, 33 + request_id)), 60, 0.0)
    now = 0.0
    # prefill, first and second tokens, then up to the first pass after a block crossing
    while sched._cohort_size < 4 or sched._due.get(sched._cohort_pass) or sched._pass_index < 8:
        now = sched.step(now).end_ms
    sched_copy_passes = sched._pass_index
    one = sched.run_decode_passes(now, now, math.inf)  # the next pass may not start
    assert one is not None
    assert len(one.ends_ms) == 1
    assert one.start_ms == now
    assert sched._pass_index == sched_copy_passes + 1
    now = one.ends_ms[0]
    limit = now + 2.5 * (one.ends_ms[0] - one.start_ms)
    run = sched.run_decode_passes(now, limit, math.inf)
    assert run is not None
    assert run.prev_end_ms == one.ends_ms[0]
    assert all(end > now for end in run.ends_ms)
    assert all(end < limit for end in run.ends_ms[:-1])
    assert run.ends_ms[-1] >= limit
    same_end = sched.run_decode_passes(run.ends_ms[-1], math.inf, run.ends_ms[-1])
    assert same_end is not None
    assert len(same_end.ends_ms) == 1
    # `until_ms` is inclusive: a next pass starting exactly at it still runs.
    start = same_end.ends_ms[0]
    tied = sched.run_decode_passes(start, math.inf, start + 1e9)
    assert tied is not None
    assert len(tied.ends_ms) >= 1
    sched.check_invariants()
    results = tied.pass_results()
    assert [r.end_ms for r in results] == tied.ends_ms
    assert results[0].start_ms == start
    assert results[0].prev_end_ms == same_end.ends_ms[0]
    assert all(r.did_work and r.num_decode_tokens == 4 for r in results)


def test_kv_router_pruning_picks_what_computing_every_cost_picks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast = replay_digest("kv_router")
    picks: list[int] = []

    def every_cost(self: Replay, spec: RequestSpec, block_hashes: BlockHashes | None) -> object:
        ranks = self._ranks
        index = self._index
        assert index is not None
        assert block_hashes is not None
        hashes = block_hashes.seq_hashes
        num_blocks = -(-len(spec.tokens) // self.options.engine.block_size)
        costs = []
        for rank in ranks:
            device, host = index.overlap_blocks(rank.index, hashes)
            load = rank.scheduler.manager.num_active_blocks()
            load += rank.scheduler.num_waiting * num_blocks
            costs.append((num_blocks - device - HOST_TIER_CREDIT * host) + load)
        best = costs.index(min(costs))
        picks.append(best)
        return ranks[best]

    monkeypatch.setattr(Replay, "_route", every_cost)
    assert replay_digest("kv_router") == fast
    assert len(set(picks)) == 3


def test_cohort_is_used_in_steady_decode() -> None:
    make, options = WORKLOADS["steady"]
    sizes: list[int] = []
    holder: list[Replay] = []

    def on_pass(rank: int, result: PassResult) -> None:
        sizes.append(holder[0]._ranks[rank].scheduler._cohort_size)

    replay = Replay(make(), options, on_pass=on_pass)
    holder.append(replay)
    replay.run()
    assert max(sizes) >= 8


def test_replay_restores_the_garbage_collector_state() -> None:
    import gc

    make, options = WORKLOADS["steady"]
    assert gc.isenabled()
    Replay(make(), options).run()
    assert gc.isenabled()
    gc.disable()
    try:
        Replay(make(), options).run()
        assert not gc.isenabled()
    finally:
        gc.enable()


# ── manager ──────────────────────────────────────────────────────────────────────────────


def manager_trace(seed: int, backend: str, events: bool) -> list[object]:
    """Random requests sharing prefixes, decoded, preempted and finished in random order on
    a small pool (all-or-nothing admission); returns every processed count and event and
    the final registered set."""
    rng = random.Random(seed)
    manager = KvManager(48, 4, eviction=backend, enable_events=events)
    prefixes = [[rng.getrandbits(32) for _ in range(4 * rng.randint(1, 5))] for _ in range(3)]
    trace: list[object] = []
    live: list[ActiveSequence] = []

    def process(signal: MoveBlock) -> int:
        processed = manager.process(signal)
        trace.append(processed)
        trace.extend(repr(event) for event in manager.take_events())
        return processed

    for _ in range(300):
        action = rng.random()
        if action < 0.35 or not live:
            tokens = rng.choice(prefixes) + [rng.getrandbits(32) for _ in range(rng.randint(1, 30))]
            seq = ActiveSequence(tokens, rng.randint(1, 12), 4, emit_token_ids=events, rng=rng)
            signal = seq.take_creation_signal()
            assert signal is not None
            held = process(signal)
            if held == len(signal.raw_blocks):
                live.append(seq)
            elif held:  # out of capacity: release what was held, tail first
                process(Deref(list(reversed(signal.blocks[:held]))))
        elif action < 0.8:
            if not manager.num_free_blocks():
                continue
            seq = live[rng.randrange(len(live))]
            for step_signal in seq.generate():
                process(step_signal)
            if seq.is_complete():
                live.remove(seq)
            else:
                seq.commit_allocation(len(seq))
        else:
            seq = live.pop(rng.randrange(len(live)))
            for free_signal in seq.reset_with_signal():
                process(free_signal)
        manager.check_invariants()
    trace.append(sorted(manager.registered_seq_hashes()))
    return trace


@pytest.mark.parametrize("backend", ["lineage", "lru"])
@pytest.mark.parametrize("seed", range(4))
def test_bulk_store_matches_the_per_block_loop(
    backend: str, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = manager_trace(seed, backend, events=seed % 2 == 0)
    monkeypatch.setattr(KvManager, "_store_rest_in_bulk", lambda self, *args: None)
    assert manager_trace(seed, backend, events=seed % 2 == 0) == fast


# ── hashing and token draws ──────────────────────────────────────────────────────────────


def reference_plh(current: int, parent: int | None, position: int) -> int:
    limits = ((256, 0, 59), (1 << 16, 1, 55), (1 << 24, 2, 51))
    mode, frag = next((m, f) for limit, m, f in limits if position < limit)
    next_frag = next(f for limit, _m, f in limits if position + 1 < limit)
    cur_bits = min(frag, next_frag)
    parent_frag = 0 if parent is None else parent & ((1 << frag) - 1)
    return (
        (mode << 126)
        | (position << (2 * frag))
        | (parent_frag << frag)
        | (current & ((1 << cur_bits) - 1))
    )


@pytest.mark.parametrize("position", [0, 1, 200, 253, 254, 255, 256, 65534, 65535, 65536])
def test_make_plh_fast_path_matches_the_definition(position: int) -> None:
    rng = random.Random(position)
    for _ in range(50):
        current = rng.getrandbits(64)
        parent = None if rng.random() < 0.3 else rng.getrandbits(64)
        assert make_plh(current, parent, position) == reference_plh(current, parent, position)


@pytest.mark.parametrize("start", [0, 5, 250, 254, 255, 300])
def test_hash_blocks_matches_block_by_block_hashing(start: int) -> None:
    rng = random.Random(start)
    tokens = [rng.getrandbits(32) for _ in range(8 * 3 + 5)]
    parent = None if start == 0 else rng.getrandbits(64)
    got = hash_blocks(token_bytes(tokens), 8, parent, start)
    prev = parent
    for i in range(3):
        block = tokens[8 * i : 8 * (i + 1)]
        local = xxhash.xxh3_64_intdigest(struct.pack("<8I", *block), seed=1337)
        current = (
            local
            if prev is None
            else xxhash.xxh3_64_intdigest(struct.pack("<QQ", prev, local), seed=1337)
        )
        plh = reference_plh(current, prev, start + i)
        assert (got.local_hashes[i], got.seq_hashes[i], got.plhs[i]) == (local, current, plh)
        assert hash_block(token_bytes(block), prev, start + i) == (local, current, plh)
        prev = current
    assert chain_plhs(got.seq_hashes, parent, start) == got.plhs


def test_prompt_hashes_given_by_a_router_are_used_as_is() -> None:
    tokens = list(range(40))
    hashes = hash_blocks(token_bytes(tokens), 16)
    seq = ActiveSequence(tokens, 4, 16, block_hashes=hashes)
    assert (seq.local_hashes, seq.seq_hashes, seq.plhs) == tuple(hashes)
    with pytest.raises(Exception, match="block_hashes"):
        ActiveSequence(tokens, 4, 16, block_hashes=hash_blocks(token_bytes(tokens[:16]), 16))


@pytest.mark.parametrize("count", [1, 2, 7, 64])
def test_bulk_token_draws_equal_one_draw_per_token(count: int) -> None:
    bulk, single = random.Random(count), random.Random(count)
    arrays = [array("I", [i]) for i in range(count)]
    append_random_tokens(arrays, bulk)
    assert [a[-1] for a in arrays] == [single.getrandbits(32) for _ in range(count)]
    assert bulk.getrandbits(128) == single.getrandbits(128)


def test_random_words_serve_the_same_stream_as_the_rng() -> None:
    bulk, single = random.Random(9), random.Random(9)
    words = RandomWords(bulk, 1 + 4 + 2 + 3 + 1)
    assert words.getrandbits(32) == single.getrandbits(32)
    assert words.getrandbits(128) == single.getrandbits(128)
    assert words.getrandbits(64) == single.getrandbits(64)
    assert list(words.take(3)) == [single.getrandbits(32) for _ in range(3)]
    assert words.remaining == 1
    assert words.getrandbits(32) == single.getrandbits(32)
    assert words.remaining == 0
    with pytest.raises(Exception, match="RandomWords"):
        words.getrandbits(32)


@pytest.mark.parametrize("caching", [True, False])
def test_next_token_words_counts_what_generate_token_draws(caching: bool) -> None:
    seq = ActiveSequence(list(range(9)), 40, 4, enable_prefix_caching=caching, rng=random.Random(1))
    while not seq.is_complete():  # drawing one word too many raises, one too few is left
        words = RandomWords(random.Random(len(seq)), seq.next_token_words())
        seq.generate_token(words.getrandbits)
        assert words.remaining == 0


def test_prefix_hash_cache_equals_hashing_each_prompt() -> None:
    rng = random.Random(3)
    cache = PrefixHashCache(4, max_prompts=3, max_blocks=20)
    heads = [[rng.getrandbits(32) for _ in range(rng.randint(1, 30))] for _ in range(5)]
    for _ in range(200):
        tokens = list(rng.choice(heads))
        if rng.random() < 0.7:
            tokens += [rng.getrandbits(32) for _ in range(rng.randint(0, 25))]
        else:
            tokens = tokens[: rng.randint(0, len(tokens))]
        data = token_bytes(tokens)
        assert cache.hash_blocks(data) == hash_blocks(data, 4)
