"""Shared fixtures. Every test is checked for leaked shared-memory segments and child processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq
from hypothesis import HealthCheck, settings

import shmkv

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


CORE_MODE = shmkv.core_mode()


def pytest_report_header() -> str:
    return f"shmkv core: {CORE_MODE}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`pure_core` tests patch or subclass core classes, which compiled (mypyc) classes do not
    allow: they run in the source-core pass of scripts/test.sh (SHMKV_PURE=1)."""
    if CORE_MODE != "compiled":
        return
    skip = pytest.mark.skip(reason="needs the core from source: run with SHMKV_PURE=1")
    for item in items:
        if item.get_closest_marker("pure_core") is not None:
            item.add_marker(skip)


SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "shmkv_"


def worker_tag() -> str:
    """A short tag unique to this pytest process (xdist worker or plain run): `t<pid>`."""
    return f"t{os.getpid()}"


def _project_segments(prefix: str) -> set[str]:
    if not SHM_DIR.is_dir():
        return set()
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix)}


def _is_leak(proc: psutil.Process) -> bool:
    """A live child that is not multiprocessing's shared resource tracker (it outlives tests
    by design and is reused by later ones)."""
    try:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not any("resource_tracker" in part for part in proc.cmdline())
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail a test that leaves a /dev/shm segment or a child process behind.

    Segments are attributed by prefix: tests name fleets with the `fleet_id` fixture, whose
    ids start with this worker's tag, so parallel workers never blame each other.
    """
    prefix = SHM_PREFIX + worker_tag()
    before_segments = _project_segments(prefix)
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    yield
    leaked_segments = _project_segments(prefix) - before_segments
    leaked_children = [
        p for p in me.children(recursive=True) if p.pid not in before_children and _is_leak(p)
    ]
    for proc in leaked_children:
        proc.kill()
    for name in leaked_segments:
        (SHM_DIR / name).unlink(missing_ok=True)
    assert not leaked_segments, f"leaked shared-memory segments: {sorted(leaked_segments)}"
    assert not leaked_children, f"leaked child processes: {[p.pid for p in leaked_children]}"


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A private ZMQ context that fails the test if any socket is left open."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    open_sockets = [s for s in list(ctx._sockets) if not s.closed]
    for sock in open_sockets:
        sock.close(linger=0)
    ctx.term()
    assert not open_sockets, f"{len(open_sockets)} ZMQ socket(s) left open"


@pytest.fixture
def fleet_id() -> str:
    """A unique short id for segment and endpoint names (xdist-safe)."""
    return f"{worker_tag()}{uuid.uuid4().hex[:8]}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the whole run (the xdist controller, or a plain run): no test segment is left."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    left = _project_segments(SHM_PREFIX + worker_tag())
    for name in left:
        (SHM_DIR / name).unlink(missing_ok=True)
    if left and exitstatus == 0:
        session.exitstatus = 1
        print(f"\nleaked shared-memory segments after the run: {sorted(left)}")
