"""Layer 2: the shared G2 segment (one `multiprocessing.shared_memory` block per fleet).

Owns the byte layout, creation (owner-only, sized against /dev/shm, pre-allocated), attaching
(without Python's resource tracker), closing, unlinking, and the sweep of segments left behind
by a dead coordinator. The protocol that reads and writes the arrays lives in `shmkv.g2`.

Segment `shmkv_<fleet_id>_g2` (S slots, R ranks, B tokens per block, T = 2*S index cells
rounded up to 16; every region starts on a 64-byte cache line)::

    offset
    0       +--------------------------------------------------------------+
            | header (fixed, 112 B, little-endian)                         |
            |   0 magic "SHMKVG2\\0"    8 layout_version u32  12 header_bytes |
            |  16 capacity S u64       24 block_size B u32   28 num_ranks R |
            |  32 index_size T u64     40 coordinator_pid i64               |
            |  48 coordinator_create_time f64 (psutil)   56 epoch u64        |
            |  64 created_unix f64     72 total_bytes u64  80 fleet_id 32 B  |
    128     | rank_epoch[R] u64        coordinator bumps when rank r restarts|
    128+8R  | rank_next_seq[R] u64     rank r's next KV event seq (its cell)  |
            +--------------------------------------------------------------+  header_bytes
            | state[S]       i8   FREE / RESERVED / READY / EVICTING      coordinator
            | flags[S]       u8   bit 0 = has parent                      coordinator
            | owner[S]       i16  rank that reserved / stored it, -1 none coordinator
            | position[S]    i32  block position in its sequence          coordinator
            | gen[S]         i64  ABA guard, +1 on every return to FREE   coordinator
            | seq_hash[S]    u64  chained sequence hash                   coordinator
            | parent_hash[S] u64  parent's sequence hash (flags bit 0)    coordinator
            | local_hash[S]  u64  hash of the block's own tokens          coordinator
            | pins[R, S']    i16  row r = rank r's pin counts, S' = S     rank r only
            |                     rounded up to 32 (each row on a line)
            | index_slot[T]  i32  open addressing: slot, -1 empty, -2 tomb coordinator
            | tokens[S, B]   u32  token ids of each block                 coordinator
            +--------------------------------------------------------------+  total_bytes

Bytes of shared metadata per slot, excluding token ids: 40 (state 1 + flags 1 + owner 2 +
position 4 + gen 8 + three hashes 24) + 8 (index: two 4-byte cells per slot) + 2*R (pins):
50 B for R=1, 52 for R=2, 56 for R=4, **64 for R=8** (the issue's budget). Pins are int16: a
rank may hold up to 32767 pins on one slot at a time (concurrent onboards of one prefix),
int8's 127 could be reached by a busy rank sharing one system prompt; int32 would cost 16 B
more per slot at R=8. The index keeps no key: a reader compares `seq_hash[slot]`, which it has
to read anyway to validate the slot.

Lifecycle: only the coordinator creates and unlinks. Neither side registers the segment with
`multiprocessing.resource_tracker` (on 3.11 an attacher's tracker would unlink it at exit,
shm.md E1; the creator's tracker would unlink it behind the supervisor's back and spawn a
tracker process). A SIGKILLed coordinator therefore leaves the segment in /dev/shm until
`sweep_stale_segments` (run by `shmkv cleanup` and at fleet start) finds its header naming a
dead process.

Segment family convention (so the sweep can judge any `shmkv_*` segment): bytes 0..4 are
`SHMKV`, bytes 40..56 hold the coordinator pid (i64) and psutil create time (f64).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import struct
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self, TypeAlias

import numpy as np
import numpy.typing as npt
import psutil  # type: ignore[import-untyped,unused-ignore]

from shmkv.errors import CapacityError, ConfigError, SharedMemoryError

# ---------------------------------------------------------------------------------------------
# Constants of the layout (bump LAYOUT_VERSION on any change below).

MAGIC: Final = b"SHMKVG2\x00"
FAMILY_MAGIC: Final = b"SHMKV"
LAYOUT_VERSION: Final = 1
SHM_DIR: Final = Path("/dev/shm")
SEGMENT_PREFIX: Final = "shmkv_"
MAX_NAME_LEN: Final = 31
"""macOS limit on POSIX shm names; kept everywhere so names are portable."""
CACHE_LINE: Final = 64

FREE: Final = 0
RESERVED: Final = 1
READY: Final = 2
EVICTING: Final = 3
STATE_NAMES: Final = ("FREE", "RESERVED", "READY", "EVICTING")

FLAG_HAS_PARENT: Final = 1
NO_OWNER: Final = -1

INDEX_EMPTY: Final = -1
INDEX_TOMBSTONE: Final = -2

PIN_DTYPE: Final = np.int16
PIN_MAX: Final = int(np.iinfo(np.int16).max)

MAX_CAPACITY: Final = 1 << 30
"""Index cells are int32 and T = 2*S must stay below 2**31."""
MAX_RANKS: Final = 1024
MAX_BLOCK_SIZE: Final = 1 << 16

_HEADER = struct.Struct("<8sIIQIIQqdQdQ32s")
_HEADER_FIXED_BYTES: Final = 128
_OWNER_FIELDS = struct.Struct("<qd")
_OWNER_OFFSET: Final = 40
_EPOCH_OFFSET: Final = 56
assert _HEADER.size <= _HEADER_FIXED_BYTES
assert struct.calcsize("<8sIIQIIQ") == _OWNER_OFFSET

_FLEET_ID_RE = re.compile(r"[A-Za-z0-9-]+")
_FLEET_ID_MAX: Final = MAX_NAME_LEN - len(SEGMENT_PREFIX) - len("_g2")
_CREATE_TIME_TOLERANCE_S: Final = 0.5

# Per-slot metadata bytes, excluding pins and index (see module docstring).
_SLOT_FIELDS: Final = (
    ("state", np.int8),
    ("flags", np.uint8),
    ("owner", np.int16),
    ("position", np.int32),
    ("gen", np.int64),
    ("seq_hash", np.uint64),
    ("parent_hash", np.uint64),
    ("local_hash", np.uint64),
)
_IntFormat: TypeAlias = Literal["b", "B", "h", "i", "I", "l", "L", "q", "Q"]
# NOTE: memoryview reads 'l'/'L' about 2x faster than 'q'/'Q'; same 8 bytes on LP64 Linux.
_I64: Final[_IntFormat] = "l" if struct.calcsize("l") == 8 else "q"
_U64: Final[_IntFormat] = "L" if struct.calcsize("L") == 8 else "Q"
_CELL_FORMATS: Final[dict[str, _IntFormat]] = {
    "state": "b",
    "flags": "B",
    "owner": "h",
    "position": "i",
    "gen": _I64,
    "seq_hash": _U64,
    "parent_hash": _U64,
    "local_hash": _U64,
}
_SLOT_BYTES: Final = sum(np.dtype(dt).itemsize for _, dt in _SLOT_FIELDS)
_INDEX_CELLS_PER_SLOT: Final = 2
_INDEX_DTYPE: Final = np.int32


def _align(offset: int, to: int = CACHE_LINE) -> int:
    return (offset + to - 1) // to * to


def segment_name(fleet_id: str) -> str:
    """The G2 segment name of a fleet: `shmkv_<fleet_id>_g2` (at most 31 characters).

    Raises:
        ConfigError: the fleet id is empty, too long, or not `[A-Za-z0-9-]`.
    """
    if not _FLEET_ID_RE.fullmatch(fleet_id) or len(fleet_id) > _FLEET_ID_MAX:
        raise ConfigError(
            f"fleet id {fleet_id!r} must be 1..{_FLEET_ID_MAX} characters of [A-Za-z0-9-] "
            "(the segment name must fit in 31 characters)"
        )
    return f"{SEGMENT_PREFIX}{fleet_id}_g2"


def bytes_per_slot(num_ranks: int) -> int:
    """Shared metadata bytes per slot, excluding token ids: slot fields + index + pin rows."""
    pin_bytes = np.dtype(PIN_DTYPE).itemsize * num_ranks
    return _SLOT_BYTES + _INDEX_CELLS_PER_SLOT * np.dtype(_INDEX_DTYPE).itemsize + pin_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class G2Layout:
    """Byte offsets of every region of a G2 segment; a pure function of (S, R, B)."""

    capacity: int
    """S: number of slots."""
    block_size: int
    """B: tokens per block."""
    num_ranks: int
    """R: number of rank pin rows."""
    index_size: int
    """T: number of index cells (2*S rounded up to a cache line of int32)."""
    pin_row_stride: int
    """Elements between two pin rows (S rounded up to a cache line of int16)."""
    header_bytes: int
    offsets: dict[str, int]
    total_bytes: int

    @classmethod
    def compute(cls, capacity: int, block_size: int, num_ranks: int) -> G2Layout:
        """Lay out a segment.

        Raises:
            ConfigError: a dimension is out of range.
        """
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ConfigError(f"G2 capacity must be 1..{MAX_CAPACITY} slots, got {capacity}")
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise ConfigError(f"block size must be 1..{MAX_BLOCK_SIZE} tokens, got {block_size}")
        if not 1 <= num_ranks <= MAX_RANKS:
            raise ConfigError(f"number of ranks must be 1..{MAX_RANKS}, got {num_ranks}")
        index_size = _align(_INDEX_CELLS_PER_SLOT * capacity, CACHE_LINE // 4)
        pin_row_stride = _align(capacity, CACHE_LINE // 2)
        header_bytes = _align(_HEADER_FIXED_BYTES + 16 * num_ranks)
        offsets: dict[str, int] = {}
        cursor = header_bytes
        for field, dtype in _SLOT_FIELDS:
            offsets[field] = cursor
            cursor = _align(cursor + np.dtype(dtype).itemsize * capacity)
        offsets["pins"] = cursor
        cursor = _align(cursor + 2 * pin_row_stride * num_ranks)
        offsets["index_slot"] = cursor
        cursor = _align(cursor + 4 * index_size)
        offsets["tokens"] = cursor
        cursor = _align(cursor + 4 * capacity * block_size)
        return cls(
            capacity=capacity,
            block_size=block_size,
            num_ranks=num_ranks,
            index_size=index_size,
            pin_row_stride=pin_row_stride,
            header_bytes=header_bytes,
            offsets=offsets,
            total_bytes=cursor,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentHeader:
    """The decoded fixed header of a G2 segment."""

    magic: bytes
    layout_version: int
    header_bytes: int
    capacity: int
    block_size: int
    num_ranks: int
    index_size: int
    coordinator_pid: int
    coordinator_create_time: float
    epoch: int
    created_unix: float
    total_bytes: int
    fleet_id: str

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> SegmentHeader:
        (magic, version, header_bytes, capacity, block_size, num_ranks, index_size, pid,
         create_time, epoch, created_unix, total_bytes, raw_fleet) = _HEADER.unpack_from(data)  # fmt: skip
        return cls(
            magic=magic,
            layout_version=version,
            header_bytes=header_bytes,
            capacity=capacity,
            block_size=block_size,
            num_ranks=num_ranks,
            index_size=index_size,
            coordinator_pid=pid,
            coordinator_create_time=create_time,
            epoch=epoch,
            created_unix=created_unix,
            total_bytes=total_bytes,
            fleet_id=raw_fleet.rstrip(b"\x00").decode("ascii", "replace"),
        )


# ---------------------------------------------------------------------------------------------
# Attaching without the resource tracker (shm.md E1).

_TRACKER_PATCH_LOCK = threading.Lock()


def _register_nothing(name: Sized, rtype: str) -> None:
    """Stands in for `resource_tracker.register` while this module maps a segment."""


def _map_untracked(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without registering it with the resource tracker."""
    if sys.version_info >= (3, 13):  # pragma: no cover - the project runs 3.11
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg,unused-ignore]
    # NOTE: `shared_memory` looks up `resource_tracker.register` at call time, so swapping the
    # module attribute is enough. The lock keeps two threads of this process from interleaving.
    with _TRACKER_PATCH_LOCK:
        original = resource_tracker.register
        resource_tracker.register = _register_nothing
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = original


