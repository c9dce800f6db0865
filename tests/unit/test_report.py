"""The metrics collector and the replay report (behavior.md §13.4, Dynamo's field names)."""

from __future__ import annotations

import itertools
import json
import math
import statistics

import pytest
from hypothesis import given, strategies as st

from shmkv.errors import InvariantError
from shmkv.report import (
    LATENCY_METRICS,
    PERCENTILES,
    STAT_NAMES,
    MetricsCollector,
    distribution_stats,
    format_jsonl,
    format_report_json,
    format_summary_table,
    percentile_index,
    weighted_distribution_stats,
)

# --------------------------------------------------------------------------------------------
# distributions


def test_nearest_rank_percentiles_on_small_lists() -> None:
    stats = distribution_stats([40.0, 10.0, 30.0, 20.0])
    # n = 4: median index round(1.5) = 2, p75 round(2.25) = 2, p90 round(2.7) = 3
    assert stats["median"] == 30.0
    assert stats["p75"] == 30.0
    assert stats["p90"] == 40.0
    assert stats["p95"] == 40.0
    assert stats["p99"] == 40.0
    assert (stats["min"], stats["max"], stats["mean"]) == (10.0, 40.0, 25.0)
    assert stats["std"] == pytest.approx(statistics.pstdev([10, 20, 30, 40]))


def test_percentile_index_rounds_halves_up() -> None:
    assert percentile_index(2, 50.0) == 1  # round(0.5) = 1, like Rust (Python's round gives 0)
    assert percentile_index(3, 75.0) == 2  # round(1.5) = 2
    assert percentile_index(1, 99.0) == 0
    assert percentile_index(101, 99.0) == 99
    assert percentile_index(10, 100.0) == 9


def test_single_sample_and_empty_distribution() -> None:
    assert distribution_stats([3.0]) == dict.fromkeys(STAT_NAMES, 3.0) | {"std": 0.0}
    assert distribution_stats([]) == dict.fromkeys(STAT_NAMES, 0.0)
    assert weighted_distribution_stats([5.0], [0]) == dict.fromkeys(STAT_NAMES, 0.0)


def test_weighted_percentiles_match_the_expanded_list() -> None:
    values, counts = [5.0, 1.0, 3.0], [1, 8, 1]  # expanded: 1 x8, 3, 5
    stats = weighted_distribution_stats(values, counts)
    assert stats == distribution_stats([1.0] * 8 + [3.0, 5.0])
    assert stats["median"] == 1.0  # index round(4.5) = 5
    assert stats["p90"] == 3.0  # index round(8.1) = 8
    assert stats["p95"] == 5.0  # index round(8.55) = 9
    assert stats["mean"] == pytest.approx(1.6)


@given(
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=1e6), st.integers(min_value=0, max_value=5)),
        max_size=20,
    )
)
def test_weighted_equals_expanded(pairs: list[tuple[float, int]]) -> None:
    expanded = [value for value, count in pairs for _ in range(count)]
    weighted = weighted_distribution_stats([v for v, _ in pairs], [c for _, c in pairs])
    plain = distribution_stats(expanded)
    for name in STAT_NAMES:
        assert weighted[name] == pytest.approx(plain[name], rel=1e-9, abs=1e-9)
    if expanded:
        ordered = sorted(expanded)
        assert weighted["p95"] == ordered[percentile_index(len(ordered), 95.0)]


def _sorted_pairs_stats(values: list[float], counts: list[int]) -> dict[str, float]:
    """The former implementation (sorts every (value, count) pair): the exact reference."""
    pairs = sorted((value, count) for value, count in zip(values, counts, strict=True) if count > 0)
    num_samples = sum(count for _, count in pairs)
    if num_samples == 0:
        return dict.fromkeys(STAT_NAMES, 0.0)
    mean = math.fsum(value * count for value, count in pairs) / num_samples
    variance = math.fsum(count * (value - mean) ** 2 for value, count in pairs) / num_samples
    stats = {"mean": mean, "min": pairs[0][0], "max": pairs[-1][0], "std": math.sqrt(variance)}
    expanded = [value for value, count in pairs for _ in range(count)]
    for name, percentile in PERCENTILES:
        stats[name] = expanded[percentile_index(num_samples, percentile)]
    return stats


