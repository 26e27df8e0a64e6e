"""Rebuild the frozen models of the LA blind check from their recorded commands (BENCHMARKS.md §8).

The models of `bench/la_frozen_models.json` were trained on the development machine and kept
outside the repository, which cannot hold them. When they are lost, this script trains every one
again, in dependency order, with the commands BENCHMARKS.md records for them, and compares each
rebuilt model with the facts recorded for the original before any blind volume was seen (its
"record": best iteration and validation Dice of a segmenter; best epoch, validation MAE and
calibration shift of g) and, with the `verify` group, with the original's results on the 60
held-out development volumes ("evaluation_record").

A rebuild is the same *recipe*, not always the same weights: training on the CPU is deterministic
on one machine (§7), but another CPU (§8: AVX-512 against the development machine's) rounds
differently and training drifts apart. The report says, per model, whether the rebuild is exact
and what differs; `la_blind_check.py` accepts a rebuilt model (by the SHA-256 of its weights in
the report) and prints those differences beside its verdicts.

    python bench/la_rebuild_models.py --models /work/runs                 # everything: hours on 2 cores
    python bench/la_rebuild_models.py --models /work/runs --only issue2   # the two pipeline checkpoints
    python bench/la_rebuild_models.py --list                              # the plan, nothing run
    python bench/la_rebuild_models.py --models /work/runs --check         # compare what is there

Groups, in order (each step is skipped when its output exists, and an interrupted training
resumes from its last checkpoint when the same command runs again):
  splits      the fixed LA splits (16 and 4 labels)
  issue2      la_sup_c, la_sup_e: the §1c recipe, seeds 0 and 1 (8-14 min each)
  masks       the six supervised segmenters whose masks g is judged on (§6): la_sup_a (16 labels),
              la_geval/sup4_it200, sup4_it800, sup16_it300, and the §3 study's labeled8 sup seeds
  study       ten more §3 study segmenters (8 labels: sup and mt seeds 1-2, cps, fixmatch, ict, cl,
              MT with MetaSSL's loss, the dual-network method), whose masks of the training and
              validation cases teach and select g (§2c-§2d); then those masks (about 70 min)
  g48         the primary g: four seeds of the 80-epoch 48^3 recipe (§6; 27-60 min each; seeds 2
              and 3 train side by side with one thread each, as their originals did)
  g32         the 32^3 ensemble reported beside it (seeds 3-5 of §2d; optional for the blind check)
  verify      the issue-2 and mask segmenters on the 60 held-out development volumes (~15 min)
`rebuild_report.json` in --models lists each model: exact / rebuilt (with what differs) / missing,
and the SHA-256 of its weights alone.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the library of this checkout, installed or not
FROZEN = HERE / "la_frozen_models.json"
STUDY_CONFIG = HERE / "la_cpu.yaml"

DONE = ".rebuild.done"  # written when a step's command has finished (checkpoints appear before that)
GROUPS = ("splits", "issue2", "masks", "study", "g48", "g32", "verify")

UNET = ["--set", "network_options={channels: [16,32,64,128]}", "--threads", "2"]
# the frozen models resampled labels by nearest neighbour, the default until BENCHMARKS.md §15
NEAREST_LABELS = ["--set", "label_resampling=nearest"]
# ... and trained on a CPU in the default memory layout, the default until BENCHMARKS.md §17
# (channels-last changes the order of float rounding, so the recorded Dice would not repeat)
DEFAULT_LAYOUT = ["--set", "channels_last=off"]
PIPELINE = ["--spacing", "1.25", "1.25", "1.25", "--patch", "32", "64", "64", "--batch", "2",
            "--cache-dir", "cache"] + UNET + NEAREST_LABELS + DEFAULT_LAYOUT
AUGMENTATION = ["--set", "augmentation={gamma_prob: 0.3, gamma_invert_prob: 0.1, contrast_prob: 0.15, "
                         "scale_range: [0.75, 1.25]}"]

# The segmenters of the §3 study whose masks of the training / validation cases teach g (§2c-§2d).
G_MASK_SEGMENTERS = ["sup_seed1", "sup_seed2", "mt_seed1", "mt_seed2", "cps_seed0", "fixmatch_seed0",
                     "ict_seed0", "cl_seed0", "mt-metassl_seed0", "dualnet_seed0"]
STUDY_RUNS = """runs:
  - {method: sup, seeds: [0, 1, 2]}
  - {method: mt, seeds: [1, 2]}
  - {method: cps, seeds: [0]}
  - {method: fixmatch, seeds: [0]}
  - {method: ict, seeds: [0]}
  - {method: cl, seeds: [0]}
  - {method: mt, name: mt-metassl, seeds: [0], train: {ssl: {heterogeneous_loss: true}}}
  - {method: dualnet, seeds: [0], train: {ssl: {dualnet_networks: [unet, resunet]},
                                          other_network_options: {resunet: {filters: [8, 16, 32, 64]}}}}
