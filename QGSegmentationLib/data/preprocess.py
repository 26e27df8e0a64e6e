"""Preprocessing: optional foreground crop, resampling to a target spacing, intensity normalisation;
and the way back (`resample_to_geometry`) that puts network outputs onto the original voxel grid.

Every step is a change of voxel grid described by a `Geometry`, so predictions can always be
mapped back exactly: the output of `resample_to_geometry(..., to_geometry=original)` has the
original size, spacing, origin and direction by construction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..registry import Registry
from .io import Geometry

NORMALIZATIONS = Registry("normalization")
#: How label maps are brought to the network's grid: "nearest" neighbour, or "linear": each label's
#: indicator interpolated linearly, then the largest taken (nnU-Net's order-1 segmentation resampling).
LABEL_RESAMPLINGS = ("nearest", "linear")
#: What a checkpoint or run that does not record `label_resampling` used: everything trained before
#: linear became the default (BENCHMARKS.md §15) resampled labels by nearest neighbour.
UNRECORDED_LABEL_RESAMPLING = "nearest"

#: Percentiles are estimated on at most this many voxels (a regular subsample) for speed.
_PERCENTILE_SAMPLE = 2_000_000


def _check_label_resampling(method: str) -> None:
    if method not in LABEL_RESAMPLINGS:
        raise ConfigError(f"label_resampling must be one of {', '.join(LABEL_RESAMPLINGS)}, got {method!r}")


@dataclass(frozen=True)
class PreprocessConfig:
    """How images and labels are brought to the network's grid and intensity range.

    target_spacing: (x, y, z) mm, None to keep the file's spacing; a None entry keeps that axis.
    normalization: a name in NORMALIZATIONS ("zscore", "percentile", "none").
    clip_percentiles: intensities are clipped to these percentiles before normalising.
    crop_foreground: crop to the bounding box of voxels above the image minimum (never the
        label, so inference sees the same crop) plus `crop_margin_mm` on every side.
    label_resampling: "nearest" or "linear" (see `resample_labels`). Nearest neighbour is ill-posed
        where target voxel centres fall halfway between source voxels, as they all do when a grid
        is coarsened by a factor of two with its corners kept: it then takes one side every time,
        shifting the label by half a source voxel against the (interpolated) image. "linear" is
        the default since BENCHMARKS.md §15."""

    target_spacing: tuple | None = None
    normalization: str = "zscore"
    clip_percentiles: tuple = (0.5, 99.5)
    crop_foreground: bool = False
    crop_margin_mm: float = 10.0
    label_resampling: str = "linear"

    def __post_init__(self):
        if self.target_spacing is not None:
            spacing = tuple(self.target_spacing)
            if len(spacing) != 3 or any(s is not None and not (float(s) > 0 and math.isfinite(float(s)))
                                        for s in spacing):
                raise ConfigError(f"target_spacing must be 3 positive numbers (x, y, z) mm or None, "
                                  f"got {self.target_spacing!r}")
            object.__setattr__(self, "target_spacing",
                               tuple(None if s is None else float(s) for s in spacing))
        NORMALIZATIONS.get(self.normalization)  # unknown names raise ConfigError listing choices
        try:
            clip = tuple(float(p) for p in self.clip_percentiles)
        except (TypeError, ValueError):
            clip = ()
        if len(clip) != 2:
            raise ConfigError(f"clip_percentiles must be two numbers (low high), e.g. [0.5, 99.5], "
                              f"or [0, 100] for no clipping, not {self.clip_percentiles!r}")
        low, high = clip
        if not 0.0 <= low < high <= 100.0:
            raise ConfigError(f"clip_percentiles must satisfy 0 <= low < high <= 100, "
                              f"got {self.clip_percentiles!r}")
        object.__setattr__(self, "clip_percentiles", (low, high))
        _check_label_resampling(self.label_resampling)
        if not float(self.crop_margin_mm) >= 0:
            raise ConfigError(f"crop_margin_mm must be >= 0, got {self.crop_margin_mm!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["target_spacing"] = list(self.target_spacing) if self.target_spacing else None
        data["clip_percentiles"] = list(self.clip_percentiles)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        data = dict(data)
        if data.get("target_spacing") is not None:
            data["target_spacing"] = tuple(data["target_spacing"])
        data["clip_percentiles"] = tuple(data.get("clip_percentiles", (0.5, 99.5)))
        return cls(**data)


# --------------------------------------------------------------------------------- normalisation

def _clip_bounds(array: np.ndarray, percentiles) -> tuple:
    flat = array.ravel()
    if flat.size > _PERCENTILE_SAMPLE:
        flat = flat[:: int(math.ceil(flat.size / _PERCENTILE_SAMPLE))]
    low, high = np.percentile(flat, percentiles)
    return float(low), float(high)


@NORMALIZATIONS.register("zscore", description="clip to percentiles, then zero mean and unit variance")
def zscore(array: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    low, high = _clip_bounds(array, config.clip_percentiles)
    clipped = np.clip(array, low, high)
    std = float(clipped.std())
    return ((clipped - float(clipped.mean())) / max(std, 1e-8)).astype(np.float32)


@NORMALIZATIONS.register("percentile", description="clip to percentiles, then scale linearly to [0, 1]")
def percentile(array: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    low, high = _clip_bounds(array, config.clip_percentiles)
    return ((np.clip(array, low, high) - low) / max(high - low, 1e-8)).astype(np.float32)


@NORMALIZATIONS.register("none", description="keep the file's intensities")
def no_normalization(array: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


# ------------------------------------------------------------------------------------ resampling

def _integer_offset(source: Geometry, target: Geometry, tol: float = 1e-3):
    """Voxel offset (x, y, z) of `target`'s first voxel in `source`'s index space when both grids
    share spacing and direction and the offset is whole; otherwise None."""
    if not (np.allclose(source.spacing, target.spacing, rtol=0, atol=1e-6 * max(source.spacing))
            and np.allclose(source.direction, target.direction, rtol=0, atol=1e-6)):
        return None
    delta = np.asarray(target.origin) - np.asarray(source.origin)
    index = source.direction_matrix.T @ delta / np.asarray(source.spacing)
    rounded = np.round(index)
    if np.abs(index - rounded).max() > tol:
        return None
    return tuple(int(v) for v in rounded)


def _shift_volume(volume: np.ndarray, offset_xyz, out_shape, fill) -> np.ndarray:
    """Sub-grid copy: out[k] = volume[k + offset] (numpy order); outside values are `fill`,
    or the nearest edge value when `fill` is None."""
    offset = tuple(reversed(tuple(offset_xyz)))
    indices = [np.arange(start, start + n) for start, n in zip(offset, out_shape)]
    inside = [(i[0] >= 0 and i[-1] < volume.shape[axis]) for axis, i in enumerate(indices)]
    if all(inside):
        return volume[tuple(slice(i[0], i[-1] + 1) for i in indices)].copy()
    clipped = [np.clip(i, 0, volume.shape[axis] - 1) for axis, i in enumerate(indices)]
    out = volume[np.ix_(*clipped)]
    if fill is not None:
        for axis, i in enumerate(indices):
            outside = (i < 0) | (i >= volume.shape[axis])
            if outside.any():
                where = [slice(None)] * 3
                where[axis] = outside
                out[tuple(where)] = fill
    return out


def _sitk_resample(volume: np.ndarray, source: Geometry, target: Geometry, linear: bool, fill):
    import SimpleITK as sitk

    image = source.apply(sitk.GetImageFromArray(volume))
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(v) for v in target.size])
    resampler.SetOutputSpacing(target.spacing)
    resampler.SetOutputOrigin(target.origin)
    resampler.SetOutputDirection(target.direction)
    resampler.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    resampler.SetOutputPixelType(image.GetPixelID())
    if fill is None:
        resampler.SetUseNearestNeighborExtrapolator(True)
    else:
        resampler.SetDefaultPixelValue(float(fill))
    return sitk.GetArrayFromImage(resampler.Execute(image))


_ORDERS = {"linear": True, 1: True, "nearest": False, 0: False}


def resample_to_geometry(array: np.ndarray, from_geometry: Geometry, to_geometry: Geometry,
                         order="linear", fill_values: Sequence[float] | float | None = None
                         ) -> np.ndarray:
    """Resample a volume (z, y, x) or channels-first stack (C, z, y, x) from one voxel grid to
    another: "linear" (1) for images and probabilities, "nearest" (0) for label maps.

    Points outside the source grid take the nearest source voxel (fill_values=None) or a fixed
    value per channel (e.g. (1, 0, 0) to make un-cropped borders background). Grids that differ
    by a whole-voxel shift (a crop) are copied exactly without interpolation."""
    if order not in _ORDERS:
        raise ConfigError(f"resampling order must be 'linear' or 'nearest', got {order!r}")
    linear = _ORDERS[order]
    array = np.asarray(array)
    has_channels = array.ndim == 4
    if array.ndim not in (3, 4) or array.shape[-3:] != from_geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match the source grid "
                         f"{from_geometry.shape} (z,y,x), optionally with a leading channel axis")
    stack = array if has_channels else array[None]
    fills = (list(fill_values) if isinstance(fill_values, (list, tuple, np.ndarray))
             else [fill_values] * stack.shape[0])
    if len(fills) != stack.shape[0]:
        raise ValueError(f"{len(fills)} fill values for {stack.shape[0]} channels")
    offset = _integer_offset(from_geometry, to_geometry)
    if offset is not None:
        out = [_shift_volume(channel, offset, to_geometry.shape, fill)
               for channel, fill in zip(stack, fills)]
    else:
        out = [_sitk_resample(np.ascontiguousarray(channel, dtype=np.float32 if linear else channel.dtype),
                              from_geometry, to_geometry, linear, fill)
               for channel, fill in zip(stack, fills)]
    result = np.stack(out) if has_channels else out[0]
    return result.astype(np.float32, copy=False) if linear else result.astype(array.dtype, copy=False)


def resample_labels(labels: np.ndarray, from_geometry: Geometry, to_geometry: Geometry,
                    method: str = "nearest") -> np.ndarray:
    """A label map (z, y, x) on another grid. "nearest": nearest neighbour. "linear": every label
    value present is interpolated as a 0/1 indicator and each voxel takes the value with the largest
    share; a tie between background (0) and a structure goes to the structure, a tie between
    structures to the lower value. Unlike nearest neighbour, it has no preferred side where target
    voxels fall halfway between source voxels."""
    _check_label_resampling(method)
    labels = np.asarray(labels)
    if method == "nearest" or _integer_offset(from_geometry, to_geometry) is not None:
        return resample_to_geometry(labels, from_geometry, to_geometry, "nearest")
    values = np.unique(labels)
    order = np.concatenate([values[values != 0], values[values == 0]])  # background last: loses ties
    if order.size == 1:
        return np.full(to_geometry.shape, order[0], dtype=labels.dtype)
    shares = np.stack([resample_to_geometry((labels == v).astype(np.float32), from_geometry, to_geometry, "linear")
                       for v in order])
    return order[np.argmax(shares, axis=0)].astype(labels.dtype, copy=False)


# ----------------------------------------------------------------------------------- grid change

def foreground_box(image: np.ndarray, geometry: Geometry, margin_mm: float):
    """(start, stop) numpy-order index box of voxels above the image minimum, widened by
    `margin_mm` on each side and clipped to the volume; None when the image is constant."""
    mask = image > image.min()
    if not mask.any():
        return None
    starts, stops = [], []
    spacing_zyx = tuple(reversed(geometry.spacing))
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        margin = int(math.ceil(margin_mm / spacing_zyx[axis]))
        starts.append(max(0, int(present[0]) - margin))
        stops.append(min(image.shape[axis], int(present[-1]) + 1 + margin))
    return tuple(starts), tuple(stops)


def crop_geometry(geometry: Geometry, start_zyx, stop_zyx) -> Geometry:
    """The grid of `volume[start:stop]`: same spacing/direction, origin moved to the box corner."""
    start_xyz = tuple(reversed(tuple(start_zyx)))
    size = tuple(int(b) - int(a) for a, b in zip(reversed(tuple(start_zyx)), reversed(tuple(stop_zyx))))
    origin = geometry.index_to_physical(start_xyz)
    return Geometry(size, geometry.spacing, tuple(origin), geometry.direction)


def respace_geometry(geometry: Geometry, target_spacing) -> Geometry:
    """A grid covering the same box (first voxel corner kept) with `target_spacing` (x, y, z);
    None entries keep that axis' spacing."""
    if target_spacing is None:
        return geometry
    new_spacing = tuple(old if new is None else float(new) for old, new in zip(geometry.spacing, target_spacing))
    if np.allclose(new_spacing, geometry.spacing, rtol=1e-9, atol=0):
        return geometry
    extent = np.asarray(geometry.size) * np.asarray(geometry.spacing)
    size = tuple(max(1, int(round(e / s))) for e, s in zip(extent, new_spacing))
    half_step = (np.asarray(new_spacing) - np.asarray(geometry.spacing)) / 2.0
    origin = np.asarray(geometry.origin) + geometry.direction_matrix @ half_step
    return Geometry(size, new_spacing, tuple(origin), geometry.direction)


