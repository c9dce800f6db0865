"""The two KV-event codecs: exact wire layouts (`wire.md` §1.1, §3b, §7), round trips, hostile bytes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, strategies as st

from shmkv.codec import (
    CODEC_NAMES,
    EventCodec,
    JsonCodec,
    VllmCodec,
    make_codec,
    sniff_codec_name,
)
from shmkv.errors import ConfigError, InvariantError, ProtocolError
from shmkv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KvEvent,
    StorageTier,
)
from shmkv.hashing import chain_sequence_hashes, local_block_hashes

BLOCK_SIZE = 4
U64_MAX = (1 << 64) - 1
TS = 1789095808.83

u64 = st.integers(0, U64_MAX)
tokens_of_block = st.lists(st.integers(0, (1 << 32) - 1), min_size=BLOCK_SIZE, max_size=BLOCK_SIZE)
tiers = st.sampled_from(list(StorageTier))


@st.composite
def stored_events(draw: st.DrawFn, *, consistent_local_hashes: bool) -> BlockStored:
    num_blocks = draw(st.integers(1, 4))
    token_ids = draw(
        st.none() | st.lists(tokens_of_block, min_size=num_blocks, max_size=num_blocks)
    )
    if consistent_local_hashes:
        # what survives the vLLM wire: local hashes are rebuilt from tokens, or 0
        tokens_hashes = (
            [0] * num_blocks
            if token_ids is None
            else [local_block_hashes(block, BLOCK_SIZE)[0] for block in token_ids]
        )
    else:
        tokens_hashes = draw(st.lists(u64, min_size=num_blocks, max_size=num_blocks))
    return BlockStored(
        event_id=draw(u64),
        dp_rank=draw(st.integers(0, 7)),
        tier=draw(tiers),
        parent_hash=draw(st.none() | u64),
        block_hashes=draw(st.lists(u64, min_size=num_blocks, max_size=num_blocks)),
        tokens_hashes=tokens_hashes,
        token_ids=token_ids,
    )


removed_events = st.builds(
    BlockRemoved,
    event_id=u64,
    dp_rank=st.integers(0, 7),
    tier=tiers,
    block_hashes=st.lists(u64, min_size=1, max_size=4),
)
cleared_events = st.builds(AllBlocksCleared, event_id=u64, dp_rank=st.integers(0, 7))


def batches(*, consistent_local_hashes: bool) -> st.SearchStrategy[EventBatch]:
    events = st.one_of(
        stored_events(consistent_local_hashes=consistent_local_hashes),
        removed_events,
        cleared_events,
    )
    return st.builds(
        EventBatch,
        ts_s=st.floats(0, 4e9, allow_nan=False, allow_infinity=False),
        dp_rank=st.integers(0, 1 << 16),
        events=st.lists(events, max_size=8),
    )


def vllm_view(batch: EventBatch) -> EventBatch:
    """What a vLLM round trip keeps: no event ids; every event carries the batch's rank."""
    events: list[KvEvent] = [
        dataclasses.replace(event, event_id=0, dp_rank=batch.dp_rank) for event in batch.events
    ]
    return dataclasses.replace(batch, events=events)


def stored(tier: StorageTier = StorageTier.DEVICE, *, with_tokens: bool = True) -> BlockStored:
    tokens = [[1, 2, 3, 4], [5, 6, 7, 8]]
    local = [local_block_hashes(block, BLOCK_SIZE)[0] for block in tokens]
    return BlockStored(
        event_id=7,
        dp_rank=1,
        tier=tier,
        parent_hash=99,
        block_hashes=[11, U64_MAX],
        tokens_hashes=local,
        token_ids=tokens if with_tokens else None,
    )


def example_batch() -> EventBatch:
    return EventBatch(
        ts_s=TS,
        dp_rank=1,
        events=[
            stored(),
            BlockRemoved(event_id=8, dp_rank=1, tier=StorageTier.HOST_PINNED, block_hashes=[11]),
            AllBlocksCleared(event_id=9, dp_rank=1),
        ],
    )


# -- construction ------------------------------------------------------------------------------


