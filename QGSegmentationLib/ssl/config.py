"""Hyper-parameters of every semi-supervised method and of quality guidance (pure Python).

Kept free of torch so that the command-line parser and the engine's config loader can validate an
`ssl:` section without importing the deep-learning stack. `ssl.base` re-exports `SSLConfig`.

Schedules are in epochs (paper units); the engine's `StepInfo.epoch` is `iteration /
iterations_per_epoch`. Defaults follow the source papers (docs/methods.md); where we had to choose,
the field comment says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import ConfigError, check_option_names, check_option_types

#: Names registered in `ssl.methods.METHODS` (kept here so a parser can offer them without torch;
#: a test checks the two agree).
METHOD_NAMES: Tuple[str, ...] = (
    "cl", "cps", "dualnet", "fixmatch", "ict", "mt", "pl", "pl_c", "pl_t", "sup", "uamt",
)

REGION_NAMES = ("UC", "US", "DC", "DS")

#: Training length of the QG-SSL paper, for which its QAR / QW schedules (in epochs) were written.
PAPER_EPOCHS = 200.0


@dataclass
class SSLConfig:
    """Every method hyper-parameter, with the papers' defaults."""

    # --- shared: EMA teacher and consistency ramp (UA-MT / MT defaults) ---
    ema_decay: float = 0.99                 # MT/UA-MT/ICT/CL teachers (UA-MT's 0.99)
    consistency_weight: float = 0.1         # MT, UA-MT, ICT: weight * sigmoid_rampup(epoch, 40)
    consistency_rampup_epochs: float = 40.0
    # --- pseudo-labelling (PL, PL-T, PL-C); schedule = QG-SSL's lambda_qw schedule ---
    pl_ema_decay: float = 0.999             # PL, PL-T, PL-C teachers: QG-SSL's PL-QW (methods.md 1.4)
    pl_weight: float = 0.25                 # 0 for 15 epochs, then linear over 30 epochs to 0.25
    pl_delay_epochs: float = 15.0
    pl_rampup_epochs: float = 30.0
    pl_t_threshold: float = 0.9             # PL-T: keep pixels with teacher confidence >= 0.9
    pl_c_threshold: float = 0.9             # PL-C: pixel weight conf^T * 1[conf >= 0.9]
    pl_c_temperature: float = 2.0
    # --- UA-MT ---
    uamt_passes: int = 4                    # noisy teacher passes (paper 8; 4 is kinder to CPUs)
    teacher_noise_std: float = 0.1          # MT/UA-MT teacher input noise N(0, 0.1) clipped to +-0.2
    teacher_noise_clip: float = 0.2
    # --- ICT ---
    ict_alpha: float = 1.0                  # mixup coefficient ~ Beta(alpha, alpha)
    # --- CPS ---
    cps_weight: float = 1.0                 # ours: 1.0 * sigmoid_rampup(epoch, consistency_rampup_epochs)
    # --- contrastive (CL) ---
    cl_weight: float = 0.1
    cl_threshold: float = 0.9
    cl_temperature: float = 0.1
    cl_negatives: int = 256
    cl_anchors_per_class: int = 256
    # --- FixMatch / UniMatch-style weak-to-strong ---
    fixmatch_threshold: float = 0.95
    fixmatch_weight: float = 1.0
    fixmatch_mix: str = "cutmix"            # cutmix | copy_paste | none
    strong_brightness: float = 0.2          # intensity jitter: x * (1 + U(-c, c)) + U(-b, b)
    strong_contrast: float = 0.2
    strong_noise_std: float = 0.1
    strong_blur_probability: float = 0.5
    strong_blur_sigma: Tuple[float, float] = (0.1, 1.0)
    cutmix_area: Tuple[float, float] = (0.1, 0.5)  # box area fraction range
    # --- MetaSSL heterogeneous loss (mt, fixmatch, cps) ---
    heterogeneous_loss: bool = False
    het_weight: float = 0.1                 # lambda(t) = 0.1 * sigmoid_rampup(epoch, het_rampup_epochs)
    het_rampup_epochs: float = 40.0
    het_region_order: Tuple[str, ...] = ("UC", "US", "DC", "DS")  # weights decrease along it
    het_unlabeled_w0: float = 50.0
    het_unlabeled_r: float = 0.6
    het_unlabeled_gamma: float = 3.0
    het_labeled_w0: float = 85.0
    het_labeled_r: float = 0.3
    het_labeled_gamma: float = 3.0
    het_threshold_init: float = 0.9
    het_threshold_momentum: float = 0.5     # tau_c <- m tau_c + (1 - m) mean max-prob
    # --- dual-network uncertainty-guided pseudo-labelling ---
    dualnet_networks: Optional[Tuple[str, str]] = None  # None: (vnet|unet by mode, resunet)
    dualnet_weight: float = 1.0             # ours: CCE + KL terms * sigmoid_rampup(epoch, ...)
    dualnet_entropy_percentile: float = 20.0
    dualnet_kl_temperature: float = 0.5
    dualnet_proto_weight: float = 0.1       # 0.1 * sigmoid_rampup(epoch, consistency_rampup_epochs)
    dualnet_proto_fraction: float = 0.01
    # --- quality guidance (QG-SSL) ---
    guidance_qar: bool = False
    guidance_qw: bool = False
    qar_weight: float = 0.01                # 0 for 30 epochs, then linear over 40 epochs to 0.01
    qar_delay_epochs: float = 30.0
    qar_rampup_epochs: float = 40.0
    qw_weight: float = 0.25                 # 0 for 15 epochs, then linear over 30 epochs to 0.25
    qw_delay_epochs: float = 15.0
    qw_rampup_epochs: float = 30.0
    qw_temperature: float = 2.0
    qw_tau: float = 0.5

    def __post_init__(self) -> None:
        self.validate()

    def guidance_shortfall(self, run_epochs: float) -> Dict[str, float]:
        """{"qar"/"qw": the fraction of its weight the switched-on guidance term reaches by the end
        of a run of `run_epochs` epochs} for each term whose delay + ramp does not fit in the run
        (the QG-SSL paper's schedules are for 200 epochs; a default 2000-iteration run has 40)."""
        terms = {"qar": (self.guidance_qar, self.qar_delay_epochs, self.qar_rampup_epochs),
                 "qw": (self.guidance_qw, self.qw_delay_epochs, self.qw_rampup_epochs)}
        short = {}
        for name, (on, delay, ramp) in terms.items():
            if on and delay + ramp > run_epochs:
                short[name] = 0.0 if run_epochs <= delay else (run_epochs - delay) / max(ramp, 1e-9)
        return short

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]], source: str = "ssl") -> "SSLConfig":
        """Build from a mapping; unknown keys raise a ConfigError that lists the valid ones."""
        data = dict(data or {})
        check_option_names(data, cls, source)
        check_option_types(data, cls, source)
        return cls(**data)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        """Raise ConfigError naming the option for any out-of-range value."""
        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"ssl.{name} must be {what}, not {getattr(self, name)!r}")

        check("ema_decay", 0.0 <= self.ema_decay < 1.0, "in [0, 1)")
        check("pl_ema_decay", 0.0 <= self.pl_ema_decay < 1.0, "in [0, 1)")
        for name in ("pl_t_threshold", "pl_c_threshold", "cl_threshold", "fixmatch_threshold",
                     "het_threshold_init", "qw_tau"):
            check(name, 0.0 <= getattr(self, name) <= 1.0, "in [0, 1]")
        for name in ("consistency_weight", "pl_weight", "cps_weight", "cl_weight", "fixmatch_weight",
                     "het_weight", "dualnet_weight", "dualnet_proto_weight", "qar_weight",
                     "qw_weight", "consistency_rampup_epochs", "pl_delay_epochs",
                     "pl_rampup_epochs", "het_rampup_epochs", "qar_delay_epochs",
                     "qar_rampup_epochs", "qw_delay_epochs", "qw_rampup_epochs",
                     "teacher_noise_std", "teacher_noise_clip", "strong_brightness", "strong_contrast",
                     "strong_noise_std"):
            check(name, float(getattr(self, name)) >= 0.0, ">= 0")
        for name in ("pl_c_temperature", "cl_temperature", "dualnet_kl_temperature",
                     "qw_temperature", "ict_alpha"):
            check(name, float(getattr(self, name)) > 0.0, "> 0")
        check("uamt_passes", int(self.uamt_passes) >= 1, ">= 1")
        check("cl_negatives", int(self.cl_negatives) >= 1, ">= 1")
        check("cl_anchors_per_class", int(self.cl_anchors_per_class) >= 1, ">= 1")
        check("fixmatch_mix", self.fixmatch_mix in ("cutmix", "copy_paste", "none"),
              "one of cutmix, copy_paste, none")
        check("strong_blur_probability", 0.0 <= self.strong_blur_probability <= 1.0, "in [0, 1]")
        self.strong_blur_sigma = tuple(float(s) for s in self.strong_blur_sigma)
        check("strong_blur_sigma", len(self.strong_blur_sigma) == 2
              and 0 < self.strong_blur_sigma[0] <= self.strong_blur_sigma[1], "two numbers 0 < lo <= hi")
        self.cutmix_area = tuple(float(s) for s in self.cutmix_area)
        check("cutmix_area", len(self.cutmix_area) == 2
              and 0 < self.cutmix_area[0] <= self.cutmix_area[1] <= 1, "two numbers 0 < lo <= hi <= 1")
        self.het_region_order = tuple(str(r).upper() for r in self.het_region_order)
        check("het_region_order", sorted(self.het_region_order) == sorted(REGION_NAMES),
              "an ordering of UC, US, DC, DS")
        check("het_threshold_momentum", 0.0 <= self.het_threshold_momentum < 1.0, "in [0, 1)")
        check("dualnet_entropy_percentile", 0.0 < self.dualnet_entropy_percentile <= 100.0,
              "in (0, 100]")
        check("dualnet_proto_fraction", 0.0 < self.dualnet_proto_fraction <= 1.0, "in (0, 1]")
        if self.dualnet_networks is not None:
            self.dualnet_networks = tuple(str(n) for n in self.dualnet_networks)
            check("dualnet_networks", len(self.dualnet_networks) == 2, "two network names")


