"""The benchmark config: one YAML file describing a whole study.

    name: la_cpu
    data: {la: {path: ../../shared/data/LA, labeled: 8}}   # or {dataset: D.json} / {phantom: {...}}
    mode: 3d
    target_spacing: [1.25, 1.25, 1.25]                     # x y z mm; null keeps the data's grid
    network: unet
    network_options: {channels: [16, 32, 64, 128]}
    patch_size: [32, 64, 64]                               # z y x
    batch_size: 2
    iterations: 300
    train: {lr: 0.002, val_every: 50}                      # any other TrainConfig option
    runs:
      - {method: sup, seeds: [0, 1, 2]}
      - {method: mt, guidance: "qar,qw", seeds: [0, 1, 2], train: {ssl: {qw_tau: 0.5}}}
      - {method: mt, name: mt-metassl, train: {ssl: {heterogeneous_loss: true}}}
    quality: {epochs: 30}                                  # QualityTrainConfig options
    evaluation: {overlap: 0.5, max_test_cases: null}
    speed: {steps: 20, warmup: 3}
    quick: {iterations: 60, seeds: [0], methods: [sup, mt], evaluation: {max_test_cases: 4}}

`--quick` deep-merges the `quick` section over the rest; two keys there are filters rather than
options: `seeds` replaces every run's seeds and `methods` keeps the runs whose method or label
(e.g. `mt+qar,qw`) is listed. A run's `name` replaces its method in labels and folder names, so
one method can appear twice with different `train` options. Everything is checked when the file is loaded - TrainConfig,
SSL and quality options included - so a typo fails in a second, not after hours of training.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError
from .data import normalise_data_section, split_names

GUIDANCE_PARTS = ("qar", "qw")
# top-level keys that map 1:1 onto TrainConfig fields
TRAIN_FIELDS = ("mode", "target_spacing", "network", "network_options", "patch_size", "batch_size",
                "unlabeled_batch_size", "iterations", "device", "num_threads")
# TrainConfig fields a study sets itself per run; configs may not override them in `train`
RESERVED_TRAIN_FIELDS = ("dataset", "method", "seed", "quality_checkpoint")
QUICK_FILTERS = ("seeds", "methods")


def parse_guidance(value: Any, where: str) -> Tuple[str, ...]:
    """'none' | 'qar' | 'qw' | 'qar,qw' (or a list) -> a sorted tuple of parts."""
    if value is None:
        return ()
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = {str(p).strip().lower() for p in parts if str(p).strip()} - {"none"}
    unknown = sorted(names - set(GUIDANCE_PARTS))
    if unknown:
        raise ConfigError(f"{where}: unknown guidance {', '.join(unknown)}; use none, qar, qw or qar,qw")
    return tuple(p for p in GUIDANCE_PARTS if p in names)


@dataclass(frozen=True)
class RunSpec:
    """One line of `runs`: a method, its quality guidance, its seeds, and optional TrainConfig
    overrides for this method only (e.g. `ssl:` hyper-parameters)."""

    method: str
    guidance: Tuple[str, ...] = ()
    seeds: Tuple[int, ...] = (0,)
    train: Dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    name: Optional[str] = None            # e.g. `mt-metassl` for MT with the heterogeneous loss

    @property
    def label(self) -> str:
        """`mt`, `mt+qar,qw`, `mt-metassl+qar,qw`: how tables and run folders name the run."""
        return (self.name or self.method) + (f"+{','.join(self.guidance)}" if self.guidance else "")

    @property
    def guidance_label(self) -> str:
        return ",".join(self.guidance) if self.guidance else "none"


@dataclass(frozen=True)
class Job:
    """One training run of a study: a run spec on one split with one seed."""

    split: str
    run: RunSpec
    seed: int

    @property
    def key(self) -> str:
        return f"{self.split}/{self.run.label}/seed{self.seed}"


@dataclass
class EvaluationConfig:
    overlap: float = 0.5                  # sliding-window overlap at test time
    max_test_cases: Optional[int] = None  # first N test cases only (quick studies)
    save_predictions: bool = True         # write <run>/predictions/{best,last}/<case>.nrrd + .seg.nrrd


@dataclass
class SpeedConfig:
    enabled: bool = True
    steps: int = 20           # timed steps per variant and round (>= 20 for the published numbers)
    warmup: int = 3           # untimed steps first (allocator, cudnn autotune)
    rounds: int = 2           # host and guided alternate this many times to even out machine drift
    methods: Optional[List[str]] = None   # default: every method that has a guided run


@dataclass
class BenchConfig:
    """A parsed, checked study description (see module docstring)."""

    name: str
    data: Dict[str, Any]
    runs: List[RunSpec]
    train_options: Dict[str, Any]          # TrainConfig fields shared by every run
    quality: Dict[str, Any] = field(default_factory=dict)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    description: str = ""
    source: Optional[Path] = None
    quick: bool = False
    raw: Dict[str, Any] = field(default_factory=dict)   # the resolved mapping (after quick/--set)

    @property
    def base_dir(self) -> Path:
        """Folder relative data paths are resolved against: the config file's folder."""
        return self.source.parent if self.source else Path.cwd()

    @property
    def splits(self) -> List[str]:
        return split_names(self.data)

    @property
    def needs_quality(self) -> bool:
        return any(run.guidance for run in self.runs)

    def jobs(self) -> List["Job"]:
        return expand_jobs(self)

    def quality_seeds(self) -> List[int]:
        """Seeds for which a quality predictor is trained (per split): those of guided runs."""
        return sorted({s for run in self.runs if run.guidance for s in run.seeds})

    def train_dict(self, run: RunSpec, seed: int, dataset: str = "", quality_checkpoint: Optional[str] = None,
                   cache_dir: Optional[str] = None) -> Dict[str, Any]:
        """The TrainConfig mapping of one run (shared options < `train` < the run's `train`)."""
        data = _deep_merge(self.train_options, run.train)
        ssl = dict(data.get("ssl") or {})
        ssl["guidance_qar"], ssl["guidance_qw"] = "qar" in run.guidance, "qw" in run.guidance
        data.update(ssl=ssl, method=run.method, seed=int(seed), dataset=str(dataset),
                    quality_checkpoint=str(quality_checkpoint) if quality_checkpoint else None)
        if cache_dir and not data.get("cache_dir"):
            data["cache_dir"] = str(cache_dir)
        return data

    def train_config(self, run: RunSpec, seed: int, **paths):
        from ..engine.config import TrainConfig

        where = f"{self.where}: run {run.label} seed {seed}"
        return TrainConfig.from_dict(self.train_dict(run, seed, **paths), source=where)

    def quality_config(self, seed: int):
        """QualityTrainConfig for the predictor of one seed (mode follows the study)."""
        from ..quality.train import QualityTrainConfig

        options = {"mode": self.train_options.get("mode", "3d"), **self.quality, "seed": int(seed)}
        return QualityTrainConfig.from_dict(options, source=f"{self.where}: quality")

    @property
    def where(self) -> str:
        return str(self.source) if self.source else "benchmark config"

    def fingerprint(self, *parts: Any) -> str:
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_of(config: Any) -> Dict[str, Any]:
    """The fields of a dataclass config (TrainConfig, QualityTrainConfig) that differ from their
    defaults, as JSON values: what a run's fingerprint is made of, so that adding an option whose
    default keeps the old behaviour does not invalidate finished runs of a study."""
    values = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return settings_from_record(type(config), values)