def test_make_codec_names() -> None:
    assert [make_codec(name, block_size=16).name for name in CODEC_NAMES] == ["json", "vllm"]
    with pytest.raises(ConfigError, match="unknown event codec"):
        make_codec("protobuf", block_size=16)
    with pytest.raises(ConfigError):
        make_codec("vllm", block_size=0)


def test_sniff_codec_name() -> None:
    assert sniff_codec_name(JsonCodec().encode_batch(example_batch())) == "json"
    assert (
        sniff_codec_name(VllmCodec(block_size=BLOCK_SIZE).encode_batch(example_batch())) == "vllm"
    )


# -- json: layout --------------------------------------------------------------------------------


def test_json_layout_is_dynamo_kv_cache_event() -> None:
    document = orjson.loads(JsonCodec().encode_batch(example_batch()))
    assert document == {
        "ts": TS,
        "dp_rank": 1,
        "events": [
            {
                "event_id": 7,
                "dp_rank": 1,
                "storage_tier": "device",
                "data": {
                    "stored": {
                        "parent_hash": 99,
                        "start_position": None,
                        "blocks": [
                            {
                                "block_hash": 11,
                                "tokens_hash": stored().tokens_hashes[0],
                                "mm_extra_info": None,
                            },
                            {
                                "block_hash": U64_MAX,
                                "tokens_hash": stored().tokens_hashes[1],
                                "mm_extra_info": None,
                            },
                        ],
                    }
                },
                "block_token_ids": [[1, 2, 3, 4], [5, 6, 7, 8]],
            },
            {
                "event_id": 8,
                "dp_rank": 1,
                "storage_tier": "host_pinned",
                "data": {"removed": {"block_hashes": [11]}},
            },
            {"event_id": 9, "dp_rank": 1, "data": "cleared"},
        ],
    }


def test_json_stored_without_tokens_has_no_block_token_ids() -> None:
    batch = EventBatch(ts_s=TS, dp_rank=1, events=[stored(with_tokens=False)])
    (event,) = orjson.loads(JsonCodec().encode_batch(batch))["events"]
    assert "block_token_ids" not in event
    assert JsonCodec().decode_batch(JsonCodec().encode_batch(batch)) == batch


def test_json_encodes_foreign_sequences() -> None:
    event = dataclasses.replace(
        stored(), block_hashes=(11, 12), token_ids=(range(1, 5), range(5, 9))
    )
    payload = JsonCodec().encode_batch(EventBatch(ts_s=TS, dp_rank=1, events=[event]))
    (decoded,) = JsonCodec().decode_batch(payload).events
    assert isinstance(decoded, BlockStored)
    assert decoded.block_hashes == [11, 12]
    assert decoded.token_ids == [[1, 2, 3, 4], [5, 6, 7, 8]]


@given(batches(consistent_local_hashes=False))
def test_json_round_trip_is_exact(batch: EventBatch) -> None:
    codec = JsonCodec()
    assert codec.decode_batch(codec.encode_batch(batch)) == batch


# -- vllm: layouts -------------------------------------------------------------------------------


def test_vllm_map_layout() -> None:
    payload = VllmCodec(block_size=BLOCK_SIZE).encode_batch(example_batch())
    ts, events, rank = msgspec.msgpack.decode(payload)
    assert (ts, rank) == (TS, 1)
    assert events == [
        {
            "type": "BlockStored",
            "block_hashes": [11, U64_MAX],
            "parent_block_hash": 99,
            "token_ids": [1, 2, 3, 4, 5, 6, 7, 8],
            "block_size": BLOCK_SIZE,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
        },
        {"type": "BlockRemoved", "block_hashes": [11], "medium": "CPU_TIER1"},
        {"type": "AllBlocksCleared"},
    ]
    # msgspec's order: the tag first, then the fields in declaration order (vLLM's)
    assert list(events[0]) == [
        "type",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ]
    assert list(events[1]) == ["type", "block_hashes", "medium"]


def test_vllm_batch_is_a_three_element_array() -> None:
    payload = VllmCodec(block_size=BLOCK_SIZE).encode_batch(example_batch())
    assert payload[0] == 0x93  # fixarray of 3: Dynamo rejects any other length


