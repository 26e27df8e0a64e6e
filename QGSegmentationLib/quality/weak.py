"""Weak-model masks: real early-training segmenter outputs as extra training masks for g.

Synthetic corruptions do not look exactly like what an untrained segmenter produces. Following the
paper, a small segmenter is trained from scratch with a deliberately small learning rate, and
snapshots are kept at epochs 1, 3, 5, 10, 15 and 20 (an "epoch" here is one random patch per
training case). Each snapshot's thresholded (argmax) prediction on every training image is
computed once and cached in the run folder (`weak/weak_predictions.npz` plus a JSON key), so
drawing a weak mask during g's training costs nothing. `WeakPool` serves them to the VQM
sampler: `pool(case_id)` -> one snapshot's mask of that case (drawn at random) or None when the
case has no cached prediction. The sample's target is then its true Dice, like any other mask.

Training split only: validation and test VQM masks stay synthetic.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence

import numpy as np

from ..errors import DataError
from ..fileio import atomic_path, write_json_atomic

PREDICTIONS_FILE = "weak_predictions.npz"
KEY_FILE = "weak_predictions.json"


@dataclass
class WeakConfig:
    """How the weak segmenter is trained. Defaults follow the paper (snapshots at epochs
    1,3,5,10,15,20 of 20) with a small network and a small learning rate."""

    network: str = "unet"
    network_options: dict = field(default_factory=lambda: {"channels": [8, 16, 32], "num_res_units": 1})
    epochs: int = 20
    snapshot_epochs: tuple = (1, 3, 5, 10, 15, 20)
    patch_size: tuple | None = None   # None: (64,64,64) in 3D / (128,128) in 2D, capped at the volume
    batch_size: int = 2
    lr: float = 1e-4                  # small on purpose: early snapshots must be poor
    seed: int = 0

    def key(self, case_ids: Sequence[str], mode: str, n_classes: int, shapes: Sequence) -> str:
        """Hash identifying a set of cached predictions (config, cases, shapes, mode)."""
        blob = json.dumps({"config": asdict(self), "cases": list(case_ids), "mode": mode,
                           "n_classes": n_classes, "shapes": [list(s) for s in shapes]},
                          sort_keys=True, default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


class WeakPool:
    """Cached weak-model label maps per case: {case_id: [label map per snapshot]}.

    `pool(case_id)` returns one snapshot's foreground mask (bool) for `foreground` (a class value,
    or None = any foreground), drawn with the pool's own RNG; `draw(case_id, rng)` uses the
    caller's. `for_class(c)` gives the same pool restricted to class c, for multi-class data."""

    def __init__(self, predictions: Mapping[str, Sequence[np.ndarray]], snapshots: Sequence[int] = (),
                 seed: int = 0, foreground: int | None = None):
        self.predictions = {str(k): list(v) for k, v in predictions.items()}
        self.snapshots = list(snapshots)
        self.foreground = foreground
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.predictions)

    def __contains__(self, case_id: str) -> bool:
        return str(case_id) in self.predictions

    def draw_label(self, case_id: str, rng: np.random.Generator) -> np.ndarray | None:
        maps = self.predictions.get(str(case_id))
        if not maps:
            return None
        return maps[int(rng.integers(len(maps)))]

    def draw(self, case_id: str, rng: np.random.Generator) -> np.ndarray | None:
        label = self.draw_label(case_id, rng)
        if label is None:
            return None
        return label > 0 if self.foreground is None else label == self.foreground

    def __call__(self, case_id: str) -> np.ndarray | None:
        return self.draw(case_id, self._rng)

    def for_class(self, value: int) -> "WeakPool":
        pool = WeakPool({}, self.snapshots, foreground=int(value))
        pool.predictions = self.predictions
        pool._rng = self._rng
        return pool


# ------------------------------------------------------------------------ masks from other tools

