"""Training the quality predictor g on variable-quality masks (VQM) of known Dice.

Each epoch draws `samples_per_case` VQM masks for every training case (the paper's K = 50 on a
GPU; 8 by default on a CPU so that an epoch stays short - set it explicitly to override). Per
sample:

1. spatial augmentation (random flips) of the image and the reference together;
2. the reference region of interest (its bounding box + 50% per side, at least 10 mm) is
   corrupted class by class by the VQM sampler (`quality.vqm`), the classes merged back into a
   label map (later classes win on overlap). Corrupting the region rather than the whole volume
   keeps the corruption strength relative to the structure and keeps the cost independent of how
   much background a volume has; with probability `p_weak` (training cases only) the sampler uses
   a cached weak-segmenter output instead (`quality.weak`);
3. presentation (`quality.presentation`): a mask-box crop of the whole volume (70%) or a random
   sub-volume shown whole (30%, `p_patch`), resized to the grid;
4. intensity-only augmentation of the presented image (gamma, noise);
5. target: per-class Dice between the candidate and the reference inside what g sees (the whole
   volume for mask-box crops; the sub-volume for patches); both empty -> 1. With g's optional
   segmentation head, the reference is presented on the grid too: the head's target, whose soft
   Dice + CE loss (weight `segmentation_weight`) is added to the regression loss.

Samples are generated on the fly by a map-style dataset whose randomness is a pure function of
(seed, epoch, case, k), so runs are reproducible and resumable, and DataLoader workers (0 on CPU,
up to 8 on CUDA) can share the corruption cost. The result reports the fraction of time spent
making samples.

Optimisation follows the paper: AdamW (lr 3e-4, wd 5e-4), cosine warm restarts (T0 10, Tmult 2,
eta_min 1e-6, stepped per iteration), SmoothL1 (beta 1) or MSE, gradient clipping 1, AMP on CUDA,
early stopping on validation MAE (patience 25). `checkpoints/best.pt` (lowest validation MAE) and
`checkpoints/last.pt` (full training state; a rerun in the same folder resumes from it) are
written atomically into the run folder with a training curve PNG and the history as JSON.

Validation uses VQM masks of the validation cases and, when `validation_masks` names folders of
real segmentations of those cases, the mean of the synthetic-mask and real-mask MAE
(`validation_scores`): corruptions alone can select an epoch that is worse on the masks g will
actually score. With `calibrate` (default), the selected g's output is then shifted by its mean
error on those real masks (`quality.calibrate`).

Under torchrun (`engine.distributed`) g is wrapped in DistributedDataParallel; `batch_size` is
per rank, and each global batch of the single-process order (batch_size x world size) is split
into disjoint per-rank slices (`RankBatchSampler`). Rank 0 makes the validation samples,
validates, decides early stopping and writes every file; weak snapshots are trained by rank 0
and read from its cache by the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..engine.device import autocast, autocast_dtype
from ..errors import ConfigError, DataError, RunFolderError, check_option_types
from ..fileio import write_json_atomic
from .presentation import MIN_MARGIN_MM, crop_box, label_to_channels, present

BEST_FILE = "checkpoints/best.pt"   # relative to the run folder
LAST_FILE = "checkpoints/last.pt"
HISTORY_FILE = "quality_history.json"
CURVE_FILE = "quality_training_curve.png"
CALIBRATION_FILE = "quality_calibration_validation.png"
RESULT_FILE = "quality_result.json"
ROI_MARGIN_FRACTION = 0.5
CPU_SAMPLES_PER_CASE = 8
GPU_SAMPLES_PER_CASE = 50


@dataclass
class QualityTrainConfig:
    """Options of `train_quality_predictor` (YAML/JSON keys of `qgseg quality train --config`)."""

    mode: str = "3d"                      # "3d" volumes or "2d" slices along z
    backbone: str = "convnet"             # QUALITY_BACKBONES name
    backbone_options: dict = field(default_factory=dict)
    segmentation_head: bool = False       # g also segments the image (predictor.py); off: the paper's g
    segmentation_weight: float = 1.0      # weight of that head's auxiliary Dice + CE loss
    grid_size: list | None = None         # None: 48^3 (3d) / 128^2 (2d)
    samples_per_case: int | None = None   # K per training case per epoch; None: 50 CUDA, 8 CPU
    val_samples_per_case: int = 5
    reuse_epochs: int = 1                 # keep each epoch's VQM samples for this many epochs (random
                                          # grid flips on reuse): corruption is most of g's CPU cost
    epochs: int = 150
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 5e-4
    t0: int = 10
    t_mult: int = 2
    eta_min: float = 1e-6
    loss: str = "smoothl1"                # "smoothl1" (beta below) or "mse"
    smoothl1_beta: float = 1.0
    patience: int = 25                    # epochs without a better validation MAE; 0 = never stop
    grad_clip: float = 1.0
    amp: str = "auto"                     # auto (on for CUDA) | on | off
    p_weak: float = 0.05                  # probability of a weak-segmenter mask (training only)
    weak: dict | None = field(default_factory=dict)  # WeakConfig fields; None disables weak masks
    extra_masks: list = field(default_factory=list)  # folders of <case>.nrrd masks of training cases
                                          # made by other segmenters; drawn with p_weak like snapshots
    validation_masks: list = field(default_factory=list)  # folders of <case>.nrrd masks of validation
                                          # cases by real segmenters: early stopping then also watches them
    calibrate: bool = True                # with validation_masks: fit g's output shift on them (calibrate.py)
    p_patch: float = 0.3                  # share of "training patch" presentations
    flip: bool = True
    intensity_augmentation: bool = True
    vqm: dict = field(default_factory=dict)  # VQMConfig fields
    n_validation: int = 0                 # cases held out when the dataset has no validation group (0: auto)
    num_workers: int | None = None        # None: 0 on CPU, min(8, cores - 1) on CUDA
    seed: int = 0
    sync_batchnorm: bool = False          # under torchrun on GPUs: batch statistics over all ranks

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "QualityTrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown quality training option(s) {unknown}; "
                              f"known: {', '.join(sorted(names))}")
        check_option_types(data, cls, source)
        config = cls(**dict(data))
        config.validate(source)
        return config

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=list))

    def validate(self, source: str = "config") -> None:
        def bad(message):
            raise ConfigError(f"{source}: {message}")

        if self.mode not in ("2d", "3d"):
            bad(f"mode must be '2d' or '3d', not {self.mode!r}")
        if self.loss not in ("smoothl1", "mse"):
            bad(f"loss must be 'smoothl1' or 'mse', not {self.loss!r}")
        if self.amp not in ("auto", "on", "off"):
            bad(f"amp must be auto, on or off, not {self.amp!r}")
        for name in ("epochs", "batch_size", "val_samples_per_case", "t0", "t_mult", "reuse_epochs"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_case is not None and int(self.samples_per_case) < 1:
            bad(f"samples_per_case must be >= 1, got {self.samples_per_case}")
        for name in ("p_weak", "p_patch"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                bad(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            bad("lr must be > 0 and weight_decay >= 0")
        if float(self.segmentation_weight) < 0:
            bad(f"segmentation_weight must be >= 0, got {self.segmentation_weight}")
        for name in ("extra_masks", "validation_masks"):  # a wrong path fails now, not after the weak stage
            missing = [str(folder) for folder in getattr(self, name) if not Path(folder).is_dir()]
            if missing:
                raise DataError(f"{', '.join(missing)}: mask folder not found ({name.replace('_', '-')})")

    def resolved_samples_per_case(self, device_type: str) -> int:
        if self.samples_per_case is not None:
            return int(self.samples_per_case)
        return GPU_SAMPLES_PER_CASE if device_type == "cuda" else CPU_SAMPLES_PER_CASE


# ------------------------------------------------------------------------------------- cases

@dataclass
class VolumeCase:
    """One labeled volume as g's training uses it: image (z,y,x) float32 (robustly standardised),
    label (z,y,x) uint8, spacing in numpy order (mm), and the file's voxel grid (`data.io.Geometry`)
    when known, against which masks of other tools are checked."""

    id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    geometry: Optional[Any] = None


def _standardise_volume(image: np.ndarray) -> np.ndarray:
    step = max(1, image.size // 500_000)
    lo, hi = np.percentile(image.ravel()[::step], [0.5, 99.5])
    clipped = np.clip(image, lo, hi)
    std = float(clipped.std())
    return ((clipped - clipped.mean()) / (std if std > 1e-6 else 1.0)).astype(np.float32)


def load_cases(refs: Sequence, labels: Mapping | None = None) -> List[VolumeCase]:
    """Read labeled CaseRefs at their own voxel grid (the grid scoring sees), checking geometry."""
    from ..data import io

    cases = []
    for ref in refs:
        if ref.label is None:
            raise DataError(f"{ref.image}: case '{ref.id}' has no label; g is trained on labeled cases")
        image, geometry = io.read_image(ref.image)
        label, label_geometry = io.read_label(ref.label, allowed_labels=list(labels) if labels else None)
        io.check_same_geometry(geometry, label_geometry, ref.image, ref.label)
        cases.append(VolumeCase(ref.id, _standardise_volume(image), label, tuple(geometry.spacing[::-1]), geometry))
    return cases


def as_volume_case(case) -> VolumeCase:
    """Accept VolumeCase or a data-layer PreparedCase (image (1,z,y,x), label, geometry)."""
    if isinstance(case, VolumeCase):
        return case
    image = np.asarray(case.image, np.float32)
    image = image[0] if image.ndim == 4 else image
    if getattr(case, "label", None) is None:
        raise DataError(f"case '{case.id}' has no label; g is trained on labeled cases")
    geometry = getattr(case, "geometry", None)
    spacing = tuple(geometry.spacing[::-1]) if geometry is not None else (1.0,) * image.ndim
    return VolumeCase(str(case.id), image, np.asarray(case.label, np.uint8), spacing, geometry)


# ----------------------------------------------------------------------------- VQM samples

def dice_per_class(candidate: np.ndarray, reference: np.ndarray, n_foreground: int) -> np.ndarray:
    """Dice of each foreground class 1..K between two label maps; both empty -> 1."""
    out = np.empty(n_foreground, np.float32)
    for c in range(1, n_foreground + 1):
        a, b = candidate == c, reference == c
        total = int(a.sum()) + int(b.sum())
        out[c - 1] = 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
    return out


def _make_vqm_config(options: Mapping, p_weak: float):
    """VQMConfig from the `vqm` section; `p_weak` comes from the training config unless given."""
    from .vqm import VQMConfig

    options = dict(options or {})
    options.setdefault("p_weak", p_weak)
    return VQMConfig.from_dict(options)


_SAMPLERS: Dict[int, Any] = {}


def _sampler(vqm_config):
    """One VQMSampler per config object and process (its category pools are built once)."""
    from .vqm import VQMSampler

    key = id(vqm_config)
    if key not in _SAMPLERS:
        _SAMPLERS.clear()
        _SAMPLERS[key] = (vqm_config, VQMSampler(vqm_config))
    return _SAMPLERS[key][1]


class SwapPools:
    """For the cross-image swap category: per class, every case's reference region (case_id,
    mask, foreground volume in mm^3); the sampler skips the case being corrupted and fits the
    donor to the target's shape."""

    def __init__(self, cases: Sequence[VolumeCase], n_foreground: int, mode: str):
        self.by_class: Dict[int, list] = {c: [] for c in range(1, n_foreground + 1)}
        for case in cases:
            label = case.label
            spacing = case.spacing
            if mode == "2d":  # the slice with the most foreground
                areas = label.reshape(label.shape[0], -1).astype(bool).sum(1)
                label, spacing = label[int(np.argmax(areas))], spacing[1:]
            roi = crop_box(label > 0, spacing, ROI_MARGIN_FRACTION, MIN_MARGIN_MM)
            for c in self.by_class:
                mask = label[roi] == c
                self.by_class[c].append((case.id, mask, float(mask.sum() * np.prod(spacing))))


