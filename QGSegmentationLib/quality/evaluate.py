"""How good is a quality predictor? Agreement with true Dice, failure detection, image dependence.

`evaluate_predictor(model, pairs)` scores (image, candidate mask, reference) triples and reports:
- MAE, Pearson and Spearman correlation between predicted and true Dice (per class pooled);
- failure-detection AUROC: how well low predictions flag masks whose true Dice is below 0.7
  (positives = failures, score = 1 - prediction; ties get average ranks);
- the image-dependence check of the paper: the same masks scored with blacked-out images and with
  images taken from other cases. A predictor that really reads the image must lose most of its
  correlation with the true Dice there. Criterion (`image_dependence_ok`): the real Pearson r is
  positive and both r_black and r_shuffled are at most (1 - min_drop) * r, min_drop = 0.5 by
  default, i.e. at least half of the correlation disappears without the right image. The ablated
  correlations are compared signed: a negative one means the predictions point the wrong way,
  which is no usable quality signal either (both values are reported as they are). Some positive
  correlation legitimately survives, since a mask alone reveals gross failures (empty, noise),
  which is why the criterion asks for a drop, not for zero.

All metrics are computed with numpy/scipy only (no scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .second_opinion import SECOND_OPINION_COLUMN
from .train import dice_per_class, pearson

FAILURE_THRESHOLD = 0.7
MIN_CORRELATION_DROP = 0.5


@dataclass
class EvalPair:
    """An image (z,y,x) or slice (y,x), a candidate label map and the reference label map."""

    case: str
    image: np.ndarray
    mask: np.ndarray
    reference: np.ndarray
    spacing: tuple | None = None
    category: str = ""


def rank_average(values: Sequence[float]) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(np.asarray(values, np.float64), method="average")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    if len(a) < 2:
        return 0.0
    return pearson(rank_average(a), rank_average(b))


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula; NaN without both classes.

    AUROC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rank_average(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def agreement_metrics(predicted: Sequence[float], true: Sequence[float],
                      failure_threshold: float = FAILURE_THRESHOLD) -> Dict[str, Any]:
    p, t = np.asarray(predicted, np.float64).ravel(), np.asarray(true, np.float64).ravel()
    failures = t < failure_threshold
    return {"n": int(p.size), "mae": float(np.abs(p - t).mean()) if p.size else float("nan"),
            "pearson": pearson(p, t), "spearman": spearman(p, t),
            "auroc_failure": auroc(1.0 - p, failures), "n_failures": int(failures.sum()),
            "failure_threshold": failure_threshold}


def image_dependence_ok(r_real: float, r_black: float, r_shuffled: float | None,
                        min_drop: float = MIN_CORRELATION_DROP) -> bool:
    """True when the real correlation is positive and each ablated (signed) r is at most
    (1 - min_drop) times it (a missing shuffled value is not held against the model)."""
    if not r_real > 0:
        return False
    limit = (1.0 - min_drop) * r_real
    ablated = [r_black] + ([r_shuffled] if r_shuffled is not None else [])
    return all(r <= limit for r in ablated)


def _resize_like(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if tuple(image.shape) == tuple(shape):
        return image
    mode = "trilinear" if image.ndim == 3 else "bilinear"
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    return F.interpolate(x, size=tuple(shape), mode=mode, align_corners=False)[0, 0].numpy()


def _predict(model, pair: EvalPair, image: np.ndarray, device) -> np.ndarray:
    from .score import predict_volume

    return predict_volume(model, image, pair.mask, pair.spacing, device)


def _as_pair(item, index: int) -> EvalPair:
    if isinstance(item, EvalPair):
        return item
    image, mask, reference = item[:3]
    spacing = item[3] if len(item) > 3 else None
    return EvalPair(f"pair_{index:04d}", np.asarray(image, np.float32), np.asarray(mask),
                    np.asarray(reference), spacing)


# Ways of joining g's estimate with a second opinion into one estimate (see review.ORDERS).
COMBINATIONS = {"mean of both": lambda g, other: (g + other) / 2, "lower of both": np.minimum}


@dataclass
class _Scored:
    """One evaluated pair: true Dice and g's prediction per class, g's predictions with the image
    blacked out / replaced by another case's ("black", "shuffled"), and the second opinion."""

    true: np.ndarray
    predicted: np.ndarray
    ablated: Dict[str, np.ndarray]
    second_opinion: Optional[np.ndarray]

    def rows(self, pair: EvalPair) -> List[Dict[str, Any]]:
        """One row per class: case, category, class, true_dice, predicted, the ablated predictions
        and the second opinion when there are."""
        rows = []
        for c in range(len(self.true)):
            row = {"case": pair.case, "category": pair.category, "class": c + 1,
                   "true_dice": float(self.true[c]), "predicted": float(self.predicted[c])}
            for name, values in self.ablated.items():
                row[f"predicted_{name}_image"] = float(values[c])
            if self.second_opinion is not None:
                row[SECOND_OPINION_COLUMN] = float(self.second_opinion[c])
            rows.append(row)
        return rows


