"""In-process driver of the G2 coordinator's handler, for instruction counts under callgrind.

Four DEALER sockets (one per rank) in this process say HELLO to a `Coordinator` (64 k-slot
pool, speedup inf: copies land at once), then each loop turn every rank sends `--window`
packed OFFLOADs of `--batch` fresh blocks (one chain per message, as `bench_fleet.py` sends
them; `--per-turn N`: N OFFLOADs per turn instead, the ranks in turn) and the coordinator runs
one turn of its loop: `serve_router`, `advance`, `flush` (`--loop`: `Coordinator.loop_turn`,
the process loop's whole turn, poll and stats clock included). The ranks then drain what came
back (ACKs, G2_EVENTS) without decoding it.

The turn shape of `bench_fleet.py --only coordinator` (4 ranks, window 4, 64-block OFFLOADs)
is about 8 OFFLOADs per turn (its "offloads_per_broadcast": 7-12), i.e. `--per-turn 8`; the
default (16 per turn) is its `--window 4` upper bound. Report instructions per turn as well as
per block: at window 4 a turn's fixed cost weighs. The sockets are
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


def _offload(rng: np.random.Generator, batch: int, batch_id: int) -> list[bytes]:
    """A packed OFFLOAD of `batch` fresh blocks (one chain), as `bench_fleet.py` sends."""
    meta = np.arange(batch, dtype=np.uint64)
    meta[1:] |= np.uint64(tp.PACKED_HAS_PARENT)
    words = np.zeros((batch, 4), dtype="<u8")
    words[:, 3] = meta
    seqs = rng.integers(0, 1 << 64, size=batch, dtype=np.uint64)
    words[:, 0] = seqs
    words[1:, 1] = seqs[:-1]
    words[:, 2] = seqs ^ np.uint64(0x5555)
    body = {"batch": batch_id, "num_items": batch, "packed": True}
    return tp.encode(tp.OFFLOAD, body, (words.tobytes(), bytes(4 * BLOCK_SIZE * batch)))


def _plan(
    rng: np.random.Generator, batch: int, per_turn: int, turns: int
) -> list[list[tuple[int, list[bytes]]]]:
    """Per turn, `per_turn` (rank, OFFLOAD) pairs: message m of the run goes to rank m % 4 as
    its batch 1 + m // 4 (with `per_turn` = 4 x window: each rank's next `window` batches)."""
    plan = []
    for turn in range(turns):
        first = turn * per_turn
        plan.append(
            [
                (m % NUM_RANKS, _offload(rng, batch, 1 + m // NUM_RANKS))
                for m in range(first, first + per_turn)
            ]
        )
    return plan


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
    parser.add_argument(
        "--window", type=int, default=4, help="OFFLOADs per rank per turn (without --per-turn)"
    )
    parser.add_argument(
        "--per-turn",
        type=int,
        default=0,
        help="OFFLOADs per turn, the ranks in turn (default 4 x window); the real "
        "bench_fleet.py at window 4 gives the coordinator 7-12 per turn",
    )
    parser.add_argument(
        "--loop",
        action="store_true",
        help="run each turn as the process loop does (`Coordinator.loop_turn`: poll, "
        "serve_router, advance, flush, stats clock), not just serve_router/advance/flush",
    )
    parser.add_argument("--g2-blocks", type=int, default=65536)
    parser.add_argument("--warmup", type=int, default=0, help="turns before measuring")
    parser.add_argument("--turns", type=int, default=64, help="measured turns")
    args = parser.parse_args()
    _pidfd_stand_in()
    per_turn = args.per_turn or NUM_RANKS * args.window
    warmup = args.warmup or math.ceil(args.g2_blocks / (per_turn * args.batch)) + 2
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
            plan = _plan(rng, args.batch, per_turn, warmup + args.turns)
            next_stats = [time.monotonic() + 3600.0]

            def turn() -> None:
                if args.loop:
                    next_stats[0] = coord.loop_turn(next_stats[0])
                else:
                    coord.serve_router(32)
                    coord.advance()
                    coord.flush()

            def send(turn_msgs: list[tuple[int, list[bytes]]]) -> None:
                for rank, frames in turn_msgs:
                    socks[rank].send_multipart(frames)

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
                "offloads_per_turn": per_turn,
                "blocks_per_offload": args.batch,
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
