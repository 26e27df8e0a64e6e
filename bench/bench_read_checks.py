"""What the checks added to reading cost: the NIfTI completeness check per volume read, and the
whole-dataset check (`data.dataset.checked_dataset`) that `qgseg train` now runs before training.

    python bench/bench_read_checks.py --dataset runs/la_cv/fold0/data/dataset.json --rounds 10

1. One image of the dataset is written as .nii.gz, .nii and .mha to a temporary folder; the
   completeness check alone (`io.check_nifti_complete`, `io.check_metaimage_complete`) and a
   whole `read_image` (which runs it) are timed alternately, `--rounds` times each.
2. `load_dataset` alone and `checked_dataset` (load + every file opened: image headers, labels in
   full) are timed alternately, `--rounds` times each.
Medians, min-max and the ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def alternate(first, second, rounds: int):
    """Run `first` and `second` alternately; their times in seconds."""
    a, b = [], []
    for _ in range(rounds):
        a.append(timed(first))
        b.append(timed(second))
    return a, b


def line(name: str, times) -> str:
    return f"{name}: median {statistics.median(times) * 1000:.1f} ms (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a dataset.json (its first training image is used for part 1)")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    from QGSegmentationLib.data import io
    from QGSegmentationLib.data.dataset import checked_dataset, load_dataset

    spec = load_dataset(args.dataset)
    image, geometry = io.read_image(spec.training[0].image)
    print(f"image {spec.training[0].image}: {image.shape[::-1]} voxels (x y z), {image.dtype}")
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".nii.gz", ".nii", ".mha"):
            path = io.write_image(Path(folder) / f"volume{suffix}", image, geometry)
            complete = io.check_metaimage_complete if suffix == ".mha" else io.check_nifti_complete
            check, read = alternate(lambda: complete(path), lambda: io.read_image(path), args.rounds)
            print(line(f"{suffix}: the check alone", check))
            print(line(f"{suffix}: read_image, the check included", read))
            print(f"  the check's share of a read: {statistics.median(check) / statistics.median(read):.0%}")
    loaded, checked = alternate(lambda: load_dataset(args.dataset), lambda: checked_dataset(args.dataset, lambda w: None),
                                args.rounds)
    print(f"dataset {args.dataset}: {sum(len(spec.group(g)) for g in ('training', 'validation', 'test', 'unlabeled'))} cases")
    print(line("load_dataset", loaded))
    print(line("checked_dataset (every file opened)", checked))


if __name__ == "__main__":
    main()