@dataclass
class SampleSpec:
    """Everything a sample generator needs besides the case (picklable for DataLoader workers)."""

    mode: str
    grid: tuple
    n_foreground: int
    vqm_config: Any
    p_patch: float
    flip: bool
    intensity: bool
    train: bool
    reference: bool = False               # also present the reference (target of g's segmentation head)


def _pick_slice(label: np.ndarray, rng) -> int:
    fg = np.flatnonzero(label.reshape(label.shape[0], -1).any(1))
    if len(fg) and rng.random() < 0.8:
        return int(rng.choice(fg))
    return int(rng.integers(label.shape[0]))


def _random_patch_box(label: np.ndarray, rng) -> tuple:
    """A sub-volume of 40-100% of each axis, centred near a random foreground voxel (if any)."""
    shape = label.shape
    size = [max(1, int(round(s * rng.uniform(0.4, 1.0)))) for s in shape]
    fg = np.argwhere(label > 0) if label.any() else None
    if fg is not None:
        centre = fg[rng.integers(len(fg))] + rng.integers(-np.array(size) // 4, np.array(size) // 4 + 1)
    else:
        centre = rng.integers(0, shape)
    start = [int(np.clip(c - s // 2, 0, d - s)) for c, s, d in zip(centre, size, shape)]
    return tuple(slice(a, a + s) for a, s in zip(start, size))


def intensity_augment(image, rng):
    """Gamma on the min-max rescaled image, re-standardised, plus Gaussian noise (torch (1,1,*g))."""
    import torch

    from .presentation import standardize_image

    lo, hi = image.min(), image.max()
    if float(hi - lo) > 1e-6:
        gamma = float(np.exp(rng.uniform(np.log(0.7), np.log(1.5))))
        image = standardize_image(((image - lo) / (hi - lo)) ** gamma)
    sigma = float(rng.uniform(0.0, 0.1))
    noise = torch.from_numpy(rng.normal(0.0, 1.0, tuple(image.shape)).astype(np.float32))
    return image + sigma * noise


def vqm_candidate(label: np.ndarray, spacing: Sequence[float], n_foreground: int, vqm_config,
                  rng: np.random.Generator, swap_pools: "SwapPools | None" = None, case_id: str = "",
                  weak_label: np.ndarray | None = None):
    """Corrupt a reference label map class by class inside its region of interest.

    Returns (candidate label map like `label`, categories drawn per class, true Dice per class).
    `weak_label` (a weak-segmenter label map on the same grid) is offered to the sampler, which
    uses it with probability p_weak."""
    roi = crop_box(label > 0, spacing, ROI_MARGIN_FRACTION, MIN_MARGIN_MM)
    reference_roi = np.ascontiguousarray(label[roi])
    candidate_roi = np.zeros_like(reference_roi)
    categories = []
    for c in range(1, n_foreground + 1):
        weak_c = None
        if weak_label is not None:
            weak_roi = np.ascontiguousarray(weak_label[roi] == c)
            weak_c = lambda *_args, _m=weak_roi, **_kw: _m  # noqa: E731 - the sampler decides when
        swap = swap_pools.by_class[c] if swap_pools is not None else None
        drawn = _sampler(vqm_config).sample(reference_roi == c, spacing, swap_pool=swap or None,
                                            weak_pool=weak_c, case_id=case_id, rng=rng)
        candidate_roi[np.asarray(drawn.mask, bool)] = c
        categories.append(str(drawn.category))
    candidate = np.zeros_like(label)
    candidate[roi] = candidate_roi
    return candidate, categories, dice_per_class(candidate_roi, reference_roi, n_foreground)


def generate_sample(case: VolumeCase, spec: SampleSpec, rng: np.random.Generator,
                    swap_pools: SwapPools | None = None, weak_pool=None) -> Dict[str, Any]:
    """One VQM training/validation sample of `case`: presented image (1,*grid), mask (K,*grid),
    target (K,) true Dice, and the categories drawn (one per class)."""
    import torch

    image, label, spacing = case.image, case.label, tuple(case.spacing)
    weak_label = None
    weak_draw = weak_pool is not None and spec.train and case.id in weak_pool
    if weak_draw:
        weak_label = weak_pool.draw_label(case.id, rng)
    if spec.mode == "2d":
        z = _pick_slice(label, rng)
        image, label, spacing = image[z], label[z], spacing[1:]
        weak_label = None if weak_label is None else weak_label[z]
    if spec.train and spec.flip:
        axes = tuple(a for a in range(label.ndim) if rng.random() < 0.5)
        if axes:
            image, label = np.flip(image, axes), np.flip(label, axes)
            weak_label = None if weak_label is None else np.flip(weak_label, axes)
    candidate, categories, target_whole = vqm_candidate(
        label, spacing, spec.n_foreground, spec.vqm_config, rng, swap_pools, case.id, weak_label)
    if spec.train and rng.random() < spec.p_patch:
        box, view = _random_patch_box(label, rng), "patch"
    else:
        box, view = crop_box(candidate > 0, spacing), "mask_box"
    # Mask-box crops predict the whole-volume Dice (what scoring reports); patches the patch Dice.
    target = dice_per_class(candidate[box], label[box], spec.n_foreground) if view == "patch" \
        else target_whole
    image_t, mask_t = _present_box(image, candidate, box, spec)
    if spec.train and spec.intensity:
        image_t = intensity_augment(image_t[None], rng)[0]
    sample = {"image": image_t, "mask": mask_t, "target": torch.from_numpy(target),
              "category": "+".join(categories), "view": view, "case": case.id}
    if spec.reference:
        sample["reference"] = _present_box(image, label, box, spec)[1]
    return sample


def _present_box(image: np.ndarray, candidate: np.ndarray, box: tuple, spec: SampleSpec):
    """(image (1,*grid), mask (K,*grid)) float tensors of `box` of a volume and a candidate label map."""
    image_crop = np.ascontiguousarray(image[box])
    mask_crop = label_to_channels(candidate[box], spec.n_foreground + 1)
    shown = present(image_crop, mask_crop, grid=spec.grid,
                    box=tuple(slice(0, s) for s in image_crop.shape))
    return shown.image[0].float(), shown.mask[0].float()


def real_mask_samples(case: VolumeCase, masks: Sequence[np.ndarray], spec: SampleSpec) -> List[Dict[str, Any]]:
    """Validation samples of `case` from real segmenter label maps on its grid, shown exactly as
    scoring shows a mask (mask-box crop of the whole volume; no flips, no augmentation). In 2D,
    each mask gives the slice with the most reference foreground."""
    import torch

    samples = []
    for index, candidate in enumerate(masks):
        image, label, spacing = case.image, case.label, tuple(case.spacing)
        if spec.mode == "2d":
            z = int(np.argmax(label.reshape(label.shape[0], -1).astype(bool).sum(1)))
            image, label, candidate, spacing = image[z], label[z], candidate[z], spacing[1:]
        box = crop_box(candidate > 0, spacing)
        image_t, mask_t = _present_box(image, candidate, box, spec)
        target = dice_per_class(candidate, label, spec.n_foreground)
        samples.append({"image": image_t, "mask": mask_t, "target": torch.from_numpy(target),
                        "category": f"real:{index}", "view": "mask_box", "case": case.id})
    return samples


class VQMDataset:
    """Map-style dataset of `per_case` VQM samples per case; randomness from (seed, epoch, i, k).

    Set `.epoch` before building each epoch's DataLoader (workers are not persistent). With
    `reuse_epochs` > 1 a sample is made once and served again for that many epochs, each time with
    fresh random flips of the presented grid (the target Dice does not change under flips); this
    cuts the corruption cost, which dominates g's training on CPU. The cache lives in this process,
    so it takes effect with `num_workers=0` (the CPU default). What a given (epoch, index) serves
    does not depend on the cache, so a run resumed in the middle of a pool trains exactly as an
    uninterrupted one."""

    def __init__(self, cases: Sequence[VolumeCase], spec: SampleSpec, per_case: int, seed: int,
                 swap_pools: SwapPools | None = None, weak_pool=None, reuse_epochs: int = 1):
        self.cases, self.spec, self.per_case, self.seed = list(cases), spec, int(per_case), int(seed)
        self.swap_pools, self.weak_pool = swap_pools, weak_pool
        self.reuse_epochs = max(1, int(reuse_epochs))
        self.epoch = 0
        self._cache: Dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.cases) * self.per_case

    def __getitem__(self, index: int) -> Dict[str, Any]:
        i, k = divmod(int(index), self.per_case)
        pool = self.epoch // self.reuse_epochs
        cached = self._cache.get(index)
        if cached is not None and cached[0] == pool:
            sample = cached[1]
        else:
            sample = generate_sample(self.cases[i], self.spec, np.random.default_rng([self.seed, pool, i, k]),
                                     self.swap_pools, self.weak_pool)
            if self.reuse_epochs > 1:
                self._cache[index] = (pool, sample)
        if self.epoch % self.reuse_epochs == 0:  # the pool's first epoch serves samples as made
            return sample
        # later epochs flip them, also when a resumed run has just made the pool again
        return _reflip(sample, np.random.default_rng([self.seed, self.epoch, i, k, 1]))


def _reflip(sample: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
    """The same sample with image and mask flipped together along random spatial axes."""
    dims = [d for d in range(1, sample["image"].dim()) if rng.random() < 0.5]
    if not dims:
        return sample
    return {**sample, **{key: sample[key].flip(dims) for key in ("image", "mask", "reference") if key in sample}}


def collate(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    import torch

    batch = {key: torch.stack([it[key] for it in items]) for key in ("image", "mask", "target")}
    if "reference" in items[0]:
        batch["reference"] = torch.stack([it["reference"] for it in items])
    return {**batch, "category": [it["category"] for it in items], "view": [it["view"] for it in items],
            "case": [it["case"] for it in items]}


# --------------------------------------------------------------------------------- metrics

def validation_scores(predictions: np.ndarray, targets: np.ndarray, n_synthetic: int) -> Dict[str, float]:
    """Validation MAE and Pearson of g. The first `n_synthetic` rows are VQM samples, the rest
    masks of real segmenters. With real masks, `val_mae` (the early-stopping criterion) is the
    mean of the synthetic and the real MAE, so that g is selected for the masks it will score and
    not only for corruptions; `val_pearson` pools both. Per-source numbers are reported too."""
    errors = np.abs(predictions - targets)
    scores = {"val_mae": float(errors.mean()), "val_pearson": pearson(predictions.ravel(), targets.ravel())}
    if len(targets) > n_synthetic:
        synthetic, real = slice(0, n_synthetic), slice(n_synthetic, None)
        scores.update({"val_mae_synthetic": float(errors[synthetic].mean()),
                       "val_mae_real": float(errors[real].mean()),
                       "val_pearson_real": pearson(predictions[real].ravel(), targets[real].ravel())})
        scores["val_mae"] = 0.5 * (scores["val_mae_synthetic"] + scores["val_mae_real"])
    return scores


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation; 0 when either side is constant (no linear relation measurable)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or a.std() < 1e-12 or b.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


# -------------------------------------------------------------------------------- training

def _split_cases(source, config: QualityTrainConfig, split_file: Path | None = None):
    """(training refs or cases, validation ..., labels dict) from a DatasetSpec or case lists.
    For a DatasetSpec the split is also written to `split_file` (see `write_split_file`)."""
    from ..data.dataset import DatasetSpec, split_validation, write_split_file

    if isinstance(source, DatasetSpec):
        spec = source
        if not spec.validation:
            n_val = config.n_validation or (max(1, round(0.2 * len(spec.training)))
                                            if len(spec.training) >= 2 else 0)
            if n_val:
                spec = split_validation(spec, n_val, config.seed)
        if split_file is not None:
            write_split_file(spec, split_file, written_by="qgseg quality train")
        return load_cases(spec.training, spec.labels), load_cases(spec.validation, spec.labels), \
            dict(spec.labels)
    if isinstance(source, Mapping):
        train = [as_volume_case(c) for c in source["training"]]
        val = [as_volume_case(c) for c in source.get("validation", [])]
        labels = source.get("labels")
    else:
        cases = [as_volume_case(c) for c in source]
        n_val = config.n_validation or (max(1, round(0.2 * len(cases))) if len(cases) >= 2 else 0)
        order = np.random.default_rng(config.seed).permutation(len(cases))
        val = [cases[i] for i in sorted(order[:n_val])]
        train = [cases[i] for i in sorted(order[n_val:])]
        labels = None
    if labels is None:
        highest = max(int(c.label.max()) for c in train + val)
        labels = {0: "background", **{v: f"label_{v}" for v in range(1, max(highest, 1) + 1)}}
    return train, val, {int(k): str(v) for k, v in dict(labels).items()}


class RankBatchSampler:
    """Under torchrun: rank `rank`'s slice of every global batch of the single-process order.

    The order is the permutation DataLoader's RandomSampler draws from the same generator, and
    global batch j (`batch_size * world_size` samples) is split into `world_size` disjoint slices,
    so the union over ranks of step j's samples is exactly the single-process batch j of a run
    with batch size `batch_size * world_size`. With fewer samples than one global batch (and
    `drop_last` false) the samples are split evenly, the remainder unused."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, generator, drop_last: bool):
        self.n, self.rank, self.world_size = int(n), int(rank), int(world_size)
        self.global_batch = int(batch_size) * self.world_size
        self.generator = generator
        if drop_last and self.n >= self.global_batch:
            self.per_rank, self.batches = int(batch_size), self.n // self.global_batch
        else:
            self.per_rank, self.batches = self.n // self.world_size, 1
            self.global_batch = self.per_rank * self.world_size

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        import torch

        order = torch.randperm(self.n, generator=self.generator).tolist()
        for j in range(self.batches):
            start = j * self.global_batch + self.rank * self.per_rank
            yield order[start:start + self.per_rank]


def _loader(dataset, batch_size, shuffle, workers, seed, drop_last=False, rank=0, world_size=1):
    import torch
    from torch.utils.data import DataLoader

    from ..engine.cancel import ignore_interrupts

    generator = torch.Generator().manual_seed(int(seed))
    common = {"num_workers": workers, "collate_fn": collate, "generator": generator,
              "worker_init_fn": ignore_interrupts if workers else None}
    if world_size > 1 and shuffle:
        sampler = RankBatchSampler(len(dataset), batch_size, rank, world_size, generator, drop_last)
        return DataLoader(dataset, batch_sampler=sampler, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **common)


def segmentation_loss(logits, reference):
    """Soft Dice + cross-entropy of g's segmentation head (B,K+1,*grid) against the presented
    reference (B,K,*grid), whose resizing leaves soft partial-volume edges (soft targets)."""
    import torch

    from .predictor import soft_dice

    reference = reference.float().clamp(0, 1)
    target = torch.cat([(1 - reference.sum(1, keepdim=True)).clamp(0, 1), reference], dim=1)
    cross_entropy = -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()
    dice = soft_dice(torch.softmax(logits, dim=1)[:, 1:], reference).mean()
    return cross_entropy + (1 - dice)


def predict_batches(model, batches, device, amp_dtype=None) -> np.ndarray:
    """Stack g's predictions (N, K) over presented batches (dicts with image and mask)."""
    import torch

    outs = []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            with autocast(device, amp_dtype):
                pred = model(batch["image"].to(device), batch["mask"].to(device))
            outs.append(pred.float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, model.n_foreground), np.float32)


def _amp_dtype(config: QualityTrainConfig, device):
    return None if config.amp == "off" else autocast_dtype(device)


def _workers(config: QualityTrainConfig, device) -> int:
    if config.num_workers is not None:
        return max(0, int(config.num_workers))
    return 0 if device.type != "cuda" else max(0, min(8, (os.cpu_count() or 1) - 1))


# ------------------------------------------------------------------ the training run, in parts

@dataclass
class _Validation:
    """g's validation batches (synthetic VQMs first, then real segmenter masks), their true Dice,
    and how long making them took. Rank 0 validates for every rank."""

    batches: list
    targets: Any            # (N, K) array, or None without batches
    n_synthetic: int
    real_batches: list
    make_s: float

    @property
    def n_real(self) -> int:
        return len(self.targets) - self.n_synthetic if self.targets is not None else 0


@dataclass
class _Optimisation:
    """Everything a training step touches: g, its (DDP-wrapped) training view, the optimizer,
    warm-restart scheduler, fp16 scaler, AMP dtype and the regression loss."""

    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    amp_dtype: Any
    loss_fn: Any
    train_model: Any = None


@dataclass
class _Timing:
    """Where training time goes: making samples (VQMs) vs optimizer steps."""

    make_s: float = 0.0
    step_s: float = 0.0
    made: int = 0


def _as_config(config: QualityTrainConfig | Mapping | None) -> QualityTrainConfig:
    if config is None:
        config = QualityTrainConfig()
    elif isinstance(config, Mapping):
        config = QualityTrainConfig.from_dict(config)
    config.validate()
    return config


def _stage_reporter(events, progress: bool):
    """stage(name, index, total): an event, and a line on stderr when a progress bar is shown."""
    def stage(name, index, total):
        if events is not None:
            events.stage(name, index, total)
        if progress:
            print(f"[quality {index}/{total}] {name}", file=sys.stderr, flush=True)
    return stage


def _check_cases(train_cases, val_cases, labels) -> int:
    """The number of foreground classes, after checking every case's labels fit the declared ones."""
    if not train_cases:
        raise DataError("no labeled training cases for the quality predictor")
    n_foreground = len(labels) - 1
    if n_foreground < 1:
        raise DataError("the dataset declares no foreground class")
    for case in train_cases + val_cases:
        if case.label.size and int(case.label.max()) > n_foreground:
            raise DataError(f"case '{case.id}': label value {int(case.label.max())} exceeds the "
                            f"{n_foreground} declared foreground class(es)")
    return n_foreground


def _weak_pool(config: QualityTrainConfig, train_cases, n_foreground: int, run_dir: Path, dist, events,
               cancel, stage, progress: bool = False):
    """Weak-segmenter snapshots' masks (trained once, cached) plus --extra-masks, or None."""
    from ..engine.device import translate_oom
    from .weak import WeakConfig, load_mask_folders, merged_pool, train_weak_snapshots

    weak_pool = None
    if config.weak is not None and config.p_weak > 0:
        stage("weak segmenter snapshots", 2, 4)
        weak_cfg = WeakConfig(**{"seed": config.seed, **dict(config.weak)})
        weak_start = time.perf_counter()
        bar = None  # made at the first step, when the total is known

        def weak_progress(step, total):
            nonlocal bar
            if progress and bar is None:  # `progress` is off on every rank but 0
                bar = _progress_bar(True, total, 0, desc="weak segmenter", smoothing=0)  # snapshot steps are slow
            if bar is not None:
                bar.update(step - bar.n)
            if events is not None and (step % 10 == 0 or step == total):
                eta = (time.perf_counter() - weak_start) / step * (total - step)  # snapshots' predictions included
                events.progress(step, total, eta_s=eta, stage="weak segmenter")

        def make_weak_pool():
            with translate_oom("weak segmenter training"):
                return train_weak_snapshots(train_cases, n_foreground + 1, config.mode, weak_cfg,
                                            run_dir / "weak", device=dist.device, progress=weak_progress,
                                            cancel=cancel)

        if dist.is_main:  # rank 0 trains and caches the snapshots; the others then read the cache
            try:
                weak_pool = make_weak_pool()
            finally:
                if bar is not None:
                    bar.close()
        dist.barrier()
        if not dist.is_main:
            weak_pool = make_weak_pool()
    if config.extra_masks and config.p_weak > 0:
        extra = load_mask_folders(config.extra_masks, train_cases, n_foreground)
        weak_pool = merged_pool(weak_pool, extra, config.seed)
    return weak_pool


def _validation(config: QualityTrainConfig, train_cases, val_cases, val_spec: SampleSpec, n_foreground: int,
                workers: int, dist) -> _Validation:
    """Validation VQMs of the validation cases (of fresh training VQMs when there are none), and
    the real masks of --validation-masks; made once, on rank 0."""
    import torch

    from .weak import load_mask_folders

    val_source = val_cases or train_cases
    val_set = VQMDataset(val_source, val_spec, config.val_samples_per_case, config.seed + 7919,
                         SwapPools(val_source, n_foreground, config.mode) if len(val_source) > 1 else None)
    val_set.epoch = 10**6
    started = time.time()
    batches = list(_loader(val_set, config.batch_size, False, workers, config.seed)) if dist.is_main else []
    real_batches = []
    if config.validation_masks and dist.is_main:
        real = load_mask_folders(config.validation_masks, val_cases, n_foreground, role="validation")
        real_samples = [s for case in val_cases for s in real_mask_samples(case, real.get(case.id, []), val_spec)]
        real_batches = [collate(real_samples[i:i + config.batch_size])
                        for i in range(0, len(real_samples), config.batch_size)]
        batches += real_batches
    targets = torch.cat([b["target"] for b in batches]).numpy() if batches else None
    return _Validation(batches, targets, len(val_set), real_batches, time.time() - started)


def _optimisation(model_config: Mapping, config: QualityTrainConfig, dist) -> _Optimisation:
    """A freshly seeded g with AdamW, cosine warm restarts and the configured loss."""
    import torch

    from .predictor import QualityPredictor

    torch.manual_seed(config.seed)
    model = QualityPredictor(model_config).to(dist.device)
    model = dist.convert_sync_batchnorm([model], config.sync_batchnorm)[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=config.t0, T_mult=config.t_mult, eta_min=config.eta_min)
    amp_dtype = _amp_dtype(config, dist.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    loss_fn = torch.nn.MSELoss() if config.loss == "mse" else torch.nn.SmoothL1Loss(beta=config.smoothl1_beta)
    return _Optimisation(model, optimizer, scheduler, scaler, amp_dtype, loss_fn)


def _resume(last_path: Path, opt: _Optimisation, model_config: Mapping, config: QualityTrainConfig,
            dist, events):
    """(start epoch, history, best) from the run folder's last.pt, restoring every state; a fresh
    start without one. A last.pt of another g configuration is refused."""
    import torch

    best = {"epoch": -1, "val_mae": float("inf"), "val_pearson": 0.0}
    state = dist.call_on_main(lambda: torch.load(last_path, map_location="cpu", weights_only=True)
                              if last_path.is_file() else None)
    if state is None:
        return 0, [], best
    saved = state.get("config", {})
    n_foreground = model_config["n_foreground"]
    if saved.get("grid_size") != model_config["grid_size"] or saved.get("backbone") != model_config["backbone"] \
            or saved.get("n_foreground") != n_foreground \
            or bool(saved.get("segmentation_head")) != config.segmentation_head:
        raise RunFolderError(f"{last_path}: the run folder holds a quality predictor with another "
                             "configuration; use a new --run-dir or delete that file to start over")
    opt.model.load_state_dict({"output_shift": torch.zeros(n_foreground), **state["state_dict"]})
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    if opt.scaler is not None and state.get("scaler"):
        opt.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    start_epoch = int(state["epoch"])
    if events is not None:
        events.warning(f"resuming quality predictor training at epoch {start_epoch + 1} from {last_path}")
    return start_epoch, list(state["history"]), dict(state["best"])


def _training_step(opt: _Optimisation, batch, config: QualityTrainConfig, device):
    """One optimizer step on a batch; returns its loss (not detached)."""
    import torch

    image, mask = batch["image"].to(device), batch["mask"].to(device)
    target = batch["target"].to(device)
    opt.optimizer.zero_grad(set_to_none=True)
    with autocast(device, opt.amp_dtype):
        pred, segmentation = opt.train_model(image, mask, with_segmentation=True)
    loss = opt.loss_fn(pred.float(), target)
    if segmentation is not None:
        loss = loss + config.segmentation_weight * segmentation_loss(
            segmentation.float(), batch["reference"].to(device))
    if opt.scaler is not None:
        opt.scaler.scale(loss).backward()
        opt.scaler.unscale_(opt.optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(opt.model.parameters(), config.grad_clip)
    if opt.scaler is not None:
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    else:
        opt.optimizer.step()
    return loss


def _progress_bar(enabled: bool, total: int, initial: int, desc: str = "quality predictor",
                  smoothing: float = 0.3):
    """A terminal bar; `smoothing=0` bases the ETA on the average rate, for steps of uneven cost."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, leave=False, smoothing=smoothing)


def _validate(opt: _Optimisation, validation: _Validation, dist) -> Dict[str, float]:
    """Rank 0's validation scores, shared with every rank."""
    scores = None
    if dist.is_main:
        scores = validation_scores(predict_batches(opt.model, validation.batches, dist.device, opt.amp_dtype),
                                   validation.targets, validation.n_synthetic)
    return dist.broadcast_object(scores)


def _training_state(model, optimizer, scheduler, scaler, epoch, history, best, config, labels) -> dict:
    import torch

    from .predictor import FORMAT_VERSION, TRAIN_FORMAT

    return {"format": TRAIN_FORMAT, "format_version": FORMAT_VERSION,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": dict(model.config), "train_config": config.to_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "torch_rng": torch.get_rng_state(), "epoch": int(epoch),
            "history": json.loads(json.dumps(history)), "best": dict(best),
            "labels": {str(k): v for k, v in labels.items()}}


def _save_state(path: Path, state: dict) -> None:
    import torch

    from ..fileio import atomic_path

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def _summary(run_dir: Path, history, best, stopped_early: bool, per_case: int, train_cases, val_cases,
             weak_pool, device) -> Dict[str, Any]:
    """The result keys every rank returns (rank 0 adds timing, plots' paths and calibration)."""
    return {"best_checkpoint": str(run_dir / BEST_FILE), "last_checkpoint": str(run_dir / LAST_FILE),
            "curve": str(run_dir / CURVE_FILE), "calibration": str(run_dir / CALIBRATION_FILE),
            "history": history, "best_epoch": best["epoch"], "best_val_mae": best["val_mae"],
            "best_val_pearson": best["val_pearson"], "epochs_run": len(history),
            "stopped_early": stopped_early, "samples_per_case": per_case,
            "n_training_cases": len(train_cases), "n_validation_cases": len(val_cases),
            "weak_snapshots": len(weak_pool.snapshots) if weak_pool is not None else 0,
            "timing": {}, "device": str(device)}


def _calibrate_best(best_path: Path, validation: _Validation, config: QualityTrainConfig, device, events):
    """Load the best g and, with enough real validation masks, shift its output to fit them
    (saved into best.pt); returns (best g, shift or None)."""
    from .calibrate import MIN_MASKS, calibrate_samples
    from .predictor import load_predictor, save_predictor

    best_model = load_predictor(best_path, device)
    if not (validation.real_batches and config.calibrate):
        return best_model, None
    if validation.n_real < MIN_MASKS:
        if events is not None:
            events.warning(f"only {validation.n_real} real validation masks: g's output is not calibrated "
                           f"(at least {MIN_MASKS} needed)")
        return best_model, None
    shift = calibrate_samples(best_model, validation.real_batches, validation.targets[validation.n_synthetic:],
                              device)
    save_predictor(best_path, best_model, {**best_model.meta, "calibration": {
        "shift": [float(v) for v in shift], "n_masks": validation.n_real,
        "group": "validation", "masks": list(config.validation_masks)}})
    return best_model, shift


def train_quality_predictor(source, config: QualityTrainConfig | Mapping | None = None,
                            run_dir: str | os.PathLike = "runs/quality", events=None, cancel=None,
                            progress: bool = True, device: str = "auto") -> Dict[str, Any]:
    """Train g on `source` (a DatasetSpec, a list of cases, or {"training": [...],
    "validation": [...], "labels": {...}}) into `run_dir`; resumes from `checkpoints/last.pt` there.

    Stages: loading cases, weak segmenter snapshots (when configured), the quality predictor
    (epochs of VQM batches, validated and checkpointed after each), calibration.

    Returns a dict with the checkpoint paths, the best epoch and its validation MAE/Pearson, the
    history, and timing (seconds per sample made, share of time spent making samples)."""
    from ..engine.device import translate_oom
    from ..engine.distributed import DistributedContext
    from .predictor import predictor_config

    config = _as_config(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dist = DistributedContext.setup(device)
    dev = dist.device
    if not dist.is_main:  # one event stream, one progress bar: rank 0's
        events, progress = None, False
    started = time.time()
    if events is not None:
        events.heartbeat_thread()  # no-op when already beating; the caller's close() stops it
    stage = _stage_reporter(events, progress)

    stage("loading cases", 1, 4)
    from ..data.dataset import SPLIT_FILE

    train_cases, val_cases, labels = _split_cases(source, config,
                                                  split_file=run_dir / SPLIT_FILE if dist.is_main else None)
    n_foreground = _check_cases(train_cases, val_cases, labels)
    model_config = predictor_config(n_foreground=n_foreground, mode=config.mode,
                                    backbone=config.backbone, grid_size=config.grid_size,
                                    backbone_options=config.backbone_options,
                                    class_names=[labels[v] for v in range(1, n_foreground + 1)],
                                    segmentation_head=config.segmentation_head)
    vqm_config = _make_vqm_config(config.vqm, config.p_weak)
    weak_pool = _weak_pool(config, train_cases, n_foreground, run_dir, dist, events, cancel, stage, progress)

    stage("quality predictor", 3, 4)
    per_case = config.resolved_samples_per_case(dev.type)
    train_spec = SampleSpec(config.mode, tuple(model_config["grid_size"]), n_foreground, vqm_config, config.p_patch,
                            config.flip, config.intensity_augmentation, True, reference=config.segmentation_head)
    val_spec = dataclasses.replace(train_spec, train=False, reference=False)
    train_set = VQMDataset(train_cases, train_spec, per_case, config.seed,
                           SwapPools(train_cases, n_foreground, config.mode), weak_pool, config.reuse_epochs)
    workers = _workers(config, dev)
    validation = _validation(config, train_cases, val_cases, val_spec, n_foreground, workers, dist)
    opt = _optimisation(model_config, config, dist)
    start_epoch, history, best = _resume(run_dir / LAST_FILE, opt, model_config, config, dist, events)

    if len(train_set) < 2 * dist.world_size:
        raise ConfigError("g's batch norm needs at least 2 training samples per epoch"
                          + (f" and rank ({dist.world_size} ranks)" if dist.enabled else "")
                          + "; raise samples_per_case or add training cases")
    # a last batch of one sample would break batch norm: drop the incomplete batch when possible
    global_batch = config.batch_size * dist.world_size
    drop_last = len(train_set) > global_batch
    n_batches = len(train_set) // global_batch if drop_last else 1
    opt.train_model = dist.wrap(opt.model)  # DDP under torchrun: gradients averaged over ranks
    total_steps = config.epochs * n_batches
    meta = {"labels": {str(k): v for k, v in labels.items()}, "train_config": config.to_dict(),
            "training_cases": [c.id for c in train_cases], "validation_cases": [c.id for c in val_cases]}
    bar = _progress_bar(progress, total_steps, start_epoch * n_batches)
    timing = _Timing()
    stopped_early = False
    loop_started = time.time()

    def report_step(epoch, step):
        if events is not None:
            eta = (time.time() - loop_started) / (step - start_epoch * n_batches) * (total_steps - step)
            events.progress(step, total_steps, epoch=epoch + 1, eta_s=eta, stage="quality predictor")
        if bar is not None:
            bar.update(1)

    interrupts = cancel.catching_interrupts() if cancel is not None else contextlib.nullcontext()
    try:
        with translate_oom("quality predictor training"), interrupts:  # Ctrl-C stops at the next step
            for epoch in range(start_epoch, config.epochs):
                if best["epoch"] >= 0 and config.patience and epoch - best["epoch"] >= config.patience:
                    stopped_early = True
                    break
                train_set.epoch = epoch
                batches = _loader(train_set, config.batch_size, True, workers, config.seed * 100003 + epoch,
                                  drop_last, dist.rank, dist.world_size)
                losses = _train_epoch(epoch, batches, n_batches, opt, config, dist, cancel, timing, report_step)
                best = _end_epoch(epoch, losses, opt, validation, history, best, dist, events, run_dir, meta,
                                  config, labels)
    finally:  # a cancelled run resumes from the last completed epoch's state (checkpoints/last.pt)
        if bar is not None:
            bar.close()
    if best["epoch"] < 0:
        raise DataError(f"{run_dir}: no epoch was trained (epochs={config.epochs}); nothing to save")
    result = _summary(run_dir, history, best, stopped_early, per_case, train_cases, val_cases, weak_pool, dev)
    if not dist.is_main:  # rank 0 makes the plots and the result file
        return result
    stage("calibration", 4, 4)
    return _finish(result, run_dir, validation, config, timing, workers, started, events, dev, opt.amp_dtype)


def _train_epoch(epoch: int, batches, n_batches: int, opt: _Optimisation, config: QualityTrainConfig, dist,
                 cancel, timing: _Timing, report_step) -> list:
    """One epoch of optimizer steps (the scheduler stepped per batch, fractionally); checks the
    cancel file before each step; returns the batch losses as tensors (read once, at the epoch's
    end: no device sync per step)."""
    opt.model.train()
    losses = []
    tick = time.time()
    for b, batch in enumerate(batches):
        got = time.time()
        timing.make_s += got - tick
        timing.made += len(batch["target"])
        if dist.main_flag(cancel is not None and cancel.requested):
            raise cancel.error()
        loss = _training_step(opt, batch, config, dist.device)
        opt.scheduler.step(epoch + (b + 1) / n_batches)
        losses.append(loss.detach())
        tick = time.time()
        timing.step_s += tick - got
        report_step(epoch, epoch * n_batches + b + 1)
    return losses


def _end_epoch(epoch: int, losses, opt: _Optimisation, validation: _Validation, history: list, best: dict,
               dist, events, run_dir: Path, meta: dict, config: QualityTrainConfig, labels) -> dict:
    """Validate, record the epoch in `history` (and as metric events), save best.pt when the
    validation MAE improved and last.pt always; returns the (possibly new) best."""
    import torch

    from .predictor import save_predictor

    scores = _validate(opt, validation, dist)
    val_mae, val_r = scores["val_mae"], scores["val_pearson"]
    train_loss = float(torch.stack(losses).double().mean()) if losses else None
    if dist.enabled:  # the mean over ranks of their mean batch losses
        train_loss = dist.mean_dict({"loss": train_loss} if losses else {}).get("loss")
    record = {"epoch": epoch + 1, "train_loss": train_loss, **scores,
              "lr": float(opt.optimizer.param_groups[0]["lr"])}
    history.append(record)
    if events is not None:
        for name, value in scores.items():
            events.metric(name, value, step=epoch + 1, split="validation")
        if record["train_loss"] is not None:
            events.metric("train_loss", record["train_loss"], step=epoch + 1, split="train")
    improved = val_mae < best["val_mae"]
    if improved:
        best = {"epoch": epoch + 1, "val_mae": val_mae, "val_pearson": val_r}
    if dist.is_main:
        if improved:
            save_predictor(run_dir / BEST_FILE, opt.model, {**meta, "epoch": epoch + 1, "val_mae": val_mae,
                                                             "val_pearson": val_r})
        _save_state(run_dir / LAST_FILE, _training_state(opt.model, opt.optimizer, opt.scheduler, opt.scaler,
                                                         epoch + 1, history, best, config, labels))
        write_json_atomic(run_dir / HISTORY_FILE, {"history": history, "best": best})
    dist.barrier()
    return best


def _finish(result: Dict[str, Any], run_dir: Path, validation: _Validation, config: QualityTrainConfig,
            timing: _Timing, workers: int, started: float, events, device, amp_dtype) -> Dict[str, Any]:
    """Rank 0 after the last epoch: training curve, calibration of the best g, its validation
    scatter plot, timing, and quality_result.json."""
    from . import plots

    curve = plots.training_curve(result["history"], run_dir / CURVE_FILE)
    best_model, shift = _calibrate_best(run_dir / BEST_FILE, validation, config, device, events)
    val_pred = predict_batches(best_model, validation.batches, device, amp_dtype)
    calibration = plots.calibration_scatter(
        val_pred.ravel(), validation.targets.ravel(), run_dir / CALIBRATION_FILE,
        title="validation VQMs" + (" and real masks" if validation.n_real > 0 else ""))
    busy = timing.make_s + timing.step_s
    timing_report = {"seconds_per_sample": (timing.make_s / timing.made) if timing.made else None,
                     "sample_time_fraction": (timing.make_s / busy) if busy > 0 else None,
                     "workers": workers, "wall_s": round(time.time() - started, 2),
                     "sample_making_s": round(timing.make_s + validation.make_s, 2)}
    fraction = timing_report["sample_time_fraction"]
    if events is not None and fraction and fraction > 0.7:
        events.warning(f"making VQM samples took {fraction:.0%} of the training time; use more "
                       "sample-making workers (--set num_workers=N, one per spare CPU core) or a "
                       "machine with more cores")
    result = {**result, "curve": str(curve), "calibration": str(calibration), "timing": timing_report,
              "calibration_shift": None if shift is None else [float(v) for v in shift]}
    write_json_atomic(run_dir / RESULT_FILE, {k: v for k, v in result.items() if k != "history"})
    return result
