"""Pseudo-labelling with an EMA teacher (the host of QG-SSL's PL-QW)."""

from __future__ import annotations

import torch

from ..base import StepInfo, TeacherStudentMethod, forward_pair
from ..losses import dice_ce_per_sample
from ..ramps import delayed_linear
from . import METHODS


@METHODS.register("pl", description="EMA-teacher pseudolabels (argmax), 0.5 CE + 0.5 Dice per sample")
class PseudoLabel(TeacherStudentMethod):
    """L = L_sup + lambda(t) mean_b l_b, l_b = 0.5 CE + 0.5 (1 - Dice) of the student against the
    teacher's argmax. lambda(t) is 0 for 15 epochs then linear over 30 to 0.25 (QG-SSL's lambda_qw
    schedule: with guidance_qw the guidance's lambda_qw is used, so PL and PL-QW differ only in
    the per-sample weights). Subclasses change the per-pixel trust in the pseudolabel."""

    name = "pl"
    description = "EMA-teacher pseudo-labelling"

    def teacher_decay(self) -> float:
        return self.cfg.pl_ema_decay  # QG-SSL's PL-QW teacher: 0.999

    def unlabeled_weight(self, epoch: float) -> float:
        if self.qw_on:
            return self.guidance.lambda_qw(epoch)
        c = self.cfg
        return delayed_linear(epoch, c.pl_delay_epochs, c.pl_rampup_epochs, c.pl_weight)

    def pseudo_label_loss(self, logits_u: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,) of the student against the teacher's pseudolabels."""
        return dice_ce_per_sample(logits_u, teacher_probs.argmax(dim=1))

    def training_step(self, labeled, unlabeled, step: StepInfo):
        xu = self.require_unlabeled(self.name, unlabeled)
        logits_l, logits_u = forward_pair(self.networks[0], labeled["image"], xu)
        probs_t = self.teacher_probs(xu)
        hard = probs_t.argmax(dim=1)
        weights = self.quality_weights(xu, hard, logits_u.shape[1])
        unl = self.unlabeled_mean(self.pseudo_label_loss(logits_u, probs_t), weights)
        logs = {"sup": self.supervised_loss(logits_l, labeled["label"]), "unlabeled": unl}
        lam = self.unlabeled_weight(step.epoch)
        logs["unlabeled_weight"] = lam
        loss = logs["sup"] + lam * unl + self.qar_term(xu, logits_u, step, logs)
        return self.result(loss, logs)
