"""Layer 2: the G2 pool's Lineage eviction policy, built for the coordinator's batches.

Same policy, same victims in the same order as `shmkv.eviction.lineage.LineageBackend` (a
property test runs both side by side): a forest over the READY blocks keyed by (position,
current fragment) of their PLH; only leaves (real nodes without children) are evictable, oldest
insertion tick first; a parent left childless becomes a leaf again with its original tick;
removing a node with children leaves a ghost; a child whose parent is absent makes a
placeholder ghost for it.

What differs is the cost of the coordinator's pattern. The coordinator commits chains parent
first (a position-sorted OFFLOAD: each block the child of the one before), and a G1 block
manager's bulk path is built for the opposite, tail-first order. `insert_many` here links each
such run of brand-new blocks inline and queues only its last block as a leaf (the scalar
inserts queue and dequeue every block, leaving stale heap entries); so `evict_many` can then
walk up a chain without heap traffic while the parent is provably the oldest leaf.

Node: a `_Node` (a native class when compiled): key, PLH, tick, a reference to its parent
node, its child count and the G2 slot of its block, -1 / None for "none"; key = the PLH with its
parent-fragment field cleared (unique per (position, current fragment)). Linking by reference
spares an eviction the parent's dict lookup; a native node is one allocation with unboxed
fields, and evicted nodes are reused by `insert_chains`. The slot lets the G2 directory do
without a PLH -> slot map (`insert(plh, slot)`, `evict_slots`).
"""

from __future__ import annotations

from collections.abc import Iterable
from heapq import heapify, heappop, heappush
from typing import Final

from shmkv.errors import InvariantError
from shmkv.eviction.lineage import decode_key, encode_key
from shmkv.hashing import lineage_key, lineage_parent_key
from shmkv.ids import Plh

# Per PLH mode (top two bits): (fragment bits, first position of the mode, position bits);
# mirrors `shmkv.hashing` (tests pin the decoding against lineage_key / lineage_parent_key).
_MODES: Final = ((59, 0, 8), (55, 256, 16), (51, 1 << 16, 24))
_MODE_SHIFT: Final = 126
_PLH_LIMIT: Final = len(_MODES) << _MODE_SHIFT
_KEY_MASK: Final = tuple(
    (((1 << (2 + pos_bits)) - 1) << (2 * frag)) | ((1 << frag) - 1) for frag, _, pos_bits in _MODES
)
_M0_END: Final = 1 << _MODE_SHIFT
_M0_FRAG: Final = (1 << 59) - 1
_M0_POS_ONE: Final = 1 << 118
_M0_POS: Final = ((1 << 8) - 1) << 118
_M0_KEY: Final = _KEY_MASK[0]

_NONE: Final = -1
_COMPACT_SLACK: Final = 64
_SPARE_LIMIT: Final = 4096
"""Evicted nodes kept for reuse by `insert_chains` (a native object's allocation and freeing
cost more than resetting its fields)."""


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


class _Node:
    """A lineage forest node (see the module docstring)."""

    __slots__ = ("children", "key", "parent", "plh", "slot", "tick")

    def __init__(
        self, key: int, plh: int, tick: int, parent: _Node | None, children: int, slot: int
    ) -> None:
        self.key = key
        self.plh = plh  # -1 for a placeholder ghost
        self.tick = tick  # -1 for a ghost
        self.parent = parent  # None for a root or a placeholder ghost
        self.children = children
        self.slot = slot  # the G2 slot of the block, -1 when inserted without one


