"""Synthetic workloads and Mooncake trace parsing (behavior.md §13.1-13.2)."""

from __future__ import annotations

import json
import math
from array import array

import pytest
from hypothesis import given, strategies as st

from shmkv.errors import ConfigError, TraceFormatError
from shmkv.workload import (
    LINE_FIELD,
    RequestSpec,
    Session,
    count_requests,
    mooncake_sessions,
    synthetic_sessions,
)

# --------------------------------------------------------------------------------------------
# synthetic


def _all_turns(sessions: list[Session]) -> list[RequestSpec]:
    return [turn for session in sessions for turn in session.turns]


def test_synthetic_shapes() -> None:
    sessions = synthetic_sessions(input_tokens=100, output_tokens=7, request_count=5)
    assert [s.session_id for s in sessions] == [0, 1, 2, 3, 4]
    assert count_requests(sessions) == 5
    for index, session in enumerate(sessions):
        (turn,) = session.turns
        assert turn.request_id == index
        assert turn.session_id == index
        assert turn.turn_index == 0
        assert turn.delay_ms == 0.0
        assert turn.max_output_tokens == 7
        assert isinstance(turn.tokens, array)
        assert turn.tokens.typecode == "I"
        assert turn.num_input_tokens == 100
    # burst: no rate and no interval -> everybody at 0
    assert {s.first_arrival_ms for s in sessions} == {0.0}


def test_synthetic_is_deterministic_by_seed() -> None:
    def make(seed: int, arrival_seed: int) -> list[Session]:
        return synthetic_sessions(
            input_tokens=64,
            output_tokens=4,
            request_count=20,
            request_rate=50.0,
            arrival_seed=arrival_seed,
            seed=seed,
        )

    first, again = make(1, 42), make(1, 42)
    assert [t.tokens for t in _all_turns(first)] == [t.tokens for t in _all_turns(again)]
    assert [s.first_arrival_ms for s in first] == [s.first_arrival_ms for s in again]

    other_tokens = make(2, 42)
    assert [t.tokens for t in _all_turns(other_tokens)] != [t.tokens for t in _all_turns(first)]
    assert [s.first_arrival_ms for s in other_tokens] == [s.first_arrival_ms for s in first]

    other_arrivals = make(1, 7)
    assert [t.tokens for t in _all_turns(other_arrivals)] == [t.tokens for t in _all_turns(first)]
    assert [s.first_arrival_ms for s in other_arrivals] != [s.first_arrival_ms for s in first]


def test_poisson_arrivals_start_at_zero_with_the_right_mean_gap() -> None:
    sessions = synthetic_sessions(
        input_tokens=1, output_tokens=1, request_count=4001, request_rate=100.0
    )
    times = [s.first_arrival_ms for s in sessions]
    assert times[0] == 0.0
    assert times == sorted(times)
    mean_gap_ms = times[-1] / 4000
    assert mean_gap_ms == pytest.approx(10.0, rel=0.06)


def test_fixed_interval_arrivals() -> None:
    sessions = synthetic_sessions(
        input_tokens=8, output_tokens=1, request_count=4, arrival_interval_ms=2.5
    )
    assert [s.first_arrival_ms for s in sessions] == [0.0, 2.5, 5.0, 7.5]


def test_prompts_are_unique_without_prefix_sharing() -> None:
    sessions = synthetic_sessions(
        input_tokens=64,
        output_tokens=1,
        request_count=50,
        shared_prefix_ratio=0.5,
        num_prefix_groups=0,  # no groups: no sharing whatever the ratio (as Dynamo)
        block_size=16,
    )
    first_blocks = {bytes(t.tokens[:16]) for t in _all_turns(sessions)}
    assert len(first_blocks) == 50


def test_prefix_groups_share_the_first_blocks_only() -> None:
    sessions = synthetic_sessions(
        input_tokens=64,
        output_tokens=1,
        request_count=60,
        shared_prefix_ratio=0.5,
        num_prefix_groups=3,
        block_size=16,
    )
    turns = _all_turns(sessions)
    prefixes = {bytes(t.tokens[:32]) for t in turns}
    assert len(prefixes) == 3  # 60 sessions drawing from 3 groups hit every group
    assert len({bytes(t.tokens[32:48]) for t in turns}) == 60  # block 3 is unique
    assert all(len(t.tokens) == 64 for t in turns)


