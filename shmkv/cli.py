"""Layer 3: the `shmkv` command line.

    shmkv replay   offline, virtual-clock replay of N ranks in one process
    shmkv events   subscribe to ranks' KV event streams, check them, rebuild the index
    shmkv fleet    live multi-process fleet with a shared G2 pool
    shmkv stress   concurrent eviction with fault injection and invariant checks
    shmkv cleanup  remove shared-memory segments left by dead fleets

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 3 a fleet process died,
130 interrupted. User errors print one line that says what to change, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from shmkv.config import EVICTION_BACKENDS, PREEMPTION_MODES, EngineConfig
from shmkv.errors import ConfigError, ShmkvError
from shmkv.workload import Session, mooncake_sessions, synthetic_sessions

logger = logging.getLogger("shmkv")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_WORKER_DIED = 3
EXIT_INTERRUPTED = 130

# Options whose presence (not their default) matters for validation.
_G2_ONLY_FLAGS = ("bandwidth_g1_to_g2_gbps", "bandwidth_g2_to_g1_gbps", "offload_batch_size")


class UsageError(ConfigError):
    """A contradictory or invalid combination of command-line options."""


# ── shared option groups ──────────────────────────────────────────────────────────────────


def _float_or_inf(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if math.isnan(value):
        raise argparse.ArgumentTypeError("NaN is not allowed")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named as Dynamo's mocker names them. Defaults: `EngineConfig`."""
    d = EngineConfig()
    g = parser.add_argument_group("engine (per rank)")
    g.add_argument(
        "--num-gpu-blocks-override",
        type=int,
        default=None,
        metavar="N",
        help=f"G1 blocks per rank (default {d.num_gpu_blocks})",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="TOKENS",
        help=f"tokens per KV block, fleet-wide (default {d.block_size})",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        metavar="N",
        help=f"max running requests per rank (default {d.max_num_seqs})",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"token budget per pass (default {d.max_num_batched_tokens})",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        metavar="TOKENS",
        help="reject prompts of at least this many tokens (default: no limit)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse cached prefix blocks; off also disables KV events (default on)",
    )
    g.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="split long prompts across passes (default on)",
    )
    g.add_argument(
        "--preemption-mode",
        choices=PREEMPTION_MODES,
        default=None,
        help="which running request to preempt when G1 is full (default lifo)",
    )
    g.add_argument(
        "--speedup-ratio",
        type=_float_or_inf,
        default=None,
        metavar="X",
        help="divide simulated compute time by X; 0 or inf = no delay (default 1)",
    )
    g.add_argument(
        "--decode-speedup-ratio",
        type=_float_or_inf,
        default=None,
        metavar="X",
        help="extra divisor for decode time only (default 1)",
    )
    g.add_argument(
        "--eviction",
        choices=EVICTION_BACKENDS,
        default=None,
        help="G1 inactive-pool eviction backend (default lineage)",
    )
    g.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="number of DP ranks (default 1)",
    )
    g.add_argument("--seed", type=int, default=None, help="seed for generated tokens (default 0)")
    h = parser.add_argument_group("host tier G2 (offload)")
    h.add_argument(
        "--num-g2-blocks",
        type=int,
        default=None,
        metavar="N",
        help="G2 blocks (0 = no G2; default 0)",
    )
    h.add_argument(
        "--kv-bytes-per-token",
        type=int,
        default=None,
        metavar="BYTES",
        help="KV bytes per token; times block size = bytes per transfer block",
    )
    h.add_argument(
        "--bandwidth-g1-to-g2-gbps",
        type=float,
        default=None,
        metavar="GBPS",
        help="offload link speed, GB/s (default 14; <= 0 = unlimited)",
    )
    h.add_argument(
        "--bandwidth-g2-to-g1-gbps",
        type=float,
        default=None,
        metavar="GBPS",
        help="onboard link speed, GB/s (default 14; <= 0 = unlimited)",
    )
    h.add_argument(
        "--offload-batch-size",
        type=int,
        default=None,
        metavar="N",
        help="blocks per offload transfer, and max transfers in flight (default 32)",
    )
    parser.add_argument(
        "--extra-engine-args",
        default=None,
        metavar="JSON|FILE",
        help="engine args as a JSON object or a path to a JSON file; "
        "flags given on the command line win",
    )


