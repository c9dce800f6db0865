"""Layer 3: `shmkv cleanup`, removing shared-memory segments left by dead fleets."""

from __future__ import annotations

import argparse
import json
from typing import Any

from shmkv.shm import SEGMENT_PREFIX, sweep_stale_segments


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "cleanup",
        help="remove /dev/shm segments whose coordinator is dead",
        description="Sweep /dev/shm for shmkv segments whose header names a coordinator that "
        "no longer runs (pid and start time checked), or that are not valid segments and older "
        "than --grace. Segments of live fleets are never touched.",
    )
    parser.add_argument(
        "--prefix",
        default=SEGMENT_PREFIX,
        help=f"only segments whose name starts with this (default {SEGMENT_PREFIX})",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=60.0,
        metavar="S",
        help="leave unreadable segments younger than S seconds (default 60)",
    )
    parser.set_defaults(func=cmd_cleanup)


def cmd_cleanup(args: argparse.Namespace) -> int:
    removed = sweep_stale_segments(args.prefix, grace_s=args.grace)
    print(json.dumps({"removed": removed}))
    return 0
