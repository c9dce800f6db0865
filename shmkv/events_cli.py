"""Layer 3: `shmkv events` (the reference consumer) and event publishing for `shmkv replay`.

`shmkv events` subscribes to one or more ranks, decodes either codec, checks seq contiguity,
recovers gaps through each rank's replay socket, keeps a per-(rank, tier) index, prints rates,
gaps and recovered batches, and with `--compare STATE.json` exits non-zero on any difference
from a state dump (`shmkv replay|fleet --dump-state`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shmkv.codec import make_codec
from shmkv.config import EngineConfig
from shmkv.consumer import ERROR_COUNTERS, EventConsumer, RankEndpoint
from shmkv.errors import ConfigError
from shmkv.events import EventBatch, KvEvent
from shmkv.publisher import EventPublisher, PublisherConfig, offset_endpoint
from shmkv.transport import warn_if_exposed

EXIT_OK = 0
EXIT_MISMATCH = 1


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "events",
        help="subscribe to ranks' KV event streams, check them, rebuild and compare the index",
        description="The reference consumer: subscribes to N ranks (rank r at the base endpoint's "
        "port + r), decodes json or vllm events, detects seq gaps and recovers them through the "
        "replay sockets, and keeps a per-(rank, tier) index. With --compare STATE.json it checks "
        "that index against a state dump. Exits 1 on any difference, unrecovered gap, or orphan "
        "store (a block whose parent the rank never announced).",
    )
    parser.add_argument(
        "--endpoint",
        default="tcp://127.0.0.1:5557",
        help="rank 0's live endpoint; rank r uses port + r (default tcp://127.0.0.1:5557)",
    )
    parser.add_argument(
        "--replay-endpoint",
        default=None,
        help="rank 0's replay endpoint; rank r uses port + r (default: no replay)",
    )
    parser.add_argument(
        "--ranks", type=int, default=1, metavar="N", help="number of ranks (default 1)"
    )
    parser.add_argument(
        "--codec",
        choices=("auto", "json", "vllm"),
        default="auto",
        help="payload format (default: detected per message)",
    )
    parser.add_argument("--block-size", type=int, default=16, help="fleet block size (default 16)")
    parser.add_argument("--topic", default="", help="subscription prefix (default: everything)")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds (default: run until idle or interrupted)",
    )
    parser.add_argument(
        "--until-idle",
        type=float,
        default=None,
        metavar="S",
        help="stop once no event arrived for S seconds (after the first one)",
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="STATE.json",
        help="compare the rebuilt index with this state dump at the end",
    )
    parser.add_argument(
        "--wait-for-state",
        type=float,
        default=0.0,
        metavar="S",
        help="with --compare: wait up to S seconds for the file to appear",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between progress lines (default 1)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the final statistics as JSON only"
    )
    parser.set_defaults(func=cmd_events)


def cmd_events(args: argparse.Namespace) -> int:
    if args.ranks < 1:
        raise ConfigError("--ranks must be >= 1")
    endpoints = [
        RankEndpoint(
            rank=rank,
            endpoint=offset_endpoint(args.endpoint, rank),
            replay_endpoint=None
            if args.replay_endpoint is None
            else offset_endpoint(args.replay_endpoint, rank),
        )
        for rank in range(args.ranks)
    ]
    deadline = None if args.duration is None else time.monotonic() + args.duration
    started = time.monotonic()
    last_event = None
    last_print = started
    with EventConsumer(
        endpoints, codec=args.codec, block_size=args.block_size, topic=args.topic.encode()
    ) as consumer:
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if (
                args.until_idle is not None
                and last_event is not None
                and now - last_event >= args.until_idle
            ):
                break
            if consumer.poll(100):
                last_event = time.monotonic()
            if not args.json and now - last_print >= args.interval:
                last_print = now
                _print_progress(consumer.stats(), now - started)
        consumer.catch_up()
        stats = consumer.stats()
        differences: list[str] = []
        if args.compare:
            state = _load_state(args.compare, args.wait_for_state)
            differences = consumer.compare(state)
    lost = stats.get("lost_batches", 0)
    orphans = stats.get("orphan_stores", 0)
    errors = sum(stats.get(name, 0) for name in ERROR_COUNTERS)
    result = {
        **stats,
        "differences": len(differences),
        "errors": errors,
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        _print_progress(stats, time.monotonic() - started)
        for line in differences[:20]:
            print(f"  difference: {line}")
        if len(differences) > 20:
            print(f"  ... and {len(differences) - 20} more differences")
        print(json.dumps(result))
    if lost:
        print(f"shmkv events: {lost} batch(es) lost beyond the replay buffer", file=sys.stderr)
    if orphans:
        print(
            f"shmkv events: {orphans} orphan store(s): a parent the rank never announced",
            file=sys.stderr,
        )
    if differences:
        print(
            f"shmkv events: {len(differences)} difference(s) from {args.compare}", file=sys.stderr
        )
    return EXIT_MISMATCH if differences or errors else EXIT_OK


def _print_progress(stats: dict[str, int], elapsed_s: float) -> None:
    rate = stats.get("events", 0) / elapsed_s if elapsed_s > 0 else 0.0
    print(
        f"[{elapsed_s:7.1f}s] batches {stats.get('batches', 0)}  events {stats.get('events', 0)} "
        f"({rate:,.0f}/s)  gaps {stats.get('gaps', 0)}  recovered {stats.get('recovered_batches', 0)}  "
        f"lost {stats.get('lost_batches', 0)}  orphans {stats.get('orphan_stores', 0)}",
        file=sys.stderr,
    )


def _load_state(path: str, wait_s: float) -> dict[str, Any]:
    target = Path(path)
    deadline = time.monotonic() + wait_s
    while not target.is_file():
        if time.monotonic() >= deadline:
            raise ConfigError(f"--compare: no state file {path!r}")
        time.sleep(0.1)
    try:
        data = json.loads(target.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--compare: {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("ranks"), dict):
        raise ConfigError(f"--compare: {path} is not a state dump (needs a 'ranks' object)")
    return data


# ── publishing from the offline replay ───────────────────────────────────────────────────


def make_replay_publishers(
    args: argparse.Namespace, engine: EngineConfig
) -> tuple[Callable[[int, float, list[KvEvent]], None] | None, Callable[[], None]]:
    """One publisher per simulated rank; returns (events hook, close)."""
    host = args.event_host
    base = f"tcp://{host}:{args.zmq_kv_events_port}"
    replay = None if args.zmq_replay_port is None else f"tcp://{host}:{args.zmq_replay_port}"
    warn_if_exposed(base, "KV events")
    codec = make_codec(
        args.event_codec, block_size=engine.block_size, legacy_array_events=args.vllm_array_events
    )
    publishers: list[EventPublisher] = []
    try:
        for rank in range(args.data_parallel_size):
            config = PublisherConfig(
                endpoint=base if args.zmq_kv_events_port != 0 else f"tcp://{host}:0",
                replay_endpoint=replay,
                topic=args.event_topic,
                model_name=args.model_name,
                buffer_steps=args.event_buffer_steps,
                legacy_replay=args.legacy_replay,
            )
            publishers.append(EventPublisher(rank, codec, config))
        for publisher in publishers:
            print(
                f"rank {publisher.rank}: events {publisher.endpoint}"
                + (f", replay {publisher.replay_endpoint}" if publisher.replay_endpoint else ""),
                file=sys.stderr,
            )
        if args.wait_for_subscribers is not None:
            for publisher in publishers:
                if not publisher.wait_for_subscribers(1, args.wait_for_subscribers):
                    raise ConfigError(
                        f"no subscriber on rank {publisher.rank} within {args.wait_for_subscribers} s"
                    )
        for publisher in publishers:
            if publisher.replay_endpoint is not None:
                publisher.start_background_replay()
    except BaseException:
        for publisher in publishers:
            publisher.close()
        raise

    def on_events(rank: int, _end_ms: float, events: list[KvEvent]) -> None:
        publishers[rank].publish(EventBatch(ts_s=time.time(), dp_rank=rank, events=events))

    def close() -> None:
        for publisher in publishers:
            publisher.flush(timeout_s=10.0)
        for publisher in publishers:
            publisher.close()

    return on_events, close
