#!/usr/bin/env bash
# Set up (./.venv) and run every check: ruff, mypy --strict, then the test suite on all cores.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k manager`.
set -euo pipefail
SHMKV_EXTRAS="dev,interop" source "$(dirname "$0")/_env.sh"
echo "== ruff format --check"; ruff format --check --quiet .
echo "== ruff check"; ruff check --quiet .
echo "== mypy --strict"; mypy --no-error-summary
echo "== pytest"
set +e
pytest -n auto -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
