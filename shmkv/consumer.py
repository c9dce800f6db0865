"""Layer 2: the reference KV-event subscriber, the core of `shmkv events`.

`EventConsumer` subscribes to the live streams of one or more ranks, decodes either codec,
checks that each rank's seq is contiguous, repairs gaps through the rank's replay socket, and
rebuilds what each rank announced, per tier::

    index[(rank, tier)] = {block hash, ...}

Rules (`wire.md` §4, `shm.md` Part A.3):

* per rank, `last` is the last applied seq. A batch with seq <= last is a duplicate and is
  dropped. A batch with seq > last + 1 opens a gap: the consumer asks the rank's replay socket
  (DEALER -> ROUTER) for everything from last + 1, applies what comes back in order, then the
  live batch. When the replay starts above the requested seq (the batches were older than the
  publisher's buffer) or no replay is possible, the missing batches are *lost*: counted, and
  logged as a warning. Each rank's first expected seq is `start_seq` (default 0, so a late
  joiner fetches the history it missed); None adopts the first seq seen.
* Stored adds hashes to (rank, tier), Removed discards them, Cleared wipes every tier of the
  rank. The rank is the one the endpoint was configured for.
* A Stored whose parent this rank never announced (or already removed) in any tier is an
  *orphan store*: an error (a router drops it: Dynamo answers "parent block not found", llm-d
  skips the event), counted in `orphan_stores` (one of `ERROR_COUNTERS`; host-tier ones also
  in `orphan_stores_host`) and logged. A parent announced on the rank in another tier only
  counts as `cross_tier_parents` (`cross_tier_parents_host` for host-tier stores).
* Replay is synchronous: the consumer waits for the end marker, giving up (and counting a
  replay failure) when the replay socket stays silent for `replay_timeout_s`. A publisher in
  the same thread must therefore serve replay from its background thread.

A CLI is a thin loop::

    with EventConsumer([RankEndpoint(rank=0, endpoint=..., replay_endpoint=...)]) as consumer:
        while running:
            consumer.poll(100)
            print(consumer.stats())
        consumer.catch_up()                      # the tail: anything missed since the last batch
        problems = consumer.compare(state)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

import zmq

from shmkv.codec import EventCodec, JsonCodec, VllmCodec, sniff_codec_name
from shmkv.errors import ClosedError, ConfigError, ProtocolError
from shmkv.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, StorageTier
from shmkv.ids import DEFAULT_BLOCK_SIZE
from shmkv.publisher import END_SEQ, pack_seq, unpack_seq

__all__ = ["CONSUMER_CODECS", "ERROR_COUNTERS", "EventConsumer", "RankEndpoint"]

logger = logging.getLogger(__name__)

CONSUMER_CODECS: Final = ("auto", "json", "vllm")
_MAX_MESSAGES_PER_SOCKET: Final = 1024
"""Messages read from one rank per poll before the next rank gets its turn."""
_EXAMPLES: Final = 5
ERROR_COUNTERS: Final = ("lost_batches", "orphan_stores")
"""Counters that must stay 0 for a stream a router can rebuild (`shmkv events` exits 1)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RankEndpoint:
    """Where one rank publishes."""

    rank: int
    endpoint: str
    """The rank's live endpoint (already offset by the rank), e.g. `tcp://127.0.0.1:5557`."""
    replay_endpoint: str | None = None
    """The rank's replay endpoint, or None: gaps are then only counted."""


@dataclass(slots=True)
class _RankState:
    rank: int
    sub: zmq.Socket[bytes]
    replay_endpoint: str | None
    dealer: zmq.Socket[bytes] | None
    last_seq: int | None
    counters: dict[str, int] = field(default_factory=dict)


_COUNTERS: Final = (
    "batches",
    "events",
    "blocks_stored",
    "blocks_removed",
    "clears",
    "duplicates",
    "gaps",
    "recovered_batches",
    "lost_batches",
    "skipped_before_clear",
    "decode_errors",
    "malformed_messages",
    "replay_requests",
    "replay_failures",
    "orphan_stores",
    "orphan_stores_host",
    "cross_tier_parents",
    "cross_tier_parents_host",
    "unknown_removes",
)


