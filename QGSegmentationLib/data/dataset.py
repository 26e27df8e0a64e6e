"""Dataset descriptions: Decathlon / nnU-Net style `dataset.json` files or explicit file lists.

`load_dataset` checks the description itself (keys, labels, duplicate cases, paths that leave the
dataset folder, missing files) and reports every problem at once; `validate_dataset` then opens
every file and checks what the training code relies on (3D scalar volumes, matching image/label
geometry, label values declared in "labels").

A *split file* (`split.json`, written by every training run into its folder) names a dataset.json
and lists which of its cases went to training and validation, by case id. `load_dataset` reads it
as the dataset with those groups, so `--dataset runs/seg/split.json --split validation` addresses
the cases a run held out for validation when the dataset itself lists none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..fileio import read_json
from . import io

GROUPS = ("training", "validation", "test", "unlabeled")


@dataclass(frozen=True)
class CaseRef:
    """One case: an image file and, for labeled cases, its label map file."""

    id: str
    image: Path
    label: Path | None = None

    @property
    def labeled(self) -> bool:
        return self.label is not None


@dataclass(frozen=True)
class DatasetSpec:
    """The cases of a dataset split into groups, and the class names (label value -> name)."""

    root: Path
    labels: dict
    training: tuple = ()
    validation: tuple = ()
    test: tuple = ()
    unlabeled: tuple = ()
    source: Path | None = None  # the dataset.json, when the spec came from one

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list:
        return [self.labels[v] for v in range(self.n_classes)]

    def group(self, name: str) -> tuple:
        if name not in GROUPS:
            raise DataError(f"unknown dataset group '{name}'; choose one of: {', '.join(GROUPS)}")
        return getattr(self, name)

    def all_cases(self) -> list:
        """(group name, CaseRef) for every case of every group."""
        return [(g, case) for g in GROUPS for case in self.group(g)]

    def summary(self) -> dict:
        return {"root": str(self.root), "n_classes": self.n_classes,
                "labels": {str(k): v for k, v in self.labels.items()},
                **{g: len(self.group(g)) for g in GROUPS}}


# ---------------------------------------------------------------------------------------- labels

def parse_labels(raw, where: str) -> dict:
    """{value: name} from Decathlon style {"0": "background", ...} or nnU-Net v2 style
    {"background": 0, ...}; values must be 0..n-1 with 0 present."""
    if not isinstance(raw, Mapping) or not raw:
        raise DataError(f"{where}: \"labels\" must be a non-empty mapping, got {raw!r}")
    keys_are_values = all(str(k).strip().lstrip("-").isdigit() for k in raw)
    labels = {}
    for key, val in raw.items():
        value, name = (key, val) if keys_are_values else (val, key)
        if isinstance(value, (list, tuple)):
            raise DataError(f"{where}: label '{name}' maps to a region {value}; nnU-Net region "
                            "labels are not supported, give one integer value per class")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label value {value!r} of '{name}' is not an integer") from None
        if isinstance(value, float) and value != number:
            raise DataError(f"{where}: label value {value!r} of '{name}' is not an integer")
        if number in labels:
            raise DataError(f"{where}: label value {number} is declared twice "
                            f"('{labels[number]}' and '{name}')")
        labels[number] = str(name)
    expected = list(range(len(labels)))
    if sorted(labels) != expected:
        raise DataError(f"{where}: label values must be 0..{len(labels) - 1} without gaps "
                        f"(0 = background), got {sorted(labels)}")
    if len(labels) < 2:
        raise DataError(f"{where}: \"labels\" declares only background; at least one "
                        "foreground class is needed")
    return dict(sorted(labels.items()))


def default_labels(n_classes: int) -> dict:
    return {0: "background", **{v: f"label_{v}" for v in range(1, n_classes)}}


# --------------------------------------------------------------------------------- dataset.json

class _Problems:
    """Collects every problem of a description so the user can fix them all in one go."""

    def __init__(self, where: str):
        self.where = where
        self.items: list = []
        self.hints: list = []

    def add(self, message: str, hint: str | None = None) -> None:
        """One problem; `hint` (said once, however many problems share it) tells how to fix it."""
        self.items.append(message)
        if hint and hint not in self.hints:
            self.hints.append(hint)

    def raise_if_any(self, hint: str | None = None) -> None:
        hint = " ".join(self.hints + ([hint] if hint else [])) or None
        if len(self.items) == 1:
            raise DataError(f"{self.where}: {self.items[0]}", hint=hint)
        if self.items:
            listing = "\n".join(f"  - {p}" for p in self.items)
            raise DataError(f"{self.where}: {len(self.items)} problems found:\n{listing}", hint=hint)


OUTSIDE_HINT = ("paths are relative to the folder of dataset.json and stay inside it: put dataset.json "
                "in a folder above the data, or link the data into its folder (e.g. "
                "`ln -s /data/scans imagesTr`; links are followed)")


def _resolve(root: Path, relative, entry_desc: str, problems: _Problems) -> Path | None:
    """Absolute path of a dataset-relative path; None (and a problem) if invalid or outside."""
    if not isinstance(relative, str) or not relative.strip():
        problems.add(f"{entry_desc}: expected a file path string, got {relative!r}")
        return None
    candidate = Path(relative)
    joined = candidate if candidate.is_absolute() else root / candidate
    normalised = Path(os.path.normpath(joined))
    root_norm = Path(os.path.normpath(root))
    if normalised != root_norm and root_norm not in normalised.parents:
        problems.add(f"{entry_desc}: path '{relative}' points outside the dataset folder {root}",
                     hint=OUTSIDE_HINT)
        return None
    if not normalised.is_file():
        problems.add(f"{entry_desc}: file '{relative}' does not exist")
        return None
    return normalised


def _parse_entry(root: Path, entry, group: str, index: int, problems: _Problems,
                 need_label: bool) -> CaseRef | None:
    desc = f"\"{group}\"[{index}]"
    if isinstance(entry, str):
        image_rel, label_rel = entry, None
    elif isinstance(entry, Mapping):
        if "image" not in entry:
            problems.add(f"{desc}: entry has no \"image\" key ({entry!r})")
            return None
        image_rel, label_rel = entry["image"], entry.get("label")
    else:
        problems.add(f"{desc}: expected a path or an {{\"image\", \"label\"}} object, got {entry!r}")
        return None
    if group == "unlabeled":
        label_rel = None  # an unlabeled image is used without its label even if one is listed
    if need_label and label_rel is None:
        problems.add(f"{desc}: labeled entry has no \"label\" key")
        return None
    image = _resolve(root, image_rel, f"{desc} image", problems)
    label = _resolve(root, label_rel, f"{desc} label", problems) if label_rel is not None else None
    if image is None or (label_rel is not None and label is None):
        return None
    return CaseRef(io.case_id_from_path(image), image, label)


def _check_duplicates(groups: Mapping[str, Sequence[CaseRef]], problems: _Problems) -> None:
    """Each image file once in the whole dataset; each case id once per group, and once across
    "training" and "validation": a split file (split.json) names those cases by id, so an id
    shared by the two groups would be read back as the wrong image (test and unlabeled cases are
    not addressed by id there and may reuse a labeled case's file name)."""
    seen_files: dict = {}
    labeled_ids: dict = {}  # id -> (group, image) over SPLIT_GROUPS
    for group, cases in groups.items():
        ids: dict = {}
        for case in cases:
            if case.image in seen_files:
                problems.add(f"duplicate case: image '{case.image}' is listed in "
                             f"\"{seen_files[case.image]}\" and \"{group}\"")
                continue
            seen_files[case.image] = group
            if case.id in ids:
                problems.add(f"duplicate case id '{case.id}' in \"{group}\" "
                             f"('{ids[case.id]}' and '{case.image}')")
            ids.setdefault(case.id, case.image)
            if group not in SPLIT_GROUPS:
                continue
            first_group, first_image = labeled_ids.setdefault(case.id, (group, case.image))
            if first_group != group:
                problems.add(f"case id '{case.id}' names two cases: '{first_image}' in \"{first_group}\" and "
                             f"'{case.image}' in \"{group}\"; {SPLIT_FILE} addresses training and "
                             "validation cases by id (the file name without its extension), so rename one")


def _nnunet_training(root: Path, desc: Mapping, problems: _Problems) -> list:
    """nnU-Net v2 folders without a "training" list: imagesTr/<case>_0000<ending> with
    labelsTr/<case><ending>."""
    ending = desc.get("file_ending", ".nii.gz")
    entries = []
    for image in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
        case = image.name[: -len(f"_0000{ending}")]
        entries.append({"image": f"imagesTr/{image.name}", "label": f"labelsTr/{case}{ending}"})
    if not entries:
        problems.add("has no \"training\" list and no nnU-Net style imagesTr/*_0000"
                     f"{ending} files")
    return entries


def load_dataset(path: str | os.PathLike) -> DatasetSpec:
    """Parse a Decathlon / nnU-Net style dataset.json (paths relative to its folder).

    Keys: "labels" (required), "training" (list of {"image","label"}), optional "validation",
    "test" (paths or {"image"[, "label"]}), "unlabeled" (paths or {"image"})."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    desc = read_json(path, "dataset description")
    if not isinstance(desc, Mapping):
        raise DataError(f"{path}: expected a JSON object at the top level")
    if _is_split_file(desc):
        return _load_split_file(path, desc)
    problems = _Problems(str(path))
    root = Path(os.path.abspath(path.parent))
    if "labels" not in desc:
        raise DataError(f"{path}: missing required key \"labels\" (e.g. "
                        "{\"0\": \"background\", \"1\": \"organ\"})")
    labels = parse_labels(desc["labels"], str(path))
    channels = desc.get("channel_names", desc.get("modality"))
    if isinstance(channels, Mapping) and len(channels) > 1:
        raise DataError(f"{path}: {len(channels)} image channels declared ({dict(channels)}); "
                        "only single-channel images are supported")
    raw_groups = {}
    for group in GROUPS:
        value = desc.get(group, [])
        if group == "training" and "training" not in desc:
            value = _nnunet_training(root, desc, problems)
        if not isinstance(value, list):
            problems.add(f"\"{group}\" must be a list, got {type(value).__name__}")
            value = []
        raw_groups[group] = value
    groups = {}
    for group, entries in raw_groups.items():
        refs = [_parse_entry(root, entry, group, i, problems, need_label=group in ("training", "validation"))
                for i, entry in enumerate(entries)]
        groups[group] = tuple(r for r in refs if r is not None)
    _check_duplicates(groups, problems)
    if not raw_groups["training"] and not problems.items:
        problems.add("no labeled cases: \"training\" is empty")
    problems.raise_if_any()
    return DatasetSpec(root=root, labels=labels, source=path, **groups)


SPLIT_FILE = "split.json"  # what every training run writes into its folder
SPLIT_BASE_KEY = "dataset"
SPLIT_GROUPS = ("training", "validation")


def write_split_file(spec: DatasetSpec, path: str | os.PathLike, written_by: str) -> Path | None:
    """Record which cases of `spec.source` a run trained and validated on, as a split file that
    `load_dataset` reads back (None, and nothing written, for a spec not made from a file)."""
    from ..fileio import write_json_atomic

    if spec.source is None:
        return None
    source = Path(os.path.abspath(spec.source))
    desc = read_json(source, "dataset description")
    if _is_split_file(desc):  # a run on another run's split: name the dataset itself
        source = _split_base(source, desc)
    return write_json_atomic(path, {
        SPLIT_BASE_KEY: str(source),
        "written_by": written_by,
        **{group: [case.id for case in spec.group(group)] for group in SPLIT_GROUPS},
    })


def _is_split_file(desc) -> bool:
    """A split file names its dataset and has no "labels" of its own."""
    return isinstance(desc, Mapping) and SPLIT_BASE_KEY in desc and "labels" not in desc


def _split_base(path: Path, desc: Mapping) -> Path:
    """The dataset.json a split file names (relative names are relative to the split file)."""
    base = desc[SPLIT_BASE_KEY]
    if not isinstance(base, str) or not base.strip():
        raise DataError(f"{path}: \"{SPLIT_BASE_KEY}\" must name a dataset.json, got {base!r}")
    return Path(base) if Path(base).is_absolute() else path.parent / base


def _load_split_file(path: Path, desc: Mapping) -> DatasetSpec:
    """The dataset a split file names, with its "training" and "validation" groups replaced by the
    listed case ids (test and unlabeled cases as the dataset has them)."""
    base_file = _split_base(path, desc)
    if not base_file.exists():
        raise DataError(f"{path}: the dataset it splits, {base_file}, does not exist")
    if _is_split_file(read_json(base_file, "dataset description")):
        raise DataError(f"{path}: names {base_file}, which is itself a split file; name the dataset.json")
    base = load_dataset(base_file)
    labeled = {case.id: case for case in base.training + base.validation}
    problems = _Problems(str(path))
    groups = {}
    for group in SPLIT_GROUPS:
        ids = desc.get(group)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            problems.add(f"\"{group}\" must be a list of case ids")
            continue
        unknown = [i for i in ids if i not in labeled]
        if unknown:
            problems.add(f"\"{group}\" names case(s) that are not labeled cases of {base_file}: "
                         + ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else ""))
        groups[group] = tuple(labeled[i] for i in ids if i in labeled)
    if not problems.items:
        _check_duplicates(groups, problems)
        if set(groups["training"]) & set(groups["validation"]):
            problems.add("a case is listed in both \"training\" and \"validation\"")
        if not groups["training"]:
            problems.add("no labeled cases: \"training\" is empty")
    problems.raise_if_any()
    return replace(base, source=path, **groups)


def empty_group_message(source, group: str, cases: str = "cases") -> str:
    """Why a dataset's group is empty, and what to pass instead for held-out validation cases."""
    message = f"{source} lists no \"{group}\" {cases}"
    if group == "validation":
        message += (" (when a dataset has none, training holds --n-validation of its training cases "
                    f"out and lists them in <run-dir>/{SPLIT_FILE}: pass that file instead of the "
                    f"dataset.json, e.g. runs/seg/{SPLIT_FILE})")
    elif group == "test":
        message += (" (to judge a model on cases it did not train on without a test list, pass the "
                    f"run's {SPLIT_FILE} with --split validation, e.g. --dataset runs/seg/{SPLIT_FILE})")
    return message


def dataset_from_files(images: Sequence, labels: Sequence, unlabeled: Sequence = (),
                       labels_map: Mapping | None = None, root: str | os.PathLike | None = None
                       ) -> DatasetSpec:
    """A spec from explicit file lists: `images[i]` is labeled by `labels[i]`; `unlabeled` are
    images without labels. Without `labels_map` the classes are found by reading the labels."""
    problems = _Problems("file list")
    if len(images) != len(labels):
        raise DataError(f"file list: {len(images)} images but {len(labels)} labels; "
                        "give one label per labeled image")
    if not images:
        raise DataError("file list: no labeled cases given")

    def ref(image, label, desc):
        image_path = Path(os.path.abspath(image))
        label_path = Path(os.path.abspath(label)) if label is not None else None
        for p, kind in ((image_path, "image"), (label_path, "label")):
            if p is not None and not p.is_file():
                problems.add(f"{desc} {kind} file '{p}' does not exist")
        return CaseRef(io.case_id_from_path(image_path), image_path, label_path)

    training = tuple(ref(i, l, f"labeled case {n}") for n, (i, l) in enumerate(zip(images, labels)))
    extra = tuple(ref(i, None, f"unlabeled case {n}") for n, i in enumerate(unlabeled))
    _check_duplicates({"training": training, "unlabeled": extra}, problems)
    problems.raise_if_any()
    if labels_map is not None:
        label_names = parse_labels(labels_map, "labels argument")
    else:
        highest = max(max(io.present_labels(io.read_label(c.label)[0])) for c in training)
        label_names = default_labels(max(int(highest) + 1, 2))
    common = os.path.commonpath([str(c.image.parent) for c in training + extra])
    return DatasetSpec(root=Path(root) if root else Path(common), labels=label_names,
                       training=training, unlabeled=extra)


DEFAULT_HELD_OUT = 2  # validation cases held out of the labeled ones when the dataset lists none


def held_out_count(requested: Optional[int], n_labeled: int) -> int:
    """How many labeled cases validate when the dataset lists none: as many as asked, or by default
    two, but one when only two cases are labeled (the other trains)."""
    if requested is not None:
        return requested
    return min(DEFAULT_HELD_OUT, max(n_labeled - 1, 1))


def split_validation(spec: DatasetSpec, n_validation: int, seed: int = 0) -> DatasetSpec:
    """Move `n_validation` training cases (chosen by a seeded shuffle) to validation, unless the
    spec already has validation cases. Deterministic given the seed and the case list."""
    if spec.validation or n_validation <= 0:
        return spec
    if n_validation >= len(spec.training):
        raise DataError(f"cannot hold out {n_validation} validation case{'s' if n_validation != 1 else ''} from "
                        f"{len(spec.training)} labeled training cases; at least one must remain")
    order = np.random.default_rng(seed).permutation(len(spec.training))
    chosen = set(int(i) for i in order[:n_validation])
    validation = tuple(c for i, c in enumerate(spec.training) if i in chosen)
    training = tuple(c for i, c in enumerate(spec.training) if i not in chosen)
    return replace(spec, training=training, validation=validation)


# ------------------------------------------------------------------------------------ validation

@dataclass
class ValidationReport:
    """What `validate_dataset` found: counts, geometry ranges and label voxel counts."""

    cases: dict = field(default_factory=dict)
    spacing_min: tuple = ()
    spacing_max: tuple = ()
    size_min: tuple = ()
    size_max: tuple = ()
    label_voxels: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"cases": self.cases, "spacing_min": list(self.spacing_min),
                "spacing_max": list(self.spacing_max), "size_min": list(self.size_min),
                "size_max": list(self.size_max),
                "label_voxels": {str(k): v for k, v in self.label_voxels.items()},
                "warnings": list(self.warnings)}


