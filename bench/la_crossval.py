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
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the library of this checkout, installed or not
from la_rebuild_models import (AUGMENTATION, DONE, UNET, git_commit, machine, per_case_dice,  # noqa: E402
                               qgseg, read_checkpoint, run_batch)

FOLDS = 5
BAR = 0.86           # issue 2: Dice >= 0.86 ...
BUDGET_S = 15 * 60   # ... within 15 minutes of training on 2 cores
PIPELINE = ["--batch", "2", "--iterations", "3600", "--val-every", "400", "--cache-dir", "../cache",
            *UNET, *AUGMENTATION, "--seed", "0"]


def fold_steps(fold: int, la: Path, minimal: bool) -> List[Dict]:
    """The steps of one fold, each run in the fold's folder: a command and the file that marks it done."""
    step = lambda name, command, done: {"group": f"fold{fold}", "name": f"fold {fold}: {name}",  # noqa: E731
                                        "command": command, "done": f"fold{fold}/{done}", "threads": 2}
    data = "data/dataset.json"
    steps = [step("split", [sys.executable, str(HERE / "make_la_split.py"), "--la", str(la), "--out", "data",
                            "--labeled", "16", "--fold", str(fold)], data),
             step("train the pipeline", qgseg("train", "--dataset", data, *PIPELINE, "--run-dir", "pipeline"),
                  f"pipeline/{DONE}")]
    for split in ("validation", "test"):
        steps += [step(f"segment the {split} cases", qgseg("predict", "--checkpoint", "pipeline/checkpoints/best.pt",
                                                          "--input", data, "--split", split,
                                                          "--output", f"pipeline/pred_{split}"),
                       f"pipeline/pred_{split}/{DONE}"),
                  step(f"evaluate the {split} cases", qgseg("evaluate", "--predictions", f"pipeline/pred_{split}",
                                                           "--dataset", data, "--split", split,
                                                           "--run-dir", f"pipeline/eval_{split}"),
                       f"pipeline/eval_{split}/metrics.csv")]
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


def fold_result(folder: Path) -> Dict:
    """What one fold's folder holds: the training's plan, time and selection, and the evaluations."""
    run = folder / "pipeline"
    result: Dict = {"test": dice_summary(run / "eval_test"), "validation": dice_summary(run / "eval_validation"),
                    "minimal": dice_summary(folder / "minimal" / "eval_test")}
    if (run / "manifest.json").is_file() and (run / DONE).exists():
        plan = json.loads((run / "plan.json").read_text()) if (run / "plan.json").is_file() else {}
        state = read_checkpoint(run / "checkpoints" / "best.pt")
        result["train"] = {"wall_s": json.loads((run / "manifest.json").read_text()).get("wall_time_s"),
                           "spacing": plan.get("target_spacing"), "patch": plan.get("patch_size"),
                           "best_iteration": state["best_iteration"], "best_val_dice": state["best_metric"]}
    if (folder / "minimal" / "run.json").is_file():
        result["minimal_run"] = json.loads((folder / "minimal" / "run.json").read_text())
    return result


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


def report_markdown(result: Dict) -> str:
    fmt = lambda v, spec=".4f": "—" if v is None else format(v, spec)  # noqa: E731
    lines = [f"# LA five-fold cross-validation ({result['machine']['date']}, commit {result['machine']['commit']})", "",
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


def write_report(out: Path) -> Dict:
    folds = {k: fold_result(out / f"fold{k}") for k in range(FOLDS) if (out / f"fold{k}").is_dir()}
    result = {"machine": machine(), "folds": folds, "summary": summarize(folds)}
    (out / "crossval.json").write_text(json.dumps(result, indent=1))
    (out / "crossval.md").write_text(report_markdown(json.loads(json.dumps(result))))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the folds and the report")
    parser.add_argument("--la", type=Path, default=HERE.parent.parent / "shared" / "data" / "LA",
                        help="the 80 development volumes (default: ../shared/data/LA)")
    parser.add_argument("--folds", type=int, nargs="+", choices=range(FOLDS), default=list(range(FOLDS)))
    parser.add_argument("--no-minimal", action="store_true", help="skip the minimal MONAI script")
    parser.add_argument("--list", action="store_true", help="print the commands and stop")
    parser.add_argument("--report", action="store_true", help="only write the report from what is there")
    args = parser.parse_args()

    out, la = args.out.resolve(), args.la.resolve()
    steps = {fold: fold_steps(fold, la, not args.no_minimal) for fold in args.folds}
    if args.list:
        import shlex

        for fold_plan in steps.values():
            for step in fold_plan:
                print(f"# {step['name']} (in {step['group']}/)\n{shlex.join(step['command'])}")
        return
    if not args.report:
        if not args.no_minimal:
            try:
                import nrrd  # noqa: F401  (MONAI's NRRD reader, used by the minimal script only)
            except ImportError:
                sys.exit("the minimal MONAI script reads NRRD through pynrrd: `pip install pynrrd`, "
                         "or pass --no-minimal")
        out.mkdir(parents=True, exist_ok=True)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
        for fold in args.folds:
            run_fold(steps[fold], out)
            write_report(out)
    result = write_report(out)
    print(report_markdown(json.loads(json.dumps(result))))
    print(f"report: {out / 'crossval.md'} and {out / 'crossval.json'}; commit {git_commit()}")


if __name__ == "__main__":
    main()
