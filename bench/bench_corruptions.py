"""Time every registered mask corruption on a 128^3 ellipsoid-like mask, single-threaded.

    python bench/bench_corruptions.py [--size 128] [--repeats 5] [--seed 0]

Prints a markdown table: name, family, severity, median milliseconds over `repeats` calls (fresh
random parameters each call) and the mean Dice of the corrupted mask against the reference.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from QGSegmentationLib.quality.corruptions import CORRUPTIONS  # noqa: E402
from QGSegmentationLib.quality.dice import mask_dice  # noqa: E402


def ellipsoid_like(size: int) -> np.ndarray:
    """A tilted ellipsoid with a spherical bump, spanning roughly half of each axis."""
    z, y, x = np.ogrid[:size, :size, :size]
    c = size / 2
    a, b, d = 0.32 * size, 0.26 * size, 0.22 * size
    u = (y - c) * np.cos(0.4) + (x - c) * np.sin(0.4)
    v = -(y - c) * np.sin(0.4) + (x - c) * np.cos(0.4)
    body = ((z - c) / a) ** 2 + (u / b) ** 2 + (v / d) ** 2 <= 1
    bump = ((z - c - 0.25 * size) ** 2 + (y - c) ** 2 + (x - c - 0.2 * size) ** 2) <= (0.1 * size) ** 2
    return body | bump


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    mask = ellipsoid_like(args.size)
    rng = np.random.default_rng(args.seed)
    print(f"mask {mask.shape}, {int(mask.sum())} foreground voxels, spacing 1, 1 thread, "
          f"{platform.processor() or platform.machine()}, numpy {np.__version__}\n")
    print("| corruption | family | severity | median ms | mean Dice |")
    print("|---|---|---|---:|---:|")
    for entry in CORRUPTIONS.entries():
        op = entry.obj
        for severity in op.severities:
            times, dices = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = op(mask, rng, (1.0, 1.0, 1.0), severity)
                times.append(time.perf_counter() - start)
                dices.append(mask_dice(out, mask))
            print(f"| {entry.name} | {op.family} | {severity} | {1000 * np.median(times):.1f} | "
                  f"{np.mean(dices):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
