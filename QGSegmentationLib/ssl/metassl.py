"""MetaSSL heterogeneous loss (Zhao et al.): weight pixels by agreement and confidence.

Two predictions per pixel: the trained prediction p (logits with gradient) and a reference (a
teacher / weak view / other network's probabilities, or the ground-truth labels). Regions:
UC unanimous & confident, US unanimous & suspicious, DC discrepant & confident, DS discrepant &
suspicious. Unanimous = same argmax. Confident = the max probability is above the adaptive
threshold of the predicted class, for p and (when it is a prediction) for the reference too.
Each region's CE (against the reference's argmax) is averaged over the region, sum(m CE)/(|m|+1),
per sample, and the regions are combined with weights w_k = w0 exp(-(k r)^gamma) along a
configurable order (default UC > US > DC > DS).

Adaptive thresholds (per class, per prediction, separately for labeled and unlabeled use):
tau_c <- m tau_c + (1 - m) mean{max-prob of pixels predicted c}, init 0.9, clipped to <= 1; a class
predicted nowhere keeps its threshold. Thresholds are updated with the current batch first, then
used to classify it.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from .config import REGION_NAMES, SSLConfig
from .losses import cross_entropy_map, region_mean_per_sample


def region_weights(w0: float, r: float, gamma: float) -> Tuple[float, float, float, float]:
    """w_k = w0 exp(-(k r)^gamma), k = 0..3 (e.g. 50, 0.6, 3 -> 50 / 40.3 / 8.9 / 0.15)."""
    return tuple(float(w0) * math.exp(-((k * r) ** gamma)) for k in range(4))


class AdaptiveThresholds:
    """Per-class confidence thresholds of one prediction stream."""

    def __init__(self, init: float = 0.9, momentum: float = 0.5):
        self.init = float(init)
        self.momentum = float(momentum)
        self.values: Optional[torch.Tensor] = None

    def _ensure(self, n_classes: int, device) -> torch.Tensor:
        if self.values is None or self.values.numel() != n_classes:
            self.values = torch.full((n_classes,), self.init, device=device)
        elif self.values.device != torch.device(device):
            self.values = self.values.to(device)
        return self.values

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> torch.Tensor:
        """Move each predicted class's threshold halfway to its pixels' mean max-probability."""
        n_classes = probs.shape[1]
        tau = self._ensure(n_classes, probs.device)
        conf, pred = probs.float().max(dim=1)
        counts = torch.bincount(pred.flatten(), minlength=n_classes).float()
        sums = torch.bincount(pred.flatten(), weights=conf.flatten(), minlength=n_classes)
        mean = sums / counts.clamp_min(1.0)
        updated = self.momentum * tau + (1.0 - self.momentum) * mean
        self.values = torch.where(counts > 0, updated, tau).clamp(max=1.0)
        return self.values

    @torch.no_grad()
    def confident(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, *sp) bool: max probability > threshold of the predicted class."""
        tau = self._ensure(probs.shape[1], probs.device)
        conf, pred = probs.float().max(dim=1)
        return conf > tau[pred]


def assign_regions(pred_probs: torch.Tensor, reference: torch.Tensor,
                   pred_thresholds: AdaptiveThresholds,
                   ref_thresholds: Optional[AdaptiveThresholds]) -> Dict[str, torch.Tensor]:
    """Float masks (B, *sp) for UC, US, DC, DS. `reference` is probabilities (B,C,*sp) or labels
    (B,*sp); labels count as confident, so only p's confidence matters against ground truth."""
    pred_label = pred_probs.argmax(dim=1)
    confident = pred_thresholds.confident(pred_probs)
    if reference.ndim == pred_probs.ndim:
        ref_label = reference.argmax(dim=1)
        if ref_thresholds is not None:
            confident = confident & ref_thresholds.confident(reference)
    else:
        ref_label = reference
    agree = pred_label == ref_label
    masks = {
        "UC": agree & confident,
        "US": agree & ~confident,
        "DC": ~agree & confident,
        "DS": ~agree & ~confident,
    }
    return {k: v.float() for k, v in masks.items()}


