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
that becomes a leaf again re-enters the queue with its original tick.

Hot-path representation (this sits under every block-manager operation): a node key is the PLH
with its parent-fragment field cleared, i.e. the int `[mode][position][0][current fragment]`,
which is unique per (position, current fragment) because the mode follows from the position;
a node is a 5-int list `[key, plh, tick, parent key, child count]` with -1 for "none".
"""

from __future__ import annotations

from collections.abc import Iterable
from heapq import heapify, heappop, heappush
from typing import Final, NamedTuple

from shmkv.errors import InvariantError
from shmkv.hashing import lineage_key, lineage_parent_key
from shmkv.ids import Plh

# Per PLH mode (top two bits): (fragment bits, first position of the mode, position bits).
# Mirrors `shmkv.hashing` (`behavior.md` §1.4); tests pin it against lineage_key/parent_key.
_MODES: Final = ((59, 0, 8), (55, 256, 16), (51, 1 << 16, 24))
_MODE_SHIFT: Final = 126
_PLH_LIMIT: Final = len(_MODES) << _MODE_SHIFT
_KEY_MASK: Final = tuple(
    (((1 << (2 + pos_bits)) - 1) << (2 * frag)) | ((1 << frag) - 1) for frag, _, pos_bits in _MODES
)
"""Per mode: keeps the mode, position and current-fragment fields, clears the parent fragment."""

# Mode 0 (positions 0..255) is by far the common case; its decoding is inlined.
_M0_END: Final = 1 << _MODE_SHIFT  # every mode-0 PLH is below this
_M0_FRAG: Final = (1 << 59) - 1
_M0_POS_ONE: Final = 1 << 118  # position 1, parent 0, current 0; a PLH below it is a root
_M0_POS: Final = ((1 << 8) - 1) << 118
_M0_KEY: Final = _KEY_MASK[0]

# Node fields.
_KEY: Final = 0
_PLH: Final = 1  # -1 for a placeholder ghost
_TICK: Final = 2  # -1 for a ghost
_PARENT: Final = 3  # -1 for a root or a placeholder ghost
_CHILDREN: Final = 4
_NONE: Final = -1
_COMPACT_SLACK: Final = 64
"""Extra heap entries tolerated on top of twice the heap size after the last rebuild."""


def encode_key(position: int, fragment: int) -> int:
    """The node key of (position, current fragment)."""
    mode = 2 if position >= _MODES[2][1] else 1 if position >= _MODES[1][1] else 0
    return (mode << _MODE_SHIFT) | (position << (2 * _MODES[mode][0])) | fragment


def decode_key(key: int) -> tuple[int, int]:
    """(position, current fragment) of a node key; the inverse of `encode_key`."""
    frag_bits, _first, pos_bits = _MODES[key >> _MODE_SHIFT]
    return (key >> (2 * frag_bits)) & ((1 << pos_bits) - 1), key & ((1 << frag_bits) - 1)


def _node_key(plh: Plh) -> int:
    if not 0 <= plh < _PLH_LIMIT:
        raise InvariantError(f"Lineage: {plh:#x} is not a positional lineage hash")
    return plh & _KEY_MASK[plh >> _MODE_SHIFT]


def _parent_key(plh: Plh) -> int:
    """Node key of the parent of `plh` (any mode, across mode boundaries), or -1 for a root."""
    frag_bits, _first, pos_bits = _MODES[plh >> _MODE_SHIFT]
    position = (plh >> (2 * frag_bits)) & ((1 << pos_bits) - 1)
    if position == 0:
        return _NONE
    return encode_key(position - 1, (plh >> frag_bits) & ((1 << frag_bits) - 1))


class NodeView(NamedTuple):
    """A read-only copy of one node, for tests and debugging."""

    plh: Plh | None  # None for a placeholder ghost
    tick: int | None  # None for a ghost
    parent: tuple[int, int] | None  # (position, fragment) of the linked parent
    children: int


class LineageBackend:
    """Leaf-first eviction by insertion tick over the lineage forest of inactive blocks."""

    __slots__ = ("_departed", "_heap", "_heap_limit", "_leaves", "_nodes", "_tick")

    def __init__(self) -> None:
        self._nodes: dict[int, list[int]] = {}
        self._leaves: dict[int, list[int]] = {}  # tick -> real childless node: the leaf queue
        self._heap: list[int] = []  # ticks; may also hold stale and duplicate entries
        self._heap_limit = _COMPACT_SLACK  # `remove` rebuilds the heap once it is longer
        self._tick = 0  # the next insertion tick = number of successful inserts so far
        self._departed = 0  # removes + evictions so far; len = _tick - _departed

    # ------------------------------------------------------------------ operations
    # insert/remove/evict are the block manager's hot path: locals, inlined loops, no helpers.

    def insert(self, plh: Plh) -> None:
        if plh < _M0_END:
            key = plh & _M0_KEY
            if plh >= _M0_POS_ONE:
                parent_key = ((plh & _M0_POS) - _M0_POS_ONE) | ((plh >> 59) & _M0_FRAG)
            else:
                parent_key = _NONE
        else:
            key = _node_key(plh)
            parent_key = _parent_key(plh)
        nodes = self._nodes
        node = nodes.get(key)
        tick = self._tick
        if node is None:
            nodes[key] = node = [key, plh, tick, parent_key, 0]
        elif node[_TICK] != _NONE:
            what = "inserted twice" if node[_PLH] == plh else f"conflicts with {node[_PLH]:#x}"
            raise InvariantError(f"Lineage: PLH {plh:#x} {what}")
        elif node[_PLH] == _NONE:  # fill a placeholder ghost (it has children)
            node[_PLH] = plh
            node[_TICK] = tick
            node[_PARENT] = parent_key
        elif node[_PLH] == plh:  # a ghost left by reactivation: still linked, has children
            node[_TICK] = tick
            self._tick = tick + 1
            return
        else:
            raise InvariantError(f"Lineage: PLH {plh:#x} conflicts with ghost {node[_PLH]:#x}")
        self._tick = tick + 1
        if parent_key != _NONE:
            parent = nodes.get(parent_key)
            if parent is None:
                nodes[parent_key] = [parent_key, _NONE, _NONE, _NONE, 1]
            else:
                if not parent[_CHILDREN]:  # an existing childless node is a real leaf
                    del self._leaves[parent[_TICK]]
                parent[_CHILDREN] += 1
        if not node[_CHILDREN]:
            heappush(self._heap, tick)
            self._leaves[tick] = node

    def remove(self, plh: Plh) -> bool:
        nodes = self._nodes
        node = nodes.get(plh & _M0_KEY if plh < _M0_END else _node_key(plh))
        if node is None or node[_PLH] != plh or node[_TICK] == _NONE:
            return False
        self._departed += 1
        if node[_CHILDREN]:
            node[_TICK] = _NONE  # a ghost that keeps its PLH, parent link and children
            return True
        leaves = self._leaves
        del leaves[node[_TICK]]  # its heap entry goes stale
        # Prune `node` and the ancestor ghosts it leaves childless.
        while True:
            del nodes[node[_KEY]]
            parent_key = node[_PARENT]
            if parent_key == _NONE:
                break
            node = nodes[parent_key]
            node[_CHILDREN] -= 1
            if node[_CHILDREN]:
                break
            tick = node[_TICK]
            if tick != _NONE:  # a real parent becomes a leaf again, with its original tick
                heappush(self._heap, tick)
                leaves[tick] = node
                break
        if len(self._heap) > self._heap_limit:
            self._compact()
        return True

    def evict(self) -> Plh | None:
        heap = self._heap
        leaves = self._leaves
        while heap:
            victim = leaves.pop(heappop(heap), None)  # None: a stale entry
            if victim is not None:
                break
        else:
            return None
        self._departed += 1
        nodes = self._nodes
        node = victim
        # Prune `node` and the ancestor ghosts it leaves childless (the loop of `remove`).
        while True:
            del nodes[node[_KEY]]
            parent_key = node[_PARENT]
            if parent_key == _NONE:
                break
            node = nodes[parent_key]
            node[_CHILDREN] -= 1
            if node[_CHILDREN]:
                break
            tick = node[_TICK]
            if tick != _NONE:  # a real parent becomes a leaf again, with its original tick
                heappush(heap, tick)
                leaves[tick] = node
                break
        return victim[_PLH]

    # ------------------------------------------------------------------ bulk operations
    # Same outcome as the scalar loops they replace, for the manager's per-request paths.

    def insert_many(self, plhs: Iterable[Plh]) -> None:
        """`for plh in plhs: insert(plh)` in one call (a request's tail-first Deref).

        The common case is a chain, each PLH the parent of the one before: each insert then
        fills the placeholder the previous one made for its parent, which is kept at hand
        (`fresh`) instead of being looked up and re-checked.
        """
        nodes = self._nodes
        setdefault = nodes.setdefault
        leaves = self._leaves
        heap = self._heap
        tick = self._tick
        fresh: list[int] = []  # the placeholder the previous insert made for its parent ...
        fresh_key = _NONE  # ... and its key (_NONE: there is none)
        try:
            for plh in plhs:
                if _M0_POS_ONE <= plh < _M0_END:  # mode 0, not a root: inline decoding
                    key = plh & _M0_KEY
                    parent_key = ((plh & _M0_POS) - _M0_POS_ONE) | ((plh >> 59) & _M0_FRAG)
                    if key == fresh_key:  # the chain case: fill the fresh placeholder
                        fresh[_PLH] = plh
                        fresh[_TICK] = tick  # it has a child: not a leaf
                        fresh[_PARENT] = parent_key
                        tick += 1
                        placeholder = [parent_key, _NONE, _NONE, _NONE, 1]
                        parent = setdefault(parent_key, placeholder)  # one lookup, not two
                        if parent is placeholder:
                            fresh = placeholder
                            fresh_key = parent_key
                        else:
                            if not parent[_CHILDREN]:  # an existing childless node is a leaf
                                del leaves[parent[_TICK]]
                            parent[_CHILDREN] += 1
                            fresh_key = _NONE
                        continue
                elif plh < _M0_END:
                    key = plh & _M0_KEY
                    parent_key = _NONE
                else:
                    key = _node_key(plh)
                    parent_key = _parent_key(plh)
                fresh_key = _NONE
                node = nodes.get(key)
                if node is None:
                    nodes[key] = node = [key, plh, tick, parent_key, 0]
                elif node[_TICK] != _NONE:
                    what = (
                        "inserted twice" if node[_PLH] == plh else f"conflicts with {node[_PLH]:#x}"
                    )
                    raise InvariantError(f"Lineage: PLH {plh:#x} {what}")
                elif node[_PLH] == _NONE:  # fill a placeholder ghost (it has children)
                    node[_PLH] = plh
                    node[_TICK] = tick
                    node[_PARENT] = parent_key
                elif node[_PLH] == plh:  # a ghost left by reactivation: still linked
                    node[_TICK] = tick
                    tick += 1
                    continue
                else:
                    raise InvariantError(
                        f"Lineage: PLH {plh:#x} conflicts with ghost {node[_PLH]:#x}"
                    )
                if parent_key != _NONE:
                    placeholder = [parent_key, _NONE, _NONE, _NONE, 1]
                    parent = setdefault(parent_key, placeholder)
                    if parent is placeholder:
                        fresh = placeholder
                        fresh_key = parent_key
                    else:
                        if not parent[_CHILDREN]:  # an existing childless node is a real leaf
                            del leaves[parent[_TICK]]
                        parent[_CHILDREN] += 1
                if not node[_CHILDREN]:
                    heappush(heap, tick)
                    leaves[tick] = node
                tick += 1
        finally:
            self._tick = tick

    def evict_many(self, count: int) -> list[Plh]:
        """`[evict() for _ in range(count)]` without the Nones: up to `count` victims in order.

        When a victim leaves its parent a childless real node and that parent is provably the
        oldest leaf (its tick follows the victim's, or precedes every queued tick), the parent
        is the next victim, taken without a trip through the heap: a chain deref'd together
        is evicted in one walk up.
        """
        heap = self._heap
        leaves = self._leaves
        nodes = self._nodes
        victims: list[Plh] = []
        append = victims.append
        remaining = count
        while remaining > 0:
            while heap:
                node = leaves.pop(heappop(heap), None)  # None: a stale entry
                if node is not None:
                    break
            else:
                break
            while True:  # evict `node`, then maybe its parent, and so on up
                append(node[_PLH])
                remaining -= 1
                del nodes[node[_KEY]]
                parent_key = node[_PARENT]
                if parent_key == _NONE:
                    break
                parent = nodes[parent_key]
                children = parent[_CHILDREN] - 1
                if children:
                    parent[_CHILDREN] = children
                    break
                # The parent is left childless. Its child count is only written back when it
                # stays in the forest: a ghost is pruned and a next victim is deleted anyway.
                tick = parent[_TICK]
                if tick == _NONE:  # a ghost left childless: prune it (and maybe more)
                    self._prune_from(parent)
                    break
                # A real parent becomes a leaf again, with its original tick.
                if remaining and (tick == node[_TICK] + 1 or not heap or tick < heap[0]):
                    node = parent  # older than every queued leaf: the next victim
                    continue
                parent[_CHILDREN] = 0
                heappush(heap, tick)
                leaves[tick] = parent
                break
        self._departed += count - remaining
        return victims

    def _prune_from(self, node: list[int]) -> None:
        """Prune the childless ghost `node` and the ancestor ghosts it leaves childless; a real
        ancestor left childless becomes a leaf again, with its original tick."""
        nodes = self._nodes
        while True:
            del nodes[node[_KEY]]
            parent_key = node[_PARENT]
            if parent_key == _NONE:
                return
            node = nodes[parent_key]
            node[_CHILDREN] -= 1
            if node[_CHILDREN]:
                return
            tick = node[_TICK]
            if tick != _NONE:
                heappush(self._heap, tick)
                self._leaves[tick] = node
                return

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
        node = self._nodes.get(_node_key(plh))
        return node is not None and node[_PLH] == plh and node[_TICK] != _NONE

    def leaf_queue(self) -> list[tuple[int, Plh]]:
        """The leaf queue as (tick, PLH) pairs, oldest first; for tests and debugging."""
        return sorted((tick, node[_PLH]) for tick, node in self._leaves.items())

    def forest(self) -> dict[tuple[int, int], NodeView]:
        """Every node by (position, current fragment); for tests and debugging."""
        return {
            decode_key(key): NodeView(
                None if node[_PLH] == _NONE else node[_PLH],
                None if node[_TICK] == _NONE else node[_TICK],
                None if node[_PARENT] == _NONE else decode_key(node[_PARENT]),
                node[_CHILDREN],
            )
            for key, node in self._nodes.items()
        }

    def check_invariants(self) -> None:
        nodes = self._nodes
        children: dict[int, int] = dict.fromkeys(nodes, 0)
        real = 0
        for key, node in nodes.items():
            where = decode_key(key)
            if len(node) != 5 or node[_KEY] != key or encode_key(*where) != key:
                raise InvariantError(f"Lineage: malformed node {node} at {where}")
            plh, tick, parent = node[_PLH], node[_TICK], node[_PARENT]
            if plh == _NONE:
                if tick != _NONE or parent != _NONE:
                    raise InvariantError(f"Lineage: placeholder {where} is real or linked")
            else:
                if lineage_key(plh) != where:
                    raise InvariantError(f"Lineage: PLH {plh:#x} stored at {where}")
                expected_parent = lineage_parent_key(plh)
                if parent != (_NONE if expected_parent is None else encode_key(*expected_parent)):
                    raise InvariantError(f"Lineage: node {where} links to the wrong parent")
            if tick != _NONE:
                real += 1
                if not 0 <= tick < self._tick:
                    raise InvariantError(f"Lineage: node {where} has tick {tick}")
            elif node[_CHILDREN] <= 0:
                raise InvariantError(f"Lineage: ghost {where} has no children")
            if parent != _NONE:
                if parent not in children:
                    raise InvariantError(f"Lineage: node {where} links to a missing parent")
                children[parent] += 1
        for key, count in children.items():
            if nodes[key][_CHILDREN] != count:
                raise InvariantError(
                    f"Lineage: node {decode_key(key)} counts {nodes[key][_CHILDREN]} children"
                    f" but {count} link to it"
                )
        if real != len(self):
            raise InvariantError(f"Lineage: {len(self)} real nodes recorded, {real} found")
        leaves = {n[_TICK]: n for n in nodes.values() if n[_TICK] != _NONE and not n[_CHILDREN]}
        if leaves.keys() != self._leaves.keys() or any(
            self._leaves[tick] is not node for tick, node in leaves.items()
        ):
            raise InvariantError("Lineage: leaf queue differs from the real childless nodes")
        if not self._leaves.keys() <= set(self._heap):
            raise InvariantError("Lineage: a queued leaf has no heap entry")
