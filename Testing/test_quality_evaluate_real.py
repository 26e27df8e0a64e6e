"""`qgseg quality evaluate --predictions`: g judged on masks from real segmenters' output folders."""

from __future__ import annotations

import json

import numpy as np
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


def test_prediction_folder_without_cases_is_a_clear_error(phantom_3d, tmp_path):
    g = save_predictor(tmp_path / "g.pt", QualityPredictor(grid_size=(16, 16, 16)).eval())
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("quality", "evaluate", "--dataset", str(phantom_3d), "--checkpoint", str(g),
                  "--predictions", str(empty), "--run-dir", str(tmp_path / "e"), "--quiet")
    assert res.returncode == 2 and "empty" in res.stderr