def _buffer_of(shm: shared_memory.SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:
        raise SharedMemoryError(f"segment {shm.name} is closed")
    return buf


def _unlink_path(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _own_identity() -> tuple[int, float]:
    me = psutil.Process()
    return me.pid, me.create_time()


# ---------------------------------------------------------------------------------------------


class G2Segment:
    """One mapped G2 segment and the numpy views over it; the single owner of that mapping.

    `create` (coordinator side) makes and initialises the segment; `attach` (rank side) maps an
    existing one and validates it. Either way, `close()` drops every view and unmaps; only the
    creator may `unlink()`. As a context manager the creator closes *and* unlinks on exit, an
    attacher only closes.

    The array attributes are views into shared memory: do not keep references to them (or to
    slices of them) beyond `close()`, which would otherwise fail with BufferError.
    """

    state: npt.NDArray[np.int8]
    flags: npt.NDArray[np.uint8]
    owner: npt.NDArray[np.int16]
    position: npt.NDArray[np.int32]
    gen: npt.NDArray[np.int64]
    seq_hash: npt.NDArray[np.uint64]
    parent_hash: npt.NDArray[np.uint64]
    local_hash: npt.NDArray[np.uint64]
    pins: npt.NDArray[np.int16]
    index_slot: npt.NDArray[np.int32]
    tokens: npt.NDArray[np.uint32]
    rank_epoch: npt.NDArray[np.uint64]
    rank_next_seq: npt.NDArray[np.uint64]

    def __init__(
        self, shm: shared_memory.SharedMemory, layout: G2Layout, *, is_owner: bool
    ) -> None:
        """Wrap a mapped segment; use `create` or `attach` instead."""
        self._shm: shared_memory.SharedMemory | None = shm
        self._name = shm.name.lstrip("/")
        self._layout = layout
        self._is_owner = is_owner
        self._unlinked = False
        self._memoryviews: list[memoryview[int]] = []
        self._map_views(_buffer_of(shm))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        fleet_id: str,
        *,
        capacity: int,
        block_size: int,
        num_ranks: int,
        epoch: int = 0,
    ) -> Self:
        """Create, pre-allocate and initialise the fleet's G2 segment (coordinator side).

        The file is created owner-only (0600) under /dev/shm, its size checked against the free
        space of /dev/shm and reserved with `posix_fallocate`, so a full tmpfs fails here with
        CapacityError instead of killing a process with SIGBUS on first touch. The magic is
        written last: a half-initialised segment never validates.

        Raises:
            ConfigError: a bad fleet id or dimension.
            CapacityError: the segment cannot fit in /dev/shm.
            SharedMemoryError: the name exists already, or the OS refused.
        """
        name = segment_name(fleet_id)
        layout = G2Layout.compute(capacity, block_size, num_ranks)
        path = SHM_DIR / name
        try:
            free_bytes = shutil.disk_usage(SHM_DIR).free
        except OSError as exc:
            raise SharedMemoryError(f"cannot inspect {SHM_DIR}: {exc}") from exc
        if layout.total_bytes > free_bytes:
            raise CapacityError(
                f"G2 segment {name} needs {layout.total_bytes:,} bytes but {SHM_DIR} has only "
                f"{free_bytes:,} free: reduce --num-g2-blocks or enlarge /dev/shm "
                "(docker run --shm-size=...)"
            )
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise SharedMemoryError(
                f"segment {name} already exists: another fleet uses this id, or a dead one left "
                "it behind (run `shmkv cleanup`)"
            ) from exc
        except OSError as exc:
            raise SharedMemoryError(f"cannot create {path}: {exc}") from exc
        segment: Self | None = None
        try:
            try:
                os.fchmod(fd, 0o600)  # INVARIANT: owner-only whatever the umask was
                os.posix_fallocate(fd, 0, layout.total_bytes)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG):
                    raise CapacityError(
                        f"/dev/shm cannot back the {layout.total_bytes:,}-byte G2 segment {name} "
                        f"({os.strerror(exc.errno)}): reduce --num-g2-blocks or enlarge /dev/shm"
                    ) from exc
                raise SharedMemoryError(f"cannot allocate {path}: {exc}") from exc
            finally:
                os.close(fd)
            try:
                shm = _map_untracked(name)
            except OSError as exc:
                raise SharedMemoryError(f"cannot map {name}: {exc}") from exc
            segment = cls(shm, layout, is_owner=True)
            segment._initialise(fleet_id, epoch)
        except BaseException:
            if segment is not None:
                segment.close()
            _unlink_path(path)
            raise
        return segment

    @classmethod
    def attach(cls, name: str) -> Self:
        """Map an existing G2 segment (rank side) after validating its header.

        Does not register the segment with the resource tracker, so this process exiting never
        unlinks it.

        Raises:
            SharedMemoryError: no such segment, or it is not a G2 segment of this layout version.
        """
        try:
            shm = _map_untracked(name)
        except FileNotFoundError as exc:
            raise SharedMemoryError(f"no shared-memory segment named {name!r}") from exc
        except (OSError, ValueError) as exc:
            raise SharedMemoryError(f"cannot attach {name!r}: {exc}") from exc
        try:
            layout = cls._validate(name, shm)
        except BaseException:
            shm.close()
            raise
        return cls(shm, layout, is_owner=False)

    @staticmethod
    def _validate(name: str, shm: shared_memory.SharedMemory) -> G2Layout:
        if shm.size < _HEADER_FIXED_BYTES:
            raise SharedMemoryError(f"segment {name!r} is too small ({shm.size} B) to be G2")
        header = SegmentHeader.unpack(_buffer_of(shm))
        if header.magic != MAGIC:
            raise SharedMemoryError(
                f"segment {name!r} is not a shmkv G2 segment (magic {header.magic!r}); "
                "it may still be initialising, or belong to another program"
            )
        if header.layout_version != LAYOUT_VERSION:
            raise SharedMemoryError(
                f"segment {name!r} has layout version {header.layout_version}, this shmkv "
                f"reads {LAYOUT_VERSION}: run every process of a fleet from the same shmkv"
            )
        try:
            layout = G2Layout.compute(header.capacity, header.block_size, header.num_ranks)
        except ConfigError as exc:
            raise SharedMemoryError(f"segment {name!r} has a corrupt header: {exc}") from exc
        if (
            layout.total_bytes != header.total_bytes
            or layout.index_size != header.index_size
            or layout.header_bytes != header.header_bytes
            or shm.size < layout.total_bytes
        ):
            raise SharedMemoryError(
                f"segment {name!r} header disagrees with its size ({shm.size} B mapped, "
                f"{header.total_bytes} B declared, {layout.total_bytes} B expected)"
            )
        return layout

    def _map_views(self, buf: memoryview) -> None:
        lay = self._layout
        cap, off = lay.capacity, lay.offsets
        raw = np.frombuffer(buf, dtype=np.uint8, count=lay.total_bytes)
        for field, dtype in _SLOT_FIELDS:
            start = off[field]
            view = raw[start : start + np.dtype(dtype).itemsize * cap].view(dtype)
            setattr(self, field, view)
        pins_all = raw[off["pins"] : off["pins"] + 2 * lay.pin_row_stride * lay.num_ranks]
        self.pins = pins_all.view(np.int16).reshape(lay.num_ranks, lay.pin_row_stride)[:, :cap]
        index_start = off["index_slot"]
        self.index_slot = raw[index_start : index_start + 4 * lay.index_size].view(np.int32)
        tokens_start = off["tokens"]
        tokens_flat = raw[tokens_start : tokens_start + 4 * cap * lay.block_size].view(np.uint32)
        self.tokens = tokens_flat.reshape(cap, lay.block_size)
        rank_bytes = 8 * lay.num_ranks
        self.rank_epoch = raw[_HEADER_FIXED_BYTES : _HEADER_FIXED_BYTES + rank_bytes].view(
            np.uint64
        )
        seq_start = _HEADER_FIXED_BYTES + rank_bytes
        self.rank_next_seq = raw[seq_start : seq_start + rank_bytes].view(np.uint64)

    def _initialise(self, fleet_id: str, epoch: int) -> None:
        buf = self._buf()
        lay = self._layout
        self.index_slot.fill(INDEX_EMPTY)
        self.owner.fill(NO_OWNER)
        pid, create_time = _own_identity()
        _HEADER.pack_into(
            buf,
            0,
            b"\x00" * 8,
            LAYOUT_VERSION,
            lay.header_bytes,
            lay.capacity,
            lay.block_size,
            lay.num_ranks,
            lay.index_size,
            pid,
            create_time,
            epoch,
            time.time(),
            lay.total_bytes,
            fleet_id.encode("ascii"),
        )
        # INVARIANT: the magic goes in last, so attach() never accepts a half-built segment.
        buf[0 : len(MAGIC)] = MAGIC

    # -- scalar access (memoryviews: about 2x faster than numpy for one cell) ------------------

    def cells(self, field: str, row: int | None = None) -> memoryview[int]:
        """A typed memoryview over one array (or pin row `row`) for scalar reads and writes.

        `tokens` is flat: block s holds items `s*block_size .. (s+1)*block_size - 1`.

        Items read as Python ints. The segment owns the memoryview and releases it in
        `close()`; callers must drop their references by then.

        Raises:
            ConfigError: an unknown field, or `row` missing / out of range for "pins".
        """
        lay = self._layout
        fmt: _IntFormat
        if field == "pins":
            if row is None or not 0 <= row < lay.num_ranks:
                raise ConfigError(f"pins needs a row in 0..{lay.num_ranks - 1}, got {row}")
            start = lay.offsets["pins"] + row * lay.pin_row_stride * 2
            fmt, count = "h", lay.capacity
        elif field == "index_slot":
            start, fmt, count = lay.offsets[field], "i", lay.index_size
        elif field == "tokens":
            start, fmt, count = lay.offsets[field], "I", lay.capacity * lay.block_size
        elif field in _CELL_FORMATS and row is None:
            start, fmt, count = lay.offsets[field], _CELL_FORMATS[field], lay.capacity
        else:
            raise ConfigError(f"no scalar cells for field {field!r} (row {row})")
        width = struct.calcsize(fmt)
        view = self._buf()[start : start + width * count].cast(fmt)
        self._memoryviews.append(view)
        return view

    # -- header --------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def layout(self) -> G2Layout:
        return self._layout

    @property
    def capacity(self) -> int:
        return self._layout.capacity

    @property
    def block_size(self) -> int:
        return self._layout.block_size

    @property
    def num_ranks(self) -> int:
        return self._layout.num_ranks

    @property
    def index_size(self) -> int:
        return self._layout.index_size

    @property
    def total_bytes(self) -> int:
        return self._layout.total_bytes

    @property
    def is_owner(self) -> bool:
        return self._is_owner

    @property
    def closed(self) -> bool:
        return self._shm is None

    def header(self) -> SegmentHeader:
        """Decode the fixed header (a snapshot)."""
        return SegmentHeader.unpack(self._buf())

    @property
    def fleet_id(self) -> str:
        return self.header().fleet_id

    @property
    def coordinator_pid(self) -> int:
        pid: int = _OWNER_FIELDS.unpack_from(self._buf(), _OWNER_OFFSET)[0]
        return pid

    @property
    def coordinator_create_time(self) -> float:
        create_time: float = _OWNER_FIELDS.unpack_from(self._buf(), _OWNER_OFFSET)[1]
        return create_time

    @property
    def epoch(self) -> int:
        value: int = struct.unpack_from("<Q", self._buf(), _EPOCH_OFFSET)[0]
        return value

    @epoch.setter
    def epoch(self, value: int) -> None:
        struct.pack_into("<Q", self._buf(), _EPOCH_OFFSET, value)

    def _buf(self) -> memoryview:
        if self._shm is None:
            raise SharedMemoryError(f"segment {self._name} is closed")
        return _buffer_of(self._shm)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Drop every view and unmap. Idempotent.

        Raises:
            SharedMemoryError: someone still holds a view. The segment's own views are gone by
                then; drop the stray reference and call close() again.
        """
        shm = self._shm
        if shm is None:
            return
        for view in self._memoryviews:
            view.release()
        self._memoryviews.clear()
        for field in (*(f for f, _ in _SLOT_FIELDS), "pins", "index_slot", "tokens",
                      "rank_epoch", "rank_next_seq"):  # fmt: skip
            self.__dict__.pop(field, None)
        try:
            shm.close()
        except BufferError as exc:
            raise SharedMemoryError(
                f"cannot unmap {self._name}: a numpy view or memoryview of it is still "
                "referenced; drop it (close the G2RankView / G2Directory using the segment "
                "first) and call close() again"
            ) from exc
        self._shm = None

    def unlink(self) -> None:
        """Remove the segment name from /dev/shm (creator only). Idempotent.

        Mapped views stay valid until closed; the memory is freed once every process unmapped.

        Raises:
            SharedMemoryError: this process attached the segment instead of creating it.
        """
        if not self._is_owner:
            raise SharedMemoryError(f"only the coordinator that created {self._name} may unlink it")
        if not self._unlinked:
            _unlink_path(SHM_DIR / self._name)
            self._unlinked = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # NOTE: unlink first: if an exception's traceback still holds a view, close() fails,
        # but the name must not outlive the block.
        try:
            if self._is_owner:
                self.unlink()
        finally:
            self.close()

    def __del__(self) -> None:
        if getattr(self, "_shm", None) is not None:
            warnings.warn(f"G2Segment {self._name} was not closed", ResourceWarning, stacklevel=1)
            with contextlib.suppress(SharedMemoryError):
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._shm is None else "open"
        role = "owner" if self._is_owner else "attached"
        lay = self._layout
        return (
            f"<G2Segment {self._name} {state} {role} S={lay.capacity} R={lay.num_ranks} "
            f"B={lay.block_size} {lay.total_bytes:,} B>"
        )


def read_next_event_seq(name: str, rank: int) -> int:
    """Rank `rank`'s next KV event seq as last stored in segment `name` (`rank_next_seq`).

    For a supervisor restarting a rank: attach, read one cell, close.

    Raises:
        SharedMemoryError: the segment is missing or invalid.
        ConfigError: the rank is out of range.
    """
    with G2Segment.attach(name) as segment:
        if not 0 <= rank < segment.num_ranks:
            raise ConfigError(f"rank {rank} outside 0..{segment.num_ranks - 1} of {name}")
        return int(segment.rank_next_seq[rank])


# ---------------------------------------------------------------------------------------------
# Sweep of stale segments.


def _iter_candidates(shm_dir: Path, prefix: str) -> Iterator[Path]:
    try:
        entries = list(shm_dir.iterdir())
    except FileNotFoundError:
        return
    for path in entries:
        if path.name.startswith(prefix):
            yield path


def _coordinator_alive(pid: int, create_time: float) -> bool:
    """True unless the process is provably gone (or the pid now names another process)."""
    if pid <= 0:
        return False
    try:
        actual = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # NOTE: cannot tell: keep the segment, a sweep must never hurt a live fleet
    return abs(float(actual) - create_time) <= _CREATE_TIME_TOLERANCE_S


def _is_stale(path: Path, grace_s: float, now_unix: float) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(_HEADER_FIXED_BYTES)
            mtime = os.fstat(handle.fileno()).st_mtime
    except (FileNotFoundError, PermissionError):
        return False  # gone already, or another user's: not ours to judge
    young = now_unix - mtime < grace_s
    if len(head) < _HEADER_FIXED_BYTES or not head.startswith(FAMILY_MAGIC):
        # Not (yet) a valid segment: it may be one a live coordinator is initialising.
        return not young
    pid, create_time = _OWNER_FIELDS.unpack_from(head, _OWNER_OFFSET)
    return not _coordinator_alive(pid, create_time)


def sweep_stale_segments(
    prefix: str = SEGMENT_PREFIX,
    *,
    grace_s: float = 60.0,
    shm_dir: Path = SHM_DIR,
) -> list[str]:
    """Unlink segments left behind by dead coordinators; returns the names removed.

    A `prefix` segment is stale when its header names a coordinator (pid + psutil create time)
    that no longer runs, or when it has no shmkv magic and is older than `grace_s` seconds
    (younger ones may be mid-creation). Segments whose coordinator is alive, or whose owner
    cannot be inspected, are kept.

    Raises:
        ConfigError: `prefix` does not start with `shmkv_` (the sweep never touches others').
    """
    if not prefix.startswith(SEGMENT_PREFIX):
        raise ConfigError(f"sweep prefix must start with {SEGMENT_PREFIX!r}, got {prefix!r}")
    removed: list[str] = []
    now_unix = time.time()
    for path in _iter_candidates(shm_dir, prefix):
        if _is_stale(path, grace_s, now_unix):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise SharedMemoryError(f"cannot unlink stale segment {path}: {exc}") from exc
            removed.append(path.name)
    return sorted(removed)


__all__ = [
    "CACHE_LINE",
    "EVICTING",
    "FLAG_HAS_PARENT",
    "FREE",
    "INDEX_EMPTY",
    "INDEX_TOMBSTONE",
    "LAYOUT_VERSION",
    "MAGIC",
    "NO_OWNER",
    "PIN_DTYPE",
    "PIN_MAX",
    "READY",
    "RESERVED",
    "SEGMENT_PREFIX",
    "SHM_DIR",
    "STATE_NAMES",
    "G2Layout",
    "G2Segment",
    "SegmentHeader",
    "bytes_per_slot",
    "read_next_event_seq",
    "segment_name",
    "sweep_stale_segments",
]
