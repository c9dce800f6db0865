"""Layer 2: control messages between the fleet's processes, and socket helpers.

Wire form of every control message (over ZMQ DEALER <-> ROUTER, or a rank's direct channel
to the supervisor, `shmkv.channel`, which carries the same frames; never pickle):

    frame 0   orjson header {"v": PROTOCOL_VERSION, "t": <type>, ...body}
    frame 1.. optional raw payload frames (e.g. token ids as little-endian u32, the items
              of a packed OFFLOAD: `pack_offload_items` / `unpack_offload_items`, or the
              events of a packed G2_EVENTS: `pack_g2_events` / `unpack_g2_events`)

JSON has no inf/nan: a body must carry non-finite floats through `encode_float`.
`decode` validates the version, the type, frame counts and sizes and raises `ProtocolError`
on anything malformed; callers count and drop such messages. Bounds: a header of at most
`MAX_HEADER_BYTES`, at most `MAX_FRAMES` frames of at most `MAX_FRAME_BYTES` each.

Endpoints bind loopback (`127.0.0.1`) or `ipc://` by default; `bind_socket` returns the
endpoint actually bound (port 0 = a random free port).
"""

from __future__ import annotations

import logging
import math
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import and_, rshift
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import orjson
import zmq

from shmkv.errors import ConfigError, ProtocolError
from shmkv.hashing import MAX_POSITION

logger = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 2
"""2: G2_EVENTS may carry the rank's "done" ACKs (``"acks"``, see `shmkv.coordinator`)."""
MAX_HEADER_BYTES: Final = 4 * 1024 * 1024
MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
MAX_FRAMES: Final = 4096

# Message types. Rank <-> coordinator:
HELLO: Final = "hello"  # rank -> coord {rank, pid, epoch}
WELCOME: Final = "welcome"  # coord -> rank {segment, num_ranks, epoch}
# rank -> coord {batch, items: [[seq, parent|-1, local, pos]]} + tokens, or the packed form
# {batch, num_items, packed: true} + items frame (`pack_offload_items`) + tokens
OFFLOAD: Final = "offload"
# coord -> rank {batch, accepted: [i], rejected: [i], deadline_ms, done?}; "done": true when
# every accepted copy landed already (no OFFLOAD_DONE follows)
OFFLOAD_ACK: Final = "offload_ack"
OFFLOAD_DONE: Final = "offload_done"  # coord -> rank {batch, items: [i]} copies finished/dropped
# coord -> every rank {num_events, num_stores} + events frame (`pack_g2_events`) + tokens, or
# the JSON form {events: [[kind, seq, parent, local, position, has_tokens] | ["R", seq]]};
# optional "acks": [OFFLOAD_ACK bodies with "done": true] for this rank, applied after the
# events (version 2: speedup 0 / inf sends them so, not as OFFLOAD_ACKs)
G2_EVENTS: Final = "g2_events"
# Supervisor <-> any process:
READY: Final = "ready"  # {role, rank, pid, version, ...endpoints}
# sup -> rank {requests: [[id, arrival_ms, max_out, num_tokens]]} + one frame: every
# request's tokens (u32), concatenated in request order
SUBMIT: Final = "submit"
# rank -> sup {passes: [full pass records], decode: [itl_ms, num_tokens, ...] of plain decode
# passes, status figures}; sent at a completion/rejection (at speedup inf: within ~1 ms of
# it, so the next passes' completions share it), else every ~20 ms while busy
RESULTS: Final = "results"
DRAIN: Final = "drain"  # sup -> rank/coord: finish in-flight work, then report state
# -> sup: a rank's {device_packed: true, host_pinned: [...], ...} + one frame of its device
# seq hashes (native u64; or {device: [...]} without the frame), the coordinator's
# {host_pinned: [...], ...}
STATE: Final = "state"
STOP: Final = "stop"  # sup -> any: exit cleanly
PING: Final = "ping"
PONG: Final = "pong"
ERROR: Final = "error"

