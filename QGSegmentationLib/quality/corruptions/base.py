"""Shared machinery of the mask corruptions: the registry, the `Corruption` base class, the
paper-pixel scaling rule and the small geometry helpers every family uses.

Scaling rule
------------
The VQM parameters of methods.md 1.2 are given in pixels of a 224 x 224 image. Here one such
"paper pixel" has the physical length

    unit = (prod_i shape[i] * spacing[i]) ** (1 / ndim) / 224

i.e. the geometric mean physical extent of the array divided by 224 (for a 224 x 224 image with unit
spacing, unit = 1 and every parameter is exactly the paper's). A length of L paper pixels is
L * unit in physical units, and L * unit / spacing[i] voxels along axis i, so thick-slice
anisotropic volumes get proportionally fewer voxels along z. Kernel sizes are rounded to the
nearest odd voxel count (at least 1). Lengths given as "% of the size" (shift, block dropout) are
taken per axis of the array. Callers that present a crop of a larger volume (as the quality
predictor's presentation does) corrupt the crop, so "image" means the crop; a caller can also pass
`unit=` explicitly.

Calling convention
------------------
Every registered corruption is an instance callable as

    corruption(mask, rng, spacing=None, severity="moderate", unit=None) -> new bool mask

with `mask` a bool array (2D `(y, x)` or 3D `(z, y, x)`), `rng` a `np.random.Generator` and
`spacing` in numpy order. Internally `draw()` picks the random parameters and `apply()` is the
deterministic operation, so tests can call `apply()` with known parameters. Empty and full masks
never raise: each operation returns what it means for them (erosion of nothing is nothing, islands
on an empty mask are just the islands, ...).

Multi-class label maps are corrupted class by class (`corrupt_labelmap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ...errors import ConfigError, DataError
from ...registry import Registry

PAPER_SIZE = 224
SEVERITIES = ("moderate", "heavy", "catastrophic")

CORRUPTIONS = Registry("corruption")


# --------------------------------------------------------------------------------------------
# validation and the grid


def as_bool_mask(mask, name: str = "mask") -> np.ndarray:
    """Return `mask` as a 2D/3D bool array; 0/1 integer or float arrays are accepted."""
    array = np.asarray(mask)
    if array.ndim not in (2, 3):
        raise DataError(f"{name} must be a 2D (y, x) or 3D (z, y, x) array, got shape {array.shape}")
    if array.dtype == bool:
        return array
    if array.size and not np.isin(array, (0, 1)).all():
        raise DataError(
            f"{name} must be binary (values 0/1 or bool), got values {np.unique(array)[:6].tolist()}; "
            "corrupt label maps with corrupt_labelmap()"
        )
    return array.astype(bool)


def as_spacing(spacing, ndim: int, name: str = "spacing") -> np.ndarray:
    """Validate a numpy-order spacing (None -> all ones)."""
    if spacing is None:
        return np.ones(ndim)
    values = np.asarray(spacing, dtype=np.float64).ravel()
    if values.size != ndim:
        raise DataError(f"{name} must have {ndim} values (numpy order) for a {ndim}D mask, got {list(values)}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise DataError(f"{name} values must be positive and finite, got {list(values)}")
    return values


@dataclass(frozen=True)
class Grid:
    """Shape, spacing and the physical length of one paper pixel (see the module docstring)."""

    shape: Tuple[int, ...]
    spacing: np.ndarray
    unit: float

    @classmethod
    def of(cls, mask: np.ndarray, spacing=None, unit: Optional[float] = None) -> "Grid":
        shape = tuple(int(s) for s in mask.shape)
        spacing = as_spacing(spacing, len(shape))
        if unit is None:
            extent = np.asarray(shape, np.float64) * spacing
            unit = float(np.exp(np.log(extent).mean()) / PAPER_SIZE)
        elif not (np.isfinite(unit) and unit > 0):
            raise DataError(f"unit must be a positive length, got {unit}")
        return cls(shape, spacing, float(unit))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def voxels(self, length: float) -> np.ndarray:
        """A length in paper pixels as (float) voxel counts per axis."""
        return float(length) * self.unit / self.spacing

    def odd_sizes(self, kernel: float, minimum: int = 1) -> Tuple[int, ...]:
        """A paper kernel size as the nearest odd voxel count per axis (>= minimum)."""
        half = np.floor((self.voxels(kernel) - 1.0) / 2.0 + 0.5 + 1e-9).astype(int)  # ties round up
        sizes = np.maximum(2 * half + 1, 1)
        return tuple(int(max(s, minimum if minimum % 2 else minimum + 1)) for s in sizes)


# --------------------------------------------------------------------------------------------
# the base class and registration


class Corruption:
    """A mask corruption: `draw` picks random parameters, `apply` is the deterministic operation."""

    name: str = ""
    family: str = ""
    severities: Tuple[str, ...] = ("moderate",)
    chain_allowed: bool = True  # may appear in a chained sample (never for blob/catastrophic)
    weight: float = 1.0  # relative weight when drawn from a pool
    accepted_severities: Optional[Tuple[str, ...]] = None  # callable with these; default severities

    def __call__(self, mask, rng: np.random.Generator, spacing=None, severity: str = "moderate",
                 unit: Optional[float] = None) -> np.ndarray:
        mask = as_bool_mask(mask)
        accepted = self.accepted_severities or self.severities
        if severity not in accepted:
            raise ConfigError(
                f"corruption '{self.name}' has no severity '{severity}'; choose one of {accepted}"
            )
        grid = Grid.of(mask, spacing, unit)
        params = self.draw(mask, rng, grid, severity)
        out = self.apply(mask, grid, **params)
        out = np.asarray(out, dtype=bool)
        if out is mask or np.may_share_memory(out, mask):
            out = out.copy()
        return out

    def draw(self, mask: np.ndarray, rng: np.random.Generator, grid: Grid, severity: str) -> dict:
        return {}

    def apply(self, mask: np.ndarray, grid: Grid, **params) -> np.ndarray:
        raise NotImplementedError

    @property
    def tags(self) -> Tuple[str, ...]:
        tags = [self.family, *self.severities]
        if self.chain_allowed and "moderate" in self.severities:
            tags.append("chain-allowed")
        return tuple(dict.fromkeys(tags))


def register_corruption(cls):
    """Class decorator: instantiate `cls` and register the instance under `cls.name`."""
    instance = cls()
    doc = (cls.__doc__ or "").strip().splitlines()
    CORRUPTIONS.register(cls.name, description=doc[0] if doc else "", tags=instance.tags)(instance)
    return cls


def corruption_names(tag: Optional[str] = None) -> list:
    """Registered corruption names, optionally only those carrying `tag`."""
    return [e.name for e in CORRUPTIONS.entries() if tag is None or tag in e.tags]


def corrupt_labelmap(labelmap, corruption: Union[str, Callable], rng: np.random.Generator,
                     spacing=None, severity: str = "moderate", classes: Optional[Sequence[int]] = None,
                     unit: Optional[float] = None) -> np.ndarray:
    """Corrupt each foreground class of an integer label map independently and recompose.

    Classes are written back in increasing label order, so where two corrupted classes overlap the
    higher label wins; voxels no class claims become background (0). `classes` defaults to every
    non-zero label present.
    """
    labels = np.asarray(labelmap)
    if labels.ndim not in (2, 3) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labelmap must be a 2D/3D integer array, got {labels.dtype} {labels.shape}")
    op = CORRUPTIONS.get(corruption) if isinstance(corruption, str) else corruption
    if classes is None:
        classes = [int(c) for c in np.unique(labels) if c != 0]
    out = np.zeros_like(labels)
    for value in sorted(int(c) for c in classes):
        out[op(labels == value, rng, spacing, severity, unit=unit)] = value
    return out


# --------------------------------------------------------------------------------------------
# geometry helpers


def bbox(mask: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(lo, hi) inclusive voxel bounds of the foreground, or None when empty."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        lo.append(hits[0])
        hi.append(hits[-1])
    return np.array(lo), np.array(hi)


def roi(shape: Sequence[int], lo, hi, margin=0) -> Tuple[slice, ...]:
    """Slices covering [lo - margin, hi + margin] clipped to the array."""
    margin = np.broadcast_to(np.asarray(margin, dtype=np.int64), (len(shape),))
    return tuple(
        slice(int(max(0, np.floor(l) - m)), int(min(s, np.ceil(h) + m + 1)))
        for l, h, m, s in zip(lo, hi, margin, shape)
    )


def mask_roi(mask: np.ndarray, margin=0) -> Optional[Tuple[slice, ...]]:
    box = bbox(mask)
    return None if box is None else roi(mask.shape, box[0], box[1], margin)


def centroid(mask: np.ndarray) -> Optional[np.ndarray]:
    """Foreground centroid in voxel coordinates, or None when empty."""
    coords = np.nonzero(mask)
    if coords[0].size == 0:
        return None
    return np.array([c.mean() for c in coords])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component (full connectivity) of `mask`."""
    from scipy import ndimage

    region = mask_roi(mask)
    if region is None:
        return mask.copy()
    labels, count = ndimage.label(mask[region], structure=np.ones((3,) * mask.ndim))
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out = np.zeros_like(mask)
    out[region] = labels == int(np.argmax(sizes))
    return out