@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.1, 1.0 / 3.0, 2.5, 20.091893711287177, 1e6 / 7.0]),
            st.integers(min_value=-1, max_value=70),
        ),
        max_size=40,
    ),
    st.lists(st.floats(min_value=0, max_value=1e6, allow_subnormal=False), max_size=30),
)
def test_stats_are_bit_identical_to_sorting_every_pair(
    pairs: list[tuple[float, int]], singles: list[float]
) -> None:
    values, counts = [v for v, _ in pairs], [c for _, c in pairs]
    assert weighted_distribution_stats(values, counts) == _sorted_pairs_stats(values, counts)
    assert distribution_stats(singles) == _sorted_pairs_stats(singles, [1] * len(singles))


def test_weighted_stats_reject_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="2 values but 1 counts"):
        weighted_distribution_stats([1.0, 2.0], [1])


# --------------------------------------------------------------------------------------------
# the collector


def _one_request(
    collector: MetricsCollector,
    request_id: int,
    arrival_ms: float,
    token_times_ms: list[float],
    *,
    admit_ms: float | None = None,
    reused: int = 0,
    num_input_tokens: int = 100,
) -> None:
    """Feed a request whose tokens came at `token_times_ms`, one on_tokens call per gap."""
    collector.on_arrival(request_id, arrival_ms, num_input_tokens)
    collector.on_admission(request_id, arrival_ms if admit_ms is None else admit_ms, reused)
    collector.on_first_token(request_id, token_times_ms[0])
    for before, after in itertools.pairwise(token_times_ms):
        collector.on_tokens(request_id, 1, after - before)
    collector.on_completion(request_id, token_times_ms[-1], len(token_times_ms))


def test_latencies_of_one_request() -> None:
    collector = MetricsCollector()
    collector.on_arrival(1, 10.0, 64, max_output_tokens=5, session_id=3, turn_index=0)
    collector.on_admission(1, 12.0, reused_tokens=16)
    collector.on_first_token(1, 30.0)
    collector.on_tokens(1, 1, 6.0)  # second token at 36
    collector.on_tokens(1, 3, 2.0)  # 38, 40, 42
    collector.on_completion(1, 42.0, 5)
    report = collector.build_report(wall_time_ms=4.0)
    assert report["mean_ttft_ms"] == 20.0
    assert report["mean_ttst_ms"] == 6.0
    assert report["mean_tpot_ms"] == 3.0  # (42 - 30) / 4
    assert report["mean_e2e_latency_ms"] == 32.0
    assert report["mean_queue_ms"] == 2.0
    assert report["mean_itl_ms"] == 3.0
    assert report["median_itl_ms"] == 2.0
    assert report["max_itl_ms"] == 6.0
    assert report["min_output_token_throughput_per_user"] == pytest.approx(1000 / 6)
    assert report["max_output_token_throughput_per_user"] == 500.0
    assert report["duration_ms"] == 42.0
    assert report["total_input_tokens"] == 64
    assert report["total_output_tokens"] == 5
    assert report["request_throughput_rps"] == pytest.approx(1 / 0.042)
    assert report["processed_tokens"] == 69
    assert report["processed_tokens_per_s"] == pytest.approx(69 / 0.004)
    assert report["prefix_cache_reused_ratio"] == 0.25
    (record,) = collector.per_request_records()
    assert record["ttst_ms"] == 6.0
    assert record["itl_ms"] == 3.0
    assert record["requested_output_length"] == 5
    assert record["session_id"] == 3
    assert record["last_token_ms"] == 42.0


def test_tpot_needs_two_tokens() -> None:
    collector = MetricsCollector()
    _one_request(collector, 1, 0.0, [10.0])  # a single token: no TTST, no TPOT, no ITL
    _one_request(collector, 2, 0.0, [10.0, 14.0, 20.0])
    report = collector.build_report(wall_time_ms=1.0)
    assert report["num_ttft_samples"] == 2
    assert report["num_tpot_samples"] == 1
    assert report["num_e2e_latency_samples"] == 2
    assert report["mean_tpot_ms"] == 5.0
    assert report["mean_ttst_ms"] == 4.0
    assert report["min_itl_ms"] == 4.0
    assert report["max_itl_ms"] == 6.0
    assert report["mean_e2e_latency_ms"] == 15.0


