"""Layer 2: the two KV-event wire codecs (`wire.md`, `behavior.md` §6). Bytes only, no sockets.

Both codecs turn one `EventBatch` (the events of one scheduler pass of one rank) into one
message payload and back. `make_codec(name, block_size=...)` picks one by name.

``json`` (default): a batch object whose events use Dynamo's native `KvCacheEvent`
shape plus two fields Dynamo ignores (`storage_tier`, `block_token_ids`)::

    {"ts": 1789095808.83, "dp_rank": 0, "events": [
      {"event_id": 7, "dp_rank": 0, "storage_tier": "device",
       "data": {"stored": {"parent_hash": null, "start_position": null,
                           "blocks": [{"block_hash": 11, "tokens_hash": 101, "mm_extra_info": null}]}},
       "block_token_ids": [[1, 2, ..., 16]]},           # stored only, and only when known
      {"event_id": 8, "dp_rank": 0, "storage_tier": "host_pinned",
       "data": {"removed": {"block_hashes": [11]}}},
      {"event_id": 9, "dp_rank": 0, "data": "cleared"}  # every tier of the rank; no storage_tier
    ]}

  Each event object, serialized alone, is accepted by Dynamo's `RadixTree.apply_event`.
  Everything round-trips exactly. Encoding writes msgspec Structs with msgspec's JSON encoder:
  compact, keys in the order above, byte for byte what orjson writes for the same dicts (`ts`
  is formatted by orjson itself). Decoding uses msgspec's typed JSON decoder, which parses and
  validates in one pass (hashes and ids u64, tokens u32, one `block_token_ids` list per block,
  `data` exactly one of stored / removed / "cleared").

``vllm`` (msgpack via msgspec): the current vLLM layout, an array batch of tagged-map events::

    [ts, [{"type": "BlockStored", "block_hashes": [h, ...], "parent_block_hash": h | nil,
           "token_ids": [...blocks x block_size ints...], "block_size": 16, "lora_id": nil,
           "medium": "GPU" | "CPU_TIER1", "lora_name": nil},
          {"type": "BlockRemoved", "block_hashes": [h, ...], "medium": "GPU" | "CPU_TIER1"},
          {"type": "AllBlocksCleared"}], dp_rank]

  With ``legacy_array_events=True`` each event is the positional array of vLLM before PR
  #42892: ``["BlockStored", hashes, parent, token_ids, block_size, lora_id, medium, lora_name]``,
  ``["BlockRemoved", hashes, medium]``, ``["AllBlocksCleared"]``. What the vLLM wire does not
  carry is rebuilt on decode, so the round trip is exact only for what the wire holds:

  * event ids are not on the wire: every decoded event has ``event_id = 0`` (a consumer that
    needs an order key has the ZMQ seq of the batch);
  * local hashes (`tokens_hashes`) are recomputed from the token ids with Dynamo's xxh3-64
    (seed 1337) when tokens are present, and are 0 when the event carries no tokens;
  * a stored event without token ids goes out with ``token_ids = []`` (consumers that recompute
    keys from tokens, such as Dynamo, drop it) and decodes with ``token_ids = None``;
  * every decoded event carries the batch's rank; a nil ``data_parallel_rank`` decodes as 0;
  * ``lora_id``, ``lora_name`` and newer optional fields (``extra_keys``, ``group_idx``,
    ``kv_cache_spec_kind``, ...) are accepted and ignored.

  Decoding accepts both event layouts (even mixed in one batch), extra keys and trailing
  array fields of newer vLLM releases. A stored event with tokens must have the codec's
  `block_size` and exactly blocks x block_size tokens. Mediums map to tiers as follows:

  ======================================  ===============
  medium on the wire                      tier
  ======================================  ===============
  ``GPU``, ``DEVICE``, nil or absent      ``device``
  ``CPU``, ``CPU_PINNED``, ``CPU_TIER1``  ``host_pinned``
  anything else                           ProtocolError
  ======================================  ===============

Decoding untrusted bytes raises `ProtocolError` and nothing else. Encoding a batch that breaks
an invariant of `shmkv.events` (a token count other than blocks x block_size, one local hash
per block, a hash or event id outside -2^63 .. 2^64 - 1) raises `InvariantError`: it is a bug
in the producer. Token ids are not range-checked on encode (producers take them from u32
arrays; decoders reject anything outside u32).

Encoders are hot paths (one call per scheduler pass per rank): one Python loop over the events
that builds msgspec Structs positionally, then one msgspec call writes the payload in C.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Annotated, Final, Literal, NoReturn, Protocol

import msgspec
import orjson

from shmkv.errors import ConfigError, InvariantError, ProtocolError
from shmkv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KvEvent,
    StorageTier,
)
from shmkv.hashing import check_block_size, local_block_hashes
from shmkv.ids import U64_MASK

__all__ = [
    "CODEC_NAMES",
    "DEFAULT_CODEC",
    "MEDIUM_OF_TIER",
    "EventCodec",
    "JsonCodec",
    "VllmCodec",
    "make_codec",
    "sniff_codec_name",
]

CODEC_NAMES: Final = ("json", "vllm")
DEFAULT_CODEC: Final = "json"

MEDIUM_OF_TIER: Final[dict[StorageTier, str]] = {
    StorageTier.DEVICE: "GPU",
    StorageTier.HOST_PINNED: "CPU_TIER1",
}
_TIER_OF_MEDIUM: Final[dict[str | None, StorageTier]] = {
    None: StorageTier.DEVICE,
    "GPU": StorageTier.DEVICE,
    "DEVICE": StorageTier.DEVICE,
    "CPU": StorageTier.HOST_PINNED,
    "CPU_PINNED": StorageTier.HOST_PINNED,
    "CPU_TIER1": StorageTier.HOST_PINNED,
}
_U32_MAX: Final = (1 << 32) - 1
# NOTE: msgspec reports invalid UTF-8 and overly deep nesting with these built-in errors.
_DECODE_ERRORS: Final = (
    msgspec.DecodeError,
    msgspec.ValidationError,
    UnicodeDecodeError,
    RecursionError,
)


class EventCodec(Protocol):
    """Turns one `EventBatch` into one message payload and back."""

    @property
    def name(self) -> str:
        """The codec's name, one of `CODEC_NAMES`."""
        ...

    def encode_batch(self, batch: EventBatch) -> bytes:
        """Serialize a batch. Raises InvariantError if the batch breaks an event invariant."""
        ...

    def decode_batch(self, payload: bytes) -> EventBatch:
        """Parse a payload. Raises ProtocolError, and only that, on malformed input."""
        ...


