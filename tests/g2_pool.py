"""Test helper: a G2 segment with its directory and one view per rank, all closed (and the
segment unlinked) on the way out."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from shmkv.g2 import G2Directory, G2EvictionPolicy, G2RankView
from shmkv.shm import G2Segment


@contextmanager
def g2_pool(
    prefix: str, capacity: int, block_size: int, num_ranks: int, backend: G2EvictionPolicy
) -> Iterator[tuple[G2Segment, G2Directory, list[G2RankView]]]:
    """A fresh pool under a unique name starting with `prefix`."""
    segment = G2Segment.create(
        f"{prefix}{uuid.uuid4().hex[:12]}",
        capacity=capacity,
        block_size=block_size,
        num_ranks=num_ranks,
    )
    directory = G2Directory(segment, backend)
    views = [G2RankView(segment, r) for r in range(num_ranks)]
    try:
        yield segment, directory, views
    finally:
        segment.unlink()
        for view in views:
            view.close()
        directory.close()
        segment.close()
