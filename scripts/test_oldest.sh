#!/usr/bin/env bash
# The test suite at the oldest versions pyproject.toml allows: every `name>=X` of its dependencies
# and of the test extra is installed as `name==X.*` (the lowest release series), in .venv-oldest.
# Use the oldest Python too: PYTHON=python3.10 bash scripts/test_oldest.sh
# On a machine without the CPU wheel of that torch on disk, pip downloads PyPI's build (with CUDA
# libraries, a few GB); it runs on the CPU as well.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
"${PYTHON:-python3}" - > "$pins" <<'PY'
import pathlib, re
text = pathlib.Path("pyproject.toml").read_text()
listed = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
listed += re.search(r"^test = \[(.*?)\]", text, re.M).group(1)
for spec in re.findall(r'"([^"]+)"', listed):
    print(re.sub(r">=([0-9.]+)$", r"==\1.*", spec))
PY
echo "oldest versions:" $(cat "$pins")
VENV=.venv-oldest PINS="$pins" bash scripts/setup_env.sh test
.venv-oldest/bin/python -m pip check
exec .venv-oldest/bin/python -m pytest Testing "$@"
