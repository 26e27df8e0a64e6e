"""Five-fold cross-validation of issue 2's recipe on the 80 LA development volumes (BENCHMARKS.md §12).

One fixed test split (§1) says little when two of its 16 volumes decide the verdict (§1c: a
dark-blood scan and a partial reference). Here every LA volume is a test case exactly once: fold K
of `make_la_split.py --fold K` tests 16 volumes and trains on 16 others (4 more select the
checkpoint), so the five folds give five independent "16 other LA volumes" measurements of the
same recipe and its spread. Per fold:

  pipeline   `qgseg train` with the planned defaults (§11: the §1c command without --spacing and
             --patch), seed 0; its best-on-validation checkpoint segments the fold's 4 validation
             and 16 test volumes (mirrored, the default) and `qgseg evaluate` scores them
  minimal    the issue's minimal MONAI script (bench/minimal_monai_baseline.py, 5 minutes, seed 0)
             on the same fold, scored the same way; needs `pip install pynrrd` for MONAI's NRRD reader

    python bench/la_crossval.py --out runs/la_cv                   # all five folds: ~75 min on 2 cores
    python bench/la_crossval.py --out runs/la_cv --folds 1 2       # some folds
    python bench/la_crossval.py --out runs/la_cv --no-minimal      # the pipeline only
    python bench/la_crossval.py --out runs/la_cv --recipe noflip --validation-only   # a candidate recipe,
                                                                   # on the validation volumes only
    python bench/la_crossval.py --out runs/la_cv --recipe noaug --selection-only   # on each fold's 48
                                                                   # selection volumes (§13)
    python bench/la_crossval.py --out runs/la_cv --recipe noaug --selection-only --weights last
                                                                   # the same with the last weights (§14)
    python bench/la_crossval.py --out runs/la_cv --list            # the commands, nothing run
    python bench/la_crossval.py --out runs/la_cv --report          # crossval.md/json from what is there

Each step is skipped when its output exists, and an interrupted training resumes from its last
checkpoint when the same command runs again. crossval.md and crossval.json in --out hold the
table; run it on otherwise idle cores, since the 15-minute budget and the minimal script's
5 minutes are wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the library of this checkout, installed or not
from la_rebuild_models import (AUGMENTATION, DONE, UNET, git_commit, machine, per_case_dice,  # noqa: E402
                               qgseg, read_checkpoint, run_batch)

from QGSegmentationLib.fileio import write_json_atomic  # noqa: E402

FOLDS = 5
BAR = 0.86           # issue 2: Dice >= 0.86 ...
BUDGET_S = 15 * 60   # ... within 15 minutes of training on 2 cores
# nearest-neighbour labels, the default when §12-§15 ran (LINEAR_LABELS, later on the line, overrides it)
COMMON = ["--batch", "2", "--iterations", "3600", "--val-every", "400", "--cache-dir", "../cache", "--threads", "2",
          "--seed", "0", "--set", "label_resampling=nearest"]
NO_FLIPS = ["--set", "augmentation={flip_prob: 0.0, gamma_prob: 0.3, gamma_invert_prob: 0.1, contrast_prob: 0.15, "
                     "scale_range: [0.75, 1.25]}"]
NO_AUGMENTATION = ["--set", "augment=false"]
# the minimal MONAI script's remaining choices (§13): its patch (x y z 64×64×32 is z y x 32 64 64),
# a constant AdamW learning rate of 1e-3 with torch's default weight decay and no gradient clipping,
# and patch centres half on foreground (RandCropByPosNegLabeld pos=1, neg=1)
MINIMAL_CHOICES = ["--patch", "32", "64", "64", "--lr", "1e-3", "--set", "schedule=constant",
                   "--set", "weight_decay=0.01", "--set", "grad_clip=0", "--set", "fg_ratio=0.5"]
# the library internals the minimal script does differently (§14): MONAI's DiceCELoss (CE + Dice of
# both channels, background included) and a z-score over the whole, unclipped volume
SCRIPT_LOSS = ["--set", "loss=dice_ce_bg"]
NO_CLIPPING = ["--set", "clip_percentiles=[0, 100]"]
# labels brought to 1.25 mm by per-label linear interpolation instead of nearest neighbour (§14 D)
LINEAR_LABELS = ["--set", "label_resampling=linear"]
# a second seed (§15); the last --seed wins over COMMON's
SEED_1 = ["--seed", "1"]
# a shorter schedule, so that two trainings fit the 15-minute budget together (§16)
SHORT = ["--iterations", "2800", "--val-every", "700"]
# foreground-centred patches exactly on their voxel, as the minimal script's crops (§17)
CENTRED = ["--set", "center_jitter=0"]
# three trainings inside the budget together (§17 b)
SHORTER = ["--iterations", "2000", "--val-every", "500"]
SELECTION = "data/selection.json"  # a fold's validation and unused volumes, listed as "test" (§13)


@dataclass(frozen=True)
class Recipe:
    """A training recipe: what `qgseg train` adds to COMMON and whether `qgseg predict` mirrors.
    A recipe with `members` trains nothing of its own: it trains each member recipe in the member's
    folder and segments with their ensemble (softmaxes averaged; §16)."""

    folder: str
    train: Tuple[str, ...]
    mirror: bool
    description: str
    members: Tuple[str, ...] = ()


def seeded_ensemble(base: str, train: Tuple[str, ...], seeds: Tuple[int, ...], description: str,
                    ensemble: str, ensemble_description: str) -> Dict[str, "Recipe"]:
    """One recipe trained once per seed, and the ensemble recipe that segments with all of them.
    Seed 0 is COMMON's and keeps the name `base`; seed s trains as `base`_seed`s` with `--seed s` last."""
    names = tuple(base if seed == 0 else f"{base}_seed{seed}" for seed in seeds)
    recipes = {name: Recipe(name, (*train, *(("--seed", str(seed)) if seed else ())), False,
                            description if seed == 0 else f"{base} trained with seed {seed}")
               for name, seed in zip(names, seeds)}
    recipes[ensemble] = Recipe(ensemble, (), False, ensemble_description, members=names)
    return recipes