def _score(model, pair: EvalPair, device, second_opinion, ablate: bool, other_image) -> _Scored:
    """g on the pair (and, with `ablate`, on a black image and on `other_image` when given)."""
    k = model.n_foreground
    true = dice_per_class(pair.mask, pair.reference, k)
    predicted = _predict(model, pair, pair.image, device)
    agreement = None
    if second_opinion is not None:
        agreement = second_opinion.agreement(pair.case, pair.mask, k,
                                             f"the {pair.category or 'evaluated'} mask of {pair.case}")
    ablated = {}
    if ablate:
        ablated["black"] = _predict(model, pair, np.zeros_like(pair.image), device)
        if other_image is not None:
            ablated["shuffled"] = _predict(model, pair, _resize_like(other_image, pair.image.shape), device)
    return _Scored(true, predicted, ablated, agreement)


def _image_dependence(scored: Sequence[_Scored], truth: np.ndarray, r_real: float, min_drop: float) -> Dict[str, Any]:
    """The check's correlations (real, blacked-out, other case's image) and its verdict."""
    r_black = pearson(np.asarray([s.ablated["black"] for s in scored]).ravel(), truth.ravel())
    shuffled = [s.ablated["shuffled"] for s in scored if "shuffled" in s.ablated]
    r_shuffled = pearson(np.asarray(shuffled).ravel(), truth.ravel()) if shuffled else None
    return {"pearson_real": r_real, "pearson_black": r_black, "pearson_shuffled": r_shuffled,
            "min_drop": min_drop,
            "criterion": f"r_real > 0 and r_black, r_shuffled <= {1 - min_drop:g} * r_real",
            "image_dependence_ok": image_dependence_ok(r_real, r_black, r_shuffled, min_drop)}


def evaluate_predictor(model, pairs: Sequence, device="cpu", failure_threshold: float = FAILURE_THRESHOLD,
                       check_image_dependence: bool = True,
                       min_drop: float = MIN_CORRELATION_DROP, second_opinion=None) -> Dict[str, Any]:
    """Score every pair (EvalPair or (image, mask, reference[, spacing]) tuples of label maps) and
    return {"metrics", "rows", "image_dependence"}; rows hold case, class, category, true and
    predicted Dice (and the ablated predictions when the check runs). With pairs from several
    sources (segmenter folders, corruption categories), "per_source" holds the metrics within each.

    With a `second_opinion.SecondOpinion`, each mask's Dice against that segmenter's mask of the
    same case is measured as a predictor too: rows gain `second_opinion_dice`, the result a
    "second_opinion" entry with the same metrics as g's, and a "combined" entry with the metrics
    of the mean and of the lower of g's estimate and the second opinion (the Review panel's
    "mean of both" / "lower of both" orders)."""
    pairs = [_as_pair(p, i) for i, p in enumerate(pairs)]
    if not pairs:
        from ..errors import DataError

        raise DataError("no pairs to evaluate the quality predictor on")
    model.eval()
    cases = list(dict.fromkeys(p.case for p in pairs))
    first_image = {c: next(p.image for p in pairs if p.case == c) for c in cases}

    def other_image(pair):  # the next case's image, for the shuffled-image ablation
        return first_image[cases[(cases.index(pair.case) + 1) % len(cases)]] if len(cases) > 1 else None

    scored = [_score(model, pair, device, second_opinion, check_image_dependence, other_image(pair))
              for pair in pairs]
    real = np.asarray([s.predicted for s in scored])
    truth = np.asarray([s.true for s in scored])
    result: Dict[str, Any] = {"metrics": agreement_metrics(real, truth, failure_threshold),
                              "rows": [row for pair, s in zip(pairs, scored) for row in s.rows(pair)]}
    estimates = {"g": real}
    if second_opinion is not None:
        agreement = estimates["second_opinion"] = np.asarray([s.second_opinion for s in scored])
        result["second_opinion"] = {"folder": str(second_opinion.folder),
                                    "metrics": agreement_metrics(agreement, truth, failure_threshold)}
        result["combined"] = {name: agreement_metrics(combine(real, agreement), truth, failure_threshold)
                              for name, combine in COMBINATIONS.items()}
    if model.n_foreground > 1:
        result["per_class"] = {c + 1: agreement_metrics(real[:, c], truth[:, c], failure_threshold)
                               for c in range(model.n_foreground)}
    sources = [p.category for p in pairs]
    if len(set(sources)) > 1:
        result["per_source"] = per_source_metrics(sources, estimates, truth, failure_threshold)
    if check_image_dependence:
        result["image_dependence"] = _image_dependence(scored, truth, result["metrics"]["pearson"], min_drop)
        result["image_dependence_ok"] = result["image_dependence"]["image_dependence_ok"]
    return result


