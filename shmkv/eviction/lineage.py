"""Layer 1: the Lineage eviction backend (`behavior.md` §5.1), the default inactive-pool order.

Owns a forest over the inactive blocks of one pool, one node per (position, current fragment)
of their positional lineage hash (PLH):

* a *real* node is an inactive block; it remembers its full PLH and its insertion tick;
* a *ghost* node stands for a block that is not inactive (active, never stored, or just
  reactivated) but still has inactive descendants. A ghost left by reactivating a real node
  keeps that node's PLH and parent link; a *placeholder* ghost (created as the missing parent
  of an inserted node) has neither until a block fills it.

Only *leaves* (real nodes without children) are evictable, oldest insertion tick first. Ticks
are unique, so the leaf queue is a min-heap of ticks plus a tick -> node map; heap entries of
nodes that stopped being leaves are skipped lazily and compacted away now and then. A real node
that becomes a leaf again re-enters the queue with its original tick. One leaf known to be the
oldest may wait outside both (`_front`): a chain evicted block by block then costs no heap or
map traffic.

Hot-path representation (this sits under every block-manager operation): the nodes of one
position live in one *level*, a dict keyed by their current fragment; a PLH is decoded into
(position, current fragment, parent fragment), all small ints, so only the decoding touches the
128-bit PLH. The decoding is kept in a `LineageEntry` (the block manager's registrations are
ones), so a block is decoded once however often it enters and leaves the pool. A node is a
`_Node` (int fields, -1 for "none") that knows its level and links to its parent node, so
pruning walks up without a lookup. Compiled (mypyc) it is a native struct.
`encode_key` / `decode_key` pack (position, fragment) into one int for other lineage indexes.
"""

from __future__ import annotations

from collections.abc import Iterable
from heapq import heapify, heappop, heappush
from typing import Any, Final, NamedTuple, TypeAlias

from shmkv.errors import InvariantError
from shmkv.hashing import lineage_key, lineage_parent_key
from shmkv.ids import Plh

# Per PLH mode (top two bits): (fragment bits, first position of the mode, position bits).
# Mirrors `shmkv.hashing` (`behavior.md` §1.4); tests pin it against lineage_key/parent_key.
_MODES: Final = ((59, 0, 8), (55, 256, 16), (51, 1 << 16, 24))
_MODE_SHIFT: Final = 126
_PLH_LIMIT: Final = len(_MODES) << _MODE_SHIFT

# Mode 0 (positions 0..255) is by far the common case; its decoding is inlined: `plh >> 118`
# is the position (a mode-0 PLH is below 1 << 126), the low 59 bits the current fragment and
# the next 59 the parent fragment.
_M0_LEVELS: Final = 256
_M0_POS_SHIFT: Final = 118
_M0_FRAG_BITS: Final = 59
_M0_FRAG: Final = (1 << 59) - 1

FAST_LINEAGE_END: Final = 255
"""Below this position a PLH is mode 0 with 59-bit fragments (`hashing._FAST_PLH_END`): the
lineage fields of a block at such a position with sequence hash `seq` and parent sequence
hash `parent` are (position, `seq & FRAG_MASK`, `parent & FRAG_MASK`, 0 at position 0), which
a sender that knows the position can fill in without decoding the PLH (`set_lineage`)."""
FRAG_MASK: Final[Any] = _M0_FRAG
"""The fragment mask of those positions, boxed once (see `BoxedInt`)."""

_NONE: Final = -1
_UNDECODED: Final = -2
"""`LineageEntry.lineage_position` until the entry's PLH has been decoded."""
_COMPACT_SLACK: Final = 64
"""Extra heap entries tolerated on top of twice the heap size after the last rebuild."""

