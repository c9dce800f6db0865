"""Throughput of one rank's KV-event publisher, flat out, to one subscriber process.

For each codec the main process publishes a pool of per-pass batches through an
`EventPublisher` (XPUB_NODROP, blocking send) for `--seconds`, one message per batch, cycling
through the pool; a subscriber process started with `multiprocessing` spawn receives them.
The batches are built up front and reused, so the publisher's cost is what the rank engine
pays per pass: encoding plus sending (nothing is cached between sends).

Pools (`--pool`):
* `w1` (default): the simulator's own batches, one per scheduler pass, captured from a W1
  replay (1000 requests of 1024 + 128 tokens, 8192 G1 blocks of 16 tokens, token ids on):
  1485 batches, 10.4 events and 90 blocks per batch on average (median 11 events and 14
  blocks: decode passes store one block per request; prefills store 64-block chains).
* `synthetic`: 512 batches of 16-64 events, 70% stored events of 1-4 blocks with 16 random
  token ids each, 30% removed events of 1-4 blocks (102 blocks per batch; many small events,
  the harder shape per block).

Subscriber modes (`--subscriber`):
* `verify` (default): decodes every payload with the codec (vLLM: without rebuilding local
  hashes, as `EventConsumer` does) and checks it against the batch sent under that seq: block
  count, device-tier block count, sum of block and parent hashes, sum of token ids. Counts
  come from the decoded payloads, not from the pool.
* `raw`: checks seq contiguity and counts blocks by seq from the pool's table, without
  decoding: it measures the publisher alone.
* `consumer`: the reference `EventConsumer` (full decode + per-tier index): the rate a Python
  router gets.

A block event is one block of a Stored or Removed event. Prints one JSON line per codec (and
repeat): `publish_block_events_per_s` (the publisher's wall-clock rate, first to last send),
`publish_block_events_per_cpu_s` (per CPU second of the publishing process, its ZMQ I/O thread
included: the rate one uncontended core would reach; on a shared machine the wall-clock rates
also measure the neighbours), `block_events_per_s` (end to end: first send to last receive),
messages/s, and the loss checks `lost_batches`, `gaps`, `mismatches` (all must be 0; `ok`
says so).

    .venv/bin/python scripts/bench_events.py [--seconds 10] [--codec json vllm] [--pool w1]
        [--subscriber verify] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import time
from multiprocessing.connection import Connection
from typing import NamedTuple

import zmq

from shmkv.codec import CODEC_NAMES, EventCodec, VllmCodec, make_codec
from shmkv.events import (
    BlockRemoved,
    BlockStored,
    EventBatch,
    KvEvent,
    StorageTier,
)
from shmkv.hashing import chain_sequence_hashes, local_block_hashes
from shmkv.publisher import EventPublisher, PublisherConfig, unpack_seq

BLOCK_SIZE = 16
SYNTHETIC_POOL = 512
RANK = 0
U64 = (1 << 64) - 1


class Digest(NamedTuple):
    """What the verifying subscriber checks per batch."""

    blocks: int
    device_blocks: int
    hash_sum: int
    token_sum: int


def digest(batch: EventBatch) -> Digest:
    blocks = device_blocks = hash_sum = token_sum = 0
    for event in batch.events:
        if isinstance(event, BlockStored | BlockRemoved):
            num_blocks = len(event.block_hashes)
            blocks += num_blocks
            if event.tier is StorageTier.DEVICE:
                device_blocks += num_blocks
            hash_sum += sum(event.block_hashes)
        if isinstance(event, BlockStored):
            hash_sum += event.parent_hash or 0
            if event.token_ids is not None:
                token_sum += sum(map(sum, event.token_ids))
    return Digest(blocks, device_blocks, hash_sum & U64, token_sum)


def synthetic_pool(seed: int) -> list[EventBatch]:
    """SYNTHETIC_POOL batches of 16-64 events with plausible hashes and token ids."""
    rng = random.Random(seed)
    pool: list[EventBatch] = []
    event_id = 0
    for _ in range(SYNTHETIC_POOL):
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


def w1_pool() -> list[EventBatch]:
    """Every non-empty pass's batch of a W1 replay with token ids (the simulator's batches)."""
    from shmkv.config import EngineConfig
    from shmkv.replay import ReplayOptions, run_replay
    from shmkv.workload import synthetic_sessions

    sessions = synthetic_sessions(input_tokens=1024, output_tokens=128, request_count=1000)
    options = ReplayOptions(
        engine=EngineConfig(num_gpu_blocks=8192, block_size=BLOCK_SIZE),
        replay_concurrency=32,
        emit_token_ids=True,
    )
    pool: list[EventBatch] = []

    def on_events(rank: int, _end_ms: float, events: list[KvEvent]) -> None:
        pool.append(EventBatch(ts_s=time.time(), dp_rank=rank, events=events))

    run_replay(sessions, options, on_events=on_events)
    return pool


def make_pool(name: str) -> list[EventBatch]:
    return w1_pool() if name == "w1" else synthetic_pool(seed=1)


# -- subscriber process ---------------------------------------------------------------------------


class _Counts:
    def __init__(self) -> None:
        self.expected = 0
        self.received = self.blocks = self.gaps = self.mismatches = self.payload_bytes = 0
        self.first_s = self.last_s = 0.0


def subscriber(
    mode: str, codec_name: str, endpoint: str, digests: list[Digest], control: Connection
) -> None:
    """Receive until the final seq (sent on `control`), checking contiguity and, with `verify`,
    every decoded payload against `digests`; report counts on `control`."""
    codec: EventCodec | None = None
    if mode == "verify":
        codec = (
            VllmCodec(block_size=BLOCK_SIZE, compute_local_hashes=False)
            if codec_name == "vllm"
            else make_codec(codec_name, block_size=BLOCK_SIZE)
        )
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    control.send("ready")
    start_cpu_s = time.process_time()
    counts = _Counts()
    final: int | None = None
    while final is None or counts.expected <= final:
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
            _receive(counts, unpack_seq(seq_frame), payload, codec, digests)
        counts.last_s = time.monotonic()
    sub.close(linger=0)
    context.term()
    control.send(
        {
            "received_batches": counts.received,
            "received_blocks": counts.blocks,
            "gaps": counts.gaps,
            "mismatches": counts.mismatches,
            "payload_bytes": counts.payload_bytes,
            "first_recv_s": counts.first_s,
            "last_recv_s": counts.last_s,
            "cpu_s": time.process_time() - start_cpu_s,
        }
    )


def _receive(
    counts: _Counts, seq: int, payload: bytes, codec: EventCodec | None, digests: list[Digest]
) -> None:
    if counts.received == 0:
        counts.first_s = time.monotonic()
    if seq != counts.expected:
        counts.gaps += 1
    counts.expected = seq + 1
    counts.received += 1
    counts.payload_bytes += len(payload)
    want = digests[seq % len(digests)]
    if codec is None:
        counts.blocks += want.blocks
        return
    got = digest(codec.decode_batch(payload))
    counts.blocks += got.blocks
    if got != want:
        counts.mismatches += 1


def consumer_subscriber(
    _mode: str, _codec_name: str, endpoint: str, _digests: list[Digest], control: Connection
) -> None:
    """The reference consumer: full decode and index; report its counters."""
    from shmkv.consumer import EventConsumer, RankEndpoint

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
            "mismatches": 0,
            "payload_bytes": 0,
            "first_recv_s": first_s,
            "last_recv_s": last_s,
            "cpu_s": time.process_time() - start_cpu_s,
        }
    )


# -- publisher ------------------------------------------------------------------------------------


def run(
    codec_name: str,
    seconds: float,
    mode: str,
    endpoint: str,
    pool_name: str,
    pool: list[EventBatch],
) -> dict[str, object]:
    digests = [digest(batch) for batch in pool]
    blocks_by_slot = [d.blocks for d in digests]
    num_slots = len(pool)
    codec = make_codec(codec_name, block_size=BLOCK_SIZE)
    config = PublisherConfig(endpoint=endpoint, linger_ms=10_000)
    target = consumer_subscriber if mode == "consumer" else subscriber
    with EventPublisher(RANK, codec, config) as pub:
        parent_end, child_end = mp.get_context("spawn").Pipe()
        child = mp.get_context("spawn").Process(
            target=target, args=(mode, codec_name, pub.endpoint, digests, child_end), daemon=True
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
                slot = i % num_slots
                publish(pool[slot])
                sent_blocks += blocks_by_slot[slot]
                i += 1
                if i % 64 == 0 and time.monotonic() >= deadline:
                    break
            publish_s = time.monotonic() - start_s
            publish_cpu_s = time.process_time() - start_cpu_s
            parent_end.send(pub.next_seq - 1)
            report = parent_end.recv()
        finally:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
                child.join()
    end_to_end_s = report["last_recv_s"] - start_s
    lost = i - report["received_batches"]
    return {
        "codec": codec_name,
        "pool": pool_name,
        "subscriber": mode,
        "seconds": round(publish_s, 2),
        "publish_block_events_per_s": round(sent_blocks / publish_s),
        "publish_block_events_per_cpu_s": round(sent_blocks / publish_cpu_s),
        "block_events_per_s": round(report["received_blocks"] / end_to_end_s),
        "publisher_cpu_share": round(publish_cpu_s / publish_s, 2),
        "subscriber_cpu_s": round(report["cpu_s"], 2),
        "msgs_per_s": round(report["received_batches"] / end_to_end_s),
        "blocks_per_msg": round(sent_blocks / i, 1),
        "bytes_per_msg": round(report["payload_bytes"] / max(1, report["received_batches"])),
        "sent_batches": i,
        "sent_blocks": sent_blocks,
        "received_blocks": report["received_blocks"],
        "lost_batches": lost,
        "gaps": report["gaps"],
        "mismatches": report["mismatches"],
        "ok": lost == 0
        and report["gaps"] == 0
        and report["mismatches"] == 0
        and report["received_blocks"] == sent_blocks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--codec", nargs="+", choices=CODEC_NAMES, default=list(CODEC_NAMES))
    parser.add_argument("--pool", choices=("w1", "synthetic"), default="w1")
    parser.add_argument("--subscriber", choices=("verify", "raw", "consumer"), default="verify")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:0", help="base PUB endpoint")
    args = parser.parse_args()
    pool = make_pool(args.pool)
    for _ in range(args.repeat):
        for codec_name in args.codec:
            result = run(codec_name, args.seconds, args.subscriber, args.endpoint, args.pool, pool)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
