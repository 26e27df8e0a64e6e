"""`qgseg predict`: segment volumes with a trained checkpoint (and score them with g if given)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .common import HelpFormatter, RunContext, add_run_options, run_with_events

EXAMPLES = """
examples:
  qgseg predict --checkpoint runs/heart/checkpoints/best.pt --input imagesTs/ --output preds/
  qgseg predict --checkpoint best.pt --input dataset.json --split unlabeled --output preds/ \\
                --quality-checkpoint runs/g/checkpoints/best.pt
  qgseg predict --checkpoint seed0/checkpoints/best.pt seed1/checkpoints/best.pt --input imagesTs/ \\
                --output preds/      # an ensemble: the softmaxes are averaged
  qgseg predict --checkpoint seed0/checkpoints/best.pt --input imagesTs/ --output preds/ \\
                --quality-checkpoint runs/g/checkpoints/best.pt --second-opinion seed1/checkpoints/best.pt
                                     # g's score and a second model's agreement per case

Writes <case>.nrrd (label map) and <case>.seg.nrrd (loads in 3D Slicer as a segmentation) with
exactly the input volume's geometry, plus scores.csv with the predicted quality per case and
segment when --quality-checkpoint is given (worst first). --second-opinion segments every volume
again with another model (twice the inference time) and adds each segment's Dice against that
second segmentation to scores.csv (second_opinion_dice): it sees the masks at full resolution and
often ranks cases better than g, but misses mistakes both models share (BENCHMARKS.md section 6).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="segment volumes with a trained model",
        description="Sliding-window inference on whole volumes; outputs on the input's exact grid.",
        epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="segmenter checkpoint (best.pt from qgseg train); several: their "
                             "softmaxes are averaged (an ensemble, e.g. of seeds or of best and last)")
    parser.add_argument("--input", required=True, nargs="+",
                        help="image files, a folder of images, or a dataset.json")
    parser.add_argument("--split", default="test", choices=["test", "validation", "training", "unlabeled", "all"],
                        help="which list of a dataset.json to segment")
    parser.add_argument("--output", required=True,
                        help="folder for <case>.nrrd (--format) and <case>.seg.nrrd; also the run folder "
                             "(manifest.json) unless --run-dir is given")
    parser.add_argument("--format", default="nrrd", choices=["nrrd", "nii.gz", "nii", "mha"],
                        help="file type of the label maps (nii.gz as nnU-Net and MONAI write them); the "
                             "Slicer segmentation <case>.seg.nrrd is written beside each either way")
    parser.add_argument("--quality-checkpoint", nargs="+",
                        help="quality predictor (several: their mean): also write scores.csv")
    parser.add_argument("--second-opinion", nargs="+", metavar="CHECKPOINT",
                        help="another segmenter (several: their ensemble), ideally trained with another "
                             "seed or network: scores.csv gets each segment's Dice against its mask")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                        help="test-time mirroring: average the predictions of the 8 (2D: 4) mirrored "
                             "copies of each window (+0.010-0.016 test Dice on LA, about 3x the "
                             "time of a volume; BENCHMARKS.md §1c); --no-mirror for one pass")
    parser.add_argument("--png", action="store_true", help="also write an overlay PNG per case")
    parser.add_argument("--review-sheet", type=int, default=12, metavar="N",
                        help="with scores: review.png shows the N cases scored worst, worst first, "
                             "three planes each (0: none)")
    add_run_options(parser, run_dir_default_text="the --output folder")
    parser.set_defaults(func=run)


