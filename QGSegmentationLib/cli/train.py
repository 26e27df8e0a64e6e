"""`qgseg train`: train a segmenter (supervised by default; any SSL method with --method)."""

from __future__ import annotations

import argparse
from typing import Any, Dict

from .common import HelpFormatter, RunContext, add_run_options, command_line, run_with_events

EXAMPLES = """
examples:
  qgseg train --dataset Task02_Heart/dataset.json --run-dir runs/heart      # spacing and patch planned
  qgseg train --dataset Task02_Heart/dataset.json --spacing 1.25 1.25 1.25 --patch 32 64 64
  qgseg train --dataset data/dataset.json --mode 2d --patch 160 160 --network basicunet
  qgseg train --config bench/la_cpu.yaml --set lr=1e-3 --set ssl.ema_decay=0.99
  qgseg train --dataset data/dataset.json --set label_resampling=nearest
      # labels to the training grid by nearest neighbour, as before BENCHMARKS.md §15 (default: linear)
  qgseg train --dataset data/dataset.json --set loss=dice_ce_bg --set "clip_percentiles=[0, 100]"
      # MONAI's DiceCELoss (background in the Dice) and a z-score without percentile clipping
  qgseg train --dataset data/dataset.json --seeds 3 --iterations 2000 --run-dir runs/seg3
      # three 2000-iteration members (seeds 0, 1, 2) ensembled in checkpoints/best.pt and last.pt:
      # on LA on 2 CPU cores better than two 2800-iteration members in the same time (BENCHMARKS.md
      # §17 b, flips off); `qgseg predict --checkpoint runs/seg3/checkpoints/last.pt` uses all three

A crashed or cancelled run resumes from <run-dir>/checkpoints/last.pt when started again with the
same --run-dir. Create the file <run-dir>/CANCEL to stop a run cleanly (exit code 3).
"""

# CLI flag -> TrainConfig field; flags default to None so only what the user typed overrides
FLAG_FIELDS = {
    "dataset": "dataset", "mode": "mode", "network": "network", "batch": "batch_size", "unlabeled_batch": "unlabeled_batch_size",
    "iterations": "iterations", "val_every": "val_every", "lr": "lr", "optimizer": "optimizer",
    "seed": "seed", "method": "method", "quality_checkpoint": "quality_checkpoint",
    "cache_dir": "cache_dir", "threads": "num_threads", "normalization": "normalization",
    "n_validation": "n_validation", "iterations_per_epoch": "iterations_per_epoch",
}


def add_train_options(parser: argparse.ArgumentParser, with_method: bool = True,
                      default_method: str = "sup") -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="dataset.json (Decathlon / nnU-Net layout: training, unlabeled, "
                                        "optional validation/test)")
    data.add_argument("--mode", choices=["3d", "2d"], help="3D patches, or 2D slices along z [3d]")
    data.add_argument("--spacing", nargs="+", metavar="X Y Z",
                      help="resample to this voxel spacing in mm before training; 'keep' leaves each "
                           "volume's grid; 'auto' plans it from the data and the device (`qgseg plan` "
                           "shows the plan) [auto]")
    data.add_argument("--normalization", choices=["zscore", "percentile", "none"], help="[zscore]")
    data.add_argument("--n-validation", type=int, help="cases held out for validation when the dataset "
                                                       "has no validation list [2; 1 when only 2 are labeled]")
    data.add_argument("--cache-dir", help="keep decoded, preprocessed volumes here across runs")
    model = parser.add_argument_group("model and optimisation")
    model.add_argument("--network", help="segmentation network (see `qgseg networks`) [unet]")
    model.add_argument("--patch", nargs="+", metavar="N",
                       help="patch size: z y x in 3d mode, y x in 2d mode; 'auto' plans it from the data "
                            "and the device [auto]")
    model.add_argument("--batch", type=int, help="labeled patches per step [2]")
    model.add_argument("--unlabeled-batch", type=int, help="unlabeled patches per step [2]")
    model.add_argument("--iterations", type=int, help="optimizer steps in total [2000]")
    model.add_argument("--iterations-per-epoch", type=int, help="steps per 'epoch' for epoch-based schedules [50]")
    model.add_argument("--val-every", type=int, help="validate every N steps [200]")
    model.add_argument("--lr", type=float, help="learning rate [2e-3]")
    model.add_argument("--optimizer", choices=["adamw", "sgd"], help="[adamw]; sgd uses Nesterov momentum 0.99")
    model.add_argument("--seed", type=int, help="random seed [0]")
    model.add_argument("--seeds", type=int, default=1, metavar="N",
                       help="train N members (seeds --seed ... --seed+N-1, one after the other, each in "
                            "seed-<s>/) and write their ensemble as checkpoints/best.pt and last.pt; N times "
                            "the time (on LA three 2000-iteration members beat two of 2800 iterations, which "
                            "take as long, and one of 3600: BENCHMARKS.md §17 b)")
    model.add_argument("--threads", type=int, help="CPU threads for torch")
    if with_method:
        ssl = parser.add_argument_group("semi-supervised learning")
        ssl.add_argument("--method", help=f"training method (see `qgseg ssl methods`) [{default_method}]")
        ssl.add_argument("--guidance", default=None,
                         help="quality guidance: none, qar, qw or qar,qw (needs --quality-checkpoint)")
        ssl.add_argument("--quality-checkpoint", help="trained quality predictor (qgseg quality train)")
    cfg = parser.add_argument_group("configuration files")
    cfg.add_argument("--config", help="YAML or JSON file of TrainConfig options (CLI flags override it)")
    cfg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any option, e.g. --set lr=1e-3 --set ssl.qw_tau=0.6 (repeatable)")
    cfg.add_argument("--no-resume", action="store_true", help="start over even if the run folder has last.pt")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a segmenter on a dataset.json",
        description="Train a segmentation network on a dataset (supervised unless --method names an "
                    "SSL method). Writes checkpoints/best.pt (best validation Dice), checkpoints/last.pt, "
                    "training_curves.png, history.json and manifest.json into --run-dir.",
        epilog=EXAMPLES, formatter_class=HelpFormatter)
    add_train_options(parser)
    add_run_options(parser)
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    from ..engine.config import TrainConfig, apply_overrides, load_config_file

    data: Dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    for flag, field_name in FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data[field_name] = value
    if getattr(args, "spacing", None) is not None:
        data["target_spacing"] = spacing_option(args.spacing)
    if getattr(args, "patch", None) is not None:
        data["patch_size"] = patch_option(args.patch)
    if getattr(args, "device", None):
        data["device"] = args.device
    guidance = getattr(args, "guidance", None)
    if guidance is not None:
        parts = {p.strip().lower() for p in guidance.split(",") if p.strip()} - {"none"}
        unknown = parts - {"qar", "qw"}
        if unknown:
            from ..errors import ConfigError

            raise ConfigError(f"--guidance: unknown value(s) {', '.join(sorted(unknown))}; use qar, qw or qar,qw")
        ssl = dict(data.get("ssl") or {})
        ssl["guidance_qar"], ssl["guidance_qw"] = "qar" in parts, "qw" in parts
        data["ssl"] = ssl
    data = apply_overrides(data, getattr(args, "set", []))
    return TrainConfig.from_dict(data, source=args.config or "options")