def make_codec(name: str, *, block_size: int, legacy_array_events: bool = False) -> EventCodec:
    """The codec called `name` ("json" or "vllm") for a fleet of `block_size`-token blocks.

    Raises:
        ConfigError: unknown name or invalid block size.
    """
    check_block_size(block_size)
    if name == "json":
        return JsonCodec()
    if name == "vllm":
        return VllmCodec(block_size=block_size, legacy_array_events=legacy_array_events)
    raise ConfigError(f"unknown event codec {name!r}: choose one of {', '.join(CODEC_NAMES)}")


def sniff_codec_name(payload: bytes) -> str:
    """Which codec produced `payload`: a JSON batch is an object, a vLLM batch a msgpack array."""
    return "json" if payload[:1] == b"{" else "vllm"


def _raise_token_count(event: BlockStored, num_tokens: int, block_size: int) -> NoReturn:
    raise InvariantError(
        f"BlockStored event {event.event_id}: {num_tokens} token ids for "
        f"{len(event.block_hashes)} blocks of {block_size}"
    )


def _raise_hash_count(event: BlockStored) -> NoReturn:
    raise InvariantError(
        f"BlockStored event {event.event_id} has {len(event.block_hashes)} block hashes but "
        f"{len(event.tokens_hashes)} local hashes"
    )


# ----------------------------------------------------------------------------------------------
# json


def _json_default(obj: object) -> object:
    """Encoder fallback: token or hash containers other than lists and tuples (array, range...)."""
    if isinstance(obj, Sequence):
        return list(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} in a KV event")


# NOTE: the encoder builds these msgspec Structs positionally (in C: `map` over the blocks) and
# writes them with one msgspec.json call; the output is byte for byte what orjson makes of the
# equivalent dicts (field order = key order; `ts` is written by orjson, whose float format it
# is). Encoding ignores the annotations.


class _OutBlock(msgspec.Struct, gc=False):
    block_hash: int
    tokens_hash: int
    mm_extra_info: None = None


class _OutStoredBody(msgspec.Struct, gc=False):
    parent_hash: int | None
    start_position: None
    blocks: list[_OutBlock]


class _OutStoredData(msgspec.Struct, gc=False):
    stored: _OutStoredBody


class _OutStored(msgspec.Struct, gc=False):
    event_id: int
    dp_rank: int
    storage_tier: StorageTier
    data: _OutStoredData


