"""Metrics against values computed by hand from each test's own masks, against a brute-force
surface-distance computation, and against MONAI's DiceMetric."""

from __future__ import annotations

import math

import numpy as np
import pytest

from QGSegmentationLib.errors import ConfigError, DataError
from QGSegmentationLib.metrics import (asd, dice, evaluate_case, hd95, image_diagonal_mm, iou,
                                       summarise, surface_distances)


def two_cubes(shape=(10, 10, 10)):
    """ref: 4^3 cube at [2:6]^3; pred: the same cube shifted by one voxel along z."""
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    pred[3:7, 2:6, 2:6] = 1
    return pred, ref


def test_cubes_offset_by_one_voxel_isotropic():
    pred, ref = two_cubes()
    # overlap 3*4*4 = 48 of 64 voxels each
    assert dice(pred, ref, 1) == pytest.approx(2 * 48 / 128)
    assert iou(pred, ref, 1) == pytest.approx(48 / 80)
    # Each cube has 64 - 8 = 56 surface voxels. Of the predicted ones, the 16 on the top face
    # (z=6) are 1 voxel above the reference's top face, the 4 interior voxels of its bottom face
    # (z=3) are 1 voxel from the reference's surface, the other 36 lie on the reference surface.
    # The reverse direction is the mirror image: pooled distances are 72 zeros and 40 ones.
    assert hd95(pred, ref, 1, (1, 1, 1)) == pytest.approx(1.0)
    assert asd(pred, ref, 1, (1, 1, 1)) == pytest.approx(20 / 56)


def test_cubes_offset_by_one_voxel_anisotropic():
    pred, ref = two_cubes()
    spacing = (2.0, 0.5, 0.5)  # (z, y, x)
    # Top-face voxels are 2 mm (one z step) away; the 4 bottom-face interior voxels are now
    # closer to the lateral surface (one y or x step, 0.5 mm) than to the bottom face (2 mm).
    expected_asd = (16 * 2.0 + 4 * 0.5) / 56
    # pooled: 72 zeros, 8 x 0.5, 32 x 2.0 -> the 95th percentile lies among the 2.0 mm values
    assert asd(pred, ref, 1, spacing) == pytest.approx(expected_asd)
    assert hd95(pred, ref, 1, spacing) == pytest.approx(2.0)
    # Dice/IoU do not depend on spacing
    assert dice(pred, ref, 1) == pytest.approx(0.75)


def test_single_voxels():
    a = np.zeros((5, 6, 7), np.uint8)
    b = np.zeros_like(a)
    a[1, 1, 1] = 1
    b[1, 1, 1] = 1
    assert (dice(a, b, 1), iou(a, b, 1), hd95(a, b, 1, (1, 1, 1)), asd(a, b, 1, (1, 1, 1))) == (1, 1, 0, 0)
    b[:] = 0
    b[1, 4, 5] = 1  # 3 voxels along y, 4 along x from a's voxel
    assert dice(a, b, 1) == 0 and iou(a, b, 1) == 0
    assert hd95(a, b, 1, (1, 1, 1)) == pytest.approx(5.0)
    assert asd(a, b, 1, (3.0, 2.0, 1.0)) == pytest.approx(math.hypot(3 * 2.0, 4 * 1.0))
    assert surface_distances(a, b, 1, (1, 1, 1))["failure"] is False


def test_both_empty_is_a_perfect_score():
    empty = np.zeros((4, 5, 6), np.uint8)
    row = evaluate_case(empty, empty, (1, 1, 1), classes=2)
    assert (row["dice_1"], row["iou_1"], row["hd95_1"], row["asd_1"]) == (1.0, 1.0, 0.0, 0.0)
    assert row["failure_1"] is False and row["failures"] == 0


@pytest.mark.parametrize("which", ["pred", "ref"])
def test_exactly_one_empty_is_a_flagged_finite_worst_case(which):
    shape, spacing = (10, 12, 14), (2.0, 1.0, 0.5)
    full = np.zeros(shape, np.uint8)
    full[3:5, 3:5, 3:5] = 1
    empty = np.zeros(shape, np.uint8)
    pred, ref = (empty, full) if which == "pred" else (full, empty)
    diagonal = math.sqrt((10 * 2.0) ** 2 + (12 * 1.0) ** 2 + (14 * 0.5) ** 2)
    assert image_diagonal_mm(shape, spacing) == pytest.approx(diagonal)
    row = evaluate_case(pred, ref, spacing, classes=[1])
    assert row["dice_1"] == 0.0 and row["iou_1"] == 0.0
    assert row["hd95_1"] == pytest.approx(diagonal) and row["asd_1"] == pytest.approx(diagonal)
    assert row["failure_1"] is True and row["failures"] == 1
    assert all(math.isfinite(v) for k, v in row.items() if not k.startswith("failure"))


