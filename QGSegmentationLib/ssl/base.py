"""The contract between the training engine and a semi-supervised method, plus shared helpers.

The engine builds `num_networks` networks (architectures from `network_names(config)` when a
method returns one, else the configured network with different init seeds) and one optimizer per
network, then per iteration calls `training_step` -> backward of "loss" -> optimizer steps ->
`after_optimizer_step`. Validation and inference run `eval_network()`.

Quality guidance plugs in here, identically for every method:
- QW: each method computes its unlabeled term per sample, (B,), together with the hard pseudolabel
  that term trusts; `unlabeled_mean` turns it into the quality-weighted mean when `guidance_qw` is on
  (plain mean otherwise).
- QAR: `qar_term` adds lambda_qar(epoch) * (1 - mean g(x_u, softmax(f(x_u)))) on logits the method
  already computed, so guidance costs no extra segmenter forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .config import SSLConfig, ssl_config_of  # noqa: F401  (SSLConfig is part of this module's API)
from .losses import SUPERVISED_LOSSES

__all__ = ["StepInfo", "SSLMethod", "SSLConfig", "ssl_config_of", "AveragedSoftmax", "forward_pair"]


@dataclass
class StepInfo:
    """Where training is: `iteration` counts optimizer steps from 0."""

    iteration: int
    total_iterations: int
    iterations_per_epoch: int

    @property
    def epoch(self) -> float:
        return self.iteration / max(1, self.iterations_per_epoch)


def forward_pair(net: nn.Module, labeled: torch.Tensor, unlabeled: torch.Tensor):
    """One forward over labeled and unlabeled images together (when their shapes allow), split."""
    if labeled.shape[1:] == unlabeled.shape[1:]:
        out = net(torch.cat([labeled, unlabeled], dim=0))
        return out[: labeled.shape[0]], out[labeled.shape[0]:]
    return net(labeled), net(unlabeled)


class AveragedSoftmax(nn.Module):
    """Ensemble for evaluation: log of the mean of the members' softmaxes.

    Returns log-probabilities, so softmax/argmax downstream give exactly the averaged probabilities.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-12))


