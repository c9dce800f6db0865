"""Layer 2: a direct message channel between the supervisor and one rank process.

One connected `AF_UNIX` stream socket pair per rank, made by the supervisor
(`Channel.pair`); the rank's end crosses `exec` as an inherited descriptor, named
`fd://N` (`child_endpoint`, `Channel.from_endpoint`). Unlike a ZMQ socket there is no I/O
thread in between: a message written by one process is readable by the other at once, with
no extra thread to wake on either side (a ZMQ DEALER/ROUTER hop crosses the sender's and
the receiver's I/O threads, which wait for a CPU on a busy 2-core machine).

Wire form of one message (the frames of `transport.encode`, unchanged):

    u32 body_bytes   (little-endian; the bytes after this word)
    u32 num_frames
    u32 frame_bytes  x num_frames
    the frames' bytes, back to back

Writes never block: what the socket does not take at once waits in an outbound buffer,
sent by `flush` when the socket is writable again (poll `fileno()` for POLLOUT while
`wants_write`). Both ends may write at the same time without a deadlock. `receive` takes
every complete message already there. Bounds: a message of at most `MAX_MESSAGE_BYTES`
(sending a bigger one raises ProtocolError and sends nothing; receiving one breaks the
channel), at most `transport.MAX_FRAMES` frames, and at most `MAX_PENDING_BYTES` waiting to
be sent (a peer that leaves that much unread is treated as dead).
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Sequence
from typing import Final

from shmkv.errors import BrokenWorkerError, ClosedError, ConfigError, ProtocolError
from shmkv.transport import MAX_FRAME_BYTES, MAX_FRAMES, MAX_HEADER_BYTES

ENDPOINT_SCHEME: Final = "fd://"
MAX_MESSAGE_BYTES: Final = MAX_HEADER_BYTES + MAX_FRAME_BYTES
"""The largest message body (frames plus their lengths): a header and one full frame."""
MAX_PENDING_BYTES: Final = 4 * MAX_MESSAGE_BYTES
"""Bytes a channel may hold for a peer that does not read (then: BrokenWorkerError)."""
RECV_CHUNK_BYTES: Final = 256 * 1024
SEND_BUFFER_BYTES: Final = 1024 * 1024
"""Asked of the kernel for each end of a pair (it caps it at net.core.wmem_max, often 208
KiB): a SUBMIT of many long prompts then goes in one write, not over several wake-ups."""
_PREFIX: Final = struct.Struct("<II")
_SEND_FLAGS: Final = socket.MSG_NOSIGNAL


def child_endpoint(fd: int) -> str:
    """The endpoint that names an inherited channel descriptor (`Channel.from_endpoint`)."""
    return f"{ENDPOINT_SCHEME}{fd}"


def endpoint_fd(endpoint: str) -> int:
    """The descriptor number of an `fd://N` endpoint.

    Raises:
        ConfigError: not an `fd://N` endpoint.
    """
    if not endpoint.startswith(ENDPOINT_SCHEME):
        raise ConfigError(f"not a channel endpoint: {endpoint!r} (expected fd://N)")
    digits = endpoint[len(ENDPOINT_SCHEME) :]
    if not digits.isdigit() or not digits.isascii():
        raise ConfigError(f"bad channel endpoint {endpoint!r} (expected fd://N)")
    return int(digits)


def encode_message(frames: Sequence[bytes]) -> bytes:
    """The wire form of one message (see the module doc).

    Raises:
        ProtocolError: no frames, too many, or a body over MAX_MESSAGE_BYTES.
    """
    num_frames = len(frames)
    if not 0 < num_frames <= MAX_FRAMES:
        raise ProtocolError(f"a message of {num_frames} frames (1..{MAX_FRAMES})")
    lengths = [len(frame) for frame in frames]
    body_bytes = 4 + 4 * num_frames + sum(lengths)
    if body_bytes > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a message of {body_bytes} bytes (limit {MAX_MESSAGE_BYTES})")
    return b"".join(
        (_PREFIX.pack(body_bytes, num_frames), struct.pack(f"<{num_frames}I", *lengths), *frames)
    )


class Channel:
    """One end of a supervisor <-> rank channel: owns its socket (`close`)."""

    def __init__(self, sock: socket.socket, *, max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._max_pending_bytes = max_pending_bytes
        self._fd = sock.fileno()
        self._out = bytearray()
        self._in = bytearray()
        self._scratch = memoryview(bytearray(RECV_CHUNK_BYTES))
        """Where `receive` reads into: one buffer for the channel's life (a fresh bytes of
        RECV_CHUNK_BYTES per read is an mmap and munmap each time)."""
        self._eof = False
        self.num_sent = 0
        self.num_received = 0

    @classmethod
    def pair(cls) -> tuple[Channel, socket.socket]:
        """(the parent's channel, the child's socket): the child's socket is to be passed to
        the child process (`subprocess.Popen(pass_fds=[sock.fileno()])`, then closed)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for sock in (parent, child):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            return cls(parent), child
        except BaseException:
            parent.close()
            child.close()
            raise

    @classmethod
    def from_endpoint(cls, endpoint: str) -> Channel:
        """The channel an inherited `fd://N` names (this object owns the descriptor from now).

        Raises:
            ConfigError: not an `fd://N` endpoint, or N is not a stream socket.
        """
        fd = endpoint_fd(endpoint)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ConfigError(f"channel endpoint {endpoint!r}: {exc}") from exc
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise ConfigError(f"channel endpoint {endpoint!r} is not a stream socket")
        return cls(sock)

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def fileno(self) -> int:
        """The descriptor to poll (POLLIN always, POLLOUT while `wants_write`); -1 once
        closed."""
        return -1 if self._sock is None else self._fd

    @property
    def wants_write(self) -> bool:
        """Bytes wait to be sent: poll for POLLOUT and call `flush`."""
        return bool(self._out)

    @property
    def pending_bytes(self) -> int:
        return len(self._out)

    def _socket(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise ClosedError("the channel is closed")
        return sock

    def send(self, frames: Sequence[bytes]) -> None:
        """Queue one message and send what the socket takes now (never blocks).

        Raises:
            ProtocolError: a malformed or oversized message (nothing is queued).
            BrokenWorkerError: the peer is gone, or has left `max_pending_bytes` unread
                (MAX_PENDING_BYTES by default).
            ClosedError: the channel is closed.
        """
        sock = self._socket()
        data = encode_message(frames)
        if self._out:
            if len(self._out) + len(data) > self._max_pending_bytes:
                raise BrokenWorkerError(f"the channel's peer left {len(self._out)} bytes unread")
            self._out += data
            self.num_sent += 1
            self.flush()
            return
        sent = self._send_now(sock, data)  # nothing waits: no copy into the buffer first
        self.num_sent += 1
        if sent < len(data):
            self._out += memoryview(data)[sent:]

    def flush(self) -> bool:
        """Send what waits, as far as the socket takes it; True when nothing is left.

        Raises:
            BrokenWorkerError: the peer is gone.
            ClosedError: the channel is closed.
        """
        sock = self._socket()
        out = self._out
        if not out:
            return True
        del out[: self._send_now(sock, out)]
        return not out

    def _send_now(self, sock: socket.socket, data: bytes | bytearray) -> int:
        """Send what the socket takes of `data` now; how many bytes (0: it is full).

        Raises:
            BrokenWorkerError: the peer is gone.
        """
        try:
            return sock.send(data, _SEND_FLAGS)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise self._peer_gone(exc) from exc

    def flush_blocking(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for what waits to be sent (shutdown); True when sent.
        A gone peer or a closed channel: False."""
        deadline = time.monotonic() + timeout_s
        poller = select.poll()
        try:
            while not self.flush():
                left_ms = (deadline - time.monotonic()) * 1000.0
                if left_ms <= 0:
                    return False
                poller.register(self._fd, select.POLLOUT)
                poller.poll(left_ms)
        except (BrokenWorkerError, ClosedError):
            return False
        return True

    def receive(self) -> list[list[bytes]]:
        """Every complete message there is now (may be none), each as its list of frames.
        Never blocks.

        Raises:
            BrokenWorkerError: the peer closed its end (or died) and no message is left.
            ProtocolError: a malformed or oversized message: the stream cannot be trusted
                after it, so the channel is closed.
            ClosedError: the channel is closed.
        """
        sock = self._socket()
        buffer = self._in
        scratch = self._scratch
        while not self._eof:
            try:
                size = sock.recv_into(scratch)
            except BlockingIOError:
                break
            except OSError as exc:  # ECONNRESET and the like: the peer is gone
                self._peer_gone(exc)
                break
            if not size:
                self._eof = True
                break
            buffer += scratch[:size]
            if size < RECV_CHUNK_BYTES:
                break  # most likely all there is: poll says when more comes
        try:
            messages = self._parse()
        except ProtocolError:
            self.close()
            raise
        if not messages and self._eof:
            raise BrokenWorkerError(
                "the channel's peer closed its end"
                + (f" in the middle of a message ({len(buffer)} bytes)" if buffer else "")
            )
        self.num_received += len(messages)
        return messages

    def _parse(self) -> list[list[bytes]]:
        """Cut the complete messages off the inbound buffer."""
        buffer = self._in
        size = len(buffer)
        messages: list[list[bytes]] = []
        pos = 0
        with memoryview(buffer) as view:
            while size - pos >= _PREFIX.size:
                body_bytes, num_frames = _PREFIX.unpack_from(view, pos)
                if body_bytes > MAX_MESSAGE_BYTES:
                    raise ProtocolError(
                        f"a message of {body_bytes} bytes (limit {MAX_MESSAGE_BYTES})"
                    )
                if not 0 < num_frames <= MAX_FRAMES or 4 + 4 * num_frames > body_bytes:
                    raise ProtocolError(f"a message of {num_frames} frames in {body_bytes} bytes")
                end = pos + 4 + body_bytes
                if end > size:
                    break
                offset = pos + _PREFIX.size
                lengths = struct.unpack_from(f"<{num_frames}I", view, offset)
                offset += 4 * num_frames
                if offset + sum(lengths) != end:
                    raise ProtocolError("a message whose frame lengths do not add up")
                frames: list[bytes] = []
                for length in lengths:
                    frames.append(view[offset : offset + length].tobytes())
                    offset += length
                messages.append(frames)
                pos = end
        if pos:
            del buffer[:pos]
        return messages

    def _peer_gone(self, exc: OSError) -> BrokenWorkerError:
        """A socket error (EPIPE, ECONNRESET, ...): nothing more can be read or sent."""
        self._eof = True
        return BrokenWorkerError(f"the channel's peer is gone: {exc}")

    def close(self) -> None:
        """Close the socket (idempotent); what waits to be sent is dropped."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self._out.clear()
        self._in.clear()
        sock.close()


__all__ = [
    "ENDPOINT_SCHEME",
    "MAX_MESSAGE_BYTES",
    "MAX_PENDING_BYTES",
    "Channel",
    "child_endpoint",
    "encode_message",
    "endpoint_fd",
]