BoxedInt: TypeAlias = Any
"""An int that compiled code should keep as the boxed Python int it is: a 128-bit PLH or a
64-bit hash (mypyc short ints hold 62 bits, so as `int` they are unboxed and boxed again at
every hand-over and go through mypyc's slow tagged-int fallbacks; see the NOTE in
`hashing._hash_mode0`), or a fragment used as a dict key (boxed once, not per dict access)."""

Frag: TypeAlias = BoxedInt
"""A fragment of a PLH: the key of a node in its level."""

# The same constants, boxed once for the `Any` arithmetic of `_decode_entry`.
_POS_SHIFT_ANY: Final[Any] = _M0_POS_SHIFT
_FRAG_BITS_ANY: Final[Any] = _M0_FRAG_BITS
_FRAG_ANY: Final[Any] = _M0_FRAG
_M0_STARTS: Final[list[BoxedInt]] = [position << _M0_POS_SHIFT for position in range(257)]
"""The smallest PLH of each mode-0 position (and of position 256): to confirm a guessed
position with two comparisons, cheaper than a shift of a 128-bit int."""


def encode_key(position: int, fragment: int) -> int:
    """The node key of (position, current fragment)."""
    mode = 2 if position >= _MODES[2][1] else 1 if position >= _MODES[1][1] else 0
    return (mode << _MODE_SHIFT) | (position << (2 * _MODES[mode][0])) | fragment


def decode_key(key: int) -> tuple[int, int]:
    """(position, current fragment) of a node key; the inverse of `encode_key`."""
    frag_bits, _first, pos_bits = _MODES[key >> _MODE_SHIFT]
    return (key >> (2 * frag_bits)) & ((1 << pos_bits) - 1), key & ((1 << frag_bits) - 1)


def _decode(plh: Plh) -> tuple[int, int, int]:
    """(position, current fragment, parent fragment) of any PLH; the parent of a node at
    position p > 0 is (p - 1, parent fragment), across mode boundaries too."""
    if not 0 <= plh < _PLH_LIMIT:
        raise InvariantError(f"Lineage: {plh:#x} is not a positional lineage hash")
    frag_bits, _first, pos_bits = _MODES[plh >> _MODE_SHIFT]
    mask = (1 << frag_bits) - 1
    position = (plh >> (2 * frag_bits)) & ((1 << pos_bits) - 1)
    return position, plh & mask, (plh >> frag_bits) & mask


class LineageEntry:
    """A PLH and its lineage fields (position, current and parent fragment), decoded by the
    first `LineageBackend.insert_entries` / `remove_entry` that sees the entry and kept for the
    next ones. The block manager's registrations extend it, so each block's PLH is decoded
    once in its life, not at every Deref and reactivation; `LineageEntry(plh)` wraps a bare
    PLH. The PLH of an entry must never change."""

    __slots__ = ("lineage_frag", "lineage_parent_frag", "lineage_position", "plh")

    def __init__(self, plh: BoxedInt) -> None:
        self.plh: BoxedInt = plh
        """The positional lineage hash."""
        self.lineage_position = _UNDECODED
        """Its position; `_UNDECODED` until decoded."""
        self.lineage_frag: Frag = 0
        """Its current fragment (once decoded)."""
        self.lineage_parent_frag: Frag = 0
        """Its parent fragment (once decoded; 0 for a mode-0 root)."""

    def set_lineage(self, position: int, frag: Frag, parent_frag: Frag) -> None:
        """Fill in the lineage fields the PLH decodes to, known to the caller (see
        `FAST_LINEAGE_END`): the backend then never decodes the PLH."""
        self.lineage_position = position
        self.lineage_frag = frag
        self.lineage_parent_frag = parent_frag

    def set_plh(self, plh: BoxedInt) -> None:
        """Give a recycled entry (one no backend holds) a new PLH, not decoded yet."""
        self.plh = plh
        self.lineage_position = _UNDECODED