class SSLMethod:
    """Base class: supervised loss, QW/QAR plumbing, result packing. Subclasses register in
    `ssl.methods.METHODS` and implement `training_step`."""

    name: str = ""
    description: str = ""
    num_networks: int = 1
    uses_unlabeled: bool = True
    supports_heterogeneous: bool = False   # whether `ssl.heterogeneous_loss` (MetaSSL) applies

    def __init__(self, networks: List[nn.Module], config, guidance=None):
        if len(networks) != self.num_networks:
            raise ConfigError(f"method '{self.name}' needs {self.num_networks} network(s), "
                              f"got {len(networks)}")
        self.networks = list(networks)
        self.config = config
        self.cfg: SSLConfig = ssl_config_of(config)
        self.guidance = guidance
        self._supervised_per_sample = SUPERVISED_LOSSES.get(getattr(config, "loss", None) or "dice_ce")
        if (self.cfg.guidance_qar or self.cfg.guidance_qw) and guidance is None:
            raise ConfigError(f"method '{self.name}': ssl.guidance_qar/guidance_qw need a trained "
                              "quality predictor (set quality_checkpoint)")
        if self.cfg.heterogeneous_loss and not self.supports_heterogeneous:
            raise ConfigError(f"ssl.heterogeneous_loss is available for mt, fixmatch and cps, "
                              f"not for method '{self.name}'")

    # --- engine-facing API -------------------------------------------------------------------
    @classmethod
    def network_names(cls, config) -> Optional[List[str]]:
        """Architectures to build, one per network; None = the configured network for all."""
        return None

    def training_step(self, labeled: dict, unlabeled: Optional[dict], step: StepInfo) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_optimizer_step(self, step: StepInfo) -> None:
        """Called after every optimizer step (EMA updates live here)."""

    def eval_network(self) -> nn.Module:
        return self.networks[0]

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned (tensors only)."""

    # --- guidance helpers --------------------------------------------------------------------
    @property
    def qar_on(self) -> bool:
        return self.guidance is not None and self.cfg.guidance_qar

    @property
    def qw_on(self) -> bool:
        return self.guidance is not None and self.cfg.guidance_qw

    def quality_weights(self, image: torch.Tensor, hard_labels: torch.Tensor,
                        n_classes: int) -> Optional[torch.Tensor]:
        """Per-sample QW weights (B,) of the pseudolabel `hard_labels` on `image`; None when QW is off."""
        if not self.qw_on:
            return None
        weights = self.guidance.qw_weights(image, hard_labels, n_classes)
        self._last_qw = weights.detach()
        return weights

    def unlabeled_mean(self, per_sample: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """Reduce a per-sample unlabeled term (B,): the quality-weighted mean when `weights` (from
        `quality_weights`) are given, else the plain mean."""
        if weights is None:
            return per_sample.mean()
        return self.guidance.weighted_mean(per_sample, weights)

    def qar_term(self, image: torch.Tensor, logits: torch.Tensor, step: StepInfo, logs: dict) -> torch.Tensor:
        """lambda_qar(epoch) * QAR loss on logits the method already has; 0 when off or weight 0."""
        if not self.qar_on:
            return logits.new_zeros(())
        weight = self.guidance.lambda_qar(step.epoch)
        logs["qar_weight"] = weight
        if weight <= 0.0:
            return logits.new_zeros(())
        qar = self.guidance.qar_loss(image, logits)
        logs["qar"] = qar
        return weight * qar

    # --- shared pieces ------------------------------------------------------------------------
    def supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The configured supervised loss (`TrainConfig.loss`, default 0.5 CE + 0.5 foreground soft
        Dice) over the labeled batch."""
        return self._supervised_per_sample(logits, labels).mean()

    def result(self, loss: torch.Tensor, logs: dict) -> Dict[str, torch.Tensor]:
        """{"loss": loss (with grad)} plus detached scalar logs (QW weight mean when QW ran)."""
        out: Dict[str, torch.Tensor] = {"loss": loss}
        qw = getattr(self, "_last_qw", None)
        if qw is not None:
            out["qw_mean"] = qw.float().mean()
            self._last_qw = None
        for key, value in logs.items():
            if isinstance(value, torch.Tensor):
                out[key] = value.detach().float().mean()
            else:
                out[key] = torch.tensor(float(value))
        return out

    @staticmethod
    def require_unlabeled(name: str, unlabeled: Optional[dict]) -> torch.Tensor:
        if unlabeled is None or "image" not in unlabeled:
            raise ConfigError(f"method '{name}' needs unlabeled images, but the batch has none "
                              "(add unlabeled cases to the dataset)")
        return unlabeled["image"]


class TeacherStudentMethod(SSLMethod):
    """A method with an EMA teacher of network 0 (PL family, MT, UA-MT, ICT, CL)."""

    def __init__(self, networks: List[nn.Module], config, guidance=None):
        super().__init__(networks, config, guidance)
        from .ema import EMATeacher

        self.teacher = EMATeacher(self.networks[0], self.teacher_decay())

    def teacher_decay(self) -> float:
        """The EMA teacher's decay (its source paper's): `ema_decay` unless a method says otherwise."""
        return self.cfg.ema_decay

    def teacher_probs(self, image: torch.Tensor) -> torch.Tensor:
        """Teacher softmax on `image`, without gradient (in float32 under float16 autocast)."""
        from ..engine.device import float32_under_float16_autocast

        self.teacher.follow_device(self.networks[0])
        with torch.no_grad(), float32_under_float16_autocast():
            return torch.softmax(self.teacher(image.float()).float(), dim=1)

    def noisy(self, image: torch.Tensor) -> torch.Tensor:
        """image + clip(N(0, std), -clip, clip): the teacher-input noise of MT/UA-MT."""
        noise = torch.randn_like(image) * self.cfg.teacher_noise_std
        return image + noise.clamp(-self.cfg.teacher_noise_clip, self.cfg.teacher_noise_clip)

    def after_optimizer_step(self, step: StepInfo) -> None:
        self.teacher.follow_device(self.networks[0])
        self.teacher.update(self.networks[0])

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.teacher.follow_device(self.networks[0])
        if "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])
        else:  # e.g. starting from a supervised checkpoint: the teacher starts as the loaded student
            self.teacher.module.load_state_dict(self.networks[0].state_dict())