def _validate_case(case: CaseRef, group: str, spec: DatasetSpec, report: ValidationReport,
                   problems: _Problems, geometries: list) -> None:
    try:
        image_geom = io.read_geometry(case.image, "image")
    except DataError as exc:
        problems.add(f"[{group}] {exc.message}")
        return
    geometries.append(image_geom)
    if case.label is None:
        return
    try:
        label, label_geom = io.read_label(case.label, allowed_labels=spec.labels)
        io.check_same_geometry(image_geom, label_geom, case.image, case.label)
        check_segment_names(case.label, spec.labels)
    except DataError as exc:
        problems.add(f"[{group}] {exc.message}")
        return
    counts = np.bincount(label.ravel(), minlength=spec.n_classes)
    for value in range(spec.n_classes):
        report.label_voxels[value] = report.label_voxels.get(value, 0) + int(counts[value])
    if group == "training" and counts[1:].sum() == 0:
        report.warnings.append(f"{case.label}: label map is empty (background only)")


def check_segment_names(path: Path, labels: Mapping[int, str]) -> None:
    """DataError when a Slicer .seg.nrrd names its segments after the dataset's labels but with
    other values (say "tumor" = 1 in the file, 2 in dataset.json): its classes would be learned
    swapped. Segment names that are not label names (Slicer's "Segment_1") are not compared."""
    if io.file_extension(path) != io.SEGMENTATION_EXTENSION:
        return
    value_of = {_name_key(name): int(value) for value, name in labels.items()}
    swapped = [f"'{name}' is {value} in the file, {value_of[_name_key(name)]} in the dataset"
               for value, name in io.read_segmentation_names(path).items()
               if value_of.get(_name_key(name), value) != value]
    if swapped:
        raise DataError(f"{path}: segment label values do not match the dataset's labels: " + "; ".join(swapped),
                        hint="give each segment the label value dataset.json gives its name (Slicer: "
                             "Segment Editor, or export the segments in the order of the labels)")


