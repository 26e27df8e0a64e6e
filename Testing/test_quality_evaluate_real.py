"""`qgseg quality evaluate --predictions`: g judged on masks from real segmenters' output folders."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import ndimage

from QGSegmentationLib.data.dataset import load_dataset
from QGSegmentationLib.data.io import read_label, write_label
from QGSegmentationLib.quality.predictor import QualityPredictor, save_predictor

from conftest import run_cli


def test_evaluate_on_prediction_folders(phantom_3d, tmp_path):
    spec = load_dataset(phantom_3d)
    folders = []
    for name, op in (("eroded", ndimage.binary_erosion), ("dilated", ndimage.binary_dilation)):
        folder = tmp_path / "segmenter" / name
        for ref in spec.test:
            label, geometry = read_label(ref.label)
            write_label(folder / f"{ref.id}.nrrd", op(label > 0, iterations=2).astype(np.uint8), geometry)
        folders.append(str(folder))
    g = save_predictor(tmp_path / "g.pt", QualityPredictor(grid_size=(16, 16, 16)).eval())
    out = tmp_path / "eval"
    res = run_cli("quality", "evaluate", "--dataset", str(phantom_3d), "--checkpoint", str(g), "--group", "test",
                  "--predictions", *folders, "--run-dir", str(out), "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "quality_evaluation.json").read_text())
    assert metrics["metrics"]["n"] == 2 * len(spec.test)
    assert metrics["source"] == "real-segmenter masks"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["command"][:3] == ["qgseg", "quality", "evaluate"]
    check = metrics["image_dependence"]  # said in words, with its numbers, and where the files went
    verdict = "passes" if check["image_dependence_ok"] else "FAILS"
    assert f"image dependence check {verdict}: Pearson with the right image {check['pearson_real']:.3f}" in res.stdout
    assert f"written: {out / 'quality_evaluation.json'}" in res.stdout

    per_source = metrics["per_source"]  # one entry per segmenter folder, together all the masks
    assert [name.split("/")[-1] for name in per_source] == ["eroded", "dilated"]
    assert all(entry["g"]["n"] == len(spec.test) for entry in per_source.values())
    rows = list(csv.DictReader((out / "quality_evaluation_rows.csv").open()))
    for name, entry in per_source.items():
        errors = [abs(float(r["predicted"]) - float(r["true_dice"])) for r in rows if r["category"] == name]
        assert entry["g"]["mae"] == pytest.approx(np.mean(errors))
    assert "within each source" in res.stdout and "eroded: n=" in res.stdout


def test_prediction_folder_without_cases_is_a_clear_error(phantom_3d, tmp_path):
    g = save_predictor(tmp_path / "g.pt", QualityPredictor(grid_size=(16, 16, 16)).eval())
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("quality", "evaluate", "--dataset", str(phantom_3d), "--checkpoint", str(g),
                  "--predictions", str(empty), "--run-dir", str(tmp_path / "e"), "--quiet")
    assert res.returncode == 2 and "empty" in res.stderr


def test_second_opinion_is_measured_beside_g(phantom_3d, tmp_path):
    """A second opinion equal to the reference must reproduce every true Dice exactly; a folder
    lacking a case stops the evaluation naming the missing file, before anything is written."""
    spec = load_dataset(phantom_3d)
    eroded, reference = tmp_path / "eroded", tmp_path / "reference"
    for ref in spec.test:
        label, geometry = read_label(ref.label)
        write_label(eroded / f"{ref.id}.nrrd", ndimage.binary_erosion(label > 0, iterations=2).astype(np.uint8), geometry)
        write_label(reference / f"{ref.id}.nrrd", label, geometry)
    g = save_predictor(tmp_path / "g.pt", QualityPredictor(grid_size=(16, 16, 16)).eval())
    out = tmp_path / "eval"
    res = run_cli("quality", "evaluate", "--dataset", str(phantom_3d), "--checkpoint", str(g), "--group", "test",
                  "--predictions", str(eroded), "--second-opinion", str(reference), "--run-dir", str(out),
                  "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "quality_evaluation.json").read_text())
    assert result["second_opinion"]["metrics"]["mae"] == 0.0
    assert result["second_opinion"]["metrics"]["n"] == result["metrics"]["n"] == len(spec.test)
    rows = list(csv.DictReader((out / "quality_evaluation_rows.csv").open()))
    assert all(float(r["second_opinion_dice"]) == float(r["true_dice"]) < 1.0 for r in rows)
    combined = result["combined"]  # with the truth as second opinion: half g's error, or its shortfall only
    assert combined["mean of both"]["mae"] == pytest.approx(result["metrics"]["mae"] / 2)
    shortfall = np.mean([max(float(r["true_dice"]) - float(r["predicted"]), 0.0) for r in rows])
    assert combined["lower of both"]["mae"] == pytest.approx(shortfall)
    assert (out / "quality_calibration_second_opinion.png").is_file()
    assert "per_source" not in result  # one folder of masks: nothing to split

    dilated = tmp_path / "dilated"  # a second segmenter: now per-source metrics of both estimates
    for ref in spec.test:
        label, geometry = read_label(ref.label)
        write_label(dilated / f"{ref.id}.nrrd", ndimage.binary_dilation(label > 0).astype(np.uint8), geometry)
    res = run_cli("quality", "evaluate", "--dataset", str(phantom_3d), "--checkpoint", str(g), "--group", "test",
                  "--predictions", str(eroded), str(dilated), "--second-opinion", str(reference),
                  "--run-dir", str(tmp_path / "eval2"), "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr
    per_source = json.loads((tmp_path / "eval2" / "quality_evaluation.json").read_text())["per_source"]
    assert len(per_source) == 2
    assert all(entry["second_opinion"]["mae"] == 0.0 for entry in per_source.values())  # the truth itself

    (reference / f"{spec.test[0].id}.nrrd").unlink()
    res = run_cli("quality", "evaluate", "--dataset", str(phantom_3d), "--checkpoint", str(g), "--group", "test",
                  "--predictions", str(eroded), "--second-opinion", str(reference), "--run-dir", str(tmp_path / "e2"),
                  "--device", "cpu", "--quiet")
    assert res.returncode == 2 and f"{spec.test[0].id}.nrrd" in res.stderr and "second-opinion" in res.stderr
    assert not (tmp_path / "e2" / "quality_evaluation.json").exists()


def test_a_prediction_of_the_right_size_on_another_grid_is_refused(phantom_3d, tmp_path):
    """Same shape is not enough: a prediction's spacing (all a loaded case keeps of its grid) and,
    for a case that carries its grid, origin and direction must match, as scoring checks them."""
    import dataclasses

    from QGSegmentationLib.data.cache import PreparedCase
    from QGSegmentationLib.data.io import read_image
    from QGSegmentationLib.errors import DataError
    from QGSegmentationLib.quality.evaluate import prediction_pairs

    spec = load_dataset(phantom_3d)
    ref = spec.test[0]
    label, geometry = read_label(ref.label)
    respaced = tmp_path / "respaced"
    write_label(respaced / f"{ref.id}.nrrd", label, dataclasses.replace(geometry, spacing=(2.0, 2.0, 2.0)))
    g = save_predictor(tmp_path / "g.pt", QualityPredictor(grid_size=(16, 16, 16)).eval())
    res = run_cli("quality", "evaluate", "--dataset", str(phantom_3d), "--checkpoint", str(g), "--group", "test",
                  "--predictions", str(respaced), "--run-dir", str(tmp_path / "q"), "--device", "cpu", "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{respaced / ref.id}.nrrd: prediction geometry does not match case '{ref.id}': spacing" in res.stderr

    image = read_image(ref.image)[0]
    case = PreparedCase(ref.id, image[None], label, geometry, geometry, ref.image, ref.label)
    flipped, same = tmp_path / "flipped", tmp_path / "same"
    mirror = np.diag([-1.0, 1.0, 1.0]) @ np.reshape(geometry.direction, (3, 3))
    write_label(flipped / f"{ref.id}.nrrd", label, dataclasses.replace(geometry, direction=tuple(mirror.ravel())))
    write_label(same / f"{ref.id}.nrrd", label, geometry)
    with pytest.raises(DataError, match=r"flipped/.*: prediction geometry .* direction .*\(case vs prediction\)"):
        prediction_pairs([case], [flipped])
    assert [p.case for p in prediction_pairs([case], [same])] == [ref.id]
