"""Throughput of `qgseg train` with 1 vs 2 CPU processes (torchrun + DDP over gloo).

    python bench/bench_ddp_cpu.py                      # 40 iterations, batch 2 per process
    python bench/bench_ddp_cpu.py --iterations 100 --patch 32 64 64 --channels 16 32 64

Runs three trainings of the same tiny U-Net on a synthetic phantom, each with one torch thread
per process (OMP_NUM_THREADS=1), so "2 processes" uses 2 cores and "1 process" 1 core:

  1 process,   batch B          (the per-rank work of the DDP run)
  1 process,   batch 2B         (the DDP run's global batch in one process)
  2 processes, batch B per rank (global batch 2B; gradients all-reduced every step)

and reports the median step time (from the run's history.json, rank 0), patches per second and
the wall time of the whole command (start-up, data loading and validation included). Scaling
efficiency = (2-process patches/s) / (2 x 1-process-batch-B patches/s).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(args, dataset: Path, run_dir: Path, batch: int, processes: int) -> list:
    qgseg = ["-m", "QGSegmentationLib.cli.main", "train", "--dataset", str(dataset),
             "--spacing", "keep", "--patch", *map(str, args.patch), "--batch", str(batch),
             "--iterations", str(args.iterations),
             "--val-every", str(args.iterations), "--device", "cpu", "--quiet", "--run-dir", str(run_dir),
             "--set", f"network_options={{channels: {list(args.channels)}}}",
             "--set", f"checkpoint_every={args.iterations}", "--set", "augment=false"]
    if processes == 1:
        return [sys.executable, *qgseg]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *qgseg]


def run_one(args, dataset: Path, root: Path, name: str, batch: int, processes: int) -> dict:
    run_dir = root / name
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run(train_command(args, dataset, run_dir, batch, processes), env=env, cwd=REPO,
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    history = json.loads((run_dir / "history.json").read_text())
    step = float(history[-1]["step_time_s"])
    global_batch = batch * processes
    return {"name": name, "processes": processes, "global_batch": global_batch, "step_s": step,
            "patches_per_s": global_batch / step, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2, help="patches per process and step (B)")
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32])
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from QGSegmentationLib.data.phantom import make_phantom_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        dataset = make_phantom_dataset(root / "phantom", n_labeled=4, n_unlabeled=0, n_validation=1,
                                       shape=(32, 48, 48), seed=0)
        rows = [run_one(args, dataset, root, "1 process, batch B", args.batch, 1),
                run_one(args, dataset, root, "1 process, batch 2B", 2 * args.batch, 1),
                run_one(args, dataset, root, "2 processes, batch B each", args.batch, 2)]

    print(f"qgseg train, {args.iterations} iterations, patch {args.patch}, channels {args.channels}, "
          f"B={args.batch}, 1 torch thread per process, {os.cpu_count()} CPUs visible")
    print(f"{'setup':<28}{'global batch':>13}{'step (s)':>10}{'patches/s':>11}{'wall (s)':>10}")
    for row in rows:
        print(f"{row['name']:<28}{row['global_batch']:>13}{row['step_s']:>10.3f}"
              f"{row['patches_per_s']:>11.2f}{row['wall_s']:>10.1f}")
    efficiency = rows[2]["patches_per_s"] / (2 * rows[0]["patches_per_s"])
    speedup = rows[2]["patches_per_s"] / rows[1]["patches_per_s"]
    print(f"2-process speed-up over one process with the same global batch: {speedup:.2f}x; "
          f"scaling efficiency vs 1 process batch B: {efficiency:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
