#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install QGSegmentationLib into it.
# torch is pinned to 2.13.0: on a CPU-only machine pip takes the CPU wheel; on a machine with an
# NVIDIA driver the same pin installs the CUDA build.
# Settings: PYTHON (the interpreter that creates the environment), VENV (its folder, .venv),
# PINS (a requirements file installed first, e.g. scripts/test_oldest.sh's oldest versions).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

# Fail early, with the reason, rather than minutes later with "No space left on device".
need_space() {  # need_space DIR MEGABYTES WHAT
  local free_mb
  free_mb=$(df -Pk "$1" | awk 'NR==2 {print int($4 / 1024)}')
  if [ "$free_mb" -lt "$2" ]; then
    echo "error: $3 needs about $2 MB free in $1, but only $free_mb MB are free. Free some space and run again." >&2
    exit 1
  fi
}
[ -x "$VENV/bin/python" ] || need_space . 3000 "the virtual environment (torch, MONAI)"
need_space "${TMPDIR:-/tmp}" 500 "the tests' and demo's temporary files"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ -n "${PINS:-}" ]; then
  "$VENV/bin/python" -m pip install -q -r "$PINS"
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q -e ".[${1:-test}]"