def collect_inputs(inputs: List[str], split: str) -> List[Tuple[str, Path]]:
    """(case id, image path) for files, folders (their images, not their .seg.nrrd files), or a
    dataset.json split."""
    from ..data.io import IMAGE_EXTENSIONS, case_id_from_path, file_extension
    from ..errors import DataError

    out: List[Tuple[str, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() == ".json":
            from ..data.dataset import load_dataset

            spec = load_dataset(path)
            if split != "all" and not spec.group(split):
                from ..data.dataset import empty_group_message

                raise DataError(empty_group_message(path, split))
            groups = ["training", "validation", "test", "unlabeled"] if split == "all" else [split]
            for group in groups:
                out += [(ref.id, Path(ref.image)) for ref in getattr(spec, group)]
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if file_extension(p) in IMAGE_EXTENSIONS)
            if not files:
                raise DataError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            out += [(case_id_from_path(p), p) for p in files]
        elif path.is_file():
            out.append((case_id_from_path(path), path))
        else:
            raise DataError(f"{path}: no such file or folder")
    if not out:
        raise DataError(f"nothing to segment in {' '.join(inputs)} (split {split!r} is empty?)")
    ids = [c for c, _ in out]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise DataError(f"several inputs share the case name(s) {', '.join(dupes)}; outputs would overwrite each other")
    return out


def planned_outputs(case_ids: List[str], out_dir: Path, png: bool, scoring: bool,
                    review_sheet: bool, label_format: str = ".nrrd") -> List[Path]:
    """Every file `predict_body` will write under `out_dir` for these cases and options."""
    from ..inference import prediction_paths

    paths = [p for case_id in case_ids for p in prediction_paths(out_dir, case_id, label_format).values()]
    if png:
        paths += [out_dir / f"{case_id}.png" for case_id in case_ids]
    if scoring:
        paths.append(out_dir / "scores.csv")
        if review_sheet:
            paths.append(out_dir / "review.png")
    return paths


def check_outputs(cases: List[Tuple[str, Path]], args: argparse.Namespace) -> None:
    """DataError, before any inference, when --output is an existing file (or lies under one) or
    when an output file would be one of the input images (e.g. --output is the input folder
    of .nrrd images): the images would be replaced by their label maps."""
    from ..inference import check_outputs_spare_inputs

    out_dir = checked_output_folder(args.output)
    scoring = bool(args.quality_checkpoint or args.second_opinion)
    outputs = planned_outputs([c for c, _ in cases], out_dir, args.png, scoring, args.review_sheet > 0,
                              label_format(args))
    check_outputs_spare_inputs([path for _, path in cases], outputs)


def checked_output_folder(output: str) -> Path:
    """--output as a folder; ConfigError when it is named like an image file, DataError when a
    file stands where it or a folder above it should be."""
    from ..data.io import IMAGE_EXTENSIONS, file_extension
    from ..errors import ConfigError
    from ..inference import check_output_folder

    if file_extension(output) in IMAGE_EXTENSIONS and not Path(output).is_dir():
        raise ConfigError(f"--output {output}: name a folder, not an image file; the label maps are "
                          "written into it as <case>.nrrd, or as another type with --format (e.g. nii.gz)")
    return check_output_folder(output)


def label_format(args: argparse.Namespace) -> str:
    """--format as a file extension: nii.gz -> .nii.gz."""
    return "." + args.format


def stale_scores(out_dir: Path, args: argparse.Namespace) -> List[Path]:
    """scores.csv / review.png already in the output folder of a run that will not rewrite them."""
    if args.quality_checkpoint or args.second_opinion:
        return []
    return [path for path in (out_dir / "scores.csv", out_dir / "review.png") if path.exists()]


def predict_body(args: argparse.Namespace, ctx: RunContext) -> Dict[str, Any]:
    import torch

    from ..engine.cancel import CancelToken
    from ..engine.device import resolve_device, translate_oom
    from ..data.io import check_image_file
    from ..inference import predict_volume, write_prediction
    from ..quality.train import dice_per_class

    device = resolve_device(args.device)
    cases = collect_inputs(args.input, args.split)
    check_outputs(cases, args)  # before any model is loaded: a bad --output fails at once
    for _, image_path in cases:  # a bad input fails before anything is written, not half-way
        check_image_file(image_path)
    for stale in stale_scores(Path(args.output), args):
        ctx.events.warning(f"{stale} is left from an earlier predict into this folder: this run does not "
                           "score, so it describes other predictions (delete it, or pass --quality-checkpoint)")
    segmenter = load_ensemble(args.checkpoint, args.mirror, device)
    second = load_ensemble(args.second_opinion, args.mirror, device) if args.second_opinion else None
    if second is not None and second.labels != segmenter.labels:
        from ..errors import ConfigError

        raise ConfigError(f"--second-opinion {' '.join(args.second_opinion)} segments {second.labels}, "
                          f"but --checkpoint segments {segmenter.labels}; the second opinion must "
                          "segment the same labels")
    scorer = None
    if args.quality_checkpoint:
        from ..quality.score import load_scorer

        from ..quality.predictor import check_scores_labels

        scorer = load_scorer(args.quality_checkpoint, device=device)
        mismatch = check_scores_labels(scorer.model, segmenter.labels, " ".join(args.quality_checkpoint),
                                       "--checkpoint")
        if mismatch:
            ctx.events.warning(mismatch)
    out_dir = Path(args.output)
    cancel = CancelToken(ctx.run_dir)
    scoring = bool(scorer or second)
    stages = 2 if scoring else 1
    ctx.events.stage("segment", 1, stages)
    from tqdm.auto import tqdm

    written, rows, started = [], [], time.time()
    label_files: Dict[str, tuple] = {}  # case -> (image, written label map), for the review sheet

    def segment(model, image_path):
        return predict_volume(model.network, image_path, model.preprocessor, model.patch_size, model.mode,
                              device, overlap=args.overlap)

    for index, (case_id, image_path) in enumerate(tqdm(cases, desc="predict", disable=not ctx.show_progress)):
        cancel.check()
        with translate_oom(f"inference on {image_path}"), torch.no_grad():
            label, _, geometry = segment(segmenter, image_path)
            other = segment(second, image_path)[0] if second is not None else None
        paths = write_prediction(label, geometry, out_dir, case_id, segmenter.foreground_names, label_format(args))
        outputs = {k: str(v) for k, v in paths.items()}
        label_files[case_id] = (image_path, Path(paths["label"]))
        metrics = {}
        if scoring:
            case_rows = score_rows(case_id, segmenter.foreground_names,
                                   scorer(image_path, label, geometry) if scorer else None,
                                   dice_per_class(label, other, max(segmenter.foreground_names))
                                   if other is not None else None)
            rows += case_rows
            metrics = {f"{name}_{r['segment']}": r[key] for r in case_rows for key, name in
                       (("predicted_quality", "quality"), ("second_opinion_dice", "second_opinion")) if key in r}
        if args.png:
            outputs["png"] = str(_overlay(image_path, label, out_dir / f"{case_id}.png", case_id))
        written.append(outputs)
        ctx.events.emit("case_done", case=case_id, outputs=outputs, metrics=metrics)
        rate = (time.time() - started) / (index + 1)
        ctx.events.progress(index + 1, len(cases), eta_s=rate * (len(cases) - index - 1), stage="segment")
    result: Dict[str, Any] = {"output": out_dir}
    if scoring:
        result["scores"] = write_scores(rows, out_dir / "scores.csv")
        key = _sort_key(rows)
        worst = sorted(rows, key=lambda r: r[key])[:5]
        ctx.say(f"lowest {key.replace('_', ' ')}: " + ", ".join(f"{r['case']}:{r['segment']}={r[key]:.2f}" for r in worst))
        if args.review_sheet > 0:
            result["review_sheet"] = write_review_sheet(rows, key, label_files, out_dir / "review.png",
                                                        args.review_sheet)
            ctx.say(f"the cases scored worst, as pictures: {result['review_sheet']}")
    ctx.say(f"wrote {len(written)} segmentations to {out_dir}"
            + (f"; every case's score, worst first, in {result['scores']}" if scoring else ""))
    return result


def load_ensemble(paths: List[str], mirror: bool, device):
    """One segmenter from one or several checkpoints (softmaxes averaged), mirrored if asked."""
    from ..segmenter import ensemble_segmenters, load_segmenter

    model = ensemble_segmenters([load_segmenter(path, device=device) for path in paths])
    return model.mirrored() if mirror else model


def score_rows(case_id: str, foreground: Dict[int, str], quality: Dict[int, float] | None,
               agreement) -> List[Dict[str, Any]]:
    """scores.csv rows of one case: g's predicted quality and/or the second opinion's Dice."""
    rows = []
    for c, name in foreground.items():
        row: Dict[str, Any] = {"case": case_id, "segment": name, "label": c}
        if quality is not None:
            row["predicted_quality"] = round(float(quality[c]), 4)
        if agreement is not None:
            row["second_opinion_dice"] = round(float(agreement[c - 1]), 4)
        rows.append(row)
    return rows


def _sort_key(rows: List[Dict[str, Any]]) -> str:
    return "predicted_quality" if "predicted_quality" in rows[0] else "second_opinion_dice"


def write_scores(rows: List[Dict[str, Any]], path: Path) -> Path:
    """scores.csv, worst first by g's predicted quality (by the second opinion without g)."""
    import csv
    import io

    from ..fileio import write_text_atomic

    buf = io.StringIO()
    fields = ["case", "segment", "label"] + [k for k in ("predicted_quality", "second_opinion_dice") if k in rows[0]]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    key = _sort_key(rows)
    for row in sorted(rows, key=lambda r: r[key]):
        writer.writerow(row)
    return write_text_atomic(path, buf.getvalue())


def write_review_sheet(rows: List[Dict[str, Any]], key: str, files: Dict[str, tuple], out: Path,
                       most: int) -> Path:
    """review.png: the `most` cases whose worst segment scores lowest by `key`, worst first."""
    from ..plots import review_sheet

    worst: Dict[str, Dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r[key]):
        worst.setdefault(row["case"], row)
    name = "predicted Dice" if key == "predicted_quality" else "2nd-opinion Dice"
    entries = [review_sheet_entry(f"{case}\n{row['segment']}\n{name} {row[key]:.2f}", *files[case])
               for case, row in list(worst.items())[:most]]
    return review_sheet(entries, out, title=f"{len(entries)} cases scored worst, worst first (fill: prediction)")


def review_sheet_entry(caption: str, image_path: Path, label_path: Path) -> tuple:
    """One row of `plots.review_sheet`, read from an image file and its label map."""
    from ..data.io import read_image, read_label

    image, geometry = read_image(image_path)
    return caption, image, read_label(label_path)[0], tuple(reversed(geometry.spacing))


def _overlay(image_path: Path, label, out: Path, title: str) -> Path:
    from ..data.io import read_image
    from ..plots import overlay_png

    image, geometry = read_image(image_path)
    return overlay_png(image, label, out, title=title, spacing_zyx=tuple(reversed(geometry.spacing)))


def run(args: argparse.Namespace) -> int:
    return run_with_events(args, "predict", lambda ctx: predict_body(args, ctx),
                           default_run_dir=output_as_run_folder(args.output))


def output_as_run_folder(output: str):
    """--output, where the segmentations' manifest.json records how they were made (as nnU-Net's
    output folder does); None when check_outputs will refuse it by name (it runs in the body)."""
    from ..errors import QGSegError

    try:
        checked_output_folder(output)
    except QGSegError:
        return None
    return output
