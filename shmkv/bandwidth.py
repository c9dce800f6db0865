"""Layer 1: a processor-sharing link model for timing KV block copies (behavior.md §8.2).

A link of `gbps` GB/s moves `B = gbps * 1e6` bytes per millisecond. All active transfers share
it equally: with `n` active, each progresses at `B / n`. Imports only the stdlib and layer 0;
it never reads a clock, callers hand it `now_ms`.

How it is computed. Because every active transfer receives the same service, the model keeps
one counter, `served_bytes`: the bytes each active transfer has received since the link last
went idle. A transfer started when the counter read `s` with `b` bytes finishes when the
counter reaches `s + b` (its *finish key*). So transfers finish in finish-key order, a heap
gives the next one in O(log n), and advancing time without a completion is O(1):

    remaining(t)   = finish_key(t) - served_bytes
    next finish at = last_update_ms + n * min(remaining) / B
    deadline(t)    = last_update_ms + sum_i min(remaining_i, remaining(t)) / B     O(n)

The counter restarts at zero whenever the link goes idle, so it stays small.
"""

from __future__ import annotations

import heapq
import math
from typing import Final

from shmkv.errors import ConfigError

COMPLETION_TOLERANCE_MS: Final = 1e-9
"""A transfer whose finish time is within this of `now_ms` completes at `now_ms`."""
BYTES_PER_MS_PER_GBPS: Final = 1e6
"""1 GB/s (GB = 1e9 bytes) moves 1e6 bytes per millisecond."""


