"""Hypothesis fuzzing of the decoders behind sockets: the coordinator's rank messages and the
publisher's replay requests. Garbage is counted and dropped; nothing crashes or wedges."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from shmkv import transport as tp
from shmkv.channel import Channel, encode_message
from shmkv.codec import make_codec
from shmkv.coordinator import Coordinator, CoordinatorSpec
from shmkv.errors import BrokenWorkerError, ProtocolError
from shmkv.events import BlockRemoved, EventBatch, StorageTier
from shmkv.publisher import EventPublisher, PublisherConfig
from shmkv.shm import segment_name

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(-5, 2**64 - 1), max_size=6),
    st.lists(st.lists(st.integers(-5, 2**64 - 1), max_size=6), max_size=4),
)
bodies = st.dictionaries(
    st.sampled_from(
        ["rank", "pid", "epoch", "batch", "items", "accepted", "rejected", "events", "x"]
    ),
    values,
    max_size=6,
)
messages = st.tuples(
    st.sampled_from(sorted(tp.MESSAGE_TYPES)),
    bodies,
    st.lists(st.binary(max_size=64), max_size=2),
    st.sampled_from([b"rank0-e0", b"rank1-e0", b"stranger"]),
)


@pytest.fixture(scope="module")
def coordinator() -> Iterator[Coordinator]:
    fleet = f"t{os.getpid()}fz"
    spec = CoordinatorSpec(
        fleet_id=fleet,
        segment_name=segment_name(fleet),
        num_g2_blocks=16,
        block_size=4,
        num_ranks=2,
        endpoint=f"inproc://fuzz-coord-{fleet}",
        supervisor_endpoint=f"inproc://fuzz-sup-{fleet}",
        start_monotonic_s=time.monotonic(),
        speedup_ratio=math.inf,
    )
    with Coordinator(spec) as coord:
        yield coord


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msg=messages)
def test_coordinator_survives_any_rank_message(
    coordinator: Coordinator, msg: tuple[str, dict[str, Any], list[bytes], bytes]
) -> None:
    msg_type, body, frames, identity = msg
    if msg_type == tp.HELLO and isinstance(body.get("pid"), int):
        body["pid"] = os.getpid()  # never watch a stranger's process
    with contextlib.suppress(ProtocolError):  # the one exception a bad message may raise
        coordinator._handle_rank_message(identity, tp.Message(msg_type, body, tuple(frames)))
    coordinator.directory.check_invariants()


@pytest.fixture
def replay_publisher(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> Iterator[EventPublisher]:
    config = PublisherConfig(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0")
    with EventPublisher(0, make_codec("json", block_size=16), config, context=zmq_context) as pub:
        pub.publish(
            EventBatch(
                ts_s=1.0,
                dp_rank=0,
                events=[
                    BlockRemoved(event_id=0, dp_rank=0, tier=StorageTier.DEVICE, block_hashes=[1])
                ],
            )
        )
        yield pub


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    garbage=st.lists(
        st.lists(st.binary(max_size=16), min_size=0, max_size=4), min_size=1, max_size=5
    )
)
def test_replay_socket_ignores_garbage_and_keeps_serving(
    replay_publisher: EventPublisher,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
    garbage: list[list[bytes]],
) -> None:
    endpoint = replay_publisher.replay_endpoint
    assert endpoint is not None
    dealer = zmq_context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        for frames in garbage:
            dealer.send_multipart([b"", *frames] if frames else [b""])
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replies: list[list[bytes]] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            replay_publisher.serve_replay(10)
            while dealer.poll(0):
                replies.append(dealer.recv_multipart())
            if replies and replies[-1][-2:] == [b"\xff" * 8, b""]:
                break
        # the valid request gets batch 0 then the end marker, whatever came before it
        seqs = [r[-2] for r in replies if len(r) >= 3]
        assert (0).to_bytes(8, "big") in seqs
        assert seqs[-1] == b"\xff" * 8
    finally:
        dealer.close(linger=0)


def _stream_channel() -> tuple[socket.socket, Channel]:
    raw, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return raw, Channel(other)


def _receive_all(raw: socket.socket, channel: Channel, chunks: list[bytes]) -> list[list[bytes]]:
    """Write `chunks` one by one (each read before the next is written), then EOF."""
    got: list[list[bytes]] = []
    for chunk in chunks:
        raw.sendall(chunk)
        got.extend(channel.receive())
    raw.shutdown(socket.SHUT_WR)
    with contextlib.suppress(BrokenWorkerError):
        while True:
            got.extend(channel.receive())
    return got


@settings(max_examples=150)
@given(
    messages=st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=4), max_size=8),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
)
def test_channel_reassembles_any_stream_however_it_is_cut(
    messages: list[list[bytes]], cuts: list[int]
) -> None:
    """Framing across partial reads: the same messages come out wherever the stream breaks."""
    wire = b"".join(encode_message(frames) for frames in messages)
    bounds = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    chunks = [wire[a:b] for a, b in itertools.pairwise(bounds)]
    raw, channel = _stream_channel()
    with raw, channel:
        assert _receive_all(raw, channel, chunks) == messages


@settings(max_examples=200)
@given(garbage=st.binary(max_size=200), cut=st.integers(0, 200))
def test_channel_survives_any_garbage_with_typed_errors_only(garbage: bytes, cut: int) -> None:
    """A broken stream raises ProtocolError (and the channel closes) or, cut short, a broken
    peer; whatever messages it parses are well formed."""
    raw, channel = _stream_channel()
    with raw, channel:
        try:
            got = _receive_all(raw, channel, [garbage[:cut], garbage[cut:]])
        except ProtocolError:
            assert channel.closed
        else:
            assert all(frames for frames in got)
