"""Test-set evaluation of one checkpoint: predict on the original grid, score against the original
labels (Dice / IoU / HD95 / ASD per case), time segmentation and quality scoring per volume.

The test cases are the study split's "test" list, or - with an external dataset - its "test" list
(labeled entries) or, when that has none, its "training" list.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class TestSet:
    """The labeled cases a study is scored on, and where they come from (for the records)."""

    source: str            # dataset.json path and list name, e.g. ".../dataset.json#test"
    cases: tuple
    labels: dict

    @property
    def n_classes(self) -> int:
        return len(self.labels)


def resolve_test_set(split_dataset: Path, external: Optional[Path] = None,
                     max_cases: Optional[int] = None) -> TestSet:
    """The split's own test list, or an external dataset's test (else training) list."""
    from ..data.dataset import load_dataset

    own = load_dataset(split_dataset)
    if external is None:
        cases = [c for c in own.test if c.label is not None]
        if not cases:
            raise DataError(f"{split_dataset}: no labeled \"test\" cases to evaluate on; add a test list "
                            "or pass --test-dataset")
        source = f"{own.source}#test"
    else:
        spec = load_dataset(external)
        cases = [c for c in spec.test if c.label is not None]
        group = "test"
        if not cases:
            cases, group = list(spec.training), "training"
        if not cases:
            raise DataError(f"{spec.source}: no labeled cases in \"test\" or \"training\" to evaluate on")
        if spec.n_classes != own.n_classes:
            raise DataError(f"{spec.source}: declares {spec.n_classes} classes ({spec.labels}) but the study "
                            f"trains {own.n_classes} ({own.labels}); the test dataset must use the same labels")
        source = f"{spec.source}#{group}"
    if max_cases:
        cases = cases[: int(max_cases)]
    return TestSet(source, tuple(cases), dict(own.labels))


def evaluate_checkpoint(checkpoint: str | Path, test_set: TestSet, device, overlap: float = 0.5,
                        out_dir: Optional[Path] = None, quality_model=None, cancel=None) -> Dict[str, Any]:
    """{"checkpoint", "cases": [row per case], "summary": metrics.summarise(rows)}.

    A row holds the metrics of `metrics.evaluate_case` (mean and per class), `segment_s` (read,
    preprocess, sliding window, resample back, argmax) and, with `quality_model`,
    `predicted_quality` (g's predicted Dice, mean over classes, and per class) and `quality_s`."""
    import torch

    from ..data.io import check_same_geometry, read_image, read_label
    from ..engine.device import translate_oom
    from ..inference import predict_volume, write_prediction
    from ..metrics import evaluate_case, summarise
    from ..segmenter import load_segmenter

    segmenter = load_segmenter(checkpoint, device=device)
    classes = list(range(1, segmenter.n_classes))
    amp = getattr(device, "type", str(device)) == "cuda"
    rows: List[Dict[str, Any]] = []
    for ref in test_set.cases:
        if cancel is not None:
            cancel.check()
        _sync(device)
        start = time.perf_counter()
        with translate_oom(f"inference on {ref.image}"), torch.no_grad():
            label, _, geometry = predict_volume(segmenter.network, ref.image, segmenter.preprocessor,
                                                segmenter.patch_size, segmenter.mode, device,
                                                overlap=overlap, amp=amp)
        _sync(device)
        segment_s = time.perf_counter() - start
        if out_dir is not None:
            write_prediction(label, geometry, out_dir, ref.id, segmenter.foreground_names)
        reference, ref_geometry = read_label(ref.label)
        check_same_geometry(geometry, ref_geometry, ref.image, ref.label)  # the image (= prediction) grid vs its label
        spacing_zyx = tuple(reversed(ref_geometry.spacing))
        row: Dict[str, Any] = {"case": ref.id, **evaluate_case(label, reference, spacing_zyx, classes),
                               "segment_s": round(segment_s, 4)}
        if quality_model is not None:
            row.update(_quality_columns(quality_model, ref.image, label, spacing_zyx, device, read_image))
        rows.append(row)
    if not rows:
        raise DataError(f"{test_set.source}: no test cases to evaluate")
    return {"checkpoint": str(checkpoint), "cases": rows, "summary": summarise(rows)}


def _quality_columns(model, image_path, label, spacing_zyx, device, read_image) -> Dict[str, Any]:
    from ..quality.score import predict_volume as predict_quality

    image, _ = read_image(image_path)
    _sync(device)
    start = time.perf_counter()
    predicted = np.asarray(predict_quality(model, image, label, spacing_zyx, device=device), dtype=float)
    _sync(device)
    out = {"predicted_quality": float(predicted.mean()), "quality_s": round(time.perf_counter() - start, 4)}
    out.update({f"predicted_quality_{c + 1}": float(q) for c, q in enumerate(predicted)})
    return out


def _sync(device) -> None:
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)
