"""Layer 1: what the replay driver sends: request and session specs, synthetic workloads and
Mooncake traces (behavior.md §13.1-13.2).

Pure: the caller opens files and hands over lines; nothing here reads a clock or the disk.
Imports only the stdlib and layer 0.

A `Session` is an ordered list of turns. Its first turn arrives at an absolute time
(`arrival_ms`); every later turn is released `delay_ms` after the previous turn completes, so
its `arrival_ms` is not used for dispatch. Rows without a session are one-turn sessions.

Prompts are `array('I')` of token ids (unsigned 32-bit), built with bulk byte operations:
this feeds a performance-critical replay.
"""

from __future__ import annotations

import json
import math
import random
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from shmkv.errors import ConfigError, TraceFormatError

TOKEN_TYPECODE: Final = "I"
"""array typecode of prompts: unsigned 32-bit token ids."""
TOKEN_ID_LIMIT: Final = 1 << 32
"""Exclusive upper bound of a token id (and of a Mooncake hash id)."""
LINE_FIELD: Final = "<line>"
"""The `field` of a TraceFormatError about the whole line (not JSON, not an object)."""

if array(TOKEN_TYPECODE).itemsize != 4:  # pragma: no cover - every mainstream platform
    raise ImportError("shmkv needs array('I') to hold 32-bit items on this platform")


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request (one turn of a session) as the driver dispatches it."""

    request_id: int
    """Unique across the whole workload."""
    session_id: int
    turn_index: int
    """0 for the first turn of a session."""
    arrival_ms: float
    """First turns: absolute arrival time. Later turns: informational only (not dispatched on)."""
    delay_ms: float
    """Later turns: released this long after the previous turn completes. 0 for first turns."""
    tokens: array[int]
    """The full prompt, typecode 'I'."""
    max_output_tokens: int

    @property
    def num_input_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.tokens)


@dataclass(frozen=True, slots=True)
class Session:
    """An ordered list of turns sharing a conversation."""

    session_id: int
    first_arrival_ms: float
    turns: list[RequestSpec]


def count_requests(sessions: Iterable[Session]) -> int:
    """Total number of requests (turns) in `sessions`."""
    return sum(len(session.turns) for session in sessions)


# --------------------------------------------------------------------------------------------
# synthetic workloads


def _round_half_up(value: float) -> int:
    """Round like Rust's `f64::round` (halves away from zero) for non-negative values."""
    return math.floor(value + 0.5)


def _random_tokens(rng: random.Random, num_tokens: int) -> array[int]:
    """`num_tokens` uniformly random 32-bit token ids, in one bulk call."""
    tokens = array(TOKEN_TYPECODE)
    tokens.frombytes(rng.randbytes(4 * num_tokens))
    return tokens


def _arrival_times_ms(
    request_count: int,
    request_rate: float | None,
    arrival_interval_ms: float | None,
    arrival_seed: int,
) -> list[float]:
    """First-turn arrival times: Poisson, fixed gaps, or a burst at 0. The first is at 0."""
    if request_rate is not None:
        rng = random.Random(arrival_seed)
        rate_per_ms = request_rate / 1000.0
        times_ms = [0.0] * request_count
        now_ms = 0.0
        for index in range(1, request_count):
            now_ms += rng.expovariate(rate_per_ms)
            times_ms[index] = now_ms
        return times_ms
    if arrival_interval_ms is not None:
        return [index * arrival_interval_ms for index in range(request_count)]
    return [0.0] * request_count


def _check_synthetic_args(
    input_tokens: int,
    output_tokens: int,
    request_count: int,
    request_rate: float | None,
    arrival_interval_ms: float | None,
    turns_per_session: int,
    shared_prefix_ratio: float,
    num_prefix_groups: int,
    inter_turn_delay_ms: float,
    block_size: int,
) -> None:
    if input_tokens < 1:
        raise ConfigError(f"input_tokens must be >= 1, got {input_tokens}")
    if output_tokens < 1:
        raise ConfigError(f"output_tokens must be >= 1, got {output_tokens}")
    if request_count < 0:
        raise ConfigError(f"request_count must be >= 0, got {request_count}")
    if request_rate is not None and arrival_interval_ms is not None:
        raise ConfigError("give either request_rate or arrival_interval_ms, not both")
    if request_rate is not None and not (request_rate > 0 and math.isfinite(request_rate)):
        raise ConfigError(f"request_rate must be a finite number > 0 req/s, got {request_rate}")
    if arrival_interval_ms is not None and not (
        arrival_interval_ms >= 0 and math.isfinite(arrival_interval_ms)
    ):
        raise ConfigError(f"arrival_interval_ms must be finite and >= 0, got {arrival_interval_ms}")
    if turns_per_session < 1:
        raise ConfigError(f"turns_per_session must be >= 1, got {turns_per_session}")
    if not 0.0 <= shared_prefix_ratio <= 1.0:
        raise ConfigError(f"shared_prefix_ratio must be in [0, 1], got {shared_prefix_ratio}")
    if num_prefix_groups < 0:
        raise ConfigError(f"num_prefix_groups must be >= 0, got {num_prefix_groups}")
    if not (inter_turn_delay_ms >= 0 and math.isfinite(inter_turn_delay_ms)):
        raise ConfigError(f"inter_turn_delay_ms must be finite and >= 0, got {inter_turn_delay_ms}")
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")