def test_vllm_legacy_array_layout() -> None:
    codec = VllmCodec(block_size=BLOCK_SIZE, legacy_array_events=True)
    assert codec.legacy_array_events
    ts, events, rank = msgspec.msgpack.decode(codec.encode_batch(example_batch()))
    assert (ts, rank) == (TS, 1)
    assert events == [
        ["BlockStored", [11, U64_MAX], 99, [1, 2, 3, 4, 5, 6, 7, 8], BLOCK_SIZE, None, "GPU", None],
        ["BlockRemoved", [11], "CPU_TIER1"],
        ["AllBlocksCleared"],
    ]


def test_vllm_stored_without_tokens_round_trips_as_none() -> None:
    codec = VllmCodec(block_size=BLOCK_SIZE)
    event = dataclasses.replace(
        stored(StorageTier.HOST_PINNED, with_tokens=False), tokens_hashes=[0, 0]
    )
    batch = EventBatch(ts_s=TS, dp_rank=1, events=[event])
    (wire_event,) = msgspec.msgpack.decode(codec.encode_batch(batch))[1]
    assert wire_event["token_ids"] == []
    assert wire_event["medium"] == "CPU_TIER1"
    assert codec.decode_batch(codec.encode_batch(batch)) == vllm_view(batch)


@given(batches(consistent_local_hashes=True), st.booleans())
def test_vllm_round_trip(batch: EventBatch, legacy: bool) -> None:
    codec = VllmCodec(block_size=BLOCK_SIZE, legacy_array_events=legacy)
    assert codec.decode_batch(codec.encode_batch(batch)) == vllm_view(batch)


@given(batches(consistent_local_hashes=True))
def test_vllm_decode_reads_both_layouts_with_any_codec_setting(batch: EventBatch) -> None:
    maps = VllmCodec(block_size=BLOCK_SIZE).encode_batch(batch)
    arrays = VllmCodec(block_size=BLOCK_SIZE, legacy_array_events=True).encode_batch(batch)
    for reader in (
        VllmCodec(block_size=BLOCK_SIZE),
        VllmCodec(block_size=BLOCK_SIZE, legacy_array_events=True),
    ):
        assert reader.decode_batch(maps) == reader.decode_batch(arrays) == vllm_view(batch)


def test_vllm_decode_without_local_hashes() -> None:
    codec = VllmCodec(block_size=BLOCK_SIZE, compute_local_hashes=False)
    (event,) = codec.decode_batch(
        codec.encode_batch(EventBatch(ts_s=TS, dp_rank=1, events=[stored()]))
    ).events
    assert isinstance(event, BlockStored)
    assert event.tokens_hashes == [0, 0]
    assert event.token_ids == [[1, 2, 3, 4], [5, 6, 7, 8]]


# -- vllm: what other producers send ---------------------------------------------------------------


def _pack(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def test_vllm_decodes_a_v0_26_capture_with_extra_keys() -> None:
    tokens = list(range(16))
    payload = _pack(
        [
            TS,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [15760518052499183552],
                    "parent_block_hash": None,
                    "token_ids": tokens,
                    "block_size": 16,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                    "extra_keys": [None],
                    "group_idx": 0,
                    "kv_cache_spec_kind": "full_attention",
                }
            ],
            0,
        ]
    )
    (event,) = VllmCodec(block_size=16).decode_batch(payload).events
    assert event == BlockStored(
        event_id=0,
        dp_rank=0,
        tier=StorageTier.DEVICE,
        parent_hash=None,
        block_hashes=[15760518052499183552],
        tokens_hashes=local_block_hashes(tokens, 16),
        token_ids=[tokens],
    )


def test_vllm_decodes_legacy_arrays_with_trailing_fields_and_short_removes() -> None:
    payload = _pack(
        [
            TS,
            [
                [
                    "BlockStored",
                    [1],
                    None,
                    [9, 9, 9, 9],
                    4,
                    None,
                    "CPU",
                    None,
                    [None],
                    0,
                    "full_attention",
                    None,
                ],
                ["BlockRemoved", [1]],
                ["BlockRemoved", [2], "CPU_PINNED", 0, None, None],
            ],
            None,
        ]
    )
    batch = VllmCodec(block_size=BLOCK_SIZE).decode_batch(payload)
    assert batch.dp_rank == 0  # nil rank
    first, second, third = batch.events
    assert isinstance(first, BlockStored)
    assert first.tier is StorageTier.HOST_PINNED
    assert second == BlockRemoved(event_id=0, dp_rank=0, tier=StorageTier.DEVICE, block_hashes=[1])
    assert third == BlockRemoved(
        event_id=0, dp_rank=0, tier=StorageTier.HOST_PINNED, block_hashes=[2]
    )


