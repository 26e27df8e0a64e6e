"""Geometric family: shift, scale about the centroid, rotate about the centroid, random affine.

Everything is nearest-neighbour (order 0) and whatever leaves the array is lost.
- shift: an integer offset per axis, U(-f, f) of that axis's size with f in {0.1, 0.2, 0.3}
  (heavy 0.4).
- scale: isotropic in physical space about the centroid, U(0.75, 0.9) or U(1.1, 1.25)
  (heavy U(0.5, 0.7) or U(1.4, 1.6)), so the volume changes by about factor ** ndim.
- rotate: about the centroid in physical space (so anisotropic spacing is respected); the angle is
  U(-m, m) with m in {15, 30} degrees; in 3D about a uniformly random axis.
- affine: isotropic scale U(0.9, 1.1), rotation U(-15, 15) degrees, shift U(-0.1, 0.1) of each
  axis's size.
Scale/rotate/affine resample only the box the transformed mask can reach
(`scipy.ndimage.affine_transform`, order 0).
"""

from __future__ import annotations

import itertools

import numpy as np

from .base import Corruption, Grid, bbox, centroid, random_rotation, register_corruption, roi

SHIFT_MODERATE = (0.1, 0.2, 0.3)
SHIFT_HEAVY = 0.4
SCALE_MODERATE = ((0.75, 0.9), (1.1, 1.25))
SCALE_HEAVY = ((0.5, 0.7), (1.4, 1.6))
ROTATE_DEGREES = (15.0, 30.0)
AFFINE_SCALE, AFFINE_SHIFT, AFFINE_DEGREES = (0.9, 1.1), 0.1, 15.0


def shift_mask(mask: np.ndarray, offset) -> np.ndarray:
    """Translate by an integer voxel `offset` per axis; voxels leaving the array are lost."""
    out = np.zeros_like(mask)
    src, dst = [], []
    for d, n in zip(np.asarray(offset, dtype=np.int64), mask.shape):
        if abs(d) >= n:
            return out
        src.append(slice(max(0, -d), n - max(0, d)))
        dst.append(slice(max(0, d), n - max(0, -d)))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def affine_about_centroid(mask: np.ndarray, spacing: np.ndarray, linear: np.ndarray, translation=None) -> np.ndarray:
    """Apply `linear` (physical space, numpy axis order) about the foreground centroid, then
    translate by `translation` voxels. Output voxel o samples input c + A^-1 (o - c - t) with
    A = S^-1 linear S and S = diag(spacing)."""
    from scipy import ndimage

    box = bbox(mask)
    out = np.zeros_like(mask)
    if box is None:
        return out
    ndim = mask.ndim
    center = centroid(mask)
    t = np.zeros(ndim) if translation is None else np.asarray(translation, float)
    forward = np.diag(1.0 / spacing) @ np.asarray(linear, float) @ np.diag(spacing)
    inverse = np.linalg.inv(forward)
    lo, hi = box[0] - 0.5, box[1] + 0.5
    corners = np.array(list(itertools.product(*zip(lo, hi))))
    mapped = (corners - center) @ forward.T + center + t
    out_region = roi(mask.shape, mapped.min(0), mapped.max(0), 1)
    if any(s.stop <= s.start for s in out_region):
        return out
    in_region = roi(mask.shape, box[0], box[1], 1)
    r0 = np.array([s.start for s in out_region], float)
    in0 = np.array([s.start for s in in_region], float)
    offset = center + inverse @ (r0 - center - t) - in0
    sub = np.ascontiguousarray(mask[in_region]).view(np.uint8)
    shape = tuple(s.stop - s.start for s in out_region)
    out[out_region] = ndimage.affine_transform(sub, inverse, offset, output_shape=shape, order=0,
                                               mode="constant", cval=0).view(bool)
    return out


def _uniform_from_ranges(rng, ranges):
    low, high = ranges[int(rng.integers(len(ranges)))]
    return float(rng.uniform(low, high))


@register_corruption
class Shift(Corruption):
    """Shift up to 10/20/30% of the size per axis (heavy: 40%)."""

    name = "shift"
    family = "geometric"
    severities = ("moderate", "heavy")

    def draw(self, mask, rng, grid, severity):
        limit = SHIFT_HEAVY if severity == "heavy" else float(rng.choice(SHIFT_MODERATE))
        offset = np.rint(rng.uniform(-limit, limit, grid.ndim) * np.asarray(grid.shape)).astype(int)
        return {"offset": offset}

    def apply(self, mask, grid: Grid, offset=None):
        return shift_mask(mask, np.zeros(mask.ndim, int) if offset is None else offset)


@register_corruption
class Scale(Corruption):
    """Scale about the centroid by 0.75-0.9 or 1.1-1.25 (heavy: 0.5-0.7 or 1.4-1.6)."""

    name = "scale"
    family = "geometric"
    severities = ("moderate", "heavy")

    def draw(self, mask, rng, grid, severity):
        return {"factor": _uniform_from_ranges(rng, SCALE_HEAVY if severity == "heavy" else SCALE_MODERATE)}

    def apply(self, mask, grid: Grid, factor: float = 1.0):
        return affine_about_centroid(mask, grid.spacing, factor * np.eye(mask.ndim))


@register_corruption
class Rotate(Corruption):
    """Rotate about the centroid by up to 15 or 30 degrees (3D: random axis)."""

    name = "rotate"
    family = "geometric"

    def draw(self, mask, rng, grid, severity):
        return {"rotation": random_rotation(grid.ndim, rng, float(rng.choice(ROTATE_DEGREES)))}

    def apply(self, mask, grid: Grid, rotation=None):
        rotation = np.eye(mask.ndim) if rotation is None else rotation
        return affine_about_centroid(mask, grid.spacing, rotation)


@register_corruption
class RandomAffine(Corruption):
    """Random affine: scale 0.9-1.1, rotation up to 15 degrees, shift up to 10%."""

    name = "affine"
    family = "geometric"

    def draw(self, mask, rng, grid, severity):
        factor = float(rng.uniform(*AFFINE_SCALE))
        rotation = random_rotation(grid.ndim, rng, AFFINE_DEGREES)
        shift = rng.uniform(-AFFINE_SHIFT, AFFINE_SHIFT, grid.ndim) * np.asarray(grid.shape)
        return {"linear": factor * rotation, "translation": shift}

    def apply(self, mask, grid: Grid, linear=None, translation=None):
        linear = np.eye(mask.ndim) if linear is None else linear
        return affine_about_centroid(mask, grid.spacing, linear, translation)
