"""Preprocessing: normalisation, respacing, foreground crop and the exact way back."""

from __future__ import annotations

import math

import numpy as np
import pytest

from QGSegmentationLib.data import io
from QGSegmentationLib.data.io import Geometry
from QGSegmentationLib.data.preprocess import (PreprocessConfig, Preprocessor, _sitk_resample,
                                               crop_geometry, resample_to_geometry,
                                               respace_geometry)
from QGSegmentationLib.errors import ConfigError


def rotated(size=(20, 18, 12), spacing=(0.8, 0.9, 2.0), origin=(5.0, -7.5, 30.0), angle=25.0):
    a = math.radians(angle)
    direction = (math.cos(a), 0.0, math.sin(a), 0.0, 1.0, 0.0, -math.sin(a), 0.0, math.cos(a))
    return Geometry(size, spacing, origin, direction)


def ball_label(shape, radius_fraction=0.3):
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return ((zz ** 2 + yy ** 2 + xx ** 2) < (2 * radius_fraction) ** 2).astype(np.uint8)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(target_spacing=(1.0, 1.0)), "target_spacing"),
    (dict(target_spacing=(1.0, -1.0, 1.0)), "target_spacing"),
    (dict(normalization="minmax"), "unknown normalization"),
    (dict(clip_percentiles=(99, 1)), "clip_percentiles"),
    (dict(crop_margin_mm=-1), "crop_margin_mm"),
])
def test_config_validation(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        PreprocessConfig(**kwargs)


def test_normalizations():
    rng = np.random.default_rng(0)
    image = rng.normal(50, 10, (6, 7, 8)).astype(np.float32)
    image[0, 0, 0] = 1e4  # outlier clipped away by the percentiles
    geometry = Geometry.identity(image.shape)
    z, _ = Preprocessor(PreprocessConfig(normalization="zscore")).image(image, geometry)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1.0) < 1e-3
    assert z.max() < 5  # the outlier was clipped before the statistics
    p, _ = Preprocessor(PreprocessConfig(normalization="percentile", clip_percentiles=(0, 100))).image(image, geometry)
    assert p.min() == 0.0 and p.max() == 1.0
    np.testing.assert_allclose(p, (image - image.min()) / (image.max() - image.min()), rtol=1e-5, atol=1e-6)
    n, same = Preprocessor(PreprocessConfig(normalization="none")).image(image, geometry)
    np.testing.assert_array_equal(n, image)
    assert same == geometry


def test_respace_keeps_first_voxel_corner():
    geometry = rotated()
    target = respace_geometry(geometry, (1.6, None, 1.0))
    assert target.spacing == (1.6, 0.9, 1.0)
    assert target.size == (10, 18, 24)  # extents 16, 16.2, 24 mm divided by the new spacing
    corner_old = geometry.index_to_physical([-0.5, -0.5, -0.5])
    corner_new = target.index_to_physical([-0.5, -0.5, -0.5])
    np.testing.assert_allclose(corner_new, corner_old, atol=1e-9)
    assert target.direction == geometry.direction


def test_label_down_then_probabilities_back_restore_original_grid(tmp_path):
    original = rotated()
    label = ball_label(original.shape)
    pre = Preprocessor(PreprocessConfig(target_spacing=(1.6, 1.8, 3.0)))
    small, small_geometry = pre.label(label, original)
    assert small.dtype == np.uint8 and small.shape == small_geometry.shape
    assert small_geometry.shape != original.shape
    assert set(np.unique(small)) <= {0, 1}
    probabilities = np.stack([small == 0, small == 1]).astype(np.float32)
    back = resample_to_geometry(probabilities, small_geometry, original, "linear")
    assert back.shape == (2,) + original.shape and back.dtype == np.float32
    np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-5)  # nearest extrapolation at borders
    restored = back.argmax(0).astype(np.uint8)
    overlap = 2 * np.logical_and(restored, label).sum() / (restored.sum() + label.sum())
    assert overlap > 0.85
    path = io.write_label(tmp_path / "restored.nrrd", restored, original)
    assert io.read_label(path)[1].almost_equal(original, tol=1e-9)


def test_same_grid_is_identity():
    geometry = rotated()
    volume = np.random.default_rng(1).normal(size=geometry.shape).astype(np.float32)
    np.testing.assert_array_equal(resample_to_geometry(volume, geometry, geometry, "linear"), volume)


def test_foreground_crop_uses_image_and_keeps_physical_positions():
    geometry = rotated()
    image = np.zeros(geometry.shape, np.float32)  # (12, 18, 20)
    image[4:8, 5:10, 6:15] = np.random.default_rng(2).uniform(1, 2, (4, 5, 9))
    label = np.zeros(geometry.shape, np.uint8)
    label[5:7, 6:8, 8:10] = 1
    label[0, 0, 0] = 1  # outside the image foreground: the crop must not follow the label
    margin_mm = 1.0  # = 1 voxel on z (2.0 mm), 2 voxels on y (0.9) and x (0.8)
    pre = Preprocessor(PreprocessConfig(normalization="none", crop_foreground=True, crop_margin_mm=margin_mm))
    cropped, label_cropped, target = pre.case(image, label, geometry)
    start, stop = (3, 3, 4), (9, 12, 17)
    assert target == crop_geometry(geometry, start, stop)
    np.testing.assert_array_equal(cropped, image[3:9, 3:12, 4:17])
    np.testing.assert_array_equal(label_cropped, label[3:9, 3:12, 4:17])
    # the cropped grid's first voxel sits where the original voxel (x=4, y=3, z=3) was
    np.testing.assert_allclose(target.index_to_physical([0, 0, 0]),
                               geometry.index_to_physical([4, 3, 3]), atol=1e-9)
    # back onto the original grid: exact inside, fill value outside
    back = resample_to_geometry(label_cropped[None].astype(np.float32), target, geometry, "linear", fill_values=[7.0])
    expected = np.full(geometry.shape, 7.0, np.float32)
    expected[3:9, 3:12, 4:17] = label_cropped
    np.testing.assert_array_equal(back[0], expected)


