"""Quality predictor g: network shapes/range, gradients for QAR, save/load, presentation crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from QGSegmentationLib.errors import ConfigError, DataError
from QGSegmentationLib.quality import presentation
from QGSegmentationLib.quality.predictor import (QUALITY_BACKBONES, QualityPredictor, load_predictor,
                                                  save_predictor)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_backbone_registry_has_paper_backbones_and_fast_default():
    for name in ("convnet", "resnet18", "resnet34", "densenet121", "efficientnet-b0"):
        assert name in QUALITY_BACKBONES


@pytest.mark.parametrize("backbone", ["convnet", "resnet18", "densenet121", "efficientnet-b0"])
def test_every_backbone_predicts_one_dice_per_class_in_unit_range_2d(backbone):
    model = QualityPredictor(backbone=backbone, mode="2d", n_foreground=2, grid_size=(32, 32)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32), torch.rand(2, 2, 32, 32))
    assert out.shape == (2, 2)
    assert torch.all((out >= 0) & (out <= 1))


def test_3d_convnet_accepts_any_input_size_and_passes_gradient_to_soft_mask():
    model = QualityPredictor(mode="3d", n_foreground=1, grid_size=(16, 16, 16)).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # frozen like QAR's g
    logits = torch.randn(2, 2, 20, 24, 28, requires_grad=True)
    probs = torch.softmax(logits, 1)
    image, mask = presentation.present_patch(torch.randn(2, 1, 20, 24, 28),
                                             presentation.foreground_channels(probs), (16, 16, 16))
    quality = model(image, mask)
    (1 - quality.mean()).backward()
    assert quality.shape == (2, 1)
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    # forward also resizes by itself when given another size
    assert model(torch.randn(1, 1, 10, 12, 14), torch.rand(1, 1, 10, 12, 14)).shape == (1, 1)


def test_wrong_mask_channels_is_a_clear_config_error():
    model = QualityPredictor(mode="2d", n_foreground=1, grid_size=(16, 16))
    with pytest.raises(ConfigError, match="one channel per foreground class"):
        model(torch.randn(1, 1, 16, 16), torch.rand(1, 2, 16, 16))


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError, match="convnet"):
        QualityPredictor(backbone="vgg99")


def test_save_load_round_trip_weights_only(tmp_path):
    model = QualityPredictor(mode="2d", n_foreground=2, grid_size=(16, 16), class_names=["a", "b"]).eval()
    path = save_predictor(tmp_path / "g.pt", model, {"note": "x"})
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["class_names"] == ["a", "b"]
    loaded = load_predictor(path)
    x, m = torch.randn(3, 1, 16, 16), torch.rand(3, 2, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x, m), loaded(x, m))
    assert loaded.meta == {"note": "x"} and not loaded.training


def test_loading_something_else_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"format": "qgseg-segmenter", "state_dict": {}}, bad)
    with pytest.raises(DataError, match="bad.pt"):
        load_predictor(bad)
    with pytest.raises(DataError, match="not found"):
        load_predictor(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------ presentation

def _box_mask():
    mask = np.zeros((40, 50, 60), bool)
    mask[10:20, 20:30, 5:15] = True  # extent 10 voxels on each axis
    return mask


def test_crop_box_grows_by_min_margin_in_mm_and_clamps():
    # fraction margin 0.25 * 10 = 2.5 voxels < 10 mm at 1 mm spacing -> 10 voxels
    box = presentation.crop_box(_box_mask(), (1.0, 1.0, 1.0))
    assert box == (slice(0, 30), slice(10, 40), slice(0, 25))
    # 2 mm spacing: 10 mm = 5 voxels
    box = presentation.crop_box(_box_mask(), (2.0, 2.0, 2.0))
    assert box == (slice(5, 25), slice(15, 35), slice(0, 20))


def test_crop_box_fraction_margin_and_empty_mask():
    box = presentation.crop_box(_box_mask(), None, margin_fraction=0.25, min_margin_mm=0.0)
    # floor(10 - 2.5) = 7, ceil(20 + 2.5) = 23
    assert box[0] == slice(7, 23)
    empty = np.zeros((6, 7, 8), bool)
    assert presentation.crop_box(empty) == (slice(0, 6), slice(0, 7), slice(0, 8))


def test_present_crops_resizes_and_keeps_mask_fraction():
    image = np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32)
    mask = np.zeros((1, 32, 32, 32), np.float32)
    mask[0, :, :, :16] = 1  # left half along x
    shown = presentation.present(image, mask, grid=(16, 16, 16),
                                 box=(slice(0, 32), slice(0, 32), slice(0, 32)))
    assert shown.image.shape == (1, 1, 16, 16, 16) and shown.mask.shape == (1, 1, 16, 16, 16)
    # area pooling by 2: exactly 1 on the left half, 0 on the right half
    assert torch.all(shown.mask[..., :8] == 1) and torch.all(shown.mask[..., 8:] == 0)
    assert abs(float(shown.image.mean())) < 1e-4 and abs(float(shown.image.std(unbiased=False)) - 1) < 1e-3


def test_present_uses_the_mask_box_without_a_box():
    image = np.zeros((40, 50, 60), np.float32)
    shown = presentation.present(image, _box_mask()[None], spacing=(1, 1, 1), grid=(8, 8, 8))
    assert shown.box == (slice(0, 30), slice(10, 40), slice(0, 25))
    assert torch.all(shown.image == 0)  # constant image standardises to zeros


def test_clip_percentiles_equal_torch_quantile_bit_for_bit():
    """g's image standardisation finds its clip values with topk instead of sorting (7x faster on
    the guided step's path); it must give exactly what torch.quantile gave, or every trained g
    would see slightly different images: ties, constant rows, tiny and large rows, NaN."""
    generator = torch.Generator().manual_seed(0)
    fractions = presentation.CLIP_PERCENTILES
    for n in (1, 2, 3, 7, 200, 201, 4096, 110592):
        for kind in ("normal", "ties", "constant", "half zero"):
            x = torch.randn(3, n, generator=generator) * 100
            if kind == "ties":
                x = x.round()
            elif kind == "constant":
                x = torch.full((3, n), 2.5)
            elif kind == "half zero":
                x[:, : n // 2] = 0
            expected = torch.quantile(x, torch.tensor(fractions), dim=1)
            assert torch.equal(presentation.percentiles(x, fractions), expected), (n, kind)
    with_nan = torch.randn(2, 50, generator=generator)
    with_nan[0, 3] = float("nan")  # that row gives NaN, the other its values
    expected = torch.quantile(with_nan, torch.tensor(fractions), dim=1)
    torch.testing.assert_close(presentation.percentiles(with_nan, fractions), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_clip_percentiles_equal_torch_quantile_on_cuda():
    x = torch.randn(4, 110592, device="cuda") * 100
    x[1] = x[1].round()
    fractions = presentation.CLIP_PERCENTILES
    expected = torch.quantile(x, torch.tensor(fractions, device="cuda"), dim=1)
    assert torch.equal(presentation.percentiles(x, fractions), expected)


def test_label_to_channels_and_foreground_channels():
    label = np.array([[0, 1], [2, 1]], np.uint8)
    channels = presentation.label_to_channels(label, 3)
    assert channels.shape == (2, 2, 2)
    assert channels[0].tolist() == [[0, 1], [0, 1]] and channels[1].tolist() == [[0, 0], [1, 0]]
    probs = torch.rand(1, 3, 4, 4)
    assert torch.equal(presentation.foreground_channels(probs), probs[:, 1:])


def test_soft_dice_against_hand_values():
    from QGSegmentationLib.quality.predictor import soft_dice

    a = torch.zeros(1, 2, 4, 4)
    b = torch.zeros(1, 2, 4, 4)
    a[0, 0, :2] = 1          # 8 voxels
    b[0, 0, 1:3] = 1         # 8 voxels, 4 shared -> 2*4/16
    a[0, 1, 0, 0] = 0.5      # soft: 2*0.5*1 / (0.5 + 1)
    b[0, 1, 0, 0] = 1.0
    assert torch.allclose(soft_dice(a, b), torch.tensor([[0.5, 1.0 / 1.5]]), atol=1e-5)
    assert soft_dice(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("mode,grid", [("2d", (32, 32)), ("3d", (16, 16, 16))])
def test_segmentation_head_segments_the_image_alone_and_survives_save_load(mode, grid, tmp_path):
    torch.manual_seed(0)
    model = QualityPredictor(mode=mode, n_foreground=2, grid_size=grid, segmentation_head=True).eval()
    image, mask = torch.randn(2, 1, *grid), torch.rand(2, 2, *grid)
    with torch.no_grad():
        dice, segmentation = model(image, mask, with_segmentation=True)
        assert torch.equal(dice, model(image, mask))
        # the head's segmentation depends on the image only, not on the candidate
        assert torch.equal(model(image, torch.rand(2, 2, *grid), with_segmentation=True)[1], segmentation)
    assert dice.shape == (2, 2) and segmentation.shape == (2, 3, *grid)
    save_predictor(tmp_path / "g.pt", model)
    again = load_predictor(tmp_path / "g.pt")
    assert again.config["segmentation_head"] is True
    with torch.no_grad():
        assert torch.allclose(again(image, mask), dice)
    plain = QualityPredictor(mode=mode, n_foreground=2, grid_size=grid)
    assert plain.segmenter is None and plain(image, mask, with_segmentation=True)[1] is None


def test_predictor_files_without_the_head_option_load_as_the_plain_predictor(tmp_path):
    model = QualityPredictor(mode="2d", n_foreground=1, grid_size=(16, 16))
    save_predictor(tmp_path / "g.pt", model)
    state = torch.load(tmp_path / "g.pt", weights_only=True)
    del state["config"]["segmentation_head"]         # a file written before the option existed
    torch.save(state, tmp_path / "old.pt")
    assert load_predictor(tmp_path / "old.pt").segmenter is None