"""

# The 80-epoch g of §2d (segmentation head, real training and validation masks); §6 adds the 48^3 grid.
G_RECIPE = ["--dataset", "la16/dataset.json", "--set", "epochs=80", "--set", "samples_per_case=16",
            "--set", "reuse_epochs=5", "--set", "batch_size=16", "--set", "patience=25", "--set", "p_weak=0.3",
            "--set", "weak=null", "--set", "segmentation_head=true", "--set", "t0=20", "--set", "t_mult=3"]
# Seeds 2 and 3 of the 48^3 g were trained side by side with one thread each (§6); CPU results can
# depend on the thread count, so they are rebuilt with one thread.
G48_SEEDS = {"la_g16s80_g48": (0, 2), "la_g16s80_g48_s1": (1, 2), "la_g16s80_g48_s2": (2, 1),
             "la_g16s80_g48_s3": (3, 1)}
G32_SEEDS = {"la_g16s80_s3": (3, 2), "la_g16s80_s4": (4, 2), "la_g16s80_s5": (5, 2)}


def qgseg(*args: str) -> List[str]:
    return [sys.executable, "-m", "QGSegmentationLib.cli.main", *args, "--quiet"]


class Plan:
    """The steps of a rebuild, each a command and the file whose existence means it is done."""

    def __init__(self, models: Path, la: Path):
        self.models, self.la = models, la
        self.steps: List[Dict] = []

    def add(self, group: str, name: str, command: List[str], done: str, threads: int = 2) -> None:
        self.steps.append({"group": group, "name": name, "command": command, "done": done, "threads": threads})

    def build(self) -> "Plan":
        self.add("splits", "16-label split", [sys.executable, str(HERE / "make_la_split.py"), "--la", str(self.la),
                                              "--out", "la16", "--labeled", "16"], "la16/dataset.json")
        self.add("splits", "4-label split", [sys.executable, str(HERE / "make_la_split.py"), "--la", str(self.la),
                                             "--out", "la4", "--labeled", "4"], "la4/dataset.json")
        for name, seed in (("la_sup_c", 0), ("la_sup_e", 1)):
            self.add("issue2", name, qgseg("train", "--dataset", "la16/dataset.json", *PIPELINE, "--iterations",
                                           "3600", "--val-every", "400", *AUGMENTATION, "--seed", str(seed),
                                           "--run-dir", name), f"{name}/{DONE}")
        self.add("masks", "la_sup_a", qgseg("train", "--dataset", "la16/dataset.json", *PIPELINE, "--iterations",
                                            "3600", "--val-every", "400", "--run-dir", "la_sup_a"),
                 f"la_sup_a/{DONE}")
        for name, split, iterations, every in (("sup4_it200", "la4", 200, 100), ("sup4_it800", "la4", 800, 200),
                                               ("sup16_it300", "la16", 300, 100)):
            self.add("masks", name, qgseg("train", "--dataset", f"{split}/dataset.json", *PIPELINE, "--iterations",
                                          str(iterations), "--val-every", str(every), "--run-dir", f"la_geval/{name}"),
                     f"la_geval/{name}/{DONE}")
        config = self.models / "rebuild" / "la_cpu_rebuild.yaml"
        self.add("masks", "§3 study: labeled8 sup seed 0", self.study_command(config, ["sup"]),
                 f"bench/la_cpu/sup{DONE}")
        self.add("study", "§3 study: the ten segmenters of g's real masks",
                 self.study_command(config, ["sup", "mt", "cps", "fixmatch", "ict", "cl", "mt-metassl", "dualnet"]),
                 f"bench/la_cpu/study{DONE}")
        for name in G_MASK_SEGMENTERS:
            method, seed = name.rsplit("_seed", 1)
            checkpoint = f"bench/la_cpu/runs/labeled8/{method}/seed{seed}/checkpoints/best.pt"
            for split, folder in (("training", "la_extra"), ("validation", "la_gval")):
                self.add("study", f"{name} segments the {split} cases",
                         qgseg("predict", "--checkpoint", checkpoint, "--input", "la16/dataset.json", "--split", split,
                               "--no-mirror", "--output", f"{folder}/{name}"), f"{folder}/{name}/{DONE}")
        masks = [f"la_extra/{name}" for name in G_MASK_SEGMENTERS]
        validation = [f"la_gval/{name}" for name in G_MASK_SEGMENTERS]
        for group, seeds, grid in (("g48", G48_SEEDS, 48), ("g32", G32_SEEDS, 32)):
            for run_dir, (seed, threads) in seeds.items():
                command = qgseg("quality", "train", *G_RECIPE, "--set", f"grid_size=[{grid},{grid},{grid}]",
                                "--extra-masks", *sorted(masks), "--validation-masks", *sorted(validation),
                                "--seed", str(seed), "--run-dir", run_dir)
                self.add(group, run_dir, command, f"{run_dir}/quality_result.json", threads)
        self.add_verification()
        return self

    def add_verification(self) -> None:
        """Segment the 60 held-out development volumes of §6 with the issue-2 and mask segmenters,
        for the evaluation record of la_frozen_models.json."""
        frozen = json.loads(FROZEN.read_text())
        self.add("verify", "60-volume split", [sys.executable, str(HERE / "make_la_split.py"), "--la", str(self.la),
                                               "--out", "la16_heldout", "--labeled", "16", "--unlabeled-as-test"],
                 "la16_heldout/dataset.json")
        for group, mirror in (("issue2_segmenters", "--mirror"), ("issue3_mask_segmenters", "--no-mirror")):
            for name, entry in frozen[group].items():
                folder = f"rebuild/verify/{name}"
                self.add("verify", f"{name} segments the 60 volumes",
                         qgseg("predict", "--checkpoint", entry["path"], "--input", "la16_heldout/dataset.json",
                               "--split", "test", mirror, "--output", folder), f"{folder}/{DONE}")
                self.add("verify", f"evaluate {name} on the 60 volumes",
                         qgseg("evaluate", "--predictions", folder, "--dataset", "la16_heldout/dataset.json",
                               "--split", "test", "--run-dir", f"{folder}_eval"), f"{folder}_eval/metrics.csv")

    def study_command(self, config: Path, methods: List[str]) -> List[str]:
        return qgseg("bench", str(config), "--reuse", "--no-speed", "--only", *methods, "--run-dir", "bench/la_cpu",
                     "--set", f"data.la.path={self.la}")

    def write_study_config(self) -> None:
        """bench/la_cpu.yaml with only the unguided runs the frozen models need (no g is trained)."""
        text = STUDY_CONFIG.read_text()
        start, end = text.index("\nruns:\n") + 1, text.index("\nquality:")
        path = self.models / "rebuild" / "la_cpu_rebuild.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text[:start] + STUDY_RUNS + text[end + 1:])


def start_step(step: Dict, models: Path):
    """The step's process, started; None when its done marker already exists."""
    if (models / step["done"]).exists():
        print(f"[skip] {step['name']}: {step['done']} exists", flush=True)
        return None
    print(f"[run ] {step['name']}: {shlex.join(step['command'])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(step["threads"]), MKL_NUM_THREADS=str(step["threads"]))
    return subprocess.Popen(step["command"], cwd=models, env=env)


def finish_step(step: Dict, models: Path, process) -> str:
    """Wait for the step; mark it done, or return why it failed."""
    if process.wait() != 0:
        return f"{step['name']} failed (exit {process.returncode})"
    if step["done"].endswith(DONE):
        (models / step["done"]).touch()
    return ""


def side_by_side(steps: List[Dict]) -> List[List[Dict]]:
    """The steps in plan order, consecutive one-thread steps of a group joined into one batch: they
    ran side by side when the originals were made (§6), and one thread leaves the other core free."""
    batches: List[List[Dict]] = []
    for step in steps:
        previous = batches[-1] if batches else None
        if previous and step["threads"] == 1 and all(s["threads"] == 1 and s["group"] == step["group"]
                                                     for s in previous):
            previous.append(step)
        else:
            batches.append([step])
    return batches


def run_batch(batch: List[Dict], models: Path) -> float:
    """Run the batch's steps at once and wait for all; the wall time in seconds (0 if all were done)."""
    start = time.perf_counter()
    running = [(step, start_step(step, models)) for step in batch]
    failures = [finish_step(step, models, process) for step, process in running if process is not None]
    if any(failures):
        sys.exit("; ".join(filter(None, failures)) + "; rerun the same command to resume")
    return time.perf_counter() - start if any(process for _, process in running) else 0.0


# ---------------------------------------------------------------------------------------------
# checking a model against its record

def read_checkpoint(checkpoint: Path | Dict) -> Dict:
    """A checkpoint's state: read from its file, or as given when already read."""
    import torch

    return checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location="cpu",
                                                                      weights_only=True)