def _name_key(name) -> str:
    """A label or segment name as compared: case and surrounding spaces ignored."""
    return str(name).strip().lower()


def validate_dataset(spec: DatasetSpec, check_files: bool = True) -> ValidationReport:
    """Open every file of `spec` (image headers only, labels fully) and raise one DataError
    listing every problem; otherwise return a `ValidationReport`."""
    report = ValidationReport(cases={g: len(spec.group(g)) for g in GROUPS})
    problems = _Problems(str(spec.source or spec.root))
    geometries: list = []
    if check_files:
        for group, case in spec.all_cases():
            _validate_case(case, group, spec, report, problems, geometries)
    problems.raise_if_any(hint="fix or remove the listed files and run validation again")
    if geometries:
        spacings = np.array([g.spacing for g in geometries])
        sizes = np.array([g.size for g in geometries])
        report.spacing_min = tuple(float(v) for v in spacings.min(0))
        report.spacing_max = tuple(float(v) for v in spacings.max(0))
        report.size_min = tuple(int(v) for v in sizes.min(0))
        report.size_max = tuple(int(v) for v in sizes.max(0))
    for value in range(1, spec.n_classes):
        if check_files and report.label_voxels.get(value, 0) == 0:
            report.warnings.append(f"class {value} ('{spec.labels[value]}') never occurs in any label map")
    return report


def checked_dataset(path: str | os.PathLike, warn: Callable[[str], None]) -> DatasetSpec:
    """`load_dataset`, then every file opened before any training starts (`validate_dataset`): all
    problems in one DataError instead of one per run, and `warn` told of empty training labels and
    declared classes that no label map holds."""
    spec = load_dataset(path)
    for warning in validate_dataset(spec).warnings:
        warn(warning)
    return spec


def iter_cases(spec: DatasetSpec, groups: Iterable[str]) -> list:
    """The CaseRefs of the named groups, in order."""
    return [case for g in groups for case in spec.group(g)]
