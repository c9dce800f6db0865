"""Layer 1: feeding a pass's outcome into the metrics collector.

Used by the offline replay (in process) and the fleet supervisor (from ranks' RESULTS
messages), so both account tokens, ITL and completions identically.
"""

from __future__ import annotations

from collections.abc import Sequence

from shmkv.ids import RequestId
from shmkv.report import MetricsCollector


def record_pass(
    collector: MetricsCollector,
    *,
    start_ms: float,
    end_ms: float,
    prev_end_ms: float,
    admissions: Sequence[Sequence[int]],
    first_tokens: Sequence[RequestId],
    second_tokens: Sequence[RequestId],
    num_decode_tokens: int,
    token_gaps: Sequence[Sequence[float]],
    completions: Sequence[Sequence[int]],
    preemptions: Sequence[RequestId],
) -> None:
    """Account one pass; completions are recorded last (their last token is at `end_ms`)."""
    for request_id, reused in admissions:
        collector.on_admission(int(request_id), start_ms, int(reused))
    for request_id in first_tokens:
        collector.on_first_token(request_id, end_ms)
    for request_id in second_tokens:
        collector.on_second_token(request_id, end_ms)
    if num_decode_tokens:
        collector.on_decode_tokens(end_ms - prev_end_ms, num_decode_tokens)
    for _request_id, gap in token_gaps:
        collector.on_decode_tokens(float(gap), 1)
    for request_id in preemptions:
        collector.on_preemption(request_id, start_ms)
    for request_id, num_output in completions:
        collector.on_completion(int(request_id), end_ms, int(num_output))