def weights_digest(checkpoint: Path | Dict) -> str:
    """SHA-256 of a checkpoint's network weights alone (names, shapes and bytes, in name order)."""
    state = read_checkpoint(checkpoint)
    if "networks" in state:
        tensors = {f"{i}.{k}": v for i, sd in enumerate(state["networks"]) for k, v in sd.items()}
    else:
        tensors = dict(state["state_dict"])
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def recorded_facts(checkpoint: Path | Dict) -> Dict[str, float]:
    """The facts a record names, read from the checkpoint itself."""
    state = read_checkpoint(checkpoint)
    if "networks" in state:
        return {"iteration": state["iteration"], "best_iteration": state["best_iteration"],
                "best_metric": state["best_metric"]}
    meta = state.get("meta", {})
    facts = {"epoch": meta.get("epoch"), "val_mae": meta.get("val_mae")}
    if meta.get("calibration"):
        facts["calibration_shift"] = meta["calibration"]["shift"][0]
    return facts


def record_problems(checkpoint: Path | Dict, record: Dict[str, str]) -> List[str]:
    """Differences between a checkpoint and its record; each recorded value is compared to the
    digits it was recorded with ("0.8716" to four decimals, 3200 exactly)."""
    facts = recorded_facts(checkpoint)
    return [f"{key} {'missing' if facts.get(key) is None else rounded(facts[key], expected)}, recorded {expected}"
            for key, expected in record.items() if facts.get(key) is None or not same(facts[key], expected)]


