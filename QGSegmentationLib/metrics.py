"""Segmentation metrics per class on label maps: Dice, IoU, HD95 and ASD (mm), numpy/scipy only.

Conventions (also in the README):

- Inputs are integer label maps in numpy order (`(z, y, x)` for 3D, `(y, x)` for 2D) and the
  voxel spacing in the *same* order, `spacing_zyx` (reverse a SimpleITK `GetSpacing()`).
- Class `c` is the binary mask `labels == c`; classes are >= 1 (0 is background). The case
  "mean" is the unweighted mean over the requested foreground classes.
- Surfaces are the mask voxels removed by one binary erosion (face connectivity; voxels on the
  image border count as surface). Distances are Euclidean, in mm, from
  `scipy.ndimage.distance_transform_edt(sampling=spacing_zyx)`.
- HD95 is the 95th percentile of the pooled surface distances in both directions (as medpy's
  `hd95`); ASD is the average symmetric surface distance: the mean of the two directed mean
  surface distances (as medpy's `assd`).
- Both masks empty: Dice 1, IoU 1, HD95 0, ASD 0 (a correct "absent" prediction).
- Exactly one mask empty: Dice 0, IoU 0, HD95 = ASD = the image diagonal in mm
  (sqrt(sum((n_i * spacing_i)^2))), a finite worst case, and `failure = True` so summaries can
  count such cases. Nothing is ever NaN and no case is silently dropped.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Sequence

import numpy as np

from .errors import ConfigError, DataError

METRICS = ("dice", "iou", "hd95", "asd")


def _validate(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float] | None = None):
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise DataError(f"pred shape {pred.shape} differs from ref shape {ref.shape}")
    if pred.ndim not in (2, 3):
        raise DataError(f"label maps must be 2D or 3D, got shape {pred.shape}")
    if spacing_zyx is None:
        return pred, ref, None
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != pred.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ConfigError(f"spacing_zyx {list(spacing_zyx)} must be {pred.ndim} positive numbers "
                         f"in numpy (z, y, x) order")
    return pred, ref, spacing


def _masks(pred, ref, c: int):
    c = int(c)
    if c < 1:
        raise ConfigError(f"class {c}: metrics are defined for foreground classes >= 1")
    return pred == c, ref == c


def image_diagonal_mm(shape: Sequence[int], spacing_zyx: Sequence[float]) -> float:
    """Length of the image's diagonal in mm: the worst-case distance used when one mask is empty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_zyx))))


def dice(pred: np.ndarray, ref: np.ndarray, c: int) -> float:
    """Dice overlap of class `c`: 2|P∩R| / (|P|+|R|); 1 when both are empty."""
    pred, ref, _ = _validate(pred, ref)
    p, r = _masks(pred, ref, c)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / total


