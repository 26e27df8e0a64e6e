"""Automatic choice of the resampling spacing and the patch size from a dataset's file headers.

`--spacing auto --patch auto` (the defaults of `qgseg train` and of the Slicer panel) plan like
nnU-Net does, from a *fingerprint* of the labeled cases (each file's size and spacing, read from
its header, nothing decoded), with budgets that depend on where training runs:

1. **Spacing.** Start from the median spacing of each axis. If the median volume would hold more
   than four patches' worth of voxels at that spacing (so that a patch would see too little of
   the anatomy to learn its shape), raise the finest axes to a common
   floor ``c`` (coarser axes keep their own spacing, so anisotropic data is coarsened in plane
   first) with ``c`` the smallest value that fits the budget, rounded up to a round number
   (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times a power of ten). In 2D mode only the in-plane
   axes count and are coarsened.
2. **Patch.** Start from the median volume's shape at that spacing, each axis rounded up to a
   multiple of 16 (what a UNet with four poolings divides); while the patch holds more voxels
   than the device's patch budget, take 16 voxels off the axis that spans the most millimetres.
   Patches therefore cover about the same physical length on every axis.

The CPU patch budget is the patch of the configuration measured on the left-atrium data in
BENCHMARKS.md §1 (32x64x64 = 131 072 voxels, ~0.2 s a step on 2 cores); on LA's cropped
0.625 mm volumes the rule then picks that configuration's 1.25 mm. The GPU patch budget is
128^3 voxels, the size of nnU-Net's full-resolution patches on a 10 GB GPU.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, DataError
from .io import Geometry, read_geometry

#: Where a training run keeps the plan it used (so that a resumed run keeps it too).
PLAN_FILE = "plan.json"
#: Patch axes are multiples of this (2 ** number of poolings of the default networks).
PATCH_DIVISOR = 16
_ROUND_STEPS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


@dataclass(frozen=True)
class PlanBudget:
    """Largest median volume (voxels; pixels of a slice in 2D) and largest patch a plan allows."""

    volume_voxels: int
    patch_voxels: int


#: (mode, device type) -> budget. Devices other than CUDA plan as the CPU.
BUDGETS: Dict[Tuple[str, str], PlanBudget] = {
    ("3d", "cpu"): PlanBudget(volume_voxels=4 * 32 * 64 * 64, patch_voxels=32 * 64 * 64),
    ("3d", "cuda"): PlanBudget(volume_voxels=4 * 128 ** 3, patch_voxels=128 ** 3),
    ("2d", "cpu"): PlanBudget(volume_voxels=4 * 256 ** 2, patch_voxels=256 ** 2),
    ("2d", "cuda"): PlanBudget(volume_voxels=4 * 512 ** 2, patch_voxels=512 ** 2),
}


@dataclass(frozen=True)
class Fingerprint:
    """Sizes and spacings, (x, y, z) each, of the cases a plan is made from."""

    sizes: Tuple[Tuple[int, int, int], ...]
    spacings: Tuple[Tuple[float, float, float], ...]

    @property
    def median_spacing(self) -> Tuple[float, ...]:
        return tuple(float(v) for v in np.median(np.asarray(self.spacings), axis=0))

    @property
    def median_extent_mm(self) -> Tuple[float, ...]:
        """Median physical length of each axis (x, y, z), mm."""
        return tuple(float(v) for v in np.median(np.asarray(self.sizes) * np.asarray(self.spacings), axis=0))

    def summary(self) -> Dict[str, list]:
        sizes, spacings = np.asarray(self.sizes), np.asarray(self.spacings)
        return {"cases": len(self.sizes),
                "size_min": sizes.min(0).tolist(), "size_median": np.median(sizes, 0).tolist(),
                "size_max": sizes.max(0).tolist(),
                "spacing_min": spacings.min(0).tolist(), "spacing_median": list(self.median_spacing),
                "spacing_max": spacings.max(0).tolist()}


@dataclass(frozen=True)
class Plan:
    """The chosen spacing (x, y, z mm) and patch (z y x in 3D, y x in 2D), and how they came about."""

    mode: str
    device: str
    target_spacing: Tuple[float, float, float]
    patch_size: Tuple[int, ...]
    median_shape: Tuple[int, ...]      # the median volume at target_spacing, z y x
    fingerprint: Dict[str, list]
    budget: Dict[str, int]

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict) -> "Plan":
        data = dict(data)
        for key in ("target_spacing", "patch_size", "median_shape"):
            data[key] = tuple(data[key])
        return cls(**data)

    def flags(self) -> List[str]:
        """The command-line flags that fix this plan, e.g. for another run."""
        return (["--spacing", *[_short(s) for s in self.target_spacing], "--patch", *map(str, self.patch_size)])


def read_plan(run_dir: str | os.PathLike) -> Optional[Plan]:
    """The plan a run folder holds, None when it holds none; DataError for a damaged file."""
    path = Path(run_dir) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        missing = [f.name for f in fields(Plan) if f.name not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return Plan.from_dict({f.name: data[f.name] for f in fields(Plan)})
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a plan written by qgseg ({exc}); delete it to plan again") from None


def _short(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


def fingerprint_of(paths: Iterable, what: str = "image") -> Fingerprint:
    """Read the header (size, spacing) of every file; DataError names an unreadable one."""
    geometries: List[Geometry] = [read_geometry(p, what) for p in paths]
    if not geometries:
        raise DataError("cannot plan spacing and patch size: no labeled cases")
    return Fingerprint(tuple(g.size for g in geometries), tuple(g.spacing for g in geometries))


def round_up(value: float) -> float:
    """The smallest round number (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times 10^k) >= value."""
    scale = 10.0 ** math.floor(math.log10(value))
    return next(step * scale for step in _ROUND_STEPS if step * scale >= value * (1 - 1e-9))


def plan_spacing(median_spacing: Sequence[float], extent_mm: Sequence[float], budget_voxels: int,
                 axes: Sequence[int] = (0, 1, 2)) -> Tuple[float, float, float]:
    """Median spacing, or the finest `axes` raised to a round common floor so that the median
    volume (its `axes` only) fits `budget_voxels`. Inputs and result in (x, y, z) order."""

    def voxels(floor: float) -> float:
        return float(np.prod([extent_mm[a] / max(floor, median_spacing[a]) for a in axes]))

    finest = min(median_spacing[a] for a in axes)
    if voxels(finest) <= budget_voxels:
        return tuple(float(s) for s in median_spacing)
    low, high = finest, finest
    while voxels(high) > budget_voxels:
        high *= 2.0
    for _ in range(60):
        middle = (low + high) / 2.0
        low, high = (low, middle) if voxels(middle) <= budget_voxels else (middle, high)
    floor = round_up(high)
    return tuple(max(floor, s) if a in axes else float(s) for a, s in enumerate(median_spacing))


def plan_patch(shape_zyx: Sequence[int], spacing_zyx: Sequence[float], budget_voxels: int) -> Tuple[int, ...]:
    """The median shape rounded up to multiples of 16, shrunk 16 voxels at a time along the axis
    spanning the most millimetres until it fits `budget_voxels`."""
    patch = [max(PATCH_DIVISOR, math.ceil(n / PATCH_DIVISOR) * PATCH_DIVISOR) for n in shape_zyx]
    while int(np.prod(patch)) > budget_voxels:
        shrinkable = [i for i, p in enumerate(patch) if p > PATCH_DIVISOR]
        if not shrinkable:
            break
        longest = max(shrinkable, key=lambda i: (patch[i] * spacing_zyx[i], i))
        patch[longest] -= PATCH_DIVISOR
    return tuple(patch)


def make_plan(fingerprint: Fingerprint, mode: str = "3d", device: str = "cpu", spacing="auto") -> Plan:
    """Spacing and patch for `mode` ("3d" or "2d") training on `device` ("cuda" or anything else:
    CPU). A `spacing` the user chose (x, y z mm; None keeps each volume's grid, taken as the
    median) is kept, and only the patch is planned for it."""
    if mode not in ("2d", "3d"):
        raise ConfigError(f"mode must be 2d or 3d, not {mode!r}")
    device = "cuda" if device == "cuda" else "cpu"
    budget = BUDGETS[(mode, device)]
    axes = (0, 1, 2) if mode == "3d" else (0, 1)
    extent = fingerprint.median_extent_mm
    if spacing == "auto":
        spacing = plan_spacing(fingerprint.median_spacing, extent, budget.volume_voxels, axes)
    spacing = tuple(float(s) for s in (fingerprint.median_spacing if spacing is None else spacing))
    shape_zyx = tuple(max(1, int(round(e / s))) for e, s in zip(reversed(extent), reversed(spacing)))
    spacing_zyx = tuple(reversed(spacing))
    if mode == "3d":
        patch = plan_patch(shape_zyx, spacing_zyx, budget.patch_voxels)
    else:
        patch = plan_patch(shape_zyx[1:], spacing_zyx[1:], budget.patch_voxels)
    return Plan(mode=mode, device=device, target_spacing=spacing, patch_size=patch, median_shape=shape_zyx,
                fingerprint=fingerprint.summary(), budget=asdict(budget))


def plan_for_cases(cases: Iterable, mode: str = "3d", device: str = "cpu", spacing="auto") -> Plan:
    """The plan for a list of `CaseRef`s (their images' headers); see `make_plan`."""
    return make_plan(fingerprint_of([case.image for case in cases]), mode, device, spacing)


def plan_for_spec(spec, mode: str = "3d", device: str = "cpu", spacing="auto") -> Plan:
    """The plan for a `DatasetSpec`'s labeled cases (training and validation); see `make_plan`."""
    return plan_for_cases(list(spec.training) + list(spec.validation), mode, device, spacing)


def plan_for_dataset(dataset: str | os.PathLike, mode: str = "3d", device: str = "cpu") -> Plan:
    """The plan for a dataset.json's (or split.json's) labeled cases."""
    from .dataset import load_dataset

    return plan_for_spec(load_dataset(dataset), mode, device)


def spacing_text(spacing: Sequence[float]) -> str:
    """(1.25, 1.25, 1.25) -> "1.25 x 1.25 x 1.25" (mm, x y z)."""
    return " x ".join(f"{float(s):g}" for s in spacing)


def patch_text(patch: Sequence[int]) -> str:
    """(48, 48, 48) -> "48x48x48"."""
    return "x".join(str(int(p)) for p in patch)


def describe_plan(plan: Plan) -> List[str]:
    """Human-readable lines: what the data looks like and what was chosen."""
    fp = plan.fingerprint
    axes = "z y x" if plan.mode == "3d" else "y x"
    return [
        f"{fp['cases']} labeled cases; median size {_xyz(fp['size_median'], 1)} voxels (x y z) at "
        f"{_xyz(fp['spacing_median'])} mm (spacing from {_xyz(fp['spacing_min'])} to {_xyz(fp['spacing_max'])})",
        f"{plan.mode} training on {plan.device}: resample to {_xyz(plan.target_spacing)} mm "
        f"(median volume {patch_text(plan.median_shape)} voxels, z y x; budget "
        f"{plan.budget['volume_voxels']:,} {'voxels' if plan.mode == '3d' else 'pixels a slice'})",
        f"patch {patch_text(plan.patch_size)} ({axes}; budget {plan.budget['patch_voxels']:,} "
        f"{'voxels' if plan.mode == '3d' else 'pixels'})",
    ]


def _xyz(values, digits: int = 3) -> str:
    return " x ".join(f"{float(v):.{digits}f}".rstrip("0").rstrip(".") for v in values)
