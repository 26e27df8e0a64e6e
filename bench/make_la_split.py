"""Write a dataset.json for the LA benchmarks with the fixed split (see
QGSegmentationLib.benchmark.data.make_la_split), next to symlinks to the data.

    python bench/make_la_split.py --la ../shared/data/LA --out runs/la16 --labeled 16

16 test cases (never used for training, selection or tuning), 4 validation cases (checkpoint
selection), then `--labeled` labeled training cases; all remaining cases are unlabeled.
`--unlabeled-as-test` lists those remaining cases (with their labels) as extra test cases instead:
a 16 + N case held-out set for models that never saw them (supervised segmenters, g).

    python bench/make_la_split.py --la ../shared/data/LA --out runs/la16_heldout --labeled 16 --unlabeled-as-test

`--fold K` (0-4) gives the K-th of five cross-validation splits: the same shuffled order rotated by
16 K cases, so the five test sets are disjoint and cover all 80 cases; fold 0 is the fixed split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from QGSegmentationLib.benchmark.data import make_la_split

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--la", default="../shared/data/LA")
    p.add_argument("--out", required=True)
    p.add_argument("--labeled", type=int, default=16)
    p.add_argument("--split-seed", type=int, default=2026)
    p.add_argument("--fold", type=int, default=0,
                   help="cross-validation fold: the shuffled cases rotated by FOLD x 16 before the split "
                        "(folds 0-4 of the 80 LA cases test every case once; 0 is the fixed split)")
    p.add_argument("--unlabeled-as-test", action="store_true",
                   help="append the remaining cases, with labels, to the test cases (no unlabeled cases)")
    a = p.parse_args()
    print(make_la_split(Path(a.la), Path(a.out), a.labeled, split_seed=a.split_seed,
                        unlabeled_as_test=a.unlabeled_as_test, fold=a.fold))
