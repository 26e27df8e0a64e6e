"""`qgseg quality ...`: train, evaluate and apply the quality predictor g.

    qgseg quality train    --dataset dataset.json --run-dir runs/g
    qgseg quality evaluate --dataset dataset.json --checkpoint runs/g/checkpoints/best.pt
    qgseg quality score    --checkpoint runs/g/checkpoints/best.pt --images a.nrrd --masks a_seg.nrrd \\
                           --output scores.csv
    qgseg quality calibrate --checkpoint runs/g/checkpoints/best.pt --dataset dataset.json \\
                            --masks runs/seg_val --output runs/g/checkpoints/calibrated.pt
    qgseg quality ensemble --checkpoint runs/g_s0/checkpoints/best.pt runs/g_s1/checkpoints/best.pt \\
                           --output runs/g_ensemble.pt

Heavy modules (torch, monai) are imported inside the command bodies, so building the parser is
cheap.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict

from ..errors import ConfigError
from .common import HelpFormatter, add_run_options, command_line, run_with_events

TRAIN_EPILOG = """\
What it does:
  Trains g(image, mask) -> Dice on variable-quality masks (VQM) made on the fly from the labeled
  training cases: corrupted references (morphology, shape, boundary, structural, geometric, blob,
  heavy and catastrophic corruptions, swaps with other cases) and snapshots of a deliberately
  weak segmenter. The target of each mask is its true Dice. Writes into --run-dir:
  checkpoints/best.pt (lowest validation MAE; use it for scoring and for QAR/QW training),
  checkpoints/last.pt (resume point: rerunning the same command continues from it),
  quality_training_curve.png, quality_calibration_validation.png, quality_history.json.

Defaults: paper settings (AdamW 3e-4, cosine warm restarts, SmoothL1, early stop 25 epochs on
validation MAE), 50 masks per case per epoch on a GPU, 8 on a CPU, backbone 'convnet'.
The weak segmenter trains first, for its own 20 short epochs whatever --epochs says (its
predictions are cached, so a rerun skips it); `--set weak=null --set p_weak=0` leaves it out,
e.g. for a quick check.
`--seeds N` trains N members (seeds --seed, --seed + 1, ...) in seed-<s>/ and writes their
ensemble, which answers with their mean, as checkpoints/best.pt (N times the time; on LA the
four-seed mean beat every single seed: BENCHMARKS.md section 6). Members already finished are
not trained again when the command is rerun.
`--set segmentation_head=true` adds an image-only U-Net to g whose segmentation serves as a
reference estimate (slower, better at ranking segmenters; BENCHMARKS.md section 2d).

Examples:
  qgseg quality train --dataset Task/dataset.json --run-dir runs/g
  qgseg quality train --dataset Task/dataset.json --run-dir runs/g --epochs 40 --backbone resnet18 \\
      --set samples_per_case=20 --set vqm.p_weak=0.1
  qgseg quality train --dataset Task/dataset.json --run-dir runs/g --set p_weak=0.3 \\
      --extra-masks runs/other_seg/pred_training   # masks of the training cases by another segmenter
  qgseg quality train --dataset Task/dataset.json --run-dir runs/g --set segmentation_head=true \\
      --validation-masks runs/other_seg/pred_validation  # select and calibrate on real masks
  qgseg quality train --dataset Task/dataset.json --run-dir runs/g4 --seeds 4   # a four-seed ensemble
"""

CALIBRATE_EPILOG = """\
What it does:
  g is taught mostly on synthetic corruptions and can rate real segmenters' masks too high or too
  low as a whole. This fits one shift per class - the mean of (true Dice - predicted Dice) over
  the given masks - and writes a copy of the predictor that adds it to every prediction (ranking
  is unchanged). Use masks of cases g was not trained on: the validation cases, or cases you
  reviewed and corrected. `qgseg quality train --validation-masks` does this automatically.

Example:
  qgseg predict --checkpoint seg/checkpoints/best.pt --input Task/dataset.json --split validation \\
      --no-mirror --output runs/seg_val
  qgseg quality calibrate --checkpoint runs/g/checkpoints/best.pt --dataset Task/dataset.json \\
      --masks runs/seg_val --output runs/g/checkpoints/calibrated.pt
