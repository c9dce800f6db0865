"""A rank process for the coordinator tests: `python -m tests.multiproc._g2_client_worker JSON`.

It registers with the coordinator through a `SharedG2Client`, waits until the replica knows
the blocks it should pin, pins them (a prepared onboard that never starts), offloads a batch
of fresh blocks (the coordinator's slow link keeps their slots RESERVED), waits for the ACK,
prints one line `READY <json>` and sleeps until it is killed.

Also home of `chain_items`, the block builder the tests share with it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import orjson

from shmkv.clock import MonotonicClock
from shmkv.config import EngineConfig
from shmkv.g2_client import SharedG2Client
from shmkv.hashing import local_block_hashes, make_plh, sequence_hashes
from shmkv.offload import BlockMeta, OffloadItem
from shmkv.procutil import die_with_parent


def chain_items(tokens: list[int], block_size: int) -> list[OffloadItem]:
    """One offload item per full block of `tokens`, first block first."""
    seqs = sequence_hashes(tokens, block_size)
    locals_ = local_block_hashes(tokens, block_size)
    items: list[OffloadItem] = []
    for i, (seq, local) in enumerate(zip(seqs, locals_, strict=True)):
        parent = seqs[i - 1] if i else None
        block = tokens[i * block_size : (i + 1) * block_size]
        items.append(OffloadItem(make_plh(seq, parent, i), BlockMeta(seq, parent, local, block)))
    return items


def main(argv: list[str]) -> int:
    die_with_parent()
    args: dict[str, Any] = orjson.loads(argv[0])
    block_size = int(args["block_size"])
    config = EngineConfig(
        block_size=block_size,
        num_g2_blocks=int(args["num_g2_blocks"]),
        kv_bytes_per_token=int(args.get("kv_bytes_per_token", 0)),
    )
    clock = MonotonicClock(float(args["start_monotonic_s"]), float(args["speedup_ratio"]))
    pin_items = chain_items(list(args["pin_tokens"]), block_size)
    offload_items = chain_items(list(args["offload_tokens"]), block_size)
    with SharedG2Client(
        rank=int(args["rank"]),
        epoch=int(args["epoch"]),
        segment_name=str(args["segment"]),
        coordinator_endpoint=str(args["endpoint"]),
        config=config,
        clock=clock,
    ) as client:
        deadline = time.monotonic() + 20.0
        plhs = [item.plh for item in pin_items]
        plan = None
        while plan is None or plan.num_blocks < len(plhs):
            if plan is not None:
                client.cancel_onboard(plan)
            if time.monotonic() > deadline:
                print("TIMEOUT waiting for the blocks to pin", flush=True)
                return 1
            client.tick(clock.now_ms())
            plan = client.prepare_onboard(plhs)
            if plan is None:
                time.sleep(0.005)
        client.enqueue_evictions(offload_items, list(range(len(offload_items))))
        while client.stats().accepted + client.stats().rejected < len(offload_items):
            if time.monotonic() > deadline:
                print("TIMEOUT waiting for the offload ack", flush=True)
                return 1
            client.socket.poll(50)
            client.tick(clock.now_ms())
        report = {"pinned": plan.num_blocks, "accepted": client.stats().accepted}
        print("READY " + orjson.dumps(report).decode(), flush=True)
        while True:  # until SIGKILL
            time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