def test_prefix_blocks_round_half_up_on_full_blocks() -> None:
    # 56 tokens, block 16: 3 full blocks * 0.5 = 1.5 -> 2 shared blocks (32 tokens)
    sessions = synthetic_sessions(
        input_tokens=56,
        output_tokens=1,
        request_count=40,
        shared_prefix_ratio=0.5,
        num_prefix_groups=1,
        block_size=16,
    )
    turns = _all_turns(sessions)
    assert len({bytes(t.tokens[:32]) for t in turns}) == 1
    assert len({bytes(t.tokens[32:33]) for t in turns}) == 40


def test_later_turns_accumulate_the_conversation() -> None:
    sessions = synthetic_sessions(
        input_tokens=20,
        output_tokens=5,
        request_count=3,
        turns_per_session=3,
        inter_turn_delay_ms=4.0,
        arrival_interval_ms=10.0,
    )
    assert count_requests(sessions) == 9
    for session in sessions:
        first, second, third = session.turns
        assert [t.turn_index for t in session.turns] == [0, 1, 2]
        assert [t.delay_ms for t in session.turns] == [0.0, 4.0, 4.0]
        assert len(first.tokens) == 20
        assert len(second.tokens) == 20 + 5 + 20
        assert len(third.tokens) == 45 + 5 + 20
        assert second.tokens[:20] == first.tokens
        assert third.tokens[:45] == second.tokens
    request_ids = [t.request_id for t in _all_turns(sessions)]
    assert request_ids == list(range(9))


def test_later_turns_can_be_fresh_prompts() -> None:
    sessions = synthetic_sessions(
        input_tokens=20,
        output_tokens=5,
        request_count=2,
        turns_per_session=2,
        accumulate_turns=False,
    )
    for session in sessions:
        first, second = session.turns
        assert len(second.tokens) == 20
        assert second.tokens != first.tokens