def test_vllm_decodes_a_mixed_batch_and_the_mocker_shape() -> None:
    payload = _pack(
        [
            TS,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [3],
                    "parent_block_hash": None,
                    "token_ids": [1, 2, 3, 4],
                    "block_size": 4,
                    "group_idx": 0,
                },
                ["BlockRemoved", [3], "GPU"],
                {"type": "AllBlocksCleared"},
            ],
            2,
        ]
    )
    stored_event, removed, cleared = VllmCodec(block_size=BLOCK_SIZE).decode_batch(payload).events
    assert isinstance(stored_event, BlockStored)
    assert stored_event.tier is StorageTier.DEVICE  # the mocker omits the medium for GPU
    assert removed == BlockRemoved(event_id=0, dp_rank=2, tier=StorageTier.DEVICE, block_hashes=[3])
    assert cleared == AllBlocksCleared(event_id=0, dp_rank=2)


@pytest.mark.parametrize(
    ("events", "match"),
    [
        ([["BlockStored", [1], None, [1, 2, 3, 4], 4, None, "DISK", None]], "medium"),
        ([["BlockStored", [1], None, [1] * 8, 8, None, "GPU", None]], "block_size"),
        ([["BlockStored", [1, 2], None, [1, 2, 3, 4], 4, None, "GPU", None]], "token ids"),
        ([["BlockRemoved", [-5], "GPU"]], "malformed"),
        ([["BlockRemoved", [b"\x00" * 8], "GPU"]], "malformed"),
        ([["Ignored"]], "malformed"),
        ([{"type": "BlockStored", "block_hashes": [1]}], "malformed"),
    ],
)
def test_vllm_rejects_bad_events(events: list[object], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        VllmCodec(block_size=BLOCK_SIZE).decode_batch(_pack([TS, events, 0]))


# -- encode-side invariants --------------------------------------------------------------------


@pytest.mark.parametrize(
    "codec", [JsonCodec(), VllmCodec(block_size=BLOCK_SIZE)], ids=["json", "vllm"]
)
def test_encode_rejects_a_local_hash_count_mismatch(codec: JsonCodec | VllmCodec) -> None:
    event = dataclasses.replace(stored(), tokens_hashes=[1])
    with pytest.raises(InvariantError, match="local hashes"):
        codec.encode_batch(EventBatch(ts_s=TS, dp_rank=1, events=[event]))


def test_vllm_encode_rejects_a_token_count_mismatch() -> None:
    event = dataclasses.replace(stored(), token_ids=[[1, 2, 3, 4], [5, 6, 7]])
    with pytest.raises(InvariantError, match="token ids"):
        VllmCodec(block_size=BLOCK_SIZE).encode_batch(
            EventBatch(ts_s=TS, dp_rank=1, events=[event])
        )


@pytest.mark.parametrize(
    "codec", [JsonCodec(), VllmCodec(block_size=BLOCK_SIZE)], ids=["json", "vllm"]
)
def test_encode_rejects_a_hash_outside_u64(codec: JsonCodec | VllmCodec) -> None:
    event = BlockRemoved(event_id=1, dp_rank=0, tier=StorageTier.DEVICE, block_hashes=[1 << 64])
    with pytest.raises(InvariantError):
        codec.encode_batch(EventBatch(ts_s=TS, dp_rank=0, events=[event]))


def test_json_encode_rejects_any_hash_or_id_outside_u64() -> None:
    base = stored()
    for bad in (
        dataclasses.replace(base, event_id=1 << 64),
        dataclasses.replace(base, parent_hash=1 << 64),
        dataclasses.replace(base, tokens_hashes=[1, 1 << 64]),
        dataclasses.replace(base, block_hashes=[-(1 << 63) - 1, 1]),
        AllBlocksCleared(event_id=1 << 64, dp_rank=0),
    ):
        with pytest.raises(InvariantError, match="cannot encode"):
            JsonCodec().encode_batch(EventBatch(ts_s=TS, dp_rank=1, events=[bad]))


@pytest.mark.parametrize(
    "codec", [JsonCodec(), VllmCodec(block_size=BLOCK_SIZE)], ids=["json", "vllm"]
)
def test_encode_rejects_what_is_not_an_event(codec: JsonCodec | VllmCodec) -> None:
    batch = EventBatch(ts_s=TS, dp_rank=1, events=[stored(), "BlockStored"])  # type: ignore[list-item]
    with pytest.raises(InvariantError, match="not a KV event: str"):
        codec.encode_batch(batch)


@dataclasses.dataclass(slots=True, kw_only=True)
class _TaggedStored(BlockStored):
    note: str = ""


@dataclasses.dataclass(slots=True, kw_only=True)
class _TaggedRemoved(BlockRemoved):
    note: str = ""


@dataclasses.dataclass(slots=True, kw_only=True)
class _TaggedCleared(AllBlocksCleared):
    note: str = ""


@pytest.mark.parametrize(
    "codec",
    [
        JsonCodec(),
        VllmCodec(block_size=BLOCK_SIZE),
        VllmCodec(block_size=BLOCK_SIZE, legacy_array_events=True),
    ],
    ids=["json", "vllm", "vllm-legacy"],
)
@pytest.mark.pure_core  # compiled event classes cannot be subclassed in Python
def test_subclassed_events_encode_like_their_base(codec: JsonCodec | VllmCodec) -> None:
    base = example_batch()
    first, second, _ = base.events
    tagged: list[KvEvent] = [
        _TaggedStored(**{f.name: getattr(first, f.name) for f in dataclasses.fields(BlockStored)}),
        _TaggedRemoved(
            **{f.name: getattr(second, f.name) for f in dataclasses.fields(BlockRemoved)}
        ),
        _TaggedCleared(event_id=9, dp_rank=1),
    ]
    assert codec.encode_batch(dataclasses.replace(base, events=tagged)) == codec.encode_batch(base)


def test_vllm_encodes_foreign_token_containers() -> None:
    codec = VllmCodec(block_size=BLOCK_SIZE)
    one_block = dataclasses.replace(
        stored(), block_hashes=(11,), tokens_hashes=[5], token_ids=(range(1, 5),)
    )
    two_blocks = dataclasses.replace(stored(), token_ids=[(1, 2, 3, 4), range(5, 9)])
    payload = codec.encode_batch(EventBatch(ts_s=TS, dp_rank=1, events=[one_block, two_blocks]))
    first, second = msgspec.msgpack.decode(payload)[1]
    assert (first["block_hashes"], first["token_ids"]) == ([11], [1, 2, 3, 4])
    assert second["token_ids"] == [1, 2, 3, 4, 5, 6, 7, 8]


# -- the encoders write exactly what the reference dict encoders wrote -------------------------


def reference_json(batch: EventBatch) -> bytes:
    """The JSON wire built from dicts with orjson (the encoder before the msgspec Structs)."""
    events: list[dict[str, object]] = []
    for event in batch.events:
        if isinstance(event, BlockStored):
            blocks = [
                {"block_hash": h, "tokens_hash": t, "mm_extra_info": None}
                for h, t in zip(event.block_hashes, event.tokens_hashes, strict=True)
            ]
            document: dict[str, object] = {
                "event_id": event.event_id,
                "dp_rank": event.dp_rank,
                "storage_tier": event.tier.value,
                "data": {
                    "stored": {
                        "parent_hash": event.parent_hash,
                        "start_position": None,
                        "blocks": blocks,
                    }
                },
            }
            if event.token_ids is not None:
                document["block_token_ids"] = [list(block) for block in event.token_ids]
            events.append(document)
        elif isinstance(event, BlockRemoved):
            events.append(
                {
                    "event_id": event.event_id,
                    "dp_rank": event.dp_rank,
                    "storage_tier": event.tier.value,
                    "data": {"removed": {"block_hashes": list(event.block_hashes)}},
                }
            )
        else:
            events.append({"event_id": event.event_id, "dp_rank": event.dp_rank, "data": "cleared"})
    return orjson.dumps({"ts": batch.ts_s, "dp_rank": batch.dp_rank, "events": events})


MEDIUM = {StorageTier.DEVICE: "GPU", StorageTier.HOST_PINNED: "CPU_TIER1"}


def reference_vllm(batch: EventBatch, *, legacy: bool) -> bytes:
    """The vLLM wire built from plain dicts / lists with msgspec (`wire.md` §1.1, §7)."""
    events: list[object] = []
    for event in batch.events:
        if isinstance(event, BlockStored):
            flat = [t for block in event.token_ids or [] for t in block]
            fields: list[tuple[str, object]] = [
                ("block_hashes", list(event.block_hashes)),
                ("parent_block_hash", event.parent_hash),
                ("token_ids", flat),
                ("block_size", BLOCK_SIZE),
                ("lora_id", None),
                ("medium", MEDIUM[event.tier]),
                ("lora_name", None),
            ]
            tag = "BlockStored"
        elif isinstance(event, BlockRemoved):
            fields = [("block_hashes", list(event.block_hashes)), ("medium", MEDIUM[event.tier])]
            tag = "BlockRemoved"
        else:
            fields, tag = [], "AllBlocksCleared"
        if legacy:
            events.append([tag, *(value for _key, value in fields)])
        else:
            events.append({"type": tag, **dict(fields)})
    return msgspec.msgpack.encode([batch.ts_s, events, batch.dp_rank])


@given(batches(consistent_local_hashes=False))
def test_json_bytes_equal_the_reference_encoder(batch: EventBatch) -> None:
    assert JsonCodec().encode_batch(batch) == reference_json(batch)


@given(batches(consistent_local_hashes=True), st.booleans())
def test_vllm_bytes_equal_the_reference_encoder(batch: EventBatch, legacy: bool) -> None:
    codec = VllmCodec(block_size=BLOCK_SIZE, legacy_array_events=legacy)
    assert codec.encode_batch(batch) == reference_vllm(batch, legacy=legacy)


# -- hostile bytes ------------------------------------------------------------------------------

DECODERS: list[EventCodec] = [JsonCodec(), VllmCodec(block_size=BLOCK_SIZE)]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats()
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), U64_MAX)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU", "type"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _decode_or_protocol_error(codec: EventCodec, payload: bytes) -> None:
    try:
        batch = codec.decode_batch(payload)
    except ProtocolError:
        return
    assert isinstance(batch, EventBatch)