def test_crop_fast_path_matches_simpleitk():
    geometry = rotated()
    volume = np.random.default_rng(3).normal(size=geometry.shape).astype(np.float32)
    target = crop_geometry(geometry, (2, 1, 3), (10, 17, 22))  # runs past x: edge extrapolation
    fast = resample_to_geometry(volume, geometry, target, "nearest")
    reference = _sitk_resample(volume, geometry, target, linear=False, fill=None)
    np.testing.assert_array_equal(fast, reference)


def test_label_needs_image_grid_when_cropping():
    pre = Preprocessor(PreprocessConfig(crop_foreground=True))
    with pytest.raises(ValueError, match="target geometry"):
        pre.label(np.zeros((2, 2, 2), np.uint8), Geometry.identity((2, 2, 2)))


def test_bad_order_and_shape():
    geometry = Geometry.identity((2, 3, 4))
    with pytest.raises(ConfigError, match="order"):
        resample_to_geometry(np.zeros((2, 3, 4)), geometry, geometry, "cubic")
    with pytest.raises(ValueError, match="does not match"):
        resample_to_geometry(np.zeros((3, 3, 4)), geometry, geometry, "linear")


def test_zscore_without_clipping_is_monais_normalize_intensity():
    from monai.transforms import NormalizeIntensity

    from QGSegmentationLib.data.preprocess import PreprocessConfig, zscore

    volume = np.random.default_rng(0).gamma(2.0, 50.0, size=(12, 16, 16)).astype(np.float32)
    volume[0, 0, :4] = 5000.0  # a few bright outliers, which the default clipping would cut
    unclipped = zscore(volume, PreprocessConfig(clip_percentiles=(0, 100)))
    np.testing.assert_allclose(unclipped, np.asarray(NormalizeIntensity()(volume)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(zscore(volume, PreprocessConfig()), unclipped, atol=1e-2)


def _centroid_mm(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    index_xyz = np.argwhere(mask)[:, ::-1].mean(axis=0)
    return np.asarray(geometry.origin) + geometry.direction_matrix @ (index_xyz * np.asarray(geometry.spacing))


def test_nearest_neighbour_shifts_a_label_halved_in_resolution_and_linear_label_resampling_does_not():
    from QGSegmentationLib.data.preprocess import resample_labels, respace_geometry

    zz, yy, xx = np.mgrid[:40, :40, :40]
    ball = ((zz - 19.5) ** 2 + (yy - 19.5) ** 2 + (xx - 19.5) ** 2 < 12.3 ** 2).astype(np.uint8)
    fine = Geometry((40, 40, 40), (0.625,) * 3, (3.0, -2.0, 1.0), tuple(np.eye(3).ravel()))
    coarse = respace_geometry(fine, (1.25, 1.25, 1.25))
    truth = _centroid_mm(ball, fine)
    nearest = resample_labels(ball, fine, coarse, "nearest")
    linear = resample_labels(ball, fine, coarse, "linear")
    assert np.all(np.abs(_centroid_mm(nearest, coarse) - truth) > 0.25)  # half a 0.625 mm voxel, every axis
    assert np.all(np.abs(_centroid_mm(linear, coarse) - truth) < 0.05)
    assert linear.dtype == ball.dtype and linear.shape == coarse.shape
    assert abs(int(linear.sum()) * 8 / int(ball.sum()) - 1) < 0.1


def test_linear_label_resampling_keeps_values_breaks_ties_for_structures_and_copies_whole_voxel_crops():
    from QGSegmentationLib.data.preprocess import crop_geometry, resample_labels, respace_geometry

    labels = np.zeros((4, 4, 4), np.uint8)
    labels[:, :, 1] = 3   # each 2x2x2 block of the coarse voxel at x=0 is half 0, half 3
    labels[:, :, 2:] = 5  # and the one at x=1 is all 5
    fine = Geometry((4, 4, 4), (1.0,) * 3, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    coarse = resample_labels(labels, fine, respace_geometry(fine, (2.0, 2.0, 2.0)), "linear")
    assert set(np.unique(coarse)) == {3, 5} and np.all(coarse[..., 0] == 3) and np.all(coarse[..., 1] == 5)
    crop = crop_geometry(fine, (1, 0, 1), (3, 4, 4))
    np.testing.assert_array_equal(resample_labels(labels, fine, crop, "linear"), labels[1:3, :, 1:])
    assert np.all(resample_labels(np.zeros_like(labels), fine, respace_geometry(fine, (2.0,) * 3), "linear") == 0)
    with pytest.raises(ConfigError, match="label_resampling must be one of nearest, linear"):
        PreprocessConfig(label_resampling="cubic")


def test_label_resampling_is_part_of_the_cache_key(tmp_path):
    from QGSegmentationLib.data.cache import CaseStore
    from QGSegmentationLib.data.dataset import CaseRef

    (tmp_path / "image.nrrd").write_bytes(b"x")
    (tmp_path / "label.nrrd").write_bytes(b"y")
    ref = CaseRef("case", tmp_path / "image.nrrd", tmp_path / "label.nrrd")
    store = lambda method: CaseStore(Preprocessor(PreprocessConfig(target_spacing=(2.0, 2.0, 2.0),  # noqa: E731
                                                                   label_resampling=method)), cache_dir=tmp_path)
    assert store("nearest").key(ref) != store("linear").key(ref)  # a cache never serves the other's labels
