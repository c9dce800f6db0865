"""Layer 0: engine configuration, validated once (behavior.md §14).

`EngineConfig` holds every per-rank engine option. Names follow Dynamo's mocker engine args
(`--extra-engine-args` JSON keys); `EngineConfig.from_mapping` rejects unknown keys and bad
values with a `ConfigError` that says what to change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from shmkv.errors import ConfigError

EVICTION_BACKENDS: Final = ("lineage", "lru", "multi-lru")
PREEMPTION_MODES: Final = ("lifo", "fifo")


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """Options of one rank's engine (scheduler, G1 pool, optional in-process G2)."""

    num_gpu_blocks: int = 16384
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    preemption_mode: str = "lifo"
    speedup_ratio: float = 1.0
    decode_speedup_ratio: float = 1.0
    eviction: str = "lineage"
    num_g2_blocks: int = 0
    kv_bytes_per_token: int = 0
    bandwidth_g1_to_g2_gbps: float = 14.0
    bandwidth_g2_to_g1_gbps: float = 14.0
    offload_batch_size: int = 32
    seed: int = 0
    extra: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _positive("num_gpu_blocks", self.num_gpu_blocks)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.block_size < 2:
            raise ConfigError(f"block_size must be an int >= 2, got {self.block_size!r}")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ConfigError(
                f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {self.preemption_mode!r}"
            )
        if self.eviction not in EVICTION_BACKENDS:
            raise ConfigError(
                f"eviction must be one of {', '.join(EVICTION_BACKENDS)}, got {self.eviction!r}"
            )
        for name in ("speedup_ratio", "decode_speedup_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or math.isnan(value) or value < 0:
                raise ConfigError(f"{name} must be >= 0 (or inf), got {value!r}")
        if self.num_g2_blocks < 0:
            raise ConfigError(f"num_g2_blocks must be >= 0, got {self.num_g2_blocks}")
        if self.kv_bytes_per_token < 0:
            raise ConfigError(f"kv_bytes_per_token must be >= 0, got {self.kv_bytes_per_token}")
        _positive("offload_batch_size", self.offload_batch_size)
        for name in ("bandwidth_g1_to_g2_gbps", "bandwidth_g2_to_g1_gbps"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or math.isnan(value):
                raise ConfigError(f"{name} must be a number (<= 0 means unlimited), got {value!r}")

    @property
    def has_g2(self) -> bool:
        return self.num_g2_blocks > 0

    @property
    def block_size_bytes(self) -> int:
        return self.block_size * self.kv_bytes_per_token

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, object], base: EngineConfig | None = None
    ) -> EngineConfig:
        """Overlay `values` (e.g. `--extra-engine-args` JSON) on `base`; unknown keys are errors."""
        known = set(cls.field_names())
        aliases = {"dp_size": None, "data_parallel_size": None}
        unknown = sorted(k for k in values if k not in known and k not in aliases)
        if unknown:
            raise ConfigError(
                f"unknown engine argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        updates = {k: v for k, v in values.items() if k in known}
        for name, value in updates.items():
            expected = _FIELD_TYPES.get(name)
            if expected is not None and not _type_ok(value, expected):
                raise ConfigError(f"engine argument {name!r} must be {expected}, got {value!r}")
        base = base or cls()
        try:
            return dataclasses.replace(base, **updates)  # type: ignore[arg-type]
        except TypeError as exc:  # pragma: no cover - guarded by the checks above
            raise ConfigError(str(exc)) from exc


_FIELD_TYPES: Final[dict[str, str]] = {
    "num_gpu_blocks": "int",
    "block_size": "int",
    "max_num_seqs": "int",
    "max_num_batched_tokens": "int",
    "max_model_len": "int|None",
    "enable_prefix_caching": "bool",
    "enable_chunked_prefill": "bool",
    "preemption_mode": "str",
    "speedup_ratio": "number",
    "decode_speedup_ratio": "number",
    "eviction": "str",
    "num_g2_blocks": "int",
    "kv_bytes_per_token": "int",
    "bandwidth_g1_to_g2_gbps": "number",
    "bandwidth_g2_to_g1_gbps": "number",
    "offload_batch_size": "int",
    "seed": "int",
}


def _type_ok(value: object, expected: str) -> bool:
    if expected == "bool":
        return isinstance(value, bool)
    if expected == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "int|None":
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    if expected == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
