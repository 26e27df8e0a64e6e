"""Boundary family: jagged band, smoothed boundary, elastic deformation, grid distortion.

- jagged_band: band = dilate(k) - erode(k), k in {3, 5} paper pixels (at least 3 voxels per axis so
  the band exists); the eroded core is kept and every band voxel is kept with probability 0.5.
- smooth_boundary: Gaussian blur of the mask with OpenCV's sigma for kernel sizes 11 / 15
  (sigma = 0.3 ((k - 1) / 2 - 1) + 0.8, i.e. 2.0 / 2.6 paper pixels), thresholded at 0.5.
- elastic: a smooth random displacement field (uniform noise blurred with sigma, times alpha;
  (alpha, sigma) = (30, 4) or (60, 5) paper pixels). In 3D, or after scaling sigma to voxels, blurred
  noise would be much weaker than in the paper's 2D 224-pixel setting, so the field is normalised
  to the standard deviation that setting has (alpha / sqrt(3) * sum of squared 2D kernel weights),
  then converted to voxels per axis. The field is generated on a coarse grid and interpolated (it is
  smooth anyway); the displacement is clipped below a margin of 4 standard deviations, so only
  voxels within that margin of the boundary can change and only those are resampled.
- grid_distortion: albumentations-style separable grid distortion: each axis is cut into
  `steps` cells whose lengths are scaled by 1 + U(-limit, limit) and the output samples the input
  along the resulting piecewise-linear map (exactly the identity when every factor is 1); (steps, limit) = (5, 0.2) or (8, 0.4), heavy (12, 0.6).
  Positions mapped outside the array are background.
"""

from __future__ import annotations

import numpy as np

from .base import Corruption, Grid, mask_roi, register_corruption
from .morphology import box_dilate, box_erode

JAGGED_KERNELS = (3, 5)
SMOOTH_KERNELS = (11, 15)
ELASTIC_SETTINGS = ((30.0, 4.0), (60.0, 5.0))
GRID_MODERATE = ((5, 0.2), (8, 0.4))
GRID_HEAVY = (12, 0.6)


def jagged_band(mask: np.ndarray, sizes, rng: np.random.Generator, keep: float = 0.5) -> np.ndarray:
    """Eroded core plus a random half of the band dilate(sizes) - erode(sizes)."""
    core = box_erode(mask, sizes)
    band = box_dilate(mask, sizes) & ~core
    out = core
    idx = np.flatnonzero(band.ravel())
    out.ravel()[idx[rng.random(idx.size) < keep]] = True
    return out


def opencv_sigma(kernel: int) -> float:
    """The sigma OpenCV's GaussianBlur uses for a kernel size when sigma is 0."""
    return 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8


