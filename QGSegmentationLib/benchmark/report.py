"""The benchmark report: markdown generated from results.json alone (no hand-typed numbers).

    qgseg bench report runs/bench/la_cpu/results.json --out docs/BENCHMARKS-la_cpu.md

Sections: provenance (commit, machine, the exact commands), test accuracy per method and guidance
(mean ± sample standard deviation over seeds of each run's mean over the test cases, for the
best-on-validation and the last checkpoint), figures, the quality predictors, speed (training step
with and without guidance, inference per volume) and one line per run.
"""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..fileio import write_text_atomic

CHECKPOINTS = ("best", "last")


def load_results(path: str | Path) -> Dict[str, Any]:
    from .runner import ResultsFile

    return ResultsFile.read(path)


# ------------------------------------------------------------------------------------- numbers

def run_metric(record: Dict[str, Any], which: str, metric: str) -> Optional[float]:
    """A run's mean over its test cases of `metric` for checkpoint `which` (None if missing)."""
    try:
        value = record["evaluation"][which]["summary"][metric]["mean"]
    except (KeyError, TypeError):
        return None
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def mean_std(values: Sequence[float]) -> tuple:
    """(mean, sample std or None for a single value); empty -> (None, None)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def group_runs(records: List[Dict[str, Any]], order: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """One group per (split, run label) - `mt`, `mt+qar,qw`, `mt-metassl` apart - with per-seed
    values; groups follow the labels in `order` (the config's run order), then first-seen order."""
    groups: Dict[tuple, Dict[str, Any]] = {}
    several_splits = len({r.get("split") for r in records}) > 1
    for record in records:
        if record.get("status") != "ok":
            continue
        guidance = tuple(record.get("guidance") or ())
        key = (record["split"], record["label"])
        group = groups.setdefault(key, {
            "split": record["split"], "label": record["label"],
            "method": record["label"][:-len("+" + ",".join(guidance))] if guidance else record["label"],
            "guidance": ",".join(guidance) or "none",
            "name": (f"{record['split']}: " if several_splits else "") + record["label"],
            "seeds": [], "dice": {w: [] for w in CHECKPOINTS}, "hd95": {w: [] for w in CHECKPOINTS},
            "train_wall_s": [], "step_time_s": [], "peak_mb": [], "segment_s": [], "quality_s": []})
        group["seeds"].append(record["seed"])
        for which in CHECKPOINTS:
            for metric in ("dice", "hd95"):
                value = run_metric(record, which, metric)
                if value is not None:
                    group[metric][which].append(value)
        group["train_wall_s"].append(record.get("train_wall_s"))
        group["step_time_s"].append(record.get("step_time_s"))
        memory = record.get("peak_memory") or {}
        group["peak_mb"].append(memory.get("cuda_allocated_mb", memory.get("cpu_rss_mb")))
        inference = record.get("inference") or {}
        group["segment_s"].append(inference.get("segment_s_median"))
        group["quality_s"].append(inference.get("quality_s_median"))
    return in_run_order(groups.values(), order, lambda g: g["label"])


def in_run_order(items, order: Sequence[str], label_of) -> list:
    """`items` sorted by their run label's position in `order` (the config's runs); labels not in
    it go last; the sort is stable, so seeds and first-seen order are kept within a label."""
    rank = {label: index for index, label in enumerate(order)}
    return sorted(items, key=lambda item: rank.get(label_of(item), len(rank)))


def config_run_labels(results: Dict[str, Any]) -> List[str]:
    """Run labels in the order of the study config's `runs` (for table order)."""
    from .config import _parse_runs

    runs = (results.get("config") or {}).get("runs")
    return [run.label for run in _parse_runs(runs, "results.json")] if runs else []


def _fmt(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    mean, std = mean_std([v * scale for v in values if v is not None])
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


# ------------------------------------------------------------------------------------ sections

def _quick_summary(results: Dict[str, Any]) -> str:
    """What `--quick` shrank, read from the merged config the study recorded."""
    config = results.get("config") or {}
    parts = [f"{config.get('iterations', '?')} iterations"]
    keys = [r.get("key") for r in results.get("runs") or [] if r.get("key")]
    if keys:
        parts.append("runs " + ", ".join(f"`{k}`" for k in keys))
    max_cases = (config.get("evaluation") or {}).get("max_test_cases")
    if max_cases:
        parts.append(f"{max_cases} test cases")
    epochs = (config.get("quality") or {}).get("epochs")
    if epochs is not None:
        parts.append(f"g trained {epochs} epochs")
    return "; ".join(parts)


def _provenance(results: Dict[str, Any], results_path: Path, out: Optional[Path]) -> List[str]:
    machine = results.get("machine") or {}
    versions = machine.get("versions") or {}
    cpu = f"{machine.get('cpu_count')} CPUs ({machine.get('usable_cpus')} usable)"
    if machine.get("processor"):
        cpu = f"{machine['processor']}, {cpu}"
    lines = [
        f"- **Commit:** `{results.get('commit') or 'unknown (not a git checkout)'}`",
        f"- **Machine:** {machine.get('platform', '?')}; {cpu}"
        + (f"; {machine['memory_gb']} GB RAM" if machine.get("memory_gb") else ""),
        f"- **Device:** {machine.get('device_description') or machine.get('device') or '?'}; "
        f"torch {versions.get('torch', '?')}, MONAI {versions.get('monai', '?')}, "
        f"Python {machine.get('python', versions.get('python', '?'))}",
        f"- **Study command:** `{shlex.join(str(a) for a in results.get('command') or [])}`",
        f"- **Report command:** `qgseg bench report {results_path}"
        + (f" --out {out}`" if out else "`"),
        f"- **Config:** `{results.get('config_path', '')}`" + (" with `--quick`" if results.get("quick") else ""),
        f"- **Started / last update:** {results.get('started', '?')} / {results.get('updated', '?')}",
    ]
    records = [r for r in results.get("runs") or [] if r.get("status") == "ok"]
    sources = sorted({r.get("test_source") for r in records if r.get("test_source")})
    if sources:
        counts = sorted({len(r.get("test_cases") or []) for r in records})
        lines.append(f"- **Test cases:** {'/'.join(map(str, counts))} from " + ", ".join(f"`{s}`" for s in sources))
    return lines


def _accuracy(groups: List[Dict[str, Any]]) -> List[str]:
    header = ["split", "method", "guidance", "seeds", "Dice best", "HD95 best (mm)", "Dice last",
              "HD95 last (mm)", "training (min)", "step (s)", "peak memory (MB)"]
    rows = [[g["split"], g["method"], g["guidance"], len(g["seeds"]), _fmt(g["dice"]["best"]),
             _fmt(g["hd95"]["best"], 2), _fmt(g["dice"]["last"]), _fmt(g["hd95"]["last"], 2),
             _fmt(g["train_wall_s"], 1, 1 / 60), _fmt(g["step_time_s"], 3), _fmt(g["peak_mb"], 0)]
            for g in groups]
    return ["Each run's metric is its mean over the test cases; the table gives the mean ± sample "
            "standard deviation of that over the seeds (no ± with one seed). *best* = checkpoint with "
            "the best validation Dice, *last* = final checkpoint. Step time = median training step; "
            "peak memory = CUDA allocated on GPU runs, else the process's peak resident set size.", ""] \
        + _table(header, rows)


def _quality(results: Dict[str, Any], base: Path) -> List[str]:
    quality = results.get("quality") or {}
    if not quality:
        return []
    rows = []
    for key, q in quality.items():
        calibration = q.get("calibration")
        link = f"[calibration]({_rel(calibration, base)})" if calibration and Path(calibration).is_file() else "–"
        rows.append([key, _num(q.get("best_val_mae"), 3), _num(q.get("best_val_pearson"), 3), q.get("epochs_run", "–"),
                     _num((q.get("wall_s") or 0) / 60, 1), link])
    return ["", "### Quality predictor g", "",
            "Validation MAE / Pearson r of g's predicted Dice against the true Dice of held-out "
            "variable-quality masks (from `qgseg quality train`).", ""] \
        + _table(["split/seed", "val MAE", "val Pearson r", "epochs", "minutes", "figure"], rows)


def speed_label(row: Dict[str, Any]) -> str:
    """The run label a speed row was measured for (`mt+qar,qw`)."""
    return row["method"] + ("+" + ",".join(row["guidance"]) if row.get("guidance") else "")


def _speed(results: Dict[str, Any], groups: List[Dict[str, Any]]) -> List[str]:
    lines = ["", "### Speed", ""]
    speed = results.get("speed")
    if speed and speed.get("methods"):
        methods = in_run_order(speed["methods"], config_run_labels(results), speed_label)
        lines += [f"Median training step of each method alone and with quality guidance, measured side by "
                  f"side in one process on {speed.get('device')} ({speed.get('rounds')} alternating rounds of "
                  f"{speed.get('warmup')} warm-up + {speed.get('steps')} timed steps each; random batches of the "
                  f"study's patch and batch sizes; quality predictor: {speed.get('predictor')}).", ""]
        rows = [[s["method"], ",".join(s["guidance"]), f"{s['host_step_s']:.4f}", f"{s['guided_step_s']:.4f}",
                 f"{s['ratio']:.2f}"] for s in methods]
        lines += _table(["method", "guidance", "host step (s)", "guided step (s)", "guided / host"], rows)
        lines.append("")
    lines += ["Inference per test volume (median over the run's test volumes and both checkpoints; "
              "segmentation = read, preprocess, sliding window, back to the original grid; quality "
              "score = g on the prediction, when the study trained g):", ""]
    rows = [[g["split"], g["method"], g["guidance"], _fmt(g["segment_s"], 3), _fmt(g["quality_s"], 4)]
            for g in groups]
    return lines + _table(["split", "method", "guidance", "segmentation (s)", "quality score (s)"], rows)


def _runs(records: List[Dict[str, Any]]) -> List[str]:
    rows = []
    for r in records:
        if r.get("status") != "ok":
            rows.append([r.get("key"), r.get("status"), "", "", "", "", ""])
            continue
        rows.append([r["key"], _num(run_metric(r, "best", "dice"), 4), _num(run_metric(r, "last", "dice"), 4),
                     _num(run_metric(r, "best", "hd95"), 2), f"{r.get('best_iteration')}/{r.get('iterations')}",
                     _num(r.get("best_val_dice"), 4), _num((r.get("train_wall_s") or 0) / 60, 1)])
    return ["", "### Runs", ""] + _table(
        ["run", "Dice best", "Dice last", "HD95 best (mm)", "best iteration", "val Dice", "training (min)"], rows)


def _num(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value):.{digits}f}"


def _rel(path: str | Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_posix()


# --------------------------------------------------------------------------------------- entry

def render_markdown(results: Dict[str, Any], results_path: str | Path, out: Optional[Path] = None,
                    figures: Optional[Dict[str, Path]] = None, heading_level: int = 2) -> str:
    """The report text. `figures` ({"dice": png, "curves": png}) are linked relative to `out`."""
    results_path = Path(results_path)
    base = (out.parent if out else Path.cwd())
    records = list(results.get("runs") or [])
    groups = group_runs(records, config_run_labels(results))
    title = "#" * heading_level + f" Benchmark: {results.get('study', 'study')}"
    lines = [f"<!-- generated by `qgseg bench report` from {results_path.name}; do not edit by hand -->",
             title, ""]
    if results.get("description"):
        lines += [str(results["description"]).strip(), ""]
    if results.get("quick"):
        lines += [f"**`--quick` variant** (a smoke check, not a result): {_quick_summary(results)}.", ""]
    lines += _provenance(results, results_path, out) + ["", "#" * (heading_level + 1) + " Test accuracy", ""]
    lines += _accuracy(groups) if groups else ["No finished runs yet."]
    if figures:
        lines += ["", "#" * (heading_level + 1) + " Figures", ""]
        lines += [f"![{caption}]({_rel(path, base)})" for caption, path in
                  (("test Dice per method", figures.get("dice")),
                   ("validation Dice curves", figures.get("curves"))) if path]
    lines += [line.replace("### ", "#" * (heading_level + 1) + " ", 1) if line.startswith("### ") else line
              for line in _quality(results, base) + _speed(results, groups)
              + _runs(in_run_order(records, config_run_labels(results), lambda r: r.get("label")))]
    return "\n".join(lines) + "\n"


def write_report(results_path: str | Path, out: str | Path | None = None, figures_dir: str | Path | None = None,
                 with_figures: bool = True, heading_level: int = 2) -> Path | str:
    """Regenerate the report from `results_path`. With `out`: write it (and the figures, by default
    into `<out stem>-figures/` next to it) and return the path; without: return the text."""
    results = load_results(results_path)
    out = Path(out) if out else None
    figures: Dict[str, Path] = {}
    records = [r for r in results.get("runs") or [] if r.get("status") == "ok"]
    if with_figures and records and (out or figures_dir):
        from . import plots

        folder = Path(figures_dir) if figures_dir else out.parent / f"{out.stem}-figures"
        groups = group_runs(records, config_run_labels(results))
        figures["dice"] = plots.dice_per_method(groups, folder / "dice_per_method.png")
        figures["curves"] = plots.validation_curves(records, folder / "validation_curves.png")
    text = render_markdown(results, results_path, out, figures, heading_level)
    if out is None:
        return text
    return write_text_atomic(out, text)