def settings_from_record(config_cls: type, recorded: Mapping[str, Any]) -> Dict[str, Any]:
    """`settings_of` for a config recorded as a dict (missing fields took their defaults)."""
    defaults = _defaults_of(config_cls)
    return {k: v for k, v in recorded.items() if k not in defaults or v != defaults[k]}


def _defaults_of(config_cls: type) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return json.loads(json.dumps(out, default=str))


def expand_jobs(config: BenchConfig) -> List[Job]:
    """Every (split, run, seed) of the study in a stable order: split, then seed, then run order, so
    that an interrupted study already holds complete comparisons for its first seeds."""
    seeds = sorted({seed for run in config.runs for seed in run.seeds})
    return [Job(split, run, seed) for split in config.splits for seed in seeds for run in config.runs
            if seed in run.seeds]


# ------------------------------------------------------------------------------------- loading

def load_bench_config(path: str | Path, quick: bool = False, only: Sequence[str] | None = None,
                      overrides: Sequence[str] | None = None) -> BenchConfig:
    """Read and check a benchmark YAML/JSON file. `quick` applies its `quick` section, `only`
    keeps the runs whose method or label is listed, `overrides` are `key.sub=value` strings."""
    from ..engine.config import load_config_file

    path = Path(path)
    return parse_bench_config(load_config_file(path), source=path, quick=quick, only=only, overrides=overrides)


