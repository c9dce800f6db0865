"""Layer 2: control messages between the fleet's processes, and socket helpers.

Wire form of every control message (DEALER <-> ROUTER, never pickle):

    frame 0   orjson header {"v": PROTOCOL_VERSION, "t": <type>, ...body}
    frame 1.. optional raw payload frames (e.g. token ids as little-endian u32)

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
import zmq

from shmkv.errors import ConfigError, ProtocolError

logger = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
MAX_HEADER_BYTES: Final = 4 * 1024 * 1024
MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
MAX_FRAMES: Final = 4096

# Message types. Rank <-> coordinator:
HELLO: Final = "hello"  # rank -> coord {rank, pid, epoch}
WELCOME: Final = "welcome"  # coord -> rank {segment, num_ranks, epoch}
OFFLOAD: Final = "offload"  # rank -> coord {batch, items: [[seq, parent|-1, local, pos]]} + tokens
OFFLOAD_ACK: Final = "offload_ack"  # coord -> rank {batch, accepted: [i], rejected: [i]}
OFFLOAD_DONE: Final = "offload_done"  # coord -> rank {batch, items: [i]} copies finished/dropped
G2_EVENTS: Final = (
    "g2_events"  # coord -> every rank {events: [[kind, seq, parent, local]]} + tokens
)
# Supervisor <-> any process:
READY: Final = "ready"  # {role, rank, pid, version, ...endpoints}
SUBMIT: Final = (
    "submit"  # sup -> rank {requests: [[id, arrival_ms, max_out]]} + one tokens frame each
)
# rank -> sup {passes: [full pass records], decode: [itl_ms, num_tokens, ...] of plain decode
# passes, status figures}; sent at a completion/rejection, else every ~20 ms while busy
RESULTS: Final = "results"
DRAIN: Final = "drain"  # sup -> rank/coord: finish in-flight work, then report state
STATE: Final = "state"  # -> sup {device: [...]} or {host_pinned: [...]}
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
