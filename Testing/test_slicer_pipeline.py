"""The panel's run pipeline (QGSegmentationLib.slicer.pipeline): which stages a Train or Segment
click runs, in which order, and which checkpoints flow from one stage to the next. The end-to-end
test starts the real `qgseg` workers exactly as the panel does, on a tiny phantom."""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import pytest

from QGSegmentationLib.data.phantom import make_phantom_dataset
from QGSegmentationLib.engine.events import validate_stream
from QGSegmentationLib.slicer import pipeline
from QGSegmentationLib.slicer.jobs import TrainingOptions, create_job_folder
from QGSegmentationLib.slicer.pipeline import RunPipeline
from QGSegmentationLib.slicer.runner import WorkerRunner, worker_command, worker_environment

from conftest import REPO


def test_stage_order_follows_the_options(tmp_path):
    folder = create_job_folder(tmp_path)
    plain = RunPipeline.for_training(folder, TrainingOptions(), segment=True)
    assert plain.names == (pipeline.QUALITY, pipeline.SEGMENTER, pipeline.SEGMENT)
    second = RunPipeline.for_training(folder, TrainingOptions(train_second_opinion=True), segment=True)
    assert second.names == (pipeline.QUALITY, pipeline.SEGMENTER, pipeline.SECOND_OPINION, pipeline.SEGMENT)
    nothing_to_segment = RunPipeline.for_training(folder, TrainingOptions(train_second_opinion=True), segment=False)
    assert nothing_to_segment.names == (pipeline.QUALITY, pipeline.SEGMENTER)
    only = RunPipeline.for_segmenting(folder, TrainingOptions(device="cpu", mirror=False), "/m/best.pt",
                                      "/q/best.pt", "/o/segmenter.pt")
    stage = only.start()
    assert (stage.name, stage.index, stage.total) == (pipeline.SEGMENT, 1, 1)
    args = stage.arguments
    assert args[args.index("--checkpoint") + 1] == "/m/best.pt"
    assert args[args.index("--input") + 1] == str(folder.images_dir) and "--split" not in args
    assert args[args.index("--second-opinion") + 1] == "/o/segmenter.pt" and "--no-mirror" in args
    with pytest.raises(RuntimeError, match="already started"):
        only.start()


def test_second_opinion_folder_and_training_one_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        RunPipeline.for_training(create_job_folder(tmp_path),
                                 TrainingOptions(second_opinion="/o", train_second_opinion=True), segment=True)


def test_a_run_s_model_is_whole_only_after_its_last_training_stage(tmp_path):
    """The panel replaces its current model (g, segmenter, second opinion, segment names) only once
    a run has trained all of it: a run cancelled while training the segmenter or the second
    opinion leaves the old model whole. Segmenting with a model never makes a new one."""
    folder = create_job_folder(tmp_path)
    made = {}
    for name in ("g.pt", "segmenter.pt", "second.pt"):
        made[name] = tmp_path / name
        made[name].write_bytes(b"")
    run = RunPipeline.for_training(folder, TrainingOptions(train_second_opinion=True), segment=True)
    run.start()
    assert not run.trained
    run.finish({"checkpoint": str(made["g.pt"])})
    assert run.current == pipeline.SEGMENTER and not run.trained
    run.finish({"checkpoint": str(made["segmenter.pt"])})
    assert run.current == pipeline.SECOND_OPINION and not run.trained
    run.finish({"checkpoint": str(made["second.pt"])})
    assert run.current == pipeline.SEGMENT and run.trained
    assert run.finish({}) is None and run.trained
    only = RunPipeline.for_training(folder, TrainingOptions(), segment=False)
    only.start()
    only.finish({"checkpoint": str(made["g.pt"])})
    assert not only.trained
    only.finish({"checkpoint": str(made["segmenter.pt"])})
    assert only.current is None and only.trained
    segmenting = RunPipeline.for_segmenting(folder, TrainingOptions(), str(made["segmenter.pt"]))
    segmenting.start()
    segmenting.finish({})
    assert not segmenting.trained


def test_a_stage_that_left_no_checkpoint_stops_the_pipeline_with_its_folder(tmp_path):
    folder = create_job_folder(tmp_path)
    run = RunPipeline.for_training(folder, TrainingOptions(), segment=True)
    run.start()
    with pytest.raises(ValueError, match="quality.*no checkpoint"):
        run.finish({})


def run_worker(stage: pipeline.Stage, timeout_s: float = 300) -> dict:
    env = worker_environment({**os.environ, "OMP_NUM_THREADS": "1"}, REPO)
    runner = WorkerRunner(worker_command(sys.executable, stage.arguments), stage.run_dir, stage.events,
                          env=env).start()
    deadline = time.monotonic() + timeout_s
    while not runner.poll().finished:
        assert time.monotonic() < deadline, f"{stage.name} still running after {timeout_s} s"
        time.sleep(0.2)
    result = runner.result()
    assert result.ok, (stage.name, runner.error)
    validate_stream(runner.events)
    return result.outputs