MESSAGE_TYPES: Final = frozenset(
    {
        HELLO,
        WELCOME,
        OFFLOAD,
        OFFLOAD_ACK,
        OFFLOAD_DONE,
        G2_EVENTS,
        READY,
        SUBMIT,
        RESULTS,
        DRAIN,
        STATE,
        STOP,
        PING,
        PONG,
        ERROR,
    }
)


PACKED_ITEM_BYTES: Final = 32
"""A packed OFFLOAD item: four little-endian u64 words (see `pack_offload_items`)."""
PACKED_HAS_PARENT: Final = 1 << 32
"""Flag in a packed item's fourth word: the parent word holds a parent hash."""
MAX_PACKED_ITEMS: Final = MAX_FRAME_BYTES // PACKED_ITEM_BYTES
_PACKED_BAD_BITS: Final = ((1 << 64) - 1) & ~(PACKED_HAS_PARENT | MAX_POSITION)
_LITTLE_ENDIAN: Final = sys.byteorder == "little"


def pack_offload_items(
    seq_hashes: Sequence[int],
    parent_hashes: Sequence[int | None],
    local_hashes: Sequence[int],
    positions: Sequence[int],
) -> bytes:
    """The items frame of a packed OFFLOAD: per item the words `seq`, `parent` (0 when there
    is none), `local`, `position | PACKED_HAS_PARENT` (the flag only when there is a parent).

    Raises:
        ProtocolError: columns of different lengths, a hash outside u64, a bad position.
    """
    count = len(seq_hashes)
    if not count == len(parent_hashes) == len(local_hashes) == len(positions):
        raise ProtocolError("packed OFFLOAD: columns of different lengths")
    words = array("Q", bytes(PACKED_ITEM_BYTES * count))
    try:
        words[0::4] = array("Q", seq_hashes)
        words[1::4] = array("Q", [0 if p is None else p for p in parent_hashes])
        words[2::4] = array("Q", local_hashes)
        words[3::4] = array(
            "Q",
            [
                pos if p is None else pos | PACKED_HAS_PARENT
                for pos, p in zip(positions, parent_hashes, strict=True)
            ],
        )
    except (OverflowError, TypeError) as exc:
        raise ProtocolError(f"packed OFFLOAD: hashes must be u64: {exc}") from exc
    if count and not 0 <= min(positions) <= max(positions) <= MAX_POSITION:
        raise ProtocolError(f"packed OFFLOAD: positions must be in 0..{MAX_POSITION}")
    if not _LITTLE_ENDIAN:  # pragma: no cover - little-endian hosts in practice
        words.byteswap()
    return words.tobytes()


def unpack_offload_items(
    num_items: int, frame: bytes
) -> tuple[list[int], list[int | None], list[int], list[int]]:
    """(seq hashes, parent hashes (None for none), local hashes, positions) of a packed
    OFFLOAD's items frame, validated.

    Raises:
        ProtocolError: a frame of the wrong size, unknown flag bits, a position out of range,
            or a parent word set without the flag.
    """
    if not 0 <= num_items <= MAX_PACKED_ITEMS or len(frame) != num_items * PACKED_ITEM_BYTES:
        raise ProtocolError(
            f"packed OFFLOAD: {num_items} items need {num_items * PACKED_ITEM_BYTES} bytes, "
            f"got {len(frame)}"
        )
    words = array("Q")
    words.frombytes(frame)
    if not _LITTLE_ENDIAN:  # pragma: no cover - little-endian hosts in practice
        words.byteswap()
    meta = words[3::4]
    if any(map(and_, meta, repeat(_PACKED_BAD_BITS, num_items))):
        raise ProtocolError("packed OFFLOAD: unknown flag bits or a position out of range")
    positions = list(map(and_, meta, repeat(MAX_POSITION, num_items)))
    raw_parents: list[int] = words[1::4].tolist()
    flags = list(map(rshift, meta, repeat(32, num_items)))
    if all(flags):
        parents: list[int | None] = list(raw_parents)
    else:
        parents = [p if f else None for p, f in zip(raw_parents, flags, strict=True)]
        if any(p for p, f in zip(raw_parents, flags, strict=True) if not f):
            raise ProtocolError("packed OFFLOAD: a parent hash without its flag")
    return words[0::4].tolist(), parents, words[2::4].tolist(), positions


