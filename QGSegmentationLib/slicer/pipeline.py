"""The order of a run's workers, and what each stage hands to the next.

A Train click runs, one worker after the other: the quality predictor g, the segmenter (guided by
g), optionally a second, supervised segmenter for the second opinion, then segmenting + scoring
the unlabeled volumes. A Segment click runs the last stage only. The module's Logic starts each
stage's worker and gives the finished stage's `done` outputs back here; the decisions (which
stage comes next, with which checkpoints) live here, in pure Python, so they are tested with real
workers outside Slicer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import jobs

QUALITY = "quality predictor"
SEGMENTER = "segmenter"
SECOND_OPINION = "second-opinion segmenter"
SEGMENT = "segment and score"

# The event the module's Logic emits when it starts a stage's worker (a worker's own `stage` events
# name the steps inside it).
RUN_STAGE_EVENT = "run_stage"

# stage -> (its run folder in the JobFolder, the pipeline attribute its checkpoint goes to)
_PRODUCES = {QUALITY: ("quality_dir", "quality_checkpoint"), SEGMENTER: ("run_dir", "checkpoint"),
             SECOND_OPINION: ("second_opinion_run_dir", "second_opinion")}


# stage -> the JobFolder attribute naming the events file its worker writes
_EVENTS = {QUALITY: "quality_events", SEGMENTER: "train_events", SECOND_OPINION: "second_opinion_events",
           SEGMENT: "predict_events"}


def stage_events(folder: jobs.JobFolder, name: str) -> Path:
    """The events file of stage `name` in `folder`."""
    return getattr(folder, _EVENTS[name])


@dataclass(frozen=True)
class Stage:
    """One worker to start: its `qgseg` arguments, the run folder that receives the CANCEL file,
    and the events file the panel follows."""

    name: str
    index: int  # 1-based, for "stage k/n"
    total: int
    arguments: List[str]
    run_dir: Path
    events: Path


class RunPipeline:
    """Walks a job's stages. `second_opinion` is a segmenter checkpoint chosen by the user; with
    `options.train_second_opinion` the pipeline trains one instead."""

    def __init__(self, folder: jobs.JobFolder, options: jobs.TrainingOptions, names: Tuple[str, ...],
                 second_opinion: Optional[str] = None, quality_checkpoint: Optional[str] = None,
                 checkpoint: Optional[str] = None, from_dataset: bool = True):
        self.folder = folder
        self.options = options
        self.names = names
        self.second_opinion = second_opinion
        self.quality_checkpoint = quality_checkpoint
        self.checkpoint = checkpoint
        self.from_dataset = from_dataset
        self._position = -1

    @classmethod
    def for_training(cls, folder: jobs.JobFolder, options: jobs.TrainingOptions, segment: bool,
                     second_opinion: Optional[str] = None) -> "RunPipeline":
        """g, the segmenter, the optional second-opinion segmenter, and (when there are unlabeled
        volumes to segment) segmenting + scoring them."""
        options.validate()
        names = (QUALITY, SEGMENTER)
        if segment:
            names += ((SECOND_OPINION,) if options.train_second_opinion else ()) + (SEGMENT,)
        return cls(folder, options, names, second_opinion=second_opinion)

    @classmethod
    def for_segmenting(cls, folder: jobs.JobFolder, options: jobs.TrainingOptions, checkpoint: str,
                       quality_checkpoint: Optional[str] = None,
                       second_opinion: Optional[str] = None) -> "RunPipeline":
        """Segment + score every image of the job folder with an existing model."""
        return cls(folder, options, (SEGMENT,), second_opinion=second_opinion,
                   quality_checkpoint=quality_checkpoint, checkpoint=checkpoint, from_dataset=False)

    @property
    def current(self) -> Optional[str]:
        return self.names[self._position] if 0 <= self._position < len(self.names) else None

    @property
    def trained(self) -> bool:
        """Every training stage of this run has finished, so its model (g, segmenter, second
        opinion) is whole and may replace the panel's current one. A run cancelled or failed
        before then must leave the current model as it was, not half replaced."""
        finished = self.names[:max(self._position, 0)]
        return self.from_dataset and all(name in finished for name in self.names if name != SEGMENT)

    def start(self) -> Stage:
        if self._position != -1:
            raise RuntimeError("the pipeline has already started")
        return self._advance()

    def finish(self, outputs: Optional[Dict[str, str]] = None) -> Optional[Stage]:
        """Record what the current stage produced; return the next stage, or None when done."""
        name = self.current
        if name is None:
            raise RuntimeError("no stage is running")
        if name in _PRODUCES:
            run_dir, model = _PRODUCES[name]
            setattr(self, model, str(jobs.find_checkpoint(getattr(self.folder, run_dir), outputs)))
        if self._position + 1 == len(self.names):
            self._position = len(self.names)  # done: `current` is None from now on
            return None
        return self._advance()

    def _advance(self) -> Stage:
        self._position += 1
        name = self.names[self._position]
        arguments, run_dir, events = self._worker(name)
        return Stage(name, self._position + 1, len(self.names), arguments, run_dir, events)

    def _worker(self, name: str) -> Tuple[List[str], Path, Path]:
        folder, options = self.folder, self.options
        if name == QUALITY:
            arguments, run_dir = jobs.quality_arguments(folder, options), folder.quality_dir
        elif name == SEGMENTER:
            arguments, run_dir = jobs.train_arguments(folder, options, self.quality_checkpoint), folder.run_dir
        elif name == SECOND_OPINION:
            arguments, run_dir = jobs.second_opinion_train_arguments(folder, options), folder.second_opinion_run_dir
        else:
            arguments = jobs.predict_arguments(folder, self.checkpoint, options.device, self.quality_checkpoint,
                                               from_dataset=self.from_dataset, mirror=options.mirror,
                                               second_opinion=self.second_opinion)
            run_dir = folder.predict_run_dir
        return arguments, run_dir, stage_events(folder, name)


class StageLine:
    """The Run section's stage line: which of the run's stages is going and what its worker is
    doing in it, e.g. "Stage 1/3: quality predictor - seed 1 (2 of 2): weak segmenter snapshots (2/4)".

    Workers report their own steps as `stage` events (quality training: loading cases, weak
    segmenter snapshots, quality predictor, calibration, each prefixed with its seed in an
    ensemble) and name the step of each `progress` event; every step's progress bar starts at 0
    again, which the line explains. `update(event)` takes the Logic's RUN_STAGE_EVENT (a new
    stage, its step not known yet) and the worker's events; it returns the new line when it
    changed, else None."""

    def __init__(self) -> None:
        self.stage: Optional[Tuple[str, int, int]] = None  # (name, k, n)
        self.step = ""
        self._step_from_stage_event = False

    @property
    def text(self) -> str:
        if self.stage is None:
            return ""
        name, index, total = self.stage
        line = f"Stage {index}/{total}: {name}"
        return f"{line} - {self.step}" if self.step else line

    def update(self, event: Mapping[str, Any]) -> Optional[str]:
        before = self.text
        kind = event.get("event")
        if kind == RUN_STAGE_EVENT:
            self.stage = (str(event["name"]), int(event["index"]), int(event["total"]))
            self.step, self._step_from_stage_event = "", False
        elif kind == "stage":
            total = int(event.get("total") or 1)
            self.step = str(event["name"]) + (f" ({int(event['index'])}/{total})" if total > 1 else "")
            self._step_from_stage_event = True
        elif kind == "progress" and event.get("stage") and not self._step_from_stage_event:
            self.step = str(event["stage"])  # a worker that names its steps only in its progress
        else:
            return None
        return self.text if self.text != before else None
