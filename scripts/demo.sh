#!/usr/bin/env bash
# The demo command of README.md: sets up .venv if needed, then runs `qgseg demo` (CPU, minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec .venv/bin/qgseg demo "$@"