class _OutStoredWithTokens(msgspec.Struct, gc=False):
    event_id: int
    dp_rank: int
    storage_tier: StorageTier
    data: _OutStoredData
    block_token_ids: Sequence[Sequence[int]]


class _OutRemovedBody(msgspec.Struct, gc=False):
    block_hashes: Sequence[int]


class _OutRemovedData(msgspec.Struct, gc=False):
    removed: _OutRemovedBody


class _OutRemoved(msgspec.Struct, gc=False):
    event_id: int
    dp_rank: int
    storage_tier: StorageTier
    data: _OutRemovedData


class _OutCleared(msgspec.Struct, gc=False):
    event_id: int
    dp_rank: int
    data: str = "cleared"


class _OutBatch(msgspec.Struct, gc=False):
    ts: msgspec.Raw
    dp_rank: int
    events: list[msgspec.Struct]


_U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack ints never exceed u64; JSON: _check_u64
_U32 = Annotated[int, msgspec.Meta(ge=0, le=_U32_MAX)]


class _JsonBlock(msgspec.Struct, frozen=True):
    block_hash: _U64
    tokens_hash: _U64


class _JsonStored(msgspec.Struct, frozen=True):
    blocks: list[_JsonBlock]
    parent_hash: _U64 | None = None


class _JsonRemoved(msgspec.Struct, frozen=True):
    block_hashes: list[_U64]


