"""Data layer: dataset descriptions, geometry-exact I/O, validation, preprocessing, caching,
samplers, and the synthetic phantom used by the demo and the tests.

Array convention everywhere in the package: numpy order (z, y, x) for 3D volumes, (y, x) for
2D slices, channel first when there is a channel axis. `Geometry` keeps SimpleITK's (x, y, z)
order for spacing/origin/size, exactly as read from the file.
"""

from __future__ import annotations

import importlib

# Re-exports, resolved on first use so `import QGSegmentationLib.data` stays cheap.
_EXPORTS = {
    "Geometry": "io", "read_image": "io", "read_label": "io", "read_geometry": "io",
    "write_image": "io", "write_label": "io", "write_segmentation": "io",
    "check_same_geometry": "io",
    "CaseRef": "dataset", "DatasetSpec": "dataset", "load_dataset": "dataset",
    "dataset_from_files": "dataset", "split_validation": "dataset", "validate_dataset": "dataset",
    "PreprocessConfig": "preprocess", "Preprocessor": "preprocess",
    "resample_to_geometry": "preprocess",
    "PreparedCase": "cache", "CaseStore": "cache",
    "PatchSampler": "samplers", "two_stream": "samplers",
    "AugmentConfig": "augment", "Augmenter": "augment",
    "make_phantom_case": "phantom", "make_phantom_dataset": "phantom",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
