#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install QGSegmentationLib into it.
# torch is pinned to 2.13.0: on a CPU-only machine pip takes the CPU wheel; on a machine with an
# NVIDIA driver the same pin installs the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[${1:-test}]"
