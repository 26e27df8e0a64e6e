"""The supervised losses (`TrainConfig.loss`): each against MONAI's own implementation, and the
choice reaching every method through its engine config."""

from __future__ import annotations

import pytest
import torch

from QGSegmentationLib.engine.config import TrainConfig
from QGSegmentationLib.errors import ConfigError
from QGSegmentationLib.ssl.losses import (SUPERVISED_LOSSES, dice_ce_background_per_sample,
                                          dice_ce_per_sample)
from QGSegmentationLib.ssl.methods import build_method


def _batch(n_classes: int, shape=(2, 6, 8, 8), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], n_classes, *shape[1:], generator=generator)
    labels = torch.randint(0, n_classes, shape, generator=generator)
    return logits, labels


@pytest.mark.parametrize("n_classes", [2, 3])
def test_dice_ce_bg_is_monais_dicece_loss(n_classes):
    from monai.losses import DiceCELoss

    logits, labels = _batch(n_classes)
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels.unsqueeze(1))
    assert dice_ce_background_per_sample(logits, labels).mean().item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_default_dice_ce_is_half_ce_plus_half_monais_foreground_dice(n_classes):
    from monai.losses import DiceLoss

    logits, labels = _batch(n_classes, seed=1)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)(logits, labels.unsqueeze(1))
    assert dice_ce_per_sample(logits, labels).mean().item() == pytest.approx((0.5 * ce + 0.5 * dice).item(), rel=1e-5)


def test_a_patch_without_foreground_costs_half_as_much_dice_with_the_background_included():
    labels = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    logits = torch.zeros(1, 2, 8, 8, 8)
    logits[:, 1] = -2.0  # about 12% foreground probability everywhere, none in the reference
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    foreground_only = 2 * dice_ce_per_sample(logits, labels).item() - ce
    background_too = dice_ce_background_per_sample(logits, labels).item() - ce
    assert foreground_only == pytest.approx(1.0, abs=1e-3)
    assert background_too == pytest.approx(0.5 + 0.5 * (1 - 2 * 0.8808 / (0.8808 + 1)), abs=1e-3)


def test_the_configured_loss_reaches_the_method():
    logits, labels = _batch(2, seed=2)
    for name in SUPERVISED_LOSSES.names():
        config = TrainConfig(loss=name)
        method = build_method("sup", [torch.nn.Identity()], config)
        expected = SUPERVISED_LOSSES.get(name)(logits, labels).mean()
        assert method.supervised_loss(logits, labels).item() == pytest.approx(expected.item())
    default = build_method("sup", [torch.nn.Identity()], None)  # no engine config: the default
    assert default.supervised_loss(logits, labels).item() == pytest.approx(dice_ce_per_sample(logits, labels).mean().item())


def test_unknown_loss_and_bad_clip_percentiles_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown loss 'dice'; choose one of: dice_ce, dice_ce_bg"):
        TrainConfig.from_dict({"loss": "dice"})
    with pytest.raises(ConfigError, match="clip_percentiles must be two numbers"):
        TrainConfig.from_dict({"clip_percentiles": [1]})
    with pytest.raises(ConfigError, match="clip_percentiles must satisfy 0 <= low < high <= 100"):
        TrainConfig.from_dict({"clip_percentiles": [99, 1]})
    assert TrainConfig.from_dict({"clip_percentiles": [0, 100]}).clip_percentiles == (0.0, 100.0)
