"""`qgseg demo`: the whole product end to end on a synthetic phantom, on CPU in a few minutes.

Stages: make a phantom dataset (few labeled, many unlabeled, a held-out test split) -> train the
quality predictor g -> train a supervised baseline and a quality-guided SSL segmenter -> segment
the unlabeled and test volumes with predicted quality per case -> evaluate on the test split ->
write an overlay PNG. Everything lands in --run-dir (default ./qgseg_demo).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict

from ..ssl.config import guidance_schedule_for
from .common import HelpFormatter, RunContext, add_run_options, run_with_events

#: Where the demo writes everything without --run-dir (a default folder: a refused demo leaves none).
DEMO_FOLDER = "qgseg_demo"
#: Epochs of each demo training; its quality guidance runs the paper's schedule scaled to them.
DEMO_EPOCHS = 30


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline on a synthetic dataset (CPU, a few minutes)",
        description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--iterations", type=int, default=300, help="segmenter training steps")
    parser.add_argument("--quality-epochs", type=int, default=30, help="quality-predictor epochs")
    parser.add_argument("--method", default="mt", help="SSL method to run with quality guidance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ssl", action="store_true", help="supervised + quality only (faster)")
    add_run_options(parser, run_dir_default_text=f"{DEMO_FOLDER}/ in the working folder")
    parser.set_defaults(func=run)


def _train(ctx: RunContext, name: str, dataset: Path, iterations: int, seed: int, device: str,
           method: str = "sup", guidance: Dict[str, Any] | None = None, quality: Path | None = None):
    from ..engine.config import TrainConfig
    from ..engine.manifest import write_manifest
    from ..engine.trainer import Trainer

    # the phantom is drawn in voxels, so each case keeps its own grid (no planned resampling)
    cfg = TrainConfig(dataset=str(dataset), mode="3d", target_spacing=None, patch_size=(32, 48, 48), batch_size=2,
                      unlabeled_batch_size=2, iterations=iterations, val_every=max(1, iterations // 5),
                      checkpoint_every=max(1, iterations // 5), iterations_per_epoch=max(1, iterations // DEMO_EPOCHS),
                      lr=3e-3, network="unet", network_options={"channels": [8, 16, 32, 64]},
                      method=method, ssl=dict(guidance or {}), quality_checkpoint=str(quality) if quality else None,
                      seed=seed, device=device)
    started = time.time()
    trainer = Trainer(cfg, ctx.run_dir / name, events=ctx.events, progress_bar=ctx.show_progress)
    result = trainer.fit()
    write_manifest(ctx.run_dir / name, command=["qgseg", "demo", name], config=cfg.to_dict(),
                   device=str(trainer.device), seed=seed, started=started, status="ok")
    ctx.say(f"[{name}] best validation Dice {result.best_metric:.3f} ({result.wall_time_s:.0f} s)")
    return result


def check_demo_options(args: argparse.Namespace) -> None:
    """Refuse bad options before minutes of data making and training, not after them."""
    from ..engine.device import resolve_device
    from ..errors import ConfigError
    from ..ssl.methods import METHODS

    for flag, value in (("--iterations", args.iterations), ("--quality-epochs", args.quality_epochs)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, not {value}")
    METHODS.get(args.method)  # an unknown name raises ConfigError listing the methods
    resolve_device(args.device)  # --device cuda on a machine without one


def demo_body(args: argparse.Namespace, ctx: RunContext) -> Dict[str, Any]:
    from ..data.phantom import make_phantom_dataset
    from ..fileio import write_json_atomic

    check_demo_options(args)
    run_dir = ctx.run_dir
    ctx.events.stage("make phantom dataset", 1, 5)
    dataset = make_phantom_dataset(run_dir / "data", n_labeled=4, n_unlabeled=12, n_validation=2,
                                   n_test=4, shape=(32, 48, 48), seed=args.seed)
    ctx.say(f"phantom dataset: {dataset} (4 labeled, 2 validation, 12 unlabeled, 4 test)")
    outputs: Dict[str, Any] = {"dataset": dataset}

    quality_ckpt = None
    if _has_quality():
        ctx.events.stage("train quality predictor", 2, 5)
        quality_ckpt = _train_quality(ctx, dataset, args)
        outputs["quality_checkpoint"] = quality_ckpt

    ctx.events.stage("train segmenters", 3, 5)
    sup = _train(ctx, "supervised", dataset, args.iterations, args.seed, args.device)
    final = sup
    if not args.skip_ssl and quality_ckpt is not None:
        final = _train(ctx, f"{args.method}-qg", dataset, args.iterations, args.seed, args.device,
                       method=args.method, guidance={"guidance_qar": True, "guidance_qw": True,
                                                     **guidance_schedule_for(DEMO_EPOCHS)},
                       quality=quality_ckpt)
    outputs["segmenter_checkpoint"] = final.best_checkpoint

    ctx.events.stage("segment and score", 4, 5)
    second = sup.best_checkpoint if final is not sup else None  # the supervised model as a second opinion
    summary = _predict_and_evaluate(ctx, dataset, final.best_checkpoint, quality_ckpt, args.device, second)
    summary["supervised_val_dice"] = sup.best_metric
    summary["final_val_dice"] = final.best_metric
    write_json_atomic(run_dir / "demo_summary.json", summary)
    ctx.events.stage("done", 5, 5)
    if summary["test_mean_dice"] is not None:
        ctx.say(f"\nmean Dice on the {sum(r['split'] == 'test' for r in summary['cases'])} test cases: "
                f"{summary['test_mean_dice']:.3f} (validation Dice: supervised {sup.best_metric:.3f}, "
                f"final {final.best_metric:.3f})")
    ctx.say(f"\noutputs in {run_dir.resolve()}:")
    ctx.say(f"  predictions (.nrrd, .seg.nrrd): {run_dir / 'predictions'}")
    ctx.say(f"  overlay picture: {summary['overlay_png']}")
    if "review_png" in summary:
        ctx.say(f"  review sheet (the cases g rates worst): {summary['review_png']}")
    ctx.say(f"  training curves: {final.run_dir / 'training_curves.png'}")
    if quality_ckpt is not None:
        from ..quality.train import CALIBRATION_FILE

        ctx.say(f"  quality predictor's calibration plot: {run_dir / 'quality' / CALIBRATION_FILE}")
    ctx.say(f"  every number above, per case: {run_dir / 'demo_summary.json'}; each run's record: "
            "manifest.json in its folder")
    outputs.update({k: v for k, v in summary.items() if k.endswith("_png")})
    return outputs


def _has_quality() -> bool:
    try:
        from ..quality import train as _  # noqa: F401
        from ..quality import score as _s  # noqa: F401
    except ImportError:
        return False
    return True


def _train_quality(ctx: RunContext, dataset: Path, args) -> Path:
    from ..data.dataset import load_dataset
    from ..engine.manifest import write_manifest
    from ..quality.train import QualityTrainConfig, train_quality_predictor

    cfg = QualityTrainConfig(mode="3d", epochs=args.quality_epochs, seed=args.seed, batch_size=16,
                             samples_per_case=16, grid_size=[32, 32, 32], patience=10)
    started = time.time()
    result = train_quality_predictor(load_dataset(dataset), cfg, ctx.run_dir / "quality", events=ctx.events,
                                     progress=ctx.show_progress, device=args.device)
    write_manifest(ctx.run_dir / "quality", command=["qgseg", "demo", "quality"], config=cfg.to_dict(),
                   device=result.get("device", args.device), seed=args.seed, started=started, status="ok")
    return Path(result["best_checkpoint"])


def _predict_and_evaluate(ctx: RunContext, dataset: Path, checkpoint: Path, quality_ckpt, device_name: str,
                          second_opinion: Path | None = None):
    import numpy as np
    import torch

    from ..data.dataset import load_dataset
    from ..data.io import read_image, read_label
    from ..engine.device import resolve_device
    from ..inference import predict_volume, write_prediction
    from ..metrics import evaluate_case
    from ..plots import overlay_png
    from ..quality.train import dice_per_class
    from ..segmenter import load_segmenter

    device = resolve_device(device_name)
    spec = load_dataset(dataset)
    seg = load_segmenter(checkpoint, device=device)
    other = load_segmenter(second_opinion, device=device) if second_opinion else None
    scorer = None
    if quality_ckpt is not None:
        from ..quality.score import load_scorer

        scorer = load_scorer(quality_ckpt, device=device)
    desc = json.loads(Path(dataset).read_text())
    truth = {Path(p).name: Path(dataset).parent / lab for p, lab in zip(desc["unlabeled"], desc["unlabeled_labels"])}
    cases = [(r, r.label) for r in spec.test] + [(r, truth.get(Path(r.image).name)) for r in spec.unlabeled]
    rows = []
    out_dir = ctx.run_dir / "predictions"
    for ref, label_path in cases:
        with torch.no_grad():
            label, _, geometry = predict_volume(seg.network, ref.image, seg.preprocessor, seg.patch_size,
                                                seg.mode, device)
        write_prediction(label, geometry, out_dir, ref.id, seg.foreground_names)
        truth_label = read_label(label_path)[0] if label_path else None
        row = {"case": ref.id, "split": "test" if ref in spec.test else "unlabeled"}
        if truth_label is not None:
            row["true_dice"] = evaluate_case(label, truth_label, tuple(reversed(geometry.spacing)), [1])["dice"]
        if scorer:
            row["predicted_quality"] = float(np.mean(list(scorer(ref.image, label, geometry).values())))
        if other is not None:
            with torch.no_grad():
                other_label = predict_volume(other.network, ref.image, other.preprocessor, other.patch_size,
                                             other.mode, device)[0]
            row["second_opinion_dice"] = float(np.mean(dice_per_class(label, other_label, max(seg.foreground_names))))
        rows.append(row)
        ctx.events.emit("case_done", case=ref.id, outputs={}, metrics={k: v for k, v in row.items() if isinstance(v, float)})
    rows.sort(key=lambda r: r.get("predicted_quality", r.get("true_dice", 0)))
    ctx.say("\ncase        split      true Dice  predicted quality  second opinion   (worst predicted first)")
    for r in rows:
        ctx.say(f"{r['case']:<11} {r['split']:<10} {r.get('true_dice', float('nan')):9.3f}  "
                f"{r.get('predicted_quality', float('nan')):17.3f}  {r.get('second_opinion_dice', float('nan')):14.3f}")
    if other is not None:
        ctx.say("(second opinion: Dice against the supervised model's segmentation; README, 'A second opinion')")
    test_dice = [r["true_dice"] for r in rows if r["split"] == "test"]
    worst = rows[0]
    ref = next(r for r, _ in cases if r.id == worst["case"])
    image, geometry = read_image(ref.image)
    from ..data.io import read_label as _rl

    pred = _rl(out_dir / f"{worst['case']}.nrrd")[0]
    label_path = dict((r.id, p) for r, p in cases)[worst["case"]]
    reference = _rl(label_path)[0] if label_path else None
    png = overlay_png(image, pred, ctx.run_dir / "overlay.png", reference=reference,
                      title=f"{worst['case']} (lowest predicted quality)", spacing_zyx=tuple(reversed(geometry.spacing)))
    summary = {"cases": rows, "test_mean_dice": float(np.mean(test_dice)) if test_dice else None,
               "overlay_png": str(png)}
    if scorer:
        summary["review_png"] = str(_review_sheet(rows[:REVIEW_SHEET_CASES], {r.id: r.image for r, _ in cases},
                                                  out_dir, ctx.run_dir / "review.png"))
    return summary


REVIEW_SHEET_CASES = 6


def _review_sheet(rows, images, predictions: Path, out: Path) -> Path:
    """The cases g rates worst, as `qgseg predict`'s review.png shows them, with their true Dice."""
    from ..plots import review_sheet
    from .predict import review_sheet_entry

    entries = [review_sheet_entry(f"{row['case']}\npredicted Dice {row['predicted_quality']:.2f}\n"
                                  f"true Dice {row.get('true_dice', float('nan')):.2f}",
                                  images[row["case"]], predictions / f"{row['case']}.nrrd") for row in rows]
    return review_sheet(entries, out, title=f"the {len(entries)} cases g rates worst (fill: prediction)")


def run(args: argparse.Namespace) -> int:
    return run_with_events(args, "demo", lambda ctx: demo_body(args, ctx), default_run_dir=DEMO_FOLDER)