def ssl_config_of(config: Any) -> SSLConfig:
    """The SSLConfig inside an engine config (`config.ssl`, object or dict) or `config` itself."""
    if config is None:
        return SSLConfig()
    if isinstance(config, SSLConfig):
        return config
    inner = getattr(config, "ssl", None)
    if isinstance(inner, SSLConfig):
        return inner
    if isinstance(inner, Mapping):
        return SSLConfig.from_dict(inner)
    if isinstance(config, Mapping):
        return SSLConfig.from_dict(config)
    raise ConfigError(f"cannot find SSL options in a {type(config).__name__} "
                      "(expected an SSLConfig, a mapping, or an object with an `ssl` attribute)")


def guidance_schedule_for(run_epochs: float, paper_epochs: float = PAPER_EPOCHS) -> Dict[str, float]:
    """The QAR and QW delays and ramps of the QG-SSL paper (written for `paper_epochs` epochs)
    scaled to a run of `run_epochs` epochs, keeping their shape: the same fractions of training."""
    scale = float(run_epochs) / float(paper_epochs)
    defaults = SSLConfig()
    return {name: round(getattr(defaults, name) * scale, 3)
            for name in ("qar_delay_epochs", "qar_rampup_epochs", "qw_delay_epochs", "qw_rampup_epochs")}