"""

EVALUATE_EPILOG = """\
What it does:
  Draws synthetic VQM masks (default 5 per case) for the labeled cases of --group, compares g's
  predictions with their true Dice, and writes quality_evaluation.json (MAE, Pearson, Spearman,
  failure-detection AUROC for Dice < 0.7, image-dependence check), quality_evaluation_rows.csv
  and quality_calibration.png into --run-dir.

  With several --predictions folders (one per segmenter) it also reports the metrics within each
  folder ("per_source", one console line each, one colour each in the plot): the overall Pearson
  rewards telling a weak segmenter from a good one, while reviewing one model's output needs g to
  rank that model's cases.

  With --second-opinion DIR, each mask's Dice against another segmenter's mask of the same case
  is evaluated as a quality estimate too (metrics under "second_opinion", a rows column and
  quality_calibration_second_opinion.png), and so are the mean and the lower of g's estimate and
  that Dice (metrics under "combined").

Examples:
  qgseg quality evaluate --dataset Task/dataset.json --checkpoint runs/g/checkpoints/best.pt --group test
  qgseg quality evaluate --dataset Task/dataset.json --checkpoint runs/g/checkpoints/best.pt --group test \\
      --predictions runs/segA/pred_test --second-opinion runs/segB/pred_test
"""

ENSEMBLE_EPILOG = """\
What it does:
  g trained with different seeds disagrees most on unusual volumes; the mean of several is steadier
  than any one (BENCHMARKS.md section 2d). This writes one file holding the given predictors (which
  must share mode, grid and classes). Every command that takes a quality checkpoint - score,
  evaluate, predict --quality-checkpoint, train --quality-checkpoint (QAR/QW guidance), the Slicer
  panel - then answers with their mean, at one forward pass of g per member.

Example:
  for s in 0 1 2; do qgseg quality train --dataset Task/dataset.json --run-dir runs/g_s$s --seed $s; done
  qgseg quality ensemble --checkpoint runs/g_s{0,1,2}/checkpoints/best.pt --output runs/g_ensemble.pt
"""

SCORE_EPILOG = """\
What it does:
  Predicts the Dice of each foreground class of each mask against its (unknown) reference.
  Image and mask must share the same voxel grid; mask values must be labels 0..K of the
  predictor (0/1 for a binary one). Writes one row per (case, class) to --output (.csv or .json).

Examples:
  qgseg quality score --checkpoint runs/g/checkpoints/best.pt --images ct1.nrrd ct2.nrrd \\
      --masks ct1_seg.nrrd ct2_seg.nrrd --output scores.csv
  qgseg quality score --checkpoint runs/g/checkpoints/best.pt --pairs pairs.csv --output scores.json
  (pairs.csv has the header 'image,mask'; relative paths are relative to the CSV)
  qgseg quality score --checkpoint runs/g/checkpoints/best.pt --images imagesTs/ \
      --masks nnunet_predictions/ --output scores.csv     # two folders, matched by case

A second opinion:
  --second-opinion DIR adds each mask's Dice against another segmenter's mask of the same image
  (DIR/<image case>.nrrd or .nii.gz, e.g. `qgseg predict --checkpoint other.pt --output DIR`). It sees the
  mask at full resolution and often ranks masks better than g, but misses mistakes both
  segmenters share (BENCHMARKS.md section 6); read the two columns together.
