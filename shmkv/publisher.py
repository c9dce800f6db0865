"""Layer 2: one rank's KV-event publisher, a live XPUB stream plus a ROUTER replay socket.

Wire (`wire.md` §1.3 and §7; `shm.md` Part A.3)::

    live    XPUB  bind <endpoint + rank>         [topic, seq u64 BE, payload]
    replay  ROUTER bind <replay endpoint + rank>
              request  [identity, b"", start_seq u64 BE]
              reply    [identity, b"", topic, seq, payload]        one per buffered seq >= start
                       [identity, b"", b"", 0xFF..FF, b""]         end marker
              legacy   [identity, b"", seq, payload] ... [identity, b"", 0xFF..FF, b""]

* `seq` counts published batches: contiguous, from `start_seq` (default 0), one per non-empty
  batch. An empty batch sends nothing and consumes no seq. All-ones is reserved (end marker).
* A restarted publisher never rewinds: the owner passes `start_seq` = the old publisher's
  `next_seq`, and the new publisher's first batch is `AllBlocksCleared` (routers drop lower
  seqs as stale and must forget everything the old process announced).
* Endpoints are per rank: `tcp://host:P` becomes `tcp://host:(P + rank)`; port 0 picks a free
  port per rank (read it back from `endpoint`); `ipc://path` and `inproc://name` get the
  suffix `_dp<rank>` for ranks above 0.
* The topic defaults to `kv@<host>:<port>@<model>` (llm-d's convention) with the bound host and
  port; any string, including "", may replace it.

Back-pressure policy ("nothing lost")
-------------------------------------
The live socket is an XPUB with ``XPUB_NODROP=1``: when a subscriber's queue holds `sndhwm`
messages, `publish` *blocks* instead of dropping, so a slow router slows the rank's scheduler
down rather than losing events (vLLM instead drops silently at the HWM). With
`send_timeout_ms` set, a send that stays blocked that long gives up on the live delivery of
that one batch: it is still numbered and kept in the replay ring, every subscriber sees a seq
gap on the next batch and fetches it through replay; the publisher logs a warning and counts
it in `send_timeouts`. Subscribers that join late miss what came before; `wait_for_subscribers`
holds a run until they are there, and replay covers the rest.

Replay without a thread
-----------------------
The owning loop calls `serve_replay(timeout_ms=0)` once per pass: it answers every pending
request and reads XPUB subscription messages. For idle periods (end of a run, a paused
driver) `start_background_replay()` serves replay from a thread until
`stop_background_replay()`; the ring is guarded by a lock, so `publish` stays legal meanwhile.
While the thread runs it owns the ROUTER socket and `serve_replay` raises `ResourceError`.

End of a run
------------
`flush(timeout_s)` keeps answering replay requests until none arrived for `idle_s` (consumers
that noticed a gap in the last batches recover them), then `close()` closes both sockets with
`linger_ms`, so queued live messages still go out. If the publisher created its own context,
`close()` also terminates it, which waits for that delivery (up to the linger) before
returning; a caller that passes a shared context must terminate it before the process exits.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from types import TracebackType
from typing import Final, Self

import zmq

from shmkv.codec import EventCodec
from shmkv.errors import ClosedError, ConfigError, ResourceError
from shmkv.events import AllBlocksCleared, EventBatch

__all__ = [
    "DEFAULT_EVENT_ENDPOINT",
    "END_SEQ",
    "EventPublisher",
    "PublisherConfig",
    "default_topic",
    "offset_endpoint",
    "pack_seq",
    "unpack_seq",
]

logger = logging.getLogger(__name__)

END_SEQ: Final = 0xFFFF_FFFF_FFFF_FFFF
"""Reserved seq of the replay end marker (-1 as a signed 64-bit int)."""
DEFAULT_EVENT_ENDPOINT: Final = "tcp://127.0.0.1:5557"

_SEQ = struct.Struct(">Q")
pack_seq: Final = _SEQ.pack
"""8-byte big-endian encoding of a seq."""
_END_FRAME: Final = pack_seq(END_SEQ)
_SNDMORE: Final = zmq.SNDMORE
_ZERO_COPY_MIN_BYTES: Final = 1 << 16
BIND_RETRY_S: Final = 2.0
"""How long a bind to a port in use is retried before it is a ConfigError (see `_bind`)."""
"""Payloads from this size on are sent without a copy (pyzmq's default `copy_threshold`)."""


def unpack_seq(frame: bytes) -> int:
    """Decode an 8-byte big-endian seq frame. Raises ValueError (struct.error) on another size."""
    value: int = _SEQ.unpack(frame)[0]
    return value


def offset_endpoint(endpoint: str, rank: int) -> str:
    """The endpoint of DP rank `rank` for a base endpoint (vLLM's `offset_endpoint_port`).

    `tcp://host:P` -> `tcp://host:(P + rank)` (port 0 or `*` stays random); `ipc://path` and
    `inproc://name` -> `..._dp<rank>` for rank > 0.

    Raises:
        ConfigError: a negative rank, or an endpoint of another form.
    """
    if rank < 0:
        raise ConfigError(f"rank must be >= 0, got {rank}")
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise ConfigError(f"bad ZMQ endpoint {endpoint!r}: expected tcp://HOST:PORT or ipc://PATH")
    if scheme in ("ipc", "inproc"):
        return endpoint if rank == 0 else f"{endpoint}_dp{rank}"
    if scheme != "tcp":
        raise ConfigError(f"unsupported ZMQ transport {scheme!r} in {endpoint!r}: use tcp or ipc")
    host, colon, port_text = rest.rpartition(":")
    if not colon or not host:
        raise ConfigError(f"bad tcp endpoint {endpoint!r}: expected tcp://HOST:PORT")
    if port_text in ("*", "0"):
        return f"tcp://{host}:*"
    try:
        port = int(port_text)
    except ValueError as exc:
        raise ConfigError(f"bad port {port_text!r} in {endpoint!r}") from exc
    if not 0 < port + rank < 65536:
        raise ConfigError(f"port {port} + rank {rank} is outside 1..65535 in {endpoint!r}")
    return f"tcp://{host}:{port + rank}"


def default_topic(bound_endpoint: str, model_name: str) -> str:
    """llm-d's topic `kv@<host>:<port>@<model>` for a bound endpoint (`kv@<path>@<model>` for ipc)."""
    _scheme, _sep, rest = bound_endpoint.partition("://")
    return f"kv@{rest}@{model_name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PublisherConfig:
    """Options of one rank's publisher; endpoints are bases, offset by the rank."""

    endpoint: str = DEFAULT_EVENT_ENDPOINT
    """Base live endpoint (`--zmq-kv-events-port P` -> `tcp://127.0.0.1:P`)."""
    replay_endpoint: str | None = None
    """Base replay endpoint (`--zmq-replay-port R`); None: no replay socket."""
    topic: str | None = None
    """Topic frame; None: `kv@<host>:<port>@<model_name>`."""
    model_name: str = "shmkv"
    sndhwm: int = 100_000
    """Per-subscriber send queue, in messages; 0 = unbounded. Reaching it blocks `publish`."""
    send_timeout_ms: int | None = None
    """None: `publish` blocks as long as a subscriber is full. Else: see the module docstring."""
    buffer_steps: int = 10_000
    """Batches kept for replay (vLLM's `buffer_steps`)."""
    legacy_replay: bool = False
    """Reply `[seq, payload]` without the topic frame (vLLM before PR #45177)."""
    start_seq: int = 0
    """Seq of the first batch; > 0 marks a restart (the first batch is then AllBlocksCleared)."""
    linger_ms: int = 5_000
    """How long `close` keeps delivering queued messages."""

    def __post_init__(self) -> None:
        if self.sndhwm < 0:
            raise ConfigError(f"sndhwm must be >= 0, got {self.sndhwm}")
        if self.send_timeout_ms is not None and self.send_timeout_ms < 0:
            raise ConfigError(f"send_timeout_ms must be >= 0 or None, got {self.send_timeout_ms}")
        if self.buffer_steps < 1:
            raise ConfigError(f"buffer_steps must be >= 1, got {self.buffer_steps}")
        if not 0 <= self.start_seq < END_SEQ:
            raise ConfigError(f"start_seq must be in [0, 2^64 - 1), got {self.start_seq}")
        if self.linger_ms < 0:
            raise ConfigError(f"linger_ms must be >= 0, got {self.linger_ms}")


class EventPublisher:
    """The KV-event publisher of one DP rank: owns an XPUB and an optional replay ROUTER.

    Not thread-safe: one owner thread calls everything, except that the background replay
    thread (when started) serves the ROUTER.
    """

    def __init__(
        self,
        rank: int,
        codec: EventCodec,
        config: PublisherConfig | None = None,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        """Bind the sockets of rank `rank`.

        Args:
            rank: the DP rank; offsets the endpoints.
            codec: encodes each batch into its payload.
            config: options; defaults to `PublisherConfig()`.
            context: a ZMQ context to use (the caller terminates it); None: a private one,
                terminated by `close()`.

        Raises:
            ConfigError: bad options, or an endpoint that cannot be bound.
        """
        self._config = config = config if config is not None else PublisherConfig()
        self._rank = rank
        self._codec = codec
        live_endpoint = offset_endpoint(config.endpoint, rank)
        replay_endpoint = (
            None
            if config.replay_endpoint is None
            else offset_endpoint(config.replay_endpoint, rank)
        )
        self._owns_context = context is None
        self._context: zmq.Context[zmq.Socket[bytes]] = (
            zmq.Context() if context is None else context
        )
        self._router: zmq.Socket[bytes] | None = None
        self._closed = False
        try:
            self._xpub = self._context.socket(zmq.XPUB)
            self._xpub.setsockopt(zmq.LINGER, config.linger_ms)
            self._xpub.setsockopt(zmq.SNDHWM, config.sndhwm)
            self._xpub.setsockopt(zmq.XPUB_NODROP, 1)
            self._xpub.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription, to count peers
            if config.send_timeout_ms is not None:
                self._xpub.setsockopt(zmq.SNDTIMEO, config.send_timeout_ms)
            self._endpoint = _bind(self._xpub, live_endpoint)
            # NOTE: hot path (3 frames per batch): pyzmq's own `send`, without the Python layer
            # of `zmq.Socket` (routing_id/group, unused here: ~0.8 us per frame) nor
            # `send_multipart`'s type checks. A payload past pyzmq's copy threshold goes out
            # without a copy (bytes are immutable).
            self._send_frame: Callable[..., object] = super(zmq.Socket, self._xpub).send
            self._replay_endpoint: str | None = None
            if replay_endpoint is not None:
                self._router = self._context.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, config.linger_ms)
                self._router.setsockopt(zmq.SNDHWM, 0)  # a reply is bounded by buffer_steps
                self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone peer raises, no void
                self._replay_endpoint = _bind(self._router, replay_endpoint)
        except BaseException:
            self._close_sockets(linger_ms=0)
            raise
        topic = (
            default_topic(self._endpoint, config.model_name)
            if config.topic is None
            else config.topic
        )
        self._topic = topic.encode()
        self._next_seq = config.start_seq
        self._must_clear = config.start_seq > 0
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._ring_lock = threading.Lock()
        self._subscribers = 0
        self._last_request_s = 0.0
        self._replay_thread: threading.Thread | None = None
        self._stop_replay = threading.Event()
        self._published_batches = 0
        self._published_events = 0
        self._replay_requests = 0
        self._replayed_batches = 0
        self._malformed_requests = 0
        self._send_timeouts = 0
        logger.info(
            "rank %d publishes KV events on %s (topic %r, replay %s)",
            rank,
            self._endpoint,
            topic,
            self._replay_endpoint,
        )

    # -- properties ----------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def endpoint(self) -> str:
        """The bound live endpoint (with the actual port when the configured one was 0)."""
        return self._endpoint

    @property
    def replay_endpoint(self) -> str | None:
        """The bound replay endpoint, or None without replay."""
        return self._replay_endpoint

    @property
    def topic(self) -> bytes:
        return self._topic

    @property
    def next_seq(self) -> int:
        """The seq the next batch will get; a restarted publisher's `start_seq`."""
        return self._next_seq

    @property
    def num_subscribers(self) -> int:
        """Subscriptions matching the topic seen so far (updated by serve_replay/wait/flush)."""
        return self._subscribers

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, int]:
        """Counters since creation (a snapshot)."""
        return {
            "published_batches": self._published_batches,
            "published_events": self._published_events,
            "next_seq": self._next_seq,
            "subscribers": self._subscribers,
            "replay_requests": self._replay_requests,
            "replayed_batches": self._replayed_batches,
            "malformed_requests": self._malformed_requests,
            "send_timeouts": self._send_timeouts,
        }

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, batch: EventBatch) -> int | None:
        """Send one scheduler pass's events as one message.

        Blocks while a subscriber's queue is full (see the back-pressure policy).

        Returns:
            The batch's seq, or None for an empty batch (nothing sent, no seq consumed).

        Raises:
            ClosedError: the publisher is closed.
            InvariantError: the batch breaks an event invariant (from the codec).
        """
        if self._closed:
            raise ClosedError(f"the KV-event publisher of rank {self._rank} is closed")
        if not batch.events:
            return None
        if self._must_clear:
            self._open_after_restart()
        return self._send(self._codec.encode_batch(batch), len(batch.events))

    @property
    def pending_clear(self) -> bool:
        """True until a restarted publisher has sent its opening AllBlocksCleared."""
        return self._must_clear

    def open_stream(self) -> int | None:
        """Send the opening AllBlocksCleared of a restarted publisher now (instead of before
        its first batch); returns its seq, or None when there is nothing to announce."""
        if self._closed:
            raise ClosedError(f"the KV-event publisher of rank {self._rank} is closed")
        if not self._must_clear:
            return None
        self._open_after_restart()
        return self._next_seq - 1

    def _open_after_restart(self) -> None:
        self._must_clear = False
        cleared = EventBatch(
            ts_s=time.time(),
            dp_rank=self._rank,
            events=[AllBlocksCleared(event_id=0, dp_rank=self._rank)],
        )
        seq = self._send(self._codec.encode_batch(cleared), 1)
        logger.info(
            "rank %d restarted its KV events at seq %d with AllBlocksCleared", self._rank, seq
        )

    def _send(self, payload: bytes, num_events: int) -> int:
        seq = self._next_seq
        self._next_seq = seq + 1
        if self._router is not None:
            # INVARIANT: the ring holds contiguous seqs, so entry i has seq ring[0][0] + i.
            with self._ring_lock:
                self._ring.append((seq, payload))
        self._published_batches += 1
        self._published_events += num_events
        send = self._send_frame
        try:
            send(self._topic, _SNDMORE)
            send(pack_seq(seq), _SNDMORE)
            send(payload, 0, len(payload) < _ZERO_COPY_MIN_BYTES)
        except zmq.Again:
            self._send_timeouts += 1
            logger.warning(
                "rank %d: a subscriber stayed full for %s ms; batch seq %d is left to replay",
                self._rank,
                self._config.send_timeout_ms,
                seq,
            )
        return seq

    def wait_for_subscribers(self, num_subscribers: int = 1, timeout_s: float = 10.0) -> bool:
        """Wait until `num_subscribers` subscriptions matching the topic have arrived.

        Returns:
            True when they are there, False when `timeout_s` passed first.
        """
        self._check_open()
        deadline = time.monotonic() + timeout_s
        while True:
            self._read_subscriptions()
            if self._subscribers >= num_subscribers:
                if self._must_clear:
                    self._open_after_restart()
                return True
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return False
            self._xpub.poll(remaining_ms, zmq.POLLIN)

    def _read_subscriptions(self) -> None:
        """Apply pending XPUB (un)subscription messages to the subscriber count."""
        while True:
            try:
                message = self._xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message and message[0] in (0, 1) and self._topic.startswith(message[1:]):
                self._subscribers += 1 if message[0] == 1 else -1

    # -- replay --------------------------------------------------------------------------------

    def serve_replay(self, timeout_ms: int = 0) -> int:
        """Answer every pending replay request, waiting up to `timeout_ms` for the first one.

        Also reads pending subscription messages. Call it once per pass of the owning loop.
        Without a replay socket it only reads subscription messages and returns at once.

        Returns:
            The number of well-formed requests answered.

        Raises:
            ResourceError: the background replay thread is running.
        """
        self._check_open()
        if self._replay_thread is not None:
            raise ResourceError("replay is being served by the background thread")
        self._read_subscriptions()
        if self._router is None:
            return 0
        if timeout_ms > 0 and not self._router.poll(timeout_ms, zmq.POLLIN):
            return 0
        return self._serve_pending(self._router)

    def _serve_pending(self, router: zmq.Socket[bytes]) -> int:
        served = 0
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return served
            self._last_request_s = time.monotonic()
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != _SEQ.size:
                self._malformed_requests += 1
                logger.warning(
                    "rank %d: ignoring a malformed replay request (%d frames, sizes %s)",
                    self._rank,
                    len(frames),
                    [len(frame) for frame in frames[:4]],
                )
                continue
            self._reply(router, frames[0], unpack_seq(frames[2]))
            served += 1

    def _reply(self, router: zmq.Socket[bytes], identity: bytes, start_seq: int) -> None:
        with self._ring_lock:
            first_seq = self._ring[0][0] if self._ring else self._next_seq
            skip = min(max(0, start_seq - first_seq), len(self._ring))
            entries = list(islice(self._ring, skip, None))
        self._replay_requests += 1
        legacy = self._config.legacy_replay
        topic = self._topic
        try:
            for seq, payload in entries:
                if legacy:
                    router.send_multipart((identity, b"", pack_seq(seq), payload))
                else:
                    router.send_multipart((identity, b"", topic, pack_seq(seq), payload))
            if legacy:
                router.send_multipart((identity, b"", _END_FRAME, b""))
            else:
                router.send_multipart((identity, b"", b"", _END_FRAME, b""))
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            logger.warning("rank %d: replay client went away during its reply", self._rank)
            return
        self._replayed_batches += len(entries)
        if start_seq < first_seq:
            logger.warning(
                "rank %d: replay from seq %d asked for batches older than the buffer (oldest %d)",
                self._rank,
                start_seq,
                first_seq,
            )

    def start_background_replay(self, poll_ms: int = 50) -> None:
        """Serve replay from a daemon thread until `stop_background_replay()` or `close()`."""
        self._check_open()
        if self._router is None or self._replay_thread is not None:
            return
        self._stop_replay.clear()
        self._replay_thread = threading.Thread(
            target=self._replay_loop,
            args=(self._router, poll_ms),
            name=f"shmkv-replay-{self._rank}",
            daemon=True,
        )
        self._replay_thread.start()

    def stop_background_replay(self) -> None:
        """Stop the background replay thread (if any) and give the ROUTER back to the owner."""
        thread = self._replay_thread
        if thread is None:
            return
        self._stop_replay.set()
        thread.join()
        self._replay_thread = None

    def _replay_loop(self, router: zmq.Socket[bytes], poll_ms: int) -> None:
        try:
            while not self._stop_replay.is_set():
                if router.poll(poll_ms, zmq.POLLIN):
                    self._serve_pending(router)
        except zmq.ZMQError:
            logger.exception("rank %d: the background replay thread failed", self._rank)

    # -- end of run ----------------------------------------------------------------------------

    def flush(self, timeout_s: float = 5.0, *, idle_s: float = 0.2) -> None:
        """Keep serving replay until no request arrived for `idle_s` (at most `timeout_s`).

        Also sends the pending AllBlocksCleared of a restarted publisher that published nothing.
        Queued live messages are delivered by `close()` (linger).
        """
        self._check_open()
        if self._must_clear:
            self._open_after_restart()
        if self._router is None:
            return
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            now = time.monotonic()
            quiet_until = max(self._last_request_s, start) + idle_s
            if now >= deadline or now >= quiet_until:
                return
            wait_ms = max(1, int((min(deadline, quiet_until) - now) * 1000))
            if self._replay_thread is None:
                self.serve_replay(timeout_ms=wait_ms)
            else:
                self._stop_replay.wait(wait_ms / 1000)

    def close(self) -> None:
        """Stop replay, close both sockets with `linger_ms`, and end a private context.

        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self.stop_background_replay()
        self._close_sockets(linger_ms=self._config.linger_ms)
        logger.info(
            "rank %d closed its KV-event publisher at seq %d (%d batches)",
            self._rank,
            self._next_seq,
            self._published_batches,
        )

    def _close_sockets(self, linger_ms: int) -> None:
        for socket in (getattr(self, "_xpub", None), self._router):
            if socket is not None:
                socket.close(linger=linger_ms)
        if self._owns_context:
            self._context.term()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"the KV-event publisher of rank {self._rank} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _bind(socket: zmq.Socket[bytes], endpoint: str) -> str:
    """Bind and return the resolved endpoint (the real port of `tcp://host:*`).

    A port found in use is tried again for up to BIND_RETRY_S: a restarted rank rebinds the
    ports of the process it replaces, and a subscriber reconnecting to a port nobody holds can
    hold it for a moment (a TCP self-connect, which ZMQ drops at the handshake)."""
    deadline = time.monotonic() + BIND_RETRY_S
    while True:
        try:
            socket.bind(endpoint)
            break
        except zmq.ZMQError as exc:
            if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise ConfigError(
                f"cannot bind {endpoint}: {exc.strerror}; choose another port or path"
            ) from exc
    resolved: bytes = socket.getsockopt(zmq.LAST_ENDPOINT)  # type: ignore[assignment]
    return resolved.decode()
