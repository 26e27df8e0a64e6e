"""Blind check of issues 2 and 3 on LA volumes that nobody tuned on (BENCHMARKS.md section 7).

The LA data's README says the product's owners keep the 20 volumes of UA-MT's `test.list` (the
split the published LA numbers use) to check results on cases nobody tuned on. This script runs
the models frozen in `bench/la_frozen_models.json` (each checked by SHA-256, or, where the
originals were lost and `la_rebuild_models.py` rebuilt them, by that rebuild's verification:
BENCHMARKS.md section 8) on such a folder and judges both issues' bars by the rules fixed in
BENCHMARKS.md section 7 before any blind volume was seen:

    python bench/la_blind_check.py --hidden /path/to/LA_test20 --out runs/la_blind
    python bench/la_blind_check.py --hidden /path/to/LA_test20 --out runs/la_blind --rebuild   # models lost

`--hidden` is a folder with a Decathlon-style dataset.json (cases with "image" and "label" under
"test" or "training") or with imagesTr/ + labelsTr/ (or imagesTs/ + labelsTs/) of equally named
files, in the LA data's format. Its volumes must not be among the 80 development volumes (compared by file content);
`--allow-dev-cases` lifts that for a dry run on development volumes, and the report then says in
its first line that it is not blind.

Steps (each is skipped when its output is already there, so an interrupted check resumes):
  1. issue 2: the two validation-selected pipeline checkpoints segment the volumes (mirrored) and
     `qgseg evaluate` scores them against the labels;
     `--retrain` also trains the same recipe from scratch on the 16 development volumes (about
     12 minutes on 2 cores) and `--minimal` the issue's minimal MONAI script (2 seeds x 5 min),
     both evaluated on the same volumes;
  2. issue 3: six supervised segmenters of other label budgets and stages segment the volumes
     (one pass); g (the four-seed 48^3 ensemble; the 32^3 ensemble beside it) is evaluated on
     those masks with the second opinion of step 1, and timed scoring one volume + mask;
  3. report.md and report.json in --out: every number, the verdicts, commands, models, commit.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from QGSegmentationLib.benchmark.data import make_la_split  # noqa: E402
from QGSegmentationLib.data.io import IMAGE_EXTENSIONS, case_id_from_path  # noqa: E402
from QGSegmentationLib.quality.evaluate import per_source_metrics  # noqa: E402
from la_rebuild_models import frozen_entries, git_commit, per_case_dice, weights_digest  # noqa: E402

FROZEN = HERE / "la_frozen_models.json"

ISSUE2_DICE_BAR = 0.86
ISSUE3_PEARSON_BAR, ISSUE3_MAE_BAR, SCORE_SECONDS_BAR = 0.90, 0.06, 1.0

# What --rebuild rebuilds: everything but the optional 32^3 ensemble (about an hour more).
REBUILD_GROUPS = ["splits", "issue2", "masks", "study", "g48", "verify"]

# The recipe of BENCHMARKS.md sections 1c/1d (la_sup_c), nearest-neighbour labels and the default
# memory layout as it ran (§15, §17): what --retrain runs.
RETRAIN_ARGS = ["--spacing", "1.25", "1.25", "1.25", "--patch", "32", "64", "64", "--batch", "2",
                "--iterations", "3600", "--val-every", "400", "--threads", "2", "--seed", "0",
                "--set", "network_options={channels: [16,32,64,128]}", "--set", "label_resampling=nearest",
                "--set", "channels_last=off",
                "--set", "augmentation={gamma_prob: 0.3, gamma_invert_prob: 0.1, contrast_prob: 0.15, "
                         "scale_range: [0.75, 1.25]}"]


# ---------------------------------------------------------------------------------------------
# inputs

def hidden_cases(folder: Path) -> List[Dict[str, str]]:
    """(image, label) entries relative to `folder`, from its dataset.json or imagesTr/labelsTr."""
    description = folder / "dataset.json"
    if description.is_file():
        spec = json.loads(description.read_text())
        cases = [c for key in ("test", "training", "validation") for c in spec.get(key) or []
                 if isinstance(c, dict) and "image" in c and "label" in c]
        if not cases:
            sys.exit(f"{description}: no cases with both \"image\" and \"label\" under test/training/validation")
        return [{"image": c["image"], "label": c["label"]} for c in cases]
    layout = next(((i, l) for i, l in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"))
                   if (folder / i).is_dir() and (folder / l).is_dir()), None)
    if layout is None:
        sys.exit(f"{folder}: expected a dataset.json or the folders imagesTr/ + labelsTr/ (or imagesTs/ + labelsTs/)")
    images, labels = (folder / name for name in layout)
    cases = []
    for image in sorted(p for p in images.iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS)):
        label = labels / image.name
        if not label.is_file():
            sys.exit(f"{image}: no label {label}")
        cases.append({"image": f"{layout[0]}/{image.name}", "label": f"{layout[1]}/{image.name}"})
    if not cases:
        sys.exit(f"{images}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return cases


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def development_overlap(hidden: Path, cases: Sequence[Dict[str, str]], la: Path) -> List[str]:
    """Hidden images whose file content equals one of the development volumes'."""
    development = json.loads((la / "dataset.json").read_text())["training"]
    known = {file_digest(la / c["image"]) for c in development}
    return [c["image"] for c in cases if file_digest(hidden / c["image"]) in known]


