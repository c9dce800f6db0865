"""Layer 1: per-request metrics and the replay report (behavior.md §13.4).

The engine calls `MetricsCollector.on_*` as requests move (each call O(1) amortized);
`build_report` folds everything into a flat dict whose keys are those of Dynamo's replay
report (`dynamo._core.run_mocker_*_replay(...).summary`, checked against ai-dynamo 1.6.1),
plus our `*_queue_ms` distribution. Nothing here writes files or reads clocks: the CLI times the
run, passes `wall_time_ms`, and writes the strings `format_report_json` / `format_jsonl` return.
Imports only the stdlib and layer 0.

Definitions, over *completed* requests (Dynamo's):

    TTFT  = first token - arrival            E2E   = last token - arrival
    TTST  = second token - first token       TPOT  = (last - first) / (tokens - 1), tokens > 1
    ITL   = every gap between consecutive tokens (weighted (value, count) pairs, never one entry
            per token); per-user throughput = 1000 / ITL for every ITL > 0
    queue = first admission - arrival        (ours; Dynamo has no queue distribution)
    duration_ms = latest completion time; throughputs divide by it
    prefix_cache_reused_ratio                  = sum(max reused tokens over admissions) / sum(input)
    first_admission_prefix_cache_reused_ratio  = sum(reused tokens at first admission) / sum(input)

Percentiles are nearest rank: the value at index `round((n - 1) * p / 100)` (halves up) of the
sorted samples; `std` is the population standard deviation; an empty distribution reports 0.0.
(Dynamo's newer ITL percentiles come from a DDSketch with 0.1% error; ours are exact.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from shmkv.errors import InvariantError
from shmkv.ids import RequestId

ReportValue = float | int | str
"""Every value of the report is a number."""
RecordValue = float | int | str | None
"""Values of a per-request record."""

LATENCY_METRICS: Final = ("ttft", "ttst", "tpot", "itl", "e2e_latency", "queue")
"""Distributions reported as `<stat>_<metric>_ms`."""
STAT_NAMES: Final = ("mean", "min", "max", "median", "p75", "p90", "p95", "p99", "std")
PERCENTILES: Final = (("median", 50.0), ("p75", 75.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0))
PER_USER_THROUGHPUT: Final = "output_token_throughput_per_user"
"""Distribution reported as `<stat>_output_token_throughput_per_user` (tokens/s, no `_ms`)."""
MIN_DURATION_S: Final = 1e-9
"""Throughputs divide by at least this, so an empty run reports 0, not a division error."""


# --------------------------------------------------------------------------------------------
# distributions


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def percentile_index(num_samples: int, percentile: float) -> int:
    """Nearest-rank index into `num_samples` sorted samples (`num_samples` >= 1)."""
    return min(_round_half_up((num_samples - 1) * percentile / 100.0), num_samples - 1)


def weighted_distribution_stats(values: Sequence[float], counts: Sequence[int]) -> dict[str, float]:
    """mean/min/max/median/p75/p90/p95/p99/std of samples given as (value, count) pairs.

    Equivalent to expanding every value `count` times, in O(k log k) for k pairs. The mean and
    the variance are exactly rounded sums (`math.fsum`) of one term per pair, so they need no
    order; the pairs are sorted by value (positions only) for the order statistics.

    Returns:
        A dict keyed by `STAT_NAMES`; all 0.0 when there are no samples.

    Raises:
        ValueError: `values` and `counts` differ in length.
    """
    if len(values) != len(counts):
        raise ValueError(f"{len(values)} values but {len(counts)} counts")
    if min(counts, default=1) > 0:  # every pair counts (the collector's case): plain copies
        kept_values = list(values)
        kept_counts = list(counts)
    else:
        kept_values = []
        kept_counts = []
        for position in range(len(values)):
            if counts[position] > 0:
                kept_values.append(values[position])
                kept_counts.append(counts[position])
    num_samples = sum(kept_counts)
    if num_samples == 0:
        return dict.fromkeys(STAT_NAMES, 0.0)
    num_pairs = len(kept_values)
    products = [kept_values[i] * kept_counts[i] for i in range(num_pairs)]
    mean = math.fsum(products) / num_samples
    # NOTE: math.pow(x, 2.0) is what `x ** 2` computes (C `pow`), without a generic call.
    squares = [kept_counts[i] * math.pow(kept_values[i] - mean, 2.0) for i in range(num_pairs)]
    variance = math.fsum(squares) / num_samples
    order = sorted(range(num_pairs), key=kept_values.__getitem__)
    stats = {"mean": mean, "min": kept_values[order[0]], "max": kept_values[order[-1]]}
    # Percentile indices grow with p, so one pass over the cumulative counts finds them all.
    cumulative = 0
    rank = 0
    for name, percentile in PERCENTILES:
        target = percentile_index(num_samples, percentile)
        while cumulative + kept_counts[order[rank]] <= target:
            cumulative += kept_counts[order[rank]]
            rank += 1
        stats[name] = kept_values[order[rank]]
    stats["std"] = math.sqrt(variance)
    return {name: stats[name] for name in STAT_NAMES}


def distribution_stats(values: Sequence[float]) -> dict[str, float]:
    """`weighted_distribution_stats` with every sample counted once."""
    if not values:
        return dict.fromkeys(STAT_NAMES, 0.0)
    samples = list(values)
    num_samples = len(samples)
    mean = math.fsum(samples) / num_samples
    variance = math.fsum([math.pow(value - mean, 2.0) for value in samples]) / num_samples
    samples.sort()
    stats = {"mean": mean, "min": samples[0], "max": samples[-1]}
    for name, percentile in PERCENTILES:
        stats[name] = samples[percentile_index(num_samples, percentile)]
    stats["std"] = math.sqrt(variance)
    return {name: stats[name] for name in STAT_NAMES}


# --------------------------------------------------------------------------------------------
# the collector


class _RequestStats:
    """What the collector remembers about one request."""

    __slots__ = (
        "arrival_ms",
        "completion_ms",
        "first_admission_reused_tokens",
        "first_admit_ms",
        "first_token_ms",
        "itl_counts",
        "itl_values",
        "last_token_ms",
        "max_output_tokens",
        "max_reused_tokens",
        "num_admissions",
        "num_input_tokens",
        "num_output_tokens",
        "num_preemptions",
        "num_tokens",
        "second_token_ms",
        "session_id",
        "turn_index",
    )

    def __init__(
        self,
        arrival_ms: float,
        num_input_tokens: int,
        max_output_tokens: int | None,
        session_id: int | None,
        turn_index: int | None,
    ) -> None:
        self.arrival_ms = arrival_ms
        self.num_input_tokens = num_input_tokens
        self.max_output_tokens = max_output_tokens
        self.session_id = session_id
        self.turn_index = turn_index
        self.first_admit_ms: float | None = None
        self.first_admission_reused_tokens = 0
        self.max_reused_tokens = 0
        self.num_admissions = 0
        self.num_preemptions = 0
        self.first_token_ms: float | None = None
        self.second_token_ms: float | None = None
        self.last_token_ms = 0.0
        self.num_tokens = 0
        # INVARIANT: parallel lists; consecutive equal gaps are merged into one pair.
        self.itl_values: list[float] = []
        self.itl_counts: list[int] = []
        self.completion_ms: float | None = None
        self.num_output_tokens = 0

    def tpot_ms(self) -> float | None:
        """Mean gap between tokens, (last - first) / (tokens - 1); None below two tokens."""
        if self.first_token_ms is None or self.num_tokens < 2:
            return None
        return max(0.0, self.last_token_ms - self.first_token_ms) / (self.num_tokens - 1)

    def ttst_ms(self) -> float | None:
        if self.first_token_ms is None or self.second_token_ms is None:
            return None
        return max(0.0, self.second_token_ms - self.first_token_ms)


class MetricsCollector:
    """Collects request lifecycle events during a replay and builds the report.

    Call order per request: `on_arrival`, then any number of `on_admission` /
    `on_preemption`, `on_first_token`, `on_tokens`, and finally `on_completion`. Only
    completed requests enter the distributions and token totals; `num_requests` counts
    every arrival.

    Raises:
        InvariantError: on a second `on_arrival`, `on_first_token` or `on_completion` for one
            request, or tokens before the first token (engine bugs).
        KeyError: an event for a request that never arrived.
    """

    __slots__ = ("_itl_counts", "_itl_values", "_num_completed", "_requests")

    def __init__(self) -> None:
        self._requests: dict[RequestId, _RequestStats] = {}
        self._itl_values: list[float] = []
        self._itl_counts: list[int] = []
        self._num_completed = 0

    @property
    def num_requests(self) -> int:
        """Requests that arrived so far."""
        return len(self._requests)

    @property
    def num_completed(self) -> int:
        """Requests that completed so far."""
        return self._num_completed

    def on_arrival(
        self,
        request_id: RequestId,
        now_ms: float,
        num_input_tokens: int,
        *,
        max_output_tokens: int | None = None,
        session_id: int | None = None,
        turn_index: int | None = None,
    ) -> None:
        """A request reached the fleet (its TTFT, E2E and queue clocks start)."""
        if request_id in self._requests:
            raise InvariantError(f"request {request_id} arrived twice")
        self._requests[request_id] = _RequestStats(
            now_ms, num_input_tokens, max_output_tokens, session_id, turn_index
        )

    def on_admission(self, request_id: RequestId, now_ms: float, reused_tokens: int) -> None:
        """The scheduler admitted the request, with `reused_tokens` prompt tokens cached.

        The first call is the first admission (queue time, first-admission reuse); later
        calls are re-admissions after preemption and only raise the max reuse.
        """
        stats = self._requests[request_id]
        if stats.first_admit_ms is None:
            stats.first_admit_ms = now_ms
            stats.first_admission_reused_tokens = reused_tokens
        stats.max_reused_tokens = max(stats.max_reused_tokens, reused_tokens)
        stats.num_admissions += 1

    def on_preemption(self, request_id: RequestId, now_ms: float) -> None:
        """The request was preempted (it keeps the tokens it already emitted)."""
        del now_ms  # NOTE: part of the event interface; only the count is reported.
        self._requests[request_id].num_preemptions += 1

    def on_first_token(self, request_id: RequestId, now_ms: float) -> None:
        """The request's first output token was emitted at `now_ms`."""
        stats = self._requests[request_id]
        if stats.first_token_ms is not None:
            raise InvariantError(f"request {request_id} emitted its first token twice")
        stats.first_token_ms = now_ms
        stats.last_token_ms = now_ms
        stats.num_tokens = 1

    def on_tokens(self, request_id: RequestId, num_tokens: int, itl_ms: float) -> None:
        """`num_tokens` more tokens, each `itl_ms` after the previous one.

        A decode-only stretch of k passes of equal duration is one call. Storage grows by
        at most one (value, count) pair per call, and not at all when the gap repeats.
        """
        if num_tokens <= 0:
            return
        stats = self._requests[request_id]
        if stats.first_token_ms is None:
            raise InvariantError(f"request {request_id} got tokens before its first token")
        itl_ms = max(0.0, itl_ms)
        if stats.second_token_ms is None:
            stats.second_token_ms = stats.last_token_ms + itl_ms
        stats.last_token_ms += num_tokens * itl_ms
        stats.num_tokens += num_tokens
        values = stats.itl_values
        if values and values[-1] == itl_ms:
            stats.itl_counts[-1] += num_tokens
        else:
            values.append(itl_ms)
            stats.itl_counts.append(num_tokens)

    def on_second_token(self, request_id: RequestId, now_ms: float) -> None:
        """The request's second token was emitted at `now_ms` (bulk mode; see `on_decode_tokens`)."""
        self._requests[request_id].second_token_ms = now_ms

    def on_decode_tokens(self, itl_ms: float, num_tokens: int) -> None:
        """Bulk mode: `num_tokens` tokens of different requests in one pass, each `itl_ms` after
        its request's previous token. O(1) per pass instead of one call per token; the engine
        then reports each request's second token and completion (its last token) explicitly.
        """
        if num_tokens <= 0:
            return
        itl_ms = max(0.0, itl_ms)
        values = self._itl_values
        if values and values[-1] == itl_ms:
            self._itl_counts[-1] += num_tokens
        else:
            values.append(itl_ms)
            self._itl_counts.append(num_tokens)

    def on_completion(self, request_id: RequestId, now_ms: float, num_output_tokens: int) -> None:
        """The request finished at `now_ms` having produced `num_output_tokens` tokens."""
        stats = self._requests[request_id]
        if stats.completion_ms is not None:
            raise InvariantError(f"request {request_id} completed twice")
        stats.completion_ms = now_ms
        stats.num_output_tokens = num_output_tokens
        # Bulk mode reports tokens without per-request calls: the last token is the completion.
        if stats.first_token_ms is not None and stats.num_tokens < num_output_tokens:
            stats.num_tokens = num_output_tokens
            stats.last_token_ms = max(stats.last_token_ms, now_ms)
        self._num_completed += 1
        self._itl_values.extend(stats.itl_values)
        self._itl_counts.extend(stats.itl_counts)
        # NOTE: the pairs now live in the global lists; the record keeps only summaries.
        stats.itl_values = []
        stats.itl_counts = []

    def build_report(
        self, *, wall_time_ms: float, extra: Mapping[str, ReportValue] | None = None
    ) -> dict[str, ReportValue]:
        """The flat report, Dynamo's key names and order, then `extra` keys.

        Args:
            wall_time_ms: host time the replay took (for `processed_tokens_per_s`).
            extra: more keys to append (engine counters, worker-seconds, ...).

        Raises:
            InvariantError: an `extra` key collides with a computed one.
        """
        ttfts: list[float] = []
        ttsts: list[float] = []
        tpots: list[float] = []
        e2es: list[float] = []
        queues: list[float] = []
        num_completed = 0
        total_input_tokens = 0
        total_output_tokens = 0
        total_reused_tokens = 0
        total_first_reused_tokens = 0
        duration_ms = 0.0
        for stats in self._requests.values():
            if stats.completion_ms is None:
                continue
            num_completed += 1
            total_input_tokens += stats.num_input_tokens
            total_output_tokens += stats.num_output_tokens
            total_reused_tokens += stats.max_reused_tokens
            total_first_reused_tokens += stats.first_admission_reused_tokens
            duration_ms = max(duration_ms, stats.completion_ms)
            if stats.first_admit_ms is not None:
                queues.append(max(0.0, stats.first_admit_ms - stats.arrival_ms))
            if stats.first_token_ms is None:
                continue
            ttfts.append(max(0.0, stats.first_token_ms - stats.arrival_ms))
            e2es.append(max(0.0, stats.last_token_ms - stats.arrival_ms))
            ttst_ms = stats.ttst_ms()
            if ttst_ms is not None:
                ttsts.append(ttst_ms)
            tpot_ms = stats.tpot_ms()
            if tpot_ms is not None:
                tpots.append(tpot_ms)

        duration_s = max(duration_ms / 1000.0, MIN_DURATION_S)
        processed_tokens = total_input_tokens + total_output_tokens
        wall_time_s = wall_time_ms / 1000.0
        report: dict[str, ReportValue] = {
            "num_requests": len(self._requests),
            "completed_requests": num_completed,
            "total_input_tokens": total_input_tokens,
            "total_output_tokens": total_output_tokens,
            "duration_ms": duration_ms,
            "wall_time_ms": wall_time_ms,
            "request_throughput_rps": num_completed / duration_s,
            "input_throughput_tok_s": total_input_tokens / duration_s,
            "output_throughput_tok_s": total_output_tokens / duration_s,
            "total_throughput_tok_s": processed_tokens / duration_s,
            "processed_tokens": processed_tokens,
            "processed_tokens_per_s": processed_tokens / wall_time_s if wall_time_s > 0 else 0.0,
            "processed_output_tokens_per_s": (
                total_output_tokens / wall_time_s if wall_time_s > 0 else 0.0
            ),
            "prefix_cache_reused_ratio": (
                total_reused_tokens / total_input_tokens if total_input_tokens else 0.0
            ),
            "first_admission_prefix_cache_reused_ratio": (
                total_first_reused_tokens / total_input_tokens if total_input_tokens else 0.0
            ),
            "num_ttft_samples": len(ttfts),
            "num_tpot_samples": len(tpots),
            "num_e2e_latency_samples": len(e2es),
        }
        itl_stats = weighted_distribution_stats(self._itl_values, self._itl_counts)
        per_user_values = [1000.0 / value for value in self._itl_values if value > 0]
        per_user_counts = [
            count
            for value, count in zip(self._itl_values, self._itl_counts, strict=True)
            if value > 0
        ]
        distributions = {
            "ttft": distribution_stats(ttfts),
            "ttst": distribution_stats(ttsts),
            "tpot": distribution_stats(tpots),
            "itl": itl_stats,
            "e2e_latency": distribution_stats(e2es),
        }
        for metric, stats_by_name in distributions.items():
            for name, value in stats_by_name.items():
                report[f"{name}_{metric}_ms"] = value
        per_user = weighted_distribution_stats(per_user_values, per_user_counts)
        for name, value in per_user.items():
            report[f"{name}_{PER_USER_THROUGHPUT}"] = value
        for name, value in distribution_stats(queues).items():
            report[f"{name}_queue_ms"] = value
        for key, extra_value in (extra or {}).items():
            if key in report:
                raise InvariantError(f"extra report key {key!r} collides with a computed key")
            report[key] = extra_value
        return report

    def request_summary(self, request_id: RequestId) -> dict[str, float | int | None]:
        """TTFT, E2E latency and output tokens of one request (None until known)."""
        stats = self._requests[request_id]
        first = stats.first_token_ms
        return {
            "ttft_ms": None if first is None else max(0.0, first - stats.arrival_ms),
            "e2e_ms": None
            if stats.completion_ms is None
            else max(0.0, stats.completion_ms - stats.arrival_ms),
            "output_tokens": stats.num_output_tokens,
        }

    def per_request_records(self) -> list[dict[str, RecordValue]]:
        """One record per completed request, sorted by arrival then request id.

        Field names follow Dynamo's per-request JSONL where it has one.
        """
        completed = sorted(
            (stats.arrival_ms, request_id, stats)
            for request_id, stats in self._requests.items()
            if stats.completion_ms is not None
        )
        records: list[dict[str, RecordValue]] = []
        for _, request_id, stats in completed:
            first_ms = stats.first_token_ms
            records.append(
                {
                    "request_id": request_id,
                    "session_id": stats.session_id,
                    "turn_index": stats.turn_index,
                    "arrival_time_ms": stats.arrival_ms,
                    "first_admit_ms": stats.first_admit_ms,
                    "terminal_time_ms": stats.completion_ms,
                    "first_token_ms": first_ms,
                    "last_token_ms": stats.last_token_ms if first_ms is not None else None,
                    "ttft_ms": None if first_ms is None else max(0.0, first_ms - stats.arrival_ms),
                    "ttst_ms": stats.ttst_ms(),
                    "e2e_latency_ms": (
                        None
                        if first_ms is None
                        else max(0.0, stats.last_token_ms - stats.arrival_ms)
                    ),
                    "itl_ms": stats.tpot_ms(),
                    "input_length": stats.num_input_tokens,
                    "requested_output_length": stats.max_output_tokens,
                    "output_length": stats.num_output_tokens,
                    "reused_input_tokens": stats.max_reused_tokens,
                    "first_admission_reused_input_tokens": stats.first_admission_reused_tokens,
                    "admission_count": stats.num_admissions,
                    "readmission_count": max(0, stats.num_admissions - 1),
                    "preemption_count": stats.num_preemptions,
                    "terminal_status": "completed",
                }
            )
        return records