def test_itl_is_stored_as_weighted_pairs() -> None:
    collector = MetricsCollector()
    collector.on_arrival(1, 0.0, 10)
    collector.on_admission(1, 0.0, 0)
    collector.on_first_token(1, 5.0)
    for _ in range(10_000):
        collector.on_tokens(1, 1, 2.0)  # repeated gaps merge into one pair
    collector.on_tokens(1, 5, 3.0)
    collector.on_completion(1, 5.0 + 20_000 + 15, 10_006)
    assert len(collector._itl_values) == 2  # white-box: O(distinct gaps), not O(tokens)
    report = collector.build_report(wall_time_ms=1.0)
    assert report["p99_itl_ms"] == 2.0
    assert report["max_itl_ms"] == 3.0
    assert report["mean_itl_ms"] == pytest.approx((20_000 + 15) / 10_005)
    assert report["mean_tpot_ms"] == pytest.approx((20_000 + 15) / 10_005)


def test_weighted_itl_percentiles_across_requests() -> None:
    collector = MetricsCollector()
    _one_request(collector, 1, 0.0, [1.0, 2.0, 3.0, 4.0])  # gaps 1, 1, 1
    _one_request(collector, 2, 0.0, [1.0, 11.0])  # gap 10
    report = collector.build_report(wall_time_ms=1.0)
    # expanded ITL samples: [1, 1, 1, 10]
    assert report["median_itl_ms"] == 1.0  # index round(1.5) = 2
    assert report["p75_itl_ms"] == 1.0  # index round(2.25) = 2
    assert report["p90_itl_ms"] == 10.0  # index round(2.7) = 3
    assert report["mean_itl_ms"] == pytest.approx(13 / 4)
    assert report["std_itl_ms"] == pytest.approx(statistics.pstdev([1, 1, 1, 10]))


def test_incomplete_requests_are_counted_but_not_measured() -> None:
    collector = MetricsCollector()
    _one_request(collector, 1, 0.0, [10.0, 12.0])
    collector.on_arrival(2, 0.0, 50)
    collector.on_admission(2, 1.0, 0)
    collector.on_first_token(2, 20.0)
    collector.on_tokens(2, 4, 100.0)  # never completes
    collector.on_arrival(3, 5.0, 70)  # never admitted
    report = collector.build_report(wall_time_ms=1.0)
    assert report["num_requests"] == 3
    assert report["completed_requests"] == 1
    assert report["total_input_tokens"] == 100
    assert report["max_itl_ms"] == 2.0
    assert report["duration_ms"] == 12.0
    assert [r["request_id"] for r in collector.per_request_records()] == [1]
    assert collector.num_requests == 3
    assert collector.num_completed == 1


def test_reuse_ratios_with_preemption_readmissions() -> None:
    collector = MetricsCollector()
    collector.on_arrival(1, 0.0, 100)
    collector.on_admission(1, 1.0, reused_tokens=20)
    collector.on_preemption(1, 5.0)
    collector.on_admission(1, 8.0, reused_tokens=80)  # re-admission finds its own blocks
    collector.on_preemption(1, 9.0)
    collector.on_admission(1, 10.0, reused_tokens=60)
    collector.on_first_token(1, 12.0)
    collector.on_completion(1, 12.0, 1)
    _one_request(collector, 2, 0.0, [3.0], reused=0, num_input_tokens=100)
    report = collector.build_report(wall_time_ms=1.0)
    assert report["prefix_cache_reused_ratio"] == pytest.approx((80 + 0) / 200)
    assert report["first_admission_prefix_cache_reused_ratio"] == pytest.approx((20 + 0) / 200)
    assert report["max_queue_ms"] == 1.0  # queue ends at the first admission
    records = {r["request_id"]: r for r in collector.per_request_records()}
    assert records[1]["admission_count"] == 3
    assert records[1]["readmission_count"] == 2
    assert records[1]["preemption_count"] == 2
    assert records[1]["reused_input_tokens"] == 80
    assert records[1]["first_admission_reused_input_tokens"] == 20


