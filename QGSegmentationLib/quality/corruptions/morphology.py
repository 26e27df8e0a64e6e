"""Morphology family: erosion / dilation with square (cube) kernels, opening and closing.

Square kernels of the paper become boxes of `Grid.odd_sizes(k)` voxels per axis. Box morphology is
separable, so it runs as `scipy.ndimage.minimum_filter` / `maximum_filter` (O(N) per axis,
independent of the kernel size) on the mask's bounding box, which is faster than a distance
transform in 3D. The image border never erodes (border replicates, like OpenCV's default).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Corruption, Grid, mask_roi, register_corruption

MODERATE_KERNELS = (5, 7, 9)
HEAVY_KERNEL = 11


def _box_filter(mask: np.ndarray, sizes: Sequence[int], filter_name: str) -> np.ndarray:
    """Min (erosion) or max (dilation) filter by a box of `sizes` voxels, computed only inside the
    mask's bounding box grown by half a box (everything outside stays background)."""
    from scipy import ndimage

    if all(s <= 1 for s in sizes):
        return mask.copy()
    region = mask_roi(mask, [s // 2 + 1 for s in sizes])
    out = np.zeros_like(mask)
    if region is None:
        return out
    sub = np.ascontiguousarray(mask[region]).view(np.uint8)
    out[region] = getattr(ndimage, filter_name)(sub, size=tuple(sizes), mode="nearest").view(bool)
    return out


def box_erode(mask: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Binary erosion by a box of `sizes` voxels (odd, per axis); the array border does not erode."""
    return _box_filter(mask, sizes, "minimum_filter")


def box_dilate(mask: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Binary dilation by a box of `sizes` voxels (odd, per axis)."""
    return _box_filter(mask, sizes, "maximum_filter")


class _KernelCorruption(Corruption):
    family = "morphology"
    severities = ("moderate", "heavy")

    def draw(self, mask, rng, grid, severity):
        kernel = HEAVY_KERNEL if severity == "heavy" else int(rng.choice(MODERATE_KERNELS))
        return {"kernel": kernel}


@register_corruption
class Erosion(_KernelCorruption):
    """Erosion with a square kernel of 5/7/9 paper pixels (heavy: 11)."""

    name = "erosion"

    def apply(self, mask, grid: Grid, kernel: int = 5):
        return box_erode(mask, grid.odd_sizes(kernel))


@register_corruption
class Dilation(_KernelCorruption):
    """Dilation with a square kernel of 5/7/9 paper pixels (heavy: 11)."""

    name = "dilation"

    def apply(self, mask, grid: Grid, kernel: int = 5):
        return box_dilate(mask, grid.odd_sizes(kernel))


@register_corruption
class Opening(Corruption):
    """Opening (erode then dilate) with a square kernel of 5 paper pixels."""

    name = "opening"
    family = "morphology"

    def apply(self, mask, grid: Grid, kernel: int = 5):
        sizes = grid.odd_sizes(kernel)
        return box_dilate(box_erode(mask, sizes), sizes)


@register_corruption
class Closing(Corruption):
    """Closing (dilate then erode) with a square kernel of 5 paper pixels."""

    name = "closing"
    family = "morphology"

    def apply(self, mask, grid: Grid, kernel: int = 5):
        sizes = grid.odd_sizes(kernel)
        return box_erode(box_dilate(mask, sizes), sizes)