def iou(pred: np.ndarray, ref: np.ndarray, c: int) -> float:
    """Intersection over union (Jaccard) of class `c`; 1 when both are empty."""
    pred, ref, _ = _validate(pred, ref)
    p, r = _masks(pred, ref, c)
    union = int(np.logical_or(p, r).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, r).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def _crop_to_union(p: np.ndarray, r: np.ndarray):
    """Crop both masks to the bounding box of their union plus a one-voxel margin.

    Exact for surface distances: every surface voxel lies inside the box, erosion sees the same
    neighbourhood (the margin, or the true image border), and Euclidean distances do not depend
    on the voxels in between."""
    coords = np.argwhere(p | r)
    lo = np.maximum(coords.min(0) - 1, 0)
    hi = np.minimum(coords.max(0) + 2, p.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return p[box], r[box]


def surface_distances(pred: np.ndarray, ref: np.ndarray, c: int,
                      spacing_zyx: Sequence[float]) -> Dict[str, Any]:
    """HD95 and ASD of class `c` in mm with the empty-mask conventions of this module.

    Returns {"hd95", "asd", "failure"}; `failure` is True when exactly one mask is empty."""
    from scipy import ndimage

    pred, ref, spacing = _validate(pred, ref, spacing_zyx)
    p, r = _masks(pred, ref, c)
    p_empty, r_empty = not p.any(), not r.any()
    if p_empty and r_empty:
        return {"hd95": 0.0, "asd": 0.0, "failure": False}
    if p_empty or r_empty:
        worst = image_diagonal_mm(pred.shape, spacing)
        return {"hd95": worst, "asd": worst, "failure": True}
    p, r = _crop_to_union(p, r)
    p_surface, r_surface = _surface(p), _surface(r)
    to_ref = ndimage.distance_transform_edt(~r_surface, sampling=spacing)[p_surface]
    to_pred = ndimage.distance_transform_edt(~p_surface, sampling=spacing)[r_surface]
    hd95 = float(np.percentile(np.concatenate([to_ref, to_pred]), 95))
    asd = float((to_ref.mean() + to_pred.mean()) / 2.0)
    return {"hd95": hd95, "asd": asd, "failure": False}


def hd95(pred: np.ndarray, ref: np.ndarray, c: int, spacing_zyx: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance of class `c` in mm (see module conventions)."""
    return surface_distances(pred, ref, c, spacing_zyx)["hd95"]


def asd(pred: np.ndarray, ref: np.ndarray, c: int, spacing_zyx: Sequence[float]) -> float:
    """Average symmetric surface distance of class `c` in mm (see module conventions)."""
    return surface_distances(pred, ref, c, spacing_zyx)["asd"]


def _classes(classes: int | Iterable[int]) -> List[int]:
    if isinstance(classes, (int, np.integer)):
        if classes < 2:
            raise ConfigError(f"n_classes must be >= 2 (background + one class), got {classes}")
        return list(range(1, int(classes)))
    out = [int(c) for c in classes]
    if not out or min(out) < 1:
        raise ConfigError(f"classes {out} must be a non-empty list of foreground classes >= 1")
    return out


def evaluate_case(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float],
                  classes: int | Iterable[int]) -> Dict[str, Any]:
    """All metrics of one case as a flat dict (ready for a CSV row).

    `classes` is n_classes (evaluates 1..n_classes-1) or a list of foreground classes.
    Keys: `dice_<c>`, `iou_<c>`, `hd95_<c>`, `asd_<c>`, `failure_<c>` per class; `dice`, `iou`,
    `hd95`, `asd` = mean over the classes; `failures` = number of classes with a failure."""
    pred, ref, spacing = _validate(pred, ref, spacing_zyx)
    row: Dict[str, Any] = {}
    per_metric: Dict[str, List[float]] = {m: [] for m in METRICS}
    failures = 0
    for c in _classes(classes):
        values = {"dice": dice(pred, ref, c), "iou": iou(pred, ref, c)}
        surface = surface_distances(pred, ref, c, spacing)
        values.update(hd95=surface["hd95"], asd=surface["asd"])
        for metric in METRICS:
            row[f"{metric}_{c}"] = float(values[metric])
            per_metric[metric].append(float(values[metric]))
        row[f"failure_{c}"] = bool(surface["failure"])
        failures += int(surface["failure"])
    for metric in METRICS:
        row[metric] = float(np.mean(per_metric[metric]))
    row["failures"] = failures
    return row


def summarise(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean, std (population) and median of every metric over the case rows of `evaluate_case`.

    Returns {"cases": n, "failures": total failures, "<metric>": {"mean", "std", "median"}, ...}
    for every numeric metric key (`dice`, `dice_1`, ...); other keys (ids, flags) are ignored."""
    rows = list(rows)
    summary: Dict[str, Any] = {"cases": len(rows),
                               "failures": int(sum(int(r.get("failures", 0)) for r in rows))}
    keys = [k for k in (rows[0] if rows else {})
            if k != "failures" and not k.startswith("failure_")
            and isinstance(rows[0][k], (int, float, np.floating, np.integer))
            and not isinstance(rows[0][k], bool)]
    for key in keys:
        values = np.asarray([float(r[key]) for r in rows if key in r], dtype=np.float64)
        summary[key] = {"mean": float(values.mean()), "std": float(values.std()),
                        "median": float(np.median(values))}
    return summary
