"""Mean Teacher: MSE consistency between student and EMA-teacher softmaxes."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..base import StepInfo, TeacherStudentMethod, forward_pair
from ..losses import per_sample_mean
from ..metassl import HeterogeneousTerms
from ..ramps import sigmoid_weight
from . import METHODS


@METHODS.register("mt", description="Mean Teacher (softmax MSE consistency, EMA teacher)")
class MeanTeacher(TeacherStudentMethod):
    """L = L_sup + w(t) mean_b MSE_b(softmax(student(x_u)), softmax(teacher(x_u + noise))),
    w(t) = consistency_weight * sigmoid_rampup(epoch, consistency_rampup_epochs).

    With `heterogeneous_loss` (MetaSSL) the consistency term is replaced by the region-weighted CE
    against the teacher, and a labeled heterogeneous term against the ground truth is added.
    """

    name = "mt"
    description = "Mean Teacher"
    supports_heterogeneous = True

    def __init__(self, networks, config, guidance=None):
        super().__init__(networks, config, guidance)
        self.het = HeterogeneousTerms(self.cfg) if self.cfg.heterogeneous_loss else None

    def teacher_target(self, xu: torch.Tensor, step: StepInfo) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Teacher probabilities and an optional pixel mask of where to trust them."""
        return self.teacher_probs(self.noisy(xu)), None

    def consistency_per_sample(self, logits_u, probs_t, mask):
        squared = ((torch.softmax(logits_u.float(), dim=1) - probs_t) ** 2).mean(dim=1)
        if mask is None:
            return per_sample_mean(squared)
        mask = mask.float()
        return (mask * squared).flatten(1).sum(1) / (mask.flatten(1).sum(1) + 1e-6)

    def training_step(self, labeled, unlabeled, step: StepInfo):
        xu = self.require_unlabeled(self.name, unlabeled)
        logits_l, logits_u = forward_pair(self.networks[0], labeled["image"], xu)
        probs_t, mask = self.teacher_target(xu, step)
        weights = self.quality_weights(xu, probs_t.argmax(dim=1), logits_u.shape[1])
        logs = {"sup": self.supervised_loss(logits_l, labeled["label"])}
        if mask is not None:
            logs["certain_fraction"] = mask.float().mean()
        if self.het is not None:
            unl = self.unlabeled_mean(self.het.unlabeled.per_sample(logits_u, probs_t), weights)
            lab = self.het.labeled.per_sample(logits_l, labeled["label"]).mean()
            lam = self.het.weight(step.epoch)
            logs.update(het_unlabeled=unl, het_labeled=lab, het_weight=lam)
            unsup = lam * (unl + lab)
        else:
            unl = self.unlabeled_mean(self.consistency_per_sample(logits_u, probs_t, mask), weights)
            lam = sigmoid_weight(step.epoch, self.cfg.consistency_weight, self.cfg.consistency_rampup_epochs)
            logs.update(consistency=unl, consistency_weight=lam)
            unsup = lam * unl
        loss = logs["sup"] + unsup + self.qar_term(xu, logits_u, step, logs)
        return self.result(loss, logs)

    def extra_state(self) -> dict:
        state = super().extra_state()
        if self.het is not None:
            state["heterogeneous"] = self.het.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if self.het is not None and "heterogeneous" in state:
            self.het.load_state_dict(state["heterogeneous"])