# --------------------------------------------------------------------------------------------
# output (strings only; the CLI writes files atomically)


def format_report_json(report: Mapping[str, ReportValue]) -> str:
    """The report as pretty JSON text with a trailing newline."""
    return json.dumps(dict(report), indent=2) + "\n"


def format_jsonl(records: Iterable[Mapping[str, RecordValue]]) -> str:
    """Records as JSON Lines (one compact object per line)."""
    return "".join(json.dumps(dict(record), separators=(",", ":")) + "\n" for record in records)


def format_summary_table(report: Mapping[str, ReportValue]) -> str:
    """A short human-readable table of the headline numbers (missing keys read as 0)."""

    def get(key: str) -> float:
        return float(report.get(key, 0.0))

    lines = [
        f"requests      {int(get('completed_requests'))} completed / {int(get('num_requests'))}",
        f"duration      {get('duration_ms'):.1f} ms simulated, {get('wall_time_ms'):.1f} ms wall",
        f"throughput    {get('request_throughput_rps'):.2f} req/s, "
        f"{get('input_throughput_tok_s'):.1f} in tok/s, {get('output_throughput_tok_s'):.1f} out tok/s",
        f"prefix reuse  {get('prefix_cache_reused_ratio'):.3f} "
        f"(first admission {get('first_admission_prefix_cache_reused_ratio'):.3f})",
        f"{'latency (ms)':<13} {'mean':>10} {'median':>10} {'p90':>10} {'p99':>10} {'max':>10}",
    ]
    labels = {
        "ttft": "TTFT",
        "ttst": "TTST",
        "tpot": "TPOT",
        "itl": "ITL",
        "e2e_latency": "E2E",
        "queue": "queue",
    }
    for metric in LATENCY_METRICS:
        cells = " ".join(
            f"{get(f'{stat}_{metric}_ms'):>10.2f}"
            for stat in ("mean", "median", "p90", "p99", "max")
        )
        lines.append(f"{labels[metric]:<13} {cells}")
    return "\n".join(lines) + "\n"
