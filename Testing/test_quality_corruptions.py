"""Tests of the mask corruption registry (QGSegmentationLib.quality.corruptions)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import Delaunay

from QGSegmentationLib.errors import ConfigError, DataError
from QGSegmentationLib.quality.corruptions import CORRUPTIONS, FAMILIES, Grid, corrupt_labelmap, corruption_names
from QGSegmentationLib.quality.corruptions import blob, boundary, geometric, morphology, shape, structural
from QGSegmentationLib.quality.dice import mask_dice


def ellipse_2d(shape=(64, 64), center=(30, 34), radii=(14, 20), angle=0.0):
    y, x = np.ogrid[: shape[0], : shape[1]]
    dy, dx = y - center[0], x - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dy - s * dx, s * dy + c * dx
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1


def ellipsoid_3d(shape=(24, 40, 36), center=(12, 19, 18), radii=(7, 12, 10)):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + ((x - center[2]) / radii[2]) ** 2 <= 1


CASES = {
    "2d": (ellipse_2d(), (1.0, 1.0)),
    "3d": (ellipsoid_3d(), (2.0, 1.0, 1.0)),
}
ALL_VARIANTS = [(e.name, sev) for e in CORRUPTIONS.entries() for sev in e.obj.severities]


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- registry-wide properties


def test_registry_has_every_family_and_tags():
    families = {e.obj.family for e in CORRUPTIONS.entries()}
    assert families == set(FAMILIES)
    assert set(corruption_names("catastrophic")) == {"inverted", "empty", "full", "random"}
    assert set(corruption_names("blob")) == {"gaussian_blob", "equal_ball"}
    heavy = set(corruption_names("heavy"))
    assert {"erosion", "dilation", "shift", "scale", "grid_distortion", "holes"} <= heavy
    chain = set(corruption_names("chain-allowed"))
    assert not chain & (set(corruption_names("blob")) | set(corruption_names("catastrophic")))
    assert chain <= set(corruption_names("moderate"))
    with pytest.raises(ConfigError, match="unknown corruption"):
        CORRUPTIONS.get("no_such_corruption")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name,severity", ALL_VARIANTS)
def test_every_corruption_returns_new_bool_mask(name, severity, case):
    mask, spacing = CASES[case]
    before = mask.copy()
    out = CORRUPTIONS.get(name)(mask, rng(1), spacing, severity)
    assert out.dtype == bool and out.shape == mask.shape
    assert not np.shares_memory(out, mask)
    np.testing.assert_array_equal(mask, before)  # input untouched


@pytest.mark.parametrize("fill", [False, True], ids=["empty", "full"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name,severity", ALL_VARIANTS)
def test_every_corruption_handles_empty_and_full(name, severity, case, fill):
    mask = np.full(CASES[case][0].shape, fill)
    out = CORRUPTIONS.get(name)(mask, rng(2), CASES[case][1], severity)
    assert out.shape == mask.shape and out.dtype == bool
    if not fill and name not in ("islands", "holes_islands", "inverted", "full", "random"):
        assert not out.any(), f"{name} invented foreground from an empty mask"


def test_same_rng_seed_gives_same_result():
    mask, spacing = CASES["3d"]
    for name, severity in ALL_VARIANTS:
        a = CORRUPTIONS.get(name)(mask, rng(7), spacing, severity)
        b = CORRUPTIONS.get(name)(mask, rng(7), spacing, severity)
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_bad_inputs_raise_clear_errors():
    op = CORRUPTIONS.get("erosion")
    with pytest.raises(DataError, match="2D"):
        op(np.zeros((2, 3, 4, 5), bool), rng())
    with pytest.raises(DataError, match="binary"):
        op(np.array([[0, 2], [1, 0]]), rng())
    with pytest.raises(DataError, match="spacing"):
        op(np.zeros((4, 4), bool), rng(), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(DataError, match="spacing"):
        op(np.zeros((4, 4), bool), rng(), spacing=(1.0, -1.0))
    with pytest.raises(ConfigError, match="severity"):
        op(np.zeros((4, 4), bool), rng(), severity="catastrophic")
    with pytest.raises(ConfigError, match="severity"):
        CORRUPTIONS.get("ellipse")(np.zeros((4, 4), bool), rng(), severity="heavy")
    # catastrophic operations accept any severity
    assert CORRUPTIONS.get("full")(np.zeros((4, 4), bool), rng(), severity="moderate").all()
    # 0/1 integer masks are accepted
    assert CORRUPTIONS.get("inverted")(np.eye(3, dtype=np.uint8), rng()).sum() == 6


# ---------------------------------------------------------------- scaling rule


def test_grid_scaling_rule():
    grid = Grid.of(np.zeros((224, 224), bool))
    assert grid.unit == pytest.approx(1.0)
    assert grid.odd_sizes(5) == (5, 5)
    grid = Grid.of(np.zeros((448, 448), bool))  # twice the paper size: kernel 5 -> 10 -> odd 11
    assert grid.odd_sizes(5) == (11, 11)
    # 3D anisotropic: extents (32*4, 64, 64) mm, geometric mean 80.63, unit 0.36 mm
    grid = Grid.of(np.zeros((32, 64, 64), bool), spacing=(4.0, 1.0, 1.0))
    assert grid.unit == pytest.approx((128 * 64 * 64) ** (1 / 3) / 224)
    # kernel 9 -> 3.24 mm -> 0.81 z-voxels (odd 1) and 3.24 in-plane voxels (odd 3)
    assert grid.odd_sizes(9) == (1, 3, 3)
    assert Grid.of(np.zeros((10, 10), bool), unit=2.0).odd_sizes(5) == (11, 11)


# ---------------------------------------------------------------- morphology


def test_box_morphology_matches_scipy_with_square_kernel():
    mask = ellipse_2d() | ellipse_2d(center=(50, 10), radii=(6, 4))
    square = np.ones((5, 5), bool)
    np.testing.assert_array_equal(morphology.box_erode(mask, (5, 5)),
                                  ndimage.binary_erosion(mask, square, border_value=1))
    np.testing.assert_array_equal(morphology.box_dilate(mask, (5, 5)), ndimage.binary_dilation(mask, square))
    # the border replicates: a mask touching the edge does not erode from the edge
    edge = np.zeros((20, 20), bool)
    edge[:, :8] = True
    assert morphology.box_erode(edge, (5, 5))[:, :6].all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_erosion_dilation_opening_closing_order(case):
    mask, spacing = CASES[case]
    grid = Grid.of(mask, spacing, unit=1.0)
    eroded = CORRUPTIONS.get("erosion").apply(mask, grid, kernel=5)
    dilated = CORRUPTIONS.get("dilation").apply(mask, grid, kernel=5)
    assert eroded.sum() < mask.sum() and not (eroded & ~mask).any()
    assert dilated.sum() > mask.sum() and not (mask & ~dilated).any()
    heavy = CORRUPTIONS.get("erosion").apply(mask, grid, kernel=11)
    assert heavy.sum() < eroded.sum() and not (heavy & ~eroded).any()
    opened = CORRUPTIONS.get("opening")(mask, rng(), spacing, unit=1.0)
    closed = CORRUPTIONS.get("closing")(mask, rng(), spacing, unit=1.0)
    assert not (opened & ~mask).any() and not (mask & ~closed).any()


def test_anisotropic_erosion_spares_thick_slices():
    mask = np.zeros((12, 40, 40), bool)
    mask[2:10, 5:35, 5:35] = True
    grid = Grid.of(mask, (5.0, 1.0, 1.0), unit=0.6)  # kernel 5 -> 3 mm: (1, 3, 3) voxels
    assert grid.odd_sizes(5) == (1, 3, 3)
    eroded = CORRUPTIONS.get("erosion").apply(mask, grid, kernel=5)
    assert eroded[2:10].any(axis=(1, 2)).all()  # no slice lost along z
    assert not eroded[:, 5].any() and eroded[:, 6, 6:34].any()  # one voxel lost in-plane


# ---------------------------------------------------------------- shape approximation


def test_ellipse_fit_recovers_a_rotated_ellipse():
    mask = ellipse_2d(radii=(10, 22), angle=0.5)
    out = shape.best_fit_ellipse(mask, np.ones(2))
    assert mask_dice(out, mask) > 0.95
    mask3 = ellipsoid_3d()
    assert mask_dice(shape.best_fit_ellipse(mask3, np.ones(3)), mask3) > 0.95


def test_ellipse_uses_the_largest_component_only():
    big = ellipse_2d()
    small = ellipse_2d(center=(56, 6), radii=(4, 4))
    out = shape.best_fit_ellipse(big | small, np.ones(2))
    assert not out[small].any()


def l_shape():
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:15] = True
    mask[25:35, 5:35] = True
    return mask


def test_convex_hull_matches_delaunay_and_fills_concavity():
    mask = l_shape()
    hull = shape.convex_hull(mask)
    corners = np.array([[5, 5], [5, 14], [34, 5], [34, 34], [25, 34]])  # the L's extreme voxels
    grid = np.indices(mask.shape).reshape(2, -1).T
    expected = (Delaunay(corners).find_simplex(grid, tol=1e-9) >= 0).reshape(mask.shape)
    np.testing.assert_array_equal(hull, expected | mask)
    assert hull[20, 20] and not mask[20, 20]
    mask3 = ellipsoid_3d()
    mask3[10:14, 17:22, 17:40] = False  # carve a notch
    hull3 = CORRUPTIONS.get("convex_hull")(mask3, rng())
    assert not (mask3 & ~hull3).any() and hull3[12, 19, 24]


def test_bounding_box_is_the_filled_box():
    mask = l_shape()
    box = CORRUPTIONS.get("bounding_box")(mask, rng())
    expected = np.zeros_like(mask)
    expected[5:35, 5:35] = True
    np.testing.assert_array_equal(box, expected)
    mask3 = ellipsoid_3d()
    box3 = CORRUPTIONS.get("bounding_box")(mask3, rng())
    zs, ys, xs = np.nonzero(mask3)
    assert box3.sum() == (np.ptp(zs) + 1) * (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
    assert not (mask3 & ~box3).any()


@pytest.mark.parametrize("case", sorted(CASES))
def test_polygon_is_convex_and_inside_the_hull(case):
    mask, spacing = CASES[case]
    hull = shape.convex_hull(mask)
    for seed in range(6):
        poly = CORRUPTIONS.get("polygon")(mask, rng(seed), spacing)
        assert poly.any() and not (poly & ~hull).any()
        np.testing.assert_array_equal(shape.convex_hull(poly), poly)  # convex already
    if mask.ndim == 2:
        angles = np.array([0.0, 2.0, 4.0]) * np.pi / 3
        directions = np.stack([np.sin(angles), np.cos(angles)], axis=1)
    else:
        directions = shape.fibonacci_sphere(8)
    triangle = shape.support_polygon(mask, np.asarray(spacing), directions)
    assert 0.3 * hull.sum() < triangle.sum() < 0.8 * hull.sum()


# ---------------------------------------------------------------- boundary


@pytest.mark.parametrize("case", sorted(CASES))
def test_jagged_band_stays_between_erosion_and_dilation(case):
    mask, spacing = CASES[case]
    grid = Grid.of(mask, spacing, unit=1.0)
    sizes = grid.odd_sizes(5, minimum=3)
    out = CORRUPTIONS.get("jagged_band").apply(mask, grid, kernel=5, seed=3)
    inner, outer = morphology.box_erode(mask, sizes), morphology.box_dilate(mask, sizes)
    assert not (inner & ~out).any() and not (out & ~outer).any()
    band = outer & ~inner
    assert 0.35 < (out & band).sum() / band.sum() < 0.65


def test_smooth_boundary_removes_a_thin_spike_and_keeps_the_body():
    mask = ellipse_2d()
    spiky = mask.copy()
    spiky[30, 54:62] = True
    out = CORRUPTIONS.get("smooth_boundary")(spiky, rng(), unit=1.0)
    assert not out[30, 58:62].any()
    assert mask_dice(out, mask) > 0.95


def test_elastic_changes_only_the_boundary():
    mask = ellipse_2d()
    grid = Grid.of(mask, unit=1.0)
    out = CORRUPTIONS.get("elastic").apply(mask, grid, alpha=60, sigma=5, seed=4)
    assert (out != mask).any() and mask_dice(out, mask) > 0.8
    margin = int(np.ceil(4 * boundary.paper_elastic_std(60, 5))) + 1
    near = morphology.box_dilate(mask, (2 * margin + 1,) * 2) & ~morphology.box_erode(mask, (2 * margin + 1,) * 2)
    assert not ((out != mask) & ~near).any()
    mask3, spacing3 = CASES["3d"]
    out3 = CORRUPTIONS.get("elastic")(mask3, rng(5), spacing3, unit=1.0)
    assert (out3 != mask3).any() and mask_dice(out3, mask3) > 0.8


def test_grid_distortion_identity_with_zero_limit_and_changes_otherwise():
    mask = ellipse_2d()
    maps = [boundary.grid_axis_map(n, 5, np.ones(6)) for n in mask.shape]
    np.testing.assert_array_equal(boundary.grid_distortion(mask, maps), mask)
    out = CORRUPTIONS.get("grid_distortion")(mask, rng(3), severity="heavy")
    assert (out != mask).any()


# ---------------------------------------------------------------- structural


@pytest.mark.parametrize("case", sorted(CASES))
def test_holes_islands(case):
    mask, spacing = CASES[case]
    for severity in ("moderate", "heavy"):
        holes = CORRUPTIONS.get("holes")(mask, rng(1), spacing, severity, unit=1.0)
        assert holes.sum() < mask.sum() and not (holes & ~mask).any()
    islands = CORRUPTIONS.get("islands")(mask, rng(1), spacing, unit=1.0)
    assert islands.sum() > mask.sum() and not (mask & ~islands).any()
    both = CORRUPTIONS.get("holes_islands")(mask, rng(2), spacing, unit=1.0)
    assert (mask & ~both).any() and (both & ~mask).any()


def test_hole_is_a_ball_of_the_given_radius():
    mask = np.ones((41, 41), bool)
    out = CORRUPTIONS.get("holes").apply(mask, Grid.of(mask, unit=1.0), holes=[(np.array([20, 20]), 5.0)])
    y, x = np.ogrid[:41, :41]
    np.testing.assert_array_equal(~out, (y - 20) ** 2 + (x - 20) ** 2 <= 25)


def two_blobs():
    return ellipse_2d() | ellipse_2d(center=(56, 8), radii=(5, 5))


def test_keep_largest_and_drop_component():
    mask = two_blobs()
    big, small = ellipse_2d(), ellipse_2d(center=(56, 8), radii=(5, 5))
    largest = CORRUPTIONS.get("keep_largest")(mask, rng())
    assert ndimage.label(largest)[1] == 1
    np.testing.assert_array_equal(largest, big)
    outcomes = set()
    for seed in range(20):
        out = CORRUPTIONS.get("drop_component")(mask, rng(seed))
        assert ndimage.label(out)[1] == 1
        outcomes.add("big" if np.array_equal(out, big) else "small" if np.array_equal(out, small) else "?")
    assert outcomes == {"big", "small"}
    single = ellipse_2d()
    np.testing.assert_array_equal(CORRUPTIONS.get("drop_component")(single, rng()), single)


def test_block_dropout_removes_a_box():
    mask = np.ones((40, 50), bool)
    out = structural.block_dropout(mask, (20, 25), (8, 10))
    removed = np.argwhere(~out)
    assert removed[:, 0].min() == 16 and removed[:, 0].max() == 24
    assert removed[:, 1].min() == 20 and removed[:, 1].max() == 30
    assert (~out).sum() == 9 * 11
    mask3, spacing3 = CASES["3d"]
    drop = CORRUPTIONS.get("block_dropout")(mask3, rng(2), spacing3)
    assert drop.sum() < mask3.sum() and not (drop & ~mask3).any()


# ---------------------------------------------------------------- geometric


def centroid(mask):
    return np.array([c.mean() for c in np.nonzero(mask)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_shift_moves_the_centroid_exactly(case):
    mask, spacing = CASES[case]
    offset = (3, -4) if mask.ndim == 2 else (2, -3, 4)
    out = CORRUPTIONS.get("shift").apply(mask, Grid.of(mask, spacing), offset=offset)
    assert out.sum() == mask.sum()
    np.testing.assert_allclose(centroid(out) - centroid(mask), offset)
    for severity, limit in (("moderate", 0.3), ("heavy", 0.4)):
        drawn = CORRUPTIONS.get("shift").draw(mask, rng(3), Grid.of(mask, spacing), severity)["offset"]
        assert np.all(np.abs(drawn) <= np.ceil(limit * np.asarray(mask.shape)))


def test_shift_out_of_the_array_loses_voxels():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    assert geometric.shift_mask(mask, (6, 0)).sum() == 6  # rows 2-4 move to 8-10: rows 8 and 9 stay inside
    assert not geometric.shift_mask(mask, (10, 0)).any()


@pytest.mark.parametrize("factor", [0.8, 1.2])
def test_scale_changes_volume_by_factor_cubed(factor):
    mask = ellipsoid_3d(shape=(48, 56, 56), center=(24, 28, 28), radii=(12, 14, 13))
    out = CORRUPTIONS.get("scale").apply(mask, Grid.of(mask), factor=factor)
    assert out.sum() / mask.sum() == pytest.approx(factor ** 3, rel=0.05)
    np.testing.assert_allclose(centroid(out), centroid(mask), atol=0.6)
    mask2 = ellipse_2d()
    out2 = CORRUPTIONS.get("scale").apply(mask2, Grid.of(mask2), factor=factor)
    assert out2.sum() / mask2.sum() == pytest.approx(factor ** 2, rel=0.05)


def test_scale_respects_anisotropic_spacing():
    mask = ellipsoid_3d(shape=(30, 64, 64), center=(15, 32, 32), radii=(6, 18, 18))
    out = CORRUPTIONS.get("scale").apply(mask, Grid.of(mask, (3.0, 1.0, 1.0)), factor=1.25)
    assert out.sum() / mask.sum() == pytest.approx(1.25 ** 3, rel=0.06)


def test_rotate_about_centroid():
    mask = ellipse_2d(shape=(64, 64), center=(32, 32), radii=(8, 20))
    grid = Grid.of(mask)
    np.testing.assert_array_equal(CORRUPTIONS.get("rotate").apply(mask, grid, rotation=np.eye(2)), mask)
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]])
    out = CORRUPTIONS.get("rotate").apply(mask, grid, rotation=quarter)
    assert mask_dice(out, mask.T) > 0.97  # a 90 degree turn of a centred ellipse is its transpose
    drawn = CORRUPTIONS.get("rotate")(mask, rng(4))
    assert drawn.sum() == pytest.approx(mask.sum(), rel=0.05)
    np.testing.assert_allclose(centroid(drawn), centroid(mask), atol=1.0)


def test_affine_keeps_area_within_scale_bounds():
    mask = ellipse_2d(shape=(96, 96), center=(48, 48), radii=(12, 18))
    for seed in range(5):
        out = CORRUPTIONS.get("affine")(mask, rng(seed))
        assert 0.9 ** 2 * 0.95 < out.sum() / mask.sum() < 1.1 ** 2 * 1.05


# ---------------------------------------------------------------- blob and catastrophic


@pytest.mark.parametrize("case", sorted(CASES))
def test_blobs_keep_the_area(case):
    mask, spacing = CASES[case]
    for name in ("gaussian_blob", "equal_ball"):
        out = CORRUPTIONS.get(name)(mask, rng(), spacing)
        assert out.sum() == mask.sum()
        np.testing.assert_allclose(centroid(out), centroid(mask), atol=1.0)


def test_equal_ball_of_a_ball_is_the_ball_and_blob_of_an_axis_ellipse_is_itself():
    y, x = np.ogrid[:41, :41]
    disc = (y - 20) ** 2 + (x - 20) ** 2 <= 100
    assert mask_dice(blob.equal_ball(disc, np.ones(2)), disc) > 0.98
    ell = ellipse_2d(shape=(64, 64), center=(32, 32), radii=(10, 20))
    assert mask_dice(blob.gaussian_blob(ell, 1.2), ell) > 0.95


def test_catastrophic():
    mask, spacing = CASES["3d"]
    np.testing.assert_array_equal(CORRUPTIONS.get("inverted")(mask, rng(), spacing), ~mask)
    assert not CORRUPTIONS.get("empty")(mask, rng(), spacing).any()
    assert CORRUPTIONS.get("full")(mask, rng(), spacing).all()
    noise = CORRUPTIONS.get("random")(mask, rng(), spacing)
    assert abs(noise.mean() - 0.5) < 0.02
    assert mask_dice(noise, mask) == pytest.approx(2 * 0.5 * mask.sum() / (mask.sum() + noise.sum()), abs=0.02)


# ---------------------------------------------------------------- label maps


def test_corrupt_labelmap_per_class():
    labels = np.zeros((24, 40, 60), np.uint8)
    labels[:, :, :36][ellipsoid_3d()] = 1
    labels[4:20, 8:30, 40:58] = 2
    eroded = corrupt_labelmap(labels, "erosion", rng(), spacing=(1.0, 1.0, 1.0), unit=1.0)
    assert set(np.unique(eroded)) == {0, 1, 2}
    for c in (1, 2):
        assert not ((eroded == c) & (labels != c)).any()
        assert (eroded == c).sum() < (labels == c).sum()
    assert not corrupt_labelmap(labels, "empty", rng()).any()
    full = corrupt_labelmap(labels, "full", rng())
    assert (full == 2).all()  # the higher label wins overlaps
    with pytest.raises(DataError, match="integer"):
        corrupt_labelmap(labels.astype(float), "erosion", rng())
