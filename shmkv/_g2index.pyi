"""Type stub of the C accelerator `shmkv/_g2index.c` (built by scripts/build_core.py)."""

from typing import Any

def index_insert(table: Any, keys: Any, slots: Any, start: int, room: int, /) -> tuple[int, int]:
    """`shmkv.g2._index_insert_py`: (inserts done, empty cells filled)."""

def index_remove(table: Any, keys: Any, slots: Any, /) -> tuple[int, int, int]:
    """`shmkv.g2._index_remove_py`: (removals done, net tombstones, cells emptied)."""

def index_find(table: Any, seq_hash: Any, key: int, /) -> int:
    """`shmkv.g2._index_find_py`: the slot indexed under `key`, or -1."""

def index_find_any(table: Any, seq_hash: Any, keys: Any, /) -> int:
    """`shmkv.g2._index_find_any_py`: the first k whose `keys[k]` is indexed, or -1."""

def plhs_mode0(seq_hashes: Any, parent_hashes: Any, positions: Any, /) -> list[int]:
    """`shmkv.g2._plhs_of_columns_py` (positions 0..254; u64 hashes, int64 positions)."""

def packed_screen(items: Any, starts: list[int], ordered: Any, /) -> tuple[int, int]:
    """`shmkv.g2._packed_screen_py`: (verdict, largest position)."""
