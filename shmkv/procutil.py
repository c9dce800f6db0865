"""Layer 2: process helpers for the fleet's worker processes (Linux)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Set up a fleet worker process: ignore SIGINT (Ctrl-C reaches the whole process group;
    the supervisor orchestrates shutdown), and ask the kernel to send `sig` when the parent
    dies (prctl), exiting at once if it is already gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent or parent == 1:
        os._exit(1)
