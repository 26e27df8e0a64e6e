"""Every registered SSL method trains through the real engine (2 iterations, tiny 3D phantom),
and a quality-guided run works end to end from the command line with a real trained g."""

from __future__ import annotations

import json

import pytest

from QGSegmentationLib.engine.checkpoint import load_checkpoint
from QGSegmentationLib.engine.config import TrainConfig
from QGSegmentationLib.engine.trainer import Trainer
from QGSegmentationLib.errors import ConfigError
from QGSegmentationLib.ssl.config import METHOD_NAMES

from conftest import run_cli


def config(dataset, method, **extra):
    return TrainConfig(dataset=str(dataset), mode="3d", patch_size=(16, 32, 32), batch_size=2,
                       unlabeled_batch_size=2, iterations=2, val_every=2, checkpoint_every=2,
                       network="unet", network_options={"channels": [4, 8, 16]}, device="cpu", method=method,
                       n_validation=1, **extra)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_trains_through_engine_and_predicts(phantom_3d, tmp_path, method):
    from QGSegmentationLib.segmenter import load_segmenter

    extra = {}
    if method == "dualnet":  # the default pair's VNet (46 M weights) would write 1 GB of checkpoints here
        extra = {"ssl": {"dualnet_networks": ["unet", "resunet"]},
                 "other_network_options": {"resunet": {"filters": [4, 8, 16]}}}
    result = Trainer(config(phantom_3d, method, **extra), tmp_path / method, progress_bar=False).fit()
    state = load_checkpoint(result.last_checkpoint)
    assert state["config"]["method"] == method
    segmenter = load_segmenter(result.best_checkpoint)
    assert len(segmenter.network.networks) == len(state["inference_networks"])


def test_network_options_belong_to_the_runs_own_network(phantom_3d, tmp_path):
    """The dual-network method's second network (resunet) does not take the UNet's options
    (num_res_units would be an error there); the UNet does, at training and at loading."""
    from QGSegmentationLib.segmenter import load_segmenter

    cfg = config(phantom_3d, "dualnet", ssl={"dualnet_networks": ["unet", "resunet"]})
    cfg.network_options = {"channels": [4, 8, 16], "num_res_units": 0}
    result = Trainer(cfg, tmp_path / "dualnet", progress_bar=False).fit()
    unet, resunet = load_segmenter(result.best_checkpoint).network.networks
    assert [m.out_channels for m in unet.modules() if type(m).__name__ == "Conv3d"][0] == 4
    assert type(resunet).__name__ == "DynUNet" and list(resunet.filters) == [16, 32, 64, 128, 256]


def test_other_network_options_shape_the_second_network(phantom_3d, tmp_path):
    """`other_network_options` gives the dual-network method's second network its own options,
    kept in the checkpoint so the loaded segmenter rebuilds the same architecture."""
    from QGSegmentationLib.segmenter import load_segmenter

    cfg = config(phantom_3d, "dualnet", ssl={"dualnet_networks": ["unet", "resunet"]})
    cfg.other_network_options = {"resunet": {"filters": [4, 8, 16]}}
    result = Trainer(cfg, tmp_path / "dualnet", progress_bar=False).fit()
    unet, resunet = load_segmenter(result.best_checkpoint).network.networks
    assert list(resunet.filters) == [4, 8, 16]
    with pytest.raises(ConfigError, match="other_network_options"):
        TrainConfig.from_dict({"other_network_options": {"resunet": [4, 8]}})


@pytest.fixture(scope="module")
def tiny_quality_checkpoint(phantom_3d, tmp_path_factory):
    run = tmp_path_factory.mktemp("g")
    res = run_cli("quality", "train", "--dataset", str(phantom_3d), "--run-dir", str(run), "--device", "cpu",
                  "--quiet", "--set", "epochs=1", "--set", "samples_per_case=4", "--set", "batch_size=4",
                  "--set", "grid_size=[16,16,16]", "--set", "weak=null")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["config"]["epochs"] == 1
    return run / "checkpoints" / "best.pt"


def test_guided_ssl_cli_and_scored_predictions(phantom_3d, tmp_path, tiny_quality_checkpoint):
    import csv

    run = tmp_path / "mt-qg"
    res = run_cli("ssl", "train", "--dataset", str(phantom_3d), "--method", "mt", "--guidance", "qar,qw",
                  "--quality-checkpoint", str(tiny_quality_checkpoint), "--patch", "16", "32", "32",
                  "--iterations", "3", "--val-every", "3", "--device", "cpu", "--run-dir", str(run), "--quiet",
                  "--set", "network_options={channels: [4, 8, 16]}")
    assert res.returncode == 0, res.stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["config"]["ssl"] == {"guidance_qar": True, "guidance_qw": True}
    out = tmp_path / "preds"
    res = run_cli("predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--input", str(phantom_3d),
                  "--split", "unlabeled", "--output", str(out), "--quality-checkpoint", str(tiny_quality_checkpoint),
                  "--device", "cpu", "--run-dir", str(tmp_path / "p"), "--quiet")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 4
    qualities = [float(r["predicted_quality"]) for r in rows]
    assert qualities == sorted(qualities) and all(0.0 <= q <= 1.0 for q in qualities)
    assert f"worst first, in {out / 'scores.csv'}" in res.stdout  # the user is told where to look
    assert (out / "review.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(out / "review.png") in res.stdout

    # --second-opinion: the segmenter as its own second opinion agrees exactly, and without g the
    # rows are ordered by that agreement
    best = str(run / "checkpoints" / "best.pt")
    res = run_cli("predict", "--checkpoint", best, "--input", str(phantom_3d), "--split", "unlabeled",
                  "--output", str(tmp_path / "p2"), "--second-opinion", best, "--no-mirror", "--device", "cpu",
                  "--run-dir", str(tmp_path / "p2run"), "--quiet", "--review-sheet", "0")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(open(tmp_path / "p2" / "scores.csv")))
    assert len(rows) == 4 and "predicted_quality" not in rows[0]
    assert [float(r["second_opinion_dice"]) for r in rows] == [1.0] * 4
    assert not (tmp_path / "p2" / "review.png").exists()


def test_guidance_without_quality_checkpoint_is_a_clear_error(phantom_3d, tmp_path):
    res = run_cli("ssl", "train", "--dataset", str(phantom_3d), "--method", "mt", "--guidance", "qw",
                  "--run-dir", str(tmp_path / "r"), "--quiet")
    assert res.returncode == 2 and "quality-checkpoint" in res.stderr


def test_ssl_methods_lists_every_method():
    res = run_cli("ssl", "methods")
    assert res.returncode == 0
    for name in METHOD_NAMES:
        assert name in res.stdout
