"""Job folders: what the panel hands to a `qgseg` worker and where the worker's outputs land.

One run = one folder the user can open:

    <output>/<run_id>/
        job.json            the job spec (cases, node IDs, options, versions) written by the panel
        dataset.json        Decathlon-style dataset description (training + unlabeled)
        images/<case>.nrrd  exported volumes          labels/<case>.nrrd  reference label maps
        quality/            stage 1: `qgseg quality train` run folder (quality predictor g)
        run/                stage 2: `qgseg train` run folder (segmenter checkpoints, manifest)
        second-opinion-run/ optional: a second, supervised segmenter (another seed) whose
                            agreement with each result is its second opinion
        predict-run/        last stage: `qgseg predict` run folder
        quality-events.jsonl, events.jsonl, second-opinion-events.jsonl, predict-events.jsonl
                            one event stream per stage
        predictions/<case>.nrrd, <case>.seg.nrrd, scores.csv

Each stage's folder (quality/, run/, second-opinion-run/, predict-run/) receives that stage's CANCEL
file and worker.log, the worker's console output.

Pure Python; the argument lists for `qgseg train` / `qgseg predict` are built here so they are
tested without Slicer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ..fileio import atomic_path, write_json_atomic

ROLES = ("labeled", "unlabeled", "ignore")
JOB_SPEC_VERSION = 1
# Names registered in QGSegmentationLib.networks.NETWORKS / ssl.methods.METHODS (kept here as
# plain strings so the panel lists them without importing torch; a test checks they exist).
ARCHITECTURES = ("unet", "vnet", "segresnet", "basicunet", "attentionunet")
SSL_METHODS = ("mt", "uamt", "cps", "fixmatch", "ict", "pl", "pl_c", "pl_t", "cl", "dualnet", "sup")
DEVICES = ("auto", "cuda", "cpu")
MODES = ("3d", "2d")


@dataclass
class TrainingOptions:
    """The Training section's values (mirrors the module's parameter node)."""

    architecture: str = "unet"
    ssl_method: str = "mt"
    guidance_qar: bool = True
    guidance_qw: bool = True
    mode: str = "3d"
    target_spacing: float = 0.0  # mm, isotropic; 0: planned from the data (`qgseg plan`)
    iterations: int = 2000
    batch_size: int = 2
    patch_size: int = 0  # voxels along each axis; 0: planned from the data
    seed: int = 0
    device: str = "auto"
    quality_epochs: int = 0  # quality predictor epochs; 0 keeps the worker's default
    quality_seeds: int = 1  # > 1: g trained with that many seeds, their mean used (an ensemble)
    segmenter_seeds: int = 1  # > 1: the segmenter trained with that many seeds, ensembled (`--seeds`)
    mirror: bool = True  # test-time mirroring when segmenting: ~3x the time, +0.01 Dice on LA
    second_opinion: str = ""  # a model folder whose segmenter gives each result a second opinion
    train_second_opinion: bool = False  # or train one here: a supervised segmenter, the next unused seed

    def validate(self) -> "TrainingOptions":
        """Raise ValueError naming the option and the problem."""
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.patch_size == 0 or self.patch_size >= 8,
             f"patch size must be 0 (auto) or >= 8 voxels, got {self.patch_size}"),
            (self.target_spacing >= 0, f"target spacing must be >= 0 mm, got {self.target_spacing}"),
            (self.quality_epochs >= 0, f"quality epochs must be >= 0, got {self.quality_epochs}"),
            (self.quality_seeds >= 1, f"quality predictor seeds must be >= 1, got {self.quality_seeds}"),
            (self.segmenter_seeds >= 1, f"segmenter seeds must be >= 1, got {self.segmenter_seeds}"),
            (self.architecture in ARCHITECTURES,
             f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"),
            (self.ssl_method in SSL_METHODS, f"SSL method must be one of {SSL_METHODS}, got {self.ssl_method!r}"),
            (not (self.second_opinion and self.train_second_opinion),
             "choose a second-opinion model folder or train a second opinion, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"training options: {message}")
        return self

    def guidance(self) -> str:
        """"qar,qw", "qar", "qw" or "none" (the worker's --guidance value)."""
        parts = [name for name, on in (("qar", self.guidance_qar), ("qw", self.guidance_qw)) if on]
        return ",".join(parts) or "none"

    def patch(self) -> List[str]:
        """--patch values: z y x in 3d mode, y x in 2d mode (cubic/square patches), or auto."""
        if self.patch_size == 0:
            return ["auto"]
        return [str(self.patch_size)] * (3 if self.mode == "3d" else 2)

    def spacing(self) -> List[str]:
        """--spacing values: x y z (isotropic), or auto."""
        if self.target_spacing == 0:
            return ["auto"]
        return [repr(float(self.target_spacing))] * 3


def plan_hint(options: TrainingOptions, fingerprint, gpu_available: Optional[bool]) -> str:
    """One line for the panel: what the *auto* spacing / patch size become for these labeled
    volumes (a `data.planning.Fingerprint`, None when there are none) on the device that will
    train (both CPU and GPU while `gpu_available` is unknown and the device is auto); "" when
    neither is auto. The worker plans the same from the exported files."""
    from ..data.planning import make_plan, patch_text, spacing_text

    auto_spacing, auto_patch = options.target_spacing == 0, options.patch_size == 0
    if not (auto_spacing or auto_patch):
        return ""
    if fingerprint is None:
        return "auto: planned from the labeled volumes when you mark some as labeled"
    if options.device == "auto":
        devices = ["cpu", "cuda"] if gpu_available is None else ["cuda" if gpu_available else "cpu"]
    else:
        devices = [options.device]
    spacing = "auto" if auto_spacing else (float(options.target_spacing),) * 3
    described = []
    for device in devices:
        plan = make_plan(fingerprint, options.mode, device, spacing)
        chosen = []
        if auto_spacing:
            chosen.append(f"spacing {spacing_text(plan.target_spacing)} mm")
        if auto_patch:
            chosen.append(f"patch {patch_text(plan.patch_size)}")
        described.append(f"{'GPU' if device == 'cuda' else 'CPU'}: {', '.join(chosen)}")
    volumes = len(fingerprint.sizes)
    return (f"auto on the {'; on the '.join(described)} "
            f"(planned from {volumes} labeled volume{'s' if volumes != 1 else ''})")


@dataclass
class CaseEntry:
    """One row of the Cases table that takes part in the job."""

    case: str                   # file-safe id, also the stem of every file of this case
    volume_id: str              # MRML node ID
    volume_name: str
    role: str                   # labeled / unlabeled (ignore rows never reach a job)
    segmentation_id: str = ""   # reference segmentation node ID (labeled rows)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"case {self.case!r}: role must be one of {ROLES}, got {self.role!r}")


@dataclass
class JobSpec:
    kind: str                                   # "train" or "predict"
    run_id: str
    cases: List[CaseEntry] = field(default_factory=list)
    options: Dict[str, Any] = field(default_factory=dict)
    label_names: List[str] = field(default_factory=list)  # label value i+1 -> name
    checkpoint: str = ""                        # the segmenter used / produced
    quality_checkpoint: str = ""                # the quality predictor g used / produced
    second_opinion_checkpoint: str = ""         # the second-opinion segmenter used / trained
    created: float = field(default_factory=time.time)
    versions: Dict[str, str] = field(default_factory=dict)
    version: int = JOB_SPEC_VERSION

    def case(self, case_id: str) -> CaseEntry:
        for entry in self.cases:
            if entry.case == case_id:
                return entry
        raise KeyError(f"job {self.run_id}: no case {case_id!r}")


@dataclass(frozen=True)
class JobFolder:
    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def job_json(self) -> Path:
        return self.root / "job.json"

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def labels_dir(self) -> Path:
        return self.root / "labels"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def train_events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def predict_events(self) -> Path:
        return self.root / "predict-events.jsonl"

    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    @property
    def scores_csv(self) -> Path:
        return self.predictions_dir / "scores.csv"

    @property
    def quality_dir(self) -> Path:
        return self.root / "quality"

    @property
    def quality_events(self) -> Path:
        return self.root / "quality-events.jsonl"

    @property
    def predict_run_dir(self) -> Path:
        return self.root / "predict-run"

    @property
    def second_opinion_run_dir(self) -> Path:
        return self.root / "second-opinion-run"

    @property
    def second_opinion_events(self) -> Path:
        return self.root / "second-opinion-events.jsonl"

    def image_path(self, case: str) -> Path:
        return self.images_dir / f"{case}.nrrd"

    def label_path(self, case: str) -> Path:
        return self.labels_dir / f"{case}.nrrd"

    def prediction_path(self, case: str) -> Path:
        return self.predictions_dir / f"{case}.seg.nrrd"


def new_run_id(prefix: str = "run", now: Optional[float] = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    return f"{prefix}-{stamp}"


def create_job_folder(output_dir: str | os.PathLike, run_id: Optional[str] = None,
                      prefix: str = "run") -> JobFolder:
    """Create a fresh, empty job folder under `output_dir` (never reuses an existing one)."""
    if not os.fspath(output_dir).strip():
        raise ValueError("output folder is empty: choose one in the Training section")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output folder {output_dir} exists and is not a folder")
    base = run_id or new_run_id(prefix)
    candidate, n = base, 1
    while (output_dir / candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    root = output_dir / candidate
    for sub in ("images", "labels", "quality", "run", "predict-run", "predictions"):  # second-opinion-run: only when used
        (root / sub).mkdir(parents=True, exist_ok=True)
    return JobFolder(root)


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def make_case_ids(names: Sequence[str]) -> List[str]:
    """File-safe, unique ids from node names, in order ("CT chest" -> "CT_chest", duplicates
    get "_2", "_3" ...). Empty names become "case"."""
    ids: List[str] = []
    used = set()
    for name in names:
        base = _UNSAFE.sub("_", name).strip("_") or "case"
        candidate, n = base, 1
        while candidate.lower() in used:  # case-insensitive: Windows/macOS file systems
            n += 1
            candidate = f"{base}_{n}"
        used.add(candidate.lower())
        ids.append(candidate)
    return ids


def write_job_spec(folder: JobFolder, spec: JobSpec) -> Path:
    data = asdict(spec)
    return write_json_atomic(folder.job_json, data)


def read_job_spec(path: str | os.PathLike) -> JobSpec:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: job spec not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: job spec is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: job spec must be a JSON object, not a {type(data).__name__}")
    if data.get("version") != JOB_SPEC_VERSION:
        raise ValueError(f"{path}: job spec version {data.get('version')!r} is not "
                         f"{JOB_SPEC_VERSION}")
    rows = data.pop("cases", [])
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: \"cases\" must be a list of objects, not {rows!r:.80}")
    try:
        cases = [CaseEntry(**row) for row in rows]
        return JobSpec(cases=cases, **data)
    except (TypeError, ValueError) as exc:  # a key missing or unknown, a bad role
        raise ValueError(f"{path}: not a valid job spec ({exc})") from None


def dataset_description(folder: JobFolder, cases: Iterable[CaseEntry],
                        label_names: Sequence[str], name: str = "QGSegmentation job") -> Dict:
    """The dataset.json content for the exported files (paths relative to the job folder)."""
    desc: Dict[str, Any] = {
        "name": name,
        "labels": {"0": "background", **{str(i + 1): n for i, n in enumerate(label_names)}},
        "training": [],
        "unlabeled": [],
    }
    for case in cases:
        image = folder.image_path(case.case).relative_to(folder.root).as_posix()
        if case.role == "labeled":
            label = folder.label_path(case.case).relative_to(folder.root).as_posix()
            desc["training"].append({"image": image, "label": label})
        elif case.role == "unlabeled":
            desc["unlabeled"].append(image)
    return desc


def write_dataset_json(folder: JobFolder, cases: Iterable[CaseEntry],
                       label_names: Sequence[str]) -> Path:
    return write_json_atomic(folder.dataset_json, dataset_description(folder, cases, label_names))


# --- worker argument lists ---------------------------------------------------------------------
# The stages of a Train click, as `qgseg` arguments (without the executable; their order is
# pipeline.py's). Flags follow
# QGSegmentationLib/cli (quality.py, train.py, predict.py, common.py).
def quality_arguments(folder: JobFolder, options: TrainingOptions) -> List[str]:
    """Stage 1: train the quality predictor g on the labeled cases."""
    options.validate()
    args = ["quality", "train", "--dataset", str(folder.dataset_json),
            "--run-dir", str(folder.quality_dir), "--events", str(folder.quality_events),
            "--mode", options.mode, "--seed", str(options.seed), "--device", options.device]
    if options.quality_epochs:
        args += ["--epochs", str(options.quality_epochs)]
    if options.quality_seeds > 1:
        args += ["--seeds", str(options.quality_seeds)]
    return args


def train_arguments(folder: JobFolder, options: TrainingOptions,
                    quality_checkpoint: str | os.PathLike | None = None) -> List[str]:
    """Stage 2: train the segmenter (SSL method, guided by g when guidance is on)."""
    options.validate()
    guidance = options.guidance()
    if guidance != "none" and not quality_checkpoint:
        raise ValueError(f"training options: guidance {guidance} needs a quality predictor checkpoint")
    args = _segmenter_training(folder.run_dir, folder.train_events, folder, options,
                               method=options.ssl_method, seed=options.seed, guidance=guidance,
                               seeds=options.segmenter_seeds)
    if quality_checkpoint:
        args += ["--quality-checkpoint", str(quality_checkpoint)]
    return args


def second_opinion_train_arguments(folder: JobFolder, options: TrainingOptions) -> List[str]:
    """Optional stage: a second segmenter for the second opinion, as independent of the first as
    the labeled cases allow: supervised (no unlabeled data, no g), the first seed the segmenter did
    not use (seed + segmenter seeds), same network and schedule, one training."""
    options.validate()
    return _segmenter_training(folder.second_opinion_run_dir, folder.second_opinion_events, folder,
                               options, method="sup", seed=options.seed + options.segmenter_seeds, guidance="none")


def _segmenter_training(run_dir: Path, events: Path, folder: JobFolder, options: TrainingOptions,
                        method: str, seed: int, guidance: str, seeds: int = 1) -> List[str]:
    args = ["train", "--dataset", str(folder.dataset_json), "--run-dir", str(run_dir),
            "--events", str(events), "--network", options.architecture,
            "--method", method, "--mode", options.mode,
            "--iterations", str(options.iterations), "--batch", str(options.batch_size),
            "--patch", *options.patch(), "--seed", str(seed), "--device", options.device,
            "--guidance", guidance]
    args += ["--spacing", *options.spacing()]
    if seeds > 1:
        args += ["--seeds", str(seeds)]
    if guidance != "none":  # the QG-SSL paper's schedule, scaled to the run's length (it has 200 epochs)
        from ..engine.config import TrainConfig
        from ..ssl.config import guidance_schedule_for

        run_epochs = options.iterations / TrainConfig.iterations_per_epoch
        args += [f"--set=ssl.{name}={value:g}" for name, value in guidance_schedule_for(run_epochs).items()]
    return args


def predict_arguments(folder: JobFolder, checkpoint: str | os.PathLike, device: str = "auto",
                      quality_checkpoint: str | os.PathLike | None = None,
                      from_dataset: bool = True, mirror: bool = True,
                      second_opinion: str | os.PathLike | None = None) -> List[str]:
    """Last stage: segment (and score, with g) into predictions/. A train job segments the
    dataset's "unlabeled" list; a segment-only job every image in images/. `mirror` off gives one
    pass per window instead of the mirrored average (faster, slightly less accurate).
    `second_opinion`, a segmenter checkpoint, segments each volume again and adds each segment's
    Dice against it to scores.csv."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    source = (["--input", str(folder.dataset_json), "--split", "unlabeled"] if from_dataset
              else ["--input", str(folder.images_dir)])
    args = ["predict", "--checkpoint", str(checkpoint), *source,
            "--output", str(folder.predictions_dir), "--run-dir", str(folder.predict_run_dir),
            "--events", str(folder.predict_events), "--device", device]
    if quality_checkpoint:
        args += ["--quality-checkpoint", str(quality_checkpoint)]
    if second_opinion:
        args += ["--second-opinion", str(second_opinion)]
    if not mirror:
        args.append("--no-mirror")
    return args


MODEL_SEGMENTER_FILE = "segmenter.pt"  # a saved model folder: the segmenter ...
MODEL_QUALITY_FILE = "quality.pt"      # ... and, when it has one, its quality predictor
MODEL_SECOND_OPINION_FILE = "second_opinion.pt"  # ... and the segmenter of its second opinion


MODEL_MANIFEST_FILE = "manifest.json"  # the segmenter's training manifest (versions, device, config)


@dataclass(frozen=True)
class ModelRecords:
    """The job.json and training manifest.json describing the current model, which *Save model*
    copies beside its checkpoints: those of the run that trained it, or of the model folder it was
    loaded from. None where the model has none (save_model_folder then removes that file)."""

    job_json: Optional[Path] = None
    manifest: Optional[Path] = None

    def __iter__(self):  # save_model_folder(..., *records)
        return iter((self.job_json, self.manifest))

    def existing(self) -> "ModelRecords":
        """The records still on disk."""
        return ModelRecords(*(p if p is not None and Path(p).is_file() else None
                              for p in (self.job_json, self.manifest)))


def run_model_records(folder: JobFolder) -> ModelRecords:
    """The records of the model a Train job folder produced: its job.json and the segmenter run's
    manifest.json."""
    return ModelRecords(folder.job_json, folder.run_dir / MODEL_MANIFEST_FILE).existing()


@dataclass(frozen=True)
class ModelFolder:
    """A saved model: what `Save model` wrote and `Load model` / `Segment` use."""

    segmenter: Path
    quality: Optional[Path] = None
    second_opinion: Optional[Path] = None
    job_json: Optional[Path] = None
    manifest: Optional[Path] = None

    @property
    def records(self) -> ModelRecords:
        """What saving this model again copies with it (its own job.json and manifest.json)."""
        return ModelRecords(self.job_json, self.manifest)

    def spec(self) -> Optional[JobSpec]:
        """The job spec of the run that trained it; None when the folder has no job.json."""
        return read_job_spec(self.job_json) if self.job_json else None


def save_model_folder(folder: str | os.PathLike, segmenter: str | os.PathLike,
                      quality: str | os.PathLike | None = None,
                      second_opinion: str | os.PathLike | None = None,
                      job_json: str | os.PathLike | None = None,
                      manifest: str | os.PathLike | None = None) -> ModelFolder:
    """Copy a run's checkpoints, job spec and training manifest into `folder` under fixed names
    (each copy atomic). A file of an earlier save that this model lacks (e.g. its second
    opinion) is removed, so the folder never mixes two models."""
    if not os.fspath(folder).strip():
        raise ValueError("choose a model folder in the Models section")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"model folder {folder} exists and is not a folder")
    files = {MODEL_SEGMENTER_FILE: segmenter, MODEL_QUALITY_FILE: quality,
             MODEL_SECOND_OPINION_FILE: second_opinion, "job.json": job_json, MODEL_MANIFEST_FILE: manifest}
    for source in files.values():
        if source and not Path(source).is_file():
            raise ValueError(f"cannot save the model: {source} does not exist")
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        if source:
            with atomic_path(folder / name) as tmp:
                shutil.copyfile(source, tmp)
        else:
            (folder / name).unlink(missing_ok=True)
    return read_model_folder(folder)


def read_model_folder(folder: str | os.PathLike) -> ModelFolder:
    """The files of a saved model folder; ValueError naming the folder when it holds no segmenter."""
    segmenter = model_segmenter(folder)
    optional = {name: segmenter.parent / name if (segmenter.parent / name).is_file() else None
                for name in (MODEL_QUALITY_FILE, MODEL_SECOND_OPINION_FILE, "job.json", MODEL_MANIFEST_FILE)}
    return ModelFolder(segmenter, optional[MODEL_QUALITY_FILE], optional[MODEL_SECOND_OPINION_FILE],
                       optional["job.json"], optional[MODEL_MANIFEST_FILE])


def model_segmenter(folder: str | os.PathLike, role: str = "model folder") -> Path:
    """The segmenter checkpoint of a saved model folder; ValueError naming the folder otherwise."""
    folder = Path(folder)
    if not str(folder) or not folder.is_dir():
        raise ValueError(f"{role} {str(folder)!r} does not exist")
    segmenter = folder / MODEL_SEGMENTER_FILE
    if not segmenter.is_file():
        raise ValueError(f"{role} {folder} holds no {MODEL_SEGMENTER_FILE} (save a trained model "
                         "there with 'Save model')")
    return segmenter


def find_checkpoint(run_dir: str | os.PathLike, done_outputs: Optional[Dict[str, str]] = None) -> Path:
    """The model a finished stage produced: its `done` event's checkpoint output when given
    (`checkpoint` for quality train, `best_checkpoint` for train), else the best*/last*
    checkpoint in its run folder."""
    run_dir = Path(run_dir)
    if done_outputs:
        for key in ("checkpoint", "best_checkpoint", "model"):
            if done_outputs.get(key):
                path = Path(done_outputs[key])
                if not path.is_absolute():
                    path = run_dir / path
                if path.exists():
                    return path
    candidates = sorted(run_dir.rglob("*.pt"), key=lambda p: (
        0 if p.name.startswith("best") else 1 if p.name.startswith("last") else 2,
        -p.stat().st_mtime))
    if not candidates:
        raise ValueError(f"{run_dir}: the run left no checkpoint (*.pt)")
    return candidates[0]