def check_mask_on_case_grid(case, mask, mask_geometry, path, role: str = "mask") -> None:
    """DataError unless a mask read from `path` lies on its case's voxel grid: the same size, and
    the same spacing, origin and direction as `Geometry.differences` compares them when a mask is
    scored against its image (`quality.score.score_pair`). A mask of another tool with the right
    size but, say, a flipped direction would otherwise be compared voxel by voxel with the wrong
    anatomy. A case that carries its grid (`.geometry`: cases read by `quality.train.load_cases`, or
    data-layer PreparedCases) is checked on all of it; one built from arrays alone, on size and
    spacing."""
    from ..data import io

    if mask.shape != case.label.shape:
        raise DataError(f"{path}: {role} size {mask.shape[::-1]} differs from case '{case.id}' "
                        f"({case.label.shape[::-1]}, x y z); {role}s must be on their image's grid")
    grid = getattr(case, "geometry", None)
    if grid is None:
        spacing = tuple(getattr(case, "spacing", None) or ())  # numpy (z, y, x) order
        if len(spacing) != 3 or mask.ndim != 3:
            return  # nothing known of the grid beyond its size
        grid = io.Geometry(tuple(reversed(mask.shape)), tuple(reversed(spacing)),
                           mask_geometry.origin, mask_geometry.direction)  # origin/direction unknown
    io.check_same_geometry(grid, mask_geometry, f"'{case.id}'", path, roles=("case", role),
                           hint=f"a {role} must lie on its case's image grid: resample it onto the image "
                                "with nearest-neighbour interpolation")


def load_mask_folders(folders: Sequence[str | os.PathLike], cases: Sequence, n_foreground: int,
                      role: str = "training") -> Dict[str, List[np.ndarray]]:
    """{case id: [label map per folder]} of segmentations of `cases` (`role`: which cases, for
    messages) found in `folders` (`<folder>/<case id>.nrrd` or NIfTI/MHA, `io.find_case_file`;
    e.g. `qgseg predict` outputs of other, partially trained segmenters): real segmenter masks of
    known Dice, served like weak snapshots.

    Each mask must lie on its case's grid (`check_mask_on_case_grid`) and use the declared
    labels; a folder without a mask for any training case is an error (a wrong path)."""
    from ..data import io

    found: Dict[str, List[np.ndarray]] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise DataError(f"{folder}: mask folder not found")
        hits = 0
        for case in cases:
            path = io.find_case_file(folder, case.id)
            if path is None:
                continue
            mask, mask_geometry = io.read_label(path, allowed_labels=list(range(n_foreground + 1)))
            check_mask_on_case_grid(case, mask, mask_geometry, path)
            found.setdefault(case.id, []).append(np.asarray(mask, np.uint8))
            hits += 1
        if not hits:
            raise DataError(f"{folder}: no mask named after a {role} case ({io.case_file_pattern('<case id>')}); "
                            f"{role} cases: {', '.join(c.id for c in cases[:5])}"
                            + ("..." if len(cases) > 5 else ""))
    return found


def merged_pool(pool: "WeakPool | None", extra: Mapping[str, Sequence[np.ndarray]], seed: int) -> "WeakPool | None":
    """`pool`'s snapshots plus the `extra` masks per case (either may be empty)."""
    if not extra:
        return pool
    predictions = {k: list(v) for k, v in (pool.predictions if pool is not None else {}).items()}
    for case_id, masks in extra.items():
        predictions.setdefault(case_id, []).extend(masks)
    return WeakPool(predictions, pool.snapshots if pool is not None else (), seed=seed)


# ------------------------------------------------------------------------------ cache on disk