@given(st.binary(max_size=256))
def test_random_bytes_raise_only_protocol_error(payload: bytes) -> None:
    for codec in DECODERS:
        _decode_or_protocol_error(codec, payload)


@given(json_values)
def test_random_json_raises_only_protocol_error(value: object) -> None:
    codec = JsonCodec()
    # stdlib json: unbounded ints, and NaN/Infinity literals that are not JSON at all
    _decode_or_protocol_error(codec, json.dumps(value).encode())
    _decode_or_protocol_error(
        codec, json.dumps({"ts": TS, "dp_rank": 0, "events": [value]}).encode()
    )
    event = {"event_id": 1, "dp_rank": 0, "data": value}
    _decode_or_protocol_error(
        codec, json.dumps({"ts": TS, "dp_rank": 0, "events": [event]}).encode()
    )


@given(msgpack_values)
def test_random_msgpack_raises_only_protocol_error(value: object) -> None:
    _decode_or_protocol_error(VllmCodec(block_size=BLOCK_SIZE), _pack(value))
    _decode_or_protocol_error(VllmCodec(block_size=BLOCK_SIZE), _pack([TS, [value], 0]))


@given(batches(consistent_local_hashes=True), st.data())
def test_mutated_payloads_raise_only_protocol_error(batch: EventBatch, data: st.DataObject) -> None:
    for codec in (
        JsonCodec(),
        VllmCodec(block_size=BLOCK_SIZE),
        VllmCodec(block_size=BLOCK_SIZE, legacy_array_events=True),
    ):
        payload = bytearray(codec.encode_batch(batch))
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(payload)))
        _decode_or_protocol_error(codec, bytes(payload))
        _decode_or_protocol_error(codec, bytes(payload[:cut]))