class OffloadColumns(NamedTuple):
    """A packed OFFLOAD's items as arrays (`unpack_offload_columns`), one entry per item."""

    seqs: npt.NDArray[np.uint64]
    parents: npt.NDArray[np.uint64]
    """0 where the item has no parent (`has_parent` False)."""
    has_parent: npt.NDArray[np.bool_]
    locals: npt.NDArray[np.uint64]
    positions: npt.NDArray[np.int64]


def unpack_offload_columns(num_items: int, frame: bytes) -> OffloadColumns:
    """`unpack_offload_items` as arrays (read-only views of `frame` where it can), validated
    the same way.

    Raises:
        ProtocolError: as `unpack_offload_items`.
    """
    if not 0 <= num_items <= MAX_PACKED_ITEMS or len(frame) != num_items * PACKED_ITEM_BYTES:
        raise ProtocolError(
            f"packed OFFLOAD: {num_items} items need {num_items * PACKED_ITEM_BYTES} bytes, "
            f"got {len(frame)}"
        )
    words = np.frombuffer(frame, dtype="<u8").reshape(num_items, 4)
    meta = words[:, 3]
    if (meta & np.uint64(_PACKED_BAD_BITS)).any():
        raise ProtocolError("packed OFFLOAD: unknown flag bits or a position out of range")
    has_parent = (meta & np.uint64(PACKED_HAS_PARENT)) != 0
    parents = words[:, 1]
    if not has_parent.all() and parents[~has_parent].any():
        raise ProtocolError("packed OFFLOAD: a parent hash without its flag")
    positions = (meta & np.uint64(MAX_POSITION)).astype(np.int64)
    return OffloadColumns(words[:, 0], parents, has_parent, words[:, 2], positions)


G2_EVENT_REMOVED: Final = 0
G2_EVENT_STORED: Final = 1
G2_HAS_PARENT: Final = PACKED_HAS_PARENT
"""Flag in a packed store's meta word: the parent word holds a parent hash."""
G2_HAS_TOKENS: Final = 1 << 33
"""Flag in a packed store's meta word: the tokens frame holds the block's real token ids."""
_G2_BAD_BITS: Final = ((1 << 64) - 1) & ~(G2_HAS_PARENT | G2_HAS_TOKENS | MAX_POSITION)


def g2_events_frame_bytes(num_events: int, num_stores: int) -> int:
    """Size of a packed G2_EVENTS events frame (`pack_g2_events`)."""
    return 9 * num_events + 24 * num_stores


def pack_g2_events(
    kinds: bytes | memoryview,
    seqs: bytes | memoryview,
    parents: bytes | memoryview,
    locals_: bytes | memoryview,
    metas: bytes | memoryview,
) -> bytes:
    """The events frame of a packed G2_EVENTS of n events, m of them stores: little-endian u64
    words `seq[n]`, then per store (in event order) `parent[m]` (0 when there is none),
    `local[m]`, `meta[m]` (`position | G2_HAS_PARENT? | G2_HAS_TOKENS?`), then `kind[n]`
    bytes (`G2_EVENT_STORED` / `G2_EVENT_REMOVED`). Each argument is already in that byte
    form (the coordinator builds them column by column); only the lengths are checked.

    Raises:
        ProtocolError: columns of inconsistent lengths.
    """
    count, stores = len(kinds), len(parents) // 8
    if (
        len(seqs) != 8 * count
        or len(parents) % 8
        or not len(parents) == len(locals_) == len(metas)
        or stores > count
    ):
        raise ProtocolError("packed G2_EVENTS: columns of inconsistent lengths")
    return b"".join((seqs, parents, locals_, metas, kinds))