"""


def register(subparsers) -> argparse.ArgumentParser:
    """Add `quality` with subcommands train, evaluate, score, calibrate and ensemble."""
    parser = subparsers.add_parser(
        "quality", help="train, evaluate and apply the quality predictor g(image, mask) -> Dice",
        description="The quality predictor g estimates the Dice of a segmentation without a "
                    "reference. Train it once per dataset, then use it to score masks or to guide "
                    "semi-supervised training (QAR, QW).", formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="quality_command", metavar="{train,evaluate,score,calibrate,ensemble}")
    sub.required = True

    train = sub.add_parser("train", help="train g on variable-quality masks of a labeled dataset",
                           description="Train the quality predictor g.", epilog=TRAIN_EPILOG,
                           formatter_class=HelpFormatter)
    train.add_argument("--dataset", required=True, metavar="dataset.json",
                       help="Decathlon/nnU-Net style dataset description; g uses its labeled cases")
    train.add_argument("--config", metavar="FILE", help="YAML/JSON file of QualityTrainConfig options")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one option, e.g. --set batch_size=16 --set vqm.p_weak=0.1")
    train.add_argument("--epochs", type=int, help="maximum epochs (default from config: 150)")
    train.add_argument("--backbone", help="g's backbone: convnet, resnet18, resnet34, densenet121, "
                                          "efficientnet-b0 (default convnet)")
    train.add_argument("--mode", choices=["3d", "2d"], help="3d volumes or 2d slices (default 3d)")
    train.add_argument("--samples-per-case", type=int,
                       help="VQM masks per training case per epoch (default 50 on GPU, 8 on CPU)")
    train.add_argument("--seed", type=int, help="random seed (default 0)")
    train.add_argument("--seeds", type=int, default=1, metavar="N",
                       help="train N members with seeds --seed ... --seed+N-1 and save their ensemble "
                            "(the mean of their predictions) as checkpoints/best.pt")
    train.add_argument("--extra-masks", nargs="+", metavar="DIR",
                       help="folders of <case>.nrrd (or NIfTI) segmentations of the training cases made by other "
                            "(e.g. partially trained) segmenters, such as `qgseg predict --split "
                            "training` outputs: real masks of known Dice, drawn with probability "
                            "p_weak like the weak snapshots")
    train.add_argument("--validation-masks", nargs="+", metavar="DIR",
                       help="folders of <case>.nrrd (or NIfTI) segmentations of the validation cases by real "
                            "segmenters (e.g. `qgseg predict --split validation`): early stopping then "
                            "selects g on the mean of its synthetic-mask and real-mask validation MAE")
    add_run_options(train)
    train.set_defaults(func=run_train)

    evaluate = sub.add_parser("evaluate", help="measure g against true Dice (synthetic masks, or real segmentations with --predictions)",
                              description="Evaluate a trained quality predictor.",
                              epilog=EVALUATE_EPILOG, formatter_class=HelpFormatter)
    evaluate.add_argument("--dataset", required=True, metavar="dataset.json", help="dataset description")
    evaluate.add_argument("--checkpoint", required=True, nargs="+",
                          help="checkpoints/best.pt of a `quality train` run folder; several: their mean")
    evaluate.add_argument("--group", default="test", choices=["test", "validation", "training"],
                          help="which labeled cases to evaluate on (falls back to validation, then "
                               "training, when the group is empty)")
    evaluate.add_argument("--samples-per-case", type=int, default=5, help="VQM masks per case")
    evaluate.add_argument("--predictions", nargs="+", metavar="DIR",
                          help="evaluate on masks made by real segmenters instead of synthetic VQMs: "
                               "folders of <case>.nrrd written by `qgseg predict`, or NIfTI of another tool "
                               "(one folder per segmenter)")
    evaluate.add_argument("--seed", type=int, default=0, help="random seed of the VQM masks")
    evaluate.add_argument("--second-opinion", metavar="DIR",
                          help="also measure each mask's Dice against another segmenter's <case>.nrrd "
                               "(or NIfTI) in DIR as a quality estimate, next to g's (BENCHMARKS.md "
                               "section 6)")
    add_run_options(evaluate)
    evaluate.set_defaults(func=run_evaluate)

    score = sub.add_parser("score", help="predict the Dice of masks without a reference",
                           description="Score (image, mask) pairs with a trained quality predictor.",
                           epilog=SCORE_EPILOG, formatter_class=HelpFormatter)
    score.add_argument("--checkpoint", required=True, nargs="+",
                       help="checkpoints/best.pt of a `quality train` run folder; several (e.g. seeds): "
                            "their mean prediction")
    score.add_argument("--images", nargs="+", metavar="IMAGE",
                       help="image files, or one folder of images")
    score.add_argument("--masks", nargs="+", metavar="MASK",
                       help="mask/label files, one per image in the same order; or, with a folder of "
                            "images, one folder of masks named after the images' cases (nnU-Net's "
                            "X_0000 images match masks X)")
    score.add_argument("--pairs", metavar="CSV", help="CSV with columns image,mask (instead of --images/--masks)")
    score.add_argument("--output", required=True, metavar="FILE", help="scores.csv or scores.json")
    score.add_argument("--second-opinion", metavar="DIR",
                       help="folder of another segmenter's masks named <image case>.nrrd: adds the "
                            "column second_opinion_dice (each mask's Dice against that mask)")
    add_run_options(score, run_dir_default_text="the folder of --output")
    score.set_defaults(func=run_score)
    calibrate = sub.add_parser("calibrate", help="shift g's output to match real masks of known quality",
                               description="Calibrate a trained quality predictor on real segmentations.",
                               epilog=CALIBRATE_EPILOG, formatter_class=HelpFormatter)
    calibrate.add_argument("--checkpoint", required=True, help="checkpoints/best.pt of a `quality train` run folder")
    calibrate.add_argument("--dataset", required=True, metavar="dataset.json",
                           help="dataset whose --group cases have reference labels")
    calibrate.add_argument("--masks", required=True, nargs="+", metavar="DIR",
                           help="folders of <case>.nrrd (or NIfTI) segmentations of those cases (one per "
                                "segmenter)")
    calibrate.add_argument("--group", default="validation", choices=["validation", "test", "training"],
                           help="which labeled cases (never ones g was trained on)")
    calibrate.add_argument("--output", required=True, metavar="FILE", help="calibrated predictor file (.pt)")
    add_run_options(calibrate, run_dir_default_text="the folder of --output")
    calibrate.set_defaults(func=run_calibrate)
    ensemble = sub.add_parser("ensemble", help="combine several trained g (e.g. seeds) into one file",
                              description="Write one quality predictor file that answers with the mean "
                                          "of several.", epilog=ENSEMBLE_EPILOG, formatter_class=HelpFormatter)
    ensemble.add_argument("--checkpoint", required=True, nargs="+",
                          help="predictor files (checkpoints/best.pt of `quality train` runs, or ensembles)")
    ensemble.add_argument("--output", required=True, metavar="FILE", help="the ensemble file (.pt)")
    add_run_options(ensemble, run_dir_default_text="the folder of --output")
    ensemble.set_defaults(func=run_ensemble)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen subcommand; returns the exit code."""
    return args.func(args) if args.func is not run else 2


