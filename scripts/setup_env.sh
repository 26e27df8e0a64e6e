#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install QGSegmentationLib into it.
# torch is pinned to 2.13.0: on a CPU-only machine pip takes the CPU wheel; on a machine with an
# NVIDIA driver the same pin installs the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Fail early, with the reason, rather than minutes later with "No space left on device".
need_space() {  # need_space DIR MEGABYTES WHAT
  local free_mb
  free_mb=$(df -Pk "$1" | awk 'NR==2 {print int($4 / 1024)}')
  if [ "$free_mb" -lt "$2" ]; then
    echo "error: $3 needs about $2 MB free in $1, but only $free_mb MB are free. Free some space and run again." >&2
    exit 1
  fi
}
[ -x .venv/bin/python ] || need_space . 3000 "the virtual environment (torch, MONAI)"
need_space "${TMPDIR:-/tmp}" 500 "the tests' and demo's temporary files"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[${1:-test}]"
