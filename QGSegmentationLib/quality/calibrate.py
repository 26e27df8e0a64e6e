"""Calibrating g's output on real segmentations of known quality.

g is trained mostly on synthetic corruptions; on the masks of real segmenters it can be biased as
a whole (on LA it rated real masks ~0.04-0.06 too high, BENCHMARKS.md §2d) while still ranking
them well. The remedy is the simplest one that cannot overfit a handful of cases: a per-class
shift, the mean of (true Dice - predicted Dice) over real masks of cases g was not trained on —
the validation cases, or cases a user reviewed and corrected. The shift is stored in the predictor
(`QualityPredictor.output_shift`, added to its output and clipped to [0, 1]), so every consumer
(scoring, evaluation, QW/QAR guidance) sees calibrated numbers. Ranking and Pearson do not change;
only the offset does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from ..errors import ConfigError, DataError

MIN_MASKS = 5


def fit_shift(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class mean of (target - prediction) over (N, K) arrays of uncalibrated predictions."""
    predictions, targets = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
    if predictions.shape != targets.shape or predictions.ndim != 2:
        raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} must both be (N, K)")
    if len(predictions) < MIN_MASKS:
        raise DataError(f"calibration needs at least {MIN_MASKS} masks of known quality, got {len(predictions)}")
    return (targets - predictions).mean(0)


def set_shift(model, shift: Sequence[float]) -> None:
    import torch

    model.output_shift.copy_(torch.as_tensor(np.asarray(shift, np.float32)))


def calibrate_samples(model, batches, targets: np.ndarray, device="cpu") -> np.ndarray:
    """Fit and set `model`'s shift on presented batches (dicts with image and mask) whose true
    Dice is `targets` (N, K); the model's current shift is ignored. Returns the shift."""
    from .train import predict_batches

    set_shift(model, np.zeros(model.n_foreground))
    shift = fit_shift(predict_batches(model, batches, device), targets)
    set_shift(model, shift)
    return shift


def calibrate_checkpoint(checkpoint: str | os.PathLike, dataset: str | os.PathLike,
                         mask_folders: Sequence[str | os.PathLike], output: str | os.PathLike,
                         group: str = "validation", device="cpu") -> Dict[str, Any]:
    """Write a calibrated copy of a predictor file: its shift fitted on the masks in
    `mask_folders` (`<case>.nrrd` or NIfTI/MHA) of the `group` cases of `dataset` (their labels are the truth).
    Refuses cases g was trained on: their masks would teach the shift g's training bias."""
    import torch

    from ..data.dataset import load_dataset
    from .predictor import QualityEnsemble, load_predictor, save_predictor
    from .train import SampleSpec, collate, load_cases, real_mask_samples
    from .weak import load_mask_folders

    model = load_predictor(checkpoint, device)
    if isinstance(model, QualityEnsemble):
        raise ConfigError(f"{checkpoint}: an ensemble of {len(model.members)} predictors; calibrate "
                          "each member file, then combine them again with `qgseg quality ensemble`")
    spec = load_dataset(dataset)
    refs = list(spec.group(group))
    if not refs:
        raise DataError(f"{dataset}: no '{group}' cases to calibrate on")
    trained_on = set(model.meta.get("training_cases", []))
    overlap = sorted(trained_on & {r.id for r in refs})
    if overlap:
        raise DataError(f"{dataset}: {group} case(s) {', '.join(overlap[:5])} were used to train {checkpoint}; "
                        "calibrate on cases g has not seen")
    cases = load_cases(refs, spec.labels)
    masks = load_mask_folders(mask_folders, cases, model.n_foreground, role=group)
    sample_spec = SampleSpec(mode=model.config["mode"], grid=tuple(model.grid_size),
                             n_foreground=model.n_foreground, vqm_config=None, p_patch=0.0, flip=False,
                             intensity=False, train=False)
    samples = [s for case in cases for s in real_mask_samples(case, masks.get(case.id, []), sample_spec)]
    batches = [collate(samples[i:i + 16]) for i in range(0, len(samples), 16)]
    targets = torch.cat([b["target"] for b in batches]).numpy() if batches else np.zeros((0, model.n_foreground))
    shift = calibrate_samples(model, batches, targets, device)
    meta = {**model.meta, "calibration": {"shift": [float(v) for v in shift], "n_masks": len(samples),
                                          "group": group, "masks": [str(f) for f in mask_folders]}}
    save_predictor(output, model, meta)
    return {"output": str(Path(output)), "shift": [float(v) for v in shift], "n_masks": len(samples)}
