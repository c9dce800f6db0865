"""In-process driver of the G2 coordinator's handler, for instruction counts under callgrind.

Four DEALER sockets (one per rank) in this process say HELLO to a `Coordinator` (64 k-slot
pool, speedup inf: copies land at once), then each loop turn every rank sends `--window`
packed OFFLOADs of `--batch` fresh blocks (one chain per message, as `bench_fleet.py` sends
them) and the coordinator runs one turn of its loop: `serve_router`, `advance`, `flush`. The
ranks then drain what came back (ACKs, G2_EVENTS) without decoding it. The sockets are
inproc (in the coordinator's context), so every message sent is queued when the turn starts.
The pool is filled first (`--warmup` turns), so every measured block evicts one. (valgrind
lacks pidfd_open: the coordinator then watches a pipe instead, see `_pidfd_stand_in`.)

Only the coordinator's turns run inside `operator.call`, so

    valgrind --tool=callgrind --toggle-collect=_operator_call \\
        python scripts/callgrind_coordinator.py

counts exactly the coordinator's instructions (messages are built before the measured turns;
the ranks' receives fall outside). It prints the blocks accepted in the measured turns;
instructions per block = callgrind's total / that number. Measured on a compiled copy (see
the helpers' notes): `PYTHONPATH=<copy> valgrind ... python <copy>/scripts/...`.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shmkv import core_mode, transport as tp  # noqa: E402
from shmkv.coordinator import Coordinator, CoordinatorSpec, _periodic_gc  # noqa: E402
from shmkv.shm import segment_name  # noqa: E402

BLOCK_SIZE = 16
NUM_RANKS = 4


def _offloads(rng: np.random.Generator, batch: int, first: int, count: int) -> list[list[bytes]]:
    """`count` packed OFFLOADs of `batch` fresh blocks (one chain each), as `bench_fleet.py`."""
    meta = np.arange(batch, dtype=np.uint64)
    meta[1:] |= np.uint64(tp.PACKED_HAS_PARENT)
    words = np.zeros((batch, 4), dtype="<u8")
    words[:, 3] = meta
    tokens = bytes(4 * BLOCK_SIZE * batch)
    out = []
    for k in range(count):
        seqs = rng.integers(0, 1 << 64, size=batch, dtype=np.uint64)
        words[:, 0] = seqs
        words[1:, 1] = seqs[:-1]
        words[:, 2] = seqs ^ np.uint64(0x5555)
        body = {"batch": first + k, "num_items": batch, "packed": True}
        out.append(tp.encode(tp.OFFLOAD, body, (words.tobytes(), tokens)))
    return out


def _drain(socks: list[zmq.Socket[bytes]]) -> int:
    """Receive everything queued for the ranks; returns how many messages."""
    count = 0
    for sock in socks:
        while True:
            try:
                sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            count += 1
    return count


def _pidfd_stand_in() -> None:
    """valgrind lacks pidfd_open (ENOSYS): give the coordinator a pipe's read end instead
    (never readable: the ranks of this process never die)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        keep: list[int] = []

        def stand_in(pid: int, flags: int = 0) -> int:
            read_fd, write_fd = os.pipe()
            keep.append(write_fd)
            return read_fd

        os.pidfd_open = stand_in


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--g2-blocks", type=int, default=65536)
    parser.add_argument("--warmup", type=int, default=0, help="turns before measuring")
    parser.add_argument("--turns", type=int, default=64, help="measured turns")
    args = parser.parse_args()
    _pidfd_stand_in()
    per_turn = NUM_RANKS * args.window * args.batch
    warmup = args.warmup or math.ceil(args.g2_blocks / per_turn) + 2
    tmp = Path(tempfile.mkdtemp(prefix="shmkv-cg", dir="/tmp"))
    fleet = f"cg{uuid.uuid4().hex[:10]}"
    spec = CoordinatorSpec(
        fleet_id=fleet,
        segment_name=segment_name(fleet),
        num_g2_blocks=args.g2_blocks,
        block_size=BLOCK_SIZE,
        num_ranks=NUM_RANKS,
        endpoint=f"inproc://{fleet}",
        supervisor_endpoint=f"ipc://{tmp}/s",
        start_monotonic_s=time.monotonic(),
        speedup_ratio=math.inf,
    )
    socks: list[zmq.Socket[bytes]] = []
    rng = np.random.default_rng(12345)
    try:
        with Coordinator(spec) as coord:
            ctx = coord._ctx  # NOTE: inproc: a send is queued at the ROUTER when it returns
            assert ctx is not None
            for rank in range(NUM_RANKS):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, 0)
                sock.setsockopt(zmq.SNDHWM, 0)
                sock.setsockopt(zmq.IDENTITY, f"rank{rank}".encode())
                sock.connect(coord.endpoint)
                sock.send_multipart(
                    tp.encode(tp.HELLO, {"rank": rank, "pid": os.getpid(), "epoch": 0})
                )
                socks.append(sock)
            while len(coord._ranks) < NUM_RANKS:
                coord.serve_router(32)
            _drain(socks)
            total_turns = warmup + args.turns
            plan = [
                [
                    _offloads(rng, args.batch, 1 + (turn * args.window), args.window)
                    for _rank in range(NUM_RANKS)
                ]
                for turn in range(total_turns)
            ]

            def turn() -> None:
                coord.serve_router(32)
                coord.advance()
                coord.flush()

            def send(turn_msgs: list[list[list[bytes]]]) -> None:
                for k in range(args.window):
                    for rank in range(NUM_RANKS):
                        socks[rank].send_multipart(turn_msgs[rank][k])

            messages = 0
            with _periodic_gc():
                for turn_msgs in plan[:warmup]:
                    send(turn_msgs)
                    turn()
                    messages += _drain(socks)
                before = coord.stats.accepted
                messages = 0
                for turn_msgs in plan[warmup:]:
                    send(turn_msgs)
                    operator.call(turn)
                    messages += _drain(socks)
                accepted = coord.stats.accepted - before
            stats = coord.stats_dict()
            for sock in socks:
                sock.close(linger=0)
    finally:
        for child in tmp.iterdir():
            child.unlink(missing_ok=True)
        tmp.rmdir()
    print(
        json.dumps(
            {
                "core": core_mode(),
                "measured_turns": args.turns,
                "accepted_blocks": accepted,
                "rank_messages_received": messages,
                "evicted_total": stats["evicted"],
                "offloaded_total": stats["offloaded"],
                "dropped_total": stats["dropped"],
            }
        )
    )


if __name__ == "__main__":
    main()
