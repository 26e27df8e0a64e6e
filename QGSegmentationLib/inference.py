"""Inference: sliding-window probabilities, label maps on the original voxel grid, and writing
predictions (`<case>.nrrd` label map + `<case>.seg.nrrd` Slicer segmentation) for whole datasets.

    probs = sliding_window_probs(net, image, roi_size=(32, 48, 48), mode="3d")     # (C, z, y, x)
    result = predict_volume(net, "case.nii.gz", Preprocessor(config), (32, 48, 48), "3d")
    write_prediction(result.label, result.geometry, "out", "case", names={1: "organ"})
    predict_dataset(net, "imagesTs/", Preprocessor(config), (32, 48, 48), "3d", out_dir="out")

`network` may be an nn.Module or any callable mapping a (B, 1, *roi) batch to (B, C, *roi)
logits (`outputs="logits"`, softmax is applied per window before Gaussian blending) or to
probabilities (`outputs="probs"`, e.g. `ensemble(net_a, net_b)`). In "2d" mode the network is a
2D network and a 3D volume is segmented slice by slice along z (slices are batched through it).
Callers place the network on `device`; it is switched to eval mode for the call and restored.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Sequence

import numpy as np

from .engine.device import autocast, autocast_dtype
from .errors import ConfigError, DataError

MODES = ("3d", "2d")
OUTPUTS = ("logits", "probs")


class VolumePrediction(NamedTuple):
    """What `predict_volume` returns; unpacks as (label, probs, geometry)."""

    label: np.ndarray            # uint8 (z, y, x) on the original grid
    probs: np.ndarray | None     # float32 (C, z, y, x) on the original grid, when asked for
    geometry: Any                # data.io.Geometry of the input file


def _check_roi(roi_size: Sequence[int], mode: str) -> tuple:
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    roi = tuple(int(r) for r in roi_size)
    expected = 3 if mode == "3d" else 2
    if len(roi) != expected or any(r < 1 for r in roi):
        raise ConfigError(f"roi_size {list(roi_size)} must be {expected} positive ints for mode "
                          f"'{mode}' ({'z, y, x' if expected == 3 else 'y, x'})")
    return roi


def ensemble(*networks: Callable) -> Callable:
    """A callable returning the mean softmax probabilities of `networks` (use outputs="probs")."""
    import torch

    if not networks:
        raise ConfigError("ensemble needs at least one network")

    def predict(x):
        return torch.stack([torch.softmax(_logits(net(x)).float(), 1) for net in networks]).mean(0)

    predict.networks = networks
    return predict


def _logits(out: Any):
    return out[-1] if isinstance(out, (list, tuple)) else out


def _modules_of(network: Callable) -> list:
    import torch

    candidates = list(getattr(network, "networks", ())) or [network]
    return [m for m in candidates if isinstance(m, torch.nn.Module)]


def sliding_window_probs(network: Callable, image: Any, roi_size: Sequence[int], mode: str = "3d",
                         overlap: float = 0.5, sw_batch_size: int = 2, device: Any = "cpu",
                         amp: bool = False, outputs: str = "logits"):
    """Class probabilities (C, *spatial) float32 on the CPU for one volume.

    image: (1, 1, z, y, x) tensor (or a (z, y, x) array); roi_size: the patch size, (z, y, x) in
    "3d" mode, (y, x) in "2d" mode. Windows overlap by `overlap` and are blended with Gaussian
    weights (monai.inferers.sliding_window_inference); inputs smaller than a window are padded.
    amp: mixed precision (bfloat16 where the GPU has it, else float16), used on CUDA only."""
    import torch
    from monai.inferers import sliding_window_inference

    roi = _check_roi(roi_size, mode)
    if outputs not in OUTPUTS:
        raise ConfigError(f"outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
    if not 0.0 <= float(overlap) < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
    if int(sw_batch_size) < 1:
        raise ConfigError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    volume = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
    if volume.ndim == 3:
        volume = volume[None, None]
    if volume.ndim != 5 or volume.shape[:2] != (1, 1):
        raise DataError(f"image must be a (1, 1, z, y, x) tensor or a (z, y, x) array, "
                        f"got shape {tuple(volume.shape)}")
    device = torch.device(device)
    volume = volume.to(device=device, dtype=torch.float32)
    # 2D: the z slices become the batch, (Z, 1, y, x)
    inputs = volume if mode == "3d" else volume[0].permute(1, 0, 2, 3)

    def predict(x):
        out = _logits(network(x)).float()
        return torch.softmax(out, 1) if outputs == "logits" else out

    modules = _modules_of(network)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad(), autocast(device, autocast_dtype(device) if amp else None):
            probs = sliding_window_inference(inputs, roi, int(sw_batch_size), predict,
                                             overlap=float(overlap), mode="gaussian",
                                             sw_device=device, device=device)
    finally:
        for m, training in zip(modules, was_training):
            m.train(training)
    probs = torch.as_tensor(probs).float()
    probs = probs[0] if mode == "3d" else probs.permute(1, 0, 2, 3)
    return probs.cpu().contiguous()


def predict_volume(network_fn: Callable, image_path: str | os.PathLike, preprocessor: Any,
                   roi_size: Sequence[int], mode: str = "3d", device: Any = "cpu",
                   overlap: float = 0.5, sw_batch_size: int = 2, amp: bool = False,
                   outputs: str = "logits", return_probs: bool = False) -> VolumePrediction:
    """Segment one image file: read, preprocess, sliding-window probabilities, back to the file's
    own grid, argmax.

    Probabilities are resampled (linearly) onto the original grid before the argmax, so the label
    map has exactly the input's size, spacing, origin and direction. With foreground cropping,
    voxels outside the crop are background."""
    from .data.io import read_image
    from .data.preprocess import resample_to_geometry

    _check_roi(roi_size, mode)
    array, original = read_image(image_path)
    prepared, grid = preprocessor.image(array, original)
    probs = sliding_window_probs(network_fn, prepared, roi_size, mode=mode, overlap=overlap,
                                 sw_batch_size=sw_batch_size, device=device, amp=amp,
                                 outputs=outputs).numpy()
    n_classes = probs.shape[0]
    if n_classes > 256:
        raise ConfigError(f"{n_classes} output channels cannot be stored as a uint8 label map")
    if grid != original:
        cropped = bool(getattr(getattr(preprocessor, "config", None), "crop_foreground", False))
        fills = [1.0] + [0.0] * (n_classes - 1) if cropped else None
        probs = resample_to_geometry(probs, grid, original, "linear", fill_values=fills)
    label = np.argmax(probs, axis=0).astype(np.uint8)
    return VolumePrediction(label, probs.astype(np.float32, copy=False) if return_probs else None,
                            original)


def _segment_names(names: Mapping[int, str] | Sequence[str] | None, n_classes: int | None) -> Dict[int, str]:
    """{label value: name} from a mapping, or a list indexed by label value (entry 0 =
    background, skipped); None -> 'label_<c>' for 1..n_classes-1."""
    if names is None:
        return {c: f"label_{c}" for c in range(1, n_classes or 0)}
    if isinstance(names, Mapping):
        return {int(k): str(v) for k, v in names.items() if int(k) != 0}
    return {i: str(n) for i, n in enumerate(names) if i != 0}


#: File types a predicted label map can be written as (`qgseg predict --format`); the Slicer
#: segmentation beside it is always .seg.nrrd.
LABEL_FORMATS = (".nrrd", ".nii.gz", ".nii", ".mha")


def prediction_paths(out_dir: str | os.PathLike, case_id: str, label_format: str = ".nrrd") -> Dict[str, Path]:
    """Where `write_prediction` puts a case: {"label": <out_dir>/<case_id><label_format>,
    "segmentation": <out_dir>/<case_id>.seg.nrrd}."""
    case_id = str(case_id)
    if not case_id or "/" in case_id or "\\" in case_id or case_id in (".", ".."):
        raise DataError(f"case id {case_id!r} cannot be used as a file name")
    if label_format not in LABEL_FORMATS:
        raise DataError(f"label maps can be written as {', '.join(LABEL_FORMATS)}, not {label_format!r}")
    out_dir = Path(out_dir)
    return {"label": out_dir / f"{case_id}{label_format}", "segmentation": out_dir / f"{case_id}.seg.nrrd"}


def check_output_folder(out_dir: str | os.PathLike) -> Path:
    """DataError unless `out_dir` is a folder or can be made one: an existing file in its place
    (or in place of a folder above it) would only fail after every case was segmented."""
    out_dir = Path(out_dir)
    for folder in (out_dir, *out_dir.parents):
        if not folder.exists():
            continue
        if folder.is_dir():
            return out_dir
        if folder == out_dir:
            raise DataError(f"{out_dir}: the output folder is an existing file; name a folder "
                            "(it is created if missing)")
        raise DataError(f"{out_dir}: cannot create the output folder, {folder} is a file")
    return out_dir


def _file_identity(path: Path):
    """(device, inode) of an existing file, None otherwise: catches hard links and other spellings
    of one file (case-insensitive file systems) that path comparison misses."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_outputs_spare_inputs(inputs: Sequence[str | os.PathLike],
                               outputs: Sequence[str | os.PathLike]) -> None:
    """DataError naming the first output path that is one of the input images (the same path
    after resolving links, or the same file): writing it would replace the image with a label map."""
    by_path = {Path(os.path.realpath(p)): Path(p) for p in inputs}
    by_file = {key: Path(p) for p in inputs if (key := _file_identity(Path(p))) is not None}
    for output in map(Path, outputs):
        image = by_path.get(Path(os.path.realpath(output)))
        if image is None:
            key = _file_identity(output)
            image = by_file.get(key) if key is not None else None
        if image is not None:
            raise DataError(f"{output}: writing this output would overwrite the input image {image}",
                            hint="write the predictions to a folder that holds none of the input images")


