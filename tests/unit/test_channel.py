"""The supervisor <-> rank channel (shmkv.channel): framing across partial reads and writes,
many messages per read, messages bigger than the socket buffer, EOF, bounds, no fd leak."""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from shmkv import transport as tp
from shmkv.channel import (
    MAX_MESSAGE_BYTES,
    Channel,
    child_endpoint,
    encode_message,
    endpoint_fd,
)
from shmkv.errors import BrokenWorkerError, ClosedError, ConfigError, ProtocolError


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def channels() -> Iterator[tuple[Channel, Channel]]:
    """Two connected channel ends, closed after the test."""
    left, right_sock = Channel.pair()
    right = Channel(right_sock)
    with left, right:
        yield left, right


@pytest.fixture
def raw_and_channel() -> Iterator[tuple[socket.socket, Channel]]:
    """A plain blocking socket (to write exact bytes) and the channel end it talks to."""
    raw, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with raw, Channel(other) as channel:
        yield raw, channel


def _wait_readable(channel: Channel, timeout_ms: float = 5000.0) -> None:
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    assert poller.poll(timeout_ms), "nothing came"


def _receive_one(channel: Channel) -> list[bytes]:
    _wait_readable(channel)
    messages = channel.receive()
    assert len(messages) == 1
    return messages[0]


def test_a_message_arrives_whole_with_its_frames(channels: tuple[Channel, Channel]) -> None:
    left, right = channels
    frames = tp.encode(tp.SUBMIT, {"requests": [[1, 0.5, 4, 2]]}, (b"\x01\x00\x00\x00" * 2,))
    left.send(frames)
    assert _receive_one(right) == frames
    assert tp.decode(frames).type == tp.SUBMIT
    right.send([b"single"])
    right.send([b"", b"", b"third is empty too", b""])
    _wait_readable(left)
    assert left.receive() == [[b"single"], [b"", b"", b"third is empty too", b""]]
    assert (left.num_sent, left.num_received) == (1, 2)


def test_many_messages_come_out_of_one_receive_in_order(
    channels: tuple[Channel, Channel],
) -> None:
    left, right = channels
    # (50: every send is one buffer in the kernel, with its overhead; the socket's buffer
    # holds a few hundred small ones)
    for index in range(50):
        left.send([f"m{index}".encode(), bytes(index % 7)])
    assert not left.wants_write
    _wait_readable(right)
    got = right.receive()
    assert got == [[f"m{index}".encode(), bytes(index % 7)] for index in range(50)]
    assert right.receive() == [], "nothing left: an empty list, no blocking"


def test_a_message_split_into_single_bytes_is_cut_out_only_when_complete(
    raw_and_channel: tuple[socket.socket, Channel],
) -> None:
    raw, channel = raw_and_channel
    wire = encode_message([b"head", b"payload"]) + encode_message([b"next"])
    first_end = len(encode_message([b"head", b"payload"]))
    for index, byte in enumerate(wire):
        raw.sendall(bytes([byte]))
        _wait_readable(channel)
        got = channel.receive()
        if index == first_end - 1:
            assert got == [[b"head", b"payload"]]
        elif index == len(wire) - 1:
            assert got == [[b"next"]]
        else:
            assert got == []


def test_a_message_bigger_than_the_socket_buffer_goes_in_pieces_without_blocking(
    channels: tuple[Channel, Channel],
) -> None:
    """Neither end blocks: the rest waits in the sender's buffer until POLLOUT; both ends
    sending big messages at once do not deadlock."""
    left, right = channels
    big = os.urandom(8 * 1024 * 1024)
    left.send([b"big", big])
    right.send([b"big too", big[::-1]])
    assert 0 < left.pending_bytes < len(big) + 100, "more than a socket buffer takes"
    assert 0 < right.pending_bytes < len(big) + 100
    got_left: list[list[bytes]] = []
    got_right: list[list[bytes]] = []
    poller = select.poll()
    for _ in range(100_000):
        if got_left and got_right and not left.wants_write and not right.wants_write:
            break
        for channel in (left, right):
            poller.register(channel.fileno(), select.POLLIN | select.POLLOUT * channel.wants_write)
        poller.poll(5000)
        for channel, got in ((left, got_left), (right, got_right)):
            channel.flush()
            got.extend(channel.receive())
    assert got_right == [[b"big", big]]
    assert got_left == [[b"big too", big[::-1]]]


def test_eof_comes_after_the_messages_sent_before_it(
    channels: tuple[Channel, Channel],
) -> None:
    left, right = channels
    left.send([b"last words"])
    left.close()
    _wait_readable(right)
    assert right.receive() == [[b"last words"]]
    with pytest.raises(BrokenWorkerError, match="closed its end"):
        right.receive()
    with pytest.raises(BrokenWorkerError):
        right.send([b"anyone?"])  # EPIPE, no SIGPIPE


