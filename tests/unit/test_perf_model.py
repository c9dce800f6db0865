"""The polynomial timing model of behavior.md §11.3 and the speedup scaling of §11.4."""

from __future__ import annotations

import math

import pytest

from shmkv.errors import ConfigError
from shmkv.perf_model import MIN_DECODE_MS, PerfModel, decode_ms, prefill_ms


def test_prefill_polynomial_on_new_tokens() -> None:
    # T = 2 * (1000 - 200) = 1600 new tokens
    expected = 4.209989e-7 * 1600**2 + 1.518344e-2 * 1600 + 16.50142
    assert prefill_ms(2, 1000, 200) == pytest.approx(expected, rel=1e-12)
    assert prefill_ms(1, 1, 0) == pytest.approx(4.209989e-7 + 1.518344e-2 + 16.50142)


@pytest.mark.parametrize(("batch", "isl", "prefix"), [(0, 100, 0), (3, 64, 64), (1, 10, 20)])
def test_prefill_without_new_tokens_is_free(batch: int, isl: int, prefix: int) -> None:
    assert prefill_ms(batch, isl, prefix) == 0.0


def test_decode_polynomial_on_utilization() -> None:
    assert decode_ms(8, 500, 1000, 1000) == pytest.approx(-25.74 * 0.25 + 54.01 * 0.5 + 5.74)
    assert decode_ms(1, 0, 10, 1000) == pytest.approx(5.74)
    assert decode_ms(1, 1000, 10, 1000) == pytest.approx(-25.74 + 54.01 + 5.74)


def test_decode_with_unknown_capacity_counts_as_full() -> None:
    assert decode_ms(1, 123, 10, 0) == decode_ms(1, 7, 10, 7)


def test_decode_empty_batch_is_free_and_otherwise_floored() -> None:
    assert decode_ms(0, 500, 10, 1000) == 0.0
    # far past full utilization the polynomial goes negative: floored at 1 ms
    assert decode_ms(1, 3000, 10, 1000) == MIN_DECODE_MS


def test_speedup_scales_prefill_and_decode() -> None:
    model = PerfModel(speedup_ratio=2.0, decode_speedup_ratio=5.0)
    assert model.scaled_prefill_ms(1, 100, 0) == pytest.approx(prefill_ms(1, 100, 0) / 2)
    assert model.scaled_decode_ms(4, 10, 10, 100) == pytest.approx(decode_ms(4, 10, 10, 100) / 10)


def test_default_model_is_unscaled() -> None:
    model = PerfModel()
    assert model.scaled_prefill_ms(1, 100, 0) == prefill_ms(1, 100, 0)
    assert model.scaled_decode_ms(4, 10, 10, 100) == decode_ms(4, 10, 10, 100)


@pytest.mark.parametrize("ratio", [0.0, -3.0])
def test_non_positive_speedup_means_unscaled(ratio: float) -> None:
    model = PerfModel(speedup_ratio=ratio, decode_speedup_ratio=0.0)
    assert model.scaled_prefill_ms(1, 100, 0) == prefill_ms(1, 100, 0)
    assert model.scaled_decode_ms(4, 10, 10, 100) == decode_ms(4, 10, 10, 100)


def test_infinite_speedup_makes_passes_instant() -> None:
    model = PerfModel(speedup_ratio=math.inf)
    assert model.scaled_prefill_ms(1, 100, 0) == 0.0
    assert model.scaled_decode_ms(4, 10, 10, 100) == 0.0
    decode_only = PerfModel(decode_speedup_ratio=math.inf)
    assert decode_only.scaled_prefill_ms(1, 100, 0) == prefill_ms(1, 100, 0)
    assert decode_only.scaled_decode_ms(4, 10, 10, 100) == 0.0


@pytest.mark.parametrize(
    ("speedup", "decode_speedup"), [(math.nan, 1.0), (1.0, math.nan), (1.0, -0.5)]
)
def test_invalid_ratios_are_config_errors(speedup: float, decode_speedup: float) -> None:
    with pytest.raises(ConfigError):
        PerfModel(speedup_ratio=speedup, decode_speedup_ratio=decode_speedup)