def frozen_entries(frozen: Dict) -> Dict[str, Dict]:
    entries = {name: e for group in ("issue2_segmenters", "issue3_mask_segmenters")
               for name, e in frozen[group].items()}
    for name, members in frozen["quality_predictors"].items():
        entries.update({f"{name}[{i}]": e for i, e in enumerate(members)})
    return entries


def check_models(models: Path) -> Dict[str, Dict]:
    """Each frozen model: `exact` when it matches its record and, where the frozen list has one
    and the verify group ran, the evaluation record; `rebuilt` with the differences otherwise;
    with the SHA-256 of its weights, which la_blind_check.py compares before it accepts it."""
    frozen = json.loads(FROZEN.read_text())
    evaluations = evaluation_problems(models, frozen)
    steps = Plan(models, models).build().steps
    report = {}
    for name, entry in frozen_entries(frozen).items():
        path = models / entry["path"]
        if not path.is_file():
            report[name] = {"path": entry["path"], "state": "missing", "differences": []}
            continue
        if not finished(entry["path"], steps, models):
            report[name] = {"path": entry["path"], "state": "unfinished",
                            "differences": ["its training has not finished (rerun the rebuild to resume it)"]}
            continue
        state = read_checkpoint(path)  # read once for the record, the facts and the digest
        differences = record_problems(state, entry["record"]) + evaluations.get(name, [])
        unchecked = ["evaluation record not checked (the verify group did not run)"] \
            if name in evaluations["not run"] else []
        report[name] = {"path": entry["path"], "state": "rebuilt" if differences or unchecked else "exact",
                        "differences": differences + unchecked, "facts": recorded_facts(state),
                        "weights_sha256": weights_digest(state)}
    return report


def finished(model_path: str, steps: List[Dict], models: Path) -> bool:
    """Whether the step that trains `model_path` has finished (a checkpoint exists long before)."""
    for step in steps:
        command = step["command"]
        run_dir = command[command.index("--run-dir") + 1] if "--run-dir" in command else None
        if run_dir and model_path.startswith(run_dir + "/") and step["group"] != "verify":
            return (models / step["done"]).exists()
    return True