def boundary_points(mask: np.ndarray) -> np.ndarray:
    """Voxel coordinates (N, ndim) of the foreground voxels that touch the background."""
    from scipy import ndimage

    region = mask_roi(mask, 1)
    if region is None:
        return np.zeros((0, mask.ndim), np.int64)
    sub = mask[region]
    inner = ndimage.binary_erosion(sub, border_value=0)
    offset = np.array([s.start for s in region])
    return np.argwhere(sub & ~inner) + offset


def fill_halfspaces(normals: np.ndarray, offsets: np.ndarray, lo, hi, shape, tol: float = 1e-6) -> np.ndarray:
    """Voxels p with normals @ p + offsets <= tol inside the box [lo, hi] (a convex polytope).

    Solved column by column along axis 0: each facet bounds the interval of axis-0 positions of a
    column, so the cost is facets x columns rather than facets x voxels.
    """
    out = np.zeros(shape, bool)
    lo = np.maximum(np.floor(lo).astype(int), 0)
    hi = np.minimum(np.ceil(hi).astype(int), np.asarray(shape) - 1)
    if np.any(hi < lo):
        return out
    axes = [np.arange(l, h + 1, dtype=np.float64) for l, h in zip(lo[1:], hi[1:])]
    cols = np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=1)
    lower = np.full(len(cols), -np.inf)
    upper = np.full(len(cols), np.inf)
    n0 = normals[:, 0]
    chunk = max(1, 4_000_000 // max(len(cols), 1))
    for start in range(0, len(normals), chunk):
        sl = slice(start, start + chunk)
        c = cols @ normals[sl, 1:].T + offsets[sl]  # (C, F)
        a = n0[sl]
        pos, neg, flat = a > 1e-12, a < -1e-12, np.abs(a) <= 1e-12
        if pos.any():
            upper = np.minimum(upper, ((tol - c[:, pos]) / a[pos]).min(axis=1))
        if neg.any():
            lower = np.maximum(lower, ((tol - c[:, neg]) / a[neg]).max(axis=1))
        if flat.any():
            bad = (c[:, flat] > tol).any(axis=1)
            upper[bad] = -np.inf
    z = np.arange(lo[0], hi[0] + 1, dtype=np.float64)[:, None]
    inside = (z >= lower[None] - tol) & (z <= upper[None] + tol)
    box = tuple(slice(l, h + 1) for l, h in zip(lo, hi))
    out[box] = inside.reshape((len(z),) + tuple(len(a) for a in axes))
    return out


def fill_convex_hull(points: np.ndarray, shape) -> Optional[np.ndarray]:
    """Filled convex hull of voxel coordinates `points`; None if the hull is degenerate."""
    from scipy.spatial import ConvexHull, QhullError

    points = np.unique(np.asarray(points, dtype=np.float64), axis=0)
    if len(points) <= points.shape[1]:
        return None
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):
        return None
    planes = np.unique(np.round(hull.equations, 9), axis=0)
    vertices = points[hull.vertices]
    return fill_halfspaces(planes[:, :-1], planes[:, -1], vertices.min(0), vertices.max(0), shape, tol=1e-6)


