"""Shape-approximation family: best-fit ellipse/ellipsoid, convex polygon/polytope, convex hull,
filled bounding box. Each replaces the mask by a coarse convex shape that a lazy annotator or an
early segmenter might produce.

- ellipse: the ellipse (ellipsoid) with the same centroid and second moments as the largest
  component, in physical coordinates. A uniform solid ellipsoid with covariance S is
  {x : (x - c)^T S^-1 (x - c) <= ndim + 2}; each voxel contributes its own spacing^2 / 12 variance.
- polygon: 2D, the convex polygon through the component's support points (farthest boundary
  voxels) in 3, 5 or 8 evenly spaced directions with a random phase. 3D (our choice): the convex
  polytope through the support points in 8, 24 or 56 directions of a randomly rotated Fibonacci
  sphere. These counts are chosen so that the polytope inscribed in a sphere keeps the same fraction
  of its volume (0.42 / 0.77 / 0.90) as the 3/5/8-gon keeps of a disc (0.41 / 0.76 / 0.90), so the
  corruption is as severe in 3D as in the paper's 2D (a tetrahedron would keep only 0.12).
- convex_hull: the filled convex hull of all foreground voxels.
- bounding_box: the filled axis-aligned bounding box of all foreground voxels.
"""

from __future__ import annotations

import numpy as np

from .base import (Corruption, Grid, bbox, boundary_points, fill_convex_hull, largest_component,
                   random_rotation, register_corruption, roi)

POLYGON_VERTICES_2D = (3, 5, 8)
POLYTOPE_DIRECTIONS_3D = (8, 24, 56)


def fibonacci_sphere(n: int) -> np.ndarray:
    """`n` nearly evenly spread unit vectors."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * i / n)
    azimuth = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(polar), np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth)], axis=1)


def best_fit_ellipse(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The solid ellipse/ellipsoid with the moments of the largest component of `mask`."""
    component = largest_component(mask)
    coords = np.argwhere(component)
    out = np.zeros_like(mask)
    if len(coords) == 0:
        return out
    physical = coords * spacing
    center = physical.mean(axis=0)
    cov = np.cov(physical, rowvar=False, bias=True).reshape(mask.ndim, mask.ndim)
    cov = cov + np.diag(spacing ** 2 / 12.0)
    limit = mask.ndim + 2.0
    half_extent = np.sqrt(limit * np.diag(cov)) / spacing
    c_vox = center / spacing
    region = roi(mask.shape, c_vox - half_extent, c_vox + half_extent)
    grids = np.ogrid[region]
    inv = np.linalg.inv(cov)
    d = [(g * sp - ci) for g, sp, ci in zip(grids, spacing, center)]
    q = sum(inv[i, j] * d[i] * d[j] for i in range(mask.ndim) for j in range(mask.ndim))
    out[region] = q <= limit
    return out


def support_polygon(mask: np.ndarray, spacing: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Filled convex hull of the boundary voxels of the largest component farthest along each of
    `directions` (physical unit vectors, numpy axis order)."""
    component = largest_component(mask)
    points = boundary_points(component)
    if len(points) == 0:
        return np.zeros_like(mask)
    projections = (points * spacing) @ directions.T
    support = points[np.argmax(projections, axis=0)]
    filled = fill_convex_hull(support, mask.shape)
    if filled is None:  # degenerate polygon (tiny or flat component): fall back to its hull
        filled = fill_convex_hull(points, mask.shape)
    return component if filled is None else filled


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """Filled convex hull of the foreground (the mask itself if it is flat, e.g. one line)."""
    points = boundary_points(mask)
    if len(points) == 0:
        return mask.copy()
    filled = fill_convex_hull(points, mask.shape)
    return mask.copy() if filled is None else filled | mask


def bounding_box(mask: np.ndarray) -> np.ndarray:
    """Filled axis-aligned bounding box of the foreground."""
    out = np.zeros_like(mask)
    box = bbox(mask)
    if box is not None:
        out[roi(mask.shape, *box)] = True
    return out


@register_corruption
class Ellipse(Corruption):
    """Best-fit ellipse (3D: ellipsoid) of the largest component, from its moments."""

    name = "ellipse"
    family = "shape"

    def apply(self, mask, grid: Grid):
        return best_fit_ellipse(mask, grid.spacing)


@register_corruption
class Polygon(Corruption):
    """Convex polygon with 3/5/8 vertices (3D: polytope on 8/24/56 directions), largest component."""

    name = "polygon"
    family = "shape"

    def draw(self, mask, rng, grid, severity):
        if grid.ndim == 2:
            n = int(rng.choice(POLYGON_VERTICES_2D))
            angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n) / n
            directions = np.stack([np.sin(angles), np.cos(angles)], axis=1)  # (y, x)
        else:
            base = fibonacci_sphere(int(rng.choice(POLYTOPE_DIRECTIONS_3D)))
            directions = base @ random_rotation(3, rng).T
        return {"directions": directions}

    def apply(self, mask, grid: Grid, directions=None):
        return support_polygon(mask, grid.spacing, np.asarray(directions, float))


@register_corruption
class ConvexHull(Corruption):
    """Filled convex hull of the foreground."""

    name = "convex_hull"
    family = "shape"

    def apply(self, mask, grid: Grid):
        return convex_hull(mask)


@register_corruption
class BoundingBox(Corruption):
    """Filled axis-aligned bounding box of the foreground."""

    name = "bounding_box"
    family = "shape"

    def apply(self, mask, grid: Grid):
        return bounding_box(mask)
