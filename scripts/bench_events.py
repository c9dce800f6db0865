"""Throughput of one rank's KV-event publisher, flat out, to one subscriber process.

For each codec: the main process publishes realistic per-pass batches (16-64 events; 70% stored
events of 1-4 blocks with 16 tokens each, 30% removed events of 1-4 blocks) through an
`EventPublisher` (XPUB_NODROP, blocking send) for `--seconds`; a subscriber process started with
`multiprocessing` spawn receives them. Batches are built up front (a pool of 512, reused), so
the publisher's cost is encoding plus sending, which is what the rank engine pays per pass.

Subscriber modes (`--subscriber`):
* `raw` (default): a SUB socket that checks seq contiguity and counts blocks by seq from the
  pool's table, without decoding: it measures the publisher, not a router.
* `consumer`: the reference `EventConsumer` (full decode + per-tier index): the rate a Python
  router gets; NODROP back-pressure then slows the publisher down to it.

Prints one JSON line per codec: `block_events_per_s` (blocks in stored + removed events,
counted from the first send to the last receive), the publisher-side rate in wall-clock and
per CPU second of the publishing process (`publish_block_events_per_cpu_s`: the rate one
uncontended core would reach; on a shared machine the wall-clock rates also measure the
neighbours), messages/s, and `lost_batches` (must be 0).

    .venv/bin/python scripts/bench_events.py [--seconds 10] [--codec json vllm] [--subscriber raw]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import time
from multiprocessing.connection import Connection

import zmq

from shmkv.codec import CODEC_NAMES, make_codec
from shmkv.consumer import EventConsumer, RankEndpoint
from shmkv.events import BlockRemoved, BlockStored, EventBatch, KvEvent, StorageTier
from shmkv.hashing import chain_sequence_hashes, local_block_hashes
from shmkv.publisher import EventPublisher, PublisherConfig, unpack_seq

BLOCK_SIZE = 16
POOL = 512
RANK = 0


def make_pool(seed: int) -> list[EventBatch]:
    """POOL batches of 16-64 events with plausible hashes and token ids."""
    rng = random.Random(seed)
    pool: list[EventBatch] = []
    event_id = 0
    for _ in range(POOL):
        events: list[KvEvent] = []
        for _ in range(rng.randint(16, 64)):
            num_blocks = rng.randint(1, 4)
            tier = StorageTier.DEVICE if rng.random() < 0.8 else StorageTier.HOST_PINNED
            if rng.random() < 0.7:
                tokens = [
                    [rng.randrange(150_000) for _ in range(BLOCK_SIZE)] for _ in range(num_blocks)
                ]
                local = [local_block_hashes(block, BLOCK_SIZE)[0] for block in tokens]
                parent = rng.getrandbits(64) if rng.random() < 0.7 else None
                events.append(
                    BlockStored(
                        event_id=event_id,
                        dp_rank=RANK,
                        tier=tier,
                        parent_hash=parent,
                        block_hashes=chain_sequence_hashes(local, parent),
                        tokens_hashes=local,
                        token_ids=tokens,
                    )
                )
            else:
                hashes = [rng.getrandbits(64) for _ in range(num_blocks)]
                events.append(
                    BlockRemoved(event_id=event_id, dp_rank=RANK, tier=tier, block_hashes=hashes)
                )
            event_id += 1
        pool.append(EventBatch(ts_s=time.time(), dp_rank=RANK, events=events))
    return pool


def blocks_of(batch: EventBatch) -> int:
    return sum(
        len(e.block_hashes) for e in batch.events if isinstance(e, BlockStored | BlockRemoved)
    )


# -- subscriber process ---------------------------------------------------------------------------


def raw_subscriber(endpoint: str, blocks_by_slot: list[int], control: Connection) -> None:
    """Receive until the final seq (sent on `control`), checking contiguity; report counts."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    control.send("ready")
    start_cpu_s = time.process_time()
    expected = 0
    received = blocks = gaps = payload_bytes = 0
    first_s = last_s = 0.0
    final: int | None = None
    while final is None or expected <= final:
        if final is None and control.poll():
            final = control.recv()
            continue
        if not sub.poll(20, zmq.POLLIN):
            continue
        for _ in range(1000):
            try:
                _topic, seq_frame, payload = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            seq = unpack_seq(seq_frame)
            if received == 0:
                first_s = time.monotonic()
            if seq != expected:
                gaps += 1
            expected = seq + 1
            received += 1
            blocks += blocks_by_slot[seq % len(blocks_by_slot)]
            payload_bytes += len(payload)
        last_s = time.monotonic()
    sub.close(linger=0)
    context.term()
    control.send(
        {
            "received_batches": received,
            "received_blocks": blocks,
            "gaps": gaps,
            "payload_bytes": payload_bytes,
            "first_recv_s": first_s,
            "last_recv_s": last_s,
            "cpu_s": time.process_time() - start_cpu_s,
        }
    )