def _train_config(args) -> Dict[str, Any]:
    from ..engine.config import apply_overrides, load_config_file

    data = load_config_file(args.config) if args.config else {}
    for key, option in (("epochs", "epochs"), ("backbone", "backbone"), ("mode", "mode"),
                        ("samples_per_case", "samples_per_case"), ("seed", "seed"),
                        ("extra_masks", "extra_masks"), ("validation_masks", "validation_masks")):
        value = getattr(args, option, None)
        if value is not None:
            data[key] = value
    return apply_overrides(data, args.set)


def run_train(args: argparse.Namespace) -> int:
    def body(ctx):
        from ..data.dataset import checked_dataset, load_dataset
        from ..engine.cancel import CancelToken
        from ..engine.manifest import recorded_run
        from ..quality.train import QualityTrainConfig

        if args.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
        config = QualityTrainConfig.from_dict(_train_config(args), source=args.config or "options")
        spec = checked_dataset(args.dataset, ctx.events.warning) if ctx.is_main else load_dataset(args.dataset)
        train = _train_one if args.seeds == 1 else _train_members
        with recorded_run(ctx.run_dir, command=command_line(args), config=config, device=args.device,
                          seed=config.seed, started=ctx.started,
                          extra={"dataset": str(args.dataset), "seeds": args.seeds}, enabled=ctx.is_main):
            return train(args, ctx, spec, config, CancelToken(ctx.run_dir))

    return run_with_events(args, "quality train", body)


def _train_one(args, ctx, spec, config, cancel) -> Dict[str, Any]:
    from ..quality.train import train_quality_predictor

    result = train_quality_predictor(spec, config, ctx.run_dir, events=ctx.events, cancel=cancel,
                                     progress=ctx.show_progress, device=args.device)
    ctx.say(f"best epoch {result['best_epoch']}: validation MAE {result['best_val_mae']:.4f}, "
            f"Pearson {result['best_val_pearson']:.3f}\ncheckpoint: {result['best_checkpoint']}")
    return {"checkpoint": result["best_checkpoint"], "last_checkpoint": result["last_checkpoint"],
            "curve": result["curve"], "calibration": result["calibration"]}