def test_empty_report_is_all_zeros() -> None:
    report = MetricsCollector().build_report(wall_time_ms=0.0)
    assert report["num_requests"] == 0
    assert report["duration_ms"] == 0.0
    assert report["request_throughput_rps"] == 0.0
    assert report["processed_tokens_per_s"] == 0.0
    assert report["prefix_cache_reused_ratio"] == 0.0
    assert all(
        report[f"{stat}_{metric}_ms"] == 0.0 for stat in STAT_NAMES for metric in LATENCY_METRICS
    )


DYNAMO_KEYS = [
    # the keys of ai-dynamo 1.6.1's offline replay summary that the collector computes
    "num_requests",
    "completed_requests",
    "total_input_tokens",
    "total_output_tokens",
    "duration_ms",
    "wall_time_ms",
    "request_throughput_rps",
    "input_throughput_tok_s",
    "output_throughput_tok_s",
    "total_throughput_tok_s",
    "processed_tokens",
    "processed_tokens_per_s",
    "processed_output_tokens_per_s",
    "prefix_cache_reused_ratio",
    "first_admission_prefix_cache_reused_ratio",
    "num_ttft_samples",
    "num_tpot_samples",
    "num_e2e_latency_samples",
    *(
        f"{stat}_{metric}_ms"
        for metric in ("ttft", "ttst", "tpot", "itl", "e2e_latency")
        for stat in STAT_NAMES
    ),
    *(f"{stat}_output_token_throughput_per_user" for stat in STAT_NAMES),
]


def test_report_keys_follow_dynamo_then_queue_then_extra() -> None:
    collector = MetricsCollector()
    _one_request(collector, 1, 0.0, [1.0, 2.0])
    report = collector.build_report(wall_time_ms=1.0, extra={"decode_worker_seconds": 0.5})
    queue_keys = [f"{stat}_queue_ms" for stat in STAT_NAMES]
    assert list(report) == [*DYNAMO_KEYS, *queue_keys, "decode_worker_seconds"]
    assert all(isinstance(value, int | float) for value in report.values())
    with pytest.raises(InvariantError, match="collides"):
        collector.build_report(wall_time_ms=1.0, extra={"duration_ms": 1.0})


def test_engine_bugs_are_invariant_errors() -> None:
    collector = MetricsCollector()
    collector.on_arrival(1, 0.0, 10)
    with pytest.raises(InvariantError):
        collector.on_arrival(1, 0.0, 10)
    with pytest.raises(InvariantError):
        collector.on_tokens(1, 1, 1.0)
    collector.on_first_token(1, 1.0)
    with pytest.raises(InvariantError):
        collector.on_first_token(1, 2.0)
    collector.on_completion(1, 2.0, 1)
    with pytest.raises(InvariantError):
        collector.on_completion(1, 3.0, 1)
    with pytest.raises(KeyError):
        collector.on_admission(99, 0.0, 0)


def test_zero_token_batches_are_ignored_and_negative_gaps_clamped() -> None:
    collector = MetricsCollector()
    collector.on_arrival(1, 0.0, 10)
    collector.on_first_token(1, 1.0)
    collector.on_tokens(1, 0, 5.0)
    collector.on_tokens(1, 1, -2.0)
    collector.on_completion(1, 1.0, 2)
    report = collector.build_report(wall_time_ms=1.0)
    assert report["max_itl_ms"] == 0.0
    assert report["num_tpot_samples"] == 1
    assert report["mean_output_token_throughput_per_user"] == 0.0  # ITL 0 has no rate


# --------------------------------------------------------------------------------------------
# output


def test_formatting() -> None:
    collector = MetricsCollector()
    _one_request(collector, 2, 1.0, [3.0, 4.0])
    _one_request(collector, 1, 1.0, [3.0])
    _one_request(collector, 0, 2.0, [5.0])
    report = collector.build_report(wall_time_ms=1.0)
    assert json.loads(format_report_json(report)) == report
    records = collector.per_request_records()
    assert [r["request_id"] for r in records] == [1, 2, 0]  # by arrival, then id
    lines = format_jsonl(records).splitlines()
    assert [json.loads(line) for line in lines] == records
    table = format_summary_table(report)
    assert "3 completed / 3" in table
    assert "TTFT" in table
    assert "queue" in table
    assert format_summary_table({}).count("\n") == len(table.splitlines())
    assert not any(math.isnan(float(v)) for v in report.values())