def test_eof_in_the_middle_of_a_message_is_a_broken_peer(
    raw_and_channel: tuple[socket.socket, Channel],
) -> None:
    raw, channel = raw_and_channel
    raw.sendall(encode_message([b"cut short"])[:-3])
    raw.shutdown(socket.SHUT_WR)
    _wait_readable(channel)
    assert channel.receive() == []  # the bytes; poll says the EOF is there too
    _wait_readable(channel)
    with pytest.raises(BrokenWorkerError, match="middle of a message"):
        channel.receive()


def test_a_closed_channel_refuses_everything_and_close_is_idempotent(
    channels: tuple[Channel, Channel],
) -> None:
    left, _right = channels
    left.close()
    left.close()
    assert left.closed
    assert left.fileno() == -1
    with pytest.raises(ClosedError):
        left.send([b"x"])
    with pytest.raises(ClosedError):
        left.receive()
    with pytest.raises(ClosedError):
        left.flush()


@pytest.mark.parametrize(
    "wire",
    [
        struct.pack("<II", 0xFFFF_FFFF, 1),  # an absurd size: refused before it is read
        struct.pack("<II", MAX_MESSAGE_BYTES + 1, 1),
        struct.pack("<II", 4, 0),  # no frames
        struct.pack("<II", 8 + 4 * tp.MAX_FRAMES, tp.MAX_FRAMES + 1),  # too many frames
        struct.pack("<II", 4, 1),  # no room for the frame length
        struct.pack("<III", 8, 1, 5),  # a frame length past the message's end
        struct.pack("<III", 12, 1, 1) + b"abcd",  # a frame length short of the end
    ],
)
def test_a_malformed_stream_raises_protocol_error_and_closes_the_channel(
    raw_and_channel: tuple[socket.socket, Channel], wire: bytes
) -> None:
    raw, channel = raw_and_channel
    raw.sendall(wire + bytes(16))
    _wait_readable(channel)
    with pytest.raises(ProtocolError):
        channel.receive()
    assert channel.closed, "the stream cannot be trusted after a bad message"


def test_an_oversized_or_empty_message_is_refused_before_anything_is_sent(
    channels: tuple[Channel, Channel],
) -> None:
    left, right = channels
    with pytest.raises(ProtocolError):
        left.send([bytes(MAX_MESSAGE_BYTES)])
    with pytest.raises(ProtocolError):
        left.send([])
    with pytest.raises(ProtocolError):
        left.send([b""] * (tp.MAX_FRAMES + 1))
    assert not left.wants_write
    assert left.num_sent == 0
    left.send([b"fine"])
    assert _receive_one(right) == [b"fine"]


def _send_many(channel: Channel, frames: list[bytes], count: int) -> None:
    for _ in range(count):
        channel.send(frames)


def test_a_peer_that_reads_nothing_is_dropped_at_the_pending_bound() -> None:
    parent, child = Channel.pair()
    with parent, child:
        bounded = Channel(socket.socket(fileno=os.dup(parent.fileno())), max_pending_bytes=1 << 20)
        with bounded:
            chunk = bytes(64 * 1024)
            for _ in range(10_000):  # the socket's buffer first
                bounded.send([chunk])
                if bounded.wants_write:
                    break
            assert bounded.wants_write, "the socket's buffer is full: a backlog begins"
            with pytest.raises(BrokenWorkerError, match="unread"):
                _send_many(bounded, [chunk], 1000)
            assert bounded.pending_bytes <= 1 << 20


def test_flush_blocking_waits_for_a_reader_or_times_out(
    channels: tuple[Channel, Channel],
) -> None:
    left, right = channels
    assert left.flush_blocking(0.0), "nothing waits"
    left.send([os.urandom(4 * 1024 * 1024)])
    assert left.wants_write
    assert not left.flush_blocking(0.05), "nobody reads"
    right.close()
    assert not left.flush_blocking(1.0), "the reader is gone"


def test_endpoints_name_inherited_descriptors() -> None:
    assert child_endpoint(7) == "fd://7"
    assert endpoint_fd("fd://12") == 12
    for bad in ["ipc:///tmp/x", "fd://", "fd://-1", "fd://1x", "fd://\u0661"]:
        with pytest.raises(ConfigError):
            endpoint_fd(bad)
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ConfigError):
            Channel.from_endpoint(child_endpoint(read_end))  # not a socket
    finally:
        os.close(read_end)
        os.close(write_end)
    parent, child = Channel.pair()
    with parent, Channel.from_endpoint(child_endpoint(child.detach())) as adopted:
        parent.send([b"hello"])
        assert _receive_one(adopted) == [b"hello"]


def test_no_descriptor_outlives_its_channel() -> None:
    before = _open_fds()
    for _ in range(50):
        left, right_sock = Channel.pair()
        right = Channel(right_sock)
        left.send([b"x" * 100_000])
        right.close()
        left.flush()  # what fit in the socket is gone; the rest is dropped at close
        with pytest.raises(BrokenWorkerError):
            left.receive()
        left.close()
    assert _open_fds() == before