def verify_models(models: Path) -> Dict:
    """The frozen model list with absolute paths; exits naming any file that is missing or changed.

    A file is accepted when its SHA-256 is the frozen one (the original file), or when
    `la_rebuild_models.py` rebuilt it from its recorded command: the rebuild's report in --models
    names the SHA-256 of the weights this file holds (and what differs from the original). The
    ensembles other than the primary g are optional: one that is missing is left out."""
    frozen = json.loads(FROZEN.read_text())
    report_path = models / "rebuild_report.json"
    rebuilt = json.loads(report_path.read_text())["models"] if report_path.is_file() else {}
    optional = {f"{name}[{i}]" for name, members in frozen["quality_predictors"].items()
                if name != frozen["primary_quality_predictor"] for i in range(len(members))}
    problems, left_out = [], set()
    for name, entry in frozen_entries(frozen).items():
        path = models / entry["path"]
        entry["file"] = str(path)
        if not path.is_file():
            if name in optional:
                left_out.add(name.split("[")[0])
            else:
                problems.append(f"{path}: missing")
        elif file_digest(path) == entry["sha256"]:
            entry["provenance"] = "original file (SHA-256 as frozen)"
        elif rebuilt.get(name, {}).get("state") in ("exact", "rebuilt") and \
                rebuilt[name]["weights_sha256"] == weights_digest(path):
            differences = rebuilt[name]["differences"]
            entry["provenance"] = ("rebuilt, exact" if rebuilt[name]["state"] == "exact"
                                   else "rebuilt; differs from the original: " + "; ".join(differences))
        else:
            problems.append(f"{path}: neither the frozen file (SHA-256 differs) nor a rebuild named in {report_path}")
    if problems:
        sys.exit("frozen models:\n  " + "\n  ".join(problems) + f"\n--models {models} must be the folder the "
                 f"paths of {FROZEN.name} are relative to; if the models were lost, rebuild them there "
                 f"(BENCHMARKS.md section 8): python bench/la_rebuild_models.py --models {models}")
    for name in left_out:
        print(f"[note] {name} not there (optional): left out", flush=True)
        del frozen["quality_predictors"][name]
    return frozen


def write_dataset(out: Path, hidden: Path, cases, la: Path) -> Path:
    """out/dataset.json: the 16-label development split's training and validation cases (for
    --retrain and --minimal) and the hidden cases as its test list, all through symlinks."""
    development = json.loads(make_la_split(la, out / "development", 16).read_text())
    link = out / "hidden"
    if link.is_symlink():
        link.unlink()
    os.symlink(hidden.resolve(), link)
    prefixed = lambda c, root: {key: f"{root}/{c[key]}" for key in ("image", "label")}  # noqa: E731
    spec = {"name": f"LA blind check: {len(cases)} hidden volumes ({hidden})",
            "labels": development["labels"],
            "training": [prefixed(c, "development") for c in development["training"]],
            "validation": [prefixed(c, "development") for c in development["validation"]],
            "test": [prefixed(c, "hidden") for c in cases], "unlabeled": []}
    path = out / "dataset.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# steps

