"""Segmentation losses that keep one value per sample, shape (B,).

Per-sample values let quality-weighted pseudolabels (QW) reweight each unlabeled image before the
batch is reduced; the labeled terms simply take `.mean()`. Logits are (B, C, *spatial) with
softmax semantics (binary = 2 channels); labels are (B, *spatial) int64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Registry

#: The supervised loss of every method (`TrainConfig.loss`): name -> per-sample loss (B,).
SUPERVISED_LOSSES = Registry("loss")


def per_sample_mean(values: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) mean over everything but the batch axis."""
    return values.reshape(values.shape[0], -1).mean(dim=1)


def per_sample_sum(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).sum(dim=1)


def cross_entropy_map(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel-wise CE, (B, *spatial)."""
    return F.cross_entropy(logits, labels, reduction="none")


def one_hot(labels: torch.Tensor, n_classes: int, dtype=torch.float32) -> torch.Tensor:
    """(B, *spatial) int -> (B, C, *spatial) float."""
    return F.one_hot(labels.long(), n_classes).movedim(-1, 1).to(dtype)


def soft_dice_per_class(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice of every channel, per sample (B, C). Smoothing `eps` in numerator and denominator:
    an empty reference predicted empty scores ~1."""
    target = one_hot(labels, probs.shape[1], probs.dtype)
    dims = tuple(range(2, probs.ndim))
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    return (2.0 * inter + eps) / (denom + eps)


def soft_dice_loss_per_sample(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice averaged over the foreground classes, per sample (B,)."""
    return 1.0 - soft_dice_per_class(probs, labels, eps)[:, 1:].mean(dim=1)


def soft_dice_all_classes_loss_per_sample(probs: torch.Tensor, labels: torch.Tensor,
                                          eps: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice averaged over every channel, background included, per sample (B,): MONAI's
    `DiceLoss(include_background=True, to_onehot_y=True, softmax=True)`. A patch without foreground
    costs at most 0.5 here, where the foreground-only Dice charges it up to 1."""
    return 1.0 - soft_dice_per_class(probs, labels, eps).mean(dim=1)


@SUPERVISED_LOSSES.register("dice_ce", description="0.5 CE + 0.5 (1 - foreground soft Dice) (default)")
def dice_ce_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0.5 CE + 0.5 (1 - soft Dice of the foreground classes), per sample: the default supervised
    loss of every method, and the pseudolabel loss of pseudo-labeling."""
    ce = per_sample_mean(cross_entropy_map(logits.float(), labels))
    dice = soft_dice_loss_per_sample(torch.softmax(logits.float(), dim=1), labels)
    return 0.5 * ce + 0.5 * dice


@SUPERVISED_LOSSES.register("dice_ce_bg", description="CE + (1 - soft Dice of all channels, background "
                                                      "included): MONAI DiceCELoss(to_onehot_y, softmax)")
def dice_ce_background_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE + (1 - soft Dice averaged over all channels), per sample: MONAI's
    `DiceCELoss(to_onehot_y=True, softmax=True)` with its default weights 1 and 1."""
    ce = per_sample_mean(cross_entropy_map(logits.float(), labels))
    dice = soft_dice_all_classes_loss_per_sample(torch.softmax(logits.float(), dim=1), labels)
    return ce + dice


def weighted_ce_per_sample(logits: torch.Tensor, labels: torch.Tensor, pixel_weights: torch.Tensor) -> torch.Tensor:
    """mean over all pixels of w * CE, per sample (FixMatch convention: masked pixels count as 0)."""
    return per_sample_mean(pixel_weights * cross_entropy_map(logits.float(), labels))


def region_mean_per_sample(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(mask * v) / (|mask| + 1) per sample: MetaSSL's region average (empty region -> 0)."""
    return per_sample_sum(mask * values) / (per_sample_sum(mask) + 1.0)


def softmax_mse_per_sample(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of softmax probabilities (Mean Teacher consistency), per sample."""
    return per_sample_mean((torch.softmax(logits.float(), dim=1) - target_probs.float()) ** 2)


def entropy_map(probs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-sum_c p log p over channels, (B, *spatial)."""
    return -(probs * torch.log(probs + eps)).sum(dim=1)
