#!/usr/bin/env bash
# The GPU checks behind BENCHMARKS.md §5, on a CUDA machine with torch, monai and SimpleITK:
# the GPU-marked tests, the training-step benchmark (AMP x channels_last) and the demo on CUDA.
#   bash bench/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:-gpu_check}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch, monai, SimpleITK, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'monai', monai.__version__, 'SimpleITK', SimpleITK.Version_VersionString(), 'numpy', numpy.__version__, \
torch.cuda.get_device_name())" | tee "$out/versions.txt"
python3 -m pytest -m gpu Testing -q -p no:cacheprovider 2>&1 | tail -15 | tee "$out/gpu_tests.log"
python3 bench/bench_train_step.py --device cuda 2>&1 | tee "$out/train_step.log"
start=$(date +%s)
python3 -m QGSegmentationLib.cli.main demo --device cuda --run-dir /tmp/qgseg_demo_cuda --quiet \
    --events "$out/demo_events.jsonl" > "$out/demo.log" 2>&1
echo "demo exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/demo.log"
tail -40 "$out/demo.log"
