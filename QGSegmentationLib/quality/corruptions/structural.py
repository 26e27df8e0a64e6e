"""Structural family: holes, islands, holes + islands, keep the largest component, drop a component,
rectangular block dropout.

- holes: balls (discs) of background punched at random foreground voxels: 2 of radius 3-8 or
  3 of radius 8-15 paper pixels; heavy: 5 of radius 10-20. The result is a subset of the mask.
- islands: 2 balls of radius 3-8 paper pixels added around random background voxels anywhere in the
  array (false positives). The result is a superset of the mask.
- holes_islands: 2 holes and 2 islands of radius 3-8.
- keep_largest / drop_component: full connectivity; dropping needs at least two components,
  otherwise the mask is returned unchanged (dropping the only one would be the "empty"
  catastrophic corruption).
- block_dropout: one box of background whose side along each axis is U(0.1, 0.3) of the array's
  side, centred on a random foreground voxel so it always bites.
"""

from __future__ import annotations

import numpy as np

from .base import (Corruption, Grid, ball_into, largest_component, mask_roi, random_voxel,
                   register_corruption, roi)

HOLES_MODERATE = ((2, (3.0, 8.0)), (3, (8.0, 15.0)))
HOLES_HEAVY = (5, (10.0, 20.0))
ISLANDS = (2, (3.0, 8.0))
BLOCK_FRACTION = (0.1, 0.3)


def _balls(mask, rng, count, radius_range, on_foreground):
    balls = []
    for _ in range(count):
        center = random_voxel(mask, rng, value=on_foreground)
        if center is None:
            break
        balls.append((center, float(rng.uniform(*radius_range))))
    return balls


def paint_balls(mask: np.ndarray, grid: Grid, balls, value: bool) -> np.ndarray:
    """Copy of `mask` with balls of (center voxel, radius in paper pixels) set to `value`."""
    out = mask.copy()
    for center, radius in balls:
        ball_into(out, center, radius * grid.unit, grid.spacing, value)
    return out


def drop_component(mask: np.ndarray, choice: float) -> np.ndarray:
    """Remove the connected component picked by `choice` in [0, 1) (unchanged if only one)."""
    from scipy import ndimage

    region = mask_roi(mask)
    if region is None:
        return mask.copy()
    labels, count = ndimage.label(mask[region], structure=np.ones((3,) * mask.ndim))
    out = mask.copy()
    if count >= 2:
        victim = 1 + int(choice * count)
        out[region][labels == victim] = False
    return out


def block_dropout(mask: np.ndarray, center, sides) -> np.ndarray:
    """Copy of `mask` with the box of `sides` voxels centred at `center` cleared."""
    out = mask.copy()
    half = np.asarray(sides, float) / 2.0
    center = np.asarray(center, float)
    box = roi(mask.shape, np.ceil(center - half), np.floor(center + half))
    out[box] = False
    return out


@register_corruption
class Holes(Corruption):
    """Holes: 2 of radius 3-8 or 3 of radius 8-15 (heavy: 5 of radius 10-20)."""

    name = "holes"
    family = "structural"
    severities = ("moderate", "heavy")

    def draw(self, mask, rng, grid, severity):
        if severity == "heavy":
            count, radius = HOLES_HEAVY
        else:
            count, radius = HOLES_MODERATE[int(rng.integers(len(HOLES_MODERATE)))]
        return {"holes": _balls(mask, rng, count, radius, True)}

    def apply(self, mask, grid: Grid, holes=()):
        return paint_balls(mask, grid, holes, False)


@register_corruption
class Islands(Corruption):
    """Islands: 2 false-positive balls of radius 3-8 outside the mask."""

    name = "islands"
    family = "structural"

    def draw(self, mask, rng, grid, severity):
        count, radius = ISLANDS
        return {"islands": _balls(mask, rng, count, radius, False)}

    def apply(self, mask, grid: Grid, islands=()):
        return paint_balls(mask, grid, islands, True)


@register_corruption
class HolesIslands(Corruption):
    """Holes and islands: 2 holes and 2 islands of radius 3-8."""

    name = "holes_islands"
    family = "structural"

    def draw(self, mask, rng, grid, severity):
        count, radius = ISLANDS
        return {"holes": _balls(mask, rng, count, radius, True),
                "islands": _balls(mask, rng, count, radius, False)}

    def apply(self, mask, grid: Grid, holes=(), islands=()):
        return paint_balls(paint_balls(mask, grid, holes, False), grid, islands, True)


@register_corruption
class KeepLargest(Corruption):
    """Keep only the largest connected component."""

    name = "keep_largest"
    family = "structural"

    def apply(self, mask, grid: Grid):
        return largest_component(mask)


@register_corruption
class DropComponent(Corruption):
    """Drop one random connected component (needs two or more)."""

    name = "drop_component"
    family = "structural"

    def draw(self, mask, rng, grid, severity):
        return {"choice": float(rng.random())}

    def apply(self, mask, grid: Grid, choice: float = 0.0):
        return drop_component(mask, choice)


@register_corruption
class BlockDropout(Corruption):
    """One rectangular dropout of 10-30% of the side, on the foreground."""

    name = "block_dropout"
    family = "structural"

    def draw(self, mask, rng, grid, severity):
        center = random_voxel(mask, rng, value=True)
        if center is None:
            return {"center": None, "sides": None}
        sides = rng.uniform(*BLOCK_FRACTION, grid.ndim) * np.asarray(grid.shape)
        return {"center": center, "sides": sides}

    def apply(self, mask, grid: Grid, center=None, sides=None):
        if center is None:
            return mask.copy()
        return block_dropout(mask, center, sides)
