"""Mask corruptions for variable-quality masks (methods.md 1.2), one file per family.

`CORRUPTIONS` maps a name to a callable instance

    CORRUPTIONS.get("erosion")(mask, rng, spacing=None, severity="moderate") -> new bool mask

Tags: the family ("morphology", "shape", "boundary", "structural", "geometric", "blob",
"catastrophic"), the severities the operation has ("moderate", "heavy", "catastrophic") and
"chain-allowed" for moderate non-blob operations that may be chained. The scaling of the paper's
224 x 224 pixel parameters to any array and voxel spacing is described in `base.py`.
Label maps: `corrupt_labelmap` corrupts every foreground class independently.
"""

from __future__ import annotations

from .base import (CORRUPTIONS, PAPER_SIZE, SEVERITIES, Corruption, Grid, as_bool_mask,
                   corrupt_labelmap, corruption_names, register_corruption)
from . import morphology, shape, boundary, structural, geometric, blob, catastrophic  # noqa: F401  (registers)

FAMILIES = ("morphology", "shape", "boundary", "structural", "geometric", "blob", "catastrophic")

__all__ = [
    "CORRUPTIONS", "FAMILIES", "PAPER_SIZE", "SEVERITIES", "Corruption", "Grid", "as_bool_mask",
    "corrupt_labelmap", "corruption_names", "register_corruption",
]