def _train_members(args, ctx, spec, config, cancel) -> Dict[str, Any]:
    from ..quality.ensemble import train_quality_ensemble

    result = train_quality_ensemble(spec, config, args.seeds, ctx.run_dir, events=ctx.events, cancel=cancel,
                                    progress=ctx.show_progress, device=args.device)
    for member in result["members"]:
        ctx.say(f"seed {member['seed']}: best epoch {member['best_epoch']}, validation MAE "
                f"{member['best_val_mae']:.4f}, Pearson {member['best_val_pearson']:.3f}")
    ctx.say(f"ensemble of {len(result['members'])} seeds: {result['best_checkpoint']}")
    return {"checkpoint": result["best_checkpoint"], "curve": result["curve"],
            "members": [m["best_checkpoint"] for m in result["members"]]}


def _second_opinion(folder):
    """The --second-opinion folder, opened (None when not given)."""
    if not folder:
        return None
    from ..quality.second_opinion import SecondOpinion

    return SecondOpinion(folder)


def run_evaluate(args: argparse.Namespace) -> int:
    def body(ctx):
        from ..data.dataset import load_dataset
        from ..engine.device import resolve_device
        from ..quality.evaluate import evaluate_predictor, make_vqm_pairs, write_evaluation
        from ..quality.predictor import load_predictors
        from ..quality.train import load_cases

        device = resolve_device(args.device)
        model = load_predictors(args.checkpoint, device)
        spec = load_dataset(args.dataset)
        group = args.group
        for candidate in (args.group, "validation", "training"):
            if spec.group(candidate):
                group = candidate
                break
        if group != args.group:
            ctx.events.warning(f"dataset has no '{args.group}' cases; evaluating on '{group}'")
        cases = load_cases(spec.group(group), spec.labels)
        mode = model.config["mode"]
        if args.predictions:
            from ..quality.evaluate import prediction_pairs

            pairs, source = prediction_pairs(cases, args.predictions, ctx.events.warning), "real-segmenter masks"
        else:
            pairs, source = make_vqm_pairs(cases, args.samples_per_case, args.seed, mode=mode), "VQMs"
        second = _second_opinion(args.second_opinion)
        result = evaluate_predictor(model, pairs, device, second_opinion=second)
        result["group"] = group
        result["source"] = source
        paths = write_evaluation(result, ctx.run_dir, title=f"{group} {source}")
        m = result["metrics"]
        ctx.say(f"{group}: n={m['n']} MAE {m['mae']:.4f} Pearson {m['pearson']:.3f} "
                f"Spearman {m['spearman']:.3f} AUROC(Dice<0.7) {m['auroc_failure']:.3f}")
        if "image_dependence" in result:
            ctx.say(image_dependence_line(result["image_dependence"]))
        if second is not None:
            o = result["second_opinion"]["metrics"]
            ctx.say(f"second opinion ({second.folder}): MAE {o['mae']:.4f} Pearson {o['pearson']:.3f} "
                    f"Spearman {o['spearman']:.3f} AUROC(Dice<0.7) {o['auroc_failure']:.3f}")
            for name, c in result["combined"].items():
                ctx.say(f"{name} (g and second opinion): MAE {c['mae']:.4f} Pearson {c['pearson']:.3f} "
                        f"Spearman {c['spearman']:.3f} AUROC(Dice<0.7) {c['auroc_failure']:.3f}")
        _say_per_source(ctx, result.get("per_source", {}))
        ctx.say(f"written: {paths['metrics']}, {paths['rows']}, {paths['calibration']}")
        for name in ("mae", "pearson", "spearman", "auroc_failure"):
            if m[name] == m[name]:  # not NaN
                ctx.events.metric(name, m[name], split=group if group != "training" else "train")
        return paths

    return run_with_events(args, "quality evaluate", body)


