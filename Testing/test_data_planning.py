"""Automatic spacing and patch size (`--spacing auto --patch auto`): the rules of data/planning.py,
on fingerprints worked out by hand, on real files, and inside a real training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from QGSegmentationLib.data.io import Geometry, write_image
from QGSegmentationLib.data.planning import (BUDGETS, PLAN_FILE, Fingerprint, fingerprint_of, make_plan,
                                             plan_patch, plan_spacing, read_plan, round_up)
from QGSegmentationLib.engine.config import TrainConfig
from QGSegmentationLib.engine.trainer import Trainer
from QGSegmentationLib.errors import ConfigError, DataError

TINY_NET = {"channels": [4, 8], "strides": [2], "num_res_units": 0}


@pytest.mark.parametrize("value, expected", [(1.0, 1.0), (1.04, 1.25), (1.26, 1.5), (0.7, 0.8), (2.6, 3.0),
                                             (8.1, 10.0), (0.031, 0.04), (12.0, 12.5)])
def test_round_up_gives_the_next_round_number(value, expected):
    assert round_up(value) == pytest.approx(expected)


def test_spacing_is_the_median_when_the_volume_fits_the_budget():
    assert plan_spacing((0.8, 0.8, 2.0), (160.0, 160.0, 100.0), budget_voxels=10_000_000) == (0.8, 0.8, 2.0)


def test_spacing_coarsens_the_finest_axes_first_to_a_round_floor_that_fits():
    # 0.5 x 0.5 x 3 mm over 200 x 200 x 90 mm: 400 x 400 x 30 = 4.8 M voxels
    spacing = plan_spacing((0.5, 0.5, 3.0), (200.0, 200.0, 90.0), budget_voxels=1_000_000)
    # the budget needs an in-plane floor of 0.5 * sqrt(4.8) = 1.095 mm -> 1.25; z keeps its 3 mm
    assert spacing == (1.25, 1.25, 3.0)
    assert 200 / 1.25 * 200 / 1.25 * 90 / 3.0 <= 1_000_000
    # a tighter budget reaches the coarse axis too: all three share the floor
    tight = plan_spacing((0.5, 0.5, 3.0), (200.0, 200.0, 90.0), budget_voxels=20_000)
    assert tight[0] == tight[1] == tight[2] > 3.0
    assert np.prod([e / s for e, s in zip((200.0, 200.0, 90.0), tight)]) <= 20_000


def test_2d_spacing_never_touches_z():
    spacing = plan_spacing((0.5, 0.5, 0.5), (400.0, 400.0, 400.0), budget_voxels=256 ** 2, axes=(0, 1))
    assert spacing[2] == 0.5 and spacing[0] == spacing[1] == round_up(0.5 * 800 / 256)


def test_patch_fits_the_budget_in_multiples_of_16_and_balances_millimetres():
    patch = plan_patch((44, 72, 96), (1.25, 1.25, 1.25), budget_voxels=32 * 64 * 64)
    assert patch == (48, 48, 48)
    anisotropic = plan_patch((20, 320, 320), (3.6, 0.6, 0.6), budget_voxels=32 * 64 * 64)
    assert all(p % 16 == 0 for p in anisotropic) and np.prod(anisotropic) <= 32 * 64 * 64
    millimetres = [p * s for p, s in zip(anisotropic, (3.6, 0.6, 0.6))]
    assert max(millimetres) / min(millimetres) < 1.5  # about as long on every axis
    assert plan_patch((5, 9, 12), (1.0, 1.0, 1.0), budget_voxels=10 ** 6) == (16, 16, 16)  # smaller than 16: padded


def test_left_atrium_sized_data_gets_the_benchmarked_spacing_on_cpu_and_its_own_on_gpu():
    """LA's cropped volumes (about 190 x 142 x 88 voxels at 0.625 mm): the CPU plan is the
    1.25 mm of BENCHMARKS.md §1; a GPU keeps 0.625 mm with a 128^3-sized patch."""
    fingerprint = Fingerprint(sizes=((190, 142, 88), (176, 138, 88), (204, 150, 88)),
                              spacings=((0.625, 0.625, 0.625),) * 3)
    cpu = make_plan(fingerprint, "3d", "cpu")
    assert cpu.target_spacing == (1.25, 1.25, 1.25) and cpu.patch_size == (48, 48, 48)
    assert cpu.median_shape == (44, 71, 95)
    gpu = make_plan(fingerprint, "3d", "cuda")
    assert gpu.target_spacing == (0.625, 0.625, 0.625)
    assert np.prod(gpu.patch_size) <= BUDGETS[("3d", "cuda")].patch_voxels and gpu.patch_size[0] == 96
    flat = make_plan(fingerprint, "2d", "cpu")
    assert flat.target_spacing == (0.625, 0.625, 0.625) and flat.patch_size == (144, 192)  # whole slices
    assert make_plan(fingerprint, "3d", "mps").device == "cpu"  # anything but CUDA plans as the CPU
    with pytest.raises(ConfigError, match="mode must be 2d or 3d"):
        make_plan(fingerprint, "4d")


def test_fingerprint_reads_headers_and_takes_medians(tmp_path):
    paths = []
    for i, (size, spacing) in enumerate([((20, 30, 10), (1.0, 1.0, 2.0)), ((22, 30, 12), (0.8, 0.8, 2.5)),
                                         ((40, 30, 10), (0.9, 0.9, 3.0))]):
        geometry = Geometry(size, spacing, (0.0, 0.0, 0.0))
        paths.append(write_image(tmp_path / f"c{i}.nrrd", np.zeros(tuple(reversed(size)), np.float32), geometry))
    fingerprint = fingerprint_of(paths)
    assert fingerprint.median_spacing == pytest.approx((0.9, 0.9, 2.5))
    assert fingerprint.median_extent_mm == pytest.approx((20.0, 27.0, 30.0))
    assert fingerprint.summary()["size_max"] == [40, 30, 12]
    with pytest.raises(DataError, match="missing.nrrd"):
        fingerprint_of([tmp_path / "missing.nrrd"])
    with pytest.raises(DataError, match="no labeled cases"):
        fingerprint_of([])


def test_a_damaged_plan_file_is_named(tmp_path):
    assert read_plan(tmp_path) is None
    (tmp_path / PLAN_FILE).write_text('{"mode": "3d"}')
    with pytest.raises(DataError, match=f"{PLAN_FILE}.*missing device"):
        read_plan(tmp_path)
    (tmp_path / PLAN_FILE).write_text("not json")
    with pytest.raises(DataError, match="delete it to plan again"):
        read_plan(tmp_path)


def test_config_takes_auto_keep_or_numbers():
    cfg = TrainConfig(dataset="d.json")
    assert cfg.target_spacing == "auto" and cfg.patch_size == "auto" and cfg.needs_plan
    fixed = TrainConfig.from_dict({"dataset": "d.json", "target_spacing": None, "patch_size": [32, 64, 64]})
    assert fixed.target_spacing is None and fixed.patch_size == (32, 64, 64) and not fixed.needs_plan
    assert TrainConfig.from_dict({"patch_size": "AUTO", "target_spacing": "Auto"}).needs_plan
    with pytest.raises(ConfigError, match="patch_size must be auto or 3 whole numbers"):
        TrainConfig.from_dict({"patch_size": "big"})
    with pytest.raises(ConfigError, match="target_spacing must be auto, null"):
        TrainConfig.from_dict({"target_spacing": [1.0, 0.0, 1.0]})


def test_training_plans_records_and_keeps_the_plan(phantom_3d, tmp_path):
    """A run with both at auto writes plan.json, tells the user (a `note` event), and trains and
    saves with the planned values; a run folder that holds a plan keeps it when resumed."""
    from QGSegmentationLib.data.dataset import load_dataset
    from QGSegmentationLib.data.planning import plan_for_cases
    from QGSegmentationLib.engine.events import EventWriter, read_events

    base = dict(dataset=str(phantom_3d), batch_size=1, iterations=2, val_every=2, checkpoint_every=2,
                network="unet", network_options=TINY_NET, device="cpu", seed=0)
    run = tmp_path / "run"
    events = EventWriter.open(tmp_path / "events.jsonl")
    said = []
    Trainer(TrainConfig(**base), run, events=events, progress_bar=False, say=said.append).fit()
    events.close()
    spec = load_dataset(phantom_3d)
    expected = plan_for_cases(list(spec.training) + list(spec.validation), "3d", "cpu")
    assert read_plan(run) == expected
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert tuple(state["config"]["patch_size"]) == expected.patch_size == tuple(state["patch_size"])
    assert tuple(state["preprocess"]["target_spacing"]) == expected.target_spacing
    notes = [e["message"] for e in read_events(tmp_path / "events.jsonl") if e["event"] == "note"]
    assert len(notes) == 1 and PLAN_FILE in notes[0] and notes == said
    assert "x".join(map(str, expected.patch_size)) in notes[0]

    # a plan already in the run folder (as after a crash on another device) is kept ...
    kept = tmp_path / "kept"
    kept.mkdir()
    planned = json.loads((run / PLAN_FILE).read_text())
    planned["patch_size"] = [16, 16, 16]
    (kept / PLAN_FILE).write_text(json.dumps(planned))
    Trainer(TrainConfig(**base), kept, progress_bar=False).fit()
    assert torch.load(kept / "checkpoints" / "last.pt", weights_only=True)["patch_size"] == [16, 16, 16]
    # ... unless the run starts over, and typed values win over any plan
    Trainer(TrainConfig(**base), kept, progress_bar=False, resume=False).fit()
    assert tuple(torch.load(kept / "checkpoints" / "last.pt", weights_only=True)["patch_size"]) == expected.patch_size
    typed = TrainConfig(**{**base, "patch_size": (16, 32, 32), "target_spacing": None})
    Trainer(typed, tmp_path / "typed", progress_bar=False).fit()
    assert not (tmp_path / "typed" / PLAN_FILE).exists()


def test_plan_command_and_train_flags(phantom_3d, tmp_path):
    res = run_cli("plan", "--dataset", str(phantom_3d), "--device", "cuda", "--output", str(tmp_path / "p.json"))
    assert res.returncode == 0, res.stderr
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["device"] == "cuda" and "the same as: --spacing" in res.stdout
    assert f"--patch {' '.join(map(str, plan['patch_size']))}" in res.stdout

    res = run_cli("plan", "--dataset", str(tmp_path / "nope.json"))
    assert res.returncode == 2 and "nope.json" in res.stderr
    for flags, message in ((["--spacing", "1", "2"], "give three positive numbers"),
                           (["--patch", "16", "x"], "give whole numbers")):
        res = run_cli("train", "--dataset", str(phantom_3d), "--run-dir", str(tmp_path / "bad"), "--quiet", *flags)
        assert res.returncode == 2 and message in res.stderr, res.stderr
    res = run_cli("train", "--dataset", str(phantom_3d), "--run-dir", str(tmp_path / "keep"), "--quiet",
                  "--spacing", "keep", "--patch", "16", "16", "16", "--iterations", "1", "--val-every", "1",
                  "--set", "network_options={channels: [4, 8], strides: [2], num_res_units: 0}", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "keep" / "manifest.json").read_text())
    assert manifest["config"]["target_spacing"] is None and manifest["config"]["patch_size"] == [16, 16, 16]


def test_a_chosen_spacing_is_kept_and_the_patch_planned_for_it():
    fingerprint = Fingerprint(sizes=((190, 142, 88),), spacings=((0.625, 0.625, 0.625),))
    fine = make_plan(fingerprint, "3d", "cpu", spacing=(0.625, 0.625, 0.625))
    assert fine.target_spacing == (0.625, 0.625, 0.625) and fine.median_shape == (88, 142, 190)
    assert np.prod(fine.patch_size) <= BUDGETS[("3d", "cpu")].patch_voxels
    kept = make_plan(fingerprint, "3d", "cpu", spacing=None)  # keep: each volume's grid, the median here
    assert kept.patch_size == fine.patch_size
    assert make_plan(fingerprint, "3d", "cpu", spacing=(2.5, 2.5, 2.5)).median_shape == (22, 36, 48)
