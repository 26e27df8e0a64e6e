"""A Train job run on another machine (a GPU server), then read back into the scene.

The panel's *Prepare for another machine* writes a job folder (images, labels, dataset.json,
job.json) without starting anything. Copied to a machine with the backend installed,
`qgseg job run FOLDER` runs the stages a Train click would (`pipeline.RunPipeline`), with paths
taken from where the folder is now; rerunning it skips finished stages and resumes an interrupted
one from its checkpoint (a CANCEL file the panel's Cancel, or Slicer closing during the run, left
in that stage's folder is removed first). Copied back, the panel's *Import finished run* reads it with
`finished_run`, which finds every checkpoint inside the folder wherever it was run.

Pure Python (no Qt, no torch at import), like the rest of QGSegmentationLib.slicer.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..engine.events import ProtocolError, read_events
from ..errors import DataError
from ..fileio import atomic_path
from . import jobs, pipeline
from .runner import clear_stale_cancel

StageRunner = Callable[[List[str]], int]  # `qgseg` arguments -> exit code


def stage_outputs(events_path: str | os.PathLike) -> Optional[Dict[str, str]]:
    """The outputs of a stage whose event stream ended with `done` ok; None when it has not (not
    started, still running, cancelled, failed, or a stream that cannot be read)."""
    try:
        events = read_events(events_path, strict=False)
    except (OSError, ProtocolError):
        return None
    done = [e for e in events if e["event"] == "done"]
    if not done or done[-1]["status"] != "ok":
        return None
    return dict(done[-1].get("outputs") or {})


def in_folder(folder: jobs.JobFolder, path: str) -> Path:
    """A path recorded in a job folder, found in the folder as it is now: relative paths are
    relative to its root; an absolute one below a folder of the same name (where this folder was
    when it was written, on this machine or another) is taken below this folder instead, even if
    the old copy still exists; other absolute paths are kept."""
    candidate = Path(path)
    if not candidate.is_absolute():
        return folder.root / candidate
    parts = candidate.parts
    if folder.run_id in parts:
        inside = folder.root.joinpath(*parts[len(parts) - parts[::-1].index(folder.run_id):])
        if inside.exists() or not candidate.exists():
            return inside
    return candidate


def _relative(folder: jobs.JobFolder, path: Optional[str]) -> str:
    if not path:
        return ""
    try:
        return Path(path).resolve().relative_to(folder.root.resolve()).as_posix()
    except ValueError:
        return str(path)  # outside the folder (a second-opinion model folder): kept as given


def load_train_job(root: str | os.PathLike) -> tuple:
    """(JobFolder, JobSpec, TrainingOptions) of a Train job folder; DataError naming the problem."""
    folder = jobs.JobFolder(Path(os.path.abspath(root)))
    if not folder.root.is_dir():
        raise DataError(f"{folder.root}: folder not found")
    if not folder.job_json.is_file():
        raise DataError(f"{folder.root}: no job.json here; give the folder the panel's "
                        "'Prepare for another machine' wrote (it holds job.json, dataset.json, images/)")
    try:
        spec = jobs.read_job_spec(folder.job_json)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if spec.kind != "train":
        raise DataError(f"{folder.job_json}: a {spec.kind!r} job; only Train jobs run elsewhere "
                        "(a Segment job uses a model that lives on the Slicer machine)")
    if not folder.dataset_json.is_file():
        raise DataError(f"{folder.dataset_json}: missing; copy the whole job folder")
    try:
        options = jobs.TrainingOptions(**spec.options).validate()
    except (TypeError, ValueError) as exc:
        raise DataError(f"{folder.job_json}: options are not valid ({exc})") from None
    return folder, spec, options


SECOND_OPINION_MODEL = "second-opinion-model"


def bundle_second_opinion(folder: jobs.JobFolder, model_folder: str | os.PathLike) -> str:
    """Copy a second-opinion model folder's segmenter into the job folder, so the job runs on a
    machine that lacks the model folder; returns the path to record (relative to the job folder)."""
    segmenter = jobs.model_segmenter(model_folder, "second-opinion model folder")
    target = folder.root / SECOND_OPINION_MODEL
    target.mkdir(parents=True, exist_ok=True)
    with atomic_path(target / segmenter.name) as tmp:
        shutil.copyfile(segmenter, tmp)
    return SECOND_OPINION_MODEL


def run_job_folder(root: str | os.PathLike, run_stage: StageRunner, device: Optional[str] = None,
                   say: Callable[[str], None] = print) -> int:
    """Run (or finish) every stage of a Train job folder; returns 0, or the failing stage's exit
    code. Finished stages are skipped; the job spec records each checkpoint relative to the folder."""
    folder, spec, options = load_train_job(root)
    if device is not None:
        options.device = device
    second_opinion = None
    if options.second_opinion:
        model = in_folder(folder, options.second_opinion)
        if not model.exists():
            raise DataError(f"{folder.job_json}: its second-opinion model folder {options.second_opinion} "
                            "is not on this machine; copy it here and edit the path in job.json, or clear it")
        second_opinion = str(jobs.model_segmenter(model, "second-opinion model folder"))
    run = pipeline.RunPipeline.for_training(folder, options, segment=any(c.role == "unlabeled" for c in spec.cases),
                                            second_opinion=second_opinion)
    stage = run.start()
    while stage is not None:
        title = f"stage {stage.index}/{stage.total}: {stage.name}"
        outputs = stage_outputs(stage.events)
        if outputs is not None:  # its paths may name where the folder was then: find them here
            outputs = {k: str(in_folder(folder, v)) if isinstance(v, str) and Path(v).is_absolute() else v
                       for k, v in outputs.items()}
            say(f"{title}: finished before, skipped")
        else:
            say(f"{title}\n$ qgseg {' '.join(stage.arguments)}")
            if clear_stale_cancel(stage.run_dir):
                say(f"removed {stage.run_dir / 'CANCEL'}, left by the cancelled run: resuming")
            code = run_stage(stage.arguments)
            outputs = stage_outputs(stage.events)
            if code != 0 or outputs is None:
                say(f"{title} ended with exit code {code}; its events: {stage.events}. "
                    "Run the same command again to resume it.")
                return code or 1
        stage = run.finish(outputs)
        spec.quality_checkpoint = _relative(folder, run.quality_checkpoint)
        spec.checkpoint = _relative(folder, run.checkpoint)
        spec.second_opinion_checkpoint = _relative(folder, run.second_opinion)
        jobs.write_job_spec(folder, spec)
    say(f"done: copy {folder.root} back and choose it in the panel's 'Import finished run'")
    return 0


@dataclass(frozen=True)
class FinishedRun:
    """A Train job folder whose stages all ended ok, with its models found inside it."""

    folder: jobs.JobFolder
    spec: jobs.JobSpec
    checkpoint: str
    quality_checkpoint: str
    second_opinion: str


def finished_run(root: str | os.PathLike) -> FinishedRun:
    """Read a finished Train job folder back (wherever it ran); ValueError naming the first stage
    that has not ended ok, or a model that is missing."""
    folder, spec, options = load_train_job(root)
    segment = any(c.role == "unlabeled" for c in spec.cases)
    names = pipeline.RunPipeline.for_training(folder, options, segment=segment).names
    unfinished = next((name for name in names if stage_outputs(pipeline.stage_events(folder, name)) is None), None)
    if unfinished is not None:
        events = pipeline.stage_events(folder, unfinished)
        raise ValueError(f"{folder.root}: the run has not finished: stage '{unfinished}' has not ended ok "
                         f"({events}); run `qgseg job run {folder.root}` where it ran")
    models = {}
    for name, recorded in (("segmenter", spec.checkpoint), ("quality predictor", spec.quality_checkpoint),
                           ("second opinion", spec.second_opinion_checkpoint)):
        path = in_folder(folder, recorded) if recorded else None
        if recorded and not path.exists():
            raise ValueError(f"{folder.job_json}: its {name} {recorded} is not in the folder")
        models[name] = str(path) if path else ""
    if not models["segmenter"]:
        raise ValueError(f"{folder.job_json}: records no segmenter checkpoint")
    return FinishedRun(folder, spec, models["segmenter"], models["quality predictor"], models["second opinion"])