def write_prediction(label: np.ndarray, geometry: Any, out_dir: str | os.PathLike, case_id: str,
                     names: Mapping[int, str] | Sequence[str] | None = None,
                     label_format: str = ".nrrd") -> Dict[str, str]:
    """Atomically write `<out_dir>/<case_id>.nrrd` (label map; or .nii.gz, .nii, .mha:
    `label_format`) and `<case_id>.seg.nrrd` (Slicer segmentation with segment `names`); returns
    {"label": path, "segmentation": path}."""
    from .data.io import write_label, write_segmentation

    case_id = str(case_id)
    paths = prediction_paths(out_dir, case_id, label_format)
    label = np.asarray(label)
    if label.dtype != np.uint8:
        if label.min(initial=0) < 0 or label.max(initial=0) > 255:
            raise DataError(f"case {case_id}: label values must be in 0..255")
        label = label.astype(np.uint8)
    label_path, seg_path = paths["label"], paths["segmentation"]
    write_label(label_path, label, geometry)
    write_segmentation(seg_path, label, geometry, _segment_names(names, int(label.max(initial=0)) + 1))
    return {"label": str(label_path), "segmentation": str(seg_path)}


def list_images(images: str | os.PathLike | Sequence[str | os.PathLike]) -> List[Path]:
    """Image files to predict: a folder (every .nii.gz/.nii/.nrrd/.mha/.mhd in it, sorted,
    Slicer .seg.nrrd files skipped) or an explicit list of paths, each of which must exist."""
    from .data.io import IMAGE_EXTENSIONS, SEGMENTATION_EXTENSION, file_extension

    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.exists():
            raise DataError(f"{folder}: no such file or folder")
        if folder.is_dir():
            paths = sorted(p for p in folder.iterdir() if p.is_file()
                           and file_extension(p) in IMAGE_EXTENSIONS
                           and file_extension(p) != SEGMENTATION_EXTENSION)
            if not paths:
                raise DataError(f"{folder}: folder contains no images "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
            return paths
        images = [folder]
    paths = [Path(p) for p in images]
    if not paths:
        raise DataError("no images given to predict")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: image file not found")
    return paths


def predict_dataset(network_fn: Callable, images: str | os.PathLike | Sequence[str | os.PathLike],
                    preprocessor: Any, roi_size: Sequence[int], mode: str = "3d",
                    out_dir: str | os.PathLike = "predictions",
                    names: Mapping[int, str] | Sequence[str] | None = None, device: Any = "cpu",
                    overlap: float = 0.5, sw_batch_size: int = 2, amp: bool = False,
                    outputs: str = "logits", callback: Callable[[dict], None] | None = None,
                    progress: bool = True) -> List[dict]:
    """Predict every image (a folder or a list of paths) and write its `.nrrd` + `.seg.nrrd`.

    After each case `callback(record)` is called with record = {"case", "outputs": {"label",
    "segmentation", "image"}, "metrics": {}, "seconds"} (the fields of a `case_done` event);
    the records are also returned. A callback may raise (e.g. CancelledError) to stop."""
    from tqdm.auto import tqdm

    from .data.io import case_id_from_path

    _check_roi(roi_size, mode)
    paths = list_images(images)
    ids = [case_id_from_path(p) for p in paths]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"several images share the case id(s) {', '.join(duplicates)}; "
                        "their predictions would overwrite each other")
    check_output_folder(out_dir)
    check_outputs_spare_inputs(paths, [p for case_id in ids for p in prediction_paths(out_dir, case_id).values()])
    records = []
    for path, case_id in tqdm(list(zip(paths, ids)), desc="predict", unit="case",
                              disable=not progress):
        start = time.perf_counter()
        result = predict_volume(network_fn, path, preprocessor, roi_size, mode=mode, device=device,
                                overlap=overlap, sw_batch_size=sw_batch_size, amp=amp,
                                outputs=outputs)
        written = write_prediction(result.label, result.geometry, out_dir, case_id, names)
        record = {"case": case_id, "outputs": {**written, "image": str(path)}, "metrics": {},
                  "seconds": round(time.perf_counter() - start, 3)}
        records.append(record)
        if callback is not None:
            callback(record)
    return records