class BandwidthModel:
    """One direction of one link, shared by its transfers in processor-sharing fashion.

    Args:
        gbps: link throughput in GB/s (1 GB = 1e9 bytes); `<= 0` means infinite bandwidth,
            so every transfer completes at its start time.

    Raises:
        ConfigError: `gbps` is NaN.

    Costs: `start` O(log n), `advance_to` O(1) plus O(log n) per completion,
    `earliest_finish_ms` amortized O(log n), `deadline_ms` O(n), `remove` O(1) (lazy).
    """

    __slots__ = (
        "_bytes_per_ms",
        "_finish_key_of",
        "_heap",
        "_last_update_ms",
        "_next_seq",
        "_served_bytes",
    )

    def __init__(self, gbps: float) -> None:
        if math.isnan(gbps):
            raise ConfigError("link bandwidth (gbps) must be a number, got NaN")
        self._bytes_per_ms: float = gbps * BYTES_PER_MS_PER_GBPS if gbps > 0 else math.inf
        self._last_update_ms = 0.0
        self._served_bytes = 0.0
        # INVARIANT: every live transfer has exactly one heap entry whose (key, seq) equals
        # `_finish_key_of[id]`; other heap entries are stale (removed) and skipped lazily.
        self._finish_key_of: dict[int, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, int]] = []  # (finish key, start seq, transfer id)
        self._next_seq = 0

    @property
    def bytes_per_ms(self) -> float:
        """Link throughput in bytes per millisecond (`math.inf` when unlimited)."""
        return self._bytes_per_ms

    @property
    def is_infinite(self) -> bool:
        """True when the link has no bandwidth limit."""
        return math.isinf(self._bytes_per_ms)

    @property
    def num_active(self) -> int:
        """Transfers started and not yet completed or removed."""
        return len(self._finish_key_of)

    @property
    def last_update_ms(self) -> float:
        """The latest time the model was advanced to (monotone)."""
        return self._last_update_ms

    def start(self, now_ms: float, num_bytes: float, transfer_id: int) -> None:
        """Start a transfer of `num_bytes` at `now_ms`.

        `now_ms` is clamped up to `last_update_ms` (a rewound clock starts the transfer at
        `last_update_ms`). Callers call `advance_to(now_ms)` first so that no completion is
        missed; an idle link simply moves its clock forward.

        Raises:
            ValueError: `transfer_id` is already active; `num_bytes` is negative or NaN; or
                `now_ms` is ahead of `last_update_ms` while transfers are active (advance
                first, or their completions would be lost).
        """
        if transfer_id in self._finish_key_of:
            raise ValueError(f"transfer {transfer_id} is already active on this link")
        if not num_bytes >= 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        if now_ms > self._last_update_ms:
            if self._finish_key_of:
                raise ValueError(
                    f"start at {now_ms} ms on a link last advanced to {self._last_update_ms} ms"
                    " with active transfers: call advance_to(now_ms) first"
                )
            self._last_update_ms = now_ms
        if math.isinf(self._bytes_per_ms):
            num_bytes = 0.0
        key = (self._served_bytes + num_bytes, self._next_seq)
        self._next_seq += 1
        self._finish_key_of[transfer_id] = key
        heapq.heappush(self._heap, (key[0], key[1], transfer_id))

    def advance_to(self, now_ms: float) -> list[int]:
        """Progress every transfer up to `now_ms`; return the ids that completed, in order.

        A rewind (`now_ms < last_update_ms`) does nothing: virtual clocks may go back, copied
        bytes cannot. Ties complete in start order.
        """
        if not now_ms >= self._last_update_ms:  # NOTE: also refuses NaN
            return []
        completed: list[int] = []
        while True:
            top = self._peek()
            if top is None:
                break
            key, _, transfer_id = top
            num_active = len(self._finish_key_of)
            remaining_bytes = max(0.0, key - self._served_bytes)
            finish_ms = self._last_update_ms + remaining_bytes * num_active / self._bytes_per_ms
            if finish_ms > now_ms + COMPLETION_TOLERANCE_MS:
                self._served_bytes += (now_ms - self._last_update_ms) * (
                    self._bytes_per_ms / num_active
                )
                break
            heapq.heappop(self._heap)
            del self._finish_key_of[transfer_id]
            self._served_bytes = max(self._served_bytes, key)
            self._last_update_ms = max(self._last_update_ms, min(finish_ms, now_ms))
            completed.append(transfer_id)
        self._last_update_ms = now_ms
        if not self._finish_key_of:
            self._reset_idle()
        return completed

    def earliest_finish_ms(self) -> float | None:
        """When the next transfer completes if nothing else starts; None when idle."""
        top = self._peek()
        if top is None:
            return None
        remaining_bytes = max(0.0, top[0] - self._served_bytes)
        return (
            self._last_update_ms + remaining_bytes * len(self._finish_key_of) / self._bytes_per_ms
        )

    def deadline_ms(self, transfer_id: int) -> float:
        """When `transfer_id` completes if nothing else starts.

        Every transfer with less left finishes earlier and stops sharing the link; every
        other one shares it until this one is done, hence
        `last_update_ms + sum_i min(remaining_i, remaining) / B`.

        Raises:
            KeyError: the transfer is not active.
        """
        target_key = self._finish_key_of[transfer_id][0]
        served = self._served_bytes
        target_remaining = max(0.0, target_key - served)
        total_bytes = 0.0
        for key, _ in self._finish_key_of.values():
            total_bytes += min(max(0.0, key - served), target_remaining)
        return self._last_update_ms + total_bytes / self._bytes_per_ms

    def remaining_bytes(self, transfer_id: int) -> float:
        """Bytes `transfer_id` still has to move. Raises KeyError if it is not active."""
        return max(0.0, self._finish_key_of[transfer_id][0] - self._served_bytes)

    def remove(self, transfer_id: int) -> bool:
        """Cancel a transfer; the others share the link from `last_update_ms` on.

        Returns:
            True if it was active, False if unknown or already completed.
        """
        if self._finish_key_of.pop(transfer_id, None) is None:
            return False
        if not self._finish_key_of:
            self._reset_idle()
        return True

    def _peek(self) -> tuple[float, int, int] | None:
        """The live heap entry with the smallest finish key, dropping stale entries."""
        heap = self._heap
        while heap:
            key, seq, transfer_id = heap[0]
            if self._finish_key_of.get(transfer_id) == (key, seq):
                return heap[0]
            heapq.heappop(heap)
        return None

    def _reset_idle(self) -> None:
        # NOTE: restarting the counter when idle keeps finish keys small, hence precise.
        self._heap.clear()
        self._served_bytes = 0.0