class G2EventColumns(NamedTuple):
    """A packed G2_EVENTS, validated (`unpack_g2_events`): per event its kind and sequence
    hash; per store (in event order) parent (-1 for none), local hash, position, has_tokens."""

    kinds: bytes
    seqs: list[int]
    parents: list[int]
    locals: list[int]
    positions: list[int]
    has_tokens: list[bool]


def unpack_g2_events(num_events: int, num_stores: int, frame: bytes) -> G2EventColumns:
    """Decode and validate the events frame of a packed G2_EVENTS (`pack_g2_events`).

    Raises:
        ProtocolError: wrong counts or size, an unknown kind, a store count that does not
            match the kinds, unknown flag bits, a position out of range, a parent hash
            without its flag.
    """
    if (
        type(num_events) is not int
        or type(num_stores) is not int
        or not 0 <= num_stores <= num_events <= MAX_FRAME_BYTES // 9
    ):
        raise ProtocolError(f"packed G2_EVENTS: bad counts {num_events!r}, {num_stores!r}")
    if len(frame) != g2_events_frame_bytes(num_events, num_stores):
        raise ProtocolError(
            f"packed G2_EVENTS: {num_events} events ({num_stores} stores) need "
            f"{g2_events_frame_bytes(num_events, num_stores)} bytes, got {len(frame)}"
        )
    words_end = 8 * (num_events + 3 * num_stores)
    kinds = bytes(frame[words_end:])
    if kinds.count(G2_EVENT_STORED) != num_stores or kinds.count(G2_EVENT_REMOVED) != (
        num_events - num_stores
    ):
        raise ProtocolError("packed G2_EVENTS: unknown kinds, or a wrong number of stores")
    words = np.frombuffer(frame, dtype="<u8", count=num_events + 3 * num_stores)
    stores = words[num_events:].reshape(3, num_stores)
    meta = stores[2]
    if (meta & np.uint64(_G2_BAD_BITS)).any():
        raise ProtocolError("packed G2_EVENTS: unknown flag bits or a position out of range")
    has_parent = (meta & np.uint64(G2_HAS_PARENT)) != 0
    parent_list: list[int] = stores[0].tolist()
    if not has_parent.all():
        if stores[0][~has_parent].any():
            raise ProtocolError("packed G2_EVENTS: a parent hash without its flag")
        parent_list = [
            p if flag else -1 for p, flag in zip(parent_list, has_parent.tolist(), strict=True)
        ]
    return G2EventColumns(
        kinds,
        words[:num_events].tolist(),
        parent_list,
        stores[1].tolist(),
        (meta & np.uint64(MAX_POSITION)).tolist(),
        ((meta & np.uint64(G2_HAS_TOKENS)) != 0).tolist(),
    )


@dataclass(frozen=True, slots=True)
class Message:
    type: str
    body: dict[str, Any]
    frames: tuple[bytes, ...] = ()


def encode(
    msg_type: str, body: dict[str, Any] | None = None, frames: Sequence[bytes] = ()
) -> list[bytes]:
    """The frames of one message."""
    if msg_type not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    header = {"v": PROTOCOL_VERSION, "t": msg_type}
    if body:
        header.update(body)
    return [orjson.dumps(header), *frames]


def with_header_entry(header: bytes, key: str, value: object) -> bytes:
    """A header frame `encode` made, with `key: value` added as its last entry: the bytes
    `encode` gives for the same body with that entry added (`key` must not be in it). Saves
    encoding a shared body again per peer when only one entry differs."""
    return b"".join((header[:-1], b",", orjson.dumps(key), b":", orjson.dumps(value), b"}"))


_SNDMORE: Final = int(zmq.SNDMORE)