class Preprocessor:
    """Applies a `PreprocessConfig` to images (linear) and labels (`config.label_resampling`)."""

    def __init__(self, config: PreprocessConfig | None = None):
        self.config = config or PreprocessConfig()
        self._normalize = NORMALIZATIONS.get(self.config.normalization)

    def target_geometry(self, image: np.ndarray, geometry: Geometry) -> Geometry:
        """The grid the image is brought to: optional foreground crop, then respacing."""
        grid = geometry
        if self.config.crop_foreground:
            box = foreground_box(image, geometry, float(self.config.crop_margin_mm))
            if box is not None:
                grid = crop_geometry(geometry, *box)
        return respace_geometry(grid, self.config.target_spacing)

    def image(self, array: np.ndarray, geometry: Geometry) -> tuple:
        """(normalised float32 array on the target grid, target Geometry)."""
        target = self.target_geometry(array, geometry)
        moved = array if target == geometry else resample_to_geometry(array, geometry, target, "linear")
        return self._normalize(np.asarray(moved, dtype=np.float32), self.config), target

    def label(self, array: np.ndarray, geometry: Geometry, target: Geometry | None = None) -> tuple:
        """(uint8 label on the target grid, target Geometry). Pass the Geometry returned by
        `image()` as `target` so both share one grid; it is required with foreground cropping."""
        if target is None:
            if self.config.crop_foreground:
                raise ValueError("with crop_foreground the label needs the image's target geometry")
            target = respace_geometry(geometry, self.config.target_spacing)
        moved = array if target == geometry else resample_labels(array, geometry, target,
                                                                 self.config.label_resampling)
        return np.asarray(moved, dtype=np.uint8), target

    def case(self, image: np.ndarray, label: np.ndarray | None, geometry: Geometry) -> tuple:
        """(image, label or None, target Geometry) for one case on one grid."""
        image_out, target = self.image(image, geometry)
        label_out = None if label is None else self.label(label, geometry, target)[0]
        return image_out, label_out, target