_FLAG_TO_FIELD = {
    "num_gpu_blocks_override": "num_gpu_blocks",
    "block_size": "block_size",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "max_model_len": "max_model_len",
    "enable_prefix_caching": "enable_prefix_caching",
    "enable_chunked_prefill": "enable_chunked_prefill",
    "preemption_mode": "preemption_mode",
    "speedup_ratio": "speedup_ratio",
    "decode_speedup_ratio": "decode_speedup_ratio",
    "eviction": "eviction",
    "seed": "seed",
    "num_g2_blocks": "num_g2_blocks",
    "kv_bytes_per_token": "kv_bytes_per_token",
    "bandwidth_g1_to_g2_gbps": "bandwidth_g1_to_g2_gbps",
    "bandwidth_g2_to_g1_gbps": "bandwidth_g2_to_g1_gbps",
    "offload_batch_size": "offload_batch_size",
}


def _load_json_arg(text: str, what: str) -> dict[str, Any]:
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise UsageError(f"{what}: {text!r} is neither a JSON object nor a readable file")
        source = path.read_text()
    try:
        value = json.loads(source)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{what}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    if not isinstance(value, dict):
        raise UsageError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Defaults < --extra-engine-args < explicit flags; contradictions are UsageErrors."""
    config = EngineConfig()
    if args.extra_engine_args:
        extra = _load_json_arg(args.extra_engine_args, "--extra-engine-args")
        nested = extra.get("engine")
        if isinstance(nested, dict):  # Dynamo's canonical {"engine": {...}} shape
            extra = {**{k: v for k, v in extra.items() if k != "engine"}, **nested}
        config = EngineConfig.from_mapping(extra, config)
    flags = {field: getattr(args, flag) for flag, field in _FLAG_TO_FIELD.items()}
    given = {k: v for k, v in flags.items() if v is not None}
    config = EngineConfig.from_mapping(given, config)
    if not config.has_g2:
        stray = [
            f"--{name.replace('_', '-')}" for name in _G2_ONLY_FLAGS if given.get(name) is not None
        ]
        if stray:
            raise UsageError(f"{', '.join(stray)} need a host tier: add --num-g2-blocks N (N > 0)")
    elif config.kv_bytes_per_token == 0:
        logger.warning("G2 enabled without --kv-bytes-per-token: transfers take no time")
    if args.data_parallel_size < 1:
        raise UsageError(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
    return config


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload (synthetic unless --trace)")
    g.add_argument(
        "--input-tokens", type=int, default=1024, metavar="N", help="prompt length (default 1024)"
    )
    g.add_argument(
        "--output-tokens",
        type=int,
        default=128,
        metavar="N",
        help="generated tokens per request (default 128)",
    )
    g.add_argument(
        "--request-count",
        type=int,
        default=500,
        metavar="N",
        help="requests, or sessions with --turns-per-session (default 500)",
    )
    arrival = g.add_mutually_exclusive_group()
    arrival.add_argument(
        "--request-rate",
        type=float,
        default=None,
        metavar="RPS",
        help="open loop, Poisson arrivals at RPS requests/s",
    )
    arrival.add_argument(
        "--arrival-interval-ms",
        type=float,
        default=None,
        metavar="MS",
        help="open loop, one request every MS ms",
    )
    g.add_argument(
        "--replay-concurrency",
        type=int,
        default=None,
        metavar="N",
        help="closed loop: at most N sessions in flight (default 32 when no rate "
        "or interval is given)",
    )
    g.add_argument("--arrival-seed", type=int, default=42, help="seed of arrivals and prompts")
    g.add_argument(
        "--shared-prefix-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="fraction of each prompt shared within its prefix group (default 0)",
    )
    g.add_argument(
        "--num-prefix-groups",
        type=int,
        default=0,
        metavar="N",
        help="number of prefix groups (default 0 = no sharing)",
    )
    g.add_argument("--turns-per-session", type=int, default=1, metavar="N")
    g.add_argument("--inter-turn-delay-ms", type=float, default=0.0, metavar="MS")
    g.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="replay a Mooncake JSONL trace instead of a synthetic workload",
    )
    g.add_argument(
        "--trace-block-size",
        type=int,
        default=None,
        metavar="TOKENS",
        help="tokens per hash_id in the trace (default: the engine block size)",
    )
    g.add_argument(
        "--arrival-speedup-ratio",
        type=float,
        default=1.0,
        metavar="X",
        help="divide trace timestamps and delays by X (default 1)",
    )
    g.add_argument(
        "--max-sim-time-seconds",
        type=float,
        default=None,
        metavar="S",
        help="stop the simulation at this simulated time",
    )
    g.add_argument(
        "--router-mode",
        choices=("round_robin", "kv"),
        default="round_robin",
        help="how requests pick a rank (default round_robin)",
    )


def sessions_from_args(args: argparse.Namespace, engine: EngineConfig) -> list[Session]:
    if args.trace is not None:
        if args.request_rate is not None or args.arrival_interval_ms is not None:
            raise UsageError(
                "--trace brings its own timestamps: drop --request-rate/--arrival-interval-ms"
            )
        path = Path(args.trace)
        if not path.is_file():
            raise UsageError(f"--trace: no such file {args.trace!r}")
        if args.arrival_speedup_ratio <= 0:
            raise UsageError("--arrival-speedup-ratio must be > 0")
        with path.open(encoding="utf-8", errors="replace") as lines:
            return mooncake_sessions(
                lines,
                source=str(path),
                trace_block_size=args.trace_block_size or engine.block_size,
                arrival_speedup_ratio=args.arrival_speedup_ratio,
            )
    if args.replay_concurrency is not None and (
        args.request_rate is not None or args.arrival_interval_ms is not None
    ):
        raise UsageError(
            "choose one arrival mode: --replay-concurrency (closed loop) or "
            "--request-rate / --arrival-interval-ms (open loop)"
        )
    return synthetic_sessions(
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
        request_count=args.request_count,
        request_rate=args.request_rate,
        arrival_interval_ms=args.arrival_interval_ms,
        arrival_seed=args.arrival_seed,
        turns_per_session=args.turns_per_session,
        shared_prefix_ratio=args.shared_prefix_ratio,
        num_prefix_groups=args.num_prefix_groups,
        inter_turn_delay_ms=args.inter_turn_delay_ms,
        block_size=engine.block_size,
        seed=engine.seed,
    )


def replay_concurrency(args: argparse.Namespace) -> int | None:
    if (
        args.trace is not None
        or args.request_rate is not None
        or args.arrival_interval_ms is not None
    ):
        return cast("int | None", args.replay_concurrency)
    return 32 if args.replay_concurrency is None else int(args.replay_concurrency)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--report", default=None, metavar="FILE", help="write the JSON report here")
    g.add_argument(
        "--report-jsonl", default=None, metavar="FILE", help="write one JSON line per request here"
    )
    g.add_argument(
        "--dump-state",
        default=None,
        metavar="FILE",
        help="write what every rank holds at the end (sequence hashes per tier)",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    g.add_argument("--quiet", action="store_true", help="print only the final report line")


def write_atomic(path: str, data: bytes | str) -> None:
    """Write `data` to `path` via a temp file in the same directory and a rename."""
    target = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    directory = target.parent if str(target.parent) else Path()
    if not directory.is_dir():
        raise UsageError(f"cannot write {path!r}: directory {str(directory)!r} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def check_output_paths(args: argparse.Namespace) -> None:
    """Fail before any work if an output file could not be written."""
    for name in ("report", "report_jsonl", "dump_state"):
        path = getattr(args, name, None)
        if path is None:
            continue
        parent = Path(path).parent
        if str(parent) and not parent.is_dir():
            raise UsageError(
                f"--{name.replace('_', '-')}: directory {str(parent)!r} does not exist"
            )
        if Path(path).is_dir():
            raise UsageError(f"--{name.replace('_', '-')}: {path!r} is a directory")


# ── replay ─────────────────────────────────────────────────────────────────────────────────


def cmd_replay(args: argparse.Namespace) -> int:
    from shmkv.replay import ReplayOptions, run_replay
    from shmkv.report import format_jsonl, format_summary_table

    engine = engine_config_from_args(args)
    check_output_paths(args)
    sessions = sessions_from_args(args, engine)
    publish = getattr(args, "zmq_kv_events_port", None) is not None
    options = ReplayOptions(
        engine=engine,
        data_parallel_size=args.data_parallel_size,
        router_mode=args.router_mode,
        replay_concurrency=replay_concurrency(args),
        enable_events=publish,
        emit_token_ids=publish,
        max_sim_time_ms=None
        if args.max_sim_time_seconds is None
        else args.max_sim_time_seconds * 1000.0,
    )
    num_requests = sum(len(s.turns) for s in sessions)
    on_events, close_events = _event_publishing(args, engine)
    progress = progress_bar(args, num_requests, "replay")
    on_pass = None
    if progress is not None:

        def on_pass(_rank: int, result: Any) -> None:
            if result.completions or result.rejections:
                progress(len(result.completions) + len(result.rejections))

    try:
        start = time.perf_counter()
        outcome = run_replay(sessions, options, on_events=on_events, on_pass=on_pass)
        wall_ms = (time.perf_counter() - start) * 1000.0
    finally:
        if progress is not None:
            progress(-1)
        close_events()
    report = outcome.collector.build_report(
        wall_time_ms=wall_ms,
        extra={
            "data_parallel_size": args.data_parallel_size,
            "router_mode": args.router_mode,
            "kv_eviction_policy": engine.eviction,
            "num_passes": outcome.num_passes,
            "num_preemptions": outcome.num_preemptions,
            "rejected_requests": outcome.num_rejected,
            "incomplete_requests": outcome.num_incomplete,
        },
    )
    if args.report:
        write_atomic(args.report, json.dumps(report, indent=2) + "\n")
    if args.report_jsonl:
        write_atomic(args.report_jsonl, format_jsonl(outcome.collector.per_request_records()))
    if args.dump_state:
        write_atomic(args.dump_state, json.dumps(outcome.state_dump()) + "\n")
    if not args.quiet:
        print(format_summary_table(report))
    print(json.dumps({k: report[k] for k in HEADLINE if k in report}))
    return EXIT_OK


HEADLINE = (
    "completed_requests",
    "duration_ms",
    "wall_time_ms",
    "mean_ttft_ms",
    "mean_itl_ms",
    "mean_e2e_latency_ms",
    "prefix_cache_reused_ratio",
    "output_throughput_tok_s",
)


def progress_bar(args: argparse.Namespace, total: int, desc: str) -> Callable[[int], None] | None:
    enabled = args.progress if args.progress is not None else sys.stderr.isatty()
    if not enabled or args.quiet:
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="req", desc=desc, leave=False, file=sys.stderr)

    def advance(count: int) -> None:
        if count < 0:
            bar.close()
        else:
            bar.update(count)

    return advance


def _event_publishing(
    args: argparse.Namespace, engine: EngineConfig
) -> tuple[Callable[[int, float, list[Any]], None] | None, Callable[[], None]]:
    """Publishers for `--zmq-kv-events-port`, when given (wired by the event plane)."""
    if getattr(args, "zmq_kv_events_port", None) is None:
        return None, lambda: None
    import importlib

    module = importlib.import_module("shmkv.events_cli")
    return cast(
        "tuple[Callable[[int, float, list[Any]], None] | None, Callable[[], None]]",
        module.make_replay_publishers(args, engine),
    )


def add_event_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("KV events over ZMQ")
    g.add_argument(
        "--zmq-kv-events-port",
        type=int,
        default=None,
        metavar="PORT",
        help="publish rank r's events on PORT + r (0 = random free ports)",
    )
    g.add_argument(
        "--zmq-replay-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve replay requests for rank r on PORT + r (needs --zmq-kv-events-port)",
    )
    g.add_argument(
        "--event-codec",
        choices=("json", "vllm"),
        default="json",
        help="json (Dynamo KvCacheEvent objects, orjson) or vllm (msgpack)",
    )
    g.add_argument(
        "--event-host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; anything else is exposed)",
    )
    g.add_argument(
        "--event-topic",
        default=None,
        metavar="TOPIC",
        help="topic frame (default kv@<host>:<port>@<model>)",
    )
    g.add_argument("--model-name", default="shmkv-mock", help="model name in the default topic")
    g.add_argument(
        "--event-buffer-steps",
        type=int,
        default=10000,
        metavar="N",
        help="batches kept per rank for replay (default 10000)",
    )
    g.add_argument(
        "--legacy-replay",
        action="store_true",
        help="answer replay requests in the legacy [seq, payload] layout",
    )
    g.add_argument(
        "--vllm-array-events",
        action="store_true",
        help="encode vLLM events as positional arrays (legacy layout)",
    )
    g.add_argument(
        "--wait-for-subscribers",
        type=float,
        default=None,
        metavar="SECONDS",
        help="hold the run until every rank's publisher has a subscriber",
    )


# ── entry point ───────────────────────────────────────────────────────────────────────────


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmkv",
        description="KV-cache fleet simulator: mock LLM inference ranks at the level of KV blocks.",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="default WARNING",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    replay = sub.add_parser(
        "replay",
        help="offline replay of N ranks on a virtual clock (fast 'what if')",
        description="Replay a synthetic workload or a Mooncake trace through N simulated ranks "
        "in one process on a virtual clock, and report latency and cache reuse with Dynamo's "
        "field names. Example: shmkv replay --data-parallel-size 4 --router-mode kv "
        "--shared-prefix-ratio 0.5 --num-prefix-groups 8 --report out.json",
    )
    add_engine_arguments(replay)
    add_workload_arguments(replay)
    add_event_arguments(replay)
    add_output_arguments(replay)
    replay.set_defaults(func=cmd_replay)
    _register_optional_commands(sub)
    return parser


def _register_optional_commands(sub: Any) -> None:
    """Commands that live in their own modules register themselves here."""
    for module_name in ("shmkv.events_cli", "shmkv.fleet", "shmkv.stress", "shmkv.cleanup_cli"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(cast("Callable[[argparse.Namespace], int]", args.func)(args))
    except ShmkvError as exc:
        print(f"shmkv {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"shmkv {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