RECORDED = REPO / "QGSegmentation" / "Testing" / "Python" / "events"  # streams of a real tiny run


def test_the_stage_line_names_the_workers_step(tmp_path):
    """Between the weak segmenters and g the bar goes from 100% to 0: the line says why."""
    from QGSegmentationLib.engine.events import EventWriter, MemberEvents, read_events

    line = pipeline.StageLine()
    assert line.update({"event": pipeline.RUN_STAGE_EVENT, "name": pipeline.QUALITY, "index": 1,
                        "total": 3}) == "Stage 1/3: quality predictor"
    shown = [text for text in map(line.update, read_events(RECORDED / "quality-events.jsonl")) if text]
    assert shown == ["Stage 1/3: quality predictor - loading cases (1/4)",
                     "Stage 1/3: quality predictor - weak segmenter snapshots (2/4)",
                     "Stage 1/3: quality predictor - quality predictor (3/4)",
                     "Stage 1/3: quality predictor - calibration (4/4)"]
    assert line.update({"event": "metric", "name": "dice", "value": 0.5}) is None

    writer = EventWriter.open(tmp_path / "events.jsonl", run_id="q")  # g trained with two seeds
    for k, seed in enumerate((3, 4)):
        member = MemberEvents(writer, f"seed {seed} ({k + 1} of 2): ", share=(k, 2))
        member.stage("weak segmenter snapshots", 2, 4)
        member.progress(1, 10, stage="weak segmenter")
    writer.close()
    shown = [text for text in map(line.update, read_events(tmp_path / "events.jsonl")) if text]
    assert shown == ["Stage 1/3: quality predictor - seed 3 (1 of 2): weak segmenter snapshots (2/4)",
                     "Stage 1/3: quality predictor - seed 4 (2 of 2): weak segmenter snapshots (2/4)"]

    line.update({"event": pipeline.RUN_STAGE_EVENT, "name": pipeline.SEGMENT, "index": 3, "total": 3})
    assert line.text == "Stage 3/3: segment and score"  # the last stage's step is not this one's
    shown = [text for text in map(line.update, read_events(RECORDED / "predict-events.jsonl")) if text]
    assert shown == ["Stage 3/3: segment and score - segment"]
    only_progress = pipeline.StageLine()  # a worker naming its step only in its progress events
    only_progress.update({"event": pipeline.RUN_STAGE_EVENT, "name": pipeline.SEGMENTER, "index": 2, "total": 3})
    assert only_progress.update({"event": "progress", "step": 1, "total": 6, "stage": "train"}) == \
        "Stage 2/3: segmenter - train"


def test_train_click_with_a_trained_second_opinion_end_to_end(tmp_path):
    """g (two seeds) -> segmenter (two seeds) -> second-opinion segmenter -> segment and score, with
    real workers: g's ensemble guides both segmenter members and scores the results of their
    ensemble, the second segmenter is supervised with the first seed no member used, and
    scores.csv carries its opinion."""
    from QGSegmentationLib.engine.checkpoint import load_checkpoint
    from QGSegmentationLib.quality.predictor import QualityEnsemble, load_predictor

    folder = create_job_folder(tmp_path / "out")
    make_phantom_dataset(folder.root, n_labeled=2, n_unlabeled=2, n_validation=1, shape=(16, 32, 32), seed=4)
    options = TrainingOptions(architecture="unet", ssl_method="pl", iterations=2, batch_size=1, patch_size=32,
                              device="cpu", quality_epochs=1, mirror=False, seed=3, train_second_opinion=True,
                              quality_seeds=2, segmenter_seeds=2)
    run = RunPipeline.for_training(folder, options, segment=True)
    stage, seen = run.start(), []
    while stage is not None:
        seen.append((stage.name, stage.index, stage.total))
        stage = run.finish(run_worker(stage))
    assert [name for name, _, _ in seen] == [pipeline.QUALITY, pipeline.SEGMENTER, pipeline.SECOND_OPINION,
                                             pipeline.SEGMENT]
    assert seen[-1][1:] == (4, 4) and run.current is None
    assert run.quality_checkpoint == str(folder.quality_dir / "checkpoints" / "best.pt")
    g = load_predictor(run.quality_checkpoint)
    assert isinstance(g, QualityEnsemble) and len(g.members) == 2
    assert json.loads((folder.run_dir / "manifest.json").read_text())["config"]["quality_checkpoint"] == \
        run.quality_checkpoint
    assert run.checkpoint.startswith(str(folder.run_dir))
    assert load_checkpoint(run.checkpoint)["ensemble_seeds"] == [3, 4]
    assert run.second_opinion.startswith(str(folder.second_opinion_run_dir))
    manifest = json.loads((folder.second_opinion_run_dir / "manifest.json").read_text())
    assert (manifest["config"]["method"], manifest["seed"]) == ("sup", 5)
    with open(folder.scores_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for row in rows:
        assert 0.0 <= float(row["second_opinion_dice"]) <= 1.0 and row["predicted_quality"]
        assert (folder.predictions_dir / f"{row['case']}.seg.nrrd").is_file()
