"""Training g: a tiny real run on phantom data, checkpoints, resume, cancel, weak-model pool."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from QGSegmentationLib.data.dataset import load_dataset
from QGSegmentationLib.data.phantom import make_phantom_dataset
from QGSegmentationLib.engine.cancel import request_cancel
from QGSegmentationLib.engine.events import EventWriter, read_events
from QGSegmentationLib.errors import CancelledError, ConfigError
from QGSegmentationLib.quality.predictor import load_predictor
from QGSegmentationLib.quality.train import (QualityTrainConfig, _make_vqm_config, dice_per_class,
                                             train_quality_predictor, vqm_candidate)
from QGSegmentationLib.quality.weak import WeakPool, load_predictions

TINY = {"samples_per_case": 3, "val_samples_per_case": 2, "batch_size": 4, "grid_size": [16, 16, 16],
        "weak": {"epochs": 2, "snapshot_epochs": [1, 2], "patch_size": [16, 24, 24]}, "p_weak": 0.5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    return load_dataset(make_phantom_dataset(root, n_labeled=4, n_unlabeled=0, shape=(16, 24, 24)))


def test_tiny_training_writes_checkpoints_events_and_resumes(spec, tmp_path, capsys):
    run = tmp_path / "g"
    events = EventWriter.open(run / "events.jsonl")
    result = train_quality_predictor(spec, {**TINY, "epochs": 2}, run, events=events, progress=True,
                                     device="cpu")
    events.close()
    terminal = capsys.readouterr().err
    for line in ("[quality 2/4] weak segmenter snapshots", "weak segmenter: ", "quality predictor: "):
        assert line in terminal, line  # every long stage shows a bar, the weak segmenter's too
    assert result["epochs_run"] == 2 and len(result["history"]) == 2
    assert result["n_training_cases"] == 3 and result["n_validation_cases"] == 1
    for key in ("best_checkpoint", "last_checkpoint", "curve", "calibration"):
        assert (tmp_path / "g" / result[key].split("/g/")[-1]).is_file(), key
    state = torch.load(result["last_checkpoint"], weights_only=True)
    assert state["epoch"] == 2 and "optimizer" in state and "torch_rng" in state
    model = load_predictor(result["best_checkpoint"])
    assert model.n_foreground == 1 and model.grid_size == (16, 16, 16)
    kinds = [e["event"] for e in read_events(run / "events.jsonl")]
    assert {"stage", "progress", "metric"} <= set(kinds)
    names = {e["name"] for e in read_events(run / "events.jsonl") if e["event"] == "metric"}
    assert {"val_mae", "val_pearson"} <= names
    assert result["weak_snapshots"] == 2
    weak_file = run / "weak" / "weak_predictions.npz"
    weak_mtime = weak_file.stat().st_mtime_ns

    # a rerun with more epochs continues from checkpoints/last.pt (same first two epochs)
    again = train_quality_predictor(spec, {**TINY, "epochs": 3}, run, progress=False, device="cpu")
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3]
    assert again["history"][:2] == json.loads(json.dumps(result["history"]))
    assert weak_file.stat().st_mtime_ns == weak_mtime  # weak predictions were reused from the cache


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(spec, tmp_path):
    """Stopped after epoch 2 of 3 and resumed in the middle of a reuse pool (the resumed process
    remakes the pool's samples, which must come out the same), as the LA recipe trains."""
    config = {**TINY, "weak": None, "p_weak": 0.0, "reuse_epochs": 3, "segmentation_head": True}
    whole = train_quality_predictor(spec, {**config, "epochs": 3}, tmp_path / "whole", progress=False,
                                    device="cpu")
    train_quality_predictor(spec, {**config, "epochs": 2}, tmp_path / "resumed", progress=False, device="cpu")
    resumed = train_quality_predictor(spec, {**config, "epochs": 3}, tmp_path / "resumed", progress=False,
                                      device="cpu")
    assert resumed["history"] == whole["history"]
    a = torch.load(whole["last_checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(resumed["last_checkpoint"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cancel_file_stops_training(spec, tmp_path):
    run = tmp_path / "g"
    request_cancel(run)
    from QGSegmentationLib.engine.cancel import CancelToken

    with pytest.raises(CancelledError):
        train_quality_predictor(spec, {**TINY, "epochs": 1, "weak": None}, run, cancel=CancelToken(run),
                                progress=False, device="cpu")


def test_2d_mode_trains_from_case_list(spec, tmp_path):
    from QGSegmentationLib.quality.train import load_cases

    cases = load_cases(spec.training, spec.labels)
    result = train_quality_predictor(cases, {"mode": "2d", "grid_size": [16, 16], "epochs": 1,
                                             "samples_per_case": 2, "batch_size": 4, "weak": None},
                                     tmp_path / "g2", progress=False, device="cpu")
    assert load_predictor(result["best_checkpoint"]).spatial_dims == 2


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown quality training option"):
        QualityTrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ConfigError, match="p_weak"):
        QualityTrainConfig.from_dict({"p_weak": 2})
    assert QualityTrainConfig().resolved_samples_per_case("cpu") == 8
    assert QualityTrainConfig().resolved_samples_per_case("cuda") == 50


def test_weak_pool_serves_class_masks_and_none_for_unknown_cases():
    label = np.array([[0, 1, 2], [2, 2, 0]], np.uint8)
    pool = WeakPool({"a": [label]}, snapshots=[1])
    assert pool("b") is None
    assert pool("a").tolist() == (label > 0).tolist()
    assert pool.for_class(2)("a").tolist() == (label == 2).tolist()


def test_weak_mask_used_with_p_weak_one_gets_its_true_dice():
    reference = np.zeros((20, 20), np.uint8)
    reference[5:15, 5:15] = 1                      # 100 voxels
    weak = np.zeros_like(reference)
    weak[5:15, 10:20] = 1                           # 100 voxels, 50 overlap -> Dice 0.5
    config = _make_vqm_config({}, 1.0)
    candidate, categories, dice = vqm_candidate(reference, (1.0, 1.0), 1, config,
                                                np.random.default_rng(0), None, "a", weak)
    assert categories == ["weak"]
    assert np.array_equal(candidate, weak)
    assert dice[0] == pytest.approx(2 * 50 / 200)


def test_dice_per_class_conventions():
    a = np.array([0, 1, 1, 2, 0])
    b = np.array([0, 1, 0, 0, 0])
    d = dice_per_class(a, b, 3)
    assert d[0] == pytest.approx(2 * 1 / 3)   # class 1: |a|=2, |b|=1, overlap 1
    assert d[1] == 0.0                        # class 2 only in a
    assert d[2] == 1.0                        # class 3 empty in both


def test_weak_cache_round_trip(tmp_path):
    from QGSegmentationLib.quality.weak import save_predictions

    maps = {"x": [np.ones((2, 3), np.uint8), np.zeros((2, 3), np.uint8)]}
    save_predictions(tmp_path, maps, [1, 3], key="k1")
    assert load_predictions(tmp_path, "other") is None
    loaded, snaps = load_predictions(tmp_path, "k1")
    assert snaps == [1, 3] and np.array_equal(loaded["x"][0], maps["x"][0])


def test_train_cli_streams_a_valid_event_protocol(spec, tmp_path, capsys):
    from QGSegmentationLib.cli.main import main
    from QGSegmentationLib.engine.events import parse_line, validate_stream

    code = main(["quality", "train", "--dataset", str(spec.source), "--run-dir", str(tmp_path / "g"),
                 "--epochs", "1", "--samples-per-case", "2", "--device", "cpu", "--json",
                 "--set", "grid_size=[16,16,16]", "--set", "batch_size=4", "--set", "weak=null"])
    out = capsys.readouterr().out
    assert code == 0
    events = [parse_line(line) for line in out.splitlines() if line.startswith("{")]
    validate_stream(events)
    assert events[-1]["status"] == "ok" and events[-1]["outputs"]["checkpoint"].endswith("best.pt")
    assert (tmp_path / "g" / "checkpoints" / "best.pt").is_file()
    split = load_dataset(tmp_path / "g" / "split.json")  # the cases g trained and was selected on
    assert len(split.validation) == 1 and {c.id for c in split.training + split.validation} == {c.id for c in spec.training}
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["command"][:4] == ["qgseg", "quality", "train", "--dataset"]


def test_train_cli_rejects_unknown_option_with_exit_2(spec, tmp_path, capsys):
    from QGSegmentationLib.cli.main import main

    code = main(["quality", "train", "--dataset", str(spec.source), "--run-dir", str(tmp_path / "g"),
                 "--set", "bogus=1", "--quiet"])
    assert code == 2
    assert "bogus" in capsys.readouterr().err


def test_extra_masks_from_other_segmenters_join_the_weak_pool(spec, tmp_path):
    """Folders of <case>.nrrd masks of training cases (e.g. `qgseg predict` outputs of other
    segmenters) are read on their case's grid and served like weak snapshots."""
    from QGSegmentationLib.data import io
    from QGSegmentationLib.errors import DataError
    from QGSegmentationLib.quality.train import load_cases
    from QGSegmentationLib.quality.weak import load_mask_folders, merged_pool

    folder, odd, wrong = tmp_path / "masks", tmp_path / "odd", tmp_path / "wrong"
    shifted = {}
    for ref in spec.training[:2]:
        label, geometry = io.read_label(ref.label)
        shifted[ref.id] = np.roll(label, 2, axis=2)                 # a misplaced but plausible mask
        io.write_label(folder / f"{ref.id}.nrrd", shifted[ref.id], geometry)
        cropped = dataclasses.replace(geometry, size=(geometry.size[0], geometry.size[1] - 2, geometry.size[2]))
        io.write_label(wrong / f"{ref.id}.nrrd", label[:, :-2], cropped)
    io.write_label(odd / "somebody_else.nrrd", label, geometry)
    cases = load_cases(spec.training, spec.labels)
    masks = load_mask_folders([folder], cases, n_foreground=1)
    assert sorted(masks) == sorted(shifted)
    for case_id, maps in masks.items():
        assert len(maps) == 1 and np.array_equal(maps[0], shifted[case_id])
    pool = merged_pool(None, masks, seed=0)
    first = spec.training[0].id
    assert np.array_equal(pool(first), shifted[first] > 0) and pool(spec.training[3].id) is None
    with pytest.raises(DataError, match="wrong/.*differs from case"):
        load_mask_folders([wrong], cases, n_foreground=1)
    with pytest.raises(DataError, match="odd: no mask named after a training case"):
        load_mask_folders([odd], cases, n_foreground=1)
    result = train_quality_predictor(spec, {**TINY, "epochs": 1, "weak": None, "p_weak": 1.0,
                                            "extra_masks": [str(folder)]}, tmp_path / "g", progress=False,
                                     device="cpu")
    assert result["epochs_run"] == 1


def test_masks_from_other_tools_must_share_their_cases_grid_not_only_its_size(spec, tmp_path):
    """--extra-masks / --validation-masks: a mask of the right size on another grid (spacing,
    origin) is refused like a mask scored against its image, for cases loaded from their files and
    for data-layer cases alike."""
    from QGSegmentationLib.data import io
    from QGSegmentationLib.data.cache import PreparedCase
    from QGSegmentationLib.errors import DataError
    from QGSegmentationLib.quality.train import load_cases
    from QGSegmentationLib.quality.weak import load_mask_folders

    ref = spec.training[0]
    label, geometry = io.read_label(ref.label)
    respaced, moved, same = tmp_path / "respaced", tmp_path / "moved", tmp_path / "same"
    io.write_label(respaced / f"{ref.id}.nrrd", label, dataclasses.replace(geometry, spacing=(3.0, 3.0, 3.0)))
    io.write_label(moved / f"{ref.id}.nrrd", label,
                   dataclasses.replace(geometry, origin=tuple(o + 10.0 for o in geometry.origin)))
    io.write_label(same / f"{ref.id}.nrrd", label, geometry)
    cases = load_cases(spec.training[:1], spec.labels)
    with pytest.raises(DataError, match=rf"respaced/{ref.id}.nrrd: mask geometry does not match case "
                                        rf"'{ref.id}': spacing .*\(case vs mask\)"):
        load_mask_folders([respaced], cases, n_foreground=1)
    with pytest.raises(DataError, match=r"moved/.*: mask geometry does not match .*: origin"):
        load_mask_folders([moved], cases, n_foreground=1)
    prepared = [PreparedCase(ref.id, io.read_image(ref.image)[0][None], label, geometry, geometry, ref.image)]
    with pytest.raises(DataError, match=r"moved/.*: mask geometry does not match .*: origin"):
        load_mask_folders([moved], prepared, n_foreground=1, role="validation")
    assert [len(m) for m in load_mask_folders([same], prepared, n_foreground=1).values()] == [1]


def test_validation_masks_of_real_segmenters_join_early_stopping(spec, tmp_path):
    """Real masks of the validation cases are scored exactly as `qgseg quality score` would, and
    the early-stopping criterion is the mean of the synthetic-mask and real-mask MAE."""
    from QGSegmentationLib.data import io
    from QGSegmentationLib.errors import DataError
    from QGSegmentationLib.quality.calibrate import set_shift
    from QGSegmentationLib.quality.score import predict_volume
    from QGSegmentationLib.quality.train import load_cases

    config = {**TINY, "epochs": 1, "weak": None, "p_weak": 0.0, "seed": 3}
    plain = train_quality_predictor(spec, config, tmp_path / "plain", progress=False, device="cpu")
    validation_ids = load_predictor(plain["best_checkpoint"]).meta["validation_cases"]
    case = next(c for c in load_cases(spec.training, spec.labels) if c.id == validation_ids[0])
    folders, masks = [tmp_path / f"seg_{k}" for k in range(5)], []
    _, geometry = io.read_label(next(r.label for r in spec.training if r.id == case.id))
    for shift, folder in enumerate(folders, start=1):
        masks.append(np.roll(case.label, shift, axis=2))
        io.write_label(folder / f"{case.id}.nrrd", masks[-1], geometry)

    run = tmp_path / "with_real"
    result = train_quality_predictor(spec, {**config, "validation_masks": [str(f) for f in folders]},
                                     run, progress=False, device="cpu")
    record = result["history"][0]
    model = load_predictor(result["best_checkpoint"])
    shift = model.output_shift.clone()
    set_shift(model, [0.0])
    raw = np.array([float(predict_volume(model, case.image, m, case.spacing)[0]) for m in masks])
    truth = np.array([float(dice_per_class(m, case.label, 1)[0]) for m in masks])
    assert record["val_mae_real"] == pytest.approx(np.abs(raw - truth).mean(), abs=1e-5)
    # the selected g is then calibrated on those masks
    assert shift.item() == pytest.approx((truth - raw).mean(), abs=1e-5)
    assert result["calibration_shift"] == [pytest.approx(shift.item())]
    assert record["val_mae"] == pytest.approx(0.5 * (record["val_mae_synthetic"] + record["val_mae_real"]))
    assert record["val_mae_synthetic"] == pytest.approx(plain["history"][0]["val_mae"], abs=1e-6)
    assert "val_mae_real" not in plain["history"][0]
    with pytest.raises(DataError, match="seg_9: mask folder not found"):
        train_quality_predictor(spec, {**config, "validation_masks": [str(tmp_path / "seg_9")]},
                                tmp_path / "bad", progress=False, device="cpu")


def test_segmentation_loss_rewards_the_reference_and_trains_the_head(spec, tmp_path):
    from QGSegmentationLib.quality.train import segmentation_loss

    reference = torch.zeros(2, 1, 8, 8, 8)
    reference[:, :, 2:6, 2:6, 2:6] = 1
    right = torch.cat([1 - reference, reference], 1) * 20 - 10      # confident and correct
    assert segmentation_loss(right, reference).item() < 1e-3
    assert segmentation_loss(-right, reference).item() > 5

    config = {**TINY, "epochs": 2, "weak": None, "p_weak": 0.0, "segmentation_head": True}
    result = train_quality_predictor(spec, config, tmp_path / "g", progress=False, device="cpu")
    without = train_quality_predictor(spec, {**config, "segmentation_weight": 0.0}, tmp_path / "g0",
                                      progress=False, device="cpu")
    heads = [load_predictor(r["best_checkpoint"]).segmenter.state_dict() for r in (result, without)]
    changed = [name for name, value in heads[0].items()
               if value.is_floating_point() and not torch.allclose(value, heads[1][name])]
    assert changed, "the auxiliary segmentation loss did not reach the head"
    with pytest.raises(ConfigError, match="another configuration"):
        train_quality_predictor(spec, {**config, "segmentation_head": False, "epochs": 3}, tmp_path / "g",
                                progress=False, device="cpu")
