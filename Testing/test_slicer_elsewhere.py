"""A Train job prepared by the panel, run on another machine with `qgseg job run`, and read back:
the real workers on a tiny phantom, the folder moved between "machines" (directories) each way."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest

from QGSegmentationLib.data.phantom import make_phantom_dataset
from QGSegmentationLib.engine.cancel import request_cancel
from QGSegmentationLib.engine.events import read_events
from QGSegmentationLib.slicer import jobs
from QGSegmentationLib.slicer.elsewhere import bundle_second_opinion, finished_run, in_folder, stage_outputs

from conftest import run_cli

OPTIONS = jobs.TrainingOptions(architecture="unet", ssl_method="pl", iterations=2, batch_size=1, patch_size=32,
                               device="cuda", quality_epochs=1, mirror=False, seed=3)


def prepared_job(root, second_opinion_model=None):
    """What 'Prepare for another machine' leaves: exported files, dataset.json and job.json (and
    the segmenter of a chosen second-opinion model)."""
    folder = jobs.create_job_folder(root)
    dataset = json.loads(make_phantom_dataset(folder.root, n_labeled=2, n_unlabeled=2, n_validation=1,
                                              shape=(16, 32, 32), seed=4).read_text())
    cases = [jobs.CaseEntry(f"l{i}", f"vtkMRMLScalarVolumeNode{i}", f"L{i}", "labeled", f"vtkMRMLSegmentationNode{i}")
             for i in range(3)]
    cases += [jobs.CaseEntry(image.split("/")[-1].replace(".nrrd", ""), f"vtkMRMLScalarVolumeNode{9 + i}", f"U{i}",
                             "unlabeled") for i, image in enumerate(dataset["unlabeled"])]
    options = asdict(OPTIONS)
    if second_opinion_model:
        options["second_opinion"] = bundle_second_opinion(folder, second_opinion_model)
    spec = jobs.JobSpec(kind="train", run_id=folder.run_id, cases=cases, options=options,
                        label_names=["organ"])
    jobs.write_job_spec(folder, spec)
    return folder


def test_a_job_runs_on_another_machine_and_is_read_back_where_it_was_prepared(tmp_path):
    laptop = prepared_job(tmp_path / "laptop")
    with pytest.raises(ValueError, match="stage 'quality predictor' has not ended ok"):
        finished_run(laptop.root)

    server = tmp_path / "server" / laptop.run_id
    shutil.copytree(laptop.root, server)
    res = run_cli("job", "run", str(server), "--device", "cpu")  # the panel chose cuda; this machine has none
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert [line.split(":")[1].strip() for line in res.stdout.splitlines() if line.startswith("stage ")] == [
        "quality predictor", "segmenter", "segment and score"]
    spec = json.loads((server / "job.json").read_text())
    assert (spec["checkpoint"], spec["quality_checkpoint"]) == ("run/checkpoints/best.pt",
                                                                "quality/checkpoints/best.pt")
    manifest = json.loads((server / "run" / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["config"]["dataset"] == str(server / "dataset.json")

    back = tmp_path / "laptop-again" / laptop.run_id
    shutil.copytree(server, back)
    run = finished_run(back)
    assert run.checkpoint == str(back / "run" / "checkpoints" / "best.pt")
    assert run.quality_checkpoint == str(back / "quality" / "checkpoints" / "best.pt") and run.second_opinion == ""
    unlabeled = [c.case for c in run.spec.cases if c.role == "unlabeled"]
    assert all(run.folder.prediction_path(case).is_file() for case in unlabeled)
    assert sorted(line.split(",")[0] for line in run.folder.scores_csv.read_text().splitlines()[1:]) == sorted(unlabeled)

    # interrupted before its last stage ended, and moved: the rerun skips what finished (whose
    # events name the old place) and runs the rest with the models found in the new place
    (back / "predict-events.jsonl").unlink()
    shutil.rmtree(back / "predictions")
    run.folder.train_events.write_text("".join(run.folder.train_events.read_text().splitlines(True)[:3]))  # cut off
    request_cancel(run.folder.run_dir)  # left by the panel's Cancel (or Slicer closing mid-run): no reason to stop
    again = run_cli("job", "run", str(back), "--device", "cpu")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert again.stdout.count("finished before, skipped") == 1  # g; the segmenter's stage ran again,
    assert "left by the cancelled run" in again.stdout and not (run.folder.run_dir / "CANCEL").exists()
    assert any(e["event"] == "note" and "nothing to train" in e["message"]  # found its last.pt finished
               for e in read_events(run.folder.train_events))
    assert stage_outputs(back / "predict-events.jsonl") is not None
    assert all((back / "predictions" / f"{case}.seg.nrrd").is_file() for case in unlabeled)
    predict = json.loads((back / "predict-run" / "manifest.json").read_text())["command"]
    assert predict[predict.index("--checkpoint") + 1] == str(back / "run" / "checkpoints" / "best.pt")


def test_a_chosen_second_opinion_model_travels_with_the_job(tmp_path):
    first = prepared_job(tmp_path / "first")
    assert run_cli("job", "run", str(first.root), "--device", "cpu").returncode == 0
    model = tmp_path / "models" / "other"
    jobs.save_model_folder(model, first.run_dir / "checkpoints" / "best.pt")
    laptop = prepared_job(tmp_path / "laptop", second_opinion_model=model)
    server = tmp_path / "server" / laptop.run_id
    shutil.copytree(laptop.root, server)
    shutil.rmtree(model)  # the other machine has no such folder
    res = run_cli("job", "run", str(server), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    run = finished_run(server)
    assert run.second_opinion == str(server / "second-opinion-model" / jobs.MODEL_SEGMENTER_FILE)
    rows = run.folder.scores_csv.read_text().splitlines()
    assert "second_opinion_dice" in rows[0] and len(rows) == 3


def test_job_run_refuses_what_it_cannot_run_with_exit_2(tmp_path):
    res = run_cli("job", "run", str(tmp_path))
    assert res.returncode == 2 and "no job.json" in res.stderr
    folder = prepared_job(tmp_path / "segment")
    spec = json.loads(folder.job_json.read_text())
    folder.job_json.write_text(json.dumps({**spec, "kind": "predict"}))
    res = run_cli("job", "run", str(folder.root))
    assert res.returncode == 2 and "only Train jobs" in res.stderr
    folder.job_json.write_text(json.dumps({**spec, "options": {**spec["options"], "second_opinion": "/gone/model"}}))
    res = run_cli("job", "run", str(folder.root))
    assert res.returncode == 2 and "/gone/model" in res.stderr and "not on this machine" in res.stderr
    assert not folder.quality_events.exists()  # nothing started


def test_recorded_paths_are_found_in_the_folder_as_it_is_now(tmp_path):
    folder = jobs.JobFolder(tmp_path / "here" / "run-1")
    (folder.run_dir / "checkpoints").mkdir(parents=True)
    (folder.run_dir / "checkpoints" / "best.pt").write_bytes(b"")
    assert in_folder(folder, "run/checkpoints/best.pt") == folder.run_dir / "checkpoints" / "best.pt"
    moved = "/elsewhere/runs/run-1/run/checkpoints/best.pt"  # written by the panel before the folder moved
    assert in_folder(folder, moved) == folder.run_dir / "checkpoints" / "best.pt"
    existing = str(folder.run_dir / "checkpoints" / "best.pt")
    assert in_folder(folder, existing) == folder.run_dir / "checkpoints" / "best.pt"
    copy = jobs.JobFolder(tmp_path / "copy" / "run-1")  # a copy beside the original: its own file, not the original's
    (copy.run_dir / "checkpoints").mkdir(parents=True)
    (copy.run_dir / "checkpoints" / "best.pt").write_bytes(b"")
    assert in_folder(copy, existing) == copy.run_dir / "checkpoints" / "best.pt"
    assert str(in_folder(folder, "/models/other/segmenter.pt")) == "/models/other/segmenter.pt"
