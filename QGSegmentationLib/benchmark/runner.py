"""Runs a study: data splits -> quality predictors (when guidance is used) -> every (split, run, seed)
trained and evaluated -> speed measurements -> results.json -> markdown report.

Study folder layout:

    <study>/results.json                     one record per run, rewritten atomically after each
    <study>/BENCHMARKS.md, figures/          the report, regenerated from results.json
    <study>/data/                            generated split descriptions / phantoms
    <study>/cache/                           decoded, preprocessed volumes shared by the runs
    <study>/quality/<split>/seed<N>/         quality predictor g of that split and seed
    <study>/runs/<split>/<label>/seed<N>/    checkpoints, history.json, predictions/{best,last}/

Resuming: every run folder holds `bench_job.json` (the fingerprint of its TrainConfig and whether
it finished). With `reuse=True` a run whose record in results.json has the same fingerprint is
skipped (or only re-evaluated when the test set changed); an unfinished run with the same
fingerprint resumes from its last.pt; anything else trains from scratch. Without `reuse` every
selected run trains from scratch; records of runs not selected (`--only`) are kept.
"""

from __future__ import annotations

import copy
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..engine.cancel import CancelToken
from ..engine.checkpoint import checkpoint_iteration
from ..engine.events import EventWriter
from ..errors import CancelledError, DataError
from ..fileio import write_json_atomic
from .config import BenchConfig, Job, expand_jobs, settings_of
from .data import Split, prepare_splits
from .evaluation import TestSet, evaluate_checkpoint, resolve_test_set
from .report import speed_label
from .resources import machine_description, peak_memory, reset_peak_memory

RESULTS_FORMAT = "qgseg-benchmark-results"
RESULTS_VERSION = 1
RESULTS_FILE = "results.json"
STAMP_FILE = "bench_job.json"
CHECKPOINTS = ("best", "last")


class ResultsFile:
    """results.json: study metadata plus one record per run key, saved atomically."""

    def __init__(self, path: Path, header: Dict[str, Any]):
        self.path = Path(path)
        self.data: Dict[str, Any] = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, **header,
                                     "quality": {}, "runs": [], "speed": None}

    @staticmethod
    def read(path: str | Path) -> Dict[str, Any]:
        from ..fileio import read_json

        path = Path(path)
        data = read_json(path, "results file")
        if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
            raise DataError(f"{path}: not a benchmark results file (expected format {RESULTS_FORMAT!r})")
        return data

    def adopt(self, previous: Dict[str, Any]) -> None:
        """Keep the run records, quality predictors and speed numbers of an earlier results.json."""
        self.data["runs"] = list(previous.get("runs") or [])
        self.data["quality"] = dict(previous.get("quality") or {})
        self.data["speed"] = previous.get("speed")

    def record(self, key: str) -> Optional[Dict[str, Any]]:
        return next((r for r in self.data["runs"] if r.get("key") == key), None)

    def put(self, record: Dict[str, Any], order: List[str]) -> None:
        runs = [r for r in self.data["runs"] if r.get("key") != record["key"]] + [record]
        rank = {k: i for i, k in enumerate(order)}
        self.data["runs"] = sorted(runs, key=lambda r: rank.get(r["key"], len(rank)))
        self.save()

    def save(self) -> Path:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return write_json_atomic(self.path, self.data)


