"""Calibrating g on real masks: the fitted shift, its effect on predictions, the file it writes,
and the guards (too few masks, cases g was trained on)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from QGSegmentationLib.data import io
from QGSegmentationLib.data.dataset import load_dataset
from QGSegmentationLib.data.phantom import make_phantom_dataset
from QGSegmentationLib.errors import DataError
from QGSegmentationLib.quality.calibrate import calibrate_checkpoint, fit_shift, set_shift
from QGSegmentationLib.quality.predictor import QualityPredictor, load_predictor, save_predictor
from QGSegmentationLib.quality.score import predict_volume
from QGSegmentationLib.quality.train import dice_per_class, load_cases


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fit_shift_is_the_mean_error_per_class():
    predictions = np.array([[0.9, 0.5], [0.8, 0.7], [0.7, 0.6], [0.6, 0.2], [1.0, 0.5]])
    targets = np.array([[0.8, 0.6], [0.7, 0.7], [0.6, 0.8], [0.5, 0.3], [0.9, 0.6]])
    assert np.allclose(fit_shift(predictions, targets), [-0.1, 0.1])
    with pytest.raises(DataError, match="at least 5 masks"):
        fit_shift(predictions[:3], targets[:3])


def test_shift_moves_predictions_and_clips_to_unit_range():
    torch.manual_seed(0)
    model = QualityPredictor(mode="2d", n_foreground=2, grid_size=(16, 16)).eval()
    image, mask = torch.randn(3, 1, 16, 16), torch.rand(3, 2, 16, 16)
    with torch.no_grad():
        raw = model(image, mask)
        set_shift(model, [0.05, -2.0])
        shifted = model(image, mask)
    assert torch.allclose(shifted[:, 0], (raw[:, 0] + 0.05).clamp(0, 1))
    assert torch.all(shifted[:, 1] == 0)


def test_calibrate_checkpoint_fits_validation_masks_and_refuses_training_cases(tmp_path):
    spec = load_dataset(make_phantom_dataset(tmp_path / "data", n_labeled=3, n_unlabeled=0, shape=(12, 20, 20)))
    torch.manual_seed(0)
    model = QualityPredictor(mode="3d", n_foreground=1, grid_size=(8, 8, 8))
    refs = spec.training
    save_predictor(tmp_path / "g.pt", model, {"training_cases": [refs[0].id]})
    dataset = spec.source
    folders = [tmp_path / f"seg{k}" for k in range(3)]
    cases = load_cases(refs[1:], spec.labels)
    truth, raw = [], []
    for case, ref in zip(cases, refs[1:]):
        _, geometry = io.read_label(ref.label)
        for k, folder in enumerate(folders):
            mask = np.roll(case.label, k, axis=2)
            io.write_label(folder / f"{case.id}.nrrd", mask, geometry)
            truth.append(float(dice_per_class(mask, case.label, 1)[0]))
            raw.append(float(predict_volume(model.eval(), case.image, mask, case.spacing)[0]))
    # the phantom dataset has no validation group: cases 2-3 become one
    description = json.loads(dataset.read_text())
    description["validation"] = description["training"][1:]
    description["training"] = description["training"][:1]
    (dataset.parent / "split.json").write_text(json.dumps(description))
    result = calibrate_checkpoint(tmp_path / "g.pt", dataset.parent / "split.json", folders,
                                  tmp_path / "g_cal.pt", group="validation")
    assert result["n_masks"] == 6
    assert result["shift"][0] == pytest.approx(np.mean(truth) - np.mean(raw), abs=1e-5)
    calibrated = load_predictor(tmp_path / "g_cal.pt")
    assert calibrated.meta["calibration"]["n_masks"] == 6
    first = cases[0]
    mask = np.roll(first.label, 1, axis=2)
    assert float(predict_volume(calibrated, first.image, mask, first.spacing)[0]) == pytest.approx(
        min(1.0, max(0.0, raw[1] + result["shift"][0])), abs=1e-5)
    with pytest.raises(DataError, match=r"training case\(s\) case_000 were used to train"):
        calibrate_checkpoint(tmp_path / "g.pt", dataset.parent / "split.json", folders, tmp_path / "x.pt",
                             group="training")
    assert not (tmp_path / "x.pt").exists()


def test_calibrate_command_writes_the_calibrated_file_and_reports_bad_inputs(tmp_path, capsys):
    from QGSegmentationLib.cli.main import main

    spec = load_dataset(make_phantom_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=0, shape=(12, 20, 20)))
    description = json.loads(spec.source.read_text())
    description["validation"], description["training"] = description["training"][1:], description["training"][:1]
    split = spec.source.parent / "split.json"
    split.write_text(json.dumps(description))
    case = load_cases(load_dataset(split).validation, spec.labels)[0]
    _, geometry = io.read_label(load_dataset(split).validation[0].label)
    folders = [tmp_path / f"seg{k}" for k in range(5)]
    for k, folder in enumerate(folders):
        io.write_label(folder / f"{case.id}.nrrd", np.roll(case.label, k, axis=1), geometry)
    save_predictor(tmp_path / "g.pt", QualityPredictor(mode="3d", n_foreground=1, grid_size=(8, 8, 8)))

    base = ["quality", "calibrate", "--dataset", str(split), "--masks", *map(str, folders), "--quiet",
            "--device", "cpu"]
    assert main(base + ["--checkpoint", str(tmp_path / "g.pt"), "--output", str(tmp_path / "cal.pt")]) == 0
    captured = capsys.readouterr()
    assert "fitted on 5 masks" in captured.out + captured.err
    assert load_predictor(tmp_path / "cal.pt").meta["calibration"]["n_masks"] == 5
    assert main(base + ["--checkpoint", str(tmp_path / "none.pt"), "--output", str(tmp_path / "x.pt")]) == 2
    assert "none.pt: quality predictor checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
