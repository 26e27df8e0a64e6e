#!/usr/bin/env bash
# The test command of README.md: sets up .venv if needed, then runs the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec .venv/bin/python -m pytest Testing "$@"
