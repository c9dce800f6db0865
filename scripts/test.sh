#!/usr/bin/env bash
# Set up (./.venv) and run every check: ruff, mypy --strict, then the test suite on all cores.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k manager`.
set -euo pipefail
SHMKV_EXTRAS="dev,interop" source "$(dirname "$0")/_env.sh"
echo "== ruff format --check"; ruff format --check --quiet .
echo "== ruff check"; ruff check --quiet .
echo "== mypy --strict"; mypy --no-error-summary
# With a C compiler the core must have compiled (tests/unit/test_native.py checks it).
if command -v "${CC:-cc}" >/dev/null 2>&1; then export SHMKV_EXPECT_COMPILED=1; fi
echo "== pytest"
set +e
pytest -n auto -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
if [ "$rc" -ne 0 ] || [ "$#" -gt 0 ]; then exit "$rc"; fi
if python -c 'import shmkv, sys; sys.exit(shmkv.core_mode() != "compiled")'; then
  # Tests that patch or subclass core classes need the core from source (marker pure_core).
  echo "== pytest, core from source (SHMKV_PURE=1): the pure_core tests"
  SHMKV_PURE=1 pytest -n auto -q -m pure_core
fi