def synthetic_sessions(
    *,
    input_tokens: int,
    output_tokens: int,
    request_count: int,
    request_rate: float | None = None,
    arrival_interval_ms: float | None = None,
    arrival_seed: int = 42,
    turns_per_session: int = 1,
    shared_prefix_ratio: float = 0.0,
    num_prefix_groups: int = 0,
    inter_turn_delay_ms: float = 0.0,
    block_size: int = 16,
    seed: int = 0,
    accumulate_turns: bool = True,
) -> list[Session]:
    """A seeded synthetic workload of `request_count` sessions.

    Arrivals of first turns: Poisson with `request_rate` req/s (exponential gaps of mean
    `1000 / request_rate` ms, seeded by `arrival_seed`), or fixed `arrival_interval_ms` gaps,
    or, with neither, all at 0 (a burst: a closed-loop driver's concurrency then paces it).
    The first session arrives at 0.

    Prompts (seeded by `seed`): each first-turn prompt has `input_tokens` tokens. With
    `num_prefix_groups >= 1`, its first `round(full_blocks * shared_prefix_ratio)` blocks
    (`full_blocks = input_tokens // block_size`) are the prefix of a group chosen uniformly at
    random per session; the rest are unique random tokens. `num_prefix_groups == 0` disables
    sharing whatever the ratio (as Dynamo does).

    Later turns are released `inter_turn_delay_ms` after the previous turn completes. With
    `accumulate_turns` (the default, a chat history), turn k's prompt is turn k-1's prompt,
    then `output_tokens` placeholder tokens standing for turn k-1's answer, then
    `input_tokens` new unique tokens. The placeholders are random and unique: the engine does
    not generate the same ids, so only the previous prompt's blocks can be reused. With
    `accumulate_turns=False`, every turn is a fresh `input_tokens` prompt built like a first
    turn (what Dynamo 1.6.1's synthetic replay does).

    Raises:
        ConfigError: a count or length is out of range, or both arrival modes are given.
    """
    _check_synthetic_args(
        input_tokens,
        output_tokens,
        request_count,
        request_rate,
        arrival_interval_ms,
        turns_per_session,
        shared_prefix_ratio,
        num_prefix_groups,
        inter_turn_delay_ms,
        block_size,
    )
    arrival_times_ms = _arrival_times_ms(
        request_count, request_rate, arrival_interval_ms, arrival_seed
    )
    token_rng = random.Random(seed)
    group_rng = random.Random(f"shmkv-prefix-group-choice-{seed}")
    num_prefix_tokens = 0
    if num_prefix_groups > 0:
        num_prefix_blocks = _round_half_up((input_tokens // block_size) * shared_prefix_ratio)
        num_prefix_tokens = num_prefix_blocks * block_size
    group_prefixes: dict[int, array[int]] = {}

    def fresh_prompt() -> array[int]:
        if num_prefix_tokens == 0:
            return _random_tokens(token_rng, input_tokens)
        group = group_rng.randrange(num_prefix_groups)
        prefix = group_prefixes.get(group)
        if prefix is None:
            prefix = _random_tokens(
                random.Random(f"shmkv-prefix-{seed}-{group}"), num_prefix_tokens
            )
            group_prefixes[group] = prefix
        prompt = array(TOKEN_TYPECODE, prefix)
        prompt.frombytes(token_rng.randbytes(4 * (input_tokens - num_prefix_tokens)))
        return prompt

    sessions: list[Session] = []
    next_request_id = 0
    for session_id, arrival_ms in enumerate(arrival_times_ms):
        turns: list[RequestSpec] = []
        prompt = fresh_prompt()
        for turn_index in range(turns_per_session):
            if turn_index > 0:
                if accumulate_turns:
                    prompt = array(TOKEN_TYPECODE, prompt)
                    prompt.frombytes(token_rng.randbytes(4 * (output_tokens + input_tokens)))
                else:
                    prompt = fresh_prompt()
            turns.append(
                RequestSpec(
                    request_id=next_request_id,
                    session_id=session_id,
                    turn_index=turn_index,
                    arrival_ms=arrival_ms,
                    delay_ms=inter_turn_delay_ms if turn_index > 0 else 0.0,
                    tokens=prompt,
                    max_output_tokens=output_tokens,
                )
            )
            next_request_id += 1
        sessions.append(Session(session_id=session_id, first_arrival_ms=arrival_ms, turns=turns))
    return sessions


# --------------------------------------------------------------------------------------------
# Mooncake JSONL traces


@dataclass(slots=True)
class _Row:
    """One parsed trace line, before time normalization."""

    line_no: int
    request_id: int
    timestamp_ms: float | None
    delay_ms: float | None
    session_key: str | None
    tokens: array[int]
    output_length: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _pick(row: dict[str, object], name: str, alias: str) -> tuple[str, object] | None:
    """The (field name, value) of `name`, else of `alias`; None if neither is present."""
    if name in row:
        return name, row[name]
    if alias in row:
        return alias, row[alias]
    return None


class _LineParser:
    """Validates one decoded line; every failure is a TraceFormatError naming the field."""

    def __init__(self, source: str, trace_block_size: int) -> None:
        self.source = source
        self.trace_block_size = trace_block_size

    def error(self, line_no: int, field: str, reason: str) -> TraceFormatError:
        return TraceFormatError(self.source, line_no, field, reason)

    def decode(self, line_no: int, line: str) -> dict[str, object]:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise self.error(line_no, LINE_FIELD, f"not valid JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise self.error(
                line_no, LINE_FIELD, f"expected a JSON object, got {type(row).__name__}"
            )
        return row

    def non_negative_int(self, line_no: int, field: str, value: object, minimum: int) -> int:
        if not _is_int(value):
            raise self.error(line_no, field, f"expected an integer, got {value!r:.40}")
        assert isinstance(value, int)
        if value < minimum:
            raise self.error(line_no, field, f"must be >= {minimum}, got {value}")
        return value

    def time_ms(self, line_no: int, field: str, value: object) -> float:
        if not _is_number(value):
            raise self.error(
                line_no, field, f"expected a number of milliseconds, got {value!r:.40}"
            )
        assert isinstance(value, int | float)
        number = float(value)
        if not math.isfinite(number):
            raise self.error(line_no, field, f"must be finite, got {number}")
        if number < 0:
            raise self.error(line_no, field, f"must be >= 0, got {number}")
        return number

    def tokens(self, line_no: int, value: object, input_length: int) -> array[int]:
        if not isinstance(value, list):
            raise self.error(line_no, "hash_ids", f"expected a list of integers, got {value!r:.40}")
        if not value:
            raise self.error(line_no, "hash_ids", "must not be empty")
        for hash_id in value:
            if not _is_int(hash_id) or not 0 <= hash_id < TOKEN_ID_LIMIT:
                raise self.error(
                    line_no, "hash_ids", f"expected integers in [0, 2**32), got {hash_id!r:.40}"
                )
        block_size = self.trace_block_size
        # NOTE: input_length beyond the blocks given is clamped (newer Dynamo), not an error.
        num_tokens = min(input_length, len(value) * block_size)
        num_blocks = -(-num_tokens // block_size)
        byteorder = sys.byteorder
        tokens = array(TOKEN_TYPECODE)
        tokens.frombytes(
            b"".join(hash_id.to_bytes(4, byteorder) * block_size for hash_id in value[:num_blocks])
        )
        del tokens[num_tokens:]
        return tokens

    def parse(self, line_no: int, line: str, request_id: int) -> _Row:
        row = self.decode(line_no, line)

        picked = _pick(row, "input_length", "input_tokens")
        if picked is None:
            raise self.error(line_no, "input_length", "missing (alias input_tokens)")
        input_length = self.non_negative_int(line_no, picked[0], picked[1], minimum=1)

        picked = _pick(row, "output_length", "output_tokens")
        if picked is None:
            raise self.error(line_no, "output_length", "missing (alias output_tokens)")
        output_length = self.non_negative_int(line_no, picked[0], picked[1], minimum=1)

        if "hash_ids" not in row:
            raise self.error(line_no, "hash_ids", "missing")
        tokens = self.tokens(line_no, row["hash_ids"], input_length)

        session_key: str | None = None
        session_value = row.get("session_id")
        if session_value is not None:
            if not (isinstance(session_value, str) or _is_int(session_value)):
                raise self.error(
                    line_no,
                    "session_id",
                    f"expected a string or an integer, got {session_value!r:.40}",
                )
            session_key = str(session_value)

        timestamp_ms: float | None = None
        picked = _pick(row, "timestamp", "created_time")
        if picked is not None and picked[1] is not None:
            timestamp_ms = self.time_ms(line_no, picked[0], picked[1])

        delay_ms: float | None = None
        if row.get("delay") is not None:
            delay_ms = self.time_ms(line_no, "delay", row["delay"])

        return _Row(line_no, request_id, timestamp_ms, delay_ms, session_key, tokens, output_length)


def mooncake_sessions(
    lines: Iterable[str],
    *,
    source: str,
    trace_block_size: int,
    arrival_speedup_ratio: float = 1.0,
) -> list[Session]:
    """Parse a Mooncake JSONL trace into sessions, sorted by first arrival.

    Each line is one request: `timestamp` ms (alias `created_time`), `input_length` (alias
    `input_tokens`), `output_length` (alias `output_tokens`), `hash_ids` (ints in
    [0, 2**32)), optional `session_id` (string or integer) and `delay` ms. Other keys are
    ignored. Each hash id becomes `trace_block_size` copies of itself as a token id; the
    concatenation is truncated to `input_length`, which is clamped to
    `len(hash_ids) * trace_block_size`.

    Rows sharing a `session_id` are turns in file order (an integer id and its decimal string
    name the same session). A later turn is released `delay` ms after the previous turn
    completes, or, without `delay`, the difference of the two turns' timestamps. First-turn
    timestamps are shifted so the earliest is 0; timestamps and delays
    are divided by `arrival_speedup_ratio`. Blank lines are skipped; request ids are the
    0-based index of the request in the file.

    Args:
        lines: the file's lines (an open text file works).
        source: the file name, for error messages.
        trace_block_size: tokens per hash id (512 for the public Mooncake traces).
        arrival_speedup_ratio: divides timestamps and delays.

    Raises:
        TraceFormatError: a malformed line (1-based `line_no`, the offending `field`).
        ConfigError: `trace_block_size < 1` or a non-positive `arrival_speedup_ratio`.
    """
    if trace_block_size < 1:
        raise ConfigError(f"trace_block_size must be >= 1, got {trace_block_size}")
    if not (arrival_speedup_ratio > 0 and math.isfinite(arrival_speedup_ratio)):
        raise ConfigError(
            f"arrival_speedup_ratio must be a finite number > 0, got {arrival_speedup_ratio}"
        )
    parser = _LineParser(source, trace_block_size)
    # Group rows into sessions (file order), validating session-level rules as we go.
    grouped: list[list[_Row]] = []
    group_of_session: dict[str, list[_Row]] = {}
    num_rows = 0
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = parser.parse(line_no, line, request_id=num_rows)
        num_rows += 1
        previous_turns = (
            group_of_session.get(row.session_key) if row.session_key is not None else None
        )
        if previous_turns is None:
            if row.delay_ms is not None:
                raise parser.error(line_no, "delay", "not allowed on the first turn of a session")
            if row.timestamp_ms is None:
                raise parser.error(line_no, "timestamp", "missing (alias created_time)")
            turns = [row]
            grouped.append(turns)
            if row.session_key is not None:
                group_of_session[row.session_key] = turns
            continue
        if row.delay_ms is None:
            previous_ms = previous_turns[-1].timestamp_ms
            if row.timestamp_ms is None or previous_ms is None:
                raise parser.error(
                    line_no, "delay", "a later turn needs a delay or timestamps on both turns"
                )
            if row.timestamp_ms < previous_ms:
                raise parser.error(
                    line_no, "timestamp", f"earlier than the previous turn ({previous_ms} ms)"
                )
            row.delay_ms = row.timestamp_ms - previous_ms
        previous_turns.append(row)
    return _build_sessions(grouped, arrival_speedup_ratio)


def _build_sessions(grouped: list[list[_Row]], arrival_speedup_ratio: float) -> list[Session]:
    """Normalize times, number requests in file order, and sort sessions by first arrival."""
    # INVARIANT: first turns carry a timestamp (checked while grouping).
    first_times_ms = [turns[0].timestamp_ms or 0.0 for turns in grouped]
    start_ms = min(first_times_ms, default=0.0)
    sessions: list[Session] = []
    for session_id, (turns, first_ms) in enumerate(zip(grouped, first_times_ms, strict=True)):
        arrival_ms = (first_ms - start_ms) / arrival_speedup_ratio
        specs = [
            RequestSpec(
                request_id=row.request_id,
                session_id=session_id,
                turn_index=turn_index,
                arrival_ms=arrival_ms,
                delay_ms=(row.delay_ms or 0.0) / arrival_speedup_ratio if turn_index else 0.0,
                tokens=row.tokens,
                max_output_tokens=row.output_length,
            )
            for turn_index, row in enumerate(turns)
        ]
        sessions.append(Session(session_id=session_id, first_arrival_ms=arrival_ms, turns=specs))
    sessions.sort(key=lambda session: session.first_arrival_ms)
    return sessions