class HeterogeneousLoss:
    """Region-weighted CE of p against a reference, per sample, with its own adaptive thresholds."""

    def __init__(self, weights: Sequence[float], order: Sequence[str] = REGION_NAMES,
                 threshold_init: float = 0.9, momentum: float = 0.5):
        order = tuple(str(o).upper() for o in order)
        if sorted(order) != sorted(REGION_NAMES) or len(weights) != 4:
            raise ValueError(f"order must list UC, US, DC, DS once and weights must be 4 numbers, "
                             f"got {order} and {tuple(weights)}")
        self.weight_of = {name: float(w) for name, w in zip(order, weights)}
        self.pred_thresholds = AdaptiveThresholds(threshold_init, momentum)
        self.ref_thresholds = AdaptiveThresholds(threshold_init, momentum)

    @classmethod
    def unlabeled(cls, cfg: SSLConfig) -> "HeterogeneousLoss":
        return cls(region_weights(cfg.het_unlabeled_w0, cfg.het_unlabeled_r, cfg.het_unlabeled_gamma),
                   cfg.het_region_order, cfg.het_threshold_init, cfg.het_threshold_momentum)

    @classmethod
    def labeled(cls, cfg: SSLConfig) -> "HeterogeneousLoss":
        return cls(region_weights(cfg.het_labeled_w0, cfg.het_labeled_r, cfg.het_labeled_gamma),
                   cfg.het_region_order, cfg.het_threshold_init, cfg.het_threshold_momentum)

    def regions(self, logits: torch.Tensor, reference: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Update the thresholds with this batch, then assign its pixels to regions."""
        probs = torch.softmax(logits.detach().float(), dim=1)
        self.pred_thresholds.update(probs)
        is_prediction = reference.ndim == logits.ndim
        if is_prediction:
            self.ref_thresholds.update(reference.detach())
        return assign_regions(probs, reference.detach(), self.pred_thresholds,
                              self.ref_thresholds if is_prediction else None)

    def per_sample(self, logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(B,) sum_k w_k sum(m_k CE) / (|m_k| + 1); reference = probabilities or int labels."""
        masks = self.regions(logits, reference)
        target = reference.argmax(dim=1) if reference.ndim == logits.ndim else reference.long()
        ce = cross_entropy_map(logits.float(), target.detach())
        total = 0.0
        for name, mask in masks.items():
            total = total + self.weight_of[name] * region_mean_per_sample(ce, mask)
        return total

    def state_dict(self) -> dict:
        out = {}
        for key, th in (("pred", self.pred_thresholds), ("ref", self.ref_thresholds)):
            if th.values is not None:
                out[key] = th.values.detach().clone()
        return out

    def load_state_dict(self, state: dict) -> None:
        if "pred" in state:
            self.pred_thresholds.values = state["pred"].clone()
        if "ref" in state:
            self.ref_thresholds.values = state["ref"].clone()


class HeterogeneousTerms:
    """The unlabeled and labeled heterogeneous losses of one trained network, and lambda(t).

    Total (MetaSSL): L_sup + lambda(t) [L_unl_het + L_lab_het], lambda(t) = het_weight *
    sigmoid_rampup(epoch, het_rampup_epochs); the unlabeled part replaces the host method's
    consistency / pseudo-supervision term.
    """

    def __init__(self, cfg: SSLConfig):
        self.cfg = cfg
        self.unlabeled = HeterogeneousLoss.unlabeled(cfg)
        self.labeled = HeterogeneousLoss.labeled(cfg)

    def weight(self, epoch: float) -> float:
        from .ramps import sigmoid_weight

        return sigmoid_weight(epoch, self.cfg.het_weight, self.cfg.het_rampup_epochs)

    def state_dict(self) -> dict:
        return {"unlabeled": self.unlabeled.state_dict(), "labeled": self.labeled.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.unlabeled.load_state_dict(state.get("unlabeled", {}))
        self.labeled.load_state_dict(state.get("labeled", {}))
