"""Training configuration: one dataclass, loadable from YAML/JSON, overridable from the CLI.

Iteration semantics: training length is counted in optimizer steps (`iterations`). An "epoch" is
`iterations_per_epoch` steps; it exists only so that schedules from the papers (written in epochs,
e.g. "QAR weight 0 for 30 epochs, then ramp over 40") keep their shape. Validation runs every
`val_every` iterations on the validation split, never the test split.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..errors import ConfigError, check_option_names, check_option_types


@dataclass
class TrainConfig:
    # data
    dataset: str = ""                      # dataset.json path
    mode: str = "3d"                       # "3d" patches or "2d" slices along z
    # (x, y, z) mm; None keeps each volume's grid; "auto" plans it from the data (data/planning.py)
    target_spacing: Union[None, str, Tuple[float, float, float]] = "auto"
    normalization: str = "zscore"          # zscore | percentile | none
    clip_percentiles: Tuple[float, float] = (0.5, 99.5)   # intensities clipped here first; [0, 100]: no clip
    label_resampling: str = "linear"       # linear (per label, then argmax; data/preprocess.py) | nearest
    crop_foreground: bool = False
    n_validation: Optional[int] = None     # cases moved to validation when the dataset lists none; None: 2, 1 of 2
    max_unlabeled: Optional[int] = None
    cache_dir: Optional[str] = None
    # model
    network: str = "unet"
    network_options: Dict[str, Any] = field(default_factory=dict)
    # build options of a method's *other* networks, by network name (the dual-network method's
    # second network, e.g. {resunet: {filters: [8, 16, 32, 64]}}); unnamed ones keep their defaults
    other_network_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # sampling
    patch_size: Union[str, Tuple[int, ...]] = "auto"   # z y x (3d) or y x (2d); "auto" plans it
    batch_size: int = 2
    unlabeled_batch_size: int = 2
    fg_ratio: float = 0.33
    center_jitter: float = 0.25            # foreground-centred patches move by up to this fraction of the patch
    augment: bool = True
    augmentation: Dict[str, Any] = field(default_factory=dict)  # AugmentConfig overrides, e.g. {gamma_prob: 0.3}
    # optimisation
    iterations: int = 2000
    iterations_per_epoch: int = 50
    loss: str = "dice_ce"                  # supervised loss: dice_ce | dice_ce_bg (ssl/losses.py)
    optimizer: str = "adamw"               # adamw | sgd
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.99
    schedule: str = "poly"                 # poly | cosine | constant
    warmup_iterations: int = 0
    grad_clip: float = 1.0
    amp: str = "auto"                      # auto (on for CUDA) | on | off
    amp_dtype: str = "auto"                # auto (bf16 where the GPU has it, else fp16) | bf16 | fp16
    channels_last: str = "auto"            # auto (on for CUDA, and for 3D on a CPU) | on | off
    # validation & checkpoints
    val_every: int = 200
    checkpoint_every: int = 100
    sw_overlap: float = 0.25
    # semi-supervised
    method: str = "sup"
    ssl: Dict[str, Any] = field(default_factory=dict)   # SSLConfig fields (see `qgseg ssl methods`)
    quality_checkpoint: Optional[str] = None           # trained g, needed by QAR/QW guidance
    # run
    seed: int = 0
    device: str = "auto"
    num_threads: Optional[int] = None
    sync_batchnorm: bool = False           # under torchrun on GPUs: BatchNorm statistics over the global batch

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config") -> "TrainConfig":
        check_option_names(data, cls, source)
        check_option_types(data, cls, source)
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.mode not in ("2d", "3d"):
            raise ConfigError(f"mode must be 2d or 3d, not {self.mode!r}")
        self.patch_size = _auto_or(self.patch_size, self._checked_patch)
        self.target_spacing = _auto_or(self.target_spacing, self._checked_spacing)
        for name in ("iterations", "batch_size", "val_every", "checkpoint_every", "iterations_per_epoch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, not {getattr(self, name)}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ConfigError(f"lr must be a positive number, not {self.lr!r}")
        from ..data.preprocess import PreprocessConfig
        from ..ssl.losses import SUPERVISED_LOSSES

        SUPERVISED_LOSSES.get(self.loss)  # unknown names raise ConfigError listing the choices
        # the preprocessing options are checked (and the percentiles made floats) where they are used
        self.clip_percentiles = PreprocessConfig(normalization=self.normalization,
                                                 clip_percentiles=self.clip_percentiles,
                                                 label_resampling=self.label_resampling).clip_percentiles
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be adamw or sgd, not {self.optimizer!r}")
        if self.schedule not in ("poly", "cosine", "constant"):
            raise ConfigError(f"schedule must be poly, cosine or constant, not {self.schedule!r}")
        if not isinstance(self.other_network_options, dict) or not all(
                isinstance(v, dict) for v in self.other_network_options.values()):
            raise ConfigError("other_network_options must map network names to option mappings, "
                              f"e.g. {{resunet: {{filters: [8, 16, 32, 64]}}}}, not {self.other_network_options!r}")
        from ..data.augment import AugmentConfig

        AugmentConfig.from_dict(self.augmentation, source="augmentation")
        if self.amp not in ("auto", "on", "off"):
            raise ConfigError(f"amp must be auto, on or off, not {self.amp!r}")
        if self.channels_last not in ("auto", "on", "off"):
            raise ConfigError(f"channels_last must be auto, on or off, not {self.channels_last!r}")
        if self.amp_dtype not in ("auto", "bf16", "fp16"):
            raise ConfigError(f"amp_dtype must be auto, bf16 or fp16, not {self.amp_dtype!r}")

    @property
    def needs_plan(self) -> bool:
        """Whether spacing or patch size is still "auto" (the trainer plans them from the data)."""
        return "auto" in (self.target_spacing, self.patch_size)

    def apply_plan(self, plan) -> None:
        """Fill an "auto" spacing / patch size from a `data.planning.Plan`; typed values stay."""
        if self.target_spacing == "auto":
            self.target_spacing = tuple(plan.target_spacing)
        if self.patch_size == "auto":
            self.patch_size = tuple(plan.patch_size)

    def _checked_patch(self, value) -> Tuple[int, ...]:
        dims = 2 if self.mode == "2d" else 3
        try:
            patch = tuple(int(p) for p in value)
        except (TypeError, ValueError):
            raise ConfigError(f"patch_size must be auto or {dims} whole numbers, not {value!r}") from None
        if len(patch) == 3 and dims == 2:
            patch = patch[1:]
        if len(patch) != dims or min(patch) < 1:
            raise ConfigError(f"patch_size {patch} must have {dims} positive numbers in {self.mode} mode")
        return patch

    @staticmethod
    def _checked_spacing(value) -> Optional[Tuple[float, float, float]]:
        if value is None:
            return None
        try:
            spacing = tuple(float(s) for s in value)
        except (TypeError, ValueError):
            spacing = ()
        if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
            raise ConfigError(f"target_spacing must be auto, null (keep) or three positive numbers "
                              f"(x y z mm), not {value!r}")
        return spacing


GUIDANCE_NEEDS_PREDICTOR = ("quality guidance (qar/qw) needs a trained quality predictor: pass "
                            "--quality-checkpoint (train one with `qgseg quality train`)")


def check_guidance_has_predictor(cfg: TrainConfig) -> None:
    """Quality guidance without g is refused before anything is planned, loaded or written."""
    ssl = cfg.ssl or {}
    if (ssl.get("guidance_qar") or ssl.get("guidance_qw")) and not cfg.quality_checkpoint:
        raise ConfigError(GUIDANCE_NEEDS_PREDICTOR)


def _auto_or(value, check):
    """"auto" as it is (any case), anything else through `check`."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return check(value)


def load_config_file(path: str | Path) -> Dict[str, Any]:
    """Read a YAML or JSON config file into a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - parser errors vary by library
        raise ConfigError(f"{path}: cannot parse config file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of option: value")
    return data


def parse_override(text: str) -> Tuple[List[str], Any]:
    """`ssl.ema_decay=0.99` -> (["ssl", "ema_decay"], 0.99); values parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except Exception:  # noqa: BLE001
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    out = json.loads(json.dumps(data))
    for text in overrides or []:
        keys, value = parse_override(text)
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {key} is not a section")
        node[keys[-1]] = value
    return out