def spacing_option(values):
    """--spacing: 'auto', 'keep' (None) or three numbers in mm (x y z)."""
    from ..errors import ConfigError

    if len(values) == 1 and values[0].lower() in ("auto", "keep"):
        return None if values[0].lower() == "keep" else "auto"
    try:
        spacing = [float(v) for v in values]
    except ValueError:
        spacing = []
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ConfigError(f"--spacing {' '.join(values)}: give three positive numbers in mm (x y z), auto or keep")
    return spacing


def patch_option(values):
    """--patch: 'auto' or whole numbers (z y x in 3d mode, y x in 2d mode)."""
    from ..errors import ConfigError

    if len(values) == 1 and values[0].lower() == "auto":
        return "auto"
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ConfigError(f"--patch {' '.join(values)}: give whole numbers (z y x, or y x in 2d) or auto") from None


def train_body(args: argparse.Namespace, ctx: RunContext) -> Dict[str, Any]:
    from ..engine.manifest import recorded_run

    from ..engine.config import check_guidance_has_predictor

    cfg = build_config(args)
    check_guidance_has_predictor(cfg)  # before the run folder fills: a refused run leaves nothing
    if cfg.quality_checkpoint and not (cfg.ssl.get("guidance_qar") or cfg.ssl.get("guidance_qw")):
        ctx.events.warning(f"--quality-checkpoint {cfg.quality_checkpoint} is not used: quality guidance is "
                           "off (add --guidance qar, qw or qar,qw to train with it)")
    train = _train_one if args.seeds == 1 else _train_members
    with recorded_run(ctx.run_dir, command=command_line(args), config=cfg, device=cfg.device,
                      seed=cfg.seed, started=ctx.started, extra={"seeds": args.seeds} if args.seeds != 1 else None,
                      enabled=ctx.is_main) as run:  # under torchrun only rank 0 writes run files
        return train(args, ctx, cfg, run)


def _train_one(args: argparse.Namespace, ctx: RunContext, cfg, run: Dict[str, Any]) -> Dict[str, Any]:
    from ..engine.trainer import Trainer
    from ..fileio import write_json_atomic

    trainer = Trainer(cfg, ctx.run_dir, events=ctx.events, progress_bar=ctx.show_progress,
                      resume=not args.no_resume, say=ctx.say)
    run["device"] = trainer.device
    result = trainer.fit()
    if ctx.is_main:
        write_json_atomic(ctx.run_dir / "history.json", result.history)
    ctx.say(f"best validation Dice {result.best_metric:.4f} at iteration {result.best_iteration}; "
            f"{result.wall_time_s / 60:.1f} min")
    ctx.say(f"checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")
    return {"best_checkpoint": result.best_checkpoint, "last_checkpoint": result.last_checkpoint,
            "run_dir": ctx.run_dir}


def _train_members(args: argparse.Namespace, ctx: RunContext, cfg, run: Dict[str, Any]) -> Dict[str, Any]:
    from ..engine import distributed
    from ..engine.seed_ensemble import member_seeds, train_seed_ensemble
    from ..errors import ConfigError

    member_seeds(cfg.seed, args.seeds)  # a bad --seeds fails before anything runs
    if distributed.launch_env().distributed:
        raise ConfigError("--seeds trains its members one after the other in one process: run it without torchrun")
    result = train_seed_ensemble(cfg, args.seeds, ctx.run_dir, events=ctx.events, progress_bar=ctx.show_progress,
                                 resume=not args.no_resume, say=ctx.say, command=command_line(args))
    for member in result["members"]:
        ctx.say(f"seed {member['seed']}: best validation Dice {member['best_metric']:.4f} at iteration "
                f"{member['best_iteration']}; {member['wall_time_s'] / 60:.1f} min")
    ctx.say(f"ensemble of {args.seeds} seeds: {result['best_checkpoint']} (best weights), "
            f"{result['last_checkpoint']} (last)")
    return {"best_checkpoint": result["best_checkpoint"], "last_checkpoint": result["last_checkpoint"],
            "run_dir": ctx.run_dir}


def run(args: argparse.Namespace) -> int:
    return run_with_events(args, "train", lambda ctx: train_body(args, ctx))
