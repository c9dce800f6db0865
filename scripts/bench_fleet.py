"""Throughput of the shared-G2 coordinator and of the rank side, and the cost of a big pool.

Prints one JSON line per figure:

* ``coordinator_offload``: a real coordinator process (speedup inf: copies land at once) and
  `--ranks` rank processes that each keep `--window` OFFLOAD messages of `--batch` fresh
  blocks (one chain per message) in flight for `--seconds`; blocks accepted per wall second,
  summed over the ranks (each counts the items its OFFLOAD_ACKs accepted inside the common
  window; at speedup inf those ACKs ride in the "acks" of the G2_EVENTS headers). The pool
  (`--g2-blocks`) fills within the first second, so most of the run also evicts one Lineage
  leaf per block. Ranks decode only the G2_EVENTS headers, not their events (a real rank
  decodes them; this measures the coordinator). `--wire packed` (default) sends the items as a
  packed frame built by numpy (`transport.pack_offload_items` layout), `--wire json` as JSON
  lists. `ranks_cpu_share`: CPU seconds of the rank processes per wall second (they share the
  machine with the coordinator). Target >= 200 k blocks/s.
* ``rank_onboard_pin``: the rank side against a live coordinator holding `--pin-blocks`
  blocks (every block a hit), for prefixes of 16 and 64 blocks; blocks per wall second and
  per CPU second of this process (median of `--repeat`). Every figure counts blocks that went
  through the whole protocol: shared-index lookup, validation (gen, state, hash), pin in the
  rank's own row, full fence, re-check (state, gen), unpin.
  - ``run{16,64}_*``: one request at a time through the client, as the engine onboards today:
    `SharedG2Client.prepare_onboard` (replica PLH -> seq hash, then `G2RankView.pin_prefix`,
    the per-block path below 96 blocks) + `cancel_onboard` (unpin).
  - ``batched{16,64}x_run{16,64}_*``: the batched path, `G2RankView.pin_prefixes` of 16 / 64
    prefixes in one call (one numpy pass, one fence) + `unpin_many`. Target >= 1 M/s.
* ``shared_metadata``: shared bytes per G2 slot excluding token ids (`shmkv.shm.bytes_per_slot`)
  for 1, 2, 4, 8 ranks (target <= 64), and the time to start a 1 M-slot pool: the
  coordinator's `Coordinator(spec)` (segment create + fallocate + map + init, directory,
  sockets) with 8 ranks and 16-token blocks, median of `--repeat` (target < 1 s).

    .venv/bin/python scripts/bench_fleet.py [--ranks 4] [--batch 64] [--seconds 3] [--wire packed]

(The fleet's W1 tokens-per-second figures with 1/2/4 ranks live elsewhere.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import zmq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shmkv import core_mode, transport as tp  # noqa: E402
from shmkv.clock import MonotonicClock  # noqa: E402
from shmkv.config import EngineConfig  # noqa: E402
from shmkv.coordinator import Coordinator, CoordinatorSpec  # noqa: E402
from shmkv.g2 import G2RankView  # noqa: E402
from shmkv.g2_client import SharedG2Client  # noqa: E402
from shmkv.hashing import make_plh  # noqa: E402
from shmkv.offload import BlockMeta, OffloadItem  # noqa: E402
from shmkv.shm import bytes_per_slot, segment_name  # noqa: E402

BLOCK_SIZE = 16
WORKER = ROOT / "workers" / "coordinator_worker.py"
_ACK_PREFIX = orjson.dumps({"v": tp.PROTOCOL_VERSION, "t": tp.OFFLOAD_ACK})[:-1]
_EVENTS_PREFIX = orjson.dumps({"v": tp.PROTOCOL_VERSION, "t": tp.G2_EVENTS})[:-1]


def _print(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


class _CoordinatorProcess:
    """A coordinator child process and the supervisor ROUTER it reports to."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], tmp: Path, **overrides: Any) -> None:
        self.sup = ctx.socket(zmq.ROUTER)
        self.sup.setsockopt(zmq.LINGER, 0)
        sup_endpoint = tp.bind_socket(self.sup, f"ipc://{tmp}/sup")
        fleet = f"bench{uuid.uuid4().hex[:8]}"
        fields: dict[str, Any] = {
            "fleet_id": fleet,
            "segment_name": segment_name(fleet),
            "num_g2_blocks": 65536,
            "block_size": BLOCK_SIZE,
            "num_ranks": 4,
            "endpoint": f"ipc://{tmp}/coord",
            "supervisor_endpoint": sup_endpoint,
            "start_monotonic_s": time.monotonic(),
            "speedup_ratio": math.inf,
        }
        fields.update(overrides)
        self.spec = CoordinatorSpec(**fields)
        self.popen = subprocess.Popen([sys.executable, str(WORKER), self.spec.to_json()])
        self.recv(tp.READY, 60.0)

    def recv(self, want: str, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sup.poll(max(1, int(left * 1000))):
                raise TimeoutError(f"no {want} from the coordinator")
            _identity, *frames = self.sup.recv_multipart()
            msg = tp.decode(frames)
            if msg.type == want:
                return msg.body

    def state(self) -> dict[str, Any]:
        self.sup.send_multipart([b"coordinator", *tp.encode(tp.STATE)])
        return self.recv(tp.STATE)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.sup.send_multipart([b"coordinator", *tp.encode(tp.STOP)])
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.sup.close(linger=0)


# -- (a) the coordinator ------------------------------------------------------------------------


def _rank_process(args: dict[str, Any]) -> None:
    """Body of one benchmark rank: offload fresh chains as fast as the window allows."""
    rank, batch, window = int(args["rank"]), int(args["batch"]), int(args["window"])
    start_at, stop_at = float(args["start_at"]), float(args["stop_at"])
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.IDENTITY, f"bench{rank}".encode())
    sock.connect(str(args["endpoint"]))
    sock.send_multipart(tp.encode(tp.HELLO, {"rank": rank, "pid": os.getpid(), "epoch": 0}))
    if not sock.poll(30_000) or tp.decode(sock.recv_multipart()).type != tp.WELCOME:
        raise SystemExit("no WELCOME")
    rng = random.Random(rank * 7919 + 1)
    gen = np.random.default_rng(rank * 7919 + 1)
    packed = args.get("wire", "packed") == "packed"
    meta = np.arange(batch, dtype=np.uint64)
    meta[1:] |= np.uint64(tp.PACKED_HAS_PARENT)
    words = np.zeros((batch, 4), dtype="<u8")
    words[:, 3] = meta
    tokens = bytes(4 * BLOCK_SIZE * batch)
    outstanding: dict[int, float] = {}
    next_batch = 1
    accepted = rejected = batches = 0
    while time.monotonic() < start_at:
        time.sleep(0.001)
    cpu_start = time.process_time()
    cpu_window: float | None = None
    while True:
        now = time.monotonic()
        if now >= stop_at and cpu_window is None:
            cpu_window = time.process_time() - cpu_start
        if now >= stop_at and not outstanding:
            break
        while now < stop_at and len(outstanding) < window:
            if packed:  # one chain of fresh blocks, built by numpy
                seqs = gen.integers(0, 1 << 64, size=batch, dtype=np.uint64)
                words[:, 0] = seqs
                words[1:, 1] = seqs[:-1]
                words[:, 2] = seqs ^ np.uint64(0x5555)
                body: dict[str, Any] = {"batch": next_batch, "num_items": batch, "packed": True}
                frames: tuple[bytes, ...] = (words.tobytes(), tokens)
            else:
                parent = -1
                items = []
                for position in range(batch):
                    seq = rng.getrandbits(64)
                    items.append([seq, parent, seq ^ 0x5555, position])
                    parent = seq
                body = {"batch": next_batch, "items": items, "has_tokens": True}
                frames = (tokens,)
            sock.send_multipart(tp.encode(tp.OFFLOAD, body, frames))
            outstanding[next_batch] = now
            next_batch += 1
        if not sock.poll(100):
            continue
        while True:
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            head = parts[0].buffer
            if head[: len(_ACK_PREFIX)] == _ACK_PREFIX:
                acks: list[dict[str, Any]] = [tp.decode([part.bytes for part in parts]).body]
            elif head[: len(_EVENTS_PREFIX)] == _EVENTS_PREFIX:
                # only the header: its "acks" (the events frames are not decoded here)
                acks = orjson.loads(head).get("acks", [])
            else:
                continue  # OFFLOAD_DONE: not sent at speedup inf
            for ack in acks:
                sent = outstanding.pop(int(ack["batch"]), None)
                if sent is not None and sent >= start_at and time.monotonic() <= stop_at:
                    accepted += len(ack["accepted"])
                    rejected += len(ack["rejected"])
                    batches += 1
    cpu_s = cpu_window if cpu_window is not None else time.process_time() - cpu_start
    report = {"rank": rank, "accepted": accepted, "rejected": rejected, "acks": batches}
    print(json.dumps({**report, "cpu_s": cpu_s}))
    sock.close(linger=0)
    ctx.term()