#: "planned" is §11's recipe, the one the §12 plan judges; the others are candidates compared with it
#: on the folds' validation volumes only (§12).
RECIPES = {
    "planned": Recipe("pipeline", (*UNET[:2], *AUGMENTATION), True,
                      "§11: planned defaults, 16-128 UNet, §1c augmentation with flips, mirrored"),
    "noflip": Recipe("noflip", (*UNET[:2], *NO_FLIPS), False,
                     "as planned, without flips in training or mirroring at test time"),
    "unet5": Recipe("unet5", tuple(AUGMENTATION), True,
                    "as planned with the project's default UNet (16-256, five levels)"),
    "unet5_noflip": Recipe("unet5_noflip", tuple(NO_FLIPS), False,
                           "the default UNet (16-256), without flips or mirroring"),
    "minimal_like": Recipe("minimal_like", (*MINIMAL_CHOICES, *NO_AUGMENTATION), False,
                           "every choice of the minimal MONAI script (default UNet, 32×64×64, no augmentation, "
                           "constant lr 1e-3, 1:1 patch centres), trained and selected by the pipeline"),
    "noaug": Recipe("noaug", tuple(NO_AUGMENTATION), False,
                    "unet5_noflip without any augmentation (no intensity scale, shift, noise, gamma or contrast)"),
    "script_internals": Recipe("script_internals", (*MINIMAL_CHOICES, *NO_AUGMENTATION, *SCRIPT_LOSS, *NO_CLIPPING),
                               False, "minimal_like with the script's loss (MONAI DiceCELoss, background "
                                      "included) and an unclipped z-score (§14)"),
    "unet5_noflip_linear": Recipe("unet5_noflip_linear", (*NO_FLIPS, *LINEAR_LABELS), False,
                                  "unet5_noflip with labels resampled per label linearly, not by nearest "
                                  "neighbour (§14 D)"),
    "script_loss": Recipe("script_loss", (*MINIMAL_CHOICES, *NO_AUGMENTATION, *SCRIPT_LOSS), False,
                          "minimal_like with the script's loss (MONAI DiceCELoss, background included) only (§14)"),
    "unet5_noflip_seed1": Recipe("unet5_noflip_seed1", (*NO_FLIPS, *SEED_1), False,
                                 "unet5_noflip trained with seed 1 instead of 0 (§15)"),
    "unet5_noflip_linear_seed1": Recipe("unet5_noflip_linear_seed1", (*NO_FLIPS, *LINEAR_LABELS, *SEED_1), False,
                                        "unet5_noflip_linear trained with seed 1 instead of 0 (§15)"),
    **seeded_ensemble("unet5_noflip_linear_short", (*NO_FLIPS, *LINEAR_LABELS, *SHORT), (0, 1),
                      "unet5_noflip_linear with 2800 iterations, validation every 700 (§16)",
                      "unet5_noflip_linear_pair", "the ensemble of unet5_noflip_linear_short with seeds 0 and 1: "
                                                  "two trainings inside the budget together (§16)"),
    **seeded_ensemble("unet5_noflip_linear_centred_short", (*NO_FLIPS, *LINEAR_LABELS, *SHORT, *CENTRED), (0, 1),
                      "unet5_noflip_linear_short with foreground-centred patches not jittered (§17)",
                      "unet5_noflip_linear_centred_pair", "unet5_noflip_linear_pair with foreground-centred "
                                                          "patches not jittered (§17)"),
    **seeded_ensemble("unet5_noflip_linear_2k", (*NO_FLIPS, *LINEAR_LABELS, *SHORTER), (0, 1, 2),
                      "unet5_noflip_linear with 2000 iterations, validation every 500 (§17 b)",
                      "unet5_noflip_linear_triple", "the ensemble of unet5_noflip_linear_2k with seeds 0, 1 and 2: "
                                                    "three trainings inside the budget together (§17 b)"),
}
#: which checkpoint segments: the best on the validation volumes, or the last weights (§14), and
#: the suffix of its pred_/eval_ folders
WEIGHTS = {"best": "", "last": "_last"}
SPLITS = ("validation", "selection", "test")


