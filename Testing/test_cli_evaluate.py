"""`qgseg evaluate` and `qgseg quality evaluate` on segmentations made by other tools: NIfTI
folders (nnU-Net, MONAI) work like qgseg's own .nrrd outputs, and a missing case names what was
looked for."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from QGSegmentationLib.cli.predict import collect_inputs
from QGSegmentationLib.data.dataset import load_dataset
from QGSegmentationLib.data.io import read_label, write_label
from QGSegmentationLib.quality.predictor import QualityPredictor, save_predictor

from conftest import run_cli


def eroded_predictions(spec, folder, extension):
    """Each test case's reference eroded once, written as <case><extension>; returns true Dice."""
    dice = {}
    for ref in spec.test:
        label, geometry = read_label(ref.label)
        prediction = ndimage.binary_erosion(label > 0).astype(np.uint8)
        write_label(folder / f"{ref.id}{extension}", prediction, geometry)
        reference = label > 0
        dice[ref.id] = 2 * np.logical_and(prediction, reference).sum() / (prediction.sum() + reference.sum())
    return dice


def test_segmentation_evaluate_reads_nifti_predictions(phantom_3d, tmp_path):
    spec = load_dataset(phantom_3d)
    expected = eroded_predictions(spec, tmp_path / "nnunet_out", ".nii.gz")
    res = run_cli("evaluate", "--predictions", str(tmp_path / "nnunet_out"), "--dataset", str(phantom_3d),
                  "--split", "test", "--run-dir", str(tmp_path / "e"), "--quiet")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["n_cases"] == len(spec.test)
    assert summary["summary"]["dice"]["mean"] == pytest.approx(np.mean(list(expected.values())))
    assert max(expected.values()) < 1.0  # the predictions really were read, not the references
    worst = min(expected, key=expected.get)
    assert f"lowest Dice: {worst} {expected[worst]:.3f}" in res.stdout  # the case to look at first
    assert (tmp_path / "e" / "metrics.png").read_bytes()[:4] == b"\x89PNG"  # and a picture of every case


def test_a_missing_prediction_names_the_files_looked_for(phantom_3d, tmp_path):
    spec = load_dataset(phantom_3d)
    folder = tmp_path / "partial"
    eroded_predictions(spec, folder, ".nii.gz")
    (folder / f"{spec.test[0].id}.nii.gz").unlink()
    res = run_cli("evaluate", "--predictions", str(folder), "--dataset", str(phantom_3d), "--split", "test",
                  "--run-dir", str(tmp_path / "e"), "--quiet")
    assert res.returncode == 2
    assert spec.test[0].id in res.stderr and ".nii.gz" in res.stderr and ".nrrd" in res.stderr


def test_a_references_folder_may_hold_more_cases_than_were_predicted(phantom_3d, tmp_path):
    spec = load_dataset(phantom_3d)
    expected = eroded_predictions(spec, tmp_path / "preds", ".nrrd")
    references = tmp_path / "all_labels"  # every labeled case, as a labelsTr folder would
    references.mkdir()
    for ref in spec.training + spec.validation + spec.test:
        shutil.copy(ref.label, references / ref.label.name)
    res = run_cli("evaluate", "--predictions", str(tmp_path / "preds"), "--references", str(references),
                  "--run-dir", str(tmp_path / "e"), "--quiet")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["n_cases"] == len(spec.test) and summary["summary"]["dice"]["mean"] == pytest.approx(
        np.mean(list(expected.values())))
    assert f"{len(spec.training) + len(spec.validation)} reference(s) in {references} have no prediction" in res.stdout

    (references / spec.test[0].label.name).unlink()  # a prediction without its reference is an error
    res = run_cli("evaluate", "--predictions", str(tmp_path / "preds"), "--references", str(references),
                  "--run-dir", str(tmp_path / "e2"), "--quiet")
    assert res.returncode == 2 and spec.test[0].id in res.stderr and "no reference" in res.stderr


def test_a_prediction_with_labels_the_dataset_does_not_declare_is_refused(phantom_3d, tmp_path):
    """A label map from another tool with a value the dataset does not declare would otherwise be
    scored as an invented class, and lower its case's mean Dice unnoticed."""
    spec = load_dataset(phantom_3d)
    folder = tmp_path / "other_tool"
    eroded_predictions(spec, folder, ".nii.gz")
    stray = folder / f"{spec.test[0].id}.nii.gz"
    label, geometry = read_label(stray)
    label[0, 0, 0] = 3
    write_label(stray, label, geometry)
    res = run_cli("evaluate", "--predictions", str(folder), "--dataset", str(phantom_3d), "--split", "test",
                  "--run-dir", str(tmp_path / "e"), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(stray) in res.stderr and "label values [3] are not declared" in res.stderr

def test_quality_evaluate_reads_nifti_predictions(phantom_3d, tmp_path):
    spec = load_dataset(phantom_3d)
    expected = eroded_predictions(spec, tmp_path / "other_tool", ".nii.gz")
    g = save_predictor(tmp_path / "g.pt", QualityPredictor(grid_size=(16, 16, 16)).eval())
    res = run_cli("quality", "evaluate", "--dataset", str(phantom_3d), "--checkpoint", str(g), "--group", "test",
                  "--predictions", str(tmp_path / "other_tool"), "--run-dir", str(tmp_path / "q"),
                  "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "q" / "quality_evaluation_rows.csv", newline="") as handle:
        true_dice = {row["case"]: float(row["true_dice"]) for row in csv.DictReader(handle)}
    assert true_dice == pytest.approx(expected)
    (tmp_path / "other_tool" / f"{spec.test[0].id}.nii.gz").unlink()  # a folder lacking a case says so
    res = run_cli("quality", "evaluate", "--dataset", str(phantom_3d), "--checkpoint", str(g), "--group", "test",
                  "--predictions", str(tmp_path / "other_tool"), "--run-dir", str(tmp_path / "q2"),
                  "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr
    assert f"no prediction for 1 of the {len(spec.test)} cases, which are left out: {spec.test[0].id}" in res.stderr


def test_predict_takes_a_folders_images_but_not_its_seg_nrrd_files(tmp_path):
    for name in ("a.nrrd", "a.seg.nrrd", "b.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert collect_inputs([str(tmp_path)], "test") == [("a", tmp_path / "a.nrrd"), ("b", tmp_path / "b.nii.gz")]


def test_a_prediction_off_its_references_grid_is_named_as_the_prediction(phantom_3d, tmp_path):
    """The message names the prediction as the file to fix and the reference as the grid, never
    'label geometry does not match image <reference>' with a hint to resample the label."""
    import dataclasses

    spec = load_dataset(phantom_3d)
    folder = tmp_path / "preds"
    eroded_predictions(spec, folder, ".nrrd")
    ref = spec.test[0]
    label, geometry = read_label(ref.label)
    moved = dataclasses.replace(geometry, origin=tuple(o + 5.0 for o in geometry.origin))
    write_label(folder / f"{ref.id}.nrrd", label, moved)
    res = run_cli("evaluate", "--predictions", str(folder), "--dataset", str(phantom_3d), "--split", "test",
                  "--run-dir", str(tmp_path / "e"), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert (f"{folder / ref.id}.nrrd: prediction geometry does not match reference {ref.label}" in res.stderr
            ), res.stderr
    assert "(reference vs prediction)" in res.stderr and "resample the label" not in res.stderr