@pytest.mark.parametrize(
    "document",
    [
        {
            "ts": TS,
            "dp_rank": 0,
            "events": [
                {"event_id": 1, "data": {"stored": {"blocks": []}, "removed": {"block_hashes": []}}}
            ],
        },
        {"ts": TS, "dp_rank": 0, "events": [{"event_id": 1, "data": {}}]},
        {"ts": TS, "dp_rank": 0, "events": [{"event_id": 1, "data": "cleared!"}]},
        {
            "ts": TS,
            "dp_rank": 0,
            "events": [{"event_id": 1, "storage_tier": "disk", "data": "cleared"}],
        },
        {"ts": TS, "dp_rank": 0, "events": [{"event_id": -1, "data": "cleared"}]},
        b'{"ts": 1.0, "dp_rank": 0, "events": [{"event_id": 1, "data": {"removed": {"block_hashes": [18446744073709551616]}}}]}',
        {
            "ts": TS,
            "dp_rank": 0,
            "events": [
                {
                    "event_id": 1,
                    "data": {"stored": {"blocks": [{"block_hash": 1, "tokens_hash": 2}]}},
                    "block_token_ids": [[1], [2]],
                }
            ],
        },
        {
            "ts": TS,
            "dp_rank": 0,
            "events": [
                {
                    "event_id": 1,
                    "data": {"stored": {"blocks": [{"block_hash": 1, "tokens_hash": 2}]}},
                    "block_token_ids": [[-1]],
                }
            ],
        },
        {"ts": "now", "dp_rank": 0, "events": []},
        [TS, [], 0],
    ],
)
def test_json_rejects_bad_documents(document: object) -> None:
    payload = document if isinstance(document, bytes) else orjson.dumps(document)
    with pytest.raises(ProtocolError):
        JsonCodec().decode_batch(payload)


