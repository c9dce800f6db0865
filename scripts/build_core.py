"""Compile shmkv's pure core with mypyc, in place (`scripts/_env.sh` runs it at set-up).

    .venv/bin/python scripts/build_core.py            # build if the stamp is not current
    .venv/bin/python scripts/build_core.py --force    # always rebuild
    .venv/bin/python scripts/build_core.py --clean    # remove the build: the core runs from source

The modules listed in `shmkv._native.CORE_MODULES` become one mypyc extension group
(`shmkv/_core__mypyc*.so`, a shim `.so` beside each `.py`); the C accelerators in
`shmkv._native.C_EXTENSIONS` are built beside them. The stamp
(`shmkv/_core_stamp.json`) records the sha256 of each compiled source; `import shmkv` runs the
compiled core only while every source still matches (see shmkv/_native.py). The build needs
mypy (its mypyc compiler), setuptools and a C compiler; without them the core runs from source
and this script exits 1 with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _load_native() -> ModuleType:
    """shmkv/_native.py on its own: importing the package would load the core it rebuilds."""
    spec = importlib.util.spec_from_file_location("_shmkv_native", ROOT / "shmkv" / "_native.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_native = _load_native()


def _built_files() -> list[Path]:
    package = _native.PACKAGE_DIR
    return [*sorted(package.rglob("*.so")), _native.STAMP_PATH]


def clean() -> None:
    for path in _built_files():
        path.unlink(missing_ok=True)


def build(jobs: int) -> None:
    from mypyc.build import mypycify
    from setuptools import Extension, setup

    digests = _native.source_digests()
    clean()
    paths = [str(_native.source_path(m).relative_to(ROOT)) for m in _native.CORE_MODULES]
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory(prefix="shmkv_core_build_") as tmp:
        extensions = mypycify(
            paths,
            group_name="shmkv._core",
            opt_level="3",
            debug_level="0",
            multi_file=False,
            target_dir="build/core",  # NOTE: relative: mypyc's include paths assume it
        )
        extensions += [
            Extension(
                name,
                [str(_native.source_path(name).relative_to(ROOT))],
                extra_compile_args=["-O2"],
            )
            for name in _native.C_EXTENSIONS
        ]
        setup(
            name="shmkv-core",
            ext_modules=extensions,  # type: ignore[arg-type]  # NOTE: distutils vs setuptools stubs
            script_args=[
                "--quiet",
                "build_ext",
                "--inplace",
                f"--parallel={jobs}",
                f"--build-temp={Path(tmp) / 'obj'}",
                f"--build-lib={Path(tmp) / 'lib'}",
            ],
        )
    stamp = {"python": sys.implementation.cache_tag, "sources": digests}
    tmp_stamp = _native.STAMP_PATH.with_suffix(".tmp")
    tmp_stamp.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    tmp_stamp.replace(_native.STAMP_PATH)  # NOTE: atomic: the stamp appears last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--force", action="store_true", help="rebuild even if current")
    group.add_argument("--clean", action="store_true", help="remove the compiled core")
    group.add_argument(
        "--check", action="store_true", help="exit 0 if the build is current, 1 if not (no build)"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="C compile jobs")
    args = parser.parse_args()
    if args.clean:
        clean()
        print("compiled core removed: shmkv runs its core from source")
        return 0
    if args.check:
        return 0 if _native.build_problem() is None else 1
    if not args.force and _native.build_problem() is None:
        return 0
    if shutil.which(os.environ.get("CC", "cc")) is None:
        print("no C compiler: shmkv runs its core from source", file=sys.stderr)
        return 1
    start = time.monotonic()
    try:
        build(args.jobs)
    except (Exception, SystemExit) as exc:  # NOTE: any failure leaves the source core in use
        clean()
        print(f"compiling the core failed ({exc!r}): shmkv runs it from source", file=sys.stderr)
        return 1
    print(
        f"compiled {len(_native.CORE_MODULES)} core modules with mypyc "
        f"in {time.monotonic() - start:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
