"""The training engine end to end on tiny phantoms: train -> predict -> evaluate in 2D and 3D,
resume after a crash equals an uninterrupted run, cancel, checkpoints that load safely."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from QGSegmentationLib.engine.checkpoint import load_checkpoint
from QGSegmentationLib.engine.config import TrainConfig
from QGSegmentationLib.engine.events import read_events, validate_stream
from QGSegmentationLib.engine.trainer import Trainer
from QGSegmentationLib.errors import CancelledError, ConfigError

from conftest import REPO, run_cli

TINY_NET = {"channels": [4, 8, 16]}


def tiny_config(dataset, **overrides) -> TrainConfig:
    base = dict(dataset=str(dataset), mode="3d", patch_size=(16, 32, 32), batch_size=2, iterations=6,
                val_every=3, checkpoint_every=2, network="unet", network_options=TINY_NET, lr=1e-2,
                device="cpu", seed=3, unlabeled_batch_size=1, n_validation=1)
    base.update(overrides)
    return TrainConfig(**base)


def weights(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["networks"][0]


def cancelled_after(iteration: int):
    """A Trainer that asks to be cancelled (its run folder's CANCEL file) once `iteration` has run."""

    class CancelledAfter(Trainer):
        def step(self, info):
            out = super().step(info)
            if info.iteration == iteration:
                (self.run_dir / "CANCEL").write_text("stop")
            return out

    return CancelledAfter


def test_supervised_training_learns_and_writes_safe_checkpoints(phantom_3d, tmp_path):
    cfg = tiny_config(phantom_3d, iterations=40, val_every=20, lr=2e-2)
    result = Trainer(cfg, tmp_path / "run", progress_bar=False).fit()
    assert result.best_checkpoint.exists() and result.last_checkpoint.exists()
    state = load_checkpoint(result.best_checkpoint)  # weights_only=True inside
    assert state["config"]["network"] == "unet" and state["n_classes"] == 2
    assert "torch" in state["versions"]
    history = result.history
    assert [h["iteration"] for h in history] == [20, 40]
    assert result.best_metric > 0.3, history  # a 40-step tiny net already finds the bright organ
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 1000


def test_cancel_saves_checkpoint_and_resume_matches_uninterrupted(phantom_3d, tmp_path):
    reference = Trainer(tiny_config(phantom_3d), tmp_path / "uninterrupted", progress_bar=False).fit()

    run_dir = tmp_path / "interrupted"
    with pytest.raises(CancelledError):
        cancelled_after(2)(tiny_config(phantom_3d), run_dir, progress_bar=False).fit()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == 3
    (run_dir / "CANCEL").unlink()
    resumed = Trainer(tiny_config(phantom_3d), run_dir, progress_bar=False).fit()
    for key, value in weights(reference.last_checkpoint).items():
        assert torch.equal(value, weights(resumed.last_checkpoint)[key]), key
    assert resumed.best_metric == pytest.approx(reference.best_metric)


def test_killed_worker_resumes_from_last_checkpoint(phantom_3d, tmp_path):
    """A real crash: SIGKILL the CLI once a checkpoint exists, start it again, compare."""
    common = ["train", "--dataset", str(phantom_3d), "--patch", "16", "32", "32", "--iterations", "12",
              "--val-every", "6", "--seed", "5", "--device", "cpu", "--quiet",
              "--set", "network_options={channels: [4, 8, 16]}", "--set", "checkpoint_every=2",
              "--set", "n_validation=1"]
    reference = run_cli(*common, "--run-dir", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "crash"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "QGSegmentationLib.cli.main", *common, "--run-dir", str(run_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists()
    killed_at = load_checkpoint(last)["iteration"]
    assert 0 < killed_at < 12
    again = run_cli(*common, "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    ref_w, res_w = weights(tmp_path / "ref" / "checkpoints" / "last.pt"), weights(last)
    for key in ref_w:
        assert torch.equal(ref_w[key], res_w[key]), key


@pytest.mark.parametrize("mode,patch", [("3d", ["16", "32", "32"]), ("2d", ["32", "32"])])
def test_cli_train_predict_evaluate(phantom_3d, tmp_path, mode, patch):
    from QGSegmentationLib.data.io import read_geometry

    run = tmp_path / "run"
    res = run_cli("train", "--dataset", str(phantom_3d), "--mode", mode, "--patch", *patch, "--iterations", "8",
                  "--val-every", "4", "--device", "cpu", "--run-dir", str(run), "--events", str(run / "events.jsonl"),
                  "--set", "network_options={channels: [4, 8, 16]}", "--quiet")
    assert res.returncode == 0, res.stderr
    events = read_events(run / "events.jsonl")
    validate_stream(events)
    kinds = {e["event"] for e in events}
    assert {"start", "stage", "progress", "metric", "done"} <= kinds
    assert events[-1]["status"] == "ok" and events[-1]["exit_code"] == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["mode"] == mode and manifest["seed"] == 0 and manifest["versions"]["torch"]
    assert manifest["command"][:3] == ["qgseg", "train", "--dataset"] and "--iterations" in manifest["command"]

    preds = tmp_path / "preds"
    res = run_cli("predict", "--checkpoint", str(run / "checkpoints" / "best.pt"),  # an ensemble of two
                  str(run / "checkpoints" / "last.pt"), "--input", str(phantom_3d),
                  "--split", "test", "--output", str(preds), "--device", "cpu", "--run-dir", str(tmp_path / "p"), "--quiet",
                  *(["--no-mirror"] if mode == "2d" else []))  # mirroring is the default
    assert res.returncode == 0, res.stderr
    spec = json.loads(phantom_3d.read_text())
    for entry in spec["test"]:
        image = phantom_3d.parent / entry["image"]
        case = image.name.replace(".nrrd", "")
        for suffix in (".nrrd", ".seg.nrrd"):
            assert read_geometry(preds / f"{case}{suffix}").almost_equal(read_geometry(image), tol=1e-6)

    res = run_cli("evaluate", "--predictions", str(preds), "--dataset", str(phantom_3d), "--split", "test",
                  "--run-dir", str(tmp_path / "e"), "--quiet")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["n_cases"] == 2
    assert 0.0 <= summary["summary"]["dice"]["mean"] <= 1.0


def test_held_out_validation_cases_are_addressed_through_the_runs_split_file(tmp_path):
    """A dataset without a "validation" list: training holds cases out and lists them in
    split.json, which predict and evaluate take in place of the dataset.json."""
    from QGSegmentationLib.data.dataset import load_dataset
    from QGSegmentationLib.data.phantom import make_phantom_dataset

    dataset = make_phantom_dataset(tmp_path / "ds", n_labeled=3, n_unlabeled=0, n_test=0,
                                   shape=(16, 32, 32), seed=2)
    run = tmp_path / "run"
    Trainer(tiny_config(dataset, iterations=2, val_every=2), run, progress_bar=False).fit()
    held_out = load_dataset(run / "split.json")
    assert len(held_out.validation) == 1 and len(held_out.training) == 2
    assert {c.id for c in held_out.training + held_out.validation} == {c.id for c in load_dataset(dataset).training}

    res = run_cli("predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--input", str(dataset),
                  "--split", "validation", "--output", str(tmp_path / "p"), "--no-mirror", "--quiet")
    assert res.returncode == 2 and "lists no \"validation\" cases" in res.stderr and "split.json" in res.stderr
    assert not (tmp_path / "p").exists()
    res = run_cli("predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--input", str(run / "split.json"),
                  "--split", "validation", "--output", str(tmp_path / "p"), "--no-mirror", "--quiet")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "p").glob("*.seg.nrrd")) == [f"{held_out.validation[0].id}.seg.nrrd"]
    res = run_cli("evaluate", "--predictions", str(tmp_path / "p"), "--dataset", str(dataset), "--split",
                  "validation", "--run-dir", str(tmp_path / "e0"), "--quiet")
    assert res.returncode == 2 and "split.json" in res.stderr
    res = run_cli("evaluate", "--predictions", str(tmp_path / "p"), "--dataset", str(run / "split.json"),
                  "--split", "validation", "--run-dir", str(tmp_path / "e"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["n_cases"] == 1


def test_multiclass_training_runs(phantom_multiclass, tmp_path):
    result = Trainer(tiny_config(phantom_multiclass, iterations=4, val_every=4), tmp_path / "mc",
                     progress_bar=False).fit()
    assert load_checkpoint(result.last_checkpoint)["n_classes"] == 3


def test_checkpoint_ensemble_averages_softmaxes_of_compatible_segmenters(phantom_3d, phantom_multiclass, tmp_path):
    from QGSegmentationLib.segmenter import ensemble_segmenters, load_segmenter

    paths = []
    for seed in (0, 1):
        config = tiny_config(phantom_3d, iterations=2, val_every=2, seed=seed)
        paths.append(Trainer(config, tmp_path / f"s{seed}", progress_bar=False).fit().last_checkpoint)
    members = [load_segmenter(p) for p in paths]
    combined = ensemble_segmenters(members)
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        by_hand = sum(torch.softmax(m.network(x), 1) for m in members) / 2
        assert torch.allclose(torch.exp(combined.network(x)), by_hand, atol=1e-5)
        assert not torch.allclose(torch.softmax(members[0].network(x), 1), by_hand, atol=1e-4)
    assert ensemble_segmenters(members[:1]) is members[0]
    other = Trainer(tiny_config(phantom_multiclass, iterations=2, val_every=2), tmp_path / "mc",
                    progress_bar=False).fit().last_checkpoint
    with pytest.raises(ConfigError, match=r"mc/checkpoints/last.pt: cannot be ensembled .* labels differ"):
        ensemble_segmenters([members[0], load_segmenter(other)])


def test_poly_schedule_decays_to_zero(phantom_3d, tmp_path):
    trainer = Trainer(tiny_config(phantom_3d, iterations=4, val_every=4), tmp_path / "s", progress_bar=False)
    trainer.fit()
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert lrs[0] == pytest.approx(0.0, abs=1e-12)


def test_mixed_precision_is_off_on_cpu_and_amp_dtype_is_checked(phantom_3d, tmp_path):
    from QGSegmentationLib.engine.device import autocast_dtype

    assert autocast_dtype(torch.device("cpu"), "fp16") is None  # the CPU path stays fp32
    trainer = Trainer(tiny_config(phantom_3d, amp="on"), tmp_path / "cpu", progress_bar=False)
    assert trainer.amp_dtype is None
    with pytest.raises(ConfigError, match="amp_dtype must be auto, bf16 or fp16, not 'fp8'"):
        tiny_config(phantom_3d, amp_dtype="fp8").validate()


def test_channels_last_by_default_for_3d_on_a_cpu_and_switchable(phantom_3d, tmp_path):
    """oneDNN's 3D convolutions run faster channels-last on a CPU (BENCHMARKS.md §17); 2D gains nothing."""
    trainer = Trainer(tiny_config(phantom_3d, iterations=2, val_every=2), tmp_path / "3d", progress_bar=False)
    trainer.fit()
    conv = next(p for p in trainer.networks[0].parameters() if p.dim() == 5 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    assert not Trainer(tiny_config(phantom_3d, channels_last="off"), tmp_path / "off",
                       progress_bar=False).use_channels_last
    assert not Trainer(tiny_config(phantom_3d, mode="2d", patch_size=(32, 32)), tmp_path / "2d",
                       progress_bar=False).use_channels_last
    with pytest.raises(ConfigError, match="channels_last must be auto, on or off, not 'yes'"):
        tiny_config(phantom_3d, channels_last="yes").validate()


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype,method", [("bf16", "sup"), ("fp16", "sup"), ("bf16", "mt")])
def test_cuda_training_and_inference_in_mixed_precision(phantom_3d, tmp_path, amp_dtype, method):
    """Both autocast dtypes train finite losses on CUDA (MT: losses on the GPU and on the CPU read
    back together); loss scaling exactly for float16; the trained segmenter predicts a whole
    volume on the GPU."""
    from QGSegmentationLib.inference import sliding_window_probs
    from QGSegmentationLib.segmenter import load_segmenter

    cfg = tiny_config(phantom_3d, device="cuda", amp="on", amp_dtype=amp_dtype, iterations=24, val_every=12,
                      checkpoint_every=24, method=method)
    trainer = Trainer(cfg, tmp_path / amp_dtype, progress_bar=False)
    result = trainer.fit()
    expected = torch.bfloat16 if amp_dtype == "bf16" else torch.float16
    assert trainer.amp_dtype == expected and trainer.scaler.is_enabled() == (amp_dtype == "fp16")
    assert all(np.isfinite(h["train_loss"]) for h in result.history), result.history
    segmenter = load_segmenter(result.last_checkpoint, device="cuda")
    volume = torch.randn(1, 1, 20, 40, 40)
    probs = sliding_window_probs(segmenter.network, volume, segmenter.patch_size, device="cuda", amp=True)
    reference = sliding_window_probs(segmenter.network, volume, segmenter.patch_size, device="cuda")
    assert probs.dtype == torch.float32 and probs.shape == (2, 20, 40, 40)
    assert torch.allclose(probs.sum(0), torch.ones(20, 40, 40), atol=1e-3)
    assert (probs - reference).abs().max() < 0.05  # mixed precision changes probabilities only slightly


def test_losses_are_read_back_together_and_a_nan_stops_the_run_naming_its_iteration(phantom_3d, tmp_path):
    from QGSegmentationLib.errors import DataError

    trainer = Trainer(tiny_config(phantom_3d), tmp_path / "r", progress_bar=False)
    pending = [{"loss": torch.tensor(0.5), "sup": torch.tensor(0.25), "weight": 0.1},
               {"loss": torch.tensor(0.4), "qw_mean": torch.tensor(0.9), "weight": 0.2}]
    assert trainer.read_losses(pending, first_iteration=10) == [
        {"loss": 0.5, "sup": 0.25, "weight": 0.1}, {"loss": pytest.approx(0.4), "qw_mean": pytest.approx(0.9),
                                                     "weight": 0.2}]
    pending.append({"loss": torch.tensor(float("nan")), "sup": torch.tensor(1.0), "weight": 0.3})
    with pytest.raises(DataError, match="training diverged at iteration 12: loss is nan"):
        trainer.read_losses(pending, first_iteration=10)


def test_a_quality_predictor_given_as_segmenter_is_refused_with_a_hint(tmp_path):
    from QGSegmentationLib.errors import DataError

    g_file, other_file = tmp_path / "g.pt", tmp_path / "other.pt"
    torch.save({"format": "qgseg-quality-predictor"}, g_file)
    torch.save({"format": "something-else"}, other_file)
    with pytest.raises(DataError, match="g.pt: expected a qgseg-segmenter checkpoint") as refused:
        load_checkpoint(g_file)
    assert "--quality-checkpoint" in refused.value.hint
    with pytest.raises(DataError, match="other.pt") as other:
        load_checkpoint(other_file)
    assert other.value.hint is None


def test_a_file_that_is_no_checkpoint_is_named_and_described(tmp_path):
    """Empty, cut short, not PyTorch, holding Python objects, or plain data of no known kind: each
    is a DataError (exit 2) saying what is wrong with the file, never a traceback. An empty file
    used to end in IndexError (torch's EOFError has no message)."""
    from QGSegmentationLib.errors import DataError
    from QGSegmentationLib.quality.predictor import load_predictor

    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.zeros(1000)}, whole)
    files = {"empty.pt": b"", "cut.pt": whole.read_bytes()[:2000], "text.pt": b"hello\n",
             "random.pt": bytes(range(256)) * 8}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    torch.save({"foo": 1}, tmp_path / "foo.pt")
    expected = {"empty.pt": "the file is empty", "cut.pt": "cut short or damaged",
                "text.pt": "not a PyTorch checkpoint file", "random.pt": "not a PyTorch checkpoint file",
                "module.pt": "holds Python objects", "foo.pt": "does not say what it is"}
    for name, why in expected.items():
        for load in (load_checkpoint, load_predictor):
            with pytest.raises(DataError) as refused:
                load(tmp_path / name)
            assert str(tmp_path / name) in str(refused.value) and why in str(refused.value), refused.value


def test_loss_and_clip_percentiles_are_trained_with_and_kept_for_inference(phantom_3d, tmp_path):
    from QGSegmentationLib.segmenter import load_segmenter

    cfg = tiny_config(phantom_3d, iterations=4, val_every=4, loss="dice_ce_bg", clip_percentiles=(0, 100))
    result = Trainer(cfg, tmp_path / "run", progress_bar=False).fit()
    state = load_checkpoint(result.best_checkpoint)
    assert state["config"]["loss"] == "dice_ce_bg" and state["config"]["clip_percentiles"] == [0.0, 100.0]
    segmenter = load_segmenter(result.best_checkpoint)
    assert segmenter.preprocessor.config.clip_percentiles == (0.0, 100.0)  # inference normalises alike
    assert all(np.isfinite(h["loss"]) for h in result.history if "loss" in h)


def test_labels_are_resampled_linearly_by_default_and_older_runs_keep_nearest_neighbour(phantom_3d, tmp_path):
    """linear is the default (BENCHMARKS.md §15); a checkpoint that does not record the setting
    predates it and was trained with nearest neighbour, so resuming it, or loading it, keeps that."""
    from QGSegmentationLib.engine.checkpoint import save_checkpoint
    from QGSegmentationLib.engine.events import EventWriter, read_events
    from QGSegmentationLib.segmenter import load_segmenter

    run_dir = tmp_path / "older"
    first = cancelled_after(1)(tiny_config(phantom_3d, iterations=4, val_every=4), run_dir, progress_bar=False)
    with pytest.raises(CancelledError):
        first.fit()
    assert first.preprocessor.config.label_resampling == "linear"
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    assert state["config"]["label_resampling"] == state["preprocess"]["label_resampling"] == "linear"
    del state["config"]["label_resampling"], state["preprocess"]["label_resampling"]  # as written before §14
    save_checkpoint(last, state)
    assert load_segmenter(last).preprocessor.config.label_resampling == "nearest"

    (run_dir / "CANCEL").unlink()
    events = EventWriter.open(tmp_path / "events.jsonl")
    resumed = Trainer(tiny_config(phantom_3d, iterations=4, val_every=4), run_dir, events=events, progress_bar=False)
    resumed.fit()
    events.close()
    assert resumed.preprocessor.config.label_resampling == "nearest"
    assert load_checkpoint(last)["config"]["label_resampling"] == "nearest"
    warnings = [e["message"] for e in read_events(tmp_path / "events.jsonl") if e["event"] == "warning"]
    assert any("label_resampling=nearest, as this run started" in w for w in warnings), warnings


def test_rerunning_a_finished_run_says_there_is_nothing_to_train(phantom_3d, tmp_path):
    """A rerun of a finished run trains nothing and says so, instead of 'resuming at iteration N'
    as if it were training again; its weights stay the finished run's."""
    config = dict(iterations=2, val_every=2)
    first = Trainer(tiny_config(phantom_3d, **config), tmp_path / "r", progress_bar=False).fit()
    said = []
    again = Trainer(tiny_config(phantom_3d, **config), tmp_path / "r", progress_bar=False, say=said.append).fit()
    assert any("has finished all 2 iterations: nothing to train" in line for line in said), said
    assert not any("resuming" in line for line in said)
    a, b = weights(first.last_checkpoint), weights(again.last_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_spacing_that_leaves_a_few_voxels_is_refused_and_a_patch_far_larger_than_the_volumes_is_warned(
        phantom_3d, tmp_path):
    """--spacing 1000 (metres meant as mm, say) shrank every volume to one voxel and 'trained' to a
    validation Dice of 1.0; a patch of 160^3 on 16x32x32 volumes trained on padding, silently."""
    from QGSegmentationLib.engine.events import EventWriter, read_events

    coarse = Trainer(tiny_config(phantom_3d, target_spacing=(1000.0, 1000.0, 1000.0)), tmp_path / "coarse",
                     progress_bar=False)
    with pytest.raises(ConfigError, match=r"at 1000 x 1000 x 1000 mm the smallest labeled volume is only 1x1x1 "
                                          r"voxels") as refused:
        coarse.fit()
    assert "--spacing" in refused.value.hint
    events = EventWriter.open(tmp_path / "events.jsonl")
    Trainer(tiny_config(phantom_3d, patch_size=(16, 96, 96), iterations=1, val_every=1), tmp_path / "big",
            events=events, progress_bar=False).fit()
    events.close()
    warnings = [e["message"] for e in read_events(tmp_path / "events.jsonl") if e["event"] == "warning"]
    assert any("patch 16x96x96 is more than twice the median labeled volume (" in w
               for w in warnings), warnings
