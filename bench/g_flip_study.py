"""Does averaging g over the flips of its input help? (BENCHMARKS.md §9)

g is trained on samples flipped along random axes, so all eight flips of the presented 48^3 grid
are inputs it knows. This script shows every (image, mask) pair of a real-segmenter evaluation to
every member of a quality ensemble under each of the eight flips, once, and stores the raw
predictions (`predictions.npz`). From those it writes, for each variant (no flips, the 4-flip
group {identity, zy, zx, yx}, all 8 flips) and each model (every member alone and their mean), a
`quality_evaluation_rows.csv` in the layout of `qgseg quality evaluate`, so that
`bench/la_subset_summary.py` reports them like every other g evaluation, and prints one summary
table.

    python bench/g_flip_study.py --dataset runs/la16_heldout/dataset.json \\
        --checkpoint runs/la_g16s80_g48{,_s1,_s2,_s3}/checkpoints/best.pt \\
        --predictions runs/rebuild/verify/{sup16_best,sup16_last,sup8_best,sup4_it200,sup4_it800,sup16_it300} \\
        --test-split runs/la16/dataset.json --out runs/la_h60/flips
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from la_subset_summary import cases_of_test_list, report, summarise
from QGSegmentationLib.data.dataset import load_dataset
from QGSegmentationLib.quality.evaluate import prediction_pairs
from QGSegmentationLib.quality.predictor import load_predictors, members_of
from QGSegmentationLib.quality.score import present_volume
from QGSegmentationLib.quality.train import dice_per_class, load_cases

SPATIAL_DIMS = (2, 3, 4)  # z, y, x of a (batch, channel, z, y, x) tensor
FLIPS = [dims for n in range(4) for dims in itertools.combinations(SPATIAL_DIMS, n)]  # 8, identity first
VARIANTS = {"no_flips": [()], "flips4": [(), (2, 3), (2, 4), (3, 4)], "flips8": FLIPS}


def flipped_batch(tensor: torch.Tensor) -> torch.Tensor:
    """The eight flips of a batch of one, in the order of FLIPS."""
    return torch.cat([tensor.flip(dims) if dims else tensor for dims in FLIPS])


def predict_all_flips(members, pairs) -> np.ndarray:
    """(pairs, members, flips) predicted Dice for a binary predictor."""
    first = members[0]
    out = np.zeros((len(pairs), len(members), len(FLIPS)), np.float32)
    start = time.perf_counter()
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            shown = present_volume(pair.image, pair.mask, pair.spacing, first.n_foreground, first.grid_size)
            images, masks = flipped_batch(shown.image), flipped_batch(shown.mask)
            for m, member in enumerate(members):
                out[i, m] = member(images, masks)[:, 0].numpy()
            if (i + 1) % 30 == 0:
                print(f"  {i + 1}/{len(pairs)} pairs, {time.perf_counter() - start:.0f} s", flush=True)
    return out


def write_rows(folder: Path, pairs, true: np.ndarray, predicted: np.ndarray) -> List[Dict]:
    """The evaluation rows of one estimate, written as `quality_evaluation_rows.csv` and returned."""
    rows = [{"case": pair.case, "category": pair.category, "class": 1, "true_dice": float(t), "predicted": float(p)}
            for pair, t, p in zip(pairs, true, predicted)]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "quality_evaluation_rows.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--group", default="test")
    parser.add_argument("--checkpoint", nargs="+", required=True)
    parser.add_argument("--predictions", nargs="+", required=True)
    parser.add_argument("--test-split", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    spec = load_dataset(args.dataset)
    pairs = prediction_pairs(load_cases(spec.group(args.group), spec.labels), args.predictions)
    members = members_of(load_predictors(args.checkpoint))
    if members[0].n_foreground != 1:
        raise SystemExit("this study handles binary predictors")
    raw = args.out / "predictions.npz"
    if raw.is_file():
        stored = np.load(raw)
        true, predictions = stored["true"], stored["predictions"]
    else:
        true = np.array([dice_per_class(p.mask, p.reference, 1)[0] for p in pairs], np.float32)
        predictions = predict_all_flips(members, pairs)
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(raw, true=true, predictions=predictions, checkpoints=np.array(args.checkpoint))

    test = cases_of_test_list(args.test_split)
    table = {}
    names = [f"seed{m}" for m in range(len(members))] + ["ensemble"]
    for variant, flips in VARIANTS.items():
        columns = [FLIPS.index(f) for f in flips]
        per_member = predictions[:, :, columns].mean(2)
        for m, name in enumerate(names):
            estimate = per_member.mean(1) if name == "ensemble" else per_member[:, m]
            folder = args.out / f"{variant}_{name}"
            summary = summarise(write_rows(folder, pairs, true, estimate), test)
            (folder / "summary.json").write_text(json.dumps(summary, indent=1))
            table[(variant, name)] = summary["g"]
            print("\n".join(report(folder, summary, {})))
    print("\nvariant   model     all MAE  all r   AUROC   H44 MAE  H44 r   within sup16_best/last (H44)")
    for (variant, name), s in table.items():
        within = s["within_segmenter_H44"]
        print(f"{variant:9s} {name:9s} {s['all']['mae']:.4f}  {s['all']['pearson']:.4f}  "
              f"{s['all']['auroc_failure']:.4f}  {s['H44']['mae']:.4f}  {s['H44']['pearson']:.4f}  "
              f"{within.get('sup16_best', float('nan')):.3f} / {within.get('sup16_last', float('nan')):.3f}")


if __name__ == "__main__":
    main()
