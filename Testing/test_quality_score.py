"""Scoring and evaluating g: metrics against hand computation, CLI round trip, bad inputs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from QGSegmentationLib.cli.main import main
from QGSegmentationLib.data.phantom import make_phantom_case, make_phantom_dataset
from QGSegmentationLib.errors import ConfigError, DataError
from QGSegmentationLib.quality.evaluate import (EvalPair, agreement_metrics, auroc, evaluate_predictor,
                                                image_dependence_ok, make_vqm_pairs, spearman)
from QGSegmentationLib.quality.predictor import QualityPredictor, save_predictor
from QGSegmentationLib.quality.score import read_pairs_csv, score_pair
from QGSegmentationLib.quality.train import pearson

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path), True)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    image, label = make_phantom_case((16, 24, 24), 2, seed=3)
    torch.manual_seed(0)
    checkpoint = save_predictor(root / "g.pt", QualityPredictor(grid_size=(16, 16, 16)).eval())
    wrong = label.astype(np.uint8) * 2  # values 0/2: not binary
    return {"root": root, "checkpoint": checkpoint,
            "image": _write(root / "img.nrrd", image, (1.2, 1.0, 1.0)),
            "mask": _write(root / "mask.nrrd", label, (1.2, 1.0, 1.0)),
            "shifted": _write(root / "shifted.nrrd", label, (1.2, 1.0, 1.0), origin=(5.0, 0.0, 0.0)),
            "nonbinary": _write(root / "nonbinary.nrrd", wrong, (1.2, 1.0, 1.0))}


# ------------------------------------------------------------------------------- metrics

def test_auroc_matches_pairwise_counting():
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: 0.35 beats 0.1 only, 0.8 beats both -> 3/4
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [True, False]) == pytest.approx(0.5)  # a tie counts one half
    assert np.isnan(auroc([0.2, 0.3], [True, True]))


def test_pearson_and_spearman_match_hand_computation():
    # a = [1,2,3], b = [2,4,7]: cov sum 5, sum sq 2 and 114/9
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / np.sqrt(2 * 114 / 9))
    # ranks (1,2,3) vs (3,1,2): cov sum -1, sum sq 2 and 2 -> -0.5
    assert spearman([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_agreement_metrics_failure_detection():
    predicted = [0.9, 0.3, 0.6, 0.95]
    true = [0.85, 0.2, 0.75, 0.9]            # one failure (0.2 < 0.7)
    m = agreement_metrics(predicted, true)
    assert m["mae"] == pytest.approx((0.05 + 0.1 + 0.15 + 0.05) / 4)
    assert m["n_failures"] == 1
    assert m["auroc_failure"] == pytest.approx(1.0)  # the failure has the lowest prediction


def test_image_dependence_criterion():
    assert image_dependence_ok(0.9, 0.2, -0.1)
    assert image_dependence_ok(0.9, -0.6, 0.1)      # anti-correlated: no usable signal left
    assert not image_dependence_ok(0.9, 0.6, 0.1)   # 0.6 > 0.5 * 0.9
    assert not image_dependence_ok(0.9, 0.1, 0.5)
    assert not image_dependence_ok(-0.2, 0.0, 0.0)
    assert image_dependence_ok(0.8, 0.3, None)


def test_evaluate_predictor_reports_rows_metrics_and_ablations(files):
    cases = []
    from QGSegmentationLib.quality.train import VolumeCase

    for seed in (1, 2):
        image, label = make_phantom_case((16, 24, 24), 2, seed=seed)
        cases.append(VolumeCase(f"c{seed}", image, label))
    pairs = make_vqm_pairs(cases, per_case=3, seed=0)
    assert len(pairs) == 6 and all(isinstance(p, EvalPair) for p in pairs)
    from QGSegmentationLib.quality.predictor import load_predictor

    model = load_predictor(files["checkpoint"])
    result = evaluate_predictor(model, pairs)
    assert len(result["rows"]) == 6
    assert {"true_dice", "predicted", "predicted_black_image", "predicted_shuffled_image"} <= set(result["rows"][0])
    assert result["metrics"]["n"] == 6
    assert "image_dependence_ok" in result and result["image_dependence"]["pearson_shuffled"] is not None
    for row, pair in zip(result["rows"], pairs):
        ref, cand = pair.reference == 1, pair.mask == 1
        total = ref.sum() + cand.sum()
        expected = 1.0 if total == 0 else 2 * (ref & cand).sum() / total
        assert row["true_dice"] == pytest.approx(expected)


# ------------------------------------------------------------------------------- scoring

def test_score_cli_round_trip_in_a_subprocess(files, tmp_path):
    out = tmp_path / "scores.csv"
    cmd = [sys.executable, "-m", "QGSegmentationLib.cli.main", "quality", "score",
           "--checkpoint", str(files["checkpoint"]), "--images", str(files["image"]),
           "--masks", str(files["mask"]), "--output", str(out), "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["case"] == "mask" and rows[0]["class"] == "1"
    assert 0.0 <= float(rows[0]["predicted_quality"]) <= 1.0


def test_scores_written_into_another_runs_folder_keep_its_manifest(files, tmp_path):
    import json

    out = tmp_path / "scores.csv"
    args = ["quality", "score", "--checkpoint", str(files["checkpoint"]), "--images", str(files["image"]),
            "--masks", str(files["mask"]), "--output", str(out), "--quiet"]
    for command in (["qgseg", "train"], ["qgseg", "quality", "train"]):  # g's own training folder too
        training = json.dumps({"command": command, "status": "ok"})
        (tmp_path / "manifest.json").write_text(training)
        os.utime(tmp_path / "manifest.json", (time.time() - 60, time.time() - 60))
        assert main(args) == 0 and out.exists()
        assert (tmp_path / "manifest.json").read_text() == training
    alone = tmp_path / "alone"
    assert main(args[:-2] + [str(alone / "scores.csv"), "--quiet"]) == 0
    assert json.loads((alone / "manifest.json").read_text())["status"] == "ok"


def test_score_pairs_csv_and_json_output(files, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"image,mask\n{files['image']},{files['mask']}\n")
    out = tmp_path / "scores.json"
    code = main(["quality", "score", "--checkpoint", str(files["checkpoint"]), "--pairs", str(pairs),
                 "--output", str(out), "--quiet"])
    assert code == 0
    import json

    scores = json.loads(out.read_text())["scores"]
    assert scores[0]["class_name"] == "label_1"


def test_second_opinion_column_is_the_dice_against_the_other_mask(files, tmp_path, capsys):
    from scipy import ndimage

    from QGSegmentationLib.quality.dice import mask_dice

    label = sitk.GetArrayFromImage(sitk.ReadImage(str(files["mask"])))
    other = ndimage.binary_dilation(label > 0, iterations=1).astype(np.uint8)
    second = tmp_path / "second"
    second.mkdir()
    _write(second / "img.nrrd", other, (1.2, 1.0, 1.0))  # named after the image's case
    out = tmp_path / "s.csv"
    code = main(["quality", "score", "--checkpoint", str(files["checkpoint"]), "--images", str(files["image"]),
                 "--masks", str(files["mask"]), "--second-opinion", str(second), "--output", str(out), "--quiet"])
    assert code == 0
    row = next(csv.DictReader(out.open()))
    expected = mask_dice(label, other)
    assert expected < 1.0 and float(row["second_opinion_dice"]) == pytest.approx(expected, abs=1e-6)

    _write(second / "img.nrrd", other, (1.2, 1.0, 1.0), origin=(5.0, 0.0, 0.0))
    code = main(["quality", "score", "--checkpoint", str(files["checkpoint"]), "--images", str(files["image"]),
                 "--masks", str(files["mask"]), "--second-opinion", str(second), "--output", str(tmp_path / "t.csv"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "second/img.nrrd" in err and "origin" in err
    assert not (tmp_path / "t.csv").exists()


def test_second_opinion_of_another_tool_in_nifti_is_read_too(files, tmp_path):
    from scipy import ndimage

    from QGSegmentationLib.quality.dice import mask_dice

    label = sitk.GetArrayFromImage(sitk.ReadImage(str(files["mask"])))
    other = ndimage.binary_erosion(label > 0, iterations=1).astype(np.uint8)
    second = tmp_path / "nnunet"
    second.mkdir()
    _write(second / "img.nii.gz", other, (1.2, 1.0, 1.0))
    out = tmp_path / "s.csv"
    code = main(["quality", "score", "--checkpoint", str(files["checkpoint"]), "--images", str(files["image"]),
                 "--masks", str(files["mask"]), "--second-opinion", str(second), "--output", str(out), "--quiet"])
    assert code == 0
    expected = mask_dice(label, other)
    assert expected < 1.0
    assert float(next(csv.DictReader(out.open()))["second_opinion_dice"]) == pytest.approx(expected, abs=1e-6)


def test_geometry_mismatch_exits_2_naming_the_files(files, tmp_path, capsys):
    code = main(["quality", "score", "--checkpoint", str(files["checkpoint"]), "--images", str(files["image"]),
                 "--masks", str(files["shifted"]), "--output", str(tmp_path / "s.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "shifted.nrrd" in err and "img.nrrd" in err and "origin" in err
    assert not (tmp_path / "s.csv").exists()


def test_non_binary_mask_for_binary_model_is_a_data_error(files):
    from QGSegmentationLib.quality.predictor import load_predictor

    with pytest.raises(DataError, match=r"nonbinary\.nrrd.*\[2\].*binary"):
        score_pair(load_predictor(files["checkpoint"]), files["image"], files["nonbinary"])


def test_pairs_csv_without_mask_column_is_rejected(tmp_path):
    bad = tmp_path / "pairs.csv"
    bad.write_text("image,label\na.nrrd,b.nrrd\n")
    with pytest.raises(DataError, match="pairs.csv.*'mask'"):
        read_pairs_csv(bad)



def test_a_pairs_csv_that_is_not_utf8_is_named_and_one_with_a_bom_is_read(tmp_path):
    binary = tmp_path / "pairs.csv"
    binary.write_bytes(b"\xff\xfe\x00x")
    with pytest.raises(DataError, match="pairs.csv: not a text file in UTF-8"):
        read_pairs_csv(binary)
    excel = tmp_path / "excel.csv"  # spreadsheet programs start UTF-8 CSVs with a byte order mark
    excel.write_bytes("image,mask\r\na.nrrd,b.nrrd\r\n".encode("utf-8-sig"))
    assert read_pairs_csv(excel) == [(tmp_path / "a.nrrd", tmp_path / "b.nrrd")]

def test_scoring_an_la_sized_volume_is_fast(tmp_path):
    """~180x140x88 voxels + mask must score in <= 1 s on 2 cores; here 1 thread on a shared
    machine, so the bound is loose (the measured time is printed)."""
    image, label = make_phantom_case((88, 140, 180), 2, seed=5)
    img = _write(tmp_path / "la.nrrd", image, (0.625, 0.625, 0.625))
    msk = _write(tmp_path / "la_mask.nrrd", label, (0.625, 0.625, 0.625))
    model = QualityPredictor().eval()  # the default 48^3 convnet
    score_pair(model, img, msk)       # warm-up
    start = time.perf_counter()
    rows = score_pair(model, img, msk)
    elapsed = time.perf_counter() - start
    print(f"LA-sized scoring: {elapsed:.3f} s")
    assert len(rows) == 1
    assert elapsed < 2.0


def test_evaluate_cli_on_phantom_dataset(files, tmp_path):
    dataset = make_phantom_dataset(tmp_path / "ds", n_labeled=2, n_unlabeled=0, n_test=2, shape=(16, 24, 24))
    code = main(["quality", "evaluate", "--dataset", str(dataset), "--checkpoint", str(files["checkpoint"]),
                 "--samples-per-case", "2", "--run-dir", str(tmp_path / "ev"), "--quiet"])
    assert code == 0
    for name in ("quality_evaluation.json", "quality_evaluation_rows.csv", "quality_calibration.png"):
        assert (tmp_path / "ev" / name).is_file()


def test_several_checkpoints_score_as_their_mean(files, tmp_path, capsys):
    from QGSegmentationLib.quality.predictor import load_predictor, load_predictors

    torch.manual_seed(1)
    other = save_predictor(tmp_path / "g1.pt", QualityPredictor(grid_size=(16, 16, 16)).eval())
    singles = [score_pair(load_predictor(p), files["image"], files["mask"])[0]["predicted_quality"]
               for p in (files["checkpoint"], other)]
    assert abs(singles[0] - singles[1]) > 1e-4  # two different predictors
    ensemble = load_predictors([files["checkpoint"], other])
    assert score_pair(ensemble, files["image"], files["mask"])[0]["predicted_quality"] == \
        pytest.approx(np.mean(singles), abs=1e-5)
    out = tmp_path / "scores.csv"
    assert main(["quality", "score", "--checkpoint", str(files["checkpoint"]), str(other), "--images",
                 str(files["image"]), "--masks", str(files["mask"]), "--output", str(out), "--quiet"]) == 0
    row = next(csv.DictReader(out.open()))
    assert float(row["predicted_quality"]) == pytest.approx(np.mean(singles), abs=1e-5)
    two_d = save_predictor(tmp_path / "g2d.pt", QualityPredictor(mode="2d", grid_size=(16, 16)))
    assert main(["quality", "score", "--checkpoint", str(files["checkpoint"]), str(two_d), "--images",
                 str(files["image"]), "--masks", str(files["mask"]), "--output", str(tmp_path / "x.csv"),
                 "--quiet"]) == 2
    assert "g2d.pt: cannot be averaged" in capsys.readouterr().err


def test_ensemble_file_answers_as_the_mean_of_its_members_everywhere(files, tmp_path, capsys):
    """`qgseg quality ensemble` writes one weights-only file; loading it gives the members' mean
    (the same as passing the members), gradients still reach the mask (QAR), nesting flattens, and
    calibration refuses it with advice."""
    from QGSegmentationLib.quality.calibrate import calibrate_checkpoint
    from QGSegmentationLib.quality.predictor import QualityEnsemble, load_predictor, load_predictors

    torch.manual_seed(2)
    other = save_predictor(tmp_path / "g1.pt", QualityPredictor(grid_size=(16, 16, 16)).eval())
    members = [str(files["checkpoint"]), str(other)]
    out = tmp_path / "ens" / "g_ensemble.pt"
    assert main(["quality", "ensemble", "--checkpoint", *members, "--output", str(out), "--quiet"]) == 0
    assert "the mean of 2 quality predictors" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert state["format"] == "qgseg-quality-ensemble" and len(state["members"]) == 2
    from_file, from_paths = load_predictor(out), load_predictors(members)
    assert isinstance(from_file, QualityEnsemble)
    image = torch.randn(2, 1, 16, 16, 16)
    mask = torch.rand(2, 1, 16, 16, 16, requires_grad=True)
    predicted = from_file(image, mask)
    assert torch.allclose(predicted, from_paths(image, mask), atol=1e-6)
    singles = [load_predictor(p)(image, mask) for p in members]
    assert torch.allclose(predicted, (singles[0] + singles[1]) / 2, atol=1e-6)
    predicted.sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    assert len(load_predictors([out, other]).members) == 3  # an ensemble among several: flattened
    with pytest.raises(ConfigError, match="g_ensemble.pt: an ensemble of 2 predictors; calibrate each member"):
        calibrate_checkpoint(out, tmp_path / "dataset.json", [tmp_path], tmp_path / "cal.pt")


def test_second_opinion_keeps_masks_within_its_byte_budget(tmp_path):
    from QGSegmentationLib.quality.second_opinion import SecondOpinion

    shape = (4, 5, 6)
    for case in ("a", "b", "c"):
        _write(tmp_path / f"{case}.nrrd", np.ones(shape, np.uint8))
    one_mask = np.ones(shape, np.uint8).nbytes
    opinion = SecondOpinion(tmp_path, cache_bytes=2 * one_mask)
    mask = np.ones(shape, np.uint8)
    for case in ("a", "b", "a", "c"):           # "a" used again, so "b" is the oldest when "c" comes
        assert opinion.agreement(case, mask, 1, "mask.nrrd")[0] == pytest.approx(1.0)
    assert list(opinion._read) == ["a", "c"] and opinion.cached_bytes() == 2 * one_mask
    (tmp_path / "a.nrrd").unlink()               # kept masks are not read again ...
    assert opinion.agreement("a", mask, 1, "mask.nrrd")[0] == pytest.approx(1.0)
    (tmp_path / "b.nrrd").unlink()               # ... dropped ones are
    with pytest.raises(DataError, match=r"b\.nrrd: no second-opinion mask"):
        opinion.agreement("b", mask, 1, "mask.nrrd")
    tiny = SecondOpinion(tmp_path, cache_bytes=1)  # a budget below one mask still keeps the last one
    tiny.agreement("c", mask, 1, "mask.nrrd")
    assert list(tiny._read) == ["c"]


def test_folders_of_images_and_masks_are_matched_by_case_nnunet_names_included(tmp_path):
    from QGSegmentationLib.quality.score import pairs_from_lists

    images, masks = tmp_path / "imagesTs", tmp_path / "predictions"
    images.mkdir()
    masks.mkdir()
    for name in ("la_001_0000.nii.gz", "la_002.nrrd", "la_002.seg.nrrd", "readme.txt"):
        (images / name).write_bytes(b"")
    for name in ("la_001.nii.gz", "la_002.nii.gz"):
        (masks / name).write_bytes(b"")
    assert pairs_from_lists([str(images)], [str(masks)]) == [
        (images / "la_001_0000.nii.gz", masks / "la_001.nii.gz"),  # nnU-Net: channel suffix on images only
        (images / "la_002.nrrd", masks / "la_002.nii.gz")]
    with pytest.raises(DataError, match="predictions is a folder: give one folder of images and one folder"):
        pairs_from_lists([str(images / "la_002.nrrd")], [str(masks)])  # a file with a folder
    (masks / "la_002.nii.gz").unlink()
    with pytest.raises(DataError, match="no mask for 1 image.*la_002.nrrd") as missing:
        pairs_from_lists([str(images)], [str(masks)])
    assert "--pairs" in missing.value.hint


def test_score_cli_scores_two_folders(files, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    (images / "img.nrrd").write_bytes(Path(files["image"]).read_bytes())
    (masks / "img.nrrd").write_bytes(Path(files["mask"]).read_bytes())
    out = tmp_path / "s.csv"
    code = main(["quality", "score", "--checkpoint", str(files["checkpoint"]), "--images", str(images),
                 "--masks", str(masks), "--output", str(out), "--quiet"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["case"] for r in rows] == ["img"] and 0.0 <= float(rows[0]["predicted_quality"]) <= 1.0
