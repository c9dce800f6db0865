"""The compiled (mypyc) core and its sources: which one runs, and that both simulate the same."""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import shmkv
from shmkv import _native

DIGEST_SCRIPT = """
import hashlib, json, sys
import shmkv
from shmkv.config import EngineConfig
from shmkv.replay import ReplayOptions, run_replay
from shmkv.workload import synthetic_sessions

sessions = synthetic_sessions(input_tokens=512, output_tokens=40, request_count=120,
    block_size=16, shared_prefix_ratio=0.6, num_prefix_groups=4)
digest = hashlib.sha256()
for eviction in ("lineage", "lru", "multi-lru"):
    engine = EngineConfig(num_gpu_blocks=300, block_size=16, eviction=eviction,
        num_g2_blocks=600, kv_bytes_per_token=131072, max_num_batched_tokens=1024)
    options = ReplayOptions(engine=engine, replay_concurrency=16, data_parallel_size=2,
        router_mode="kv", enable_events=True)
    batches = []
    outcome = run_replay(sessions, options, on_events=lambda rank, now_ms, events: batches.append(repr(events)))
    report = {k: v for k, v in outcome.collector.build_report(wall_time_ms=0.0).items()
              if "wall" not in k}
    for part in (report, outcome.collector.per_request_records(), outcome.state_dump(), batches):
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
print(shmkv.core_mode().split(" ")[0], digest.hexdigest())
"""


def _run(code: str, *, pure: bool) -> str:
    env = dict(os.environ)
    env.pop(_native.PURE_ENV, None)
    if pure:
        env[_native.PURE_ENV] = "1"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_core_runs_compiled_where_a_compiler_is_expected() -> None:
    if os.environ.get("SHMKV_EXPECT_COMPILED") != "1":
        pytest.skip("no compiled core expected here (scripts/test.sh sets SHMKV_EXPECT_COMPILED)")
    assert shmkv.core_mode() == "compiled"


def test_every_core_module_comes_from_one_side() -> None:
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    compiled = shmkv.core_mode() == "compiled"
    for name in _native.CORE_MODULES:
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        assert module.__file__ is not None
        assert module.__file__.endswith(suffixes) == compiled, (name, module.__file__)


def test_shmkv_pure_runs_every_core_module_from_source() -> None:
    out = _run(
        "import shmkv, sys, importlib\n"
        "from shmkv import _native\n"
        "files = [importlib.import_module(m).__file__ for m in _native.CORE_MODULES]\n"
        "print(shmkv.core_mode(), all(f.endswith('.py') for f in files))",
        pure=True,
    )
    assert out == "interpreted (SHMKV_PURE is set) True"


def test_compiled_and_source_cores_simulate_the_same() -> None:
    """Report, per-request records, state dump and every event batch of a replay with G2 and
    the kv router, for each eviction backend: equal whether the core is compiled or not."""
    if shmkv.core_mode() != "compiled":
        pytest.skip("the core is not compiled here")
    compiled = _run(DIGEST_SCRIPT, pure=False)
    source = _run(DIGEST_SCRIPT, pure=True)
    assert compiled.split()[0] == "compiled"
    assert source.split()[0] == "interpreted"
    assert compiled.split()[1] == source.split()[1]


def _stamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **stamp: object) -> None:
    path = tmp_path / "stamp.json"
    path.write_text(json.dumps(stamp))
    monkeypatch.setattr(_native, "STAMP_PATH", path)


def test_a_build_is_stale_once_a_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digests = _native.source_digests()
    digests["shmkv.manager"] = hashlib.sha256(b"an older manager").hexdigest()
    _stamp(tmp_path, monkeypatch, python=sys.implementation.cache_tag, sources=digests)
    assert _native.build_problem() == (
        "sources changed since the build (rerun scripts/build_core.py)"
    )


def test_a_build_is_stale_once_a_c_accelerator_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digests = _native.source_digests()
    assert set(_native.C_EXTENSIONS) <= digests.keys()
    assert _native.source_path("shmkv._blockhash").name == "_blockhash.c"
    digests["shmkv._blockhash"] = hashlib.sha256(b"an older loop").hexdigest()
    _stamp(tmp_path, monkeypatch, python=sys.implementation.cache_tag, sources=digests)
    assert _native.build_problem() == (
        "sources changed since the build (rerun scripts/build_core.py)"
    )


def test_a_build_is_stale_once_a_c_header_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digests = _native.source_digests()
    assert set(_native.C_HEADERS) <= digests.keys()
    digests["_pyint.h"] = hashlib.sha256(b"an older header").hexdigest()
    _stamp(tmp_path, monkeypatch, python=sys.implementation.cache_tag, sources=digests)
    assert _native.build_problem() == (
        "sources changed since the build (rerun scripts/build_core.py)"
    )


def test_a_build_for_another_python_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stamp(tmp_path, monkeypatch, python="cpython-39", sources=_native.source_digests())
    assert (
        _native.build_problem() == f"built for cpython-39, running {sys.implementation.cache_tag}"
    )


def test_no_stamp_means_not_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "STAMP_PATH", tmp_path / "missing.json")
    assert _native.build_problem() == "not built (scripts/build_core.py)"
