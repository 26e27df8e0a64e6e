"""ICT: interpolation consistency (mixup of unlabeled images vs mixup of teacher predictions)."""

from __future__ import annotations

import torch

from ..augment import partner_permutation
from ..base import StepInfo, TeacherStudentMethod, forward_pair
from ..losses import softmax_mse_per_sample
from ..ramps import sigmoid_weight
from . import METHODS


@METHODS.register("ict", description="interpolation consistency training (mixup Beta(1,1), EMA teacher)")
class InterpolationConsistency(TeacherStudentMethod):
    """x_mix = lam x_u + (1 - lam) x_u[perm], lam ~ Beta(alpha, alpha) per sample; consistency
    MSE(softmax(student(x_mix)), lam p_t + (1 - lam) p_t[perm]), weighted like MT.

    QW weight of a mixed sample = lam w_b + (1 - lam) w_perm(b) (g judges real images only). QAR is
    applied to the student's output on the unmixed unlabeled images, as the QG-SSL paper applies it
    (methods.md 1.3): g never saw a blend of two images. That costs one more student forward, made
    only while QAR's weight is positive.
    """

    name = "ict"
    description = "interpolation consistency training"

    def training_step(self, labeled, unlabeled, step: StepInfo):
        xu = self.require_unlabeled(self.name, unlabeled)
        b = xu.shape[0]
        perm = partner_permutation(b, xu.device)
        alpha = self.cfg.ict_alpha
        lam = torch.distributions.Beta(alpha, alpha).sample((b,)).to(xu.device)
        lam_img = lam.reshape((b,) + (1,) * (xu.ndim - 1))
        x_mix = lam_img * xu + (1.0 - lam_img) * xu[perm]
        logits_l, logits_mix = forward_pair(self.networks[0], labeled["image"], x_mix)
        probs_t = self.teacher_probs(xu)
        target = lam_img * probs_t + (1.0 - lam_img) * probs_t[perm]
        weights = self.quality_weights(xu, probs_t.argmax(dim=1), logits_mix.shape[1])
        if weights is not None:
            weights = lam * weights + (1.0 - lam) * weights[perm]
        unl = self.unlabeled_mean(softmax_mse_per_sample(logits_mix, target), weights)
        w = sigmoid_weight(step.epoch, self.cfg.consistency_weight, self.cfg.consistency_rampup_epochs)
        logs = {"sup": self.supervised_loss(logits_l, labeled["label"]), "consistency": unl,
                "consistency_weight": w}
        loss = logs["sup"] + w * unl + self.qar_on_unmixed(xu, step, logs)
        return self.result(loss, logs)

    def qar_on_unmixed(self, xu: torch.Tensor, step: StepInfo, logs: dict) -> torch.Tensor:
        """QAR on the student's output for `xu` itself; its forward runs only when QAR counts."""
        if self.qar_on and self.guidance.lambda_qar(step.epoch) > 0:
            return self.qar_term(xu, self.networks[0](xu), step, logs)
        return self.qar_term(xu, xu.new_zeros(()), step, logs)  # 0, with the weight logged