class _JsonData(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    stored: _JsonStored | None = None
    removed: _JsonRemoved | None = None


class _JsonEvent(msgspec.Struct, frozen=True):
    event_id: _U64
    data: Literal["cleared"] | _JsonData
    dp_rank: _U32 = 0
    storage_tier: StorageTier = StorageTier.DEVICE
    block_token_ids: list[list[_U32]] | None = None


class _JsonBatch(msgspec.Struct, frozen=True):
    ts: float
    dp_rank: _U32
    events: list[_JsonEvent]


# NOTE: decoding uses msgspec's typed JSON decoder, which parses and validates in one C pass
# (orjson.loads plus the same checks in Python is slower).
_JSON_BATCH: Final = msgspec.json.Decoder(_JsonBatch)


class JsonCodec:
    """Dynamo-native `KvCacheEvent` objects in a batch object (msgspec out, msgspec in)."""

    __slots__ = ("_encoder", "_range_check", "_scratch")

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder(enc_hook=_json_default)
        self._range_check = msgspec.msgpack.Encoder(enc_hook=_json_default)
        self._scratch = bytearray()
        """Output of the range check, thrown away (its content never matters)."""

    @property
    def name(self) -> str:
        return "json"

    def encode_batch(self, batch: EventBatch) -> bytes:
        ints: list[int] = []
        events = _json_events(batch.events, ints)
        try:
            # NOTE: msgpack takes exactly the ints orjson took (-2^63 .. 2^64 - 1), msgspec's
            # JSON any int: the hashes and ids of the batch go through msgpack first, in C.
            self._range_check.encode_into(ints, self._scratch)
            document = _OutBatch(msgspec.Raw(orjson.dumps(batch.ts_s)), batch.dp_rank, events)
            return self._encoder.encode(document)
        except (OverflowError, TypeError) as exc:
            raise InvariantError(f"cannot encode a KV event batch as JSON: {exc}") from exc

    def decode_batch(self, payload: bytes) -> EventBatch:
        try:
            wire = _JSON_BATCH.decode(payload)
        except _DECODE_ERRORS as exc:
            raise ProtocolError(f"malformed JSON KV event batch: {exc}") from exc
        events = [_event_from_json(event, i) for i, event in enumerate(wire.events)]
        return EventBatch(ts_s=wire.ts, dp_rank=wire.dp_rank, events=events)


def _json_events(events: Sequence[KvEvent], ints: list[int]) -> list[msgspec.Struct]:
    """The wire Structs of `events`; appends every hash and event id to `ints`."""
    # NOTE: hot path: one loop, Structs built positionally, blocks with `map` (no bytecode per
    # block); exact types first, subclasses through `_exact_event`.
    out: list[msgspec.Struct] = []
    append = out.append
    for event in events:
        if type(event) is BlockStored:
            hashes = event.block_hashes
            local_hashes = event.tokens_hashes
            if len(local_hashes) != len(hashes):
                _raise_hash_count(event)
            parent = event.parent_hash
            data = _OutStoredData(
                _OutStoredBody(parent, None, list(map(_OutBlock, hashes, local_hashes)))
            )
            ints += hashes
            ints += local_hashes
            ints.append(event.event_id)
            if parent is not None:
                ints.append(parent)
            if event.token_ids is None:
                append(_OutStored(event.event_id, event.dp_rank, event.tier, data))
            else:
                append(
                    _OutStoredWithTokens(
                        event.event_id, event.dp_rank, event.tier, data, event.token_ids
                    )
                )
        elif type(event) is BlockRemoved:
            removed = event.block_hashes
            ints += removed
            ints.append(event.event_id)
            append(
                _OutRemoved(
                    event.event_id,
                    event.dp_rank,
                    event.tier,
                    _OutRemovedData(_OutRemovedBody(removed)),
                )
            )
        elif type(event) is AllBlocksCleared:
            ints.append(event.event_id)
            append(_OutCleared(event.event_id, event.dp_rank))
        else:
            out += _json_events([_exact_event(event)], ints)
    return out


def _exact_event(event: object) -> KvEvent:
    """An instance of a subclass of an event class, as an instance of the class itself.

    Raises:
        InvariantError: `event` is not a KV event.
    """
    for cls in (BlockStored, BlockRemoved, AllBlocksCleared):
        if isinstance(event, cls):
            values = {field.name: getattr(event, field.name) for field in dataclasses.fields(cls)}
            exact: KvEvent = cls(**values)
            return exact
    raise InvariantError(f"not a KV event: {type(event).__name__}")


def _check_u64(values: list[int], index: int) -> None:
    # NOTE: msgspec's JSON ints are unbounded and its `le` bound stops at int64: check the top.
    if values and max(values) > U64_MASK:
        raise ProtocolError(f"KV event #{index}: a hash or id exceeds 64 bits")


def _event_from_json(wire: _JsonEvent, index: int) -> KvEvent:
    if wire.event_id > U64_MASK:
        _check_u64([wire.event_id], index)
    data = wire.data
    if data == "cleared":
        return AllBlocksCleared(event_id=wire.event_id, dp_rank=wire.dp_rank)
    assert isinstance(data, _JsonData)
    if (data.stored is None) == (data.removed is None):
        raise ProtocolError(f"KV event #{index}: 'data' must hold exactly one of stored, removed")
    if data.removed is not None:
        _check_u64(data.removed.block_hashes, index)
        return BlockRemoved(
            event_id=wire.event_id,
            dp_rank=wire.dp_rank,
            tier=wire.storage_tier,
            block_hashes=data.removed.block_hashes,
        )
    assert data.stored is not None
    blocks = data.stored.blocks
    token_ids = wire.block_token_ids
    if token_ids is not None and len(token_ids) != len(blocks):
        raise ProtocolError(
            f"KV event #{index}: {len(token_ids)} block_token_ids lists for {len(blocks)} blocks"
        )
    parent_hash = data.stored.parent_hash
    block_hashes = [block.block_hash for block in blocks]
    tokens_hashes = [block.tokens_hash for block in blocks]
    _check_u64(block_hashes, index)
    _check_u64(tokens_hashes, index)
    if parent_hash is not None and parent_hash > U64_MASK:
        _check_u64([parent_hash], index)
    return BlockStored(
        event_id=wire.event_id,
        dp_rank=wire.dp_rank,
        tier=wire.storage_tier,
        parent_hash=parent_hash,
        block_hashes=block_hashes,
        tokens_hashes=tokens_hashes,
        token_ids=token_ids,
    )


# ----------------------------------------------------------------------------------------------
# vllm (msgpack)

_Size = Annotated[int, msgspec.Meta(ge=0, le=_U32_MAX)]


class _StoredMap(msgspec.Struct, tag="BlockStored", frozen=True):
    block_hashes: list[_U64]
    parent_block_hash: _U64 | None
    token_ids: list[_U32]
    block_size: _Size
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


class _RemovedMap(msgspec.Struct, tag="BlockRemoved", frozen=True):
    block_hashes: list[_U64]
    medium: str | None = None


class _ClearedMap(msgspec.Struct, tag="AllBlocksCleared", frozen=True):
    pass


class _StoredArray(msgspec.Struct, tag="BlockStored", array_like=True, frozen=True):
    block_hashes: list[_U64]
    parent_block_hash: _U64 | None
    token_ids: list[_U32]
    block_size: _Size
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


class _RemovedArray(msgspec.Struct, tag="BlockRemoved", array_like=True, frozen=True):
    block_hashes: list[_U64]
    medium: str | None = None


class _ClearedArray(msgspec.Struct, tag="AllBlocksCleared", array_like=True, frozen=True):
    pass


_WireEvent = _StoredMap | _RemovedMap | _ClearedMap | _StoredArray | _RemovedArray | _ClearedArray
_MapEvent = _StoredMap | _RemovedMap | _ClearedMap
_ArrayEvent = _StoredArray | _RemovedArray | _ClearedArray


class _MapBatch(msgspec.Struct, array_like=True, frozen=True):
    ts: float
    events: list[_MapEvent]
    data_parallel_rank: Annotated[int, msgspec.Meta(ge=0, le=_U32_MAX)] | None = None


class _ArrayBatch(msgspec.Struct, array_like=True, frozen=True):
    ts: float
    events: list[_ArrayEvent]
    data_parallel_rank: Annotated[int, msgspec.Meta(ge=0, le=_U32_MAX)] | None = None


class _RawBatch(msgspec.Struct, array_like=True, frozen=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: Annotated[int, msgspec.Meta(ge=0, le=_U32_MAX)] | None = None


_CLEARED_MAP: Final = _ClearedMap()
_CLEARED_ARRAY: Final = _ClearedArray()
_MEDIUM: Final = {tier: MEDIUM_OF_TIER[tier] for tier in StorageTier}
_MAP_BATCH: Final = msgspec.msgpack.Decoder(_MapBatch)
_ARRAY_BATCH: Final = msgspec.msgpack.Decoder(_ArrayBatch)
_RAW_BATCH: Final = msgspec.msgpack.Decoder(_RawBatch)
_MAP_EVENT: Final = msgspec.msgpack.Decoder(_MapEvent)
_ARRAY_EVENT: Final = msgspec.msgpack.Decoder(_ArrayEvent)


def _first_byte_is_map(raw: msgspec.Raw) -> bool:
    head = bytes(memoryview(raw)[:1])
    return head != b"" and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


class VllmCodec:
    """vLLM's msgpack batch `[ts, events, dp_rank]`, map events (or legacy positional arrays)."""

    __slots__ = ("_block_size", "_encoder", "_legacy", "_local_hashes", "_wire_types")

    def __init__(
        self,
        *,
        block_size: int,
        legacy_array_events: bool = False,
        compute_local_hashes: bool = True,
    ) -> None:
        """Args:
        block_size: the fleet-wide tokens per block. Every BlockStored carries it, and decoding
            rejects a stored event with tokens whose block size differs.
        legacy_array_events: encode events as positional arrays (vLLM before PR #42892).
            Decoding accepts both layouts whatever this says.
        compute_local_hashes: on decode, rebuild each block's local hash from its tokens (xxh3,
            as Dynamo's router does). A consumer that needs only block hashes turns it off and
            gets 0s.
        """
        check_block_size(block_size)
        self._block_size = block_size
        self._legacy = legacy_array_events
        self._local_hashes = compute_local_hashes
        self._encoder = msgspec.msgpack.Encoder()
        self._wire_types: tuple[
            type[_StoredMap | _StoredArray], type[_RemovedMap | _RemovedArray], msgspec.Struct
        ] = (
            (_StoredArray, _RemovedArray, _CLEARED_ARRAY)
            if legacy_array_events
            else (_StoredMap, _RemovedMap, _CLEARED_MAP)
        )

    @property
    def name(self) -> str:
        return "vllm"

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def legacy_array_events(self) -> bool:
        return self._legacy

    # -- encode --------------------------------------------------------------------------------

    def encode_batch(self, batch: EventBatch) -> bytes:
        events = self._wire_events(batch.events)
        try:
            return self._encoder.encode((batch.ts_s, events, batch.dp_rank))
        except (OverflowError, TypeError) as exc:
            raise InvariantError(f"cannot encode a KV event batch as msgpack: {exc}") from exc

    def _wire_events(self, events: Sequence[KvEvent]) -> list[msgspec.Struct]:
        # NOTE: hot path, one loop over the events without per-event calls: exact types first
        # (subclasses through `_exact_event`), msgspec Structs built positionally in C, a
        # one-block event's token list sent as is, longer ones flattened with list +=.
        stored_cls, removed_cls, cleared = self._wire_types
        block_size = self._block_size
        medium = _MEDIUM
        out: list[msgspec.Struct] = []
        append = out.append
        for event in events:
            if type(event) is BlockStored:
                hashes = event.block_hashes
                if len(event.tokens_hashes) != len(hashes):
                    _raise_hash_count(event)
                token_ids = event.token_ids
                if token_ids is None:
                    flat: list[int] = []
                else:
                    if len(token_ids) == 1:
                        first = token_ids[0]
                        flat = first if type(first) is list else list(first)
                    else:
                        flat = []
                        for block in token_ids:
                            flat += block
                    if len(flat) != len(hashes) * block_size:
                        _raise_token_count(event, len(flat), block_size)
                append(
                    stored_cls(
                        hashes if type(hashes) is list else list(hashes),
                        event.parent_hash,
                        flat,
                        block_size,
                        None,
                        medium[event.tier],
                        None,
                    )
                )
            elif type(event) is BlockRemoved:
                removed = event.block_hashes
                append(
                    removed_cls(
                        removed if type(removed) is list else list(removed), medium[event.tier]
                    )
                )
            elif type(event) is AllBlocksCleared:
                append(cleared)
            else:
                out += self._wire_events([_exact_event(event)])
        return out

    # -- decode --------------------------------------------------------------------------------

    def decode_batch(self, payload: bytes) -> EventBatch:
        wire = self._decode_wire(payload)
        dp_rank = 0 if wire[2] is None else wire[2]
        events = [self._event_from_wire(event, dp_rank, i) for i, event in enumerate(wire[1])]
        return EventBatch(ts_s=wire[0], dp_rank=dp_rank, events=events)

    @staticmethod
    def _decode_wire(payload: bytes) -> tuple[float, Sequence[_WireEvent], int | None]:
        # NOTE: a batch holds one event layout in practice: try maps, then arrays, then event by
        # event (a mixed batch, or the error message of a malformed one).
        try:
            as_maps = _MAP_BATCH.decode(payload)
            return as_maps.ts, as_maps.events, as_maps.data_parallel_rank
        except _DECODE_ERRORS:
            pass
        try:
            as_arrays = _ARRAY_BATCH.decode(payload)
            return as_arrays.ts, as_arrays.events, as_arrays.data_parallel_rank
        except _DECODE_ERRORS:
            pass
        try:
            raw = _RAW_BATCH.decode(payload)
            events: list[_WireEvent] = [
                (_MAP_EVENT if _first_byte_is_map(item) else _ARRAY_EVENT).decode(item)
                for item in raw.events
            ]
        except _DECODE_ERRORS as exc:
            raise ProtocolError(f"malformed vLLM KV event batch: {exc}") from exc
        return raw.ts, events, raw.data_parallel_rank

    def _event_from_wire(self, wire: _WireEvent, dp_rank: int, index: int) -> KvEvent:
        if isinstance(wire, (_StoredMap, _StoredArray)):
            tier = _tier_of_medium(wire.medium, index)
            num_blocks = len(wire.block_hashes)
            tokens = wire.token_ids
            if not tokens:
                token_ids: list[list[int]] | None = None
                tokens_hashes = [0] * num_blocks
            else:
                block_size = wire.block_size
                if block_size != self._block_size:
                    raise ProtocolError(
                        f"KV event #{index}: block_size {block_size} differs from the fleet's "
                        f"{self._block_size}"
                    )
                if len(tokens) != num_blocks * block_size:
                    raise ProtocolError(
                        f"KV event #{index}: {len(tokens)} token ids for {num_blocks} blocks of "
                        f"{block_size}"
                    )
                token_ids = [tokens[i : i + block_size] for i in range(0, len(tokens), block_size)]
                if self._local_hashes:
                    tokens_hashes = local_block_hashes(tokens, block_size)
                else:
                    tokens_hashes = [0] * num_blocks
            return BlockStored(
                event_id=0,
                dp_rank=dp_rank,
                tier=tier,
                parent_hash=wire.parent_block_hash,
                block_hashes=wire.block_hashes,
                tokens_hashes=tokens_hashes,
                token_ids=token_ids,
            )
        if isinstance(wire, (_RemovedMap, _RemovedArray)):
            return BlockRemoved(
                event_id=0,
                dp_rank=dp_rank,
                tier=_tier_of_medium(wire.medium, index),
                block_hashes=wire.block_hashes,
            )
        return AllBlocksCleared(event_id=0, dp_rank=dp_rank)


def _tier_of_medium(medium: str | None, index: int) -> StorageTier:
    tier = _TIER_OF_MEDIUM.get(medium)
    if tier is None:
        raise ProtocolError(f"KV event #{index}: unsupported medium {medium!r:.40}")
    return tier