def image_dependence_line(check: Dict[str, Any]) -> str:
    """The image-dependence check in words: g must lose most of its correlation with the true Dice
    when it sees a blacked-out image or another case's image instead of the right one."""
    verdict = "passes" if check["image_dependence_ok"] else "FAILS"
    shuffled = check["pearson_shuffled"]
    other = f", with another case's image {shuffled:.3f}" if shuffled is not None else ""
    return (f"image dependence check {verdict}: Pearson with the right image {check['pearson_real']:.3f}, "
            f"with a blacked-out image {check['pearson_black']:.3f}{other} (each must be at most "
            f"{1 - check['min_drop']:g} x the first: g must read the image, not only the mask)")


def _say_per_source(ctx, per_source: Dict[str, Dict[str, Dict]], most: int = 12) -> None:
    """One line per source of masks: does g rank the cases of one segmenter, not only segmenters?"""
    if not per_source or len(per_source) > most:
        return
    ctx.say("within each source of masks (segmenter folder or corruption category; Pearson here "
            "says whether g ranks the cases of one source):")
    for source, estimates in per_source.items():
        g = estimates["g"]
        line = f"  {source}: n={g['n']} MAE {g['mae']:.4f} Pearson {_pearson_text(g)}"
        if "second_opinion" in estimates:
            line += f"; second opinion Pearson {_pearson_text(estimates['second_opinion'])}"
        ctx.say(line)


def _pearson_text(metrics: Dict[str, Any]) -> str:
    return f"{metrics['pearson']:.3f}" if metrics["n"] >= 3 else "n/a (fewer than 3 masks)"


def run_score(args: argparse.Namespace) -> int:
    def body(ctx):
        from ..engine.cancel import CancelToken
        from ..engine.device import resolve_device
        from ..quality.predictor import load_predictors
        from ..quality.score import pairs_from_lists, read_pairs_csv, score_pairs

        if args.pairs and (args.images or args.masks):
            raise ConfigError("give either --pairs or --images/--masks, not both")
        if args.pairs:
            pairs = read_pairs_csv(args.pairs)
        elif args.images and args.masks:
            pairs = pairs_from_lists(args.images, args.masks)
        else:
            raise ConfigError("give the pairs to score: --images A.nrrd ... --masks A_mask.nrrd ... "
                              "or --pairs pairs.csv")
        device = resolve_device(args.device)
        model = load_predictors(args.checkpoint, device)
        second = _second_opinion(args.second_opinion)
        rows = score_pairs(model, pairs, device, output=args.output, events=ctx.events,
                           cancel=CancelToken(ctx.run_dir), second_opinion=second)
        if not args.json:
            for row in rows:
                agree = f"\tsecond opinion {row['second_opinion_dice']:.4f}" if second else ""
                ctx.say(f"{row['case']}\t{row['class_name']}\t{row['predicted_quality']:.4f}{agree}")
        return {"scores": args.output}

    return run_with_events(args, "quality score", body, default_run_dir=beside(args.output))


def beside(output: str) -> str:
    """The run folder of a command that writes one file: the file's folder, so its manifest.json
    says how the file was made."""
    return str(Path(output).resolve().parent)


def run_calibrate(args: argparse.Namespace) -> int:
    def body(ctx):
        from ..engine.device import resolve_device
        from ..quality.calibrate import calibrate_checkpoint

        result = calibrate_checkpoint(args.checkpoint, args.dataset, args.masks, args.output,
                                      group=args.group, device=resolve_device(args.device))
        shift = ", ".join(f"{v:+.4f}" for v in result["shift"])
        ctx.say(f"fitted on {result['n_masks']} masks: output shift {shift}; wrote {result['output']}")
        return {"output": Path(result["output"])}

    return run_with_events(args, "quality calibrate", body, default_run_dir=beside(args.output))


def run_ensemble(args: argparse.Namespace) -> int:
    def body(ctx):
        from ..quality.predictor import load_predictors, members_of, save_ensemble

        models = members_of(load_predictors(args.checkpoint))
        path = save_ensemble(args.output, models, sources=args.checkpoint)
        ctx.say(f"wrote {path}: the mean of {len(models)} quality predictors")
        return {"output": path}

    return run_with_events(args, "quality ensemble", body, default_run_dir=beside(args.output))