def trained_recipes(recipe: str) -> Tuple[str, ...]:
    """The recipes whose trainings `recipe` segments with: its members, or itself."""
    return RECIPES[recipe].members or (recipe,)


def write_selection(folder: Path) -> Path:
    """`SELECTION` in a fold's folder: the fold's validation volumes and its unlabeled ones (volumes
    no supervised recipe trains on), with their labels, as the "test" list of a dataset.json, so that
    `qgseg predict/evaluate --split test` score them. The fold's own test volumes are not in it; its
    training list is kept because a dataset.json without labeled cases is refused."""
    spec = json.loads((folder / "data" / "dataset.json").read_text())
    unused = [{"image": image, "label": image.replace("imagesTr/", "labelsTr/", 1)} for image in spec["unlabeled"]]
    for case in unused:
        if not (folder / "data" / case["label"]).exists():
            raise FileNotFoundError(f"{folder / 'data' / case['label']}: no label for selection volume {case['image']}")
    selection = {"name": f"{spec['name']}: selection volumes", "labels": spec["labels"],
                 "training": spec["training"], "test": spec["validation"] + unused}
    return write_json_atomic(folder / SELECTION, selection)


def fold_steps(fold: int, la: Path, minimal: bool, recipe: str = "planned",
               splits: Tuple[str, ...] = ("validation", "test"), weights: str = "best") -> List[Dict]:
    """The steps of one fold, each run in the fold's folder: a command (or a Python `call`) and the
    file that marks it done. `splits` without "test" leaves the test volumes alone: a candidate recipe
    is compared on the validation volumes, or on the larger selection set (§13), only. `weights`
    "last" segments with the last weights instead of the best checkpoint, into pred_<split>_last."""
    step = lambda name, command, done: {"group": f"fold{fold}", "name": f"fold {fold}: {name}",  # noqa: E731
                                        "command": command, "done": f"fold{fold}/{done}", "threads": 2}
    data, r, suffix = "data/dataset.json", RECIPES[recipe], WEIGHTS[weights]
    run = r.folder
    trained = trained_recipes(recipe)
    steps = [step("split", [sys.executable, str(HERE / "make_la_split.py"), "--la", str(la), "--out", "data",
                            "--labeled", "16", "--fold", str(fold)], data)]
    steps += [step(f"train ({name})", qgseg("train", "--dataset", data, *COMMON, *RECIPES[name].train,
                                           "--run-dir", RECIPES[name].folder), f"{RECIPES[name].folder}/{DONE}")
              for name in trained]
    checkpoints = [f"{RECIPES[name].folder}/checkpoints/{weights}.pt" for name in trained]
    if "selection" in splits:
        steps.append(dict(step("list the selection volumes", None, SELECTION), call=write_selection))
    for split in splits:
        source, listed = (SELECTION, "test") if split == "selection" else (data, split)
        pred, scored = f"{run}/pred_{split}{suffix}", f"{run}/eval_{split}{suffix}"
        steps += [step(f"segment the {split} cases ({recipe}, {weights} weights)",
                       qgseg("predict", "--checkpoint", *checkpoints, "--input", source,
                             "--split", listed, "--mirror" if r.mirror else "--no-mirror", "--output", pred),
                       f"{pred}/{DONE}"),
                  step(f"evaluate the {split} cases ({recipe}, {weights} weights)",
                       qgseg("evaluate", "--predictions", pred, "--dataset", source, "--split",
                             listed, "--run-dir", scored),
                       f"{scored}/metrics.csv")]
    if minimal:
        steps += [step("minimal MONAI script (5 min + inference)",
                       [sys.executable, str(HERE / "minimal_monai_baseline.py"), "--dataset", data, "--minutes", "5",
                        "--seed", "0", "--out", "minimal"], "minimal/run.json"),
                  step("evaluate the minimal script", qgseg("evaluate", "--predictions", "minimal/pred", "--dataset",
                                                            data, "--split", "test", "--run-dir", "minimal/eval_test"),
                       "minimal/eval_test/metrics.csv")]
    return steps


