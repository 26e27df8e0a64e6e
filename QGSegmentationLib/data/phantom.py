"""Synthetic 3D phantom dataset: textured ellipsoid "organs" in noise with a smooth bias field.

Used by `qgseg demo` and by the test suite, so nothing needs real data. Each case gets a random
non-identity-free geometry (spacing, origin) so geometry handling is exercised. With
`n_classes=3` a second, smaller organ gets label 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np


def _ellipsoid(shape, center, radii, rotation):
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    coords = np.stack([zz - center[0], yy - center[1], xx - center[2]], axis=-1)
    local = coords @ rotation.T
    return ((local / np.asarray(radii, np.float32)) ** 2).sum(-1) <= 1.0


def _random_rotation(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ], dtype=np.float32)


def make_phantom_case(shape: Sequence[int] = (32, 48, 48), n_classes: int = 2, seed: int = 0):
    """Return (image float32 (z,y,x), label uint8 (z,y,x)) for one synthetic case."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    label = np.zeros(shape, np.uint8)
    center = np.array(shape, np.float32) / 2 + rng.uniform(-0.12, 0.12, 3) * np.array(shape)
    radii = np.array(shape, np.float32) * rng.uniform(0.18, 0.3, 3)
    label[_ellipsoid(shape, center, radii, _random_rotation(rng))] = 1
    if n_classes >= 3:
        offset = rng.choice([-1, 1], 3) * radii * 0.9
        small = _ellipsoid(shape, center + offset, radii * rng.uniform(0.35, 0.5, 3),
                           _random_rotation(rng))
        label[small & (label == 0)] = 2
    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 1.5)
    image = 100.0 + 25.0 * texture
    for value in range(1, n_classes):
        image[label == value] += 60.0 + 30.0 * (value - 1)
    image = ndimage.gaussian_filter(image, 0.8)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    coef = rng.uniform(-0.25, 0.25, 3)
    bias = np.exp(coef[0] * zz + coef[1] * yy + coef[2] * xx)
    image = image * bias + rng.normal(0, 12.0, shape).astype(np.float32)
    return image.astype(np.float32), label


def make_phantom_dataset(root: str | Path, n_labeled: int = 4, n_unlabeled: int = 8,
                         n_validation: int = 0, n_test: int = 0, shape=(32, 48, 48),
                         n_classes: int = 2, seed: int = 0, fmt: str = ".nrrd") -> Path:
    """Write a Decathlon-style dataset (imagesTr/, labelsTr/, imagesTs/, dataset.json) under `root`.

    "training" holds n_labeled labeled cases, "validation" n_validation labeled cases,
    "test" n_test labeled cases (as {"image","label"}), "unlabeled" n_unlabeled images whose
    labels are also written to labelsUn/ so demos can report true quality. Returns dataset.json."""
    import SimpleITK as sitk

    root = Path(root)
    for sub in ("imagesTr", "labelsTr", "imagesUn", "labelsUn"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = {0: "background", 1: "organ", 2: "lesion"}
    desc = {"name": "QGSeg phantom", "modality": {"0": "MR"},
            "labels": {str(k): names[k] for k in range(n_classes)},
            "training": [], "validation": [], "test": [], "unlabeled": [],
            "unlabeled_labels": []}
    groups = [("training", n_labeled), ("validation", n_validation), ("test", n_test),
              ("unlabeled", n_unlabeled)]
    index = 0
    for group, count in groups:
        for _ in range(count):
            image, label = make_phantom_case(shape, n_classes, seed=seed * 1000 + index)
            spacing = tuple(float(s) for s in rng.uniform(0.8, 1.6, 3).round(3))
            origin = tuple(float(o) for o in rng.uniform(-50, 50, 3).round(2))
            img_dir, lab_dir = ("imagesUn", "labelsUn") if group == "unlabeled" else ("imagesTr", "labelsTr")
            name = f"case_{index:03d}{fmt}"
            for array, folder in ((image, img_dir), (label, lab_dir)):
                itk = sitk.GetImageFromArray(array)
                itk.SetSpacing(spacing)
                itk.SetOrigin(origin)
                sitk.WriteImage(itk, str(root / folder / name), True)
            if group == "unlabeled":
                desc["unlabeled"].append(f"{img_dir}/{name}")
                desc["unlabeled_labels"].append(f"{lab_dir}/{name}")
            else:
                desc[group].append({"image": f"{img_dir}/{name}", "label": f"{lab_dir}/{name}"})
            index += 1
    for key in ("validation", "test"):
        if not desc[key]:
            del desc[key]
    path = root / "dataset.json"
    path.write_text(json.dumps(desc, indent=1))
    return path