def smooth_boundary(mask: np.ndarray, sigma_vox: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Blur the mask with a Gaussian of `sigma_vox` (per axis) and threshold it."""
    from scipy import ndimage

    region = mask_roi(mask, np.ceil(3 * sigma_vox).astype(int) + 1)
    out = np.zeros_like(mask)
    if region is None:
        return out
    blurred = ndimage.gaussian_filter(mask[region].astype(np.float32), sigma_vox, mode="nearest", truncate=3.0)
    out[region] = blurred > threshold
    return out


def paper_elastic_std(alpha: float, sigma: float) -> float:
    """Standard deviation (paper pixels) of one component of the paper's 2D elastic field."""
    radius = int(np.ceil(4 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    return float(alpha / np.sqrt(3.0) * (k ** 2).sum())


def coarse_field(shape, sigma_vox: np.ndarray, rng: np.random.Generator):
    """Unit-variance smooth random field over `shape`, blurred with `sigma_vox` voxels, stored on a
    grid coarser by `factor` per axis (it is smooth, so linear interpolation loses nothing)."""
    from scipy import ndimage

    factor = np.maximum(1.0, np.floor(sigma_vox))
    coarse_shape = tuple(int(np.ceil(s / f)) + 2 for s, f in zip(shape, factor))
    coarse = rng.uniform(-1.0, 1.0, coarse_shape).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma_vox / factor, mode="reflect", truncate=3.0)
    std = coarse.std()
    if std > 0:
        coarse /= std
    return coarse, factor


def elastic(mask: np.ndarray, grid: Grid, alpha: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Warp the mask by a smooth random displacement field (see the module docstring).

    The displacement is clipped below `margin` voxels, so only voxels within `margin` of the
    boundary can change; only those are resampled.
    """
    from scipy import ndimage

    std_vox = grid.voxels(paper_elastic_std(alpha, sigma))
    margin = np.ceil(4 * std_vox).astype(int) + 1
    region = mask_roi(mask, margin)
    if region is None:
        return np.zeros_like(mask)
    sub = mask[region]
    sizes = tuple(int(2 * m - 1) for m in margin)  # a voxel moves by at most margin - 1
    band = box_dilate(sub, sizes) & ~box_erode(sub, sizes)
    points = np.nonzero(band)
    coords = np.stack(points).astype(np.float32)
    sigma_vox = grid.voxels(sigma)
    sampled, inside = [], np.ones(coords.shape[1], bool)
    for axis in range(mask.ndim):
        field, factor = coarse_field(sub.shape, sigma_vox, rng)
        shift = ndimage.map_coordinates(field, coords / factor[:, None].astype(np.float32), order=1, mode="nearest")
        limit = margin[axis] - 1
        source = np.rint(coords[axis] + np.clip(shift * std_vox[axis], -limit, limit)).astype(np.int64)
        inside &= (source >= 0) & (source < sub.shape[axis])  # beyond the region is background
        sampled.append(np.clip(source, 0, sub.shape[axis] - 1))
    warped = sub.copy()
    warped[points] = sub[tuple(sampled)] & inside
    out = np.zeros_like(mask)
    out[region] = warped
    return out


def grid_axis_map(length: int, steps: int, factors: np.ndarray) -> np.ndarray:
    """Source position of every output index along one axis (albumentations' grid distortion)."""
    step = max(length // steps, 1)
    positions = np.zeros(length)
    previous = 0.0
    for i, start in enumerate(range(0, length, step)):
        end = min(start + step, length)
        slope = factors[min(i, len(factors) - 1)]
        positions[start:end] = previous + slope * np.arange(end - start)
        previous += slope * step
    return positions


def grid_distortion(mask: np.ndarray, maps) -> np.ndarray:
    """Resample the mask along separable per-axis source maps (nearest neighbour)."""
    index, valid = [], []
    for positions, length in zip(maps, mask.shape):
        rounded = np.rint(positions).astype(np.int64)
        valid.append((rounded >= 0) & (rounded < length))
        index.append(np.clip(rounded, 0, length - 1))
    out = mask[np.ix_(*index)]
    for axis, v in enumerate(valid):
        if not v.all():
            shape = [1] * mask.ndim
            shape[axis] = -1
            out &= v.reshape(shape)
    return out


@register_corruption
class JaggedBand(Corruption):
    """Jagged boundary: eroded core plus a Bernoulli(0.5) half of the band (kernel 3 or 5)."""

    name = "jagged_band"
    family = "boundary"

    def draw(self, mask, rng, grid, severity):
        return {"kernel": int(rng.choice(JAGGED_KERNELS)), "seed": int(rng.integers(2 ** 32))}

    def apply(self, mask, grid: Grid, kernel: int = 3, seed: int = 0):
        return jagged_band(mask, grid.odd_sizes(kernel, minimum=3), np.random.default_rng(seed))


@register_corruption
class SmoothBoundary(Corruption):
    """Smoothed boundary: Gaussian blur (kernel 11 or 15) thresholded at 0.5."""

    name = "smooth_boundary"
    family = "boundary"

    def draw(self, mask, rng, grid, severity):
        return {"kernel": int(rng.choice(SMOOTH_KERNELS))}

    def apply(self, mask, grid: Grid, kernel: int = 11):
        return smooth_boundary(mask, grid.voxels(opencv_sigma(kernel)))


@register_corruption
class Elastic(Corruption):
    """Elastic deformation (alpha 30 sigma 4, or alpha 60 sigma 5)."""

    name = "elastic"
    family = "boundary"

    def draw(self, mask, rng, grid, severity):
        alpha, sigma = ELASTIC_SETTINGS[int(rng.integers(len(ELASTIC_SETTINGS)))]
        return {"alpha": alpha, "sigma": sigma, "seed": int(rng.integers(2 ** 32))}

    def apply(self, mask, grid: Grid, alpha: float = 30.0, sigma: float = 4.0, seed: int = 0):
        return elastic(mask, grid, alpha, sigma, np.random.default_rng(seed))


@register_corruption
class GridDistortion(Corruption):
    """Grid distortion (5 steps limit 0.2, 8 steps limit 0.4; heavy 12 steps limit 0.6)."""

    name = "grid_distortion"
    family = "boundary"
    severities = ("moderate", "heavy")

    def draw(self, mask, rng, grid, severity):
        steps, limit = GRID_HEAVY if severity == "heavy" else GRID_MODERATE[int(rng.integers(len(GRID_MODERATE)))]
        maps = [grid_axis_map(n, steps, 1.0 + rng.uniform(-limit, limit, steps + 1)) for n in grid.shape]
        return {"maps": maps}

    def apply(self, mask, grid: Grid, maps=None):
        if maps is None:
            return mask.copy()
        return grid_distortion(mask, maps)
