"""Write a dataset.json for the LA benchmarks with a fixed split, next to symlinks to the data.

    python bench/make_la_split.py --la ../shared/data/LA --out runs/la_data --labeled 16

Split (fixed by --split-seed, default 2026, over the sorted case list of the LA dataset.json):
16 test cases (never used for training, selection or tuning), 4 validation cases (checkpoint
selection), then `--labeled` labeled training cases; all remaining cases are listed as unlabeled.
The LA files are referenced through symlinks, never copied.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def make_split(la: Path, out: Path, labeled: int, n_test: int = 16, n_val: int = 4, split_seed: int = 2026) -> Path:
    desc = json.loads((la / "dataset.json").read_text())
    cases = sorted(desc["training"], key=lambda c: c["image"])
    order = np.random.default_rng(split_seed).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    test, val = shuffled[:n_test], shuffled[n_test:n_test + n_val]
    train = shuffled[n_test + n_val:]
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("imagesTr", "labelsTr"):
        link = out / sub
        if not link.exists():
            os.symlink(os.path.abspath(la / sub), link)
    entry = lambda c: {"image": c["image"], "label": c["label"]}  # noqa: E731
    split = {
        "name": f"LA split seed {split_seed}: {labeled} labeled",
        "labels": desc["labels"],
        "training": [entry(c) for c in train[:labeled]],
        "validation": [entry(c) for c in val],
        "test": [entry(c) for c in test],
        "unlabeled": [c["image"] for c in train[labeled:]],
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(split, indent=1))
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--la", default="../shared/data/LA")
    p.add_argument("--out", required=True)
    p.add_argument("--labeled", type=int, default=16)
    p.add_argument("--split-seed", type=int, default=2026)
    a = p.parse_args()
    print(make_split(Path(a.la), Path(a.out), a.labeled, split_seed=a.split_seed))