def parse_bench_config(data: Mapping[str, Any], source: Optional[Path] = None, quick: bool = False,
                       only: Sequence[str] | None = None, overrides: Sequence[str] | None = None) -> BenchConfig:
    """Check a config mapping. Order of precedence: `overrides` (--set) > `quick` (with --quick) >
    the config's own entries."""
    from ..engine.config import apply_overrides

    where = str(source) if source else "benchmark config"
    data = copy.deepcopy(dict(data))
    known = {"name", "description", "data", "train", "runs", "quality", "evaluation", "speed", "quick",
             *TRAIN_FIELDS}
    _reject_unknown(data, known, where, "top-level key")
    quick_section = data.pop("quick", None) or {}
    if not isinstance(quick_section, Mapping):
        raise ConfigError(f"{where}: 'quick' must be a mapping of overrides")
    filters: Dict[str, Any] = {}
    if quick:
        quick_section = dict(quick_section)
        filters = {k: quick_section.pop(k) for k in QUICK_FILTERS if k in quick_section}
        _reject_unknown(quick_section, known - {"quick"}, where, "key in 'quick'")
        data = _deep_merge(data, quick_section)
    if overrides:
        data = apply_overrides(data, list(overrides))
        _reject_unknown(data, known - {"quick"}, where, "top-level key (from --set)")
    if "data" not in data:
        raise ConfigError(f"{where}: missing 'data' (e.g. data: {{dataset: path/to/dataset.json}})")
    data_section = normalise_data_section(data["data"], where)
    runs = _parse_runs(data.get("runs"), where)
    if "seeds" in filters:
        seeds = _parse_seeds(filters["seeds"], f"{where}: quick.seeds")
        runs = [dataclasses.replace(r, seeds=seeds) for r in runs]
    if "methods" in filters:
        runs = _select_runs(runs, filters["methods"], f"{where}: quick.methods")
    if only:
        runs = _select_runs(runs, only, "--only")
    if not isinstance(data.get("train") or {}, Mapping):
        raise ConfigError(f"{where}: 'train' must be a mapping of TrainConfig options")
    train_options = dict(data.get("train") or {})
    clash = sorted(set(train_options) & set(RESERVED_TRAIN_FIELDS))
    if clash:
        raise ConfigError(f"{where}: train.{clash[0]} is set by the study itself (per run); remove it")
    for key in TRAIN_FIELDS:
        if key in data:
            if key in train_options:
                raise ConfigError(f"{where}: '{key}' is given both at the top level and under 'train'")
            train_options[key] = data[key]
    quality = data.get("quality") or {}
    if not isinstance(quality, Mapping):
        raise ConfigError(f"{where}: 'quality' must be a mapping of quality predictor options")
    config = BenchConfig(
        name=str(data.get("name") or (source.stem if source else "study")),
        description=str(data.get("description") or ""),
        data=data_section, runs=runs, train_options=train_options, quality=dict(quality),
        evaluation=_dataclass_from(EvaluationConfig, data.get("evaluation"), f"{where}: evaluation"),
        speed=_dataclass_from(SpeedConfig, data.get("speed"), f"{where}: speed"),
        source=Path(source).resolve() if source else None, quick=bool(quick),
        raw={**data, "data": data_section})
    _check(config)
    return config