def per_source_metrics(sources: Sequence[str], estimates: Dict[str, np.ndarray], truth: np.ndarray,
                       failure_threshold: float = FAILURE_THRESHOLD) -> Dict[str, Dict[str, Any]]:
    """Metrics within each source of masks (one segmenter's folder, or one corruption category).

    The overall correlation rewards telling a weak segmenter from a good one; a user reviewing one
    model's output needs g to rank *that model's* cases, which only the within-source numbers show
    (on LA, g's weak point: BENCHMARKS.md section 6)."""
    sources = np.asarray(sources)
    return {source: {name: agreement_metrics(values[sources == source], truth[sources == source], failure_threshold)
                     for name, values in estimates.items()}
            for source in dict.fromkeys(sources.tolist())}


def make_vqm_pairs(cases: Sequence, per_case: int = 5, seed: int = 0, vqm: Dict | None = None,
                   mode: str = "3d") -> List[EvalPair]:
    """Synthetic evaluation pairs: `per_case` VQM masks of each labeled case (no weak masks, no
    augmentation), whole volumes in 3D mode, slices (foreground preferred) in 2D mode."""
    from .train import SwapPools, _make_vqm_config, _pick_slice, as_volume_case, vqm_candidate

    cases = [as_volume_case(c) for c in cases]
    n_foreground = max(1, max(int(c.label.max()) for c in cases))
    config = _make_vqm_config(vqm or {}, 0.0)
    swap = SwapPools(cases, n_foreground, mode) if len(cases) > 1 else None
    pairs = []
    for i, case in enumerate(cases):
        for j in range(per_case):
            rng = np.random.default_rng([seed, 424242, i, j])
            image, label, spacing = case.image, case.label, tuple(case.spacing)
            if mode == "2d":
                z = _pick_slice(label, rng)
                image, label, spacing = image[z], label[z], spacing[1:]
            candidate, categories, _ = vqm_candidate(label, spacing, n_foreground, config, rng, swap, case.id)
            pairs.append(EvalPair(case.id, image, candidate, label, spacing, "+".join(categories)))
    return pairs


def prediction_pairs(cases: Sequence, prediction_dirs: Sequence,
                     warn: Optional[Callable[[str], None]] = None) -> List[EvalPair]:
    """Real-segmenter evaluation pairs: for every folder of predictions (`<case>.nrrd` on the case's
    own grid, as `qgseg predict` writes them, or NIfTI/MHA: `data.io.find_case_file`) and every
    case it holds, (image, prediction, reference). The folder name becomes the pair's category, so
    results can be split by segmenter. Each prediction must lie on its case's grid
    (`weak.check_mask_on_case_grid`: size, spacing, and origin and direction where known). A folder
    that lacks some of the cases is evaluated on those it holds, and `warn` says which it lacks."""
    from pathlib import Path

    from ..data.io import case_file_pattern, find_case_file, read_label
    from ..errors import DataError
    from .train import as_volume_case
    from .weak import check_mask_on_case_grid

    cases = [as_volume_case(c) for c in cases]
    pairs: List[EvalPair] = []
    for folder in map(Path, prediction_dirs):
        if not folder.is_dir():
            raise DataError(f"{folder}: " + ("a file: pass the folder that holds the predictions" if folder.exists()
                                             else "predictions folder not found"))
        found, missing = 0, []
        for case in cases:
            path = find_case_file(folder, case.id)
            if path is None:
                missing.append(case.id)
                continue
            mask, mask_geometry = read_label(path)
            check_mask_on_case_grid(case, mask, mask_geometry, path, role="prediction")
            pairs.append(EvalPair(case.id, case.image, mask, case.label, tuple(case.spacing),
                                  "/".join(folder.parts[-4:])))
            found += 1
        if not found:
            raise DataError(f"{folder}: holds no {case_file_pattern()} for any of the {len(cases)} evaluated cases")
        if missing and warn is not None:
            warn(f"{folder}: no prediction for {len(missing)} of the {len(cases)} cases, which are left out: "
                 f"{', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    return pairs


def write_evaluation(result: Dict[str, Any], out_dir, title: str = "") -> Dict[str, str]:
    """metrics JSON, per-pair CSV and calibration PNG under `out_dir`; returns their paths."""
    import csv
    import io as _io
    import json
    from pathlib import Path

    from ..fileio import write_text_atomic
    from .plots import calibration_scatter

    out_dir = Path(out_dir)
    summary = {k: v for k, v in result.items() if k != "rows"}
    metrics_path = write_text_atomic(out_dir / "quality_evaluation.json",
                                     json.dumps(summary, indent=1, default=float) + "\n")
    buffer = _io.StringIO()
    rows = result["rows"]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    rows_path = write_text_atomic(out_dir / "quality_evaluation_rows.csv", buffer.getvalue())
    groups = [r["category"] for r in rows]
    plot = calibration_scatter([r["predicted"] for r in rows], [r["true_dice"] for r in rows],
                               out_dir / "quality_calibration.png", title=title, groups=groups)
    paths = {"metrics": str(metrics_path), "rows": str(rows_path), "calibration": str(plot)}
    if "second_opinion" in result:
        paths["calibration_second_opinion"] = str(calibration_scatter(
            [r[SECOND_OPINION_COLUMN] for r in rows], [r["true_dice"] for r in rows],
            out_dir / "quality_calibration_second_opinion.png", title=f"{title}: second opinion".strip(": "),
            groups=groups))
    return paths