def save_predictions(folder: str | os.PathLike, predictions: Mapping[str, Sequence[np.ndarray]],
                     snapshots: Sequence[int], key: str) -> Path:
    folder = Path(folder)
    arrays = {f"{cid}::{i}": np.asarray(m, np.uint8) for cid, maps in predictions.items()
              for i, m in enumerate(maps)}
    with atomic_path(folder / PREDICTIONS_FILE, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    write_json_atomic(folder / KEY_FILE, {"key": key, "snapshots": list(snapshots),
                                          "cases": list(predictions)})
    return folder / PREDICTIONS_FILE


def load_predictions(folder: str | os.PathLike, key: str | None = None):
    """(predictions, snapshots) from the cache in `folder`, or None if absent or for another key."""
    folder = Path(folder)
    npz, meta = folder / PREDICTIONS_FILE, folder / KEY_FILE
    if not (npz.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if key is not None and info.get("key") != key:
        return None
    try:
        with np.load(npz) as data:
            predictions: Dict[str, List[np.ndarray]] = {c: [] for c in info["cases"]}
            for name in sorted(data.files, key=lambda n: (n.rsplit("::", 1)[0], int(n.rsplit("::", 1)[1]))):
                cid = name.rsplit("::", 1)[0]
                predictions.setdefault(cid, []).append(data[name])
    except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, but say why
        raise DataError(f"{npz}: cannot read the weak-model prediction cache ({exc}); delete it "
                        "to rebuild") from None
    return predictions, list(info.get("snapshots", []))


# --------------------------------------------------------------------------------- training

def _random_patch(image: np.ndarray, label: np.ndarray, size: Sequence[int], rng) -> tuple:
    """A patch of `size` (zero-padded where the volume is smaller), centred on foreground half
    the time."""
    pad = [(0, max(0, s - d)) for s, d in zip(size, image.shape)]
    if any(p[1] for p in pad):
        image, label = np.pad(image, pad), np.pad(label, pad)
    fg = np.argwhere(label > 0) if rng.random() < 0.5 else np.empty((0, image.ndim))
    if len(fg):
        centre = fg[rng.integers(len(fg))]
        start = [int(np.clip(c - s // 2, 0, d - s)) for c, s, d in zip(centre, size, image.shape)]
    else:
        start = [int(rng.integers(0, d - s + 1)) for s, d in zip(size, image.shape)]
    box = tuple(slice(a, a + s) for a, s in zip(start, size))
    return image[box], label[box]


def _slice_patch(image, label, size, rng):
    """2D mode: a random slice (foreground slices preferred), then a 2D patch of it."""
    fg_slices = np.flatnonzero(label.reshape(label.shape[0], -1).any(1))
    z = int(rng.choice(fg_slices)) if len(fg_slices) and rng.random() < 0.8 else int(rng.integers(label.shape[0]))
    return _random_patch(image[z], label[z], size, rng)


def _predict(net, image: np.ndarray, mode: str, roi: Sequence[int], device) -> np.ndarray:
    """Argmax label map (uint8, same shape as `image`) of `net` over a whole volume."""
    import torch
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(image, np.float32)).to(device)
        x = x[None, None] if mode == "3d" else x[:, None]
        logits = sliding_window_inference(x, roi_size=tuple(roi), sw_batch_size=4, predictor=net,
                                          overlap=0.25)
        labels = logits.argmax(1)
        labels = labels[0] if mode == "3d" else labels
    return labels.to(torch.uint8).cpu().numpy()


def train_weak_snapshots(cases: Sequence, n_classes: int, mode: str, config: WeakConfig,
                         cache_dir: str | os.PathLike, device="cpu",
                         progress: Callable[[int, int], None] | None = None,
                         cancel=None) -> WeakPool:
    """Train the weak segmenter on `cases` (objects with .id, .image (z,y,x) float32 normalised,
    .label (z,y,x) uint8), cache each snapshot's predictions on every case under `cache_dir`,
    and return the pool. A cache made with the same config, cases and shapes is reused."""
    import torch
    from monai.losses import DiceCELoss

    from ..networks import build_network

    cache_dir = Path(cache_dir)
    key = config.key([c.id for c in cases], mode, n_classes, [c.image.shape for c in cases])
    cached = load_predictions(cache_dir, key)
    if cached is not None:
        return WeakPool(cached[0], cached[1], seed=config.seed)

    dims = 3 if mode == "3d" else 2
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    net = build_network(config.network, dims, 1, n_classes, **dict(config.network_options)).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    default = (64, 64, 64) if dims == 3 else (128, 128)
    volume_min = np.min([c.image.shape for c in cases], axis=0)
    volume_min = volume_min if dims == 3 else volume_min[1:]
    size = tuple(config.patch_size or tuple(min(d, int(v)) for d, v in zip(default, volume_min)))
    size = tuple(max(4, s - s % 4) for s in size)  # the UNet halves twice
    per_epoch = max(1, int(np.ceil(len(cases) / config.batch_size)))
    snapshots = sorted(int(e) for e in config.snapshot_epochs if 0 < int(e) <= config.epochs)
    total = per_epoch * config.epochs
    predictions: Dict[str, List[np.ndarray]] = {c.id: [] for c in cases}
    take = _random_patch if dims == 3 else _slice_patch
    iteration = 0
    for epoch in range(1, config.epochs + 1):
        net.train()
        order = rng.permutation(len(cases))
        for b in range(per_epoch):
            picks = [cases[int(i)] for i in order[b * config.batch_size:(b + 1) * config.batch_size]]
            if not picks:
                continue
            pairs = [take(c.image, c.label, size, rng) for c in picks]
            x = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None].astype(np.float32)).to(device)
            y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None].astype(np.int64)).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()
            iteration += 1
            if progress:
                progress(iteration, total)
            if cancel is not None:
                cancel.check()
        if epoch in snapshots:
            net.eval()
            for case in cases:
                predictions[case.id].append(_predict(net, case.image, mode, size, device))
    save_predictions(cache_dir, predictions, snapshots, key)
    return WeakPool(predictions, snapshots, seed=config.seed)