@pytest.mark.parametrize(
    "overrides",
    [
        {"input_tokens": 0},
        {"output_tokens": 0},
        {"request_count": -1},
        {"request_rate": 0.0},
        {"request_rate": math.nan},
        {"arrival_interval_ms": -1.0},
        {"request_rate": 1.0, "arrival_interval_ms": 1.0},
        {"turns_per_session": 0},
        {"shared_prefix_ratio": 1.5},
        {"num_prefix_groups": -1},
        {"inter_turn_delay_ms": -2.0},
        {"block_size": 0},
    ],
)
def test_synthetic_rejects_bad_arguments(overrides: dict[str, float]) -> None:
    args: dict[str, float] = {"input_tokens": 8, "output_tokens": 2, "request_count": 3}
    args.update(overrides)
    with pytest.raises(ConfigError):
        synthetic_sessions(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Mooncake


def _line(**fields: object) -> str:
    return json.dumps(fields)


def _parse(lines: list[str], **kwargs: float) -> list[Session]:
    return mooncake_sessions(lines, source="trace.jsonl", trace_block_size=4, **kwargs)


def test_mooncake_token_synthesis_and_clamping() -> None:
    sessions = _parse(
        [
            _line(timestamp=0, input_length=6, output_length=3, hash_ids=[1, 2]),
            _line(timestamp=1, input_length=100, output_length=1, hash_ids=[7, 2**32 - 1]),
            _line(timestamp=2, input_length=3, output_length=1, hash_ids=[5, 6, 7]),
        ]
    )
    first, second, third = (s.turns[0] for s in sessions)
    assert first.tokens == array("I", [1, 1, 1, 1, 2, 2])
    assert first.max_output_tokens == 3
    assert second.tokens == array("I", [7] * 4 + [2**32 - 1] * 4)  # clamped to 2 blocks
    assert third.tokens == array("I", [5, 5, 5])


def test_mooncake_aliases() -> None:
    (session,) = _parse(
        ['{"created_time": 5, "input_tokens": 4, "output_tokens": 2, "hash_ids": [9]}']
    )
    assert session.turns[0].tokens == array("I", [9] * 4)
    assert session.turns[0].max_output_tokens == 2


def test_mooncake_times_are_normalized_scaled_and_sorted() -> None:
    sessions = _parse(
        [
            _line(timestamp=1500, input_length=4, output_length=1, hash_ids=[1]),
            _line(timestamp=1000.0, input_length=4, output_length=1, hash_ids=[2]),
            _line(timestamp=3000, input_length=4, output_length=1, hash_ids=[3]),
        ],
        arrival_speedup_ratio=2.0,
    )
    assert [s.first_arrival_ms for s in sessions] == [0.0, 250.0, 1000.0]
    assert [s.turns[0].request_id for s in sessions] == [1, 0, 2]  # ids follow file order
    assert [s.turns[0].tokens[0] for s in sessions] == [2, 1, 3]


def test_mooncake_sessions_and_delays() -> None:
    lines = [
        _line(timestamp=100, input_length=4, output_length=1, hash_ids=[1], session_id="a"),
        "",
        _line(timestamp=150, input_length=4, output_length=1, hash_ids=[2], session_id=7),
        _line(input_length=8, output_length=2, hash_ids=[1, 3], session_id="a", delay=40),
        "   ",
        _line(timestamp=400, input_length=8, output_length=1, hash_ids=[2, 4], session_id="7"),
        _line(timestamp=120, input_length=4, output_length=1, hash_ids=[5]),
    ]
    sessions = _parse(lines, arrival_speedup_ratio=2.0)
    assert [len(s.turns) for s in sessions] == [2, 1, 2]
    session_a, sessionless, session_7 = sessions
    assert session_a.first_arrival_ms == 0.0
    assert sessionless.first_arrival_ms == 10.0
    assert session_7.first_arrival_ms == 25.0
    assert [t.delay_ms for t in session_a.turns] == [0.0, 20.0]  # explicit delay / 2
    assert [t.delay_ms for t in session_7.turns] == [0.0, 125.0]  # (400 - 150) / 2
    assert [t.turn_index for t in session_7.turns] == [0, 1]
    assert [t.request_id for t in session_a.turns] == [0, 2]
    assert [t.request_id for t in session_7.turns] == [1, 3]
    assert sessionless.turns[0].request_id == 4
    assert {t.session_id for t in session_7.turns} == {session_7.session_id}


def test_mooncake_empty_input_gives_no_sessions() -> None:
    assert _parse([]) == []
    assert _parse(["", "\n"]) == []


OK = {"timestamp": 0, "input_length": 4, "output_length": 1, "hash_ids": [1]}


def _with(**changes: object) -> str:
    row = {**OK, **changes}
    return json.dumps({key: value for key, value in row.items() if value is not _DROP})


_DROP = object()

BAD_LINES: list[tuple[str, str]] = [
    ("{not json", LINE_FIELD),
    ('{"a": 1', LINE_FIELD),
    ("[1, 2]", LINE_FIELD),
    ('"text"', LINE_FIELD),
    ("12", LINE_FIELD),
    ("null", LINE_FIELD),
    ("1" * 5000, LINE_FIELD),  # ValueError (int digit limit), not JSONDecodeError
    ("[" * 100_000, LINE_FIELD),  # RecursionError
    (_with(input_length=_DROP), "input_length"),
    (_with(input_length="4"), "input_length"),
    (_with(input_length=True), "input_length"),
    (_with(input_length=4.0), "input_length"),
    (_with(input_length=0), "input_length"),
    (_with(input_length=None), "input_length"),
    (_with(input_length=_DROP, input_tokens=-1), "input_tokens"),
    (_with(output_length=_DROP), "output_length"),
    (_with(output_length=0), "output_length"),
    (_with(output_length=-3), "output_length"),
    (_with(output_length=_DROP, output_tokens="x"), "output_tokens"),
    (_with(hash_ids=_DROP), "hash_ids"),
    (_with(hash_ids=None), "hash_ids"),
    (_with(hash_ids=5), "hash_ids"),
    (_with(hash_ids=[]), "hash_ids"),
    (_with(hash_ids=[1, -1]), "hash_ids"),
    (_with(hash_ids=[2**32]), "hash_ids"),
    (_with(hash_ids=[1.0]), "hash_ids"),
    (_with(hash_ids=[True]), "hash_ids"),
    (_with(hash_ids=["1"]), "hash_ids"),
    (_with(timestamp=_DROP), "timestamp"),
    (_with(timestamp=None), "timestamp"),
    (_with(timestamp="0"), "timestamp"),
    (_with(timestamp=-1), "timestamp"),
    (_with(timestamp=False), "timestamp"),
    (_with(timestamp=math.nan), "timestamp"),
    (_with(timestamp=math.inf), "timestamp"),
    (_with(timestamp=_DROP, created_time=[1]), "created_time"),
    (_with(session_id=1.5), "session_id"),
    (_with(session_id=[1]), "session_id"),
    (_with(session_id=True), "session_id"),
    (_with(delay=5), "delay"),  # a first turn (no session: every row is a first turn)
    (_with(session_id="new", delay=5), "delay"),
]


@pytest.mark.parametrize(("bad_line", "field"), BAD_LINES)
def test_mooncake_malformed_lines_name_line_and_field(bad_line: str, field: str) -> None:
    good = _line(timestamp=0, input_length=4, output_length=1, hash_ids=[1], session_id="s")
    with pytest.raises(TraceFormatError) as info:
        _parse([good, "", bad_line, good])
    error = info.value
    assert (error.path, error.line_no, error.field) == ("trace.jsonl", 3, field)
    assert error.reason
    assert str(error).startswith(f"trace.jsonl:3: field {field!r}")


@pytest.mark.parametrize(
    ("second_turn", "field"),
    [
        (_with(session_id="s", timestamp=50, delay=-1), "delay"),
        (_with(session_id="s", timestamp=50, delay="1"), "delay"),
        (_with(session_id="s", timestamp=50, delay=math.inf), "delay"),
        (_with(session_id="s", timestamp=_DROP), "delay"),  # neither delay nor timestamp
        (_with(session_id="s", timestamp=99), "timestamp"),  # earlier than the first turn
    ],
)
def test_mooncake_malformed_later_turns(second_turn: str, field: str) -> None:
    first = _with(session_id="s", timestamp=100)
    with pytest.raises(TraceFormatError) as info:
        _parse([first, second_turn])
    assert (info.value.line_no, info.value.field) == (2, field)


def test_mooncake_config_errors() -> None:
    with pytest.raises(ConfigError):
        mooncake_sessions([], source="t", trace_block_size=0)
    for ratio in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ConfigError):
            mooncake_sessions([], source="t", trace_block_size=4, arrival_speedup_ratio=ratio)


