"""Type stub of the C accelerator `shmkv/_blockhash.c` (built by scripts/build_core.py)."""

def hash_mode0(
    data: bytes, step: int, count: int, parent: int | None, position: int, /
) -> tuple[list[int], list[int], list[int]]:
    """(local hashes, sequence hashes, PLHs) of `count` blocks of `step` bytes of `data`, the
    first at block `position` after `parent`; `position + count` must not exceed 255."""

def hash_one(
    data: bytes | memoryview, parent: int | None, position: int, /
) -> tuple[int, int, int]:
    """(local hash, sequence hash, PLH) of the one block `data` at block `position` (< 255)
    after `parent`."""
