"""The router-side KV index (`shmkv.indexer`): events in, prefix overlaps out."""

from __future__ import annotations

from shmkv.events import AllBlocksCleared, BlockRemoved, BlockStored, StorageTier
from shmkv.indexer import KvIndex

DEVICE = StorageTier.DEVICE
HOST = StorageTier.HOST_PINNED


def _stored(tier: StorageTier, hashes: list[int]) -> BlockStored:
    return BlockStored(0, 0, tier, None, hashes, hashes, None)


def test_overlap_counts_leading_device_then_host_blocks() -> None:
    index = KvIndex(2)
    index.apply(0, [_stored(DEVICE, [1, 2, 3, 5]), _stored(HOST, [4, 6, 9])])
    # device prefix 1, 2, 3; then 4 (host), 5 (device), 6 (host); 7 in neither tier
    assert index.overlap_blocks(0, [1, 2, 3, 4, 5, 6, 7, 9]) == (3, 3)
    assert index.overlap_blocks(0, [1, 2, 3]) == (3, 0)
    assert index.overlap_blocks(0, [9, 1]) == (0, 2)  # host first, then a device block
    assert index.overlap_blocks(0, []) == (0, 0)
    assert index.overlap_blocks(1, [1, 2]) == (0, 0)
    assert index.num_events == 2


def test_a_hole_ends_the_device_prefix_without_a_host_tier() -> None:
    index = KvIndex(1)
    index.apply(0, [_stored(DEVICE, [1, 2, 3, 4]), BlockRemoved(1, 0, DEVICE, [2])])
    assert index.overlap_blocks(0, [1, 2, 3, 4]) == (1, 0)
    assert index.blocks(0, DEVICE) == {1, 3, 4}
    assert index.blocks(0, HOST) == set()


def test_removal_per_tier_and_clear() -> None:
    index = KvIndex(1)
    index.apply(0, [_stored(DEVICE, [1, 2]), _stored(HOST, [2, 3])])
    index.apply(0, [BlockRemoved(2, 0, HOST, [2])])
    assert (index.blocks(0, DEVICE), index.blocks(0, HOST)) == ({1, 2}, {3})
    assert index.overlap_blocks(0, [1, 2, 3, 4]) == (2, 1)
    index.apply(0, [AllBlocksCleared(event_id=3, dp_rank=0)])
    assert (index.blocks(0, DEVICE), index.blocks(0, HOST)) == (set(), set())
    assert index.overlap_blocks(0, [1, 2, 3]) == (0, 0)
    assert index.num_events == 4


def test_single_block_events_match_bulk_ones() -> None:
    single, bulk = KvIndex(1), KvIndex(1)
    for hashes in ([1], [2], [3]):
        single.apply(0, [_stored(DEVICE, hashes)])
    single.apply(0, [_stored(HOST, [4]), BlockRemoved(9, 0, DEVICE, [2])])
    single.apply(0, [BlockRemoved(10, 0, HOST, [8])])  # not held: nothing happens
    bulk.apply(0, [_stored(DEVICE, [1, 2, 3]), _stored(HOST, [4, 5])])
    bulk.apply(0, [BlockRemoved(9, 0, DEVICE, [2, 7]), BlockRemoved(10, 0, HOST, [5, 8])])
    for tier in (DEVICE, HOST):
        assert single.blocks(0, tier) == bulk.blocks(0, tier)
    assert single.blocks(0, DEVICE) == {1, 3}
    assert single.overlap_blocks(0, [1, 4, 3, 2]) == (1, 2)