def _decode_entry(entry: LineageEntry, guess: int) -> None:
    """Fill in `entry`'s lineage fields; InvariantError if its PLH is not one. `guess` is a
    likely mode-0 position (tried first) or _NONE."""
    plh = entry.plh
    position: int
    if 0 < guess < _M0_LEVELS and _M0_STARTS[guess] <= plh < _M0_STARTS[guess + 1]:
        position = guess
    else:
        position = plh >> _POS_SHIFT_ANY
    if 0 < position < _M0_LEVELS:  # mode 0 (below 1 << 126), not a root: the common case
        entry.lineage_frag = plh & _FRAG_ANY
        entry.lineage_parent_frag = (plh >> _FRAG_BITS_ANY) & _FRAG_ANY
    elif position == 0:
        entry.lineage_frag = plh & _FRAG_ANY
        entry.lineage_parent_frag = 0
    else:
        position, entry.lineage_frag, entry.lineage_parent_frag = _decode(plh)
    entry.lineage_position = position


class NodeView(NamedTuple):
    """A read-only copy of one node, for tests and debugging."""

    plh: Plh | None  # None for a placeholder ghost
    tick: int | None  # None for a ghost
    parent: tuple[int, int] | None  # (position, fragment) of the linked parent
    children: int


class _Node:
    """One forest node: a real block, a ghost or a placeholder (see the module docstring)."""

    __slots__ = ("children", "frag", "level", "parent", "plh", "tick")

    def __init__(
        self,
        level: dict[int, _Node],
        frag: Frag,
        plh: int,
        tick: int,
        parent: _Node | None,
        children: int,
    ) -> None:
        self.level = level
        """The level (the nodes of this node's position) holding it under `frag`."""
        self.frag: Frag = frag
        """The current fragment: the node's key in its level."""
        self.plh: BoxedInt = plh
        """The block's full PLH; _NONE for a placeholder ghost."""
        self.tick = tick
        """The insertion tick; _NONE for a ghost."""
        self.parent = parent
        """The parent node; None for a root or a placeholder ghost."""
        self.children = children
        """How many nodes link to this one."""


_NO_NODE: Final = _Node({}, _NONE, _NONE, _NONE, None, 0)
"""Stands for "no node" where a `_Node` local must always hold one."""


