"""Layer 0: run the pure core compiled (mypyc) when its build is current, else from source.

`scripts/build_core.py` compiles `CORE_MODULES` with mypyc into one extension group: a shared
library `shmkv/_core__mypyc*.so` plus a shim `.so` beside each module's `.py`, and writes
`shmkv/_core_stamp.json` with the sha256 of every compiled source. `shmkv/__init__` calls
`select_core()` before importing any core module:

* every source matches its stamp: Python's importer finds the shims first (an extension
  module wins over a `.py` in the same folder) and the core runs compiled;
* no build, a source edited since the build, or `SHMKV_PURE=1`: a meta-path finder loads
  every core module from its `.py`, all of them together. A compiled module calls its
  compiled neighbours directly, so mixing compiled and interpreted core modules would run
  stale code; it is all or nothing.

The same sources run either way, with the same results (tests/unit/test_native.py).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

CORE_MODULES: Final = (
    "shmkv.ids",
    "shmkv.signals",
    "shmkv.sequence",
    "shmkv.hashing",
    "shmkv.events",
    "shmkv.eviction.base",
    "shmkv.eviction.lineage",
    "shmkv.eviction.lru",
    "shmkv.eviction.multi_lru",
    "shmkv.eviction.tinylfu",
    "shmkv.manager",
    "shmkv.bandwidth",
    "shmkv.offload",
    "shmkv.offload_local",
    "shmkv.scheduler",
    "shmkv.perf_model",
    "shmkv.stats",
    "shmkv.report",
    "shmkv.replay",
    "shmkv.indexer",
    "shmkv.driver",
    "shmkv.g2_lineage",
)
"""The modules `scripts/build_core.py` compiles: the hot, pure-Python part of the simulator."""

C_EXTENSIONS: Final = ("shmkv._blockhash", "shmkv._g2index")
"""C accelerators of the core that `scripts/build_core.py` builds with it, each from a `.c`
beside the `.py`s. A core module uses one only while the core runs compiled (so `SHMKV_PURE=1`
runs every line of Python), and the stamp covers their sources too."""

PACKAGE_DIR: Final = Path(__file__).resolve().parent
STAMP_PATH: Final = PACKAGE_DIR / "_core_stamp.json"
PURE_ENV: Final = "SHMKV_PURE"
"""Set to 1 to run the core from source even when a current build exists."""


def source_path(module: str) -> Path:
    """The `.py` file of a core module (the `.c` file of a C accelerator)."""
    suffix = ".c" if module in C_EXTENSIONS else ".py"
    return PACKAGE_DIR.joinpath(*module.split(".")[1:]).with_suffix(suffix)


C_HEADERS: Final = ("_pyint.h",)
"""Headers the C accelerators include (files beside them): the stamp covers them too."""


def source_digests(modules: Sequence[str] = (*CORE_MODULES, *C_EXTENSIONS)) -> dict[str, str]:
    """sha256 of each module's source, and of each of `C_HEADERS`, as the stamp records it."""
    digests = {m: hashlib.sha256(source_path(m).read_bytes()).hexdigest() for m in modules}
    for header in C_HEADERS:
        digests[header] = hashlib.sha256((PACKAGE_DIR / header).read_bytes()).hexdigest()
    return digests


def build_problem() -> str | None:
    """What is wrong with the compiled build, None if it matches these sources."""
    try:
        stamp = json.loads(STAMP_PATH.read_text())
    except (OSError, ValueError):
        return "not built (scripts/build_core.py)"
    if stamp.get("python") != sys.implementation.cache_tag:
        return f"built for {stamp.get('python')}, running {sys.implementation.cache_tag}"
    if stamp.get("sources") != source_digests():
        return "sources changed since the build (rerun scripts/build_core.py)"
    if not all(_has_extension(source_path(m)) for m in (*CORE_MODULES, *C_EXTENSIONS)):
        return "a compiled module is missing (rerun scripts/build_core.py)"
    return None


def _stale_reason() -> str | None:
    """Why the compiled core must not run in this process (None: it may)."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return f"{PURE_ENV} is set"
    return build_problem()


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Loads the core modules from their `.py` files, never from compiled shims."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in CORE_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


_MODE: list[str] = []


def select_core() -> str:
    """Choose compiled or source for the core, once per process; returns `core_mode()`."""
    if not _MODE:
        reason = _stale_reason()
        if reason is None:
            _MODE.append("compiled")
        else:
            sys.meta_path.insert(0, _SourceFinder())
            _MODE.append(f"interpreted ({reason})")
    return _MODE[0]


def core_mode() -> str:
    """ "compiled", or "interpreted (<why>)"."""
    return select_core()


def is_compiled() -> bool:
    """Whether the core modules run compiled in this process."""
    return select_core() == "compiled"


def _has_extension(py_path: Path) -> bool:
    stem = py_path.with_suffix("")
    return any(
        Path(f"{stem}{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


select_core()  # NOTE: on import, so `import shmkv` decides before any core module loads