def _brute_force_surface(mask, spacing):
    """Surface voxels (a voxel with a 6-neighbour outside the mask or the image) in mm."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return np.argwhere(mask & ~inner) * np.asarray(spacing)


def test_surface_distances_match_brute_force_on_random_blobs():
    from scipy import ndimage
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(3)
    shape, spacing = (14, 18, 16), (2.5, 0.7, 1.1)
    for _ in range(3):
        pred = ndimage.gaussian_filter(rng.normal(size=shape), 2) > 0.05
        ref = ndimage.gaussian_filter(rng.normal(size=shape), 2) > 0.05
        ps, rs = _brute_force_surface(pred, spacing), _brute_force_surface(ref, spacing)
        d = cdist(ps, rs)
        to_ref, to_pred = d.min(1), d.min(0)
        out = surface_distances(pred.astype(np.uint8), ref.astype(np.uint8), 1, spacing)
        assert out["hd95"] == pytest.approx(np.percentile(np.concatenate([to_ref, to_pred]), 95))
        assert out["asd"] == pytest.approx((to_ref.mean() + to_pred.mean()) / 2)


def test_crop_to_the_masks_is_exact_near_the_image_border():
    pred = np.zeros((8, 9, 10), np.uint8)
    ref = np.zeros_like(pred)
    pred[0:3, 0:4, 5:10] = 1  # touches three image borders: border voxels count as surface
    ref[0:2, 1:4, 6:10] = 1
    spacing = (1.5, 1.0, 0.8)
    ps, rs = _brute_force_surface(pred.astype(bool), spacing), _brute_force_surface(ref.astype(bool), spacing)
    from scipy.spatial.distance import cdist

    d = cdist(ps, rs)
    assert asd(pred, ref, 1, spacing) == pytest.approx((d.min(1).mean() + d.min(0).mean()) / 2)


def test_dice_agrees_with_monai_where_both_masks_are_present():
    import torch
    from monai.metrics import DiceMetric

    rng = np.random.default_rng(0)
    from scipy import ndimage

    pred = (ndimage.gaussian_filter(rng.normal(size=(12, 16, 16)), 2) * 40).clip(-1, 1).round() + 1
    ref = (ndimage.gaussian_filter(rng.normal(size=(12, 16, 16)), 2) * 40).clip(-1, 1).round() + 1
    pred, ref = pred.astype(np.uint8), ref.astype(np.uint8)
    for c in (1, 2):
        assert (pred == c).any() and (ref == c).any()

    def one_hot(a):
        return torch.nn.functional.one_hot(torch.as_tensor(a, dtype=torch.long), 3).permute(3, 0, 1, 2)[None]

    metric = DiceMetric(include_background=False, reduction="none")
    monai_dice = metric(one_hot(pred), one_hot(ref))[0].numpy()
    row = evaluate_case(pred, ref, (1, 1, 1), classes=3)
    np.testing.assert_allclose([row["dice_1"], row["dice_2"]], monai_dice, rtol=1e-6)
    assert row["dice"] == pytest.approx(monai_dice.mean())


def test_evaluate_case_means_and_2d_inputs():
    pred = np.zeros((6, 6), np.uint8)
    ref = np.zeros((6, 6), np.uint8)
    pred[1:3, 1:3] = 1   # class 1: identical squares -> Dice 1
    ref[1:3, 1:3] = 1
    pred[4, 4] = 2       # class 2: missed (ref empty, pred not) -> Dice 0, flagged
    row = evaluate_case(pred, ref, (1.0, 2.0), classes=3)
    assert row["dice"] == pytest.approx(0.5)
    assert row["hd95"] == pytest.approx((0.0 + math.hypot(6.0, 12.0)) / 2)
    assert row["failures"] == 1 and row["failure_2"] is True and row["failure_1"] is False


def test_summarise_mean_std_median_and_failures():
    rows = [{"case": "a", "dice": 0.5, "hd95": 2.0, "failures": 0},
            {"case": "b", "dice": 1.0, "hd95": 4.0, "failures": 1},
            {"case": "c", "dice": 0.9, "hd95": 9.0, "failures": 2}]
    summary = summarise(rows)
    assert summary["cases"] == 3 and summary["failures"] == 3
    assert summary["dice"]["mean"] == pytest.approx(0.8)
    assert summary["dice"]["median"] == pytest.approx(0.9)
    assert summary["dice"]["std"] == pytest.approx(math.sqrt((0.09 + 0.04 + 0.01) / 3))
    assert summary["hd95"]["median"] == pytest.approx(4.0)
    assert "case" not in summary
    assert summarise([]) == {"cases": 0, "failures": 0}


def test_bad_inputs_name_the_problem():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(DataError, match="differs"):
        dice(a, np.zeros((4, 4, 5), np.uint8), 1)
    with pytest.raises(ConfigError, match="spacing_zyx"):
        hd95(a, a, 1, (1.0, 1.0))
    with pytest.raises(ConfigError, match="spacing_zyx"):
        asd(a, a, 1, (1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="foreground"):
        dice(a, a, 0)
    with pytest.raises(ConfigError, match="n_classes"):
        evaluate_case(a, a, (1, 1, 1), classes=1)
