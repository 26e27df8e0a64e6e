"""Split a `qgseg quality evaluate` run into the subsets BENCHMARKS.md §6 reports.

The §6 evaluation set is 60 held-out LA volumes: the 16 test volumes of the first split ("T16")
and 44 volumes nobody trained or selected on ("H44"). `quality_evaluation.json` holds the metrics
over all masks; this script adds, from `quality_evaluation_rows.csv`:

- MAE, Pearson, Spearman and failure AUROC (true Dice < 0.7) on all masks, T16 and H44;
- Pearson within each segmenter, on all cases and on H44 (does g rank one segmenter's cases, not
  just tell segmenters apart?);
- the same for the second opinion and for the mean and the lower of the two (§7) when the run had
  `--second-opinion`;
- the image-dependence check as recorded by the evaluation.

    python bench/la_subset_summary.py runs/la_h60/g_ens6_g48 --test-split runs/la16/dataset.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from QGSegmentationLib.data.io import case_id_from_path
from QGSegmentationLib.quality.evaluate import COMBINATIONS, agreement_metrics, per_source_metrics

COLUMNS = {"g": "predicted", "second opinion": "second_opinion_dice"}


def estimates(rows: Sequence[Dict[str, str]]) -> Dict[str, np.ndarray]:
    """g's prediction, and with a second opinion also that and the two combinations of §7."""
    found = {name: np.array([float(r[column]) for r in rows])
             for name, column in COLUMNS.items() if column in rows[0]}
    if "second opinion" in found:
        found.update({name: combine(found["g"], found["second opinion"]) for name, combine in COMBINATIONS.items()})
    return found


def cases_of_test_list(dataset_json: Path) -> set:
    """Case ids of the `test` list of a dataset.json (the T16 of §6)."""
    description = json.loads(Path(dataset_json).read_text())
    return {case_id_from_path(entry["image"]) for entry in description["test"]}


def subset_metrics(true: np.ndarray, estimate: np.ndarray) -> Dict[str, float]:
    """The library's metrics (MAE, Pearson, Spearman, failure AUROC), or only n=0 for an empty subset."""
    return agreement_metrics(estimate, true) if len(true) else {"n": 0}


def summarise(rows: Sequence[Dict[str, str]], test: set) -> Dict[str, Dict]:
    """Per estimate: metrics on all/T16/H44, and within each segmenter on all cases and on H44."""
    true = np.array([float(r["true_dice"]) for r in rows])
    in_test = np.array([r["case"] in test for r in rows])
    segmenter = np.array([Path(r["category"]).name for r in rows])
    subsets = {"all": np.ones(len(rows), bool), "T16": in_test, "H44": ~in_test}
    summary = {}
    for name, estimate in estimates(rows).items():
        summary[name] = {key: subset_metrics(true[sel], estimate[sel]) for key, sel in subsets.items()}
        for key in ("all", "H44"):
            sel = subsets[key]
            within = per_source_metrics(segmenter[sel], {name: estimate[sel]}, true[sel])
            summary[name][f"within_segmenter_{key}"] = {seg: m[name]["pearson"] for seg, m in within.items()}
    return summary


def report(run: Path, summary: Dict[str, Dict], dependence: Dict) -> List[str]:
    lines = [str(run)]
    for name, parts in summary.items():
        for key in ("all", "T16", "H44"):
            m = parts[key]
            if not m["n"]:
                lines.append(f"  {name:15s} {key:3s} n=  0")
                continue
            lines.append(f"  {name:15s} {key:3s} n={m['n']:3d}  MAE {m['mae']:.3f}  Pearson {m['pearson']:.3f}  "
                         f"Spearman {m['spearman']:.3f}  AUROC {m['auroc_failure']:.3f}")
        for key in ("all", "H44"):
            within = ", ".join(f"{seg} {r:.2f}" for seg, r in parts[f"within_segmenter_{key}"].items())
            lines.append(f"  {name:15s} within one segmenter, {key}: {within}")
    if dependence:
        lines.append(f"  image dependence: r blacked-out {dependence['pearson_black']:.2f}, other image "
                     f"{dependence['pearson_shuffled']:.2f}, real {dependence['pearson_real']:.3f} -> "
                     f"{'passes' if dependence['image_dependence_ok'] else 'fails'}")
    return lines


def segmentation_report(run: Path, test: set) -> List[str]:
    """T16 / H44 / all Dice (mean ± sample std, standard error), HD95 and the two odd test volumes
    of a `qgseg evaluate` run folder (its metrics.csv)."""
    with open(run / "metrics.csv", newline="") as handle:
        rows = {r["case"]: (float(r["dice"]), float(r["hd95"])) for r in csv.DictReader(handle)}
    lines = [str(run)]
    for name, keep in (("T16", lambda c: c in test), ("H44", lambda c: c not in test), ("all", lambda c: True)):
        dice = np.array([d for c, (d, _) in rows.items() if keep(c)])
        lines.append(f"  {name} n={len(dice):2d}  Dice {dice.mean():.4f} ± {dice.std(ddof=1):.4f} "
                     f"(se {dice.std(ddof=1) / np.sqrt(len(dice)):.3f})")
    dice, hd95 = (np.array(column) for column in zip(*rows.values()))
    lines.append(f"  all: HD95 {hd95.mean():.2f} mm (median {np.median(hd95):.2f}), cases under 0.8: {(dice < 0.8).sum()}")
    lines.append("  " + ", ".join(f"{c} {d:.3f}" for c, (d, _) in rows.items() if c.startswith(("la_031", "la_015"))))
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run folders of `qgseg quality evaluate` (or of `qgseg evaluate`: Dice by subset)")
    parser.add_argument("--test-split", type=Path, required=True,
                        help="dataset.json whose `test` list is T16; every other case counts as H44")
    args = parser.parse_args(argv)
    test = cases_of_test_list(args.test_split)
    for run in args.runs:
        if not (run / "quality_evaluation_rows.csv").is_file() and (run / "metrics.csv").is_file():
            print("\n".join(segmentation_report(run, test)))  # a `qgseg evaluate` folder
            continue
        with open(run / "quality_evaluation_rows.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        evaluation = json.loads((run / "quality_evaluation.json").read_text())
        print("\n".join(report(run, summarise(rows, test), evaluation.get("image_dependence", {}))))


if __name__ == "__main__":
    main()