class G2Lineage:
    """Leaf-first eviction by insertion tick over the lineage forest of the READY G2 blocks."""

    __slots__ = ("_departed", "_heap", "_heap_limit", "_leaves", "_nodes", "_spare", "_tick")

    def __init__(self) -> None:
        self._nodes: dict[int, _Node] = {}
        self._leaves: dict[int, _Node] = {}  # tick -> real childless node: the leaf queue
        self._heap: list[int] = []  # ticks; may also hold stale and duplicate entries
        self._heap_limit = _COMPACT_SLACK
        self._tick = 0  # the next insertion tick = number of successful inserts so far
        self._departed = 0  # removes + evictions so far; len = _tick - _departed
        self._spare: list[_Node] = []  # evicted nodes, unlinked from everything: reused

    # ------------------------------------------------------------------ operations

    def insert(self, plh: Plh, slot: int = _NONE) -> None:
        """Insert `plh` (with the G2 `slot` that holds it, given back by `evict_slots`)."""
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
            node = _Node(key, plh, tick, None, 0, slot)
            nodes[key] = node
        elif node.tick != _NONE:
            what = "inserted twice" if node.plh == plh else f"conflicts with {node.plh:#x}"
            raise InvariantError(f"Lineage: PLH {plh:#x} {what}")
        elif node.plh == _NONE:  # fill a placeholder ghost (it has children; no parent yet)
            node.plh = plh
            node.tick = tick
            node.slot = slot
        elif node.plh == plh:  # a ghost left by a removal: still linked, has children
            node.tick = tick
            node.slot = slot
            self._tick = tick + 1
            return
        else:
            raise InvariantError(f"Lineage: PLH {plh:#x} conflicts with ghost {node.plh:#x}")
        self._tick = tick + 1
        if parent_key != _NONE:
            parent = nodes.get(parent_key)
            if parent is None:
                parent = _Node(parent_key, _NONE, _NONE, None, 1, _NONE)
                nodes[parent_key] = parent
            else:
                if not parent.children:  # an existing childless node is a real leaf
                    del self._leaves[parent.tick]
                parent.children += 1
            node.parent = parent
        if not node.children:
            heappush(self._heap, tick)
            self._leaves[tick] = node

    def insert_many(self, plhs: Iterable[Plh], slots: list[int] | None = None) -> None:
        """`for plh in plhs: insert(plh)` (`insert(plh, slot)` with `slots`, one per PLH); on
        a refusal the PLHs before it stay inserted.

        A brand-new block whose parent is the block inserted just before (a chain stored
        parent first) is linked inline, and only the last block of such a run enters the leaf
        queue: the scalar inserts would queue every block and dequeue it at the next one
        (leaving stale heap entries that slow evictions down). Anything else takes `insert`.
        This finds the runs by decoding each PLH's parent key, then hands them to
        `insert_chains`.
        """
        items = plhs if isinstance(plhs, list) else list(plhs)
        starts: list[int] = []
        prev_key = _NONE  # the node key of the PLH before
        for i in range(len(items)):
            plh = items[i]
            if not (
                prev_key != _NONE
                and _M0_POS_ONE <= plh < _M0_END  # mode 0, not a root: inline decoding
                and ((plh & _M0_POS) - _M0_POS_ONE) | ((plh >> 59) & _M0_FRAG) == prev_key
            ):
                starts.append(i)
            # (a PLH out of range is left to `insert`, which refuses it after the ones before)
            if 0 <= plh < _M0_END:
                prev_key = plh & _M0_KEY
            else:
                prev_key = _node_key(plh) if 0 <= plh < _PLH_LIMIT else _NONE
        self.insert_chains(items, starts, slots)

    def insert_chains(
        self,
        plhs: list[Plh],
        starts: list[int],
        slots: list[int] | None = None,
        duplicates: list[int] | None = None,
        first_mode: bool = False,
    ) -> None:
        """`insert_many(plhs)` of PLHs in runs the caller vouches for: `starts` holds, in
        ascending order, the index of the first PLH of each run (the first is 0); inside a run
        each block is the child of the block before it (its parent hash is that block's
        sequence hash and its position the next one). A run's first block, and any block not
        of the first PLH mode, takes `insert`.

        What it saves over `insert_many` is decoding each block's parent key to find out
        that it is the block inserted just before: the coordinator knows its batches' chains.
        On a refusal the PLHs before it stay inserted.

        `slots` (optional): the G2 slot of each PLH (as `insert(plh, slot)`). `duplicates`
        (optional): skip, instead of refusing, every PLH held already when its turn comes
        (inserted before, or earlier in `plhs`), and append its index to `duplicates`: what
        `G2Directory.commit` does with a duplicate. A skipped PLH ends its run (the block
        after it takes `insert`, as `insert_many` of the PLHs without it would). `first_mode`:
        the caller vouches that every PLH is of the first mode (0 <= plh < 2**126: positions
        below 256), which spares a 128-bit comparison per block.
        """
        nodes = self._nodes
        leaves = self._leaves
        heap = self._heap
        spare = self._spare
        tick = self._tick
        count = len(plhs)
        last: _Node | None = None  # the node of the block before, if it can be linked to
        queued = False  # whether `last` is in the leaf queue already
        run = 0
        next_start = starts[0] if starts else count
        try:
            for i in range(count):
                plh = plhs[i]
                slot = _NONE if slots is None else slots[i]
                if i == next_start:
                    run += 1
                    next_start = starts[run] if run < len(starts) else count
                elif last is not None and (first_mode or plh < _M0_END):
                    key = plh & _M0_KEY
                    if spare:
                        fresh = spare.pop()
                        fresh.key = key
                        fresh.plh = plh
                        fresh.tick = tick
                        fresh.parent = last
                        fresh.children = 0
                        fresh.slot = slot
                    else:
                        fresh = _Node(key, plh, tick, last, 0, slot)
                    if nodes.setdefault(key, fresh) is fresh:  # brand new: link it below `last`
                        if queued:  # it stops being a leaf (its heap entry goes stale)
                            del leaves[last.tick]
                            queued = False
                        last.children = 1
                        last = fresh
                        tick += 1
                        continue
                    spare.append(fresh)  # NOTE: not linked anywhere: reusable
                if last is not None and not queued:
                    heappush(heap, last.tick)
                    leaves[last.tick] = last
                last = None
                if duplicates is not None and 0 <= plh < _PLH_LIMIT and self._holds(plh):
                    duplicates.append(i)
                    continue
                self._tick = tick
                self.insert(plh, slot)
                tick = self._tick
                node = nodes.get(plh & _M0_KEY if plh < _M0_END else _node_key(plh))
                if node is not None and not node.children and node.plh == plh:
                    last, queued = node, True
        finally:
            if last is not None and not queued:
                heappush(heap, last.tick)
                leaves[last.tick] = last
            self._tick = tick

    def remove(self, plh: Plh) -> bool:
        nodes = self._nodes
        node = nodes.get(plh & _M0_KEY if plh < _M0_END else _node_key(plh))
        if node is None or node.plh != plh or node.tick == _NONE:
            return False
        self._departed += 1
        if node.children:
            node.tick = _NONE  # a ghost that keeps its PLH, parent link and children
            return True
        del self._leaves[node.tick]  # its heap entry goes stale
        self._prune_from(node)
        if len(self._heap) > self._heap_limit:
            self._compact()
        return True

    def evict(self) -> Plh | None:
        victims = self.evict_many(1)
        return victims[0] if victims else None

    def evict_many(self, count: int) -> list[Plh]:
        """Up to `count` victims, in the order `count` calls of `evict` would return them."""
        return self._evict(count, None)

    def evict_slots(self, count: int, slots: list[int]) -> list[Plh]:
        """`evict_many(count)`, appending the slot of each victim to `slots` (-1 for a PLH
        inserted without one)."""
        return self._evict(count, slots)

    def _evict(self, count: int, slots: list[int] | None) -> list[Plh]:
        """`evict_many` (and `evict_slots` with `slots`).

        When a victim leaves its parent a childless real node and that parent is provably the
        oldest leaf (its tick follows the victim's, or precedes every queued tick), the parent
        is the next victim, taken without a trip through the heap.
        """
        heap = self._heap
        leaves = self._leaves
        nodes = self._nodes
        spare = self._spare
        victims: list[Plh] = []
        remaining = count
        while remaining > 0:
            while heap:
                node = leaves.pop(heappop(heap), None)  # None: a stale entry
                if node is not None:
                    break
            else:
                break
            while True:  # evict `node`, then maybe its parent, and so on up
                victims.append(node.plh)  # NOTE: not a bound method: mypyc appends directly
                if slots is not None:
                    slots.append(node.slot)
                remaining -= 1
                del nodes[node.key]
                if len(spare) < _SPARE_LIMIT:  # NOTE: a leaf: no child, no queue links it
                    spare.append(node)
                parent = node.parent
                if parent is None:
                    break
                children = parent.children - 1
                if children:
                    parent.children = children
                    break
                tick = parent.tick
                if tick == _NONE:  # a ghost left childless: prune it (and maybe more)
                    parent.children = 0
                    self._prune_from(parent)
                    break
                if remaining and (tick == node.tick + 1 or not heap or tick < heap[0]):
                    node = parent  # older than every queued leaf: the next victim
                    continue
                parent.children = 0
                heappush(heap, tick)
                leaves[tick] = parent
                break
        self._departed += count - remaining
        return victims

    def _prune_from(self, node: _Node) -> None:
        """Delete the childless `node` and the ancestor ghosts it leaves childless; a real
        ancestor left childless becomes a leaf again, with its original tick."""
        nodes = self._nodes
        while True:
            del nodes[node.key]
            parent = node.parent
            if parent is None:
                return
            node = parent
            node.children -= 1
            if node.children:
                return
            tick = node.tick
            if tick != _NONE:
                heappush(self._heap, tick)
                self._leaves[tick] = node
                return

    def _compact(self) -> None:
        """Rebuild the heap from the live leaves (drops stale and duplicate entries)."""
        self._heap = list(self._leaves)
        heapify(self._heap)
        self._heap_limit = 2 * len(self._heap) + _COMPACT_SLACK

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return self._tick - self._departed

    def __contains__(self, plh: object) -> bool:
        if not isinstance(plh, int) or not 0 <= plh < _PLH_LIMIT:
            return False
        return self._holds(plh)

    def _holds(self, plh: int) -> bool:
        """`plh in self` for a PLH in range (a real node holds it)."""
        node = self._nodes.get(plh & _M0_KEY if 0 <= plh < _M0_END else _node_key(plh))
        return node is not None and node.plh == plh and node.tick != _NONE

    def holds_any(self, plhs: list[Plh]) -> bool:
        """Whether any of `plhs` is held (`any(plh in self for plh in plhs)`, compiled)."""
        return any(0 <= plh < _PLH_LIMIT and self._holds(plh) for plh in plhs)

    def slot_map(self) -> dict[Plh, int]:
        """PLH -> slot of every held PLH (for invariant checks)."""
        return {n.plh: n.slot for n in self._nodes.values() if n.tick != _NONE}

    def leaf_order(self) -> list[Plh]:
        """The evictable PLHs, oldest first (for tests and debugging)."""
        return [self._leaves[tick].plh for tick in sorted(self._leaves)]

    def check_invariants(self) -> None:
        nodes = self._nodes
        children: dict[int, int] = dict.fromkeys(nodes, 0)
        real = 0
        for key, node in nodes.items():
            where = decode_key(key)
            if node.key != key or encode_key(*where) != key:
                raise InvariantError(f"Lineage: malformed node {node.key:#x} at {where}")
            plh, tick = node.plh, node.tick
            parent = _NONE if node.parent is None else node.parent.key
            if plh == _NONE:
                if tick != _NONE or node.parent is not None:
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
            elif node.children <= 0:
                raise InvariantError(f"Lineage: ghost {where} has no children")
            if node.parent is not None:
                if nodes.get(parent) is not node.parent:
                    raise InvariantError(f"Lineage: node {where} links to a missing parent")
                children[parent] += 1
        for key, count in children.items():
            if nodes[key].children != count:
                raise InvariantError(
                    f"Lineage: node {decode_key(key)} counts {nodes[key].children} children"
                    f" but {count} link to it"
                )
        if real != len(self):
            raise InvariantError(f"Lineage: {len(self)} real nodes recorded, {real} found")
        leaves = {n.tick: n for n in nodes.values() if n.tick != _NONE and not n.children}
        if leaves.keys() != self._leaves.keys() or any(
            self._leaves[tick] is not node for tick, node in leaves.items()
        ):
            raise InvariantError("Lineage: leaf queue differs from the real childless nodes")
        if not self._leaves.keys() <= set(self._heap):
            raise InvariantError("Lineage: a queued leaf has no heap entry")


__all__ = ["G2Lineage"]