class LineageBackend:
    """Leaf-first eviction by insertion tick over the lineage forest of inactive blocks."""

    __slots__ = (
        "_departed",
        "_front",
        "_heap",
        "_heap_limit",
        "_high",
        "_leaves",
        "_low",
        "_spare",
        "_tick",
    )

    def __init__(self) -> None:
        self._low: list[dict[int, _Node]] = [{} for _ in range(_M0_LEVELS)]
        """The levels of positions 0..255 (mode 0), by position."""
        self._high: dict[int, dict[int, _Node]] = {}
        """The levels of positions >= 256, created on first use."""
        self._leaves: dict[int, _Node] = {}  # tick -> real childless node: the leaf queue
        self._heap: list[int] = []  # ticks; may also hold stale and duplicate entries
        self._front: _Node | None = None
        """A leaf queued outside `_leaves` and the heap, older than every leaf in them: the
        next victim. `evict` parks there the parent its victim leaves a leaf, when that
        parent goes next, so a chain evicted one block at a time touches neither the heap
        nor `_leaves`. It leaves the spot when it gains a child or is removed (`_unqueue`)
        or when an older leaf appears (`_queue_old`)."""
        self._heap_limit = _COMPACT_SLACK  # `remove` rebuilds the heap once it is longer
        self._tick = 0  # the next insertion tick = number of successful inserts so far
        self._departed = 0  # removes + evictions so far; len = _tick - _departed
        self._spare: list[_Node] = []
        """Nodes pruned from the forest, reused by the chain inserts of `insert_many` (cheaper
        than a new object, interpreted and compiled); never more than the forest's peak size."""

    def _level(self, position: int) -> dict[int, _Node]:
        """The level of `position`, created if needed."""
        if position < _M0_LEVELS:
            return self._low[position]
        level = self._high.get(position)
        if level is None:
            level = {}
            self._high[position] = level
        return level

    def _find(self, plh: Plh) -> _Node | None:
        """The node at `plh`'s (position, current fragment), whatever it holds (None for a
        negative PLH; InvariantError for one past the last mode)."""
        if plh < 0:
            return None
        entry = LineageEntry(plh)
        _decode_entry(entry, _NONE)
        return self._level(entry.lineage_position).get(entry.lineage_frag)

    # ------------------------------------------------------------------ operations
    # remove/evict are the block manager's hot path: locals, inlined loops, no helpers. (Its
    # inserts come in bulk, so `insert` is `insert_many` of one.) The manager hands over its
    # registrations as `LineageEntry`s (`insert_entries`, `remove_entry`): decoded once.

    def insert(self, plh: Plh) -> None:
        # One placement logic for all: a single PLH takes insert_entries' general path.
        self.insert_entries([LineageEntry(plh)])

    def remove(self, plh: Plh) -> bool:
        return self.remove_entry(LineageEntry(plh))

    def remove_entry(self, entry: LineageEntry) -> bool:
        """`remove(entry.plh)`, decoding the entry if it is not yet."""
        position = entry.lineage_position
        if position == _UNDECODED:
            if entry.plh < 0:
                return False
            _decode_entry(entry, _NONE)
            position = entry.lineage_position
        level = self._low[position] if position < _M0_LEVELS else self._level(position)
        node = level.get(entry.lineage_frag)
        if node is None or node.tick == _NONE:
            return False
        plh = node.plh
        if plh is not entry.plh and plh != entry.plh:  # `is`: usually the very same object
            return False
        self._departed += 1
        if node.children:
            node.tick = _NONE  # a ghost that keeps its PLH, parent link and children
            return True
        self._unqueue(node)  # its heap entry, if any, goes stale
        spare = self._spare
        # Prune `node` and the ancestor ghosts it leaves childless.
        while True:
            del node.level[node.frag]
            spare.append(node)
            parent = node.parent
            if parent is None:
                break
            children = parent.children - 1
            parent.children = children
            if children:
                break
            if parent.tick != _NONE:  # a real parent becomes a leaf again, with its old tick
                self._queue_old(parent)
                break
            node = parent
        if len(self._heap) > self._heap_limit:
            self._compact()
        return True

    def evict(self) -> Plh | None:
        heap: list[BoxedInt] = self._heap  # compiled: the ticks popped stay boxed
        leaves = self._leaves
        found = self._front  # older than every other leaf
        if found is not None:
            self._front = None
        else:
            while heap:
                top = heappop(heap)
                found = leaves.get(top)  # None: a stale entry
                if found is not None:
                    del leaves[top]
                    break
            else:
                return None
        victim = found
        self._departed += 1
        spare = self._spare
        node = victim
        # Prune `node` and the ancestor ghosts it leaves childless (the loop of `remove`).
        while True:
            del node.level[node.frag]
            spare.append(node)
            parent = node.parent
            if parent is None:
                break
            children = parent.children - 1
            parent.children = children
            if children:
                break
            tick = parent.tick
            if tick != _NONE:  # a real parent becomes a leaf again, with its original tick
                if not heap or tick < heap[0]:  # the next victim: park it (`_front` is free)
                    self._front = parent
                else:
                    heappush(heap, tick)
                    leaves[tick] = parent
                break
            node = parent
        plh: Plh = victim.plh
        return plh

    def _unqueue(self, node: _Node) -> None:
        """Take the leaf `node` off the leaf queue (its heap entry, if any, goes stale)."""
        if node is self._front:
            self._front = None
        else:
            del self._leaves[node.tick]

    def _queue(self, node: _Node) -> None:
        """Put the real childless `node` on the leaf queue (heap and `_leaves`)."""
        tick = node.tick
        heappush(self._heap, tick)
        self._leaves[tick] = node

    def _queue_old(self, node: _Node) -> None:
        """`_queue` a node that was a leaf before (its tick may be older than `_front`'s)."""
        front = self._front
        if front is not None and node.tick < front.tick:  # `_front` is no longer the oldest
            self._front = None
            self._queue(front)
        self._queue(node)

    # ------------------------------------------------------------------ bulk operations
    # Same outcome as the scalar loops they replace, for the manager's per-request paths.

    def insert_many(self, plhs: Iterable[Plh]) -> None:
        """`for plh in plhs: insert(plh)` in one call."""
        self.insert_entries([LineageEntry(plh) for plh in plhs])

    def insert_entries(self, entries: list[LineageEntry]) -> None:
        """`for entry in entries: insert(entry.plh)` in one call (a request's tail-first
        Deref), decoding the entries that are not yet.

        The common case is a chain, each PLH the parent of the one before: each insert then
        fills the placeholder the previous one made for its parent, which is kept at hand
        (`fresh`) instead of being looked up and re-checked.
        """
        low = self._low
        leaves = self._leaves
        heap = self._heap
        spare = self._spare
        tick = self._tick
        fresh = _NO_NODE  # the placeholder the previous insert made for its parent ...
        fresh_position = _NONE  # ... and its position (_NONE: there is none)
        try:
            for entry in entries:
                position = entry.lineage_position
                if position == _UNDECODED:  # guess: the chain goes on
                    _decode_entry(entry, fresh_position)
                    position = entry.lineage_position
                plh = entry.plh
                frag = entry.lineage_frag
                if 0 < position < _M0_LEVELS:  # mode 0, not a root
                    if position == fresh_position and (
                        frag is fresh.frag or frag == fresh.frag
                    ):  # the chain case (`is`: the manager hands the very parent fragment)
                        fresh.plh = plh  # fill the fresh placeholder
                        fresh.tick = tick  # it has a child: not a leaf
                        tick += 1
                        parent_level = low[position - 1]
                        parent_frag = entry.lineage_parent_frag
                        # the parent's placeholder (a pruned node reused, if any)
                        placeholder = self._new_node(parent_level, parent_frag, _NONE, _NONE, 1)
                        parent = parent_level.setdefault(parent_frag, placeholder)
                        fresh.parent = parent
                        if parent is placeholder:
                            fresh = placeholder
                            fresh_position = position - 1
                        else:
                            spare.append(placeholder)
                            if not parent.children:  # an existing childless node is a leaf
                                self._unqueue(parent)
                            parent.children += 1
                            fresh_position = _NONE
                        continue
                    level = low[position]
                elif position == 0:
                    level = low[0]
                else:
                    level = self._level(position)
                fresh_position = _NONE
                node = level.get(frag)
                if node is None:
                    node = self._new_node(level, frag, plh, tick, 0)
                    level[frag] = node
                elif node.tick != _NONE:
                    what = "inserted twice" if node.plh == plh else f"conflicts with {node.plh:#x}"
                    raise InvariantError(f"Lineage: PLH {plh:#x} {what}")
                elif node.plh is plh:  # the `node.plh == plh` case below, without a compare
                    node.tick = tick
                    tick += 1
                    continue
                elif node.plh == _NONE:  # fill a placeholder ghost (it has children)
                    node.plh = plh
                    node.tick = tick
                elif node.plh == plh:  # a ghost left by reactivation: still linked
                    node.tick = tick
                    tick += 1
                    continue
                else:
                    raise InvariantError(
                        f"Lineage: PLH {plh:#x} conflicts with ghost {node.plh:#x}"
                    )
                if position:
                    parent_level = self._level(position - 1)
                    parent_frag = entry.lineage_parent_frag
                    placeholder = self._new_node(parent_level, parent_frag, _NONE, _NONE, 1)
                    parent = parent_level.setdefault(parent_frag, placeholder)
                    node.parent = parent
                    if parent is placeholder:
                        fresh = placeholder
                        fresh_position = position - 1
                    else:
                        spare.append(placeholder)
                        if not parent.children:  # an existing childless node is a real leaf
                            self._unqueue(parent)
                        parent.children += 1
                if not node.children:
                    heappush(heap, tick)
                    leaves[tick] = node
                tick += 1
        finally:
            self._tick = tick

    def _new_node(
        self, level: dict[int, _Node], frag: Frag, plh: BoxedInt, tick: int, children: int
    ) -> _Node:
        """A root node (no parent link yet): a pruned one reused, else a new one."""
        spare = self._spare
        if not spare:
            return _Node(level, frag, plh, tick, None, children)
        node = spare.pop()
        node.level = level
        node.frag = frag
        node.plh = plh
        node.tick = tick
        node.parent = None
        node.children = children
        return node

    def evict_many(self, count: int) -> list[Plh]:
        """`[evict() for _ in range(count)]` without the Nones: up to `count` victims in order.

        When a victim leaves its parent a childless real node and that parent is provably the
        oldest leaf (its tick follows the victim's, or precedes every queued tick), the parent
        is the next victim, taken without a trip through the heap: a chain deref'd together
        is evicted in one walk up.
        """
        heap: list[BoxedInt] = self._heap  # compiled: the ticks popped stay boxed
        leaves = self._leaves
        spare = self._spare
        # filled by index (a store costs less than an append); at most every entry leaves
        victims: list[Plh] = [0] * max(0, min(count, self._tick - self._departed))
        num_victims = 0
        front = self._front
        if front is not None:  # back into the heap: this loop only looks there
            self._front = None
            self._queue(front)
        remaining = count
        while remaining > 0:
            while heap:
                top = heappop(heap)
                found = leaves.get(top)  # None: a stale entry
                if found is not None:
                    del leaves[top]
                    node = found
                    break
            else:
                break
            while True:  # evict `node`, then maybe its parent, and so on up
                victims[num_victims] = node.plh
                num_victims += 1
                remaining -= 1
                del node.level[node.frag]
                spare.append(node)
                parent = node.parent
                if parent is None:
                    break
                children = parent.children - 1
                if children:
                    parent.children = children
                    break
                # The parent is left childless. Its child count is only written back when it
                # stays in the forest: a ghost is pruned and a next victim is deleted anyway.
                tick = parent.tick
                if tick == _NONE:  # a ghost left childless: prune it (and maybe more)
                    self._prune_from(parent)
                    break
                # A real parent becomes a leaf again, with its original tick.
                if remaining and (tick == node.tick + 1 or not heap or tick < heap[0]):
                    node = parent  # older than every queued leaf: the next victim
                    continue
                parent.children = 0
                heappush(heap, tick)
                leaves[tick] = parent
                break
        self._departed += count - remaining
        if remaining > 0:  # the forest ran out of leaves
            del victims[num_victims:]
        return victims

    def _prune_from(self, node: _Node) -> None:
        """Prune the childless ghost `node` and the ancestor ghosts it leaves childless; a real
        ancestor left childless becomes a leaf again, with its original tick."""
        while True:
            del node.level[node.frag]
            self._spare.append(node)
            parent = node.parent
            if parent is None:
                return
            children = parent.children - 1
            parent.children = children
            if children:
                return
            if parent.tick != _NONE:
                self._queue_old(parent)
                return
            node = parent

    def _compact(self) -> None:
        """Rebuild the heap from the live leaves, dropping stale and duplicate entries.

        Stale entries come from leaves that gained a child or were reactivated. Evictions pop
        them anyway, so only `remove` checks, against a limit of twice the heap size after the
        last rebuild (plus slack): every rebuild is paid for by as many pushes since the last
        one, and the heap stays within twice the peak number of leaves (plus slack).
        """
        self._heap = list(self._leaves)
        heapify(self._heap)
        self._heap_limit = 2 * len(self._heap) + _COMPACT_SLACK

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return self._tick - self._departed

    def __contains__(self, plh: object) -> bool:
        if not isinstance(plh, int) or not 0 <= plh < _PLH_LIMIT:
            return False
        node = self._find(plh)
        return node is not None and node.plh == plh and node.tick != _NONE

    def _levels(self) -> list[tuple[int, dict[int, _Node]]]:
        """Every level by position (empty ones too)."""
        return [*enumerate(self._low), *self._high.items()]

    def _node_at(self, position: int, fragment: int) -> _Node | None:
        """The node at (position, current fragment), for tests."""
        return self._level(position).get(fragment)

    def leaf_queue(self) -> list[tuple[int, Plh]]:
        """The leaf queue as (tick, PLH) pairs, oldest first; for tests and debugging."""
        queue = [(tick, node.plh) for tick, node in self._leaves.items()]
        if self._front is not None:
            queue.append((self._front.tick, self._front.plh))
        return sorted(queue)

    def forest(self) -> dict[tuple[int, int], NodeView]:
        """Every node by (position, current fragment); for tests and debugging."""
        return {
            (position, frag): NodeView(
                None if node.plh == _NONE else node.plh,
                None if node.tick == _NONE else node.tick,
                None if node.parent is None else (position - 1, node.parent.frag),
                node.children,
            )
            for position, level in self._levels()
            for frag, node in level.items()
        }

    def check_invariants(self) -> None:
        children: dict[int, int] = {}  # id(node) -> nodes linking to it
        real = 0
        for position, level in self._levels():
            for frag, node in level.items():
                where = (position, frag)
                if node.frag != frag or node.level is not level:
                    raise InvariantError(f"Lineage: malformed node at {where}")
                plh, tick, parent = node.plh, node.tick, node.parent
                if plh == _NONE:
                    if tick != _NONE or parent is not None:
                        raise InvariantError(f"Lineage: placeholder {where} is real or linked")
                else:
                    if lineage_key(plh) != where:
                        raise InvariantError(f"Lineage: PLH {plh:#x} stored at {where}")
                    linked = None if parent is None else (position - 1, parent.frag)
                    if linked != lineage_parent_key(plh):
                        raise InvariantError(f"Lineage: node {where} links to the wrong parent")
                if tick != _NONE:
                    real += 1
                    if not 0 <= tick < self._tick:
                        raise InvariantError(f"Lineage: node {where} has tick {tick}")
                elif node.children <= 0:
                    raise InvariantError(f"Lineage: ghost {where} has no children")
                if parent is not None:
                    if self._level(position - 1).get(parent.frag) is not parent:
                        raise InvariantError(f"Lineage: node {where} links to a missing parent")
                    children[id(parent)] = children.get(id(parent), 0) + 1
        for position, level in self._levels():
            for frag, node in level.items():
                count = children.get(id(node), 0)
                if node.children != count:
                    raise InvariantError(
                        f"Lineage: node {(position, frag)} counts {node.children} children"
                        f" but {count} link to it"
                    )
        if real != len(self):
            raise InvariantError(f"Lineage: {len(self)} real nodes recorded, {real} found")
        leaves = {
            node.tick: node
            for _position, level in self._levels()
            for node in level.values()
            if node.tick != _NONE and not node.children
        }
        queued = dict(self._leaves)
        front = self._front
        if front is not None:
            if front.tick in queued or any(tick < front.tick for tick in queued):
                raise InvariantError("Lineage: the parked leaf is queued or not the oldest")
            queued[front.tick] = front
        if leaves.keys() != queued.keys() or any(
            queued[tick] is not node for tick, node in leaves.items()
        ):
            raise InvariantError("Lineage: leaf queue differs from the real childless nodes")
        if not self._leaves.keys() <= set(self._heap):
            raise InvariantError("Lineage: a queued leaf has no heap entry")