class Steps:
    """Runs commands in order, skipping those whose output exists; keeps the command lines."""

    def __init__(self, out: Path):
        self.out, self.commands = out, []

    def run(self, name: str, command: List[str], done: Path) -> float:
        self.commands.append(shlex.join(command))
        if done.exists():
            print(f"[skip] {name}: {done} exists", flush=True)
            return 0.0
        print(f"[run ] {name}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, cwd=self.out)
        if result.returncode != 0:
            sys.exit(f"{name} failed (exit {result.returncode}): {shlex.join(command)}")
        return time.perf_counter() - start

    def output(self, name: str, command: List[str]) -> str:
        self.commands.append(shlex.join(command))
        print(f"[run ] {name}", flush=True)
        result = subprocess.run(command, cwd=self.out, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{name} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
        return result.stdout


def qgseg(*args: str) -> List[str]:
    return [sys.executable, "-m", "QGSegmentationLib.cli.main", *args, "--quiet"]


def segment_and_evaluate(steps: Steps, name: str, checkpoints: Sequence[str], mirror: bool) -> Dict:
    predictions = f"seg/{name}"
    steps.run(f"segment with {name}", qgseg("predict", "--checkpoint", *checkpoints, "--input", "dataset.json",
                                           "--split", "test", "--output", predictions,
                                           "--mirror" if mirror else "--no-mirror"),
              steps.out / predictions / ".done")
    (steps.out / predictions / ".done").touch()
    return evaluate(steps, name)


def evaluate(steps: Steps, name: str, predictions: str = "") -> Dict:
    predictions = predictions or f"seg/{name}"
    run_dir = f"seg_eval/{name}"
    steps.run(f"evaluate {name}", qgseg("evaluate", "--predictions", predictions, "--dataset", "dataset.json",
                                        "--split", "test", "--run-dir", run_dir),
              steps.out / run_dir / "summary.json")
    summary = json.loads((steps.out / run_dir / "summary.json").read_text())["summary"]
    return {"dice": summary["dice"], "hd95": summary["hd95"], "cases": summary["cases"],
            "per_case": per_case_dice(steps.out / run_dir / "metrics.csv")}


def issue2(steps: Steps, frozen: Dict, retrain: bool, minimal: bool) -> Dict:
    result = {"segmenters": {}}
    for name, entry in frozen["issue2_segmenters"].items():
        result["segmenters"][name] = segment_and_evaluate(steps, name, [entry["file"]], mirror=True)
    result["pipeline_dice"] = float(np.mean([r["dice"]["mean"] for r in result["segmenters"].values()]))
    if retrain:
        seconds = steps.run("train the pipeline recipe from scratch (about 12 min)",
                            qgseg("train", "--dataset", "dataset.json", "--run-dir", "retrain",
                                  "--cache-dir", "cache", *RETRAIN_ARGS),
                            steps.out / "retrain" / "checkpoints" / "best.pt")
        manifest = json.loads((steps.out / "retrain" / "manifest.json").read_text())
        evaluation = segment_and_evaluate(steps, "retrain_best", ["retrain/checkpoints/best.pt"], mirror=True)
        evaluation["train_seconds"] = manifest.get("wall_time_s", seconds)
        result["retrain"] = evaluation
    if minimal:
        runs = {}
        for seed in (0, 1):
            folder = f"minimal_s{seed}"
            steps.run(f"minimal MONAI script, seed {seed} (5 min + inference)",
                      [sys.executable, str(HERE / "minimal_monai_baseline.py"), "--dataset", "dataset.json",
                       "--minutes", "5", "--seed", str(seed), "--out", folder],
                      steps.out / folder / "run.json")
            runs[folder] = evaluate(steps, folder, f"{folder}/pred")
        result["minimal"] = runs
        result["minimal_dice"] = float(np.mean([r["dice"]["mean"] for r in runs.values()]))
    return result


def issue3(steps: Steps, frozen: Dict, first_case: Dict[str, str]) -> Dict:
    folders = []
    for name, entry in frozen["issue3_mask_segmenters"].items():
        folder = f"masks/{name}"
        steps.run(f"masks of {name}", qgseg("predict", "--checkpoint", entry["file"], "--input", "dataset.json",
                                            "--split", "test", "--no-mirror", "--output", folder),
                  steps.out / folder / ".done")
        (steps.out / folder / ".done").touch()
        folders.append(folder)
    second = f"seg/{frozen['second_opinion']}"
    result = {}
    for name, members in frozen["quality_predictors"].items():
        run_dir = f"quality/{name}"
        steps.run(f"evaluate g {name}", qgseg("quality", "evaluate", "--dataset", "dataset.json", "--checkpoint",
                                              *[m["file"] for m in members], "--group", "test",
                                              "--predictions", *folders, "--second-opinion", second,
                                              "--run-dir", run_dir),
                  steps.out / run_dir / "quality_evaluation.json")
        evaluation = json.loads((steps.out / run_dir / "quality_evaluation.json").read_text())
        evaluation["within_segmenter_pearson"] = within_segmenter_pearson(
            steps.out / run_dir / "quality_evaluation_rows.csv")
        result[name] = evaluation
    primary = frozen["primary_quality_predictor"]
    timing = steps.output("time scoring one volume + mask with the primary g", [
        sys.executable, str(HERE / "bench_score_time.py"), "--checkpoint",
        *[m["file"] for m in frozen["quality_predictors"][primary]],
        "--image", first_case["image"], "--mask", f"{folders[0]}/{case_id_from_path(first_case['image'])}.nrrd"])
    result["score_seconds_median"] = float(re.search(r"median ([0-9.]+) s", timing).group(1))
    result["score_timing"] = timing.strip()
    return result


def within_segmenter_pearson(rows_csv: Path) -> Dict[str, float]:
    """g's Pearson within each segmenter's masks (the library's per-source metrics, by folder name)."""
    with open(rows_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    within = per_source_metrics([Path(r["category"]).name for r in rows],
                                {"g": np.array([float(r["predicted"]) for r in rows])},
                                np.array([float(r["true_dice"]) for r in rows]))
    return {name: metrics["g"]["pearson"] for name, metrics in within.items()}


# ---------------------------------------------------------------------------------------------
# verdicts and report

def verdicts(result: Dict, frozen: Dict) -> Dict[str, Dict]:
    two = result["issue2"]
    issue2_checks = {f"pipeline Dice {two['pipeline_dice']:.4f} >= {ISSUE2_DICE_BAR}": two["pipeline_dice"] >= ISSUE2_DICE_BAR}
    if "minimal_dice" in two:
        issue2_checks[f"pipeline Dice above the minimal script's {two['minimal_dice']:.4f}"] = \
            two["pipeline_dice"] > two["minimal_dice"]
    g = result["issue3"][frozen["primary_quality_predictor"]]
    metrics, seconds = g["metrics"], result["issue3"]["score_seconds_median"]
    issue3_checks = {f"Pearson {metrics['pearson']:.3f} >= {ISSUE3_PEARSON_BAR}": metrics["pearson"] >= ISSUE3_PEARSON_BAR,
                     f"MAE {metrics['mae']:.3f} <= {ISSUE3_MAE_BAR}": metrics["mae"] <= ISSUE3_MAE_BAR,
                     "image-dependence check passes": bool(g["image_dependence_ok"]),
                     f"scoring median {seconds:.3f} s <= {SCORE_SECONDS_BAR} s": seconds <= SCORE_SECONDS_BAR}
    return {"issue 2": {"checks": issue2_checks, "met": all(issue2_checks.values())},
            "issue 3": {"checks": issue3_checks, "met": all(issue3_checks.values())}}


def report_markdown(result: Dict) -> str:
    lines = []
    if not result["blind"]:
        lines.append("**NOT BLIND: a dry run on development volumes (--allow-dev-cases). "
                     "These numbers are no evidence for either issue.**\n")
    lines += [f"# LA blind check: {result['n_cases']} volumes from {result['hidden']}", "",
              f"Commit {result['commit']}, {result['date']}, {result['seconds']:.0f} s; "
              f"frozen models checked against {FROZEN.name}:", "", *provenance_lines(result["frozen_models"]), "",
              "## Verdicts (rules of BENCHMARKS.md section 7)", ""]
    for issue, verdict in result["verdicts"].items():
        lines.append(f"- **{issue}: {'MET' if verdict['met'] else 'NOT MET'}**")
        lines += [f"  - {'yes' if ok else 'no '}: {check}" for check, ok in verdict["checks"].items()]
    lines += ["", "## Issue 2: segmentation (mirrored, against the original labels)", "",
              "| model | Dice mean ± std (median) | HD95 mm mean (median) | lowest three cases |", "|---|---|---|---|"]
    two = result["issue2"]
    rows = dict(two["segmenters"])
    rows.update({"retrain_best (from scratch)": two["retrain"]} if "retrain" in two else {})
    rows.update(two.get("minimal", {}))
    for name, r in rows.items():
        worst = sorted(r["per_case"].items(), key=lambda item: item[1])[:3]
        lines.append(f"| {name} | {r['dice']['mean']:.4f} ± {r['dice']['std']:.4f} ({r['dice']['median']:.4f}) | "
                     f"{r['hd95']['mean']:.2f} ({r['hd95']['median']:.2f}) | "
                     + ", ".join(f"{c} {d:.3f}" for c, d in worst) + " |")
    if "retrain" in two:
        lines.append(f"\nTraining from scratch took {two['retrain']['train_seconds']:.0f} s.")
    lines += ["", "## Issue 3: g on the masks of six supervised segmenters", "",
              "| estimate | n | MAE | Pearson | Spearman | AUROC (Dice < 0.7) | r blacked-out / other image | within one segmenter (Pearson) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, g in ((k, v) for k, v in result["issue3"].items() if isinstance(v, dict) and "metrics" in v):
        m, dep = g["metrics"], g["image_dependence"]
        within = ", ".join(f"{k} {v:.2f}" for k, v in g["within_segmenter_pearson"].items())
        lines.append(f"| g {name} | {m['n']} | {m['mae']:.3f} | {m['pearson']:.3f} | {m['spearman']:.3f} | "
                     f"{m['auroc_failure']:.3f} | {dep['pearson_black']:.2f} / {dep['pearson_shuffled']:.2f} | {within} |")
    primary = result["issue3"][result["frozen_models"]["primary_quality_predictor"]]
    second = primary["second_opinion"]
    exploratory = {f"second opinion ({Path(second['folder']).name})": second["metrics"]}
    exploratory.update({f"{name}: primary g and second opinion": metrics
                        for name, metrics in primary.get("combined", {}).items()})
    for name, m in exploratory.items():
        lines.append(f"| {name} (exploratory) | {m['n']} | {m['mae']:.3f} | {m['pearson']:.3f} | "
                     f"{m['spearman']:.3f} | {m['auroc_failure']:.3f} | | |")
    lines += ["", f"Scoring time: {result['issue3']['score_timing']}", "", "## Commands", "", "```bash"]
    lines += result["commands"] + ["```", ""]
    return "\n".join(lines)


def provenance_lines(frozen: Dict) -> List[str]:
    """How each frozen model came to be here: the original file or a rebuild (section 8)."""
    return [f"- {name}: {entry.get('provenance', '')}" for name, entry in frozen_entries(frozen).items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", required=True, type=Path, help="folder of the blind LA volumes with labels")
    parser.add_argument("--out", required=True, type=Path, help="folder for every output and the report")
    parser.add_argument("--models", type=Path, default=HERE.parent.parent / "runs",
                        help="folder the frozen models' paths are relative to (default: ../runs)")
    parser.add_argument("--la", type=Path, default=HERE.parent.parent / "shared" / "data" / "LA",
                        help="the 80 development volumes (default: ../shared/data/LA)")
    parser.add_argument("--rebuild", action="store_true",
                        help="first rebuild the frozen models missing from --models with la_rebuild_models.py, "
                             "all but the optional 32^3 ensemble (BENCHMARKS.md section 8; 3.5-6 hours on 2 cores)")
    parser.add_argument("--retrain", action="store_true", help="also train the pipeline recipe from scratch")
    parser.add_argument("--minimal", action="store_true", help="also run the minimal MONAI script (2 seeds)")
    parser.add_argument("--allow-dev-cases", action="store_true",
                        help="allow development volumes (a dry run of this script; the report says so)")
    args = parser.parse_args()

    start, commit = time.perf_counter(), git_commit()
    hidden = args.hidden.resolve()
    cases = hidden_cases(hidden)
    overlap = development_overlap(hidden, cases, args.la)
    if overlap and not args.allow_dev_cases:
        sys.exit(f"{hidden}: {len(overlap)} of {len(cases)} images are development volumes (e.g. {overlap[0]}); "
                 "a blind check needs volumes nobody tuned on (--allow-dev-cases for a dry run)")
    if args.rebuild:
        rebuild = subprocess.run([sys.executable, str(HERE / "la_rebuild_models.py"), "--models", str(args.models),
                                  "--la", str(args.la), "--only", *REBUILD_GROUPS])
        if rebuild.returncode != 0:
            sys.exit(f"the rebuild stopped (exit {rebuild.returncode}); the same command resumes it")
    frozen = verify_models(args.models.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    write_dataset(out, hidden, cases, args.la.resolve())
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    steps = Steps(out)
    first_case = {"image": f"hidden/{cases[0]['image']}"}
    result = {"hidden": str(hidden), "n_cases": len(cases), "blind": not overlap,
              "development_volumes_among_them": len(overlap), "commit": commit,
              "date": time.strftime("%Y-%m-%d %H:%M"), "frozen_models": frozen}
    result["issue2"] = issue2(steps, frozen, args.retrain, args.minimal)
    result["issue3"] = issue3(steps, frozen, first_case)
    result["verdicts"] = verdicts(result, frozen)
    result["commands"], result["seconds"] = steps.commands, time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "report.md").write_text(report_markdown(result))
    print(report_markdown(result).split("## Issue 2")[0])
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
