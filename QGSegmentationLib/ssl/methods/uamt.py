"""UA-MT: Mean Teacher whose consistency is restricted to voxels the teacher is certain about."""

from __future__ import annotations

import math

import torch

from ..base import StepInfo
from ..losses import entropy_map
from ..ramps import sigmoid_rampup
from . import METHODS
from .mt import MeanTeacher


@METHODS.register("uamt", description="uncertainty-aware Mean Teacher (entropy of T noisy teacher passes)")
class UncertaintyAwareMeanTeacher(MeanTeacher):
    """Uncertainty = entropy of the mean softmax over `uamt_passes` noisy teacher passes (paper 8);
    consistency (MSE against that mean) only where uncertainty < (0.75 + 0.25 sigmoid_rampup(it,
    total)) ln(C), averaged over the kept voxels per sample."""

    name = "uamt"
    description = "uncertainty-aware Mean Teacher"
    supports_heterogeneous = False

    def teacher_target(self, xu: torch.Tensor, step: StepInfo):
        probs = torch.stack([self.teacher_probs(self.noisy(xu)) for _ in range(self.cfg.uamt_passes)]).mean(0)
        uncertainty = entropy_map(probs)
        ramp = sigmoid_rampup(step.iteration, max(1, step.total_iterations))
        threshold = (0.75 + 0.25 * ramp) * math.log(probs.shape[1])
        return probs, uncertainty < threshold