def bench_coordinator(
    ctx: zmq.Context[zmq.Socket[bytes]], tmp: Path, ranks: int, batch: int, window: int,
    seconds: float, g2_blocks: int, wire: str = "packed",
) -> dict[str, Any]:  # fmt: skip
    coord = _CoordinatorProcess(ctx, tmp, num_ranks=ranks, num_g2_blocks=g2_blocks)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        start_at = time.monotonic() + 3.0  # rank processes need ~1 s to import and connect
        for rank in range(ranks):
            args = {
                "rank": rank,
                "batch": batch,
                "window": window,
                "start_at": start_at,
                "stop_at": start_at + seconds,
                "endpoint": coord.spec.endpoint,
                "wire": wire,
            }
            cmd = [sys.executable, __file__, "--rank-process", json.dumps(args)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE))
        time.sleep(max(0.0, start_at - time.monotonic()))
        cpu_start = _cpu_seconds(coord.popen.pid)
        time.sleep(seconds)
        cpu_stop = _cpu_seconds(coord.popen.pid)
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            reports.append(json.loads(out.decode().strip().splitlines()[-1]))
        stats = coord.state()["stats"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        coord.close()
    accepted = sum(r["accepted"] for r in reports)
    coord_cpu = None if cpu_start is None or cpu_stop is None else cpu_stop - cpu_start
    return {
        "bench": "coordinator_offload",
        "core": core_mode(),
        "ranks": ranks,
        "wire": wire,
        "batch_blocks": batch,
        "window": window,
        "seconds": seconds,
        "g2_blocks": g2_blocks,
        "accepted_blocks_per_s": round(accepted / seconds),
        "accepted_blocks_per_coordinator_cpu_s": (
            round(accepted / coord_cpu) if coord_cpu else None
        ),
        "coordinator_cpu_share": round(coord_cpu / seconds, 2) if coord_cpu else None,
        "ranks_cpu_share": round(sum(r["cpu_s"] for r in reports) / seconds, 2),
        "rejected_in_window": sum(r["rejected"] for r in reports),
        "offloaded_total": stats["offloaded"],
        "evicted_total": stats["evicted"],
        "dropped_total": stats["dropped"],
        "offloads_per_broadcast": round(
            stats["offload_messages"] / max(1, stats["event_messages"]), 1
        ),
        "target_blocks_per_s": 200_000,
    }


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# -- (b) the rank side ---------------------------------------------------------------------------


def _chain(rng: random.Random, length: int) -> list[OffloadItem]:
    items: list[OffloadItem] = []
    parent: int | None = None
    tokens = list(range(BLOCK_SIZE))
    for position in range(length):
        seq = rng.getrandbits(64)
        items.append(
            OffloadItem(make_plh(seq, parent, position), BlockMeta(seq, parent, 1, tokens))
        )
        parent = seq
    return items


def bench_rank_side(
    ctx: zmq.Context[zmq.Socket[bytes]], tmp: Path, pin_blocks: int, seconds: float, repeat: int
) -> dict[str, Any]:
    coord = _CoordinatorProcess(ctx, tmp, num_ranks=2, num_g2_blocks=pin_blocks)
    rng = random.Random(5)
    result: dict[str, Any] = {"bench": "rank_onboard_pin", "pool_blocks": pin_blocks}
    try:
        spec = coord.spec
        clock = MonotonicClock(spec.start_monotonic_s, spec.speedup_ratio)
        config = EngineConfig(block_size=BLOCK_SIZE, num_g2_blocks=pin_blocks)
        with SharedG2Client(
            rank=1,
            epoch=0,
            segment_name=spec.segment_name,
            coordinator_endpoint=spec.endpoint,
            config=config,
            clock=clock,
            context=ctx,
        ) as client:
            chains = [_chain(rng, 64) for _ in range(pin_blocks // 64)]
            for chain in chains:
                client.enqueue_evictions(chain, list(range(64)))
            deadline = time.monotonic() + 60
            while client.stats().stores_received < len(chains) * 64:
                if time.monotonic() > deadline:
                    raise TimeoutError("the pool did not fill")
                client.socket.poll(50)
                client.tick(clock.now_ms())
                client.take_events()
            for length in (16, 64):
                prefixes = [[item.plh for item in chain[:length]] for chain in chains]
                order = [rng.randrange(len(prefixes)) for _ in range(4096)]
                runs = []
                for _ in range(repeat):
                    blocks = 0
                    cursor = 0
                    wall0, cpu0 = time.perf_counter(), time.process_time()
                    stop = wall0 + seconds
                    while time.perf_counter() < stop:
                        for _ in range(64):
                            cursor = (cursor + 1) & 4095
                            plan = client.prepare_onboard(prefixes[order[cursor]])
                            assert plan is not None
                            assert plan.num_blocks == length
                            blocks += length
                            client.cancel_onboard(plan)
                    wall = time.perf_counter() - wall0
                    cpu = max(time.process_time() - cpu0, 1e-9)
                    runs.append((blocks / wall, blocks / cpu))
                result[f"run{length}_blocks_per_s"] = round(statistics.median(r[0] for r in runs))
                result[f"run{length}_blocks_per_cpu_s"] = round(
                    statistics.median(r[1] for r in runs)
                )
                seq_prefixes = [[item.meta.seq_hash for item in chain[:length]] for chain in chains]
                for width in (16, 64):
                    rates = [
                        _batched_pin_rate(client.view, seq_prefixes, order, width, seconds)
                        for _ in range(repeat)
                    ]
                    key = f"batched{width}x_run{length}"
                    result[f"{key}_blocks_per_s"] = round(statistics.median(r[0] for r in rates))
                    result[f"{key}_blocks_per_cpu_s"] = round(
                        statistics.median(r[1] for r in rates)
                    )
            client.check_invariants()
    finally:
        coord.close()
    result["target_blocks_per_s"] = 1_000_000
    return result


def _batched_pin_rate(
    view: G2RankView, prefixes: list[list[int]], order: list[int], width: int, seconds: float
) -> tuple[float, float]:
    """Blocks per wall and CPU second through `pin_prefixes` (width lists) + `unpin_many`."""
    blocks = 0
    cursor = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    stop = wall0 + seconds
    while time.perf_counter() < stop:
        wanted = []
        for _ in range(width):
            cursor = (cursor + 1) & 4095
            wanted.append(prefixes[order[cursor]])
        runs = view.pin_prefixes(wanted)
        held = [run for run in runs if run is not None]
        assert len(held) == width
        blocks += sum(len(run) for run in held)
        view.unpin_many(held)
    wall = time.perf_counter() - wall0
    return blocks / wall, blocks / max(time.process_time() - cpu0, 1e-9)


# -- (c) shared metadata and pool start ---------------------------------------------------------


def bench_metadata(tmp: Path, repeat: int) -> dict[str, Any]:
    times: list[float] = []
    for n in range(repeat):
        fleet = f"bench{uuid.uuid4().hex[:8]}"
        spec = CoordinatorSpec(
            fleet_id=fleet,
            segment_name=segment_name(fleet),
            num_g2_blocks=1_000_000,
            block_size=BLOCK_SIZE,
            num_ranks=8,
            endpoint=f"ipc://{tmp}/big{n}",
            supervisor_endpoint=f"ipc://{tmp}/bigsup{n}",
            start_monotonic_s=time.monotonic(),
        )
        started = time.perf_counter()
        coord = Coordinator(spec)
        times.append(time.perf_counter() - started)
        coord.close()
    return {
        "bench": "shared_metadata",
        "bytes_per_slot_excluding_tokens": {str(r): bytes_per_slot(r) for r in (1, 2, 4, 8)},
        "target_bytes_per_slot": 64,
        "pool_1m_slots_8_ranks_start_s": round(statistics.median(times), 3),
        "pool_1m_start_s_max": round(max(times), 3),
        "target_start_s": 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--window", type=int, default=4, help="OFFLOADs in flight per rank")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--g2-blocks", type=int, default=65536)
    parser.add_argument(
        "--wire", choices=("packed", "json"), default="packed", help="OFFLOAD item encoding"
    )
    parser.add_argument("--pin-blocks", type=int, default=16384)
    parser.add_argument("--pin-seconds", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--only", choices=("coordinator", "rank", "metadata"), action="append", default=None
    )
    parser.add_argument("--rank-process", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_process:
        _rank_process(json.loads(args.rank_process))
        return 0
    only = set(args.only or ("coordinator", "rank", "metadata"))
    tmp = Path(tempfile.mkdtemp(prefix="shmkv-bench", dir="/tmp"))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        if "metadata" in only:
            _print(bench_metadata(tmp, args.repeat))
        if "rank" in only:
            _print(bench_rank_side(ctx, tmp, args.pin_blocks, args.pin_seconds, args.repeat))
        if "coordinator" in only:
            _print(
                bench_coordinator(
                    ctx,
                    tmp,
                    args.ranks,
                    args.batch,
                    args.window,
                    args.seconds,
                    args.g2_blocks,
                    args.wire,
                )
            )
    finally:
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
