"""Layer 3: the shared-G2 coordinator process, the only writer of G2 allocation and eviction.

    supervisor --DRAIN/STOP--> coordinator (DEALER, identity b"coordinator")
    rank r     --HELLO/OFFLOAD--> coordinator (ROUTER at `CoordinatorSpec.endpoint`)
    rank r     <--WELCOME/OFFLOAD_ACK/OFFLOAD_DONE/G2_EVENTS-- coordinator

It creates the G2 segment (owner-only, `shmkv.shm.G2Segment.create`), controls it through a
`shmkv.g2.G2Directory` with a Lineage eviction policy keyed by PLH, and runs one loop on a
`zmq.Poller` over the ROUTER, the supervisor DEALER, one `os.pidfd_open` per registered rank
(a dead rank is noticed as soon as the kernel reaps it) and a signal wake-up pipe; the poll
timeout is the time until the next transfer deadline on the fleet's shared clock.

Messages (all through `shmkv.transport.encode`/`decode`; a malformed message is counted and
dropped, never fatal; a peer that sent `BAD_MESSAGE_LIMIT` malformed messages is ignored):

* ``HELLO {rank, pid, epoch}`` -> register the rank (a newer epoch replaces the previous
  process of that rank, which is cleaned up as dead; an older epoch is dropped), watch its
  pidfd, reply ``WELCOME {segment, num_ranks, epoch}`` and then a snapshot of every READY block
  as G2_EVENTS stores, parent first (so a restarted rank re-announces the host tier).
* ``OFFLOAD {batch, items: [[seq, parent | -1, local, position]], has_tokens}`` + one frame of
  token ids (little-endian u32, ``len(items) x block_size``; absent when ``has_tokens`` is
  false), or its packed twin ``OFFLOAD {batch, num_items, packed: true, has_tokens}`` + an
  items frame (`shmkv.transport.pack_offload_items`: four u64 words per item) + the token
  frame -> per item: dedup (READY in G2, or in flight from any rank: rejected), else a slot is
  reserved at once (`G2Directory.reserve`, which evicts Lineage leaves that no rank pins, so
  their "R" events go out before any later "S"; a full G2 with nothing evictable drops the
  item: a miss, never a stall). Malformed items reject the whole batch (an ACK with every item
  rejected and an ``error``, then the message counts as bad). The reply
  ``OFFLOAD_ACK {batch, accepted: [i], rejected: [i], deadline_ms}`` goes out at once
  (``deadline_ms``: the simulated time the first accepted chunk should land; ``"inf"`` when
  unknown). With speedup 0 or inf every copy lands at once: the ACK body then carries
  ``"done": true`` (no OFFLOAD_DONE follows) and is not sent on its own: it rides in the
  ``"acks"`` list of the rank's next G2_EVENTS header, after the events of its blocks (below),
  where the OFFLOAD_DONE would have gone. Accepted items move in chunks of
  ``offload_batch_size`` blocks, each one
  processor-sharing transfer of ``blocks x block_size_bytes`` on that rank's own G1->G2 link
  (at most ``offload_batch_size`` chunks in flight per rank; with speedup 0 or inf every
  transfer is instant). When a chunk lands its blocks are committed parent-first (sorted by
  position within the chunk; a block whose parent is still in flight in another chunk, from
  any rank, waits and lands right after it) and the owner gets
  ``OFFLOAD_DONE {batch, items: [i]}`` (its quarantined G1 slots are free again).
* Rank death (pidfd readable, or a newer epoch says hello): `G2Directory.remove_dead_rank`
  zeroes its pin row and aborts its RESERVED slots; its transfers are dropped; blocks of other
  ranks that waited on one of its blocks land at once.
* Supervisor ``DRAIN`` -> finish every transfer (time passes as the clock says), send every
  rank a fence after all its events, reply ``STATE {host_pinned: sorted READY seq hashes,
  stats: {...}}``. ``STOP`` or SIGTERM/SIGINT -> close and unlink the segment, exit 0.
  ``RESULTS {...stats...}`` (flat numbers) goes to the supervisor about once per second.

G2_EVENTS (coordinator -> every live rank, in one global order; packed: the frame codec is
`shmkv.transport.pack_g2_events` / `unpack_g2_events`; the rank client also accepts the JSON
form ``{"events": [["S", seq, parent | -1, local, position, has_tokens 0/1] | ["R", seq]]}``)::

    frame 0  {"v", "t": "g2_events", "num_events": n, "num_stores": m,
              "fence": k,                   # optional; present (k >= 1) only on a drain fence
              "acks": [{OFFLOAD_ACK body with "done": true}, ...]}   # optional, per rank
    frame 1  (n > 0) little-endian u64 seq[n]; per store, in event order, parent[m] (0: none),
             local[m], meta[m] (position | G2_HAS_PARENT | G2_HAS_TOKENS); then kind[n] bytes
             (1 = stored "S", 0 = removed "R")
    frame 2  (m > 0) token ids of the stores, in event order, little-endian u32, block_size per
             store (zeros where G2_HAS_TOKENS is clear)

Packed, an event costs 9 bytes (a removal) or 33 + 4 x block_size bytes (a store), built and
read column by column (no per-event JSON on either side). This is the coordinator's private
channel to its ranks; the public KV event stream (`shmkv events`, routers) is unchanged.

``"acks"`` (protocol version 2): the OFFLOAD_ACKs of this rank that say "done", in the order
they were queued, each exactly the body its own OFFLOAD_ACK would have carried; the receiver
applies them after every event of the message, i.e. as if the message were followed by those
OFFLOAD_ACKs. Only the last G2_EVENTS of a flush carries them (its own header: the payload
frames stay shared by every rank); a flush with ACKs but no events sends a G2_EVENTS of no
events. So at speedup 0 or inf a rank gets one message per flush, not one plus one per
OFFLOAD.

A "R" (host-tier Removed) of a block displaced by an offload always precedes the "S" (Stored)
of the block that displaced it; stores are parent-first. Events are batched: one broadcast per
loop turn (at most `MAX_MESSAGES_PER_TURN` rank messages), split into messages of at most
`MAX_EVENTS_PER_MESSAGE` events; the snapshot likewise.

Groups: `serve_router` screens every OFFLOAD it reads in one turn, then handles them as one
group (`_offload_group`): one `G2Directory.reserve_many` (one fenced eviction pass) for all of
them, one `commit_many` for every batch whose copies land at once, then the ACKs. The only
difference from handling them one by one: the group's evictions all come before its commits
(so an eviction cannot see a leaf turned inner node by an earlier message of the group), and a
block claimed by an earlier message of the group is a duplicate even if that message then
loses it (a PLH twin rejected at commit): a miss. When the pool comes up short, the messages
not covered in full go one by one after the others (same drops as one by one). Any other
message first ends the pending group. `group_offloads = False` turns grouping off. Plain
packed OFFLOADs (with token ids, big enough for the batched paths) are screened lazily: they
wait, and are screened together (one numpy pass over all their items, one set of their hashes:
`_screen_packed_group`) when something else comes or the turn ends; if any item is malformed or
not new, they are screened one by one instead, in arrival order, exactly as when read.

When such a screened group is all chains stored parent first, lands at once with nothing in
flight and the pool covers it, `_land_packed` commits it straight from the group's arrays (one
`commit_screened`, the call staging each OFFLOAD would build: no per-OFFLOAD lists);
`packed_fast_path = False` stages them one by one (tests compare the two).

Cost (scripts/bench_fleet.py, scripts/callgrind_coordinator.py): per group a fixed number of
calls, each one pass over the group's arrays (C in `shmkv._g2index` when the core runs
compiled, else numpy twins): the screening (validity, repeats and chains in one
`g2.packed_screen`; the READY test, one `G2Directory.any_ready` probe pass over the shared
index), one `G2Directory.reserve_runs` (its eviction frees slots with one `release_slots`),
the PLHs of the whole group (`g2.plhs_of_columns`), one `commit_screened` (its slot checks one
`check_reserved`, its field writes one `publish_slots`) whose batches the Lineage links as
chains (`G2Lineage.insert_chains`), one index insert and one index removal call; the stores'
event columns come straight from the packed items (`_EventQueue.stored_packed`), and each
rank's G2_EVENTS header is the shared one with its "acks" spliced in. Per block the Lineage
policy (`shmkv.g2_lineage`, compiled: one insert, one evict) and its PLH. The loop runs
without automatic garbage collection (`_periodic_gc`: one `gc.collect()` per stats interval).
`Coordinator.batched = False` keeps the per-item reference path (tests compare them).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import os
import re
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from operator import attrgetter
from types import FrameType, TracebackType
from typing import Any, Final, NamedTuple, Self

import numpy as np
import numpy.typing as npt
import orjson
import zmq

from shmkv import transport as tp
from shmkv.bandwidth import BandwidthModel
from shmkv.clock import MonotonicClock
from shmkv.errors import ConfigError, InvariantError, ProtocolError
from shmkv.g2 import G2Directory, packed_screen as _packed_screen, plhs_of, plhs_of_columns
from shmkv.g2_lineage import G2Lineage
from shmkv.hashing import MAX_POSITION
from shmkv.ids import U64_MASK, DpRank, Plh, SeqHash
from shmkv.shm import FLAG_HAS_PARENT, READY, SEGMENT_PREFIX, G2Segment

logger = logging.getLogger(__name__)

BAD_MESSAGE_LIMIT: Final = 100
"""Malformed messages after which a peer identity is ignored for good."""
MAX_EVENTS_PER_MESSAGE: Final = 8192
"""G2_EVENTS messages carry at most this many events (keeps headers far below the limit)."""
MAX_MESSAGES_PER_TURN: Final = 32
"""ROUTER messages handled before the loop lands transfers and flushes events."""
MAX_IDLE_POLL_MS: Final = 1000
BATCH_MIN_BLOCKS: Final = 32
"""OFFLOAD batches (and evictions) of at least this many blocks take the numpy paths."""
_MAX_TRACKED_PEERS: Final = 4096
_SHARED_FRAME_BYTES: Final = 16 * 1024
"""Broadcasts at least this big are copied into libzmq once and shared by every send."""
_SEGMENT_NAME_RE: Final = re.compile(rf"{SEGMENT_PREFIX}([A-Za-z0-9-]+)_g2")
_NO_PARENT: Final = -1
_LITTLE_ENDIAN: Final = sys.byteorder == "little"
_PACKED_HAS_PARENT: Final = np.uint64(tp.PACKED_HAS_PARENT)
_MAX_POSITION_U64: Final = np.uint64(MAX_POSITION)
_G2_HAS_TOKENS_U64: Final = np.uint64(tp.G2_HAS_TOKENS)
_STORED_KIND: Final = bytes([tp.G2_EVENT_STORED])
assert tp.G2_HAS_PARENT == tp.PACKED_HAS_PARENT  # NOTE: `_EventQueue.stored_packed`


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorSpec:
    """Everything the coordinator process needs; travels as JSON on its command line."""

    fleet_id: str
    segment_name: str
    """Must be `shmkv.shm.segment_name(<id>)`, i.e. `shmkv_<id>_g2` (the segment is created
    from that id)."""
    num_g2_blocks: int
    block_size: int
    num_ranks: int
    endpoint: str
    """Where the ROUTER for the ranks binds (ipc:// or loopback tcp; port 0 = random)."""
    supervisor_endpoint: str
    start_monotonic_s: float
    speedup_ratio: float = 1.0
    block_size_bytes: int = 0
    bandwidth_g1_to_g2_gbps: float = 14.0
    bandwidth_g2_to_g1_gbps: float = 14.0
    offload_batch_size: int = 32
    epoch: int = 0
    """Fleet generation, written to the segment header."""
    stats_interval_s: float = 1.0
    inject_bug: str | None = None
    """Test-only: "ignore-pins" evicts pinned slots, so `shmkv stress` can prove it notices."""
    version: int = tp.PROTOCOL_VERSION

    def __post_init__(self) -> None:
        for name in ("num_g2_blocks", "block_size", "num_ranks", "offload_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"coordinator: {name} must be a positive integer, got {value!r}")
        if self.block_size_bytes < 0:
            raise ConfigError(
                f"coordinator: block_size_bytes must be >= 0, got {self.block_size_bytes}"
            )
        if math.isnan(self.speedup_ratio) or self.speedup_ratio < 0:
            raise ConfigError(f"coordinator: speedup_ratio must be >= 0, got {self.speedup_ratio}")
        if not self.stats_interval_s > 0:
            raise ConfigError(
                f"coordinator: stats_interval_s must be > 0, got {self.stats_interval_s}"
            )
        segment_fleet_id(self.segment_name)

    def to_json(self) -> str:
        data = {k: tp.encode_float(v) for k, v in asdict(self).items()}
        return orjson.dumps(data).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> CoordinatorSpec:
        """Parse a spec; raises ConfigError on anything malformed."""
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"coordinator spec is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("coordinator spec must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"coordinator spec: unknown field(s) {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for key, raw in data.items():
            value = tp.decode_float(raw)
            kind = _SPEC_KINDS[key]
            if value is None and key in _OPTIONAL_SPEC_FIELDS:
                values[key] = None
                continue
            if kind is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                value = float(value) if ok else value  # type: ignore[arg-type]
            else:
                ok = isinstance(value, kind) and not isinstance(value, bool)
            if not ok:
                raise ConfigError(f"coordinator spec: {key} must be {kind.__name__}, got {raw!r}")
            values[key] = value
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"coordinator spec: {exc}") from exc


_OPTIONAL_SPEC_FIELDS: Final = frozenset({"inject_bug"})
_SPEC_KINDS: Final[dict[str, type]] = {
    "inject_bug": str,
    "fleet_id": str,
    "segment_name": str,
    "num_g2_blocks": int,
    "block_size": int,
    "num_ranks": int,
    "endpoint": str,
    "supervisor_endpoint": str,
    "start_monotonic_s": float,
    "speedup_ratio": float,
    "block_size_bytes": int,
    "bandwidth_g1_to_g2_gbps": float,
    "bandwidth_g2_to_g1_gbps": float,
    "offload_batch_size": int,
    "epoch": int,
    "stats_interval_s": float,
    "version": int,
}


def segment_fleet_id(name: str) -> str:
    """The id `G2Segment.create` needs to make segment `name` (`shmkv_<id>_g2`).

    Raises:
        ConfigError: the name is not of that form.
    """
    match = _SEGMENT_NAME_RE.fullmatch(name)
    if match is None:
        raise ConfigError(
            f"G2 segment name {name!r} must be shmkv.shm.segment_name(<id>), i.e. "
            f"'{SEGMENT_PREFIX}<id>_g2' with <id> of [A-Za-z0-9-]"
        )
    return match.group(1)


# ---------------------------------------------------------------------------------------------
# Private bookkeeping.


class _Item(NamedTuple):
    """One accepted block: reserved in G2, copying (or copied and waiting for its parent).

    NOTE: a NamedTuple built with `_new_item` (C speed): this is the per-block hot path.
    """

    rank: DpRank
    batch: int
    idx: int
    slot: int
    seq: SeqHash
    parent: SeqHash | None
    local: int
    position: int
    plh: int
    tokens: npt.NDArray[np.uint32] | None
    """The token ids of the item's whole OFFLOAD message, one row per item (row `idx`)."""


_new_item: Final = partial(tuple.__new__, _Item)
_position_of: Final = attrgetter("position")


@dataclass(slots=True, eq=False)
class _Rank:
    """A registered rank process."""

    rank: DpRank
    epoch: int
    pid: int
    identity: bytes
    pidfd: int
    link: BandwidthModel
    waiting: deque[list[_Item]] = field(default_factory=deque)
    transfers: dict[int, list[_Item]] = field(default_factory=dict)
    done: dict[int, list[int]] = field(default_factory=dict)
    """OFFLOAD_DONE to send at the next flush: batch -> item indexes."""
    acks: list[dict[str, Any]] = field(default_factory=list)
    """OFFLOAD_ACK bodies with "done" (every accepted copy landed) to send at the next flush,
    after the events of their blocks."""


@dataclass(slots=True)
class _Stats:
    violations: int = 0
    """Failed structural checks of the G2 directory (run when quiescent, at drain)."""
    offload_messages: int = 0
    offload_items: int = 0
    accepted: int = 0
    offloaded: int = 0
    dropped: int = 0
    deduped: int = 0
    duplicates_at_commit: int = 0
    deferred: int = 0
    bad_messages: int = 0
    ignored_messages: int = 0
    stale_messages: int = 0
    hellos: int = 0
    dead_rank_cleanups: int = 0
    dead_rank_pins_released: int = 0
    dead_rank_slots_aborted: int = 0
    dead_rank_transfers_dropped: int = 0
    event_messages: int = 0
    events_sent: int = 0
    fences: int = 0


# ---------------------------------------------------------------------------------------------


class Coordinator:
    """The coordinator: one per fleet generation. Use as a context manager; `run()` until STOP.

    Owns the G2 segment (creates it; `close()` unlinks it), the ZMQ context and both sockets,
    and the pidfds of the registered ranks.
    """

    def __init__(self, spec: CoordinatorSpec, *, wakeup_fd: int | None = None) -> None:
        """Create the segment and the sockets; nothing is sent yet.

        Args:
            spec: the configuration.
            wakeup_fd: a readable fd (e.g. the read end of `signal.set_wakeup_fd`'s pipe) that
                makes the loop check `stop_requested` at once.

        Raises:
            ConfigError, CapacityError, SharedMemoryError: the segment cannot be made.
        """
        self.spec = spec
        self.clock = MonotonicClock(spec.start_monotonic_s, spec.speedup_ratio)
        self._instant = self.clock.never_sleeps
        self._block_size = spec.block_size
        self._token_bytes = 4 * spec.block_size
        self._closed = False
        self._stop = False
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._sup: zmq.Socket[bytes] | None = None
        self._directory: G2Directory | None = None
        self._segment = G2Segment.create(
            segment_fleet_id(spec.segment_name),
            capacity=spec.num_g2_blocks,
            block_size=spec.block_size,
            num_ranks=spec.num_ranks,
            epoch=spec.epoch,
        )
        try:
            self._directory = G2Directory(self._segment, G2Lineage())
            if spec.inject_bug == "ignore-pins":
                logger.warning(
                    "coordinator: --inject-bug ignore-pins: pinned slots WILL be evicted"
                )
                self._directory.ignore_pins_for_testing()
            self._ctx = zmq.Context()
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            # INVARIANT: no silent loss of G2 events or acks to a slow rank (ROUTER drops at HWM).
            self._router.setsockopt(zmq.SNDHWM, 0)
            self._router.setsockopt(zmq.RCVHWM, 0)
            tp.warn_if_exposed(spec.endpoint, "the G2 coordinator")
            self.endpoint = tp.bind_socket(self._router, spec.endpoint)
            self._sup = self._ctx.socket(zmq.DEALER)
            self._sup.setsockopt(zmq.LINGER, 1000)
            self._sup.setsockopt(zmq.IDENTITY, b"coordinator")
            self._sup.connect(spec.supervisor_endpoint)
        except BaseException:
            self.close()
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._sup, zmq.POLLIN)
        self._wakeup_fd = wakeup_fd
        if wakeup_fd is not None:
            self._poller.register(wakeup_fd, zmq.POLLIN)
        self._ranks: dict[DpRank, _Rank] = {}
        self._last_epoch: dict[DpRank, int] = {}
        self._by_identity: dict[bytes, _Rank] = {}
        self._by_pidfd: dict[int, _Rank] = {}
        self._bad_by_peer: dict[bytes, int] = {}
        self._ignored: set[bytes] = set()
        self._inflight: dict[SeqHash, _Item] = {}
        self._deferred: dict[SeqHash, list[_Item]] = {}
        self._tokenless: set[int] = set()
        """Slots whose block was offloaded without token ids (their events say so)."""
        self._out = _EventQueue(self._token_bytes)
        """G2 events for the next broadcast (with the token ids of their stores)."""
        self._next_transfer_id = 0
        self._draining = False
        self._fence_count = 0
        self.stats = _Stats()
        self.batched = True
        """Whole OFFLOAD batches through `G2Directory.commit_many` (False: the per-item
        reference path, block by block; tests compare the two)."""
        self.batch_min_blocks = BATCH_MIN_BLOCKS
        self.packed_fast_path = True
        """Groups of plain packed OFFLOADs that are all chains and land at once commit in one
        `_land_packed` (False: through `_land_group` one by one; tests compare them)."""
        self.group_offloads = True
        """`serve_router` handles the OFFLOADs it reads in one turn as one group (one
        reservation, one `commit_many`); False handles each message on its own."""
        """Batches (and evictions) smaller than this take the per-item path even when
        `batched`: numpy's fixed cost per call (~1.5 us) loses to the Python loop on a
        handful of blocks. Tests set 1 to drive the batched path with small batches."""

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def segment_name(self) -> str:
        return self._segment.name

    @property
    def directory(self) -> G2Directory:
        if self._directory is None:
            raise InvariantError("the coordinator is closed")
        return self._directory

    def request_stop(self) -> None:
        """Ask the loop to return after its current turn (signal-handler safe)."""
        self._stop = True

    def close(self) -> None:
        """Close the sockets and pidfds, unlink and unmap the segment. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._ranks.values()):
            with contextlib.suppress(OSError):
                os.close(conn.pidfd)
        self._ranks.clear()
        self._by_identity.clear()
        self._by_pidfd.clear()
        self._inflight.clear()
        self._deferred.clear()
        try:
            for sock in (self._router, self._sup):
                if sock is not None:
                    sock.close(linger=0 if sock is self._router else 500)
            if self._ctx is not None:
                self._ctx.term()
        finally:
            self._router = self._sup = None
            self._ctx = None
            try:
                self._segment.unlink()
            finally:
                if self._directory is not None:
                    self._directory.close()
                    self._directory = None
                self._segment.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Say READY to the supervisor and serve until STOP (or `request_stop`); returns 0."""
        self._send_sup(
            tp.READY,
            {
                "role": "coordinator",
                "pid": os.getpid(),
                "version": tp.PROTOCOL_VERSION,
                "segment": self._segment.name,
                "endpoint": self.endpoint,
                "epoch": self.spec.epoch,
            },
        )
        next_stats = time.monotonic() + self.spec.stats_interval_s
        with _periodic_gc():
            while not self._stop:
                next_stats = self.loop_turn(next_stats)
        return 0

    def loop_turn(self, next_stats: float) -> float:
        """One turn of `run`'s loop: wait (until a message, a death, the next transfer
        deadline or `next_stats`, the monotonic time of the next RESULTS), serve, land, flush;
        returns when the next RESULTS is due."""
        router, sup = self._router, self._sup
        assert router is not None
        assert sup is not None
        ready = dict(self._poller.poll(self._poll_timeout_ms(next_stats)))
        if self._wakeup_fd is not None and self._wakeup_fd in ready:
            with contextlib.suppress(OSError):
                os.read(self._wakeup_fd, 512)
        # INVARIANT: deaths before messages: a HELLO handled first could close a dead
        # rank's pidfd and reuse its number for the new process.
        for fd in [fd for fd in ready if isinstance(fd, int) and fd in self._by_pidfd]:
            conn = self._by_pidfd[fd]
            if _pidfd_signalled(conn.pidfd):
                self.on_rank_death(conn.rank)
        if router in ready:
            self.serve_router(MAX_MESSAGES_PER_TURN)
        if sup in ready:
            self._drain_supervisor()
        self.advance()
        self.flush()
        if self._draining:
            self._settle_for_drain()
        if time.monotonic() >= next_stats:
            self._send_sup(tp.RESULTS, self.stats_dict(include_pins=True))
            gc.collect()
            next_stats = time.monotonic() + self.spec.stats_interval_s
        return next_stats

    def _poll_timeout_ms(self, next_stats: float) -> int:
        wait_s = max(0.0, next_stats - time.monotonic())
        timeout_ms = min(float(MAX_IDLE_POLL_MS), wait_s * 1000.0)
        deadline = self.next_deadline_ms()
        if deadline is not None:
            timeout_ms = min(timeout_ms, max(0.0, self.clock.wall_ms_until(deadline)))
        if self._draining and self.is_idle():
            timeout_ms = 0.0
        return math.ceil(timeout_ms)

    def next_deadline_ms(self) -> float | None:
        """Earliest simulated time at which a transfer lands, if any is in flight."""
        best: float | None = None
        for conn in self._ranks.values():
            finish = conn.link.earliest_finish_ms()
            if finish is not None and (best is None or finish < best):
                best = finish
        return best

    def is_idle(self) -> bool:
        """No transfer in flight or waiting, no block waiting for its parent."""
        return not self._inflight and all(
            not c.transfers and not c.waiting for c in self._ranks.values()
        )

    # -- ranks' messages -------------------------------------------------------------------

    def serve_router(self, limit: int) -> int:
        """Handle up to `limit` queued ROUTER messages without blocking; returns how many."""
        router = self._router
        assert router is not None
        handled = 0
        group: list[_Offload] = []
        claimed: set[SeqHash] = _Claims()
        pending: list[tuple[bytes, _Rank, tp.Message]] = []
        """Plain packed OFFLOADs read but not screened yet (`_screen_pending`)."""
        while handled < limit:
            try:
                frames = tp.recv_message(router)
            except zmq.Again:
                break
            handled += 1
            identity = frames[0]
            if identity in self._ignored:
                self.stats.ignored_messages += 1
                continue
            # NOTE: decoding changes nothing, so it may run before the pending screening
            msg: tp.Message | None = None
            error: ProtocolError | None = None
            try:
                msg = tp.decode(frames[1:])
            except ProtocolError as exc:
                error = exc
            conn = None
            if msg is not None and msg.type == tp.OFFLOAD and self.group_offloads:
                conn = self._by_identity.get(identity)
                if conn is not None and self._is_plain_packed(msg):
                    pending.append((identity, conn, msg))
                    continue
            if pending:  # INVARIANT: screened in arrival order, before this message
                self._screen_pending(pending, group, claimed)
                if identity in self._ignored:  # an earlier message of this peer made it so
                    self.stats.ignored_messages += 1
                    continue
            try:
                if error is not None:
                    raise error
                assert msg is not None
                if conn is not None:
                    group.append(self._screen_offload(conn, msg, claimed))
                    continue
                if group:  # INVARIANT: earlier OFFLOADs are handled before any other message
                    self._offload_group(group)
                    group, claimed = [], _Claims()
                self._handle_rank_message(identity, msg)
            except ProtocolError as exc:
                self._bad_message(identity, str(exc))
        if pending:
            self._screen_pending(pending, group, claimed)
        if group:
            self._offload_group(group)
        return handled

    def _is_plain_packed(self, msg: tp.Message) -> bool:
        """Whether an OFFLOAD is packed, with token ids, and of the right shape for its item
        count (enough items for the batched paths): what `_screen_packed_group` screens."""
        body, frames = msg.body, msg.frames
        num_items = body.get("num_items")
        return (
            body.get("packed", False) is True
            and body.get("has_tokens", True) is True
            and type(body.get("batch")) is int
            and type(num_items) is int
            and self._batching(num_items)
            and num_items <= tp.MAX_PACKED_ITEMS
            and len(frames) == 2
            and len(frames[0]) == num_items * tp.PACKED_ITEM_BYTES
            and len(frames[1]) == num_items * self._token_bytes
        )

    def _screen_pending(
        self,
        pending: list[tuple[bytes, _Rank, tp.Message]],
        group: list[_Offload],
        claimed: set[SeqHash],
    ) -> None:
        """Screen the plain packed OFFLOADs of `pending` (in order) into `group`; empties it.

        All at once (`_screen_packed_group`) when every item of every one is valid and new;
        else one by one, exactly as they would have been when read.
        """
        if not pending:
            return
        screened = self._screen_packed_group(pending, claimed)
        if screened is not None:
            group.extend(screened)
        else:
            for identity, conn, msg in pending:
                if identity in self._ignored:  # an earlier message of this peer made it so
                    self.stats.ignored_messages += 1
                    continue
                try:
                    group.append(self._screen_offload(conn, msg, claimed))
                except ProtocolError as exc:
                    self._bad_message(identity, str(exc))
        pending.clear()

    def _screen_packed_group(
        self, pending: list[tuple[bytes, _Rank, tp.Message]], claimed: set[SeqHash]
    ) -> list[_Offload] | None:
        """`_screen_offload` of plain packed OFFLOADs, with one numpy pass over all their
        items; None (nothing changed) unless every item is valid (the checks of
        `transport.unpack_offload_columns`) and new (not READY, in flight, claimed, or
        repeated), i.e. unless every message would be accepted whole."""
        counts = [int(msg.body["num_items"]) for _identity, _conn, msg in pending]
        total = sum(counts)
        flat = np.frombuffer(b"".join([msg.frames[0] for _identity, _conn, msg in pending]), "<u8")
        words = flat.reshape(total, 4)
        starts = list(itertools.accumulate(counts[:-1], initial=0))
        seqs = np.ascontiguousarray(words[:, 0])
        # NOTE: validity, repeats and chains in one pass (C when compiled)
        verdict, max_position = _packed_screen(flat, starts, np.sort(seqs))
        if verdict < 0 or self.directory.any_ready(seqs):
            return None
        inflight = self._inflight
        _settle(claimed)
        if inflight or claimed:
            seq_list: list[SeqHash] = seqs.tolist()
            if (inflight and not inflight.keys().isdisjoint(seq_list)) or (
                claimed and not claimed.isdisjoint(seq_list)
            ):
                return None
        meta = words[:, 3]
        has_parent = (meta & _PACKED_HAS_PARENT) != 0
        positions_arr = (meta & _MAX_POSITION_U64).astype(np.int64)
        columns = _Columns(seqs, words[:, 1], has_parent, words[:, 2], positions_arr)
        token_bytes = b"".join([msg.frames[1] for _identity, _conn, msg in pending])
        tokens = np.frombuffer(token_bytes, dtype="<u4").reshape(total, self._block_size)
        if not _LITTLE_ENDIAN:  # pragma: no cover - little-endian hosts in practice
            tokens = tokens.astype(np.uint32)
        packed = _PackedGroup(
            columns, total, tokens, token_bytes, starts, counts, verdict == 1, meta, max_position
        )
        screened: list[_Offload] = []
        for (_identity, conn, msg), start, count in zip(pending, starts, counts, strict=True):
            # NOTE: candidates, columns and token rows are filled by `_materialized` if needed
            cand = _Candidates([], [], [], [], [])
            offload = _Offload(conn, msg.body["batch"], cand, [], None, None, packed, count, start)
            screened.append(offload)
        stats = self.stats
        stats.offload_messages += len(pending)
        stats.offload_items += total
        _claim(claimed, seqs)
        return screened

    def _bad_message(self, identity: bytes, reason: str) -> None:
        self.stats.bad_messages += 1
        count = self._bad_by_peer.get(identity, 0) + 1
        if len(self._bad_by_peer) >= _MAX_TRACKED_PEERS and identity not in self._bad_by_peer:
            self._bad_by_peer.clear()
        self._bad_by_peer[identity] = count
        if count == 1 or count % 50 == 0:
            logger.warning(
                "coordinator: malformed message #%d from %r: %s", count, identity, reason
            )
        if count >= BAD_MESSAGE_LIMIT:
            logger.warning(
                "coordinator: ignoring %r from now on (%d bad messages)", identity, count
            )
            self._ignored.add(identity)

    def _handle_rank_message(self, identity: bytes, msg: tp.Message) -> None:
        if msg.type == tp.HELLO:
            self._on_hello(identity, msg.body)
            return
        conn = self._by_identity.get(identity)
        if conn is None:
            self.stats.stale_messages += 1  # a dead or replaced rank's leftovers, or a stranger
            return
        if msg.type == tp.OFFLOAD:
            self._on_offload(conn, msg)
        elif msg.type == tp.PING:
            self._send_rank(conn, tp.PONG, {"rank": conn.rank})
        else:
            raise ProtocolError(f"unexpected message {msg.type!r} from rank {conn.rank}")

    def _on_hello(self, identity: bytes, body: dict[str, Any]) -> None:
        rank = tp.require(body, "rank", int)
        pid = tp.require(body, "pid", int)
        epoch = tp.require(body, "epoch", int)
        if not 0 <= rank < self.spec.num_ranks:
            raise ProtocolError(f"HELLO: rank {rank} outside 0..{self.spec.num_ranks - 1}")
        if pid <= 0 or epoch < 0:
            raise ProtocolError(f"HELLO: bad pid {pid} or epoch {epoch}")
        self.stats.hellos += 1
        if epoch < self._last_epoch.get(rank, 0):
            self.stats.stale_messages += 1  # an older process of this rank: already replaced
            return
        other = self._by_identity.get(identity)
        if other is not None and other.rank != rank:
            raise ProtocolError(
                f"HELLO: identity {identity!r} already belongs to rank {other.rank}"
            )
        old = self._ranks.get(rank)
        if old is not None:
            if epoch == old.epoch:
                raise ProtocolError(f"HELLO: rank {rank} epoch {epoch} is already registered")
            if not _pidfd_signalled(old.pidfd):
                logger.warning(
                    "coordinator: rank %d epoch %d says hello while epoch %d (pid %d) still "
                    "runs; treating the old one as dead",
                    rank,
                    epoch,
                    old.epoch,
                    old.pid,
                )
            # A newer epoch: the old registration ends here.
            self.on_rank_death(rank)
        self._last_epoch[rank] = epoch
        # INVARIANT: events already applied to the directory go out before the snapshot, so
        # the new rank sees every change exactly once (in the snapshot, or after it).
        self.flush()
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            logger.warning("coordinator: rank %d (pid %d) died before its hello", rank, pid)
            self.directory.remove_dead_rank(rank)
            self.stats.dead_rank_cleanups += 1
            return
        except OSError as exc:
            raise ProtocolError(f"HELLO: cannot watch pid {pid}: {exc}") from exc
        link_gbps = 0.0 if self._instant else self.spec.bandwidth_g1_to_g2_gbps
        conn = _Rank(rank, epoch, pid, identity, pidfd, BandwidthModel(link_gbps))
        self._ranks[rank] = conn
        self._by_identity[identity] = conn
        self._by_pidfd[pidfd] = conn
        self._poller.register(pidfd, zmq.POLLIN)
        self._bad_by_peer.pop(identity, None)
        self._send_rank(
            conn,
            tp.WELCOME,
            {"segment": self._segment.name, "num_ranks": self.spec.num_ranks, "epoch": epoch},
        )
        self._send_snapshot(conn)

    def _send_snapshot(self, conn: _Rank) -> None:
        """Every READY block as a store, parent first (ascending position)."""
        seg = self._segment
        ready = np.flatnonzero(seg.state == READY)
        if ready.size == 0:
            return
        slots = ready[np.argsort(seg.position[ready], kind="stable")]
        has_tokens = np.ones(slots.size, dtype=bool)
        if self._tokenless:
            has_tokens[np.isin(slots, np.fromiter(self._tokenless, dtype=np.intp))] = False
        for start in range(0, int(slots.size), MAX_EVENTS_PER_MESSAGE):
            part = slots[start : start + MAX_EVENTS_PER_MESSAGE]
            queue = _EventQueue(self._token_bytes)
            queue.stored(
                seg.seq_hash[part],
                seg.parent_hash[part],
                (seg.flags[part] & FLAG_HAS_PARENT) != 0,
                seg.local_hash[part],
                seg.position[part],
                seg.tokens[part].astype("<u4", copy=False).tobytes(),
                has_tokens[start : start + MAX_EVENTS_PER_MESSAGE],
            )
            self._send_raw(conn, queue.message(0, len(queue)))
            self.stats.event_messages += 1
            self.stats.events_sent += len(queue)

    def _on_offload(self, conn: _Rank, msg: tp.Message) -> None:
        self._offload_group([self._screen_offload(conn, msg, None)])

    def _screen_offload(
        self, conn: _Rank, msg: tp.Message, claimed: set[SeqHash] | None
    ) -> _Offload:
        """Validate and dedup one OFFLOAD (ProtocolError, after an all-rejected ACK, if it is
        malformed); `claimed` holds the blocks taken by earlier OFFLOADs of the same group,
        and gets this one's."""
        _settle(claimed)
        body = msg.body
        batch = tp.require(body, "batch", int)
        packed = body.get("packed", False) is True
        if packed:
            num_items = tp.require(body, "num_items", int)
            if not 0 <= num_items <= tp.MAX_PACKED_ITEMS:
                raise ProtocolError(f"OFFLOAD: num_items {num_items} out of range")
        else:
            raw_items = tp.require(body, "items", list)
            num_items = len(raw_items)
        try:
            if packed:
                if not msg.frames:
                    raise ProtocolError("OFFLOAD: packed without an items frame")
                columns: _Columns | None = tp.unpack_offload_columns(num_items, msg.frames[0])
                assert columns is not None
                token_rows = self._parse_tokens(num_items, body, msg.frames[1:])
                cand, rejected, seq_set = self._screen_columns(_column_lists(columns), claimed)
                if rejected or not self._batching(num_items):
                    columns = None
            else:
                columns = None
                token_rows = self._parse_tokens(num_items, body, msg.frames)
                cand, rejected = self._screen(raw_items, claimed)
                seq_set = None
        except ProtocolError as exc:
            # The rank waits for this batch: tell it nothing was taken, then count the error.
            self._send_rank(
                conn,
                tp.OFFLOAD_ACK,
                {
                    "batch": batch,
                    "accepted": [],
                    "rejected": list(range(num_items)),
                    "deadline_ms": "inf",
                    "error": str(exc)[:200],
                },
            )
            raise
        stats = self.stats
        stats.offload_messages += 1
        stats.offload_items += num_items
        stats.deduped += len(rejected)
        if claimed is not None:
            claimed.update(cand.seqs if seq_set is None else seq_set)
        return _Offload(conn, batch, cand, rejected, token_rows, columns)

    def _offload_group(self, group: list[_Offload]) -> None:
        """Reserve for every screened OFFLOAD of `group` at once (one eviction pass), land or
        queue their copies in arrival order, then ACK each.

        A group of one is exactly the per-message handling. A larger group differs from its
        messages handled one by one only in that every reservation (and so every eviction)
        comes before the group's first commit: an eviction cannot see a leaf turned inner
        node by an earlier message's commit. When the pool comes up short (everything else
        pinned), the messages the reservation does not cover in full give their slots back
        and go one by one after the others, so that they can evict the group's own blocks,
        as they would have one by one (a short pool drops what one-by-one handling drops).
        """
        packed = group[0].packed if group else None
        fast = packed is not None and self._packed_fast_path(group, packed)
        if not fast:
            group = [self._materialized(entry) for entry in group]
        wanted = [entry.num_packed if fast else len(entry.cand.idxs) for entry in group]
        total = sum(wanted)
        slot_arr, owners = self._reserve_for(group, wanted, total, self._batching(total))
        if fast and packed is not None:
            if len(slot_arr) == total:
                self._queue_evictions()
                self._land_packed(group, packed, slot_arr, owners)
                return
            group = [self._materialized(entry) for entry in group]
        slots: list[int] = slot_arr.tolist()
        covered = len(group)
        if len(slots) < total and len(group) > 1:
            covered, kept = 0, 0
            while kept + wanted[covered] <= len(slots):
                kept += wanted[covered]
                covered += 1
            directory = self.directory
            for slot in reversed(slots[kept:]):  # NOTE: reversed: the free stack pops in order
                directory.abort(slot)
            del slots[kept:]
            slot_arr = slot_arr[:kept]
        self._queue_evictions()
        self._land_group(group[:covered], wanted[:covered], slots, slot_arr)
        for entry in group[covered:]:
            self._offload_group([entry])

    def _packed_fast_path(self, group: list[_Offload], packed: _PackedGroup) -> bool:
        """Whether `_land_packed` handles `group` exactly as `_land_group` would (when the
        pool covers it): the group is one `_PackedGroup`'s OFFLOADs, all chains stored parent
        first, whose copies land at once with nothing in flight, and no two with the same
        (rank, batch) or with OFFLOAD_DONEs still owed for their batch."""
        if not (
            self.packed_fast_path
            and packed.chains
            and self._instant
            and len(group) == len(packed.starts)
            and not self._inflight
            and not self._deferred
            and self._batching(packed.total)
        ):
            return False
        keys = set()
        for entry in group:
            if entry.packed is not packed or entry.batch in entry.conn.done:
                return False
            keys.add((entry.conn.rank, entry.batch))
        return len(keys) == len(group)

    def _materialized(self, entry: _Offload) -> _Offload:
        """`entry` with its candidates as lists, its columns and token rows (what
        `_screen_offload` gives)."""
        packed = entry.packed
        if packed is None:
            return entry
        start, stop = entry.packed_start, entry.packed_start + entry.num_packed
        cols = packed.columns
        columns = _Columns(
            cols.seqs[start:stop],
            cols.parents[start:stop],
            cols.has_parent[start:stop],
            cols.locals[start:stop],
            cols.positions[start:stop],
        )
        seqs, parents, locals_, positions = _column_lists(columns)
        cand = _Candidates(list(range(entry.num_packed)), seqs, parents, locals_, positions)
        return entry._replace(
            cand=cand,
            token_rows=packed.tokens[start:stop],
            columns=columns,
            packed=None,
            num_packed=0,
            packed_start=0,
        )

    def _land_packed(
        self,
        group: list[_Offload],
        packed: _PackedGroup,
        slot_arr: npt.NDArray[np.intp],
        owners: npt.NDArray[np.int64] | None,
    ) -> None:
        """`_land_group` of a group `_packed_fast_path` accepts, every block with a slot:
        one `commit_screened` of the whole group's columns (the same call, with the same
        arguments, that staging every OFFLOAD with `_stage_batch` builds), the stores queued,
        then each OFFLOAD's ACK (done) for the next flush. `owners`: each block's rank (as
        `_reserve_for` gave them), if known."""
        total = packed.total
        self.stats.accepted += total
        now = self.clock.now_ms()
        cols = packed.columns
        max_position = packed.max_position
        plhs = plhs_of_columns(cols.seqs, cols.parents, cols.positions, max_position=max_position)
        if owners is None:
            owners = np.repeat(
                np.array([entry.conn.rank for entry in group], dtype=np.int64), packed.counts
            )
        committed = self.directory.commit_screened(
            slot_arr, cols.seqs, cols.parents, cols.has_parent, cols.locals, cols.positions,
            packed.tokens, owners, plhs, chain_starts=packed.starts, max_position=max_position,
        )  # fmt: skip
        if committed.count(True) == total:
            self.stats.offloaded += total
            if self._tokenless:
                self._tokenless.difference_update(slot_arr.tolist())
            self._out.stored_packed(
                cols.seqs, cols.parents, cols.locals, packed.meta, packed.token_bytes
            )
        else:
            self._queue_stores(committed, slot_arr.tolist(), cols, packed.tokens)
        deadline = tp.encode_float(now)
        for entry, count in zip(group, packed.counts, strict=True):
            body = {
                "batch": entry.batch,
                "accepted": _every_item(count),
                "rejected": [],
                "deadline_ms": deadline,
                "done": True,
            }
            entry.conn.acks.append(body)

    def _land_group(
        self,
        group: list[_Offload],
        wanted: list[int],
        slots: list[int],
        slot_arr: npt.NDArray[np.intp],
    ) -> None:
        """Hand out `slots` (`slot_arr`: the same as an array) in order, drop what they do not
        cover, land or queue the copies, then ACK every OFFLOAD of `group`."""
        stats = self.stats
        stats.accepted += len(slots)
        batching = self._batching(len(slots))
        now = self.clock.now_ms() if slots else math.inf
        deadlines: list[float] = []
        staged = _Staged()
        offset = 0
        group_plhs = _group_plhs(group) if batching else None
        plh_offset = 0
        for entry, want in zip(group, wanted, strict=True):
            got = slots[offset : offset + want]
            got_arr = slot_arr[offset : offset + want]
            offset += len(got)
            cand = entry.cand
            if len(got) < want:
                stats.dropped += want - len(got)
                entry.rejected.extend(cand.idxs[len(got) :])
                entry.rejected.sort()
                cand.truncate(len(got))
                entry = entry._replace(columns=None)
            plhs = None
            if group_plhs is not None:
                plhs = group_plhs[plh_offset : plh_offset + len(got)]
                plh_offset += want
            deadlines.append(self._land_or_queue(entry, got, got_arr, plhs, now, batching, staged))
        self._commit_staged(staged)
        for entry, deadline in zip(group, deadlines, strict=True):
            conn, accepted = entry.conn, entry.cand.idxs
            body = {
                "batch": entry.batch,
                "accepted": accepted,
                "rejected": entry.rejected,
                "deadline_ms": tp.encode_float(deadline),
            }
            if self._instant and len(conn.done.get(entry.batch, ())) == len(accepted):
                # Every accepted copy landed already: the ACK says so (no OFFLOAD_DONE), and
                # goes out after the events of those blocks, where the DONE would have.
                conn.done.pop(entry.batch, None)
                body["done"] = True
                conn.acks.append(body)
            else:
                self._send_rank(conn, tp.OFFLOAD_ACK, body)

    def _reserve_for(
        self, group: list[_Offload], wanted: list[int], total: int, batching: bool
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64] | None]:
        """Slots for the group's candidates, in order (the first ones when the pool is short),
        and (batched) the rank of each candidate."""
        if total == 0:
            return np.zeros(0, dtype=np.intp), None
        directory = self.directory
        if batching:
            return directory.reserve_runs([entry.conn.rank for entry in group], wanted)
        if len(group) == 1:
            got = directory.reserve(total, group[0].conn.rank, vectorized=False)
            return np.array(got, dtype=np.intp), None
        slots: list[int] = []
        for entry, want in zip(group, wanted, strict=True):
            got = directory.reserve(want, entry.conn.rank, vectorized=False) if want else []
            slots += got
            if len(got) < want:
                break  # the pool is short: later entries get nothing
        return np.array(slots, dtype=np.intp), None

    def _land_or_queue(
        self,
        entry: _Offload,
        slots: list[int],
        slot_arr: npt.NDArray[np.intp],
        plhs: list[Plh] | None,
        now: float,
        batching: bool,
        staged: _Staged,
    ) -> float:
        """Commit (or stage for one `commit_many`) or queue the accepted items of one OFFLOAD
        (`plhs`: theirs, if the caller has them); returns the ACK's deadline."""
        if not slots:
            return math.inf
        cand, conn = entry.cand, entry.conn
        if plhs is None:
            plhs = plhs_of(cand.seqs, cand.parents, cand.positions)
        if not self._instant:
            items = self._track_items(conn.rank, entry.batch, cand, slots, plhs, entry.token_rows)
            return self._queue_transfers(conn, items, now)
        if (
            batching
            and not self._inflight
            and not self._deferred
            and self._stage_batch(entry, slots, slot_arr, plhs, staged)
        ):
            # Copies land at once and nothing else is in flight: committed with the group.
            return now
        self._commit_staged(staged)  # INVARIANT: commits keep arrival order
        # Copies land at once: no link, no chunks; parents first within the batch.
        items = self._track_items(conn.rank, entry.batch, cand, slots, plhs, entry.token_rows)
        self._land_chunk(conn, items)
        return now

    def _track_items(
        self,
        rank: int,
        batch: int,
        cand: _Candidates,
        slots: list[int],
        plhs: list[int],
        token_rows: npt.NDArray[np.uint32] | None,
    ) -> list[_Item]:
        """The accepted candidates as in-flight items (one per reserved slot), now tracked."""
        items = [
            _new_item((rank, batch, i, slot, seq, parent, local, pos, plh, token_rows))
            for i, slot, seq, parent, local, pos, plh in zip(
                cand.idxs,
                slots,
                cand.seqs,
                cand.parents,
                cand.locals,
                cand.positions,
                plhs,
                strict=True,
            )
        ]
        self._inflight.update(zip(cand.seqs, items, strict=True))
        return items

    def _stage_batch(
        self,
        entry: _Offload,
        slots: list[int],
        slot_arr: npt.NDArray[np.intp],
        plhs: list[int],
        staged: _Staged,
    ) -> bool:
        """Stage a whole accepted batch whose copies landed at once (nothing else in flight)
        for `_commit_staged`: what `_land_chunk` does item by item, in one `commit_screened`.

        False (nothing staged) when a block's parent comes later in the batch (it would wait
        for it: the per-item path)."""
        cand = entry.cand
        chain = _is_chain(cand.seqs, cand.parents, cand.positions)  # NOTE: the usual batch
        order = None if chain else _position_order(cand.positions)
        seqs = cand.seqs if order is None else [cand.seqs[k] for k in order]
        parents = cand.parents if order is None else [cand.parents[k] for k in order]
        if chain:  # parents first unless the first block's parent comes later
            if parents[0] is not None and parents[0] in seqs[1:]:
                return False
        elif not _parents_come_first(seqs, parents):
            return False
        rows = cand.idxs
        columns = entry.columns
        if order is not None:
            rows = [rows[k] for k in order]
            slots = [slots[k] for k in order]
            slot_arr = np.array(slots, dtype=np.intp)
            plhs = [plhs[k] for k in order]
            columns = None
        if columns is None:  # NOTE: lists (JSON items, a reordered or partial batch)
            locals_ = cand.locals if order is None else [cand.locals[k] for k in order]
            positions = cand.positions if order is None else [cand.positions[k] for k in order]
            columns = _columns_of(seqs, parents, locals_, positions)
        token_rows = entry.token_rows
        if staged.seq_list and staged.has_tokens != (token_rows is not None):
            self._commit_staged(staged)  # NOTE: one token source per commit
        staged.has_tokens = token_rows is not None
        if staged.chained:
            if chain:
                staged.chain_starts.append(len(staged.seq_list))
            else:
                staged.chained = False
        if token_rows is not None:
            whole = order is None and len(rows) == len(token_rows)  # rows: 0..n-1 then
            staged.tokens.append(token_rows if whole else token_rows[rows])
        staged.owners.append((entry.conn.rank, len(slots)))
        staged.slots += slots
        staged.slot_arrays.append(slot_arr)
        staged.columns.append(columns)
        staged.plhs += plhs
        staged.seq_list += seqs
        entry.conn.done.setdefault(entry.batch, []).extend(rows)
        return True

    def _commit_staged(self, staged: _Staged) -> None:
        """Commit what `_stage_batch` staged (one `commit_screened`) and empty `staged`."""
        if not staged.seq_list:
            return
        parts = staged.columns
        if len(parts) == 1:
            seqs, parents, has_parent, locals_, positions = parts[0]
        else:
            seqs, parents, has_parent, locals_, positions = (
                np.concatenate(column) for column in zip(*parts, strict=True)
            )
        tokens: npt.NDArray[np.uint32] | None = None
        if staged.has_tokens:
            token_parts = staged.tokens
            tokens = token_parts[0] if len(token_parts) == 1 else np.concatenate(token_parts)
        owner_parts = staged.owners
        owners: DpRank | npt.NDArray[np.int64] = owner_parts[0][0]
        if any(rank != owners for rank, _count in owner_parts):
            owners = np.repeat(
                np.array([rank for rank, _ in owner_parts], dtype=np.int64),
                [count for _, count in owner_parts],
            )
        slots = staged.slots
        slot_parts = staged.slot_arrays
        committed = self.directory.commit_screened(
            slot_parts[0] if len(slot_parts) == 1 else np.concatenate(slot_parts),
            seqs,
            parents,
            has_parent,
            locals_,
            positions,
            tokens,
            owners,
            staged.plhs,
            staged.seq_list,
            chain_starts=staged.chain_starts if staged.chained else None,
        )
        columns = _Columns(seqs, parents, has_parent, locals_, positions)
        self._queue_stores(committed, slots, columns, tokens)
        staged.clear()

    def _commit_columns(
        self,
        rank: DpRank | list[DpRank],
        slots: list[int],
        seqs: list[SeqHash],
        parents: list[SeqHash | None],
        locals_: list[int],
        positions: list[int],
        plhs: list[int],
        tokens: npt.NDArray[np.uint32] | None,
    ) -> None:
        """Commit landed blocks in order (`G2Directory.commit_many`) and queue their events."""
        committed = self.directory.commit_many(
            slots, seqs, parents, locals_, positions, tokens, rank, plhs=plhs
        )
        self._queue_stores(committed, slots, _columns_of(seqs, parents, locals_, positions), tokens)

    def _queue_stores(
        self,
        committed: list[bool],
        slots: list[int],
        columns: _Columns,
        tokens: npt.NDArray[np.uint32] | None,
    ) -> None:
        """Queue the "S" events of the committed blocks (in order); count the duplicates."""
        if not all(committed):
            keep = [k for k, ok in enumerate(committed) if ok]
            self.stats.duplicates_at_commit += len(committed) - len(keep)
            rows = np.array(keep, dtype=np.intp)
            columns = _Columns(
                columns.seqs[rows],
                columns.parents[rows],
                columns.has_parent[rows],
                columns.locals[rows],
                columns.positions[rows],
            )
            slots = [slots[k] for k in keep]
            if tokens is not None:
                tokens = tokens[rows]
        count = len(slots)
        if not count:
            return
        self.stats.offloaded += count
        if tokens is None:
            self._tokenless.update(slots)
            token_bytes = bytes(self._token_bytes * count)
        else:
            if self._tokenless:
                self._tokenless.difference_update(slots)
            token_bytes = _token_bytes(tokens)
        self._out.stored(*columns, token_bytes, tokens is not None)

    def _screen(
        self, raw_items: list[Any], claimed: set[SeqHash] | None = None
    ) -> tuple[_Candidates, list[int]]:
        """Validate every item (ProtocolError before any change) and dedup: READY in G2, in
        flight from any rank, taken by an earlier OFFLOAD of the group (`claimed`), or twice
        in this batch. Returns (candidates, rejected).

        Whole columns at once; only a batch that fails a check (or has a duplicate) goes
        item by item, which also finds the offending item for the error."""
        count = len(raw_items)
        if count == 0:
            return _Candidates([], [], [], [], []), []
        columns = _item_columns(raw_items) if self._batching(count) else None
        if columns is None:
            return self._screen_items(raw_items, claimed)
        seqs, parents, locals_, positions = columns
        inflight, ready = self._inflight, self.directory.ready_seqs
        if (
            len(set(seqs)) != count
            or not ready.isdisjoint(seqs)
            or (inflight and not inflight.keys().isdisjoint(seqs))
            or (claimed and not claimed.isdisjoint(seqs))
        ):
            return self._screen_items(raw_items, claimed)
        return (
            _Candidates(
                list(range(count)),
                list(seqs),
                [None if parent == _NO_PARENT else parent for parent in parents],
                list(locals_),
                list(positions),
            ),
            [],
        )

    def _screen_columns(
        self,
        columns: tuple[list[int], list[int | None], list[int], list[int]],
        claimed: set[SeqHash] | None,
    ) -> tuple[_Candidates, list[int], set[SeqHash] | None]:
        """`_screen` of items validated already (a packed OFFLOAD's columns); also returns
        the set of the sequence hashes when every item passed (hashed once, reused)."""
        seqs, parents, locals_, positions = columns
        count = len(seqs)
        inflight, ready = self._inflight, self.directory.ready_seqs
        seq_set = set(seqs) if self._batching(count) else None
        if (
            seq_set is None
            or len(seq_set) != count
            or not ready.isdisjoint(seq_set)
            or (inflight and not inflight.keys().isdisjoint(seq_set))
            or (claimed and not claimed.isdisjoint(seq_set))
        ):
            raw_items = [
                [seq, _NO_PARENT if parent is None else parent, local, pos]
                for seq, parent, local, pos in zip(seqs, parents, locals_, positions, strict=True)
            ]
            cand, rejected = self._screen_items(raw_items, claimed)
            return cand, rejected, None
        return _Candidates(list(range(count)), seqs, parents, locals_, positions), [], seq_set

    def _screen_items(
        self, raw_items: list[Any], claimed: set[SeqHash] | None = None
    ) -> tuple[_Candidates, list[int]]:
        """`_screen` item by item (the reference path)."""
        inflight, ready = self._inflight, self.directory.ready_seqs
        seen: set[SeqHash] = set() if claimed is None else set(claimed)
        cand = _Candidates([], [], [], [], [])
        rejected: list[int] = []
        mask, max_pos = U64_MASK, MAX_POSITION
        for i, entry in enumerate(raw_items):
            if type(entry) is not list or len(entry) != 4:
                raise ProtocolError("OFFLOAD: each item is [seq, parent|-1, local, position]")
            seq, parent, local, pos = entry
            if (
                type(seq) is not int
                or type(parent) is not int
                or type(local) is not int
                or type(pos) is not int
                or not 0 <= seq <= mask
                or not 0 <= local <= mask
                or not -1 <= parent <= mask
                or not 0 <= pos <= max_pos
            ):
                raise ProtocolError(f"OFFLOAD: bad item {entry!r:.120}")
            if seq in inflight or seq in ready or seq in seen:
                rejected.append(i)
            else:
                seen.add(seq)
                cand.idxs.append(i)
                cand.seqs.append(seq)
                cand.parents.append(None if parent == _NO_PARENT else parent)
                cand.locals.append(local)
                cand.positions.append(pos)
        return cand, rejected

    def _parse_tokens(
        self, num_items: int, body: dict[str, Any], frames: tuple[bytes, ...]
    ) -> npt.NDArray[np.uint32] | None:
        """The token ids of an OFFLOAD, one row per item (a read-only view of the frame)."""
        has_tokens = body.get("has_tokens", True)
        if not isinstance(has_tokens, bool):
            raise ProtocolError("OFFLOAD: has_tokens must be a bool")
        if not has_tokens:
            if frames:
                raise ProtocolError("OFFLOAD: token frame sent with has_tokens false")
            return None
        expected = num_items * self._token_bytes
        if len(frames) != 1 or len(frames[0]) != expected:
            got = [len(f) for f in frames]
            raise ProtocolError(f"OFFLOAD: one token frame of {expected} bytes expected, got {got}")
        rows = np.frombuffer(frames[0], dtype="<u4").reshape(num_items, self._block_size)
        return rows if _LITTLE_ENDIAN else rows.astype(np.uint32)

    # -- transfers -------------------------------------------------------------------------

    def advance(self) -> None:
        """Land every transfer whose simulated deadline has passed; start queued ones."""
        if not self._ranks:
            return
        now = self.clock.now_ms()
        for conn in list(self._ranks.values()):
            if conn.transfers or conn.waiting:
                self._advance_rank(conn, now)
                self._start_waiting(conn, now)

    def _queue_transfers(self, conn: _Rank, items: list[_Item], now: float) -> float:
        """Queue accepted items in chunks of `offload_batch_size` on the rank's link; returns
        when the first chunk should land."""
        self._advance_rank(conn, now)
        size = self.spec.offload_batch_size
        for start in range(0, len(items), size):
            conn.waiting.append(items[start : start + size])
        first_id = self._next_transfer_id
        self._start_waiting(conn, now)
        if first_id in conn.transfers:
            return conn.link.deadline_ms(first_id)
        finish = conn.link.earliest_finish_ms()
        return now if finish is None else finish

    def _advance_rank(self, conn: _Rank, now: float) -> None:
        for transfer_id in conn.link.advance_to(now):
            self._land_chunk(conn, conn.transfers.pop(transfer_id))

    def _batching(self, num_blocks: int) -> bool:
        """Whether a batch of `num_blocks` takes the batched (numpy) path."""
        return self.batched and num_blocks >= self.batch_min_blocks

    def _land_chunk(self, conn: _Rank, chunk: list[_Item]) -> None:
        """A transfer finished: commit its blocks (parents first) and owe the rank a DONE."""
        if not chunk:
            return
        chunk.sort(key=_position_of)  # NOTE: stable; O(n) on the usual leaf-first order
        inflight = self._inflight
        if self._batching(len(chunk)) and not self._deferred and self._chunk_lands_in_order(chunk):
            # Nothing waits on anything: one commit_many, same outcome as item by item.
            for item in chunk:
                del inflight[item.seq]
            self._commit_items(chunk)
            conn.done.setdefault(chunk[0].batch, []).extend([item.idx for item in chunk])
            return
        for item in chunk:
            parent = item.parent
            if parent is not None and parent in inflight and parent != item.seq:
                self._land(item)  # waits for its parent (the slow path)
            else:
                self._commit(item)
                if self._deferred:
                    self._land_children(item.seq)
        conn.done.setdefault(chunk[0].batch, []).extend([item.idx for item in chunk])

    def _start_waiting(self, conn: _Rank, now: float) -> None:
        limit = self.spec.offload_batch_size
        nbytes = self.spec.block_size_bytes
        while conn.waiting and len(conn.transfers) < limit:
            chunk = conn.waiting.popleft()
            transfer_id = self._next_transfer_id
            self._next_transfer_id += 1
            conn.transfers[transfer_id] = chunk
            conn.link.start(now, len(chunk) * nbytes, transfer_id)

    def _land(self, first: _Item) -> None:
        """Commit a copied block, unless its parent is still in flight; then its waiting
        children (iteratively: chains may be long)."""
        stack = [first]
        inflight, deferred = self._inflight, self._deferred
        while stack:
            item = stack.pop()
            parent = item.parent
            if parent is not None and parent != item.seq and parent in inflight:
                deferred.setdefault(parent, []).append(item)
                self.stats.deferred += 1
                continue
            self._commit(item)
            children = deferred.pop(item.seq, None)
            if children:
                stack.extend(reversed(children))

    def _land_children(self, seq: SeqHash) -> None:
        children = self._deferred.pop(seq, None)
        if children:
            for child in children:
                self._land(child)

    def _chunk_lands_in_order(self, chunk: list[_Item]) -> bool:
        """Whether no block of a (position-sorted) chunk waits for its parent: every parent
        still in flight is an earlier block of the chunk (or the block itself)."""
        inflight = self._inflight
        if not any(item.parent in inflight for item in chunk):
            return True
        seqs = [item.seq for item in chunk]
        parents = [item.parent for item in chunk]
        if not _parents_come_first(seqs, parents):
            return False
        earlier = dict(zip(seqs, range(len(seqs)), strict=True))
        return all(
            parent is None or parent not in inflight or parent in earlier for parent in parents
        )

    def _commit_items(self, items: list[_Item]) -> None:
        """Commit landed items in order (their in-flight entries are gone already)."""
        ranks = {item.rank for item in items}
        sources = {id(item.tokens) for item in items}
        if len(ranks) != 1 or len(sources) != 1:
            for item in items:  # NOTE: mixed ranks or messages: the per-item path
                self._inflight[item.seq] = item
                self._commit(item)
            return
        (_r, _b, idxs, slots, seqs, parents, locals_, positions, plhs, _t) = (
            list(column) for column in zip(*items, strict=True)
        )
        token_rows = items[0].tokens
        tokens = None if token_rows is None else token_rows[idxs]
        self._commit_columns(items[0].rank, slots, seqs, parents, locals_, positions, plhs, tokens)

    def _commit(self, item: _Item) -> None:
        rank, _batch, index, slot, seq, parent, local, position, plh, token_rows = item
        del self._inflight[seq]
        assert self._directory is not None
        tokens = None if token_rows is None else token_rows[index]
        if not self._directory.commit(slot, seq, parent, local, position, tokens, rank, plh=plh):
            self.stats.duplicates_at_commit += 1
            return
        self.stats.offloaded += 1
        if tokens is not None:
            if self._tokenless:
                self._tokenless.discard(slot)
            self._out.stored_one(seq, parent, local, position, _token_bytes(tokens))
        else:
            self._tokenless.add(slot)
            self._out.stored_one(seq, parent, local, position, None)

    def _queue_evictions(self) -> None:
        evicted = self.directory.take_evicted_array()
        if evicted.size:
            self._out.removed(evicted)

    # -- outgoing --------------------------------------------------------------------------

    def flush(self) -> None:
        """Broadcast queued G2 events to every live rank, each rank's ACKs that say "done"
        folded into (the last of) its G2_EVENTS (a G2_EVENTS of no events when nothing else
        is queued: one message per rank and flush), then send the OFFLOAD_DONEs."""
        self._queue_evictions()
        events, self._out = self._out, _EventQueue(self._token_bytes)
        self._broadcast_events(events)
        for conn in self._ranks.values():
            if conn.done:
                done, conn.done = conn.done, {}
                for batch, indexes in done.items():
                    self._send_rank(conn, tp.OFFLOAD_DONE, {"batch": batch, "items": indexes})

    def _broadcast_events(self, events: _EventQueue) -> None:
        """Send events (packed G2_EVENTS, with the token ids of their stores) to every live
        rank, in messages of at most `MAX_EVENTS_PER_MESSAGE` events; a rank's queued ACKs
        ride in the header of the last one (`"acks"`), so they follow every event."""
        targets = list(self._ranks.values())
        count = len(events)
        if not count:
            for conn in targets:
                if conn.acks:
                    self._send_raw(conn, [_with_acks(_NO_EVENTS_HEADER, conn)])
            return
        for start in range(0, count, MAX_EVENTS_PER_MESSAGE):
            stop = min(count, start + MAX_EVENTS_PER_MESSAGE)
            body, payload = events.parts(start, stop)
            header = tp.encode(tp.G2_EVENTS, body)[0]
            message: list[bytes | zmq.Frame] = [header, *payload]
            if len(targets) > 1 and sum(map(len, payload)) >= _SHARED_FRAME_BYTES:
                # NOTE: one copy into libzmq (copy=True: no zero-copy tracking thread),
                # shared (refcounted) by every rank's send
                message = [header, *(zmq.Frame(part, copy=True) for part in payload)]
            last = stop == count
            for conn in targets:
                if last and conn.acks:
                    self._send_raw(conn, [_with_acks(header, conn), *message[1:]])
                else:
                    self._send_raw(conn, message)
            self.stats.event_messages += 1
            self.stats.events_sent += stop - start

    def _send_rank(
        self,
        conn: _Rank,
        msg_type: str,
        body: dict[str, Any] | None = None,
        frames: tuple[bytes, ...] = (),
    ) -> None:
        self._send_raw(conn, tp.encode(msg_type, body, frames))

    def _send_raw(self, conn: _Rank, frames: Sequence[bytes | zmq.Frame]) -> None:
        """Send one message; `zmq.Frame` parts are sent without a copy (shared)."""
        router = self._router
        assert router is not None
        try:
            tp.send_frames(router, [conn.identity, *frames])
        except zmq.ZMQError as exc:  # pragma: no cover - HWM 0 and no ROUTER_MANDATORY
            logger.warning("coordinator: cannot send to rank %d: %s", conn.rank, exc)

    def _send_sup(self, msg_type: str, body: dict[str, Any] | None = None) -> None:
        sup = self._sup
        assert sup is not None
        try:
            sup.send_multipart(tp.encode(msg_type, body), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("coordinator: the supervisor is not reading; %s dropped", msg_type)

    # -- rank death ------------------------------------------------------------------------

    def on_rank_death(self, rank: DpRank) -> None:
        """Forget a rank whose process is gone: pins, reservations, transfers, identity."""
        conn = self._ranks.pop(rank, None)
        if conn is None:
            return
        del self._by_identity[conn.identity]
        del self._by_pidfd[conn.pidfd]
        with contextlib.suppress(KeyError):
            self._poller.unregister(conn.pidfd)
        with contextlib.suppress(OSError):
            os.close(conn.pidfd)
        # Its items: in transfers, queued, or copied and waiting for a parent.
        mine = [item for item in self._inflight.values() if item.rank == rank]
        for item in mine:
            del self._inflight[item.seq]
        for parent, waiting in list(self._deferred.items()):
            kept = [item for item in waiting if item.rank != rank]
            if len(kept) != len(waiting):
                if kept:
                    self._deferred[parent] = kept
                else:
                    del self._deferred[parent]
        cleanup = self.directory.remove_dead_rank(rank)
        stats = self.stats
        stats.dead_rank_cleanups += 1
        stats.dead_rank_pins_released += cleanup.pins_released
        stats.dead_rank_slots_aborted += cleanup.slots_aborted
        stats.dead_rank_transfers_dropped += len(mine)
        if cleanup.slots_aborted != len(mine):
            logger.warning(
                "coordinator: rank %d held %d reservations, %d tracked in flight",
                rank,
                cleanup.slots_aborted,
                len(mine),
            )
        # Blocks of other ranks that waited for one of its blocks land now (parent gone).
        for item in mine:
            for child in self._deferred.pop(item.seq, ()):
                self._land(child)
        logger.info(
            "coordinator: rank %d (pid %d, epoch %d) gone: %d pins released, %d reservations "
            "aborted",
            rank,
            conn.pid,
            conn.epoch,
            cleanup.pins_released,
            cleanup.slots_aborted,
        )

    # -- supervisor ------------------------------------------------------------------------

    def _drain_supervisor(self) -> None:
        sup = self._sup
        assert sup is not None
        while True:
            try:
                frames = sup.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = tp.decode(frames)
            except ProtocolError as exc:
                self.stats.bad_messages += 1
                logger.warning("coordinator: malformed message from the supervisor: %s", exc)
                continue
            if msg.type == tp.DRAIN:
                self._draining = True
            elif msg.type == tp.STOP:
                self._stop = True
            elif msg.type == tp.PING:
                self._send_sup(tp.PONG, {"role": "coordinator"})
            elif msg.type == tp.STATE:
                self._send_sup(tp.STATE, self.state_body())
            else:
                self.stats.bad_messages += 1
                logger.warning("coordinator: unexpected %r from the supervisor", msg.type)

    def _settle_for_drain(self) -> None:
        """Once nothing moves any more, land what still waits and fence every rank."""
        if any(c.transfers or c.waiting for c in self._ranks.values()):
            return
        if self._inflight:
            # Only blocks waiting for a parent remain, so their parents wait too: a cycle that
            # only malformed input can build. Land them regardless of order.
            stuck = [item for waiting in self._deferred.values() for item in waiting]
            self._deferred.clear()
            for item in stuck:
                self._commit(item)
            if self._inflight:  # pragma: no cover - every in-flight item is tracked somewhere
                raise InvariantError(f"{len(self._inflight)} in-flight blocks are untracked")
        self._finish_drain()

    def _finish_drain(self) -> None:
        self._draining = False
        self.flush()
        # Quiescent now (ranks drained, nothing in flight): a full structural check is valid.
        try:
            self.directory.check_invariants()
        except InvariantError as exc:
            self.stats.violations += 1
            logger.error("coordinator: G2 invariant violated: %s", exc)
        self._fence_count += 1
        for conn in self._ranks.values():
            self._send_rank(
                conn, tp.G2_EVENTS, {"num_events": 0, "num_stores": 0, "fence": self._fence_count}
            )
        self.stats.fences += 1
        self._send_sup(tp.STATE, self.state_body())

    def state_body(self) -> dict[str, Any]:
        seg = self._segment
        host = np.sort(seg.seq_hash[seg.state == READY]).tolist()
        return {"host_pinned": host, "stats": self.stats_dict(include_pins=True)}

    def stats_dict(self, *, include_pins: bool = False) -> dict[str, int]:
        """Flat counters (also the body of RESULTS). `pinned` costs one scan of the pin rows."""
        directory = self.directory
        dstats = directory.stats()
        capacity = self.spec.num_g2_blocks
        out: dict[str, int] = {
            "capacity": capacity,
            "used": capacity - dstats.num_free,
            "ready": dstats.num_ready,
            "reserved": dstats.num_reserved,
            "free": dstats.num_free,
            "in_flight": len(self._inflight),
            "evicted": dstats.num_evictions,
            "evict_backoffs": dstats.num_evict_backoffs,
            "aborts": dstats.num_aborts,
            "index_rebuilds": dstats.num_index_rebuilds,
            "ranks_live": len(self._ranks),
        }
        out.update(asdict(self.stats))
        if include_pins:
            pins = self._segment.pins
            out["pinned"] = int(np.count_nonzero(pins.any(axis=0)))
            out["pins_total"] = int(pins.sum(dtype=np.int64))
        return out


_NO_EVENTS_HEADER: Final = tp.encode(tp.G2_EVENTS, {"num_events": 0, "num_stores": 0})[0]
_EVERY_ITEM: Final[dict[int, orjson.Fragment]] = {}
_EVERY_ITEM_CACHED: Final = 64
"""Item counts whose `_every_item` JSON is kept (the OFFLOADs of a fleet have few sizes)."""


def _every_item(count: int) -> orjson.Fragment:
    """`[0, 1, ..., count - 1]` (an ACK's "accepted" when it takes every item) as JSON that
    `orjson.dumps` copies as is: the bytes the list would give, built once per count."""
    fragment = _EVERY_ITEM.get(count)
    if fragment is None:
        fragment = orjson.Fragment(orjson.dumps(list(range(count))))
        if len(_EVERY_ITEM) < _EVERY_ITEM_CACHED:
            _EVERY_ITEM[count] = fragment
    return fragment


def _with_acks(header: bytes, conn: _Rank) -> bytes:
    """A G2_EVENTS header (`tp.encode`'s bytes) with `"acks"`: `conn`'s queued ACKs, which
    it takes (the bytes `tp.encode` gives the body with an "acks" entry added last)."""
    acks, conn.acks = conn.acks, []
    return tp.with_header_entry(header, "acks", acks)


def _token_bytes(rows: npt.NDArray[np.uint32]) -> bytes:
    """Token ids as little-endian u32 bytes (the wire form)."""
    return rows.astype("<u4", copy=False).tobytes()


class _Candidates(NamedTuple):
    """The items of one OFFLOAD that passed screening, as columns (item index first)."""

    idxs: list[int]
    seqs: list[SeqHash]
    parents: list[SeqHash | None]
    locals: list[int]
    positions: list[int]

    def truncate(self, count: int) -> None:
        for column in self:
            del column[count:]


class _Offload(NamedTuple):
    """One screened OFFLOAD, waiting for the rest of its group (`Coordinator.serve_router`)."""

    conn: _Rank
    batch: int
    cand: _Candidates
    rejected: list[int]
    token_rows: npt.NDArray[np.uint32] | None
    columns: _Columns | None = None
    """The candidates as arrays, when they are every item of a packed OFFLOAD, in order."""
    packed: _PackedGroup | None = None
    """Set when screened with other plain packed OFFLOADs (`_screen_packed_group`): every
    item is a candidate, and `cand`, `token_rows` and `columns` stay empty until
    `_materialized` fills them from the group's arrays."""
    num_packed: int = 0
    """The number of items (candidates) when `packed` is set."""
    packed_start: int = 0
    """Where its items start among the group's when `packed` is set."""


class _PackedGroup(NamedTuple):
    """Plain packed OFFLOADs screened together (`Coordinator._screen_packed_group`), in
    order: every item valid and new, all of them candidates."""

    columns: _Columns
    total: int
    """The number of blocks."""
    tokens: npt.NDArray[np.uint32]
    token_bytes: bytes
    """`tokens` as the wire bytes (the token frames, joined)."""
    starts: list[int]
    """Where each OFFLOAD's items start."""
    counts: list[int]
    chains: bool
    """Whether every OFFLOAD is a chain stored parent first (what `_stage_batch` tests)."""
    meta: npt.NDArray[np.uint64]
    """The items' packed meta words (position | `transport.PACKED_HAS_PARENT`): their G2
    store metas but for `transport.G2_HAS_TOKENS`."""
    max_position: int


class _Claims(set[SeqHash]):
    """The blocks claimed by the OFFLOADs of a group (`Coordinator.serve_router`), whose
    packed screenings add their hashes lazily (`_claim`): only a later screening in the same
    group reads them (`_settle` first)."""

    __slots__ = ("lazy",)

    def __init__(self) -> None:
        super().__init__()
        self.lazy: list[npt.NDArray[np.uint64]] = []


def _claim(claimed: set[SeqHash], seqs: npt.NDArray[np.uint64]) -> None:
    if isinstance(claimed, _Claims):
        claimed.lazy.append(seqs)
    else:
        claimed.update(seqs.tolist())


def _settle(claimed: set[SeqHash] | None) -> None:
    """Add the lazily claimed hashes to `claimed` (before anything reads it)."""
    if isinstance(claimed, _Claims) and claimed.lazy:
        for seqs in claimed.lazy:
            claimed.update(seqs.tolist())
        claimed.lazy.clear()


_Columns = tp.OffloadColumns
"""Blocks as arrays (parents 0 where `has_parent` is False): what
`G2Directory.commit_screened` and `_EventQueue.stored` take."""


def _columns_of(
    seqs: list[SeqHash], parents: list[SeqHash | None], locals_: list[int], positions: list[int]
) -> _Columns:
    return _Columns(
        np.array(seqs, dtype=np.uint64),
        np.array([0 if p is None else p for p in parents], dtype=np.uint64),
        np.array([p is not None for p in parents], dtype=bool),
        np.array(locals_, dtype=np.uint64),
        np.array(positions, dtype=np.int64),
    )


def _group_plhs(group: list[_Offload]) -> list[Plh] | None:
    """The PLHs of every candidate of `group`, in order, built from the columns in one
    `plhs_of_columns` (None unless every OFFLOAD of the group has its columns)."""
    parts = [entry.columns for entry in group]
    if not parts or any(part is None for part in parts):
        return None
    columns = [part for part in parts if part is not None]
    if len(columns) == 1:
        return plhs_of_columns(columns[0].seqs, columns[0].parents, columns[0].positions)
    return plhs_of_columns(
        np.concatenate([part.seqs for part in columns]),
        np.concatenate([part.parents for part in columns]),
        np.concatenate([part.positions for part in columns]),
    )


def _column_lists(
    columns: tp.OffloadColumns,
) -> tuple[list[int], list[int | None], list[int], list[int]]:
    """(seqs, parents (None for none), locals, positions) of a packed OFFLOAD, as lists."""
    parents: list[int | None] = list(columns.parents.tolist())
    if not columns.has_parent.all():
        for k in np.flatnonzero(~columns.has_parent).tolist():
            parents[k] = None
    return (
        columns.seqs.tolist(),
        parents,
        columns.locals.tolist(),
        columns.positions.tolist(),
    )


@dataclass(slots=True)
class _Staged:
    """Whole batches staged for one `G2Directory.commit_screened`, in arrival order."""

    owners: list[tuple[DpRank, int]] = field(default_factory=list)
    """(rank, number of blocks) per staged batch."""
    slots: list[int] = field(default_factory=list)
    slot_arrays: list[npt.NDArray[np.intp]] = field(default_factory=list)
    """`slots`, one array per staged batch."""
    columns: list[_Columns] = field(default_factory=list)
    plhs: list[int] = field(default_factory=list)
    seq_list: list[SeqHash] = field(default_factory=list)
    tokens: list[npt.NDArray[np.uint32]] = field(default_factory=list)
    has_tokens: bool = False
    chain_starts: list[int] = field(default_factory=list)
    """Where each staged batch starts, while every one is a chain stored parent first."""
    chained: bool = True
    """Whether every staged batch is such a chain (`G2Directory.commit_screened`)."""

    def clear(self) -> None:
        self.chain_starts.clear()
        self.chained = True
        self.owners.clear()
        self.slots.clear()
        self.slot_arrays.clear()
        self.columns.clear()
        self.plhs.clear()
        self.seq_list.clear()
        self.tokens.clear()


class _EventQueue:
    """G2 events waiting for a broadcast, as the columns of packed G2_EVENTS
    (`shmkv.transport.pack_g2_events`), plus the token ids of the stores."""

    __slots__ = ("_kinds", "_locals", "_metas", "_parents", "_row_bytes", "_seqs", "_tokens")

    def __init__(self, row_bytes: int) -> None:
        """`row_bytes`: the token bytes of one store (4 x block_size)."""
        self._row_bytes = row_bytes
        self._kinds = bytearray()
        self._seqs = bytearray()
        self._parents = bytearray()
        self._locals = bytearray()
        self._metas = bytearray()
        self._tokens: list[bytes] = []
        """The token bytes of the stores, in parts (joined once, by `_token_frame`)."""

    def __len__(self) -> int:
        return len(self._kinds)

    def removed(self, seqs: npt.NDArray[np.uint64]) -> None:
        self._kinds += bytes(len(seqs))  # NOTE: G2_EVENT_REMOVED is 0
        self._seqs += seqs.astype("<u8", copy=False).tobytes()

    def stored(
        self,
        seqs: npt.NDArray[np.uint64],
        parents: npt.NDArray[np.uint64],
        has_parent: npt.NDArray[np.bool_],
        locals_: npt.NDArray[np.uint64],
        positions: npt.NDArray[np.integer],
        token_bytes: bytes,
        has_tokens: bool | npt.NDArray[np.bool_],
    ) -> None:
        """Stores of blocks (in order); `parents` must be 0 where `has_parent` is False (as
        every caller's columns are: `_Columns`)."""
        meta = positions.astype("<u8")
        meta |= has_parent.astype("<u8") << np.uint64(32)
        if has_tokens is True:
            meta |= np.uint64(tp.G2_HAS_TOKENS)
        elif has_tokens is not False:
            meta |= np.asarray(has_tokens, dtype="<u8") << np.uint64(33)
        self._append_stores(seqs, parents, locals_, meta, token_bytes)

    def stored_packed(
        self,
        seqs: npt.NDArray[np.uint64],
        parents: npt.NDArray[np.uint64],
        locals_: npt.NDArray[np.uint64],
        packed_meta: npt.NDArray[np.uint64],
        token_bytes: bytes,
    ) -> None:
        """`stored` of screened packed OFFLOAD items with their token ids: their packed meta
        words (position | `transport.PACKED_HAS_PARENT`, parents 0 without it) are the stores'
        metas but for `transport.G2_HAS_TOKENS`."""
        self._append_stores(seqs, parents, locals_, packed_meta | _G2_HAS_TOKENS_U64, token_bytes)

    def _append_stores(
        self,
        seqs: npt.NDArray[np.uint64],
        parents: npt.NDArray[np.uint64],
        locals_: npt.NDArray[np.uint64],
        metas: npt.NDArray[np.uint64],
        token_bytes: bytes,
    ) -> None:
        """Queue stores from their columns (metas complete) and their token rows' bytes."""
        self._kinds += _STORED_KIND * len(seqs)
        self._seqs += seqs.astype("<u8", copy=False).tobytes()
        self._parents += parents.astype("<u8", copy=False).tobytes()
        self._locals += locals_.astype("<u8", copy=False).tobytes()
        self._metas += metas.astype("<u8", copy=False).tobytes()
        self._tokens.append(token_bytes)

    def stored_one(
        self,
        seq: SeqHash,
        parent: SeqHash | None,
        local: int,
        position: int,
        token_bytes: bytes | None,
    ) -> None:
        """One store; `token_bytes` None for a block offloaded without token ids (zeros)."""
        meta = position | (0 if parent is None else tp.G2_HAS_PARENT)
        if token_bytes is not None:
            meta |= tp.G2_HAS_TOKENS
        self._kinds.append(tp.G2_EVENT_STORED)
        self._seqs += seq.to_bytes(8, "little")
        self._parents += (0 if parent is None else parent).to_bytes(8, "little")
        self._locals += local.to_bytes(8, "little")
        self._metas += meta.to_bytes(8, "little")
        self._tokens.append(bytes(self._row_bytes) if token_bytes is None else token_bytes)

    def parts(self, start: int, stop: int) -> tuple[dict[str, Any], list[bytes]]:
        """The body and payload frames of a G2_EVENTS holding events `start` to `stop` (and
        their tokens)."""
        kinds = self._kinds
        first = kinds.count(tp.G2_EVENT_STORED, 0, start)
        last = first + kinds.count(tp.G2_EVENT_STORED, start, stop)
        count, stores = stop - start, last - first
        body: dict[str, Any] = {"num_events": count, "num_stores": stores}
        if not count:
            return body, []
        # NOTE: memoryview slices: the frame is the only copy
        frame = tp.pack_g2_events(
            memoryview(kinds)[start:stop],
            memoryview(self._seqs)[8 * start : 8 * stop],
            memoryview(self._parents)[8 * first : 8 * last],
            memoryview(self._locals)[8 * first : 8 * last],
            memoryview(self._metas)[8 * first : 8 * last],
        )
        if not stores:
            return body, [frame]
        return body, [frame, self._token_frame(first, last)]

    def message(self, start: int, stop: int) -> list[bytes]:
        """The frames of a G2_EVENTS holding events `start` to `stop` (and their tokens)."""
        body, payload = self.parts(start, stop)
        return [*tp.encode(tp.G2_EVENTS, body), *payload]

    def _token_frame(self, first: int, last: int) -> bytes:
        """The token bytes of stores `first` to `last` (no copy when they are all of them,
        queued in one part)."""
        parts = self._tokens
        if len(parts) != 1:
            parts[:] = [b"".join(parts)]
        whole = parts[0]
        row = self._row_bytes
        if first == 0 and row * last == len(whole):
            return whole
        return whole[row * first : row * last]


def _item_columns(
    raw_items: list[Any],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(seqs, parents, locals, positions) of well-formed OFFLOAD items, checked column by
    column at C speed; None if any item is malformed (the caller then finds which)."""
    if set(map(type, raw_items)) != {list} or set(map(len, raw_items)) != {4}:
        return None
    seqs, parents, locals_, positions = zip(*raw_items, strict=True)
    for column in (seqs, parents, locals_, positions):
        if set(map(type, column)) != {int}:
            return None
    if (
        min(seqs) < 0
        or max(seqs) > U64_MASK
        or min(locals_) < 0
        or max(locals_) > U64_MASK
        or min(parents) < _NO_PARENT
        or max(parents) > U64_MASK
        or min(positions) < 0
        or max(positions) > MAX_POSITION
    ):
        return None
    return seqs, parents, locals_, positions


def _position_order(positions: list[int]) -> list[int] | None:
    """The stable order that sorts items by position; None if they are sorted already."""
    if positions == sorted(positions):
        return None
    return sorted(range(len(positions)), key=positions.__getitem__)


def _is_chain(seqs: list[SeqHash], parents: list[SeqHash | None], positions: list[int]) -> bool:
    """Whether every block (after the first) is the child of the block before it: its parent
    hash is that block's sequence hash, its position the next one (C-speed list compares)."""
    first = positions[0]
    return parents[1:] == seqs[:-1] and positions == list(range(first, first + len(positions)))


def _parents_come_first(seqs: list[SeqHash], parents: list[SeqHash | None]) -> bool:
    """Whether every block whose parent is another block of the list comes after it
    (`seqs` distinct)."""
    if parents[1:] == seqs[:-1] and (not parents or parents[0] not in seqs[1:]):
        return True  # NOTE: one chain, parent first (the usual batch), at C speed
    where: dict[SeqHash | None, int] = dict(zip(seqs, range(len(seqs)), strict=True))
    return all(
        k > j or parent == seqs[k]
        for k, j, parent in zip(range(len(seqs)), map(where.get, parents), parents, strict=True)
        if j is not None
    )


@contextlib.contextmanager
def _periodic_gc() -> Iterator[None]:
    """The loop's garbage collection: none automatic (the caller runs `gc.collect()` about
    once per second); what exists when the loop starts is frozen (never scanned again).

    NOTE: the Lineage nodes are small lists (one per READY block): automatic collections
    kept re-scanning them (about 4% of the coordinator's instructions at 16 k blocks, more in
    bigger pools); the structures hold no reference cycles, so a collection per second
    frees the rare cycle (an exception's traceback) soon enough.
    """
    was_enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def _pidfd_signalled(pidfd: int) -> bool:
    """Whether the process behind `pidfd` has exited (pidfds turn readable then)."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


def coordinator_main(spec_json: str) -> int:
    """Entry point of the coordinator process (see workers/coordinator_worker.py)."""
    logging.basicConfig(
        level=os.environ.get("SHMKV_LOG_LEVEL", "WARNING"),
        format="%(levelname)s coordinator[%(process)d] %(name)s: %(message)s",
    )
    spec = CoordinatorSpec.from_json(spec_json)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    coordinator: Coordinator | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if coordinator is not None:
            coordinator.request_stop()

    previous_wakeup = signal.set_wakeup_fd(write_fd)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with Coordinator(spec, wakeup_fd=read_fd) as coordinator:
            return coordinator.run()
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(read_fd)
        os.close(write_fd)


__all__ = [
    "BAD_MESSAGE_LIMIT",
    "MAX_EVENTS_PER_MESSAGE",
    "Coordinator",
    "CoordinatorSpec",
    "coordinator_main",
    "segment_fleet_id",
]
