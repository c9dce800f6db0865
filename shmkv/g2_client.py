"""Layer 2: one rank's client of the shared G2 pool (implements `shmkv.offload.OffloadEngine`).

    enqueue_evictions(items, slots) --OFFLOAD (one per call, batched)--> coordinator
    tick(now) <--OFFLOAD_ACK (rejected slots) / OFFLOAD_DONE (copied slots) / G2_EVENTS (+acks)--
    prepare_onboard(plhs)  replica plh -> seq hash, then G2RankView.pin_prefix (no RPC)
    start_onboard(plan)    copy timed on this rank's own G2->G1 link; tick() unpins at the end

The client attaches the coordinator's segment (never registering it with the resource
tracker), says HELLO {rank, pid, epoch} on a DEALER and waits for WELCOME; the coordinator then
streams G2_EVENTS (format in `shmkv.coordinator`; packed columns, decoded by
`shmkv.transport.unpack_g2_events`, or the JSON form): first a snapshot of every READY block, then
every store and removal in one global order, to every rank. From those the client keeps a
replica `plh -> seq hash` (plh = `make_plh(seq, parent, position)`), which turns the manager's
PLHs into the sequence hashes the shared index is keyed by. A stale replica entry costs a miss,
never wrong data: `pin_prefix` pins in this rank's own row, fences, and re-validates.

Host-tier events (`take_events`, republished on this rank's stream) follow a per-rank policy,
`shmkv.offload_local.HostTierAnnouncer`: a G2 block is announced on this rank only once its
parent is announced on this rank in the host tier, so a router never sees a parent it does not
know (a block offloaded by another rank usually has its parent in *that* rank's G1); waiting
descendants follow their parent parent-first; a Removed goes out only for announced blocks,
descendants first. `announced_seq_hashes()` is what this rank's stream says it holds in the
host tier (its state dump). A restarted rank gets the snapshot and re-announces the same way.

Source slots: `enqueue_evictions` returns only the slots beyond the items (the batch's extras);
every other slot stays quarantined until `tick` returns it: a rejected item (deduped or dropped
for capacity) as soon as the ACK arrives, an accepted one once OFFLOAD_DONE says its copy
landed (or the ACK itself, with "done": true, when every copy landed at once: such ACKs come
in the ``"acks"`` of a G2_EVENTS, applied after its events). `earliest_deadline_ms` reports
the batches still outstanding (an un-ACKed batch counts as due at once), so the rank keeps
ticking, and its poller wakes on `socket` meanwhile.

Time: the fleet's shared simulated clock (`now_ms` arguments). With a clock that never sleeps
(speedup 0 or inf) onboard copies are instant, as offload copies are at the coordinator.
"""

from __future__ import annotations

import math
import os
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from types import TracebackType
from typing import Any, Final, Self

import zmq

from shmkv import transport as tp
from shmkv.bandwidth import BandwidthModel
from shmkv.clock import Clock
from shmkv.config import EngineConfig
from shmkv.errors import (
    ClosedError,
    InvariantError,
    ProtocolError,
    SharedMemoryError,
    WorkerTimeoutError,
)
from shmkv.g2 import G2RankView, PinnedRun
from shmkv.hashing import MAX_POSITION, make_plh, plh_position
from shmkv.ids import U64_MASK, BlockId, DpRank, Plh, SeqHash
from shmkv.offload import (
    BlockMeta,
    G2Event,
    OffloadItem,
    OnboardPlan,
    SwapInHandle,
)
from shmkv.offload_local import HostTierAnnouncer
from shmkv.shm import G2Segment

HELLO_TIMEOUT_S: Final = 30.0
_NO_PARENT: Final = -1
_UNKNOWN: Final = -1
_LITTLE_ENDIAN: Final = sys.byteorder == "little"