def _check(config: BenchConfig) -> None:
    """Build every run's TrainConfig (and the quality config) once, so errors surface now."""
    from ..ssl.config import METHOD_NAMES, SSLConfig

    for run in config.runs:
        if run.method not in METHOD_NAMES:
            raise ConfigError(f"{config.where}: unknown method '{run.method}'; choose one of: "
                              f"{', '.join(METHOD_NAMES)}")
        if run.guidance and run.method == "sup":
            raise ConfigError(f"{config.where}: run 'sup' cannot use quality guidance (it has no unlabeled term)")
        data = config.train_dict(run, run.seeds[0], dataset="dataset.json")
        SSLConfig.from_dict(data.get("ssl"), source=f"{config.where}: run {run.label} ssl")
        config.train_config(run, run.seeds[0], dataset="dataset.json")
    if config.needs_quality:
        config.quality_config(0)
    ev, sp = config.evaluation, config.speed
    if not 0.0 <= float(ev.overlap) < 1.0:
        raise ConfigError(f"{config.where}: evaluation.overlap must be in [0, 1), got {ev.overlap}")
    if ev.max_test_cases is not None and int(ev.max_test_cases) < 1:
        raise ConfigError(f"{config.where}: evaluation.max_test_cases must be >= 1 or null")
    if int(sp.steps) < 1 or int(sp.warmup) < 0 or int(sp.rounds) < 1:
        raise ConfigError(f"{config.where}: speed needs steps >= 1, warmup >= 0, rounds >= 1")
    if sp.methods is not None:
        unknown = sorted(set(sp.methods) - set(METHOD_NAMES))
        if unknown:
            raise ConfigError(f"{config.where}: speed.methods: unknown method(s) {', '.join(unknown)}")


def _parse_seeds(value: Any, where: str) -> Tuple[int, ...]:
    seeds = [value] if isinstance(value, int) else value
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-negative integer or a non-empty list of them, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds {list(seeds)} repeat a value")
    return tuple(int(s) for s in seeds)


def _parse_runs(raw: Any, where: str) -> List[RunSpec]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: 'runs' must be a non-empty list, e.g. runs: [{{method: sup}}, "
                          "{method: mt, guidance: 'qar,qw', seeds: [0, 1, 2]}]")
    runs: List[RunSpec] = []
    for index, item in enumerate(raw):
        at = f"{where}: runs[{index}]"
        if isinstance(item, str):
            item = {"method": item}
        if not isinstance(item, Mapping) or "method" not in item:
            raise ConfigError(f"{at}: expected {{method: NAME[, name, guidance, seeds, train]}}, got {item!r}")
        _reject_unknown(item, {"method", "name", "guidance", "seeds", "train"}, at, "key")
        name = item.get("name")
        if name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", str(name)):
            raise ConfigError(f"{at}: name {name!r} must be lower-case letters, digits, '_', '.' or '-' "
                              "(it names the run's folder and table row)")
        train = item.get("train") or {}
        if not isinstance(train, Mapping):
            raise ConfigError(f"{at}: 'train' must be a mapping of TrainConfig options")
        clash = sorted(set(train) & set(RESERVED_TRAIN_FIELDS))
        if clash:
            raise ConfigError(f"{at}: train.{clash[0]} is set by the study itself; remove it")
        run = RunSpec(str(item["method"]).lower(), parse_guidance(item.get("guidance"), at),
                      _parse_seeds(item.get("seeds", [0]), at), dict(train), name)
        if any(r.label == run.label for r in runs):
            raise ConfigError(f"{at}: run '{run.label}' is listed twice; list all its seeds in one entry")
        runs.append(run)
    return runs


def _select_runs(runs: List[RunSpec], names: Any, where: str) -> List[RunSpec]:
    names = [names] if isinstance(names, str) else list(names or [])
    wanted = {str(n).lower() for n in names}
    kept = [r for r in runs if wanted & {r.method, r.label, r.name}]
    unknown = sorted(w for w in wanted if not any(w in (r.method, r.label, r.name) for r in runs))
    if unknown or not kept:
        raise ConfigError(f"{where}: no run named {', '.join(unknown or sorted(wanted))}; the config's runs are: "
                          f"{', '.join(r.label for r in runs)}")
    return kept


def _dataclass_from(cls, raw: Any, where: str):
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    _reject_unknown(raw, {f.name for f in dataclasses.fields(cls)}, where, "option")
    return cls(**raw)


def _reject_unknown(data: Mapping, known, where: str, what: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown {what}(s) {', '.join(map(str, unknown))}; "
                          f"valid: {', '.join(sorted(known))}")


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    """`extra` over `base`; nested mappings merge, everything else (lists included) replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