# -- interop: Dynamo's radix tree takes each JSON event --------------------------------------------


def test_each_json_event_is_accepted_by_dynamo_radix_tree() -> None:
    core = pytest.importorskip("dynamo._core")
    block_size = 16
    tokens = list(range(1000, 1000 + 3 * block_size))
    blocks = [tokens[i : i + block_size] for i in range(0, len(tokens), block_size)]
    local = local_block_hashes(tokens, block_size)
    assert local == core.compute_block_hash_for_seq(tokens, block_size)  # bit-identical hashing
    seq_hashes = chain_sequence_hashes(local)
    rank = 2
    batch = EventBatch(
        ts_s=TS,
        dp_rank=rank,
        events=[
            BlockStored(
                event_id=0,
                dp_rank=rank,
                tier=StorageTier.DEVICE,
                parent_hash=None,
                block_hashes=seq_hashes[:2],
                tokens_hashes=local[:2],
                token_ids=blocks[:2],
            ),
            BlockStored(
                event_id=1,
                dp_rank=rank,
                tier=StorageTier.DEVICE,
                parent_hash=seq_hashes[1],
                block_hashes=seq_hashes[2:],
                tokens_hashes=local[2:],
                token_ids=blocks[2:],
            ),
            BlockStored(
                event_id=2,
                dp_rank=rank,
                tier=StorageTier.HOST_PINNED,
                parent_hash=None,
                block_hashes=seq_hashes[:1],
                tokens_hashes=local[:1],
                token_ids=None,
            ),
        ],
    )
    events = orjson.loads(JsonCodec().encode_batch(batch))["events"]
    tree = core.RadixTree()
    worker_id = 5
    for event in events:
        tree.apply_event(worker_id, orjson.dumps(event))
    assert tree.find_matches(local).scores == {(worker_id, rank): 3}
    assert tree.find_matches([*local[:1], 12345]).scores == {(worker_id, rank): 1}

    def apply_alone(event: KvEvent) -> None:
        (document,) = orjson.loads(
            JsonCodec().encode_batch(EventBatch(ts_s=TS, dp_rank=rank, events=[event]))
        )["events"]
        tree.apply_event(worker_id, orjson.dumps(document))

    apply_alone(
        BlockRemoved(event_id=3, dp_rank=rank, tier=StorageTier.DEVICE, block_hashes=seq_hashes[2:])
    )
    assert tree.find_matches(local).scores == {(worker_id, rank): 2}
    apply_alone(AllBlocksCleared(event_id=4, dp_rank=rank))
    assert tree.find_matches(local).scores == {}