def consumer_subscriber(endpoint: str, _blocks_by_slot: list[int], control: Connection) -> None:
    """The reference consumer: full decode and index; report its counters."""
    with EventConsumer([RankEndpoint(rank=RANK, endpoint=endpoint)], codec="auto") as consumer:
        control.send("ready")
        start_cpu_s = time.process_time()
        final: int | None = None
        first_s = last_s = 0.0
        while final is None or consumer.last_seq(RANK) != final:
            if final is None and control.poll():
                final = control.recv()
            if consumer.poll(20) and first_s == 0.0:
                first_s = time.monotonic()
            last_s = time.monotonic()
        stats = consumer.stats()
    control.send(
        {
            "received_batches": stats["batches"],
            "received_blocks": stats["blocks_stored"] + stats["blocks_removed"],
            "gaps": stats["gaps"],
            "payload_bytes": 0,
            "first_recv_s": first_s,
            "last_recv_s": last_s,
            "cpu_s": time.process_time() - start_cpu_s,
        }
    )


# -- publisher ------------------------------------------------------------------------------------


def run(codec_name: str, seconds: float, subscriber: str, endpoint: str) -> dict[str, object]:
    pool = make_pool(seed=1)
    blocks_by_slot = [blocks_of(batch) for batch in pool]
    codec = make_codec(codec_name, block_size=BLOCK_SIZE)
    config = PublisherConfig(endpoint=endpoint, linger_ms=10_000)
    target = raw_subscriber if subscriber == "raw" else consumer_subscriber
    with EventPublisher(RANK, codec, config) as pub:
        parent_end, child_end = mp.get_context("spawn").Pipe()
        child = mp.get_context("spawn").Process(
            target=target, args=(pub.endpoint, blocks_by_slot, child_end), daemon=True
        )
        child.start()
        try:
            assert parent_end.recv() == "ready"
            if not pub.wait_for_subscribers(1, timeout_s=30.0):
                raise RuntimeError("the subscriber process never subscribed")
            sent_blocks = 0
            publish = pub.publish
            start_cpu_s = time.process_time()
            start_s = time.monotonic()
            deadline = start_s + seconds
            i = 0
            while True:
                publish(pool[i % POOL])
                sent_blocks += blocks_by_slot[i % POOL]
                i += 1
                if i % 64 == 0 and time.monotonic() >= deadline:
                    break
            publish_s = time.monotonic() - start_s
            publish_cpu_s = time.process_time() - start_cpu_s
            parent_end.send(pub.next_seq - 1)
            report = parent_end.recv()
        finally:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
                child.join()
    end_to_end_s = report["last_recv_s"] - start_s
    return {
        "codec": codec_name,
        "subscriber": subscriber,
        "seconds": round(publish_s, 2),
        "block_events_per_s": round(report["received_blocks"] / end_to_end_s),
        "publish_block_events_per_s": round(sent_blocks / publish_s),
        "publish_block_events_per_cpu_s": round(sent_blocks / publish_cpu_s),
        "publisher_cpu_share": round(publish_cpu_s / publish_s, 2),
        "subscriber_cpu_s": round(report["cpu_s"], 2),
        "msgs_per_s": round(report["received_batches"] / end_to_end_s),
        "blocks_per_msg": round(sent_blocks / i, 1),
        "bytes_per_msg": round(report["payload_bytes"] / max(1, report["received_batches"])),
        "sent_batches": i,
        "sent_blocks": sent_blocks,
        "received_blocks": report["received_blocks"],
        "gaps": report["gaps"],
        "lost_batches": i - report["received_batches"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--codec", nargs="+", choices=CODEC_NAMES, default=list(CODEC_NAMES))
    parser.add_argument("--subscriber", choices=("raw", "consumer"), default="raw")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:0", help="base PUB endpoint")
    args = parser.parse_args()
    for codec_name in args.codec:
        print(json.dumps(run(codec_name, args.seconds, args.subscriber, args.endpoint)), flush=True)


if __name__ == "__main__":
    main()
