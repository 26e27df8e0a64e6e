"""Scoring (image, mask) file pairs with a trained quality predictor: no reference needed.

For each pair the image and mask are read with their geometry, which must match; mask values must
be labels the predictor knows (0..K for K foreground classes; a non-binary mask given to a binary
predictor is a DataError naming the file). Each foreground class gets one row:
(case, class, class name, predicted quality = the Dice g expects against the unknown reference).

Volumes are presented as `presentation.present` describes (crop around the mask). A 2D predictor
scores a volume slice by slice over the slices where the mask has foreground (the middle slice
when it has none) and reports, per class, the mean of the slice predictions weighted by that
class's voxel count in each slice plus one (so empty slices still count a little). That is an
approximation of the volume Dice, stated here so nobody mistakes it for more.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..fileio import write_text_atomic
from .presentation import crop_box, label_to_channels, present
from .second_opinion import SECOND_OPINION_COLUMN

SCORE_COLUMNS = ("case", "class", "class_name", "predicted_quality", "image", "mask", "seconds")


def _forward(model, image, mask, device) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(image.to(device), mask.to(device)).float().cpu().numpy()


def predict_volume(model, image: np.ndarray, label_map: np.ndarray, spacing: Sequence[float] | None = None,
                   device="cpu") -> np.ndarray:
    """g's predicted Dice (K,) for a candidate label map (z,y,x) of an image (z,y,x)."""
    import torch

    n_foreground = model.n_foreground
    grid = model.grid_size
    spacing = tuple(spacing) if spacing is not None else (1.0,) * image.ndim
    if image.shape != label_map.shape:
        raise DataError(f"image shape {image.shape} and mask shape {label_map.shape} differ")
    if image.ndim == 2 and model.spatial_dims == 2:  # one slice
        image, label_map, spacing = image[None], label_map[None], (1.0,) + spacing
    elif image.ndim != 3:
        raise DataError(f"a {model.spatial_dims}D quality predictor scores 3D volumes"
                        f"{' or 2D slices' if model.spatial_dims == 2 else ''}, got shape {image.shape}")
    model.eval()
    if model.spatial_dims == 3:
        shown = present_volume(image, label_map, spacing, n_foreground, grid)
        return _forward(model, shown.image, shown.mask, device)[0]
    occupied = np.flatnonzero(label_map.reshape(label_map.shape[0], -1).any(1))
    slices = occupied if len(occupied) else np.array([label_map.shape[0] // 2])
    images, masks, weights = [], [], []
    for z in slices:
        box = crop_box(label_map[z] > 0, spacing[1:])
        crop = np.ascontiguousarray(label_map[z][box])
        shown = present(np.ascontiguousarray(image[z][box], np.float32),
                        label_to_channels(crop, n_foreground + 1), grid=grid,
                        box=tuple(slice(0, s) for s in crop.shape))
        images.append(shown.image)
        masks.append(shown.mask)
        weights.append([float((label_map[z] == c).sum()) + 1.0 for c in range(1, n_foreground + 1)])
    preds = []
    for start in range(0, len(images), 32):
        preds.append(_forward(model, torch.cat(images[start:start + 32]), torch.cat(masks[start:start + 32]), device))
    preds, weights = np.concatenate(preds), np.asarray(weights)
    return (preds * weights).sum(0) / weights.sum(0)


def present_volume(image: np.ndarray, label_map: np.ndarray, spacing: Sequence[float], n_foreground: int,
                   grid: Sequence[int]):
    """A 3D predictor's view of a whole volume (z,y,x) and a candidate label map: the mask-box crop
    resized to `grid` (`presentation.present`), as a batch of one."""
    box = crop_box(label_map > 0, spacing)
    crop = np.ascontiguousarray(label_map[box])
    return present(np.ascontiguousarray(image[box], np.float32), label_to_channels(crop, n_foreground + 1),
                   grid=grid, box=tuple(slice(0, s) for s in crop.shape))


def check_mask_for_model(mask: np.ndarray, n_foreground: int, path: str | os.PathLike) -> None:
    """DataError unless every mask value is a label the predictor was trained for (0..K)."""
    from ..data.io import present_labels

    values = present_labels(mask)
    unknown = [v for v in values if v > n_foreground]
    if unknown:
        kind = "binary (values 0 and 1)" if n_foreground == 1 else f"labels 0..{n_foreground}"
        raise DataError(f"{path}: mask has label values {unknown} but this quality predictor expects "
                        f"{kind}", hint="convert the mask to a label map with values 0..K (e.g. "
                        "threshold a 0/255 mask to 0/1) or use a predictor trained for more classes")


def score_pair(model, image_path, mask_path, device="cpu", second_opinion=None) -> List[Dict[str, Any]]:
    """Rows (one per foreground class) for one (image, mask) file pair; with a
    `second_opinion.SecondOpinion`, each row also holds the mask's Dice against the second
    opinion's mask of the image's case (`second_opinion_dice`)."""
    from ..data import io

    start = time.perf_counter()
    image, image_geometry = io.read_image(image_path)
    mask, mask_geometry = io.read_label(mask_path)
    problems = image_geometry.differences(mask_geometry)
    if problems:
        raise DataError(f"{mask_path}: mask geometry does not match image {image_path}: "
                        + "; ".join(f"{p} (image vs mask)" for p in problems),
                        hint="resample the mask onto the image grid (nearest neighbour)")
    check_mask_for_model(mask, model.n_foreground, mask_path)
    predicted = predict_volume(model, image, mask, image_geometry.spacing[::-1], device)
    agreement = None
    if second_opinion is not None:
        agreement = second_opinion.agreement(io.case_id_from_path(image_path), mask, model.n_foreground,
                                             mask_path, geometry=mask_geometry)
    seconds = time.perf_counter() - start
    names = list(model.config.get("class_names") or [])
    case = io.case_id_from_path(mask_path)
    rows = [{"case": case, "class": c, "class_name": names[c - 1] if c - 1 < len(names) else f"label_{c}",
             "predicted_quality": round(float(predicted[c - 1]), 6), "image": str(image_path),
             "mask": str(mask_path), "seconds": round(seconds, 4)}
            for c in range(1, model.n_foreground + 1)]
    if agreement is not None:
        for row, value in zip(rows, agreement):
            row[SECOND_OPINION_COLUMN] = round(float(value), 6)
    return rows


def score_pairs(model, pairs: Sequence[Tuple[str, str]], device="cpu", output=None, events=None,
                cancel=None, second_opinion=None) -> List[Dict[str, Any]]:
    """Score every (image path, mask path); optionally write `output` (.csv or .json) atomically.
    Emits a `case_done` event per pair when `events` is given."""
    if not pairs:
        raise DataError("no (image, mask) pairs to score")
    if output is not None:
        _check_output(output)
    rows: List[Dict[str, Any]] = []
    for index, (image_path, mask_path) in enumerate(pairs):
        if cancel is not None:
            cancel.check()
        got = score_pair(model, image_path, mask_path, device, second_opinion)
        rows.extend(got)
        if events is not None:
            events.progress(index + 1, len(pairs), stage="scoring")
            events.emit("case_done", case=got[0]["case"], outputs={},
                        metrics={f"predicted_quality_{r['class_name']}": r["predicted_quality"] for r in got})
    if output is not None:
        write_scores(rows, output)
    return rows


def _check_output(path) -> None:
    if Path(path).suffix.lower() not in (".csv", ".json"):
        raise DataError(f"{path}: output must end with .csv or .json")


def write_scores(rows: List[Dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write score rows as CSV (columns SCORE_COLUMNS) or JSON ({"scores": rows}), atomically."""
    _check_output(path)
    if Path(path).suffix.lower() == ".json":
        return write_text_atomic(path, json.dumps({"scores": rows}, indent=1) + "\n")
    buffer = _io.StringIO()
    columns = list(SCORE_COLUMNS) + ([SECOND_OPINION_COLUMN] if any(SECOND_OPINION_COLUMN in r for r in rows) else [])
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def read_pairs_csv(path: str | os.PathLike) -> List[Tuple[Path, Path]]:
    """(image, mask) pairs from a CSV with header columns `image` and `mask`; relative paths are
    resolved against the CSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pairs CSV not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM, as spreadsheet programs write, is fine
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file in UTF-8 ({exc.reason} at byte {exc.start})",
                        hint="save the CSV as UTF-8 text") from None
    with _io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "image" not in fields or "mask" not in fields:
            raise DataError(f"{path}: pairs CSV needs a header with columns 'image' and 'mask', "
                            f"found {reader.fieldnames}")
        pairs = []
        for line, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if not row.get("image") or not row.get("mask"):
                raise DataError(f"{path}: line {line}: both 'image' and 'mask' must be given")
            pairs.append(tuple(p if p.is_absolute() else path.parent / p
                               for p in (Path(row["image"]), Path(row["mask"]))))
    if not pairs:
        raise DataError(f"{path}: pairs CSV has no rows")
    return pairs


def pairs_from_lists(images: Sequence, masks: Sequence) -> List[Tuple[Path, Path]]:
    """(image, mask) pairs: files given one mask per image in the same order, or one folder of
    images and one folder of masks matched by case (`pairs_from_folders`)."""
    if len(images) == 1 and len(masks) == 1 and Path(images[0]).is_dir() and Path(masks[0]).is_dir():
        return pairs_from_folders(images[0], masks[0])
    folders = [str(p) for p in (*images, *masks) if Path(p).is_dir()]
    if folders:
        raise DataError(f"{folders[0]} is a folder: give one folder of images and one folder of masks, "
                        "or image files and mask files")
    if len(images) != len(masks):
        raise DataError(f"--images has {len(images)} files but --masks has {len(masks)}; give one "
                        "mask per image, in the same order")
    return [(Path(i), Path(m)) for i, m in zip(images, masks)]


def pairs_from_folders(image_folder: str | os.PathLike, mask_folder: str | os.PathLike) -> List[Tuple[Path, Path]]:
    """Every image of `image_folder` with its mask in `mask_folder`, matched by case id in any
    supported format (`io.find_case_file`: an nnU-Net image `X_0000.nii.gz` also matches the mask
    `X.nii.gz` that nnU-Net writes for it). An image without a mask is an error naming it: scoring a
    subset is what --pairs is for."""
    from ..data import io

    image_folder, mask_folder = Path(image_folder), Path(mask_folder)
    images = sorted(p for p in image_folder.iterdir() if io.file_extension(p) in io.IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{image_folder}: folder holds no images ({', '.join(io.IMAGE_EXTENSIONS)})")
    pairs, unmatched = [], []
    for image in images:
        mask = io.find_case_file(mask_folder, io.case_id_from_path(image))
        if mask is None:
            unmatched.append(image.name)
        else:
            pairs.append((image, mask))
    if unmatched:
        raise DataError(f"{mask_folder}: no mask for {len(unmatched)} image(s) of {image_folder}: "
                        f"{', '.join(unmatched[:8])}{' ...' if len(unmatched) > 8 else ''} (looked for "
                        f"{io.case_file_pattern()})", hint="list the pairs to score in a CSV and pass --pairs")
    return pairs


class VolumeScorer:
    """g bound to a device: `scorer(image_path or array, label_map, geometry) -> {label: quality}`.

    Used by `qgseg predict --quality-checkpoint` and the demo to score a freshly predicted label
    map that is still in memory (no round trip through a mask file)."""

    def __init__(self, model, device="cpu"):
        self.model = model
        self.device = device

    def __call__(self, image, label_map: np.ndarray, geometry) -> Dict[int, float]:
        from ..data import io

        if not isinstance(image, np.ndarray):
            image, _ = io.read_image(image)
        check_mask_for_model(label_map, self.model.n_foreground, "predicted label map")
        predicted = predict_volume(self.model, image, label_map, tuple(geometry.spacing)[::-1], self.device)
        return {c: float(predicted[c - 1]) for c in range(1, self.model.n_foreground + 1)}


def load_scorer(path, device="cpu") -> VolumeScorer:
    """A scorer of one predictor file, or of the mean of several (a list of paths)."""
    from .predictor import load_predictors

    return VolumeScorer(load_predictors(path, device=device), device)
