"""`qgseg evaluate`: Dice, IoU, HD95 and ASD of predictions against reference label maps."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .common import HelpFormatter, RunContext, add_run_options, run_with_events

EXAMPLES = """
examples:
  qgseg evaluate --predictions preds/ --dataset dataset.json --split test
  qgseg evaluate --predictions preds/ --references labelsTs/

Predictions are matched to references by case name (<case>.nrrd, or .nii.gz, .nii, .mha, .mhd,
.seg.nrrd: outputs of other tools such as nnU-Net work as they are). With --dataset every case of
the split needs a prediction; with --references every prediction needs a reference, and references
without a prediction (a folder of all labels) are left out, with a note saying how many. Metrics are computed on the
reference's grid in mm. Conventions: both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0 and
HD95/ASD = the volume diagonal (counted as a failure, never dropped).
Writes metrics.csv (per case and class), summary.json (mean, std, median) and metrics.png (every
case's Dice and HD95 per class, the worst named) into --run-dir.
"""


#: What to do when a prediction is not on its reference's voxel grid.
PREDICTION_GRID_HINT = ("a prediction must lie on its reference's voxel grid: segment the reference's own "
                        "image (qgseg predict writes on the input's grid), or resample the prediction "
                        "onto the reference grid with nearest-neighbour interpolation")


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="score predictions against reference labels",
                                   description="Per-case, per-class Dice/IoU/HD95/ASD and their summary.",
                                   epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument("--predictions", required=True,
                        help="folder of <case>.nrrd label maps (qgseg predict) or NIfTI/MHA ones of another tool")
    ref = parser.add_mutually_exclusive_group(required=True)
    ref.add_argument("--dataset", help="dataset.json whose --split lists the references")
    ref.add_argument("--references", help="folder of reference label maps named like the predictions")
    parser.add_argument("--split", default="test", choices=["test", "validation", "training"],
                        help="which labeled list of --dataset to evaluate")
    add_run_options(parser)
    parser.set_defaults(func=run)


def reference_pairs(args) -> Tuple[List[Tuple[str, Path, Path]], str, Optional[set]]:
    """(case, prediction, reference) triples, a note for the user (or ""), and the label values
    the dataset declares (None with --references: any value is a class).

    With --dataset every case of the split must have a prediction (none is dropped silently).
    With --references every prediction must have a reference; references of cases that were not
    predicted (a folder of all labels, say) are left out, and the note says how many."""
    from ..data.io import IMAGE_EXTENSIONS, case_file_pattern, case_id_from_path, file_extension, find_case_file
    from ..errors import DataError

    pred_dir = Path(args.predictions)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: " + ("a file: pass the folder that holds the predictions" if pred_dir.exists()
                                           else "predictions folder not found"))
    if args.dataset:
        from ..data.dataset import empty_group_message, load_dataset

        dataset = load_dataset(args.dataset)
        refs = [(r.id, Path(r.label)) for r in getattr(dataset, args.split) if r.label]
        if not refs:
            raise DataError(empty_group_message(args.dataset, args.split, "cases with a reference label"))
        return _pairs_for_references(pred_dir, refs), "", set(dataset.labels)
    folder = Path(args.references)
    if not folder.is_dir():
        raise DataError(f"{folder}: references folder not found")
    predicted = sorted({case_id_from_path(p) for p in pred_dir.iterdir() if file_extension(p) in IMAGE_EXTENSIONS})
    if not predicted:
        raise DataError(f"{pred_dir}: holds no label maps (looked for {case_file_pattern()})")
    refs, unmatched = [], []
    for case_id in predicted:
        reference = find_case_file(folder, case_id)
        (refs.append((case_id, reference)) if reference is not None else unmatched.append(case_id))
    if unmatched:
        raise DataError(f"{folder}: no reference for {len(unmatched)} predicted case(s): {', '.join(unmatched[:8])}"
                        + (" ..." if len(unmatched) > 8 else "") + f" (looked for {case_file_pattern()})")
    n_references = len({case_id_from_path(p) for p in folder.iterdir() if file_extension(p) in IMAGE_EXTENSIONS})
    left_out = n_references - len(refs)
    note = (f"{left_out} reference(s) in {folder} have no prediction and were not evaluated" if left_out > 0 else "")
    return _pairs_for_references(pred_dir, refs), note, None


def _pairs_for_references(pred_dir: Path, refs: List[Tuple[str, Path]]) -> List[Tuple[str, Path, Path]]:
    """Each reference with its prediction; DataError listing the references without one."""
    from ..data.io import case_file_pattern, find_case_file
    from ..errors import DataError

    pairs, missing = [], []
    for case_id, label_path in refs:
        pred = find_case_file(pred_dir, case_id)
        if pred is not None:
            pairs.append((case_id, pred, label_path))
        else:
            missing.append(case_id)
    if missing:
        raise DataError(f"{pred_dir}: no prediction for {len(missing)} reference case(s): {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else "") + f" (looked for {case_file_pattern()})")
    return pairs


def evaluate_body(args: argparse.Namespace, ctx: RunContext) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    from ..data.io import check_same_geometry, read_label
    from ..fileio import write_json_atomic
    from ..metrics import evaluate_case, summarise

    pairs, note, declared = reference_pairs(args)
    if note:
        ctx.say(note)
    rows: List[Dict[str, Any]] = []
    for index, (case_id, pred_path, ref_path) in enumerate(tqdm(pairs, desc="evaluate", disable=not ctx.show_progress)):
        pred, pred_geom = read_label(pred_path, allowed_labels=declared)  # no invented classes
        ref, ref_geom = read_label(ref_path)
        check_same_geometry(ref_geom, pred_geom, ref_path, pred_path, roles=("reference", "prediction"),
                            hint=PREDICTION_GRID_HINT)
        classes = sorted(set(range(1, int(max(pred.max(), ref.max())) + 1)))
        result = evaluate_case(pred, ref, tuple(reversed(ref_geom.spacing)), classes or [1])
        row = {"case": case_id, **_flatten(result)}
        rows.append(row)
        ctx.events.emit("case_done", case=case_id, outputs={}, metrics={k: v for k, v in row.items()
                                                                         if isinstance(v, (int, float))})
        ctx.events.progress(index + 1, len(pairs), stage="evaluate")
    summary = summarise(rows)
    csv_path = _write_csv(rows, ctx.run_dir / "metrics.csv")
    json_path = write_json_atomic(ctx.run_dir / "summary.json", {"n_cases": len(rows), "summary": summary})
    from ..plots import metrics_figure

    figure = metrics_figure(rows, ctx.run_dir / "metrics.png")
    ctx.say(format_summary(summary, len(rows)))
    worst = lowest_dice(rows)
    if worst:
        ctx.say("lowest Dice: " + ", ".join(f"{case} {value:.3f}" for case, value in worst)
                + f" (every case in {csv_path}, as a picture in {figure})")
    return {"metrics_csv": csv_path, "summary": json_path, "figure": figure}


def lowest_dice(rows: List[Dict[str, Any]], most: int = 5) -> List[tuple]:
    """The `most` cases of lowest mean Dice over their classes, worst first: the ones to look at."""
    scored = []
    for row in rows:
        values = [v for k, v in row.items() if k.startswith("dice_") and isinstance(v, (int, float))]
        if values:
            scored.append((row["case"], sum(values) / len(values)))
    return sorted(scored, key=lambda item: item[1])[:most]


def _flatten(result: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "_"))
        else:
            out[name] = value
    return out


def _write_csv(rows: List[Dict[str, Any]], path: Path) -> Path:
    import csv
    import io

    from ..fileio import write_text_atomic

    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())


def format_summary(summary: Dict[str, Any], n: int) -> str:
    lines = [f"{n} cases"]
    for key, stats in summary.items():
        if isinstance(stats, dict) and "mean" in stats:
            lines.append(f"  {key:<24} mean {stats['mean']:.4f}  std {stats.get('std', float('nan')):.4f}  "
                         f"median {stats.get('median', float('nan')):.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    return run_with_events(args, "evaluate", lambda ctx: evaluate_body(args, ctx))
