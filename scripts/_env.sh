# Sourced by the README commands: create or reuse ./.venv and install shmkv with what it needs.
# A fresh machine needs only python3 (>= 3.11) with venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SHMKV_VENV:-$ROOT/.venv}"
PY="${SHMKV_PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "shmkv needs Python >= 3.11 (set SHMKV_PYTHON)" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.shmkv-installed-${SHMKV_EXTRAS:-dev}"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "setting up $VENV (first run: installing dependencies) ..." >&2
  LOG="$VENV/install.log"
  if ! { "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip \
         && "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
              -e "$ROOT[${SHMKV_EXTRAS:-dev}]"; } >"$LOG" 2>&1; then
    tail -30 "$LOG" >&2
    echo "installing shmkv's dependencies failed (full log: $LOG)" >&2
    exit 1
  fi
  touch "$STAMP"
fi
# The pure core runs compiled (mypyc) when a C compiler is there; built once, rebuilt when a
# core source changes (scripts/build_core.py; SHMKV_PURE=1 runs it from source instead).
if [ "${SHMKV_PURE:-0}" = "0" ] && ! "$VENV/bin/python" "$ROOT/scripts/build_core.py" --check; then
  echo "compiling shmkv's core with mypyc (about a minute, once per change) ..." >&2
  if ! "$VENV/bin/python" "$ROOT/scripts/build_core.py" >"$VENV/build_core.log" 2>&1; then
    tail -5 "$VENV/build_core.log" >&2
    echo "shmkv: compiling the core failed; it runs from source (log: $VENV/build_core.log)" >&2
  fi
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
