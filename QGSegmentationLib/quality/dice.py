"""Fast Dice / IoU between two boolean masks, with the convention that two empty masks agree
perfectly (1.0) - the target the quality predictor learns (methods.md 1.1)."""

from __future__ import annotations

import numpy as np


def _counts(a, b, name_a: str, name_b: str):
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")
    a = a if a.dtype == bool else a != 0
    b = b if b.dtype == bool else b != 0
    inter = int(np.count_nonzero(np.logical_and(a, b)))
    return inter, int(np.count_nonzero(a)), int(np.count_nonzero(b))


def mask_dice(a, b) -> float:
    """2 |A & B| / (|A| + |B|); 1.0 when both masks are empty. Non-bool inputs: nonzero = inside."""
    inter, size_a, size_b = _counts(a, b, "a", "b")
    total = size_a + size_b
    return 1.0 if total == 0 else 2.0 * inter / total


def mask_iou(a, b) -> float:
    """|A & B| / |A | B|; 1.0 when both masks are empty. Non-bool inputs: nonzero = inside."""
    inter, size_a, size_b = _counts(a, b, "a", "b")
    union = size_a + size_b - inter
    return 1.0 if union == 0 else inter / union


def dice_to_iou(dice: float) -> float:
    """IoU from Dice for the same pair of masks (J = D / (2 - D))."""
    return dice / (2.0 - dice)