def ball_into(out: np.ndarray, center, radius_physical: float, spacing: np.ndarray, value: bool) -> None:
    """Set the voxels within `radius_physical` of `center` (voxel coordinates) to `value`, in place."""
    radius_vox = radius_physical / spacing
    region = roi(out.shape, np.asarray(center) - radius_vox, np.asarray(center) + radius_vox)
    if any(s.stop <= s.start for s in region):
        return
    grids = np.ogrid[region]
    dist2 = sum(((g - c) * sp) ** 2 for g, c, sp in zip(grids, center, spacing))
    out[region][dist2 <= radius_physical ** 2] = value


def random_voxel(mask: np.ndarray, rng: np.random.Generator, value: bool = True, tries: int = 64) -> Optional[np.ndarray]:
    """A uniformly random voxel whose mask value equals `value`, or None if there is none."""
    shape = np.asarray(mask.shape)
    for _ in range(tries):  # rejection sampling is O(1) when the class is not rare
        p = (rng.random(mask.ndim) * shape).astype(int)
        if mask[tuple(p)] == value:
            return p
    candidates = np.flatnonzero(mask.ravel() == value)
    if candidates.size == 0:
        return None
    return np.array(np.unravel_index(candidates[rng.integers(candidates.size)], mask.shape))


def random_rotation(ndim: int, rng: np.random.Generator, max_degrees: Optional[float] = None) -> np.ndarray:
    """A random rotation matrix in numpy axis order.

    With `max_degrees`, the angle is uniform in [-max, max] about a uniformly random axis (3D) or in
    the plane (2D); without it, the rotation is uniform over all rotations.
    """
    if ndim == 2:
        angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees) if max_degrees is not None else rng.uniform(0, 360))
        c, s = np.cos(angle), np.sin(angle)
        return np.array([[c, -s], [s, c]])
    if max_degrees is None:
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        w, x, y, z = q
    else:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        half = np.deg2rad(rng.uniform(-max_degrees, max_degrees)) / 2
        w, (x, y, z) = np.cos(half), np.sin(half) * axis
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def top_n(score: np.ndarray, n: int) -> np.ndarray:
    """Bool mask of exactly the `n` lowest-scoring voxels (ties broken by position)."""
    out = np.zeros(score.shape, bool)
    n = int(min(max(n, 0), score.size))
    if n == 0:
        return out
    flat = score.ravel()
    idx = np.argpartition(flat, n - 1)[:n] if n < flat.size else np.arange(flat.size)
    out.ravel()[idx] = True
    return out


ParamDict = Dict[str, object]
