"""A second opinion on a mask: its Dice against another segmenter's mask of the same image.

When a second segmenter is good and its mistakes are not the mask's mistakes, the Dice between
the two masks tracks the mask's Dice against the (unknown) reference: where they agree, both are
probably right; where they part, at least one is wrong. It needs no training beyond the second
segmenter, and it sees the masks at full resolution, where g sees a coarse grid. It cannot see a
mistake both segmenters make (the same unusual image fools both), and it reads low when the
second segmenter is the one that failed, so it complements g rather than replacing it.
BENCHMARKS.md section 6 compares the two on 60 held-out LA volumes.

Second-opinion masks are `<case>.nrrd` label maps on the image's own grid, as `qgseg predict`
writes them (`<case>` = the image's case id), or NIfTI/MHA ones (`data.io.find_case_file`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError

SECOND_OPINION_COLUMN = "second_opinion_dice"
DEFAULT_CACHE_BYTES = 1 << 30


class SecondOpinion:
    """A folder of another segmenter's masks, looked up by case id.

    `agreement(case, mask, n_foreground, source)` reads the case's mask in `folder` and returns the
    per-class Dice between it and `mask`; a missing file or a different grid is a DataError naming
    both files.

    Masks already read are kept, so that evaluating several segmenters' masks of the same cases
    reads each second-opinion file once; the least recently used ones are dropped when the kept
    masks exceed `cache_bytes` (1 GiB: every mask of a few hundred LA-sized volumes)."""

    def __init__(self, folder: str | os.PathLike, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.folder = Path(folder)
        self.cache_bytes = cache_bytes
        self._read: OrderedDict = OrderedDict()  # case -> (mask, geometry), most recently used last
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: second-opinion folder not found",
                            hint="segment the same images with another model, e.g. "
                                 "`qgseg predict --checkpoint other.pt ... --output DIR`")

    def path_for(self, case: str) -> Path:
        """The case's mask in the folder (`data.io.find_case_file`), or the `.nrrd` name it lacks."""
        from ..data.io import find_case_file

        return find_case_file(self.folder, case) or self.folder / f"{case}.nrrd"

    def mask_for(self, case: str, shape: Sequence[int], source: str | os.PathLike, geometry=None) -> np.ndarray:
        """The second opinion of `case`, checked against the shape (and geometry, when given) of
        the mask it will be compared with (`source` names that mask in errors)."""
        from ..data.io import case_file_pattern, read_label

        path = self.path_for(case)
        if case in self._read:
            self._read.move_to_end(case)
        else:
            if not path.is_file():
                raise DataError(f"{path}: no second-opinion mask for case '{case}' (needed for {source})",
                                hint=f"the second-opinion folder must hold {case_file_pattern()} for every "
                                     "scored case")
            self._keep(case, read_label(path))
        other, other_geometry = self._read[case]
        if tuple(other.shape) != tuple(shape):
            raise DataError(f"{path}: second-opinion mask has shape {other.shape} but {source} has "
                            f"{tuple(shape)}; both must be on the image's own grid")
        if geometry is not None:
            problems = geometry.differences(other_geometry)
            if problems:
                raise DataError(f"{path}: second-opinion geometry does not match {source}: "
                                + "; ".join(f"{p} ({source} vs second opinion)" for p in problems))
        return other

    def _keep(self, case: str, entry) -> None:
        self._read[case] = entry
        while len(self._read) > 1 and self.cached_bytes() > self.cache_bytes:
            self._read.popitem(last=False)

    def cached_bytes(self) -> int:
        return sum(mask.nbytes for mask, _ in self._read.values())

    def agreement(self, case: str, mask: np.ndarray, n_foreground: int, source: str | os.PathLike,
                  geometry=None) -> np.ndarray:
        from .train import dice_per_class

        return dice_per_class(mask, self.mask_for(case, mask.shape, source, geometry), n_foreground)
