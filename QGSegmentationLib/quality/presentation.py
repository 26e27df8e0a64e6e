"""How an image and a candidate mask are shown to the quality predictor g.

g works on a fixed grid (48^3 in 3D, 128^2 in 2D by default). Two presentations map inputs onto it:

**Whole volumes (`present`)** - used by `qgseg quality score`, by evaluation, and for most training
samples. At scoring time there is no reference, so the only place to look is the candidate mask
itself: g sees the bounding box of the candidate's foreground (union over classes) grown by a
margin of 25% of the box size on each side (at least 10 mm, so a tiny mask still shows its
surroundings), clamped to the volume, then resized to the grid. An empty candidate has no box:
g then sees the whole volume, the only way to judge whether a structure was missed. Cropping
to the candidate rather than showing the whole volume keeps the structure large on the grid, and
avoids a trap of datasets such as LA whose volumes were cropped around the reference label: there
the position of the structure inside the volume would tell g where the reference is, a cue that
vanishes on differently cropped data. With the mask-box crop, the volume border plays no role
unless the mask reaches it.

**Training patches (`present_patch`)** - used by semi-supervised training (QAR, QW), where g
judges a segmenter's output on a training patch. The whole patch is resized to the grid. Both
steps are differentiable in the mask, so QAR's gradient flows through g into the segmenter.

Resizing: an axis longer than the grid is first reduced by adaptive average pooling (area
averaging: anti-aliased, differentiable), then every axis is (tri/bi)linearly interpolated to the
grid. Soft masks and hard masks take the same path, so a hard mask arrives with soft
partial-volume edges exactly like a probability map; g is trained on hard masks presented this
way, which keeps training and the soft-mask use at QAR time on the same footing. The image is
standardised after resizing (clip to its 0.5/99.5 percentiles, zero mean, unit variance), so g
does not depend on the dataset's intensity scale or on the preprocessing applied before it.

Mix during training: g is trained on both presentations - by default 70% of the samples are
mask-box crops of the whole volume and 30% are random sub-volumes ("patches", 40-100% of each
axis, centred near the reference) shown whole, with the Dice target computed inside the patch -
so one predictor serves scoring and semi-supervised guidance alike (`QualityTrainConfig.p_patch`).

Spacing arguments are in numpy axis order ((z, y, x) for volumes): `Geometry.spacing[::-1]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

MARGIN_FRACTION = 0.25
MIN_MARGIN_MM = 10.0
MIN_BOX_VOXELS = 8
CLIP_PERCENTILES = (0.005, 0.995)
_MAX_STAT_SAMPLES = 65536


def crop_box(mask_union: np.ndarray, spacing: Sequence[float] | None = None,
             margin_fraction: float = MARGIN_FRACTION, min_margin_mm: float = MIN_MARGIN_MM,
             min_size: int = MIN_BOX_VOXELS) -> Tuple[slice, ...]:
    """Bounding box of `mask_union` (bool, any ndim) grown by `margin_fraction` of its extent per
    side (at least `min_margin_mm`, converted with `spacing`), at least `min_size` voxels wide,
    clamped to the array. An empty mask gives the whole array."""
    mask_union = np.asarray(mask_union)
    shape = mask_union.shape
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * len(shape)))
    if len(spacing) != len(shape):
        raise ValueError(f"spacing {spacing} does not match a mask of {len(shape)} dimensions")
    box = []
    for axis, size in enumerate(shape):
        others = tuple(a for a in range(len(shape)) if a != axis)
        hits = np.flatnonzero(mask_union.any(axis=others) if others else mask_union)
        if hits.size == 0:
            return tuple(slice(0, s) for s in shape)
        lo, hi = int(hits[0]), int(hits[-1]) + 1
        margin = max(margin_fraction * (hi - lo), min_margin_mm / max(spacing[axis], 1e-6))
        start, stop = math.floor(lo - margin), math.ceil(hi + margin)
        if stop - start < min_size:
            grow = min_size - (stop - start)
            start, stop = start - grow // 2, stop + grow - grow // 2
        box.append(slice(max(start, 0), min(stop, size)))
    return tuple(box)


def resize_to_grid(x, grid: Sequence[int]):
    """Resize a (B, C, *spatial) float tensor to `grid`: area pooling on axes longer than the
    grid, then linear interpolation. Differentiable."""
    import torch.nn.functional as F

    grid = tuple(int(g) for g in grid)
    size = tuple(x.shape[2:])
    if len(size) != len(grid):
        raise ValueError(f"cannot resize spatial shape {size} to a {len(grid)}D grid {grid}")
    if not x.is_floating_point():
        x = x.float()
    reduced = tuple(min(s, g) for s, g in zip(size, grid))
    if reduced != size:
        pool = F.adaptive_avg_pool3d if len(grid) == 3 else F.adaptive_avg_pool2d
        x = pool(x, reduced)
    if reduced != grid:
        x = F.interpolate(x, size=grid, mode="trilinear" if len(grid) == 3 else "bilinear",
                          align_corners=False)
    return x


def standardize_image(x):
    """Per-sample robust z-score of a (B, 1, *spatial) tensor: clip to the 0.5/99.5 percentiles
    (estimated on at most 65k voxels), then zero mean, unit variance (constant images -> 0)."""
    import torch

    x = x.float()
    flat = x.detach().flatten(1)
    step = max(1, flat.shape[1] // _MAX_STAT_SAMPLES)
    sample = flat[:, ::step]
    q = percentiles(sample, CLIP_PERCENTILES)  # (2, B)
    view = (-1,) + (1,) * (x.ndim - 1)
    lo, hi = q[0].view(view), q[1].view(view)
    clipped = torch.maximum(torch.minimum(x, hi), lo)
    mean = clipped.flatten(1).mean(1).view(view)
    std = clipped.flatten(1).std(1, unbiased=False).view(view)
    return (clipped - mean) / torch.clamp(std, min=1e-6) * (std > 1e-6)


def percentiles(sample, fractions: Sequence[float]):
    """`torch.quantile(sample, fractions, dim=1)` (linear interpolation), bit for bit, for
    fractions near 0 or 1: each needs only the few order statistics at one end of the row, which
    `topk` finds without sorting the whole row (6-7x faster on g's 48^3 grid; QAR and QW
    standardise every training patch, so this is on the guided step's path). Ranks are computed on
    the host, so nothing waits for the GPU; a row holding NaN gives NaN, as torch.quantile's does."""
    import torch

    n = sample.shape[1]
    ranks = torch.tensor(fractions, dtype=sample.dtype) * (n - 1)  # in the sample's dtype, as torch.quantile
    out = []
    for rank in ranks:
        lo, hi = int(rank), int(torch.ceil(rank))
        if lo < n // 2:  # the hi + 1 smallest values, ascending
            ends = sample.topk(hi + 1, dim=1, largest=False, sorted=True).values
            a, b = ends[:, lo], ends[:, hi]
        else:  # the n - lo largest values, descending
            ends = sample.topk(n - lo, dim=1, largest=True, sorted=True).values
            a, b = ends[:, n - 1 - lo], ends[:, n - 1 - hi]
        out.append(torch.lerp(a, b, (rank - lo).to(sample.device).expand_as(a)))
    result = torch.stack(out)
    return torch.where(torch.isnan(sample).any(dim=1), torch.nan, result)


@dataclass
class Presented:
    """What g sees: image (1, 1, *grid), mask (1, K, *grid), and the crop used (slices)."""

    image: "object"
    mask: "object"
    box: Tuple[slice, ...]


def _as_tensor(array):
    import torch

    if isinstance(array, torch.Tensor):
        return array
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def mask_union(mask) -> np.ndarray:
    """Foreground of any class of a (K, *spatial) mask (hard or soft; soft thresholded at 0.5)."""
    import torch

    if isinstance(mask, torch.Tensor):
        return (mask.detach() > 0.5).any(0).cpu().numpy()
    mask = np.asarray(mask)
    return (mask > 0.5).any(0) if mask.dtype != bool else mask.any(0)


def present(image, mask, spacing: Sequence[float] | None = None, grid: Sequence[int] = (48, 48, 48),
            margin_fraction: float = MARGIN_FRACTION, min_margin_mm: float = MIN_MARGIN_MM,
            box: Tuple[slice, ...] | None = None) -> Presented:
    """Crop a whole volume (or slice) and its candidate mask around the mask and resize to `grid`.

    image: (*spatial) array/tensor; mask: (K, *spatial) one-hot/probabilities (a tensor that
    requires grad keeps its gradient); `box` overrides the crop (e.g. a training patch)."""
    import torch

    image_t, mask_t = _as_tensor(image), _as_tensor(mask)
    if tuple(image_t.shape) != tuple(mask_t.shape[1:]):
        raise ValueError(f"image shape {tuple(image_t.shape)} and mask shape {tuple(mask_t.shape)} "
                         "do not match (mask must be (K, *image.shape))")
    if box is None:
        box = crop_box(mask_union(mask_t), spacing, margin_fraction, min_margin_mm)
    image_c = image_t[box][None, None]
    mask_c = mask_t[(slice(None),) + tuple(box)][None]
    with torch.no_grad():
        image_g = standardize_image(resize_to_grid(image_c, grid))
    return Presented(image_g, resize_to_grid(mask_c.float(), grid), tuple(box))


def present_patch(image, probs, grid: Sequence[int]):
    """(image (B,1,*sp), probs (B,K,*sp)) -> both resized to `grid`, image standardised.
    The whole patch is shown; differentiable in `probs`."""
    return present_patch_image(image, grid), resize_to_grid(probs, grid)


def present_patch_image(image, grid: Sequence[int]):
    """The image half of `present_patch`: (B, 1, *sp) resized to `grid` and standardised, without
    gradient."""
    import torch

    with torch.no_grad():
        return standardize_image(resize_to_grid(image, grid))


def foreground_channels(probs):
    """Drop the background channel of an (B, n_classes, ...) softmax output -> (B, K, ...)."""
    return probs[:, 1:]


def label_to_channels(label, n_classes: int):
    """One-hot foreground channels (K = n_classes - 1, *spatial) float32 of an integer label map
    (numpy in -> numpy out, tensor in -> tensor out)."""
    import torch

    if isinstance(label, torch.Tensor):
        return torch.stack([(label == c) for c in range(1, n_classes)]).float()
    label = np.asarray(label)
    return np.stack([(label == c) for c in range(1, n_classes)]).astype(np.float32)