FIELD_NAMES = [
    "timestamp",
    "created_time",
    "input_length",
    "input_tokens",
    "output_length",
    "output_tokens",
    "hash_ids",
    "session_id",
    "delay",
    "other",
]
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES), children, max_size=4)
    ),
    max_leaves=10,
)
junk_rows = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=9).map(json.dumps)
near_valid_rows = st.fixed_dictionaries(
    {
        "timestamp": st.integers(0, 1000) | json_scalars,
        "input_length": st.integers(1, 20) | json_scalars,
        "output_length": st.integers(1, 5) | json_scalars,
        "hash_ids": st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4) | json_values,
    },
    optional={
        "session_id": st.sampled_from(["a", "b", 1]) | json_scalars,
        "delay": st.integers(0, 10) | json_scalars,
    },
).map(json.dumps)
junk_lines = st.lists(
    near_valid_rows | junk_rows | st.text(max_size=30) | json_values.map(json.dumps), max_size=6
)


@given(lines=junk_lines)
def test_junk_never_raises_anything_but_trace_format_error(lines: list[str]) -> None:
    caught: TraceFormatError | None = None
    sessions: list[Session] = []
    try:
        sessions = mooncake_sessions(lines, source="junk", trace_block_size=2)
    except TraceFormatError as error:
        caught = error
    if caught is not None:
        assert 1 <= caught.line_no <= len(lines)
        assert caught.path == "junk"
    for session in sessions:
        assert session.first_arrival_ms >= 0.0
        for turn in session.turns:
            assert len(turn.tokens) >= 1
            assert turn.max_output_tokens >= 1