def send_frames(sock: zmq.Socket[bytes], frames: Sequence[bytes | zmq.Frame]) -> None:
    """`sock.send_multipart(frames)` without its per-frame flag arithmetic on enums (a
    visible cost at a message per pass); `zmq.Frame` parts go without a copy (one frame
    shared by several sends). Raises what `send` raises (before the first frame went, a
    message is not sent at all)."""
    send = sock.send
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        send(frame, _SNDMORE if index < last else 0, copy=not isinstance(frame, zmq.Frame))


_NOBLOCK: Final = int(zmq.NOBLOCK)


def recv_message(sock: zmq.Socket[bytes]) -> list[bytes]:
    """`sock.recv_multipart(zmq.NOBLOCK)`, about half the cost: a frame received without a copy
    says whether more follow (`Frame.more`), where `recv_multipart` asks the socket each time
    (`getsockopt(RCVMORE)` builds an enum per frame). Raises zmq.Again when nothing is there.
    """
    frame = sock.recv(_NOBLOCK, copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame.bytes)
    return frames


def decode(frames: Sequence[bytes | zmq.Frame]) -> Message:
    """Parse and validate one message; raises ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"{len(frames)} frames (limit {MAX_FRAMES})")
    raw = [f.bytes if isinstance(f, zmq.Frame) else f for f in frames]
    if len(raw[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw[0])} bytes (limit {MAX_HEADER_BYTES})")
    for frame in raw[1:]:
        if len(frame) > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame of {len(frame)} bytes (limit {MAX_FRAME_BYTES})")
    try:
        header = orjson.loads(raw[0])
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    version = header.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    msg_type = header.pop("t", None)
    if msg_type not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    return Message(msg_type, header, tuple(raw[1:]))


def require(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """A typed field of a message body, or ProtocolError."""
    value = body.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ProtocolError(f"field {key!r} must be {kind}, got {type(value).__name__}")
    return value


def encode_float(value: object) -> object:
    """JSON has no inf/nan: carry non-finite floats as strings ("inf", "-inf", "nan")."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def decode_float(value: object) -> object:
    if value in ("inf", "-inf", "nan"):
        return float(str(value))
    return value


def bind_socket(sock: zmq.Socket[bytes], endpoint: str) -> str:
    """Bind `endpoint` (tcp port 0 = random free port); returns the endpoint actually bound."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        host = endpoint[len("tcp://") : -2]
        port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"
    sock.bind(endpoint)
    bound = sock.getsockopt(zmq.LAST_ENDPOINT)
    return bound.decode() if isinstance(bound, bytes) else str(bound)


def free_port_base(count: int, host: str = "127.0.0.1") -> int:
    """A base port with `count` consecutive free TCP ports on `host` (rank r uses base + r).

    Chosen below the kernel's ephemeral range when it can be: a port in that range can be
    taken while its owner is down (a restarting rank) by some client's outgoing connection,
    including a subscriber reconnecting to that very port (a TCP self-connect), and the
    restarted rank could not bind it again. Racy by nature (another process may take a port
    before it is bound); callers bind soon.
    """
    import random
    import socket

    def all_free(base: int) -> bool:
        holders: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                holder = socket.socket()
                holders.append(holder)
                holder.bind((host, port))
            return True
        except OSError:
            return False
        finally:
            for holder in holders:
                holder.close()

    low = _ephemeral_port_low()
    if low - count > _FIXED_PORT_MIN:
        rng = random.Random()
        for _ in range(200):
            base = rng.randrange(_FIXED_PORT_MIN, low - count)
            if all_free(base):
                return base
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = int(probe.getsockname()[1])
        if base + count < 65000 and all_free(base):
            return base
    raise ConfigError(f"found no {count} consecutive free ports on {host}")


_FIXED_PORT_MIN: Final = 20_000
"""Lowest port `free_port_base` hands out (well above the usual service ports)."""


def _ephemeral_port_low() -> int:
    """The first port of the kernel's ephemeral range (Linux default 32768)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def is_loopback(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def warn_if_exposed(endpoint: str, what: str) -> None:
    if not is_loopback(endpoint):
        logger.warning("%s binds %s, which is reachable from other hosts", what, endpoint)