def machine() -> Dict[str, str]:
    import platform

    import torch

    return {"cpu": platform.processor() or platform.machine(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M")}


def git_commit() -> str:
    """The checkout's short commit (the library's `manifest.git_commit`), or "unknown"."""
    from QGSegmentationLib.engine.manifest import git_commit as full_commit

    commit = full_commit(HERE)
    return commit[:7] if commit else "unknown"


def per_case_dice(metrics_csv: Path) -> Dict[str, float]:
    with open(metrics_csv, newline="") as handle:
        return {row["case"]: float(row["dice"]) for row in csv.DictReader(handle)}


def rounded(actual: float, recorded) -> str:
    """`actual` with as many decimals as the recorded value was written with."""
    text = str(recorded)
    return f"{actual:.{len(text.split('.')[1]) if '.' in text else 0}f}"


def same(actual: float, recorded) -> bool:
    return rounded(actual, recorded) == rounded(float(recorded), recorded)


def evaluation_problems(models: Path, frozen: Dict) -> Dict[str, List[str]]:
    """Problems per model name with the evaluation record; "not run" lists models without results."""
    record, out = frozen["evaluation_record"], {"not run": []}
    results = {}
    for group in ("issue2_segmenters", "issue3_mask_segmenters"):
        for name in frozen[group]:
            metrics = models / "rebuild" / "verify" / f"{name}_eval" / "metrics.csv"
            if metrics.is_file():
                results[name] = per_case_dice(metrics)
            else:
                out["not run"].append(name)
    test16 = models / "la16" / "dataset.json"
    t16 = ({Path(c["image"]).name.split(".")[0] for c in json.loads(test16.read_text())["test"]}
           if test16.is_file() else set())
    for name, expected in record["pipeline"].items():
        if name in results:
            dice = results[name]
            facts = {"t16_dice": np.mean([v for c, v in dice.items() if c in t16]),
                     "all60_dice": np.mean(list(dice.values()))}
            out[name] = [f"{key} {rounded(facts[key], value)}, recorded {value}" for key, value in expected.items()
                         if not same(facts[key], value)]
    masks = [name for name in frozen["issue3_mask_segmenters"] if name in results]
    if len(masks) == len(frozen["issue3_mask_segmenters"]):
        values = np.array([v for name in masks for v in results[name].values()])
        facts = {"min_dice": values.min(), "max_dice": values.max(), "below_0.7": int((values < 0.7).sum())}
        problems = [f"the {len(values)} masks' {key} {rounded(facts[key], value)}, recorded {value}"
                    for key, value in record["masks"].items() if not same(facts[key], value)]
        out.update({name: problems for name in masks})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=HERE.parent.parent / "runs",
                        help="folder to rebuild the models in: la_blind_check.py's --models (default: ../runs)")
    parser.add_argument("--la", type=Path, default=HERE.parent.parent / "shared" / "data" / "LA",
                        help="the 80 development volumes (default: ../shared/data/LA)")
    parser.add_argument("--only", nargs="+", choices=GROUPS, help="rebuild only these groups (in plan order)")
    parser.add_argument("--list", action="store_true", help="print the plan and stop")
    parser.add_argument("--check", action="store_true", help="only check the models already there")
    args = parser.parse_args()

    models, la = args.models.resolve(), args.la.resolve()
    plan = Plan(models, la).build()
    steps = [s for s in plan.steps if not args.only or s["group"] in args.only]
    if args.list:
        for batch in side_by_side(steps):
            for step in batch:
                threads = f"OMP_NUM_THREADS={step['threads']} " if step["threads"] != 2 else ""
                together = " (side by side with the others of its batch)" if len(batch) > 1 else ""
                print(f"# {step['group']}: {step['name']}{together}\n{threads}{shlex.join(step['command'])}")
        return
    if not args.check:
        models.mkdir(parents=True, exist_ok=True)
        plan.write_study_config()
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
        for batch in side_by_side(steps):
            seconds = run_batch(batch, models)
            if seconds:
                print(f"[done] {' + '.join(s['name'] for s in batch)} in {seconds:.0f} s", flush=True)
    report = check_models(models)
    (models / "rebuild_report.json").write_text(json.dumps({"machine": machine(), "models": report}, indent=1))
    for name, entry in report.items():
        detail = "; ".join(entry["differences"])
        print(f"{entry['state']:>7}: {name} ({entry['path']}){' - ' + detail if detail else ''}")
    print(f"report: {models / 'rebuild_report.json'}")


if __name__ == "__main__":
    main()