def run_fold(steps: List[Dict], out: Path) -> None:
    for step in steps:
        folder = out / step["group"]
        folder.mkdir(parents=True, exist_ok=True)
        relative = dict(step, done=step["done"].split("/", 1)[1])
        if "call" in step:
            if not (folder / relative["done"]).exists():
                print(f"[done] {step['name']}: {step['call'](folder)}", flush=True)
            continue
        seconds = run_batch([relative], folder)
        if seconds:
            print(f"[done] {step['name']} in {seconds:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------
# the report

def dice_summary(eval_dir: Path) -> Optional[Dict]:
    """Mean, std and median Dice, HD95 and the worst case of a `qgseg evaluate` folder; None if absent."""
    if not (eval_dir / "metrics.csv").is_file():
        return None
    summary = json.loads((eval_dir / "summary.json").read_text())["summary"]
    cases = per_case_dice(eval_dir / "metrics.csv")
    worst = min(cases, key=cases.get)
    return {"dice": summary["dice"]["mean"], "dice_std": summary["dice"]["std"],
            "dice_median": summary["dice"]["median"], "hd95": summary["hd95"]["mean"],
            "cases": len(cases), "worst_case": worst, "worst_dice": cases[worst], "per_case": cases}


def fold_result(folder: Path, recipe: str = "planned", weights: str = "best") -> Dict:
    """What one fold's folder holds for a recipe: the training's plan, time and selection, and the
    evaluations by `weights` (the minimal script's beside them); "selection_last" is always the
    last weights' selection evaluation, a candidate of its own (§14)."""
    run, suffix = folder / RECIPES[recipe].folder, WEIGHTS[weights]
    result: Dict = {split: dice_summary(run / f"eval_{split}{suffix}") for split in SPLITS}
    result["selection_last"] = dice_summary(run / "eval_selection_last")
    result["minimal"] = dice_summary(folder / "minimal" / "eval_test")
    trainings = [training_summary(folder / RECIPES[name].folder) for name in trained_recipes(recipe)]
    if all(trainings):
        result["train"] = trainings[0] if len(trainings) == 1 else combined_trainings(trainings)
    if (folder / "minimal" / "run.json").is_file():
        result["minimal_run"] = json.loads((folder / "minimal" / "run.json").read_text())
    return result


def training_summary(run: Path) -> Optional[Dict]:
    """A finished training's wall time, plan and best checkpoint (None while it is not done)."""
    if not ((run / "manifest.json").is_file() and (run / DONE).exists()):
        return None
    manifest = json.loads((run / "manifest.json").read_text())
    used = manifest.get("config", {})  # what trained: the plan, or what --patch / --spacing set instead
    state = read_checkpoint(run / "checkpoints" / "best.pt")
    return {"wall_s": manifest.get("wall_time_s"), "spacing": used.get("target_spacing"),
            "patch": used.get("patch_size"), "best_iteration": state["best_iteration"],
            "best_val_dice": state["best_metric"]}


def combined_trainings(trainings: List[Dict]) -> Dict:
    """An ensemble's trainings as one: their wall times add up against the budget (§16)."""
    return dict(trainings[0], wall_s=sum(t["wall_s"] for t in trainings),
                best_iteration="+".join(str(t["best_iteration"]) for t in trainings),
                best_val_dice=float(np.mean([t["best_val_dice"] for t in trainings])))


def summarize(folds: Dict[int, Dict]) -> Dict:
    """Across the folds whose test cases were scored: the mean and sample std of the fold means, the
    pooled mean over every tested volume, and how many folds meet the bar and beat the minimal script."""
    done = {k: f for k, f in folds.items() if f["test"]}
    means = [f["test"]["dice"] for f in done.values()]
    pooled = [d for f in done.values() for d in f["test"]["per_case"].values()]
    paired = [(f["test"]["dice"], f["minimal"]["dice"]) for f in done.values() if f["minimal"]]
    walls = [f["train"]["wall_s"] for f in done.values() if f.get("train")]
    return {"folds": sorted(done), "fold_mean": float(np.mean(means)) if means else None,
            "fold_std": float(np.std(means, ddof=1)) if len(means) > 1 else None,
            "pooled_mean": float(np.mean(pooled)) if pooled else None, "pooled_cases": len(pooled),
            "folds_at_bar": sum(m >= BAR for m in means),
            "minimal_fold_mean": float(np.mean([m for _, m in paired])) if paired else None,
            "folds_beating_minimal": sum(p > m for p, m in paired), "paired_folds": len(paired),
            "max_train_s": max(walls) if walls else None, "bar": BAR, "budget_s": BUDGET_S}


def fmt(value, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def report_markdown(result: Dict) -> str:
    recipe = result.get("recipe", "planned")
    weights = result.get("weights", "best")
    lines = [f"# LA five-fold cross-validation: {recipe}, {weights} weights ({result['machine']['date']}, commit "
             f"{result['machine']['commit']})", "", RECIPES[recipe].description, "",
             "| fold | plan (mm; patch) | train s | best it (val Dice) | validation Dice | test Dice ± std (median) "
             "| test HD95 mm | worst test case | minimal script test Dice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fold, f in sorted(result["folds"].items(), key=lambda item: int(item[0])):
        t, v, m, tr = f["test"], f["validation"], f["minimal"], f.get("train")
        plan = (f"{tr['spacing'][0]:g}; {'×'.join(map(str, tr['patch']))}" if tr and tr["spacing"] else "—")
        lines.append(" | ".join([
            f"| {fold}", plan, fmt(tr and tr["wall_s"], ".0f"),
            f"{tr['best_iteration']} ({tr['best_val_dice']:.4f})" if tr else "—", fmt(v and v["dice"]),
            f"{t['dice']:.4f} ± {t['dice_std']:.4f} ({t['dice_median']:.4f})" if t else "—",
            fmt(t and t["hd95"], ".2f"), f"{t['worst_case']} {t['worst_dice']:.3f}" if t else "—",
            fmt(m and m["dice"])]) + " |")
    s = result["summary"]
    lines += ["", f"- Folds scored: {len(s['folds'])} of {FOLDS}; mean of the fold means "
                  f"{fmt(s['fold_mean'])} (sample std {fmt(s['fold_std'])}); pooled over the "
                  f"{s['pooled_cases']} tested volumes {fmt(s['pooled_mean'])}.",
              f"- Folds with test Dice ≥ {BAR}: {s['folds_at_bar']} of {len(s['folds'])}; longest training "
              f"{fmt(s['max_train_s'], '.0f')} s (budget {BUDGET_S} s).",
              f"- Minimal MONAI script: mean of its fold means {fmt(s['minimal_fold_mean'])}; the pipeline is higher "
              f"in {s['folds_beating_minimal']} of {s['paired_folds']} folds."]
    return "\n".join(lines) + "\n"


def validation_by_recipe(folds: Dict[int, Dict[str, Dict]]) -> str:
    """Every recipe's validation Dice per fold, the mean over the folds where all ran, and each
    recipe's mean paired difference from "planned": the table candidates are chosen by (§12)."""
    recipes = [r for r in RECIPES if any(f.get(r, {}).get("validation") for f in folds.values())]
    complete = [k for k, f in folds.items() if all(f.get(r, {}).get("validation") for r in recipes)]
    value = lambda k, r: folds[k][r]["validation"]["dice"]  # noqa: E731
    lines = ["| recipe | " + " | ".join(f"fold {k}" for k in folds) + " | mean (folds where all ran) "
             "| minus planned, mean ± std |", "|---" * (len(folds) + 3) + "|"]
    for r in recipes:
        cells = [fmt(folds[k].get(r, {}).get("validation") and value(k, r)) for k in folds]
        mean = np.mean([value(k, r) for k in complete]) if complete else None
        diffs = [value(k, r) - value(k, "planned") for k in complete] if "planned" in recipes else []
        diff = (f"{np.mean(diffs):+.4f} ± {np.std(diffs, ddof=1):.4f}" if len(diffs) > 1 and r != "planned" else "—")
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {fmt(mean)} | {diff} |")
    return "\n".join(lines) + "\n"


def selection_by_recipe(folds: Dict[int, Dict[str, Dict]],
                        reference: Optional[Dict[int, Optional[Dict]]] = None) -> str:
    """Every candidate's mean Dice over each fold's selection volumes, the mean over all of them in
    the folds where every candidate ran (the §13 and §14 rules adopt the highest), and, per fold,
    which candidate its own selection volumes would choose (the nested choice, reported beside the
    rule's). A candidate is a recipe with its best checkpoint ("noflip") or its last weights
    ("noflip, last", §14). `reference` (the minimal script's evaluation per fold, §13 addendum) is a
    line of its own, never chosen."""
    dices = lambda summary: list(summary["per_case"].values()) if summary else None  # noqa: E731
    rows = {name: {k: dices(f.get(r, {}).get(key)) for k, f in folds.items()}
            for r in RECIPES for name, key in ((r, "selection"), (f"{r}, last", "selection_last"))}
    rows = {r: row for r, row in rows.items() if any(row.values())}
    candidates = list(rows)
    complete = [k for k in folds if all(row[k] for row in rows.values())]
    if reference and any(reference.values()):
        rows["*minimal script (reference)*"] = {k: dices(reference.get(k)) for k in folds}
    lines = ["| recipe | " + " | ".join(f"fold {k}" for k in folds) + " | all selection volumes "
             "(folds where all ran) | segmentations |", "|---" * (len(folds) + 3) + "|"]
    for name, row in rows.items():
        cells = [fmt(row[k] and float(np.mean(row[k]))) for k in folds]
        pooled = [d for k in complete if row[k] for d in row[k]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(pooled and float(np.mean(pooled)))} "
                     f"| {len(pooled)} |")
    choice = [max(candidates, key=lambda r: np.mean(rows[r][k])) if candidates and k in complete else "—"
              for k in folds]
    lines.append("| *this fold's choice* | " + " | ".join(choice) + " | | |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, recipe: str = "planned", weights: str = "best") -> Dict:
    """crossval.md/.json for the planned recipe (crossval-<recipe>.* for another, with "_last" when
    its last weights segmented), and validation.md and selection.md: every recipe's validation and
    selection Dice side by side."""
    folders = {k: out / f"fold{k}" for k in range(FOLDS) if (out / f"fold{k}").is_dir()}
    folds = {k: fold_result(folder, recipe, weights) for k, folder in folders.items()}
    result = {"machine": machine(), "recipe": recipe, "weights": weights, "folds": folds, "summary": summarize(folds)}
    name = ("crossval" if recipe == "planned" else f"crossval-{recipe}") + WEIGHTS[weights]
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(report_markdown(json.loads(json.dumps(result))))
    by_recipe = {k: {r: fold_result(folder, r) for r in RECIPES} for k, folder in folders.items()}
    (out / "validation.md").write_text(validation_by_recipe(by_recipe))
    reference = {k: dice_summary(folder / "minimal_selection" / "eval_selection") for k, folder in folders.items()}
    (out / "selection.md").write_text(selection_by_recipe(by_recipe, reference))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the folds and the report")
    parser.add_argument("--la", type=Path, default=HERE.parent.parent / "shared" / "data" / "LA",
                        help="the 80 development volumes (default: ../shared/data/LA)")
    parser.add_argument("--folds", type=int, nargs="+", choices=range(FOLDS), default=list(range(FOLDS)))
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="planned",
                        help="the training recipe (default: planned, the one §12's plan judges)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--validation-only", action="store_true",
                      help="train and score the validation volumes only: compare a candidate recipe "
                           "without looking at the test volumes")
    only.add_argument("--selection-only", action="store_true",
                      help="train and score each fold's selection volumes only (its 4 validation and 44 "
                           "unlabeled volumes, never its test volumes; §13)")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="best",
                        help="segment with the best checkpoint (default) or the last weights (§14: "
                             "pred_<split>_last, eval_<split>_last)")
    parser.add_argument("--no-minimal", action="store_true", help="skip the minimal MONAI script")
    parser.add_argument("--list", action="store_true", help="print the commands and stop")
    parser.add_argument("--report", action="store_true", help="only write the report from what is there")
    args = parser.parse_args()

    out, la = args.out.resolve(), args.la.resolve()
    only = ("validation",) if args.validation_only else ("selection",) if args.selection_only else ()
    minimal = not (args.no_minimal or only)
    splits = only or ("validation", "test")
    steps = {fold: fold_steps(fold, la, minimal, args.recipe, splits, args.weights) for fold in args.folds}
    if args.list:
        import shlex

        for fold_plan in steps.values():
            for step in fold_plan:
                command = step["command"] and shlex.join(step["command"])
                print(f"# {step['name']} (in {step['group']}/)\n{command or 'writes ' + step['done']}")
        return
    if not args.report:
        if minimal:
            try:
                import nrrd  # noqa: F401  (MONAI's NRRD reader, used by the minimal script only)
            except ImportError:
                sys.exit("the minimal MONAI script reads NRRD through pynrrd: `pip install pynrrd`, "
                         "or pass --no-minimal")
        out.mkdir(parents=True, exist_ok=True)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
        for fold in args.folds:
            run_fold(steps[fold], out)
            write_report(out, args.recipe, args.weights)
    result = write_report(out, args.recipe, args.weights)
    print(report_markdown(json.loads(json.dumps(result))))
    print((out / "validation.md").read_text())
    print((out / "selection.md").read_text())
    print(f"reports in {out} (crossval*.md/json, validation.md, selection.md); commit {git_commit()}")


if __name__ == "__main__":
    main()
