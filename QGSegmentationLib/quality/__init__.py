"""Quality module: the quality predictor g(image, mask) -> Dice and the masks it learns from.

- `corruptions/`: registry `CORRUPTIONS` of mask corruptions (one file per family).
- `vqm.py`: `VQMConfig`, `VQMSampler` - variable-quality masks drawn by category.
- `dice.py`: `mask_dice`, `mask_iou` (both empty -> 1).
Other modules (weak models, the predictor network, presentation, training, evaluation, scoring)
live beside them. Importing this package is cheap; the names below load on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "CORRUPTIONS": ".corruptions",
    "corrupt_labelmap": ".corruptions",
    "VQMConfig": ".vqm",
    "VQMSampler": ".vqm",
    "VQMSample": ".vqm",
    "mask_dice": ".dice",
    "mask_iou": ".dice",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
