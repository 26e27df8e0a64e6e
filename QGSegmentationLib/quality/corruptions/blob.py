"""Blob family: smooth blobs that imitate the very first outputs of a segmenter.

- gaussian_blob: an axis-aligned Gaussian at the centroid with per-axis sigma = the foreground's
  coordinate standard deviation x 1.0 or 1.2, thresholded so that exactly the original number of
  voxels is kept (the highest values). Note that thresholding to the original area makes the
  result an axis-aligned ellipse whose shape does not depend on the sigma factor; the factor is
  kept as a parameter for fidelity with the released configuration.
- equal_ball: a disc (2D) / ball (3D) in physical space at the centroid with exactly the original
  number of voxels.
Both keep the voxel count of the reference (unless the array is too small to hold it).
Blob operations never take part in chained samples.
"""

from __future__ import annotations

import numpy as np

from .base import Corruption, Grid, register_corruption, top_n

BLOB_SIGMA_FACTORS = (1.0, 1.2)


def gaussian_blob(mask: np.ndarray, sigma_factor: float = 1.0) -> np.ndarray:
    """The original number of voxels, taken where an axis-aligned centroid Gaussian is highest."""
    coords = np.nonzero(mask)
    count = coords[0].size
    if count == 0 or count == mask.size:
        return mask.copy()
    center = [c.mean() for c in coords]
    sigma = [max(c.std(), 0.5) * sigma_factor for c in coords]
    grids = np.ogrid[tuple(slice(0, n) for n in mask.shape)]
    score = sum((((g - c) / s) ** 2).astype(np.float32) for g, c, s in zip(grids, center, sigma))
    return top_n(score, count)


def equal_ball(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """A physical-space ball at the centroid with the original number of voxels."""
    coords = np.nonzero(mask)
    count = coords[0].size
    if count == 0 or count == mask.size:
        return mask.copy()
    center = [c.mean() for c in coords]
    grids = np.ogrid[tuple(slice(0, n) for n in mask.shape)]
    score = sum((((g - c) * s) ** 2).astype(np.float32) for g, c, s in zip(grids, center, spacing))
    return top_n(score, count)


@register_corruption
class GaussianBlob(Corruption):
    """Gaussian blob at the centroid (sigma = coordinate std x 1.0 / 1.2), original area."""

    name = "gaussian_blob"
    family = "blob"
    chain_allowed = False

    def draw(self, mask, rng, grid, severity):
        return {"sigma_factor": float(rng.choice(BLOB_SIGMA_FACTORS))}

    def apply(self, mask, grid: Grid, sigma_factor: float = 1.0):
        return gaussian_blob(mask, sigma_factor)


@register_corruption
class EqualBall(Corruption):
    """Circle (3D: sphere) of equal area at the centroid."""

    name = "equal_ball"
    family = "blob"
    chain_allowed = False

    def apply(self, mask, grid: Grid):
        return equal_ball(mask, grid.spacing)