@dataclass(slots=True, eq=False)
class _Batch:
    """An OFFLOAD in flight: slots by item index, until ACK/DONE hand them back."""

    slots: list[BlockId]
    sent_ms: float
    acked: bool = False
    deadline_ms: float = math.inf
    outstanding: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientStats:
    """Counters of one client since it connected."""

    batches_sent: int
    items_sent: int
    accepted: int
    rejected: int
    done: int
    events_received: int
    stores_received: int
    removals_received: int
    fences_received: int
    bad_messages: int
    onboards_started: int
    onboard_blocks: int
    onboard_misses: int
    """prepare_onboard calls whose first PLH the replica knew but could not pin (stale)."""
    pin_violations: int
    """Pinned slots found evicted or reused when their onboard ended (must stay 0)."""
    replica_size: int
    host_announced: int
    """G2 blocks this rank announces (host tier): their whole parent chain is in G2."""
    host_waiting: int
    """G2 blocks held back because their parent is not announced on this rank."""


class SharedG2Client:
    """One rank's `OffloadEngine` over the shared G2 pool. Single-threaded; `close()` it.

    Owns the attached segment, its `G2RankView`, the DEALER to the coordinator (and the ZMQ
    context when none is given).
    """

    def __init__(
        self,
        *,
        rank: DpRank,
        epoch: int,
        segment_name: str,
        coordinator_endpoint: str,
        config: EngineConfig,
        clock: Clock,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        hello_timeout_s: float = HELLO_TIMEOUT_S,
    ) -> None:
        """Attach, connect, and complete the HELLO/WELCOME handshake.

        Raises:
            SharedMemoryError: the segment is missing or invalid.
            ConfigError: the rank is outside the segment's ranks.
            WorkerTimeoutError: no WELCOME within `hello_timeout_s`.
            ProtocolError: the coordinator answered for another segment or epoch.
        """
        self.rank = rank
        self.epoch = epoch
        self.config = config
        self._clock = clock
        self._block_size = config.block_size
        self._token_bytes = 4 * config.block_size
        never_sleeps = bool(getattr(clock, "never_sleeps", False))
        self._block_bytes = config.block_size_bytes
        self._onboard_link = BandwidthModel(0.0 if never_sleeps else config.bandwidth_g2_to_g1_gbps)
        self._closed = False
        self._sock: zmq.Socket[bytes] | None = None
        self._now_ms = 0.0
        self._next_batch = 1
        self._batches: dict[int, _Batch] = {}
        self._released: list[BlockId] = []
        self._events: list[G2Event] = []
        self._announcer = HostTierAnnouncer()
        self._plh_to_seq: dict[Plh, SeqHash] = {}
        self._seq_to_plh: dict[SeqHash, Plh] = {}
        self._runs: dict[int, PinnedRun] = {}
        self._onboards: dict[int, SwapInHandle] = {}
        self._completed_onboards: list[SwapInHandle] = []
        self._next_transfer_id = 0
        self._welcomed = False
        self._fences_received = 0
        self._fences_consumed = 0
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "batches_sent",
                "items_sent",
                "accepted",
                "rejected",
                "done",
                "events_received",
                "stores_received",
                "removals_received",
                "bad_messages",
                "onboards_started",
                "onboard_blocks",
                "onboard_misses",
                "pin_violations",
            ),
            0,
        )
        self._view: G2RankView | None = None
        self._segment = G2Segment.attach(segment_name)
        self._own_context = context is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context() if context is None else context
        try:
            if self._segment.block_size != config.block_size:
                raise SharedMemoryError(
                    f"segment {segment_name} holds {self._segment.block_size}-token blocks, "
                    f"this rank uses {config.block_size}"
                )
            self._view = G2RankView(self._segment, rank)
            sock = self._ctx.socket(zmq.DEALER)
            self._sock = sock
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.IDENTITY, f"rank{rank}-e{epoch}".encode())
            sock.connect(coordinator_endpoint)
        except BaseException:
            self.close()
            raise
        try:
            self._handshake(hello_timeout_s)
        except BaseException:
            self.close()
            raise

    def _handshake(self, timeout_s: float) -> None:
        sock = self._socket()
        sock.send_multipart(
            tp.encode(tp.HELLO, {"rank": self.rank, "pid": os.getpid(), "epoch": self.epoch})
        )
        deadline = time.monotonic() + timeout_s
        while not self._welcomed:
            left_ms = (deadline - time.monotonic()) * 1000.0
            if left_ms <= 0 or not sock.poll(max(1, math.ceil(left_ms)), zmq.POLLIN):
                raise WorkerTimeoutError(
                    f"rank {self.rank}: no WELCOME from the G2 coordinator within {timeout_s} s"
                )
            msg = tp.decode(sock.recv_multipart())
            if msg.type != tp.WELCOME:
                raise ProtocolError(f"expected WELCOME from the G2 coordinator, got {msg.type!r}")
            self._on_welcome(msg.body)

    # -- properties ------------------------------------------------------------------------

    @property
    def socket(self) -> zmq.Socket[bytes]:
        """The DEALER to the coordinator: poll it for POLLIN, then call `receive()` or `tick()`."""
        return self._socket()

    @property
    def view(self) -> G2RankView:
        if self._view is None:
            raise ClosedError(f"rank {self.rank}: the shared G2 client is closed")
        return self._view

    @property
    def segment(self) -> G2Segment:
        return self._segment

    @property
    def num_outstanding_batches(self) -> int:
        return len(self._batches)

    @property
    def num_quarantined(self) -> int:
        """Source slots this client holds (outstanding items, plus released not yet ticked)."""
        held = sum(len(b.outstanding) if b.acked else len(b.slots) for b in self._batches.values())
        return held + len(self._released)

    def stats(self) -> ClientStats:
        return ClientStats(
            **self._counts,
            fences_received=self._fences_received,
            replica_size=len(self._plh_to_seq),
            host_announced=self._announcer.num_announced,
            host_waiting=self._announcer.num_waiting,
        )

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            raise ClosedError(f"rank {self.rank}: the shared G2 client is closed")
        return self._sock

    # -- G1 -> G2 --------------------------------------------------------------------------

    def enqueue_evictions(
        self, items: Sequence[OffloadItem], source_slots: Sequence[BlockId]
    ) -> list[BlockId]:
        """Send one OFFLOAD for all `items`; returns only the extra slots (beyond the items).

        The item slots come back from `tick`: rejected ones after the ACK, copied ones after
        OFFLOAD_DONE.
        """
        extras = list(source_slots[len(items) :])
        if not items:
            return extras
        if len(source_slots) < len(items):
            raise ProtocolError(f"{len(items)} offload items but {len(source_slots)} source slots")
        bs = self._block_size
        metas = [item.meta for item in items]
        has_tokens = all(meta.token_ids is not None for meta in metas)
        items_frame = tp.pack_offload_items(
            [meta.seq_hash for meta in metas],
            [meta.parent_hash for meta in metas],
            [meta.local_hash for meta in metas],
            [plh_position(item.plh) for item in items],
        )
        frames: tuple[bytes, ...] = (items_frame,)
        if has_tokens:
            tokens = array("I")
            for meta in metas:
                ids = meta.token_ids
                assert ids is not None
                if len(ids) != bs:
                    raise ProtocolError(f"an offloaded block holds {len(ids)} tokens, not {bs}")
                if isinstance(ids, array) and ids.typecode == "I":
                    tokens.extend(ids)
                else:
                    tokens.extend(array("I", ids))
            if not _LITTLE_ENDIAN:  # pragma: no cover - little-endian hosts in practice
                tokens.byteswap()
            frames = (items_frame, tokens.tobytes())
        batch = self._next_batch
        self._next_batch += 1
        self._socket().send_multipart(
            tp.encode(
                tp.OFFLOAD,
                {"batch": batch, "num_items": len(items), "packed": True, "has_tokens": has_tokens},
                frames,
            )
        )
        self._batches[batch] = _Batch(list(source_slots[: len(items)]), self._now_ms)
        self._counts["batches_sent"] += 1
        self._counts["items_sent"] += len(items)
        return extras

    # -- messages --------------------------------------------------------------------------

    def receive(self) -> int:
        """Drain the socket without blocking into the client's queues; returns messages read.

        Nothing is handed to the caller here: released slots come from `tick`, events from
        `take_events`.
        """
        sock = self._socket()
        count = 0
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return count
            count += 1
            try:
                self.handle(tp.decode(frames))
            except ProtocolError:
                self._counts["bad_messages"] += 1

    def handle(self, msg: tp.Message) -> None:
        """Apply one decoded message from the coordinator (public for tests).

        A G2_EVENTS with ``"acks"`` is applied as the G2_EVENTS alone followed by one
        OFFLOAD_ACK per entry, in order.

        Raises:
            ProtocolError: the message is malformed or unexpected; nothing was applied. Of a
                G2_EVENTS's ``"acks"`` (checked to be a list of objects first), each bad ACK is
                skipped and the rest applied, as separate OFFLOAD_ACKs would be; the error
                then names the first, and every bad ACK but one is counted in
                ``bad_messages`` here (the caller counts the error).
        """
        if msg.type == tp.G2_EVENTS:
            acks = msg.body.get("acks")
            if acks is None:
                self._on_events(msg)
            else:
                self._on_events_and_acks(msg, acks)
        elif msg.type == tp.OFFLOAD_ACK:
            self._on_ack(msg.body)
        elif msg.type == tp.OFFLOAD_DONE:
            self._on_done(msg.body)
        elif msg.type == tp.WELCOME:
            self._on_welcome(msg.body)
        elif msg.type == tp.PONG:
            return
        else:
            raise ProtocolError(f"unexpected message {msg.type!r} from the G2 coordinator")

    def _on_welcome(self, body: dict[str, Any]) -> None:
        segment = tp.require(body, "segment", str)
        epoch = tp.require(body, "epoch", int)
        if segment != self._segment.name or epoch != self.epoch:
            raise ProtocolError(
                f"WELCOME for segment {segment!r} epoch {epoch}, expected "
                f"{self._segment.name!r} epoch {self.epoch}"
            )
        self._welcomed = True

    def _batch_indexes(self, body: dict[str, Any], key: str) -> tuple[int, _Batch, list[int]]:
        batch_id = tp.require(body, "batch", int)
        batch = self._batches.get(batch_id)
        if batch is None:
            raise ProtocolError(f"{key}: unknown offload batch {batch_id}")
        indexes = tp.require(body, key, list)
        size = len(batch.slots)
        for i in indexes:
            if type(i) is not int or not 0 <= i < size:
                raise ProtocolError(f"{key}: item index {i!r} outside batch {batch_id}")
        return batch_id, batch, indexes

    def _on_ack(self, body: dict[str, Any]) -> None:
        batch_id, batch, rejected = self._batch_indexes(body, "rejected")
        _, _, accepted = self._batch_indexes(body, "accepted")
        if batch.acked:
            raise ProtocolError(f"OFFLOAD_ACK: batch {batch_id} acknowledged twice")
        if len(set(rejected) | set(accepted)) != len(rejected) + len(accepted) or len(
            rejected
        ) + len(accepted) != len(batch.slots):
            raise ProtocolError(f"OFFLOAD_ACK: batch {batch_id} is not split into its items")
        deadline = tp.decode_float(body.get("deadline_ms", "inf"))
        if not isinstance(deadline, int | float) or isinstance(deadline, bool):
            raise ProtocolError("OFFLOAD_ACK: deadline_ms must be a number")
        done = body.get("done", False)
        if not isinstance(done, bool):
            raise ProtocolError("OFFLOAD_ACK: done must be a bool")
        batch.acked = True
        batch.deadline_ms = float(deadline)
        slots = batch.slots
        self._released.extend(slots[i] for i in rejected)
        self._counts["accepted"] += len(accepted)
        self._counts["rejected"] += len(rejected)
        if done:  # every accepted copy landed already: no OFFLOAD_DONE follows
            self._released.extend(slots[i] for i in accepted)
            self._counts["done"] += len(accepted)
            accepted = []
        batch.outstanding = set(accepted)
        if not accepted:
            del self._batches[batch_id]

    def _on_done(self, body: dict[str, Any]) -> None:
        batch_id, batch, done = self._batch_indexes(body, "items")
        if not batch.acked or any(i not in batch.outstanding for i in done):
            raise ProtocolError(f"OFFLOAD_DONE: items of batch {batch_id} not outstanding")
        slots = batch.slots
        for i in done:
            batch.outstanding.discard(i)
            self._released.append(slots[i])
        self._counts["done"] += len(done)
        if not batch.outstanding:
            del self._batches[batch_id]

    def _on_events_and_acks(self, msg: tp.Message, acks: object) -> None:
        """A G2_EVENTS, then the OFFLOAD_ACKs in its ``"acks"`` (their slots are released only
        after the events of their blocks are applied)."""
        if not isinstance(acks, list) or not all(type(ack) is dict for ack in acks):
            raise ProtocolError("G2_EVENTS: acks must be a list of OFFLOAD_ACK bodies")
        self._on_events(msg)
        errors: list[ProtocolError] = []
        for ack in acks:
            try:
                self._on_ack(ack)
            except ProtocolError as exc:
                errors.append(exc)
        if errors:
            self._counts["bad_messages"] += len(errors) - 1
            raise errors[0]

    def _on_events(self, msg: tp.Message) -> None:
        body = msg.body
        fence = body.get("fence")
        if fence is not None and (type(fence) is not int or fence < 1):
            raise ProtocolError("G2_EVENTS: fence must be an int >= 1")
        frames = msg.frames
        if "events" in body:  # the JSON form
            events = _parse_events(tp.require(body, "events", list))
        else:
            num_events = tp.require(body, "num_events", int)
            num_stores = tp.require(body, "num_stores", int)
            if num_events and not frames:
                raise ProtocolError("G2_EVENTS: no events frame")
            events = tp.unpack_g2_events(num_events, num_stores, frames[0] if num_events else b"")
            frames = frames[1:] if num_events else frames
        num_stores = len(events.parents)
        bs = self._block_size
        tokens: array[int] | None = None
        if num_stores:
            if len(frames) != 1 or len(frames[0]) != num_stores * self._token_bytes:
                raise ProtocolError(
                    f"G2_EVENTS: one token frame of {num_stores * self._token_bytes} bytes "
                    f"expected, got {[len(f) for f in frames]}"
                )
            tokens = array("I")
            tokens.frombytes(frames[0])
            if not _LITTLE_ENDIAN:  # pragma: no cover - little-endian hosts in practice
                tokens.byteswap()
        elif frames:
            raise ProtocolError("G2_EVENTS: a token frame without stores")
        self._apply_events(events, tokens, bs)
        num_events = len(events.kinds)
        self._counts["events_received"] += num_events
        self._counts["stores_received"] += num_stores
        self._counts["removals_received"] += num_events - num_stores
        if fence is not None:
            self._fences_received += 1

    def _apply_events(
        self, events: tp.G2EventColumns, tokens: array[int] | None, block_size: int
    ) -> None:
        """Apply validated events in order: the replica, then the host-tier announcer."""
        plh_to_seq, seq_to_plh = self._plh_to_seq, self._seq_to_plh
        out = self._events
        announcer = self._announcer
        parents, locals_, positions = events.parents, events.locals, events.positions
        has_tokens = events.has_tokens
        store = 0
        for kind, seq in zip(events.kinds, events.seqs, strict=True):
            if kind == tp.G2_EVENT_STORED:
                parent = parents[store]
                parent_hash = None if parent == _NO_PARENT else parent
                plh = make_plh(seq, parent_hash, positions[store])
                previous = seq_to_plh.get(seq)
                if previous is not None and previous != plh:
                    plh_to_seq.pop(previous, None)
                plh_to_seq[plh] = seq
                seq_to_plh[seq] = plh
                ids = None
                if has_tokens[store] and tokens is not None:
                    ids = tokens[store * block_size : (store + 1) * block_size]
                announcer.stored(BlockMeta(seq, parent_hash, locals_[store], ids), out)
                store += 1
            else:
                old = seq_to_plh.pop(seq, None)
                if old is not None:
                    plh_to_seq.pop(old, None)
                announcer.removed(seq, out)

    # -- time ------------------------------------------------------------------------------

    def tick(self, now_ms: float) -> list[BlockId]:
        """Read what the coordinator sent, land finished onboards; returns released slots."""
        if self._closed:
            return []
        if now_ms > self._now_ms:
            self._now_ms = now_ms
        self.receive()
        self._advance_onboards(self._now_ms)
        released, self._released = self._released, []
        return released

    def take_events(self) -> list[G2Event]:
        events, self._events = self._events, []
        return events

    def debug_state(self) -> dict[str, object]:
        """Internals for diagnosing a stalled rank."""
        link = self._onboard_link
        return {
            "now_ms": self._now_ms,
            "onboards": len(self._onboards),
            "completed_onboards": len(self._completed_onboards),
            "runs": len(self._runs),
            "batches": len(self._batches),
            "released": len(self._released),
            "onboard_link_finish_ms": link.earliest_finish_ms(),
            "onboard_link_last_update_ms": link.last_update_ms,
            "onboard_link_active": link.num_active,
        }

    def earliest_deadline_ms(self) -> float | None:
        """Min of the onboard completions and the deadlines of outstanding offload batches
        (an un-ACKed batch counts from when it was sent; released slots not yet handed back
        count as due now)."""
        best = self._onboard_link.earliest_finish_ms()
        if self._released:
            best = self._now_ms if best is None else min(best, self._now_ms)
        for batch in self._batches.values():
            due = batch.deadline_ms if batch.acked else batch.sent_ms
            if math.isinf(due):
                due = self._now_ms
            if best is None or due < best:
                best = due
        return best

    def wait_for_fence(self, timeout_s: float) -> bool:
        """Block until the coordinator's drain fence arrives (all its G2 events precede it).

        Returns False on timeout. Each fence satisfies one call.
        """
        sock = self._socket()
        deadline = time.monotonic() + timeout_s
        while self._fences_received <= self._fences_consumed:
            left_ms = (deadline - time.monotonic()) * 1000.0
            if left_ms <= 0:
                return False
            if sock.poll(max(1, math.ceil(left_ms)), zmq.POLLIN):
                self.receive()
        self._fences_consumed += 1
        return True

    # -- G2 -> G1 --------------------------------------------------------------------------

    def prepare_onboard(self, plhs: Sequence[Plh]) -> OnboardPlan | None:
        """Pin the longest contiguous prefix of `plhs` that G2 holds; None if not the first."""
        # NOTE: -1 marks a PLH the replica does not know (seq hashes are >= 0); an int
        # marker compares faster than None.
        seqs: list[SeqHash] = list(map(self._plh_to_seq.get, plhs, repeat(_UNKNOWN)))
        if _UNKNOWN in seqs:
            del seqs[seqs.index(_UNKNOWN) :]
        if not seqs:
            return None
        run = self.view.pin_prefix(seqs)
        if run is None:
            self._counts["onboard_misses"] += 1
            return None
        self._runs[run.run_id] = run
        num_blocks = len(run.slots)
        # NOTE: slicing a list copies it already.
        plan_plhs = plhs[:num_blocks] if type(plhs) is list else list(plhs[:num_blocks])
        return OnboardPlan(plan_plhs, run.run_id)

    def cancel_onboard(self, plan: OnboardPlan) -> None:
        run = self._runs.pop(plan.token, None)
        if run is None:
            raise ProtocolError(f"cancel of an unknown onboard plan {plan.token}")
        self._counts["pin_violations"] += self.view.release(run)

    def start_onboard(self, plan: OnboardPlan, now_ms: float) -> SwapInHandle:
        run = self._runs.get(plan.token)
        if run is None:
            raise ProtocolError(f"start of an unknown onboard plan {plan.token}")
        view = self.view
        metas = [
            BlockMeta(b.seq_hash, b.parent_hash, b.local_hash, ids)
            for b, ids in zip(view.read_blocks(run), view.read_tokens(run).tolist(), strict=True)
        ]
        self._advance_onboards(now_ms)
        link = self._onboard_link
        transfer_id = self._next_transfer_id
        self._next_transfer_id += 1
        link.start(now_ms, plan.num_blocks * self._block_bytes, transfer_id)
        handle = SwapInHandle(transfer_id, plan, link.deadline_ms(transfer_id), metas=metas)
        self._onboards[transfer_id] = handle
        self._counts["onboards_started"] += 1
        self._counts["onboard_blocks"] += plan.num_blocks
        return handle

    def _advance_onboards(self, now_ms: float) -> None:
        if not self._onboards:
            return
        for transfer_id in self._onboard_link.advance_to(now_ms):
            handle = self._onboards.pop(transfer_id)
            run = self._runs.pop(handle.plan.token, None)
            if run is not None:
                self._counts["pin_violations"] += self.view.release(run)
            handle.completed = True
            self._completed_onboards.append(handle)

    def take_completed_onboards(self) -> list[SwapInHandle]:
        done, self._completed_onboards = self._completed_onboards, []
        return done

    # -- queries ---------------------------------------------------------------------------

    def contains(self, plh: Plh) -> bool:
        """Whether G2 holds `plh` now: known to the replica and READY in the shared index."""
        seq = self._plh_to_seq.get(plh)
        return seq is not None and self.view.find_slot(seq) >= 0

    def replica_seq_hashes(self) -> list[SeqHash]:
        """The sequence hashes this client believes G2 holds (from the event stream)."""
        return list(self._seq_to_plh)

    def announced_seq_hashes(self) -> list[SeqHash]:
        """The G2 blocks this rank has announced (host-tier Stored, not yet Removed): what its
        event stream says it can onboard, and what its state dump reports."""
        return self._announcer.announced_seq_hashes()

    def check_invariants(self) -> None:
        """Raise InvariantError unless this rank's pin row equals the pins it holds (its
        onboards in progress); meant for stress runs."""
        view = self.view
        view.check_ledger()
        if view.num_runs != len(self._runs):
            raise InvariantError(
                f"rank {self.rank}: {view.num_runs} pinned runs, {len(self._runs)} onboard plans"
            )

    def record_next_event_seq(self, seq: int) -> None:
        """Store this rank's next KV event seq in its header cell (`rank_next_seq[rank]`), so a
        supervisor restarting the rank continues the stream (`shmkv.shm.read_next_event_seq`)."""
        if not self._closed and 0 <= seq <= U64_MASK:
            self._segment.rank_next_seq[self.rank] = seq

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Unpin everything, drop the view, unmap the segment, close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._view is not None:
                self._view.close()  # INVARIANT: releases every pin this rank still holds
                self._view = None
            self._runs.clear()
            self._onboards.clear()
        finally:
            try:
                self._segment.close()
            finally:
                if self._sock is not None:
                    self._sock.close(linger=0)
                    self._sock = None
                if self._own_context:
                    self._ctx.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _parse_events(events: list[Any]) -> tp.G2EventColumns:
    """Validate a JSON G2_EVENTS list into columns; raises ProtocolError before anything is
    applied."""
    kinds = bytearray()
    seqs: list[int] = []
    columns = tp.G2EventColumns(b"", seqs, [], [], [], [])
    for event in events:
        if not isinstance(event, list) or not event:
            raise ProtocolError(f"G2_EVENTS: bad event {event!r:.80}")
        kind = event[0]
        if kind == "S" and len(event) == 6:
            _, seq, parent, local, position, has_tokens = event
            if (
                type(seq) is not int
                or type(parent) is not int
                or type(local) is not int
                or type(position) is not int
                or has_tokens not in (0, 1)
                or not 0 <= seq <= U64_MASK
                or not 0 <= local <= U64_MASK
                or not (parent == _NO_PARENT or 0 <= parent <= U64_MASK)
                or not 0 <= position <= MAX_POSITION
            ):
                raise ProtocolError(f"G2_EVENTS: bad store {event!r:.120}")
            kinds.append(tp.G2_EVENT_STORED)
            seqs.append(seq)
            columns.parents.append(parent)
            columns.locals.append(local)
            columns.positions.append(position)
            columns.has_tokens.append(bool(has_tokens))
        elif kind == "R" and len(event) == 2:
            seq = event[1]
            if type(seq) is not int or not 0 <= seq <= U64_MASK:
                raise ProtocolError(f"G2_EVENTS: bad removal {event!r:.80}")
            kinds.append(tp.G2_EVENT_REMOVED)
            seqs.append(seq)
        else:
            raise ProtocolError(f"G2_EVENTS: bad event {event!r:.80}")
    return columns._replace(kinds=bytes(kinds))


__all__ = ["HELLO_TIMEOUT_S", "ClientStats", "SharedG2Client"]