class EventConsumer:
    """Subscribes to ranks' KV events and keeps a per-(rank, tier) block index.

    Owns one SUB and one DEALER socket per rank; not thread-safe.
    """

    def __init__(
        self,
        ranks: Sequence[RankEndpoint],
        *,
        codec: str = "auto",
        block_size: int = DEFAULT_BLOCK_SIZE,
        topic: bytes = b"",
        start_seq: int | None = 0,
        replay_timeout_s: float = 5.0,
        rcvhwm: int = 10_000,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        """Connect to every rank.

        Args:
            ranks: one entry per rank (distinct ranks).
            codec: "json", "vllm", or "auto" (sniffed per message).
            block_size: the fleet's block size; a vLLM stored event with another is rejected.
            topic: subscription prefix ("" = everything; llm-d topics start with "kv@").
            start_seq: the first seq expected from every rank; None adopts the first one seen.
            replay_timeout_s: how long a replay may stay silent before it counts as failed.
            rcvhwm: receive queue per rank, in messages (0 = unbounded). When it is full the
                consumer stops reading the socket and the publisher's XPUB_NODROP turns that
                into back-pressure: nothing is dropped.
            context: a ZMQ context to use (the caller terminates it); None: a private one.

        Raises:
            ConfigError: bad options.
        """
        if codec not in CONSUMER_CODECS:
            raise ConfigError(f"unknown event codec {codec!r}: choose one of {CONSUMER_CODECS}")
        if not ranks:
            raise ConfigError("subscribe to at least one rank")
        if len({r.rank for r in ranks}) != len(ranks):
            raise ConfigError("each rank may be given only once")
        if start_seq is not None and start_seq < 0:
            raise ConfigError(f"start_seq must be >= 0 or None, got {start_seq}")
        self._codec_name = codec
        self._codecs: dict[str, EventCodec] = {
            "json": JsonCodec(),
            "vllm": VllmCodec(block_size=block_size, compute_local_hashes=False),
        }
        self._block_size = block_size
        self._topic = topic
        self._replay_timeout_s = replay_timeout_s
        self._owns_context = context is None
        self._context: zmq.Context[zmq.Socket[bytes]] = (
            zmq.Context() if context is None else context
        )
        self._closed = False
        self._index: dict[tuple[int, StorageTier], set[int]] = {}
        self._poller = zmq.Poller()
        self._ranks: dict[int, _RankState] = {}
        self._by_socket: dict[zmq.Socket[bytes], _RankState] = {}
        try:
            for spec in ranks:
                sub = self._context.socket(zmq.SUB)
                state = _RankState(
                    rank=spec.rank,
                    sub=sub,
                    replay_endpoint=spec.replay_endpoint,
                    dealer=None,
                    last_seq=None if start_seq is None else start_seq - 1,
                    counters=dict.fromkeys(_COUNTERS, 0),
                )
                self._ranks[spec.rank] = state  # owned from here on: closed on any failure
                self._by_socket[sub] = state
                sub.setsockopt(zmq.LINGER, 0)
                sub.setsockopt(zmq.RCVHWM, rcvhwm)
                sub.setsockopt(zmq.SUBSCRIBE, topic)
                sub.connect(spec.endpoint)
                if spec.replay_endpoint is not None:
                    state.dealer = self._new_dealer(spec.replay_endpoint)
                self._poller.register(sub, zmq.POLLIN)
                for tier in StorageTier:
                    self._index[(spec.rank, tier)] = set()
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise ConfigError(f"cannot connect the KV-event consumer: {exc.strerror}") from exc

    # -- public API ----------------------------------------------------------------------------

    @property
    def index(self) -> dict[tuple[int, StorageTier], set[int]]:
        """The live index, block hashes per (rank, tier). Read it; do not mutate it."""
        return self._index

    @property
    def ranks(self) -> list[int]:
        return sorted(self._ranks)

    def last_seq(self, rank: int) -> int | None:
        """The last applied seq of `rank` (None before the first batch when start_seq=None)."""
        return self._ranks[rank].last_seq

    def poll(self, timeout_ms: int) -> int:
        """Wait up to `timeout_ms` for messages, then apply everything that arrived.

        Returns:
            The number of batches applied (live and recovered through replay).
        """
        self._check_open()
        applied = 0
        for socket, _event in self._poller.poll(timeout_ms):
            state = self._by_socket[socket]
            for _ in range(_MAX_MESSAGES_PER_SOCKET):
                try:
                    frames = state.sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                applied += self._on_live(state, frames)
        return applied

    def drain(self, idle_s: float = 1.0, limit_s: float = 30.0) -> int:
        """Poll until nothing arrived for `idle_s` (at most `limit_s`), then `catch_up()`.
        Returns the number of batches applied."""
        applied = 0
        deadline = time.monotonic() + limit_s
        last = time.monotonic()
        while time.monotonic() - last < idle_s and time.monotonic() < deadline:
            got = self.poll(100)
            if got:
                applied += got
                last = time.monotonic()
        return applied + self.catch_up()

    def catch_up(self) -> int:
        """Ask every rank with replay for what follows its last applied seq, and apply it.

        For the tail of a run (a lost last batch is no gap until another batch follows) and for
        a late joiner that has seen no batch yet.

        Returns:
            The number of batches recovered.
        """
        self._check_open()
        wanted = {
            state.rank: state.last_seq + 1
            for state in self._ranks.values()
            if state.replay_endpoint is not None and state.last_seq is not None
        }
        # Every rank is asked at once, so publishers that are gone (the run is over) cost one
        # replay timeout in all, not one per rank; a failed rank is asked once more (its
        # restarted successor may serve the same endpoint), again all together.
        fetched = self._fetch_replays(wanted)
        retry = {rank: seq for rank, seq in wanted.items() if fetched[rank] is None}
        if retry:
            fetched.update(self._fetch_replays(retry))
        recovered = 0
        for rank, replies in fetched.items():
            if replies is not None:
                recovered += self._apply_replies(self._ranks[rank], replies, live_seq=None)
        return recovered

    def stats(self) -> dict[str, int]:
        """Totals over every rank, plus the number of indexed blocks (a snapshot)."""
        totals = dict.fromkeys(_COUNTERS, 0)
        for state in self._ranks.values():
            for name, value in state.counters.items():
                totals[name] += value
        totals["indexed_blocks"] = sum(len(hashes) for hashes in self._index.values())
        return totals

    def rank_stats(self) -> dict[int, dict[str, int]]:
        """Counters per rank, with `last_seq` (-1 before the first batch)."""
        out: dict[int, dict[str, int]] = {}
        for rank, state in sorted(self._ranks.items()):
            counters = dict(state.counters)
            counters["last_seq"] = -1 if state.last_seq is None else state.last_seq
            for tier in StorageTier:
                counters[f"indexed_{tier.value}"] = len(self._index[(rank, tier)])
            out[rank] = counters
        return out

    def compare(self, state: Mapping[str, object]) -> list[str]:
        """Differences between the index and a fleet state dump, one line each ([] = equal).

        `state` has the shape `{"block_size": 16, "ranks": {"0": {"device": [hash, ...],
        "host_pinned": [...]}}}`. Only subscribed ranks are compared; a subscribed rank missing
        from the dump counts as holding nothing.

        Raises:
            ConfigError: `state` does not have that shape.
        """
        expected = _parse_state(state)
        problems: list[str] = []
        dump_block_size = state.get("block_size")
        if dump_block_size is not None and dump_block_size != self._block_size:
            problems.append(
                f"block_size: the dump says {dump_block_size}, the consumer uses {self._block_size}"
            )
        for rank in sorted(self._ranks):
            for tier in StorageTier:
                want = expected.get((rank, tier), set())
                have = self._index[(rank, tier)]
                if want == have:
                    continue
                missing = want - have
                extra = have - want
                problems.append(
                    f"rank {rank} {tier.value}: {len(missing)} block(s) missing from the index "
                    f"{_examples(missing)}, {len(extra)} unexpected {_examples(extra)}"
                )
        return problems

    # -- live messages -------------------------------------------------------------------------

    def _on_live(self, state: _RankState, frames: list[bytes]) -> int:
        if len(frames) != 3 or len(frames[1]) != 8:
            state.counters["malformed_messages"] += 1
            logger.warning(
                "rank %d: ignoring a malformed live message (%d frames)", state.rank, len(frames)
            )
            return 0
        seq = unpack_seq(frames[1])
        last = state.last_seq
        if last is None:
            last = state.last_seq = seq - 1
        if seq <= last:
            state.counters["duplicates"] += 1
            return 0
        applied = 0
        if seq > last + 1:
            state.counters["gaps"] += 1
            logger.debug("rank %d: gap, expected seq %d, got %d", state.rank, last + 1, seq)
            applied += self._recover(state, last + 1, live_seq=seq)
            last = state.last_seq
            assert last is not None
            if seq <= last:
                return applied
            if seq > last + 1:
                reason = (
                    "no replay endpoint"
                    if state.replay_endpoint is None
                    else "the replay did not deliver them"
                )
                self._lose(state, last + 1, seq, reason, next_payload=frames[2])
        self._apply(state, seq, frames[2])
        return applied + 1

    def _recover(self, state: _RankState, start_seq: int, live_seq: int | None) -> int:
        """Fetch and apply batches from `start_seq` (up to `live_seq`, excluded) by replay.

        Returns:
            How many batches were applied.
        """
        if state.replay_endpoint is None:
            return 0
        replies = self._fetch_replays({state.rank: start_seq})[state.rank]
        if replies is None:
            # The publisher may have died and come back meanwhile (its successor serves the
            # same endpoint and opens with AllBlocksCleared): ask once more.
            replies = self._fetch_replays({state.rank: start_seq})[state.rank]
        if replies is None:
            return 0
        return self._apply_replies(state, replies, live_seq)

    def _apply_replies(
        self, state: _RankState, replies: list[tuple[int, bytes]], live_seq: int | None
    ) -> int:
        """Apply replayed batches newer than the rank's last seq (up to `live_seq`, excluded)."""
        applied = 0
        for seq, payload in replies:
            last = state.last_seq
            assert last is not None
            if seq <= last:
                continue
            if live_seq is not None and seq >= live_seq:
                break  # the live batch and its successors are (or will be) in the SUB queue
            if seq > last + 1:
                self._lose(
                    state,
                    last + 1,
                    seq,
                    "older than the publisher's replay buffer",
                    next_payload=payload,
                )
            self._apply(state, seq, payload)
            state.counters["recovered_batches"] += 1
            applied += 1
        if live_seq is None and applied:
            logger.info("rank %d: caught up %d batch(es) through replay", state.rank, applied)
        return applied

    def _fetch_replays(
        self, start_seqs: Mapping[int, int]
    ) -> dict[int, list[tuple[int, bytes]] | None]:
        """One replay round trip per rank (rank -> first seq wanted), all in flight at once.

        Returns each rank's replies in order, or None (counted, logged) for a rank whose replay
        socket stayed silent for the replay timeout.
        """
        timeout_s = self._replay_timeout_s
        now = time.monotonic()
        replies: dict[int, list[tuple[int, bytes]] | None] = {}
        waiting: dict[zmq.Socket[bytes], _RankState] = {}
        silent_since: dict[int, float] = {}
        poller = zmq.Poller()
        for rank, start_seq in start_seqs.items():
            state = self._ranks[rank]
            assert state.dealer is not None
            state.counters["replay_requests"] += 1
            state.dealer.send_multipart((b"", pack_seq(start_seq)))
            replies[rank] = []
            waiting[state.dealer] = state
            silent_since[rank] = now
            poller.register(state.dealer, zmq.POLLIN)
        while waiting:
            now = time.monotonic()
            for dealer, state in list(waiting.items()):
                if now - silent_since[state.rank] >= timeout_s:
                    self._replay_failed(state, start_seqs[state.rank])
                    poller.unregister(dealer)
                    del waiting[dealer]
                    replies[state.rank] = None
            if not waiting:
                break
            deadline = min(silent_since[state.rank] for state in waiting.values()) + timeout_s
            for dealer, _ in poller.poll(max(1, int((deadline - now) * 1000) + 1)):
                state = waiting[dealer]
                frames = dealer.recv_multipart()
                silent_since[state.rank] = time.monotonic()
                # [b"", topic, seq, payload] (current vLLM) or [b"", seq, payload] (legacy)
                if len(frames) not in (3, 4) or frames[0] != b"" or len(frames[-2]) != 8:
                    state.counters["malformed_messages"] += 1
                    logger.warning("rank %d: ignoring a malformed replay reply", state.rank)
                    continue
                seq = unpack_seq(frames[-2])
                if seq == END_SEQ:
                    poller.unregister(dealer)
                    del waiting[dealer]
                    continue
                rank_replies = replies[state.rank]
                assert rank_replies is not None
                rank_replies.append((seq, frames[-1]))
        return replies

    def _replay_failed(self, state: _RankState, start_seq: int) -> None:
        assert state.dealer is not None
        assert state.replay_endpoint is not None
        state.counters["replay_failures"] += 1
        logger.warning(
            "rank %d: replay from seq %d: no reply for %.1f s (%s)",
            state.rank,
            start_seq,
            self._replay_timeout_s,
            state.replay_endpoint,
        )
        # NOTE: a fresh socket, so late replies to this request cannot pollute the next.
        state.dealer.close(linger=0)
        state.dealer = self._new_dealer(state.replay_endpoint)

    def _opens_with_clear(self, payload: bytes) -> bool:
        try:
            events = self._decode(payload).events
        except ProtocolError:
            return False
        return bool(events) and isinstance(events[0], AllBlocksCleared)

    def _lose(
        self, state: _RankState, first: int, after: int, reason: str, *, next_payload: bytes
    ) -> None:
        lost = after - first
        if self._opens_with_clear(next_payload):
            # A restarted publisher resumes past any seq its predecessor reserved but never
            # sent, and opens with AllBlocksCleared: nothing before a clear matters.
            state.counters["skipped_before_clear"] += lost
            logger.info(
                "rank %d: seq %d..%d skipped by a publisher restart (AllBlocksCleared follows)",
                state.rank,
                first,
                after - 1,
            )
            return
        state.counters["lost_batches"] += lost
        logger.warning(
            "rank %d: LOST %d batch(es), seq %d..%d (%s): the index may be wrong until the "
            "next AllBlocksCleared",
            state.rank,
            lost,
            first,
            after - 1,
            reason,
        )

    # -- applying batches ----------------------------------------------------------------------

    def _decode(self, payload: bytes) -> EventBatch:
        name = self._codec_name
        if name == "auto":
            name = sniff_codec_name(payload)
        return self._codecs[name].decode_batch(payload)

    def _apply(self, state: _RankState, seq: int, payload: bytes) -> None:
        state.last_seq = seq
        counters = state.counters
        try:
            batch = self._decode(payload)
        except ProtocolError as exc:
            counters["decode_errors"] += 1
            logger.warning("rank %d: cannot decode batch seq %d: %s", state.rank, seq, exc)
            return
        counters["batches"] += 1
        counters["events"] += len(batch.events)
        rank = state.rank
        index = self._index
        for event in batch.events:
            if isinstance(event, BlockStored):
                hashes = index[(rank, event.tier)]
                parent = event.parent_hash
                if parent is not None and parent not in hashes:
                    host = event.tier is StorageTier.HOST_PINNED
                    if any(parent in index[(rank, tier)] for tier in StorageTier):
                        counters["cross_tier_parents"] += 1  # e.g. a host copy of a G1 child
                        counters["cross_tier_parents_host"] += host
                    else:
                        counters["orphan_stores"] += 1  # the parent is in no tier here
                        counters["orphan_stores_host"] += host
                        if counters["orphan_stores"] == 1:
                            logger.warning(
                                "rank %d: ORPHAN store in batch seq %d: parent %#018x of %s "
                                "block %#018x was never announced on this rank (more are "
                                "only counted)",
                                rank,
                                seq,
                                parent,
                                event.tier.value,
                                event.block_hashes[0] if event.block_hashes else 0,
                            )
                hashes.update(event.block_hashes)
                counters["blocks_stored"] += len(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                hashes = index[(rank, event.tier)]
                for block_hash in event.block_hashes:
                    if block_hash in hashes:
                        hashes.remove(block_hash)
                    else:
                        counters["unknown_removes"] += 1
                counters["blocks_removed"] += len(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                for tier in StorageTier:
                    index[(rank, tier)].clear()
                counters["clears"] += 1

    # -- lifecycle -----------------------------------------------------------------------------

    def _new_dealer(self, endpoint: str) -> zmq.Socket[bytes]:
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(endpoint)
        except zmq.ZMQError:
            dealer.close(linger=0)
            raise
        return dealer

    def close(self) -> None:
        """Close every socket (linger 0: a consumer has nothing worth delivering). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._close_sockets()

    def _close_sockets(self) -> None:
        for state in self._ranks.values():
            state.sub.close(linger=0)
            if state.dealer is not None:
                state.dealer.close(linger=0)
        if self._owns_context:
            self._context.term()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the KV-event consumer is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _examples(hashes: Iterable[int]) -> str:
    shown = sorted(hashes)[:_EXAMPLES]
    return (
        "["
        + ", ".join(f"{h:#018x}" for h in shown)
        + (", ...]" if len(shown) == _EXAMPLES else "]")
    )


def _parse_state(state: Mapping[str, object]) -> dict[tuple[int, StorageTier], set[int]]:
    ranks = state.get("ranks")
    if not isinstance(ranks, Mapping):
        raise ConfigError("state dump: 'ranks' must be an object keyed by rank")
    out: dict[tuple[int, StorageTier], set[int]] = {}
    for rank_key, tiers in ranks.items():
        try:
            rank = int(rank_key)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"state dump: rank key {rank_key!r} is not an int") from exc
        if not isinstance(tiers, Mapping):
            raise ConfigError(f"state dump: rank {rank_key!r} must map tiers to hash lists")
        for tier_name, hashes in tiers.items():
            try:
                tier = StorageTier(tier_name)
            except ValueError as exc:
                raise ConfigError(f"state dump: unknown tier {tier_name!r} of rank {rank}") from exc
            if not isinstance(hashes, list) or not all(type(h) is int for h in hashes):
                raise ConfigError(f"state dump: rank {rank} {tier_name} must be a list of ints")
            out[(rank, tier)] = set(hashes)
    return out