class RunStamp:
    """`bench_job.json` in a run folder: which configuration it holds and whether it finished."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / STAMP_FILE

    def read(self) -> Dict[str, Any]:
        import json

        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def matches(self, fingerprint: str, finished: Optional[bool] = None) -> bool:
        data = self.read()
        return data.get("fingerprint") == fingerprint and (finished is None or bool(data.get("finished")) == finished)

    def write(self, fingerprint: str, finished: bool, **extra: Any) -> None:
        write_json_atomic(self.path, {"fingerprint": fingerprint, "finished": finished, **extra})


class StudyRunner:
    """See module docstring. `device` overrides the config's device when given."""

    def __init__(self, config: BenchConfig, study_dir: str | Path, events: Optional[EventWriter] = None,
                 progress: bool = True, reuse: bool = False, test_dataset: str | Path | None = None,
                 command: Optional[List[str]] = None, device: Optional[str] = None, speed: bool = True,
                 report: bool = True, say=None):
        self.config = config
        self.study_dir = Path(study_dir)
        self.events = events or EventWriter()
        self.progress = progress
        self.reuse = reuse
        self.test_dataset = Path(test_dataset).resolve() if test_dataset else None
        self.command = command or ["qgseg", "bench", str(config.source or "")]
        self.device_name = device or str(config.train_options.get("device") or "auto")
        self.with_speed = speed
        self.with_report = report
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.cancel = CancelToken(self.study_dir)
        self.quality: Dict[str, Dict[str, Any]] = {}

    # --------------------------------------------------------------------------------- study
    def run(self) -> Path:
        from ..engine.device import resolve_device
        from ..engine.manifest import git_commit

        self.study_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(self.device_name)
        if self.config.train_options.get("num_threads"):
            import torch

            torch.set_num_threads(int(self.config.train_options["num_threads"]))
        header = {"study": self.config.name, "description": self.config.description,
                  "config_path": str(self.config.source or ""), "config": self.config.raw,
                  "quick": self.config.quick, "command": self.command, "commit": git_commit(),
                  "machine": machine_description(self.device), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "study_dir": str(self.study_dir.resolve())}
        self.results = ResultsFile(self.study_dir / RESULTS_FILE, header)
        if self.results.path.is_file():
            self.results.adopt(ResultsFile.read(self.results.path))
        splits = {s.name: s for s in prepare_splits(self.config.data, self.config.base_dir, self.study_dir / "data")}
        self.results.data["splits"] = {name: str(s.dataset) for name, s in splits.items()}
        self.test_sets = {name: resolve_test_set(s.dataset, self.test_dataset, self.config.evaluation.max_test_cases)
                          for name, s in splits.items()}
        self.results.save()
        jobs = expand_jobs(self.config)
        self.order = [j.key for j in jobs]
        failures: List[BaseException] = []
        quality_seeds = set(self.config.quality_seeds()) if self.config.needs_quality else set()
        for index, job in enumerate(jobs):
            self.cancel.check()
            key = f"{job.split}/seed{job.seed}"
            if job.seed in quality_seeds and key not in self.quality:  # g when its seed first comes up
                self.quality[key] = self.train_quality(splits[job.split], job.seed)
            self.events.emit("stage", name=f"run {job.key}", index=index + 1, total=len(jobs))
            try:
                self.run_job(job, splits[job.split])
            except (CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - one broken run must not cost the whole study
                failures.append(exc)
                self.record_failure(job, exc)
            self.events.progress(index + 1, len(jobs), stage="benchmark")
        if self.with_speed and self.config.speed.enabled:
            self.measure_speed(splits)
        self.results.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        path = self.results.save()
        if self.with_report:
            from .report import write_report

            report = write_report(path, out=self.study_dir / "BENCHMARKS.md")
            self.say(f"report: {report}")
        if failures:  # the study's exit code is that of its first failed run
            self.say(f"[bench] {len(failures)} run(s) failed; see 'error' in their records of {path}")
            raise failures[0]
        return path

    def record_failure(self, job: Job, exc: BaseException) -> None:
        """Keep going after a failed run: its record says why, its folder holds the traceback."""
        import traceback

        run_dir = self.run_dir(job)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        self.say(f"[bench] {job.key}: FAILED: {message}")
        self.events.warning(f"run {job.key} failed: {message}")
        self.results.put({"key": job.key, "split": job.split, "method": job.run.method,
                          "guidance": list(job.run.guidance), "label": job.run.label, "seed": job.seed,
                          "status": "failed", "error": message, "run_dir": str(run_dir),
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, self.order)

    # ------------------------------------------------------------------------------- quality
    def train_quality(self, split: Split, seed: int) -> Dict[str, Any]:
        """Train (or reuse) g for one split and seed; its record goes into results["quality"]."""
        from ..data.dataset import load_dataset
        from ..quality.train import train_quality_predictor

        key = f"{split.name}/seed{seed}"
        folder = self.study_dir / "quality" / split.name / f"seed{seed}"
        cfg = self.config.quality_config(seed)
        fingerprint = self.config.fingerprint(settings_of(cfg), str(split.dataset), str(self.device))
        stamp = RunStamp(folder)
        previous = self.results.data["quality"].get(key)
        if self.reuse and previous and stamp.matches(fingerprint, finished=True) \
                and Path(previous["checkpoint"]).is_file():
            self.say(f"[bench] quality predictor {key}: reusing {previous['checkpoint']}")
            return previous
        if not (self.reuse and stamp.matches(fingerprint, finished=False)):
            _remove(folder / "checkpoints")   # start over rather than resume a different configuration
        stamp.write(fingerprint, finished=False)
        self.say(f"[bench] quality predictor {key}: training")
        self.events.emit("stage", name=f"quality predictor {key}", index=1, total=1)
        started = time.time()
        result = train_quality_predictor(load_dataset(split.dataset), cfg, folder, events=self.events,
                                         progress=self.progress, device=self.device)
        record = {"key": key, "split": split.name, "seed": seed, "checkpoint": result["best_checkpoint"],
                  "calibration": result.get("calibration"), "curve": result.get("curve"),
                  "best_val_mae": result.get("best_val_mae"), "best_val_pearson": result.get("best_val_pearson"),
                  "epochs_run": result.get("epochs_run"), "wall_s": round(time.time() - started, 2),
                  "config": cfg.to_dict(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        stamp.write(fingerprint, finished=True)
        self.results.data["quality"][key] = record
        self.results.save()
        return record

    def quality_checkpoint(self, job: Job) -> Optional[str]:
        record = self.quality.get(f"{job.split}/seed{job.seed}")
        return record["checkpoint"] if record else None

    # ---------------------------------------------------------------------------------- runs
    def run_dir(self, job: Job) -> Path:
        return self.study_dir / "runs" / job.split / job.run.label.replace(",", "_") / f"seed{job.seed}"

    def run_job(self, job: Job, split: Split) -> Dict[str, Any]:
        """Train, evaluate and record one run (or skip / re-evaluate it when reusing)."""
        from ..engine.trainer import Trainer

        run_dir = self.run_dir(job)
        guided_ckpt = self.quality_checkpoint(job) if job.run.guidance else None
        cfg = self.config.train_config(job.run, job.seed, dataset=str(split.dataset),
                                       quality_checkpoint=guided_ckpt, cache_dir=str(self.study_dir / "cache"))
        quality = self.quality.get(f"{job.split}/seed{job.seed}") if guided_ckpt else None
        # a retrained g at the same path must invalidate the guided runs that used the old one
        fingerprint = self.config.fingerprint(settings_of(cfg), quality.get("finished") if quality else None)
        test_set = self.test_sets[job.split]
        previous = self.results.record(job.key)
        stamp = RunStamp(run_dir)
        if self.reuse and previous and previous.get("fingerprint") == fingerprint \
                and stamp.matches(fingerprint, finished=True) \
                and all(Path(p).is_file() for p in previous["checkpoints"].values()):
            if previous.get("test_source") == test_set.source and previous.get("evaluation_settings") == self._eval_settings():
                self.say(f"[bench] {job.key}: done already, skipped (--reuse)")
                return previous
            self.say(f"[bench] {job.key}: trained already; evaluating on {test_set.source}")
            record = dict(previous)
            record.update(self.evaluate(job, run_dir, previous["checkpoints"], test_set))
            self.results.put(record, self.order)
            return record

        resume = self.reuse and stamp.matches(fingerprint, finished=False)
        if not resume:
            _remove(run_dir / "checkpoints")
        stamp.write(fingerprint, finished=False, key=job.key)
        self.say(f"[bench] {job.key}: training ({cfg.iterations} iterations{', resuming' if resume else ''})")
        was_reset = reset_peak_memory(self.device)
        started = time.time()
        trainer = Trainer(cfg, run_dir, events=self.events, progress_bar=self.progress, resume=resume)
        result = trainer.fit()
        train_wall = time.time() - started
        write_json_atomic(run_dir / "history.json", result.history)
        checkpoints = {"best": str(result.best_checkpoint), "last": str(result.last_checkpoint)}
        evaluation = self.evaluate(job, run_dir, checkpoints, test_set)
        step_times = [h["step_time_s"] for h in result.history if h.get("step_time_s") is not None]
        record = {
            "key": job.key, "split": job.split, "method": job.run.method, "guidance": list(job.run.guidance),
            "label": job.run.label, "seed": job.seed, "status": "ok", "fingerprint": fingerprint,
            "run_dir": str(run_dir), "checkpoints": checkpoints,
            "best_iteration": result.best_iteration, "best_val_dice": result.best_metric,
            "iterations": result.iterations, "train_wall_s": round(result.wall_time_s, 2),
            "wall_s": round(time.time() - started, 2), "resumed": resume,
            "step_time_s": float(np.median(step_times)) if step_times else None,
            "peak_memory": peak_memory(self.device, was_reset), "device": str(trainer.device),
            "quality_checkpoint": guided_ckpt,
            "history": [{k: h.get(k) for k in ("iteration", "val_dice", "step_time_s", "train_loss")}
                        for h in result.history],
            "config": cfg.to_dict(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **evaluation,
        }
        record["peak_memory"]["includes"] = "training and test-set evaluation"
        stamp.write(fingerprint, finished=True, key=job.key)
        self.results.put(record, self.order)
        best = record["evaluation"]["best"]["summary"].get("dice", {}).get("mean", float("nan"))
        self.say(f"[bench] {job.key}: test Dice (best checkpoint) {best:.4f}; {train_wall / 60:.1f} min training")
        return record

    def _eval_settings(self) -> Dict[str, Any]:
        ev = self.config.evaluation
        return {"overlap": float(ev.overlap), "max_test_cases": ev.max_test_cases}

    def predictions_dir(self, run_dir: Path, test_set: TestSet) -> Path:
        """`predictions/` for the study's own test split; one folder per external test dataset."""
        if self.test_dataset is None:
            return run_dir / "predictions"
        return run_dir / f"predictions-{self.config.fingerprint(test_set.source)[:8]}"

    def evaluate(self, job: Job, run_dir: Path, checkpoints: Dict[str, str], test_set: TestSet) -> Dict[str, Any]:
        """Both checkpoints on the test set; g of the run's split and seed scores the predictions
        when the study trained one (guided or not, so every method gets a predicted quality).
        Only the run's own CANCEL file interrupts it: the study's CANCEL waits for the run to end."""
        from ..quality.predictor import load_predictor

        quality = self.quality.get(f"{job.split}/seed{job.seed}")
        model = load_predictor(quality["checkpoint"], device=self.device) if quality else None
        out: Dict[str, Any] = {}
        saved = self.predictions_dir(run_dir, test_set) if self.config.evaluation.save_predictions else None
        iterations = {which: checkpoint_iteration(checkpoints[which]) for which in CHECKPOINTS}
        for which in CHECKPOINTS:
            twin = next((w for w in out if iterations[which] is not None and iterations[w] == iterations[which]), None)
            if twin is not None:  # best is the last checkpoint: same weights, same predictions
                out[which] = {**copy.deepcopy(out[twin]), "checkpoint": str(checkpoints[which]), "same_as": twin}
                if saved is not None:
                    shutil.copytree(saved / twin, saved / which, dirs_exist_ok=True)
                continue
            out[which] = evaluate_checkpoint(checkpoints[which], test_set, self.device,
                                             overlap=self.config.evaluation.overlap,
                                             out_dir=saved / which if saved is not None else None,
                                             quality_model=model, cancel=CancelToken(run_dir))
        measured = [which for which in CHECKPOINTS if "same_as" not in out[which]]
        segment = [r["segment_s"] for which in measured for r in out[which]["cases"]]
        scoring = [r["quality_s"] for which in measured for r in out[which]["cases"] if "quality_s" in r]
        return {"evaluation": out, "test_source": test_set.source,
                "predictions": str(self.predictions_dir(run_dir, test_set)) if self.config.evaluation.save_predictions else None, "test_cases": [c.id for c in test_set.cases],
                "evaluation_settings": self._eval_settings(),
                "inference": {"segment_s_median": float(np.median(segment)),
                              "quality_s_median": float(np.median(scoring)) if scoring else None,
                              "volumes": len(segment)}}

    # --------------------------------------------------------------------------------- speed
    def measure_speed(self, splits: Dict[str, Split]) -> None:
        """Time each guided run against its host. Rows are kept per run: with `reuse` a row whose
        fingerprint is unchanged is not measured again, and rows of runs not selected now
        (`--only`) stay, like their run records."""
        from ..data.dataset import load_dataset
        from .speed import measure_speed, speed_methods

        split = next(iter(splits.values()))
        n_classes = load_dataset(split.dataset).n_classes
        seed0 = self.config.quality_seeds()[0] if self.config.needs_quality else None
        quality = self.quality.get(f"{split.name}/seed{seed0}") if seed0 is not None else None
        methods = speed_methods(self.config)
        if not methods:
            return
        sp = self.config.speed
        fingerprints = {run.label: self.config.fingerprint(self.config.train_options, self.config.quality,
                                                           (sp.steps, sp.warmup, sp.rounds), run.label,
                                                           run.train, str(self.device))
                        for run in methods}
        previous = (self.results.data.get("speed") or {}).get("methods") or []
        reusable = {row.get("fingerprint"): row for row in previous} if self.reuse else {}
        todo = [run for run in methods if fingerprints[run.label] not in reusable]
        if not todo:
            self.say("[bench] speed: measured already, skipped (--reuse)")
            return
        self.say(f"[bench] speed: {', '.join(run.label for run in todo)} against their host methods")
        self.events.emit("stage", name="speed", index=1, total=1)
        measured = measure_speed(self.config, todo, n_classes, self.device,
                                 quality_checkpoint=quality["checkpoint"] if quality else None,
                                 dataset=split.dataset)
        new_rows = {run.label: {**row, "fingerprint": fingerprints[run.label]} for run, row in zip(todo, measured)}
        rows = [new_rows.get(run.label) or reusable[fingerprints[run.label]] for run in methods]
        rows += [row for row in previous if speed_label(row) not in fingerprints]  # runs not selected now
        self.results.data["speed"] = {"device": str(self.device), "steps": sp.steps, "warmup": sp.warmup,
                                      "rounds": sp.rounds,
                                      "predictor": "trained" if quality else "random-init (timing only)",
                                      "methods": rows}
        self.results.save()


def _remove(folder: Path) -> None:
    """Delete a checkpoints folder this study created (so a run starts from scratch)."""
    if folder.is_dir() and folder.name == "checkpoints":
        shutil.rmtree(folder)
