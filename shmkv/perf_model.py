"""Layer 1: how long a scheduler pass takes (behavior.md §11).

The default, uncalibrated polynomial model of Dynamo's mocker, plus the speedup scaling of
§11.4. Pure functions of their arguments: no clock, no I/O; imports only the stdlib and layer 0.

    prefill_ms(T) = 4.209989e-7 * T**2 + 1.518344e-2 * T + 16.50142    T = batch * (isl - prefix)
    decode_ms(u)  = max(1.0, -25.74 * u**2 + 54.01 * u + 5.74)          u = active / total KV tokens
"""

from __future__ import annotations

import math
from typing import Final

from shmkv.errors import ConfigError

PREFILL_QUADRATIC: Final = 4.209989e-7
PREFILL_LINEAR: Final = 1.518344e-2
PREFILL_CONSTANT_MS: Final = 16.50142
DECODE_QUADRATIC: Final = -25.74
DECODE_LINEAR: Final = 54.01
DECODE_CONSTANT_MS: Final = 5.74
MIN_DECODE_MS: Final = 1.0
"""Decode passes never take less than this (before speedup), so token steps never collapse."""


def prefill_ms(batch_count: int, mean_isl: int, mean_prefix: int) -> float:
    """Unscaled duration of the prefill part of a pass.

    Args:
        batch_count: requests with prompt tokens scheduled in this pass.
        mean_isl: integer mean of tokens computed through the end of each request's chunk.
        mean_prefix: integer mean of tokens computed before each chunk (cached or earlier).

    Returns:
        Milliseconds; 0.0 when the pass computes no new prompt tokens.
    """
    num_new_tokens = batch_count * (mean_isl - mean_prefix)
    if num_new_tokens <= 0:
        return 0.0
    return (
        PREFILL_QUADRATIC * num_new_tokens * num_new_tokens
        + PREFILL_LINEAR * num_new_tokens
        + PREFILL_CONSTANT_MS
    )


def decode_ms(
    batch: int, active_kv_tokens: int, context_length: int, total_kv_tokens: int
) -> float:
    """Unscaled duration of the decode part of a pass.

    Args:
        batch: requests emitting a token in this pass.
        active_kv_tokens: `num_active_blocks * block_size` of the rank.
        context_length: integer mean sequence length of the batch (unused by this model).
        total_kv_tokens: `num_gpu_blocks * block_size`; 0 means "fully utilized".

    Returns:
        Milliseconds; 0.0 for an empty batch, otherwise at least `MIN_DECODE_MS`.
    """
    del context_length  # NOTE: part of the model interface; the polynomial ignores it.
    if batch <= 0:
        return 0.0
    utilization = active_kv_tokens / total_kv_tokens if total_kv_tokens > 0 else 1.0
    duration_ms = (
        DECODE_QUADRATIC * utilization * utilization
        + DECODE_LINEAR * utilization
        + DECODE_CONSTANT_MS
    )
    return max(MIN_DECODE_MS, duration_ms)


def _check_ratio(name: str, ratio: float) -> None:
    if math.isnan(ratio):
        raise ConfigError(f"{name} must be a number, got NaN")


def _effective_divisor(ratio: float) -> float:
    """Offline semantics: a ratio <= 0 means unscaled; `inf` makes every duration 0."""
    return ratio if ratio > 0 else 1.0


class PerfModel:
    """The polynomial timing model with speedup applied.

    Prefill durations are divided by `speedup_ratio`, decode durations by
    `speedup_ratio * decode_speedup_ratio`. A ratio <= 0 counts as 1 (unscaled, the offline
    replay convention); `math.inf` makes durations 0.

    Args:
        speedup_ratio: global simulation speedup (`--speedup-ratio`).
        decode_speedup_ratio: extra decode-only multiplier (`--decode-speedup-ratio`).

    Raises:
        ConfigError: a ratio is NaN, or `decode_speedup_ratio` is negative.
    """

    __slots__ = ("_decode_divisor", "_prefill_divisor", "decode_speedup_ratio", "speedup_ratio")

    def __init__(self, speedup_ratio: float = 1.0, decode_speedup_ratio: float = 1.0) -> None:
        _check_ratio("speedup_ratio", speedup_ratio)
        _check_ratio("decode_speedup_ratio", decode_speedup_ratio)
        if decode_speedup_ratio < 0:
            raise ConfigError(
                f"decode_speedup_ratio must be >= 0 (1.0 = no extra decode speedup), "
                f"got {decode_speedup_ratio}"
            )
        self.speedup_ratio = speedup_ratio
        self.decode_speedup_ratio = decode_speedup_ratio
        self._prefill_divisor = _effective_divisor(speedup_ratio)
        self._decode_divisor = self._prefill_divisor * _effective_divisor(decode_speedup_ratio)

    def scaled_prefill_ms(self, batch_count: int, mean_isl: int, mean_prefix: int) -> float:
        """`prefill_ms(...)` divided by the speedup."""
        return prefill_ms(batch_count, mean_isl, mean_prefix) / self._prefill_divisor

    def scaled_decode_ms(
        self, batch: int, active_kv_tokens: int, context_length: int, total_kv_tokens: int
    ) -> float:
        """`decode_ms(...)` divided by the speedup and the decode speedup (inlined: called
        once per pass)."""
        if batch <= 0:
            return 0.0 / self._decode_divisor
        utilization = active_kv_tokens / total_kv_tokens if total_kv_tokens > 0 else 1.0
        duration_ms = (
            DECODE_QUADRATIC * utilization * utilization
            + DECODE_LINEAR * utilization
            + DECODE_CONSTANT_MS
        )
        return max(MIN_DECODE_MS, duration_ms) / self._decode_divisor
