"""PL-T: pseudolabels kept only where the teacher is confident."""

from __future__ import annotations

from ..losses import weighted_ce_per_sample
from . import METHODS
from .pl import PseudoLabel


@METHODS.register("pl_t", description="pseudolabels with a confidence threshold (0.9)")
class ThresholdedPseudoLabel(PseudoLabel):
    """Per sample: mean over pixels of 1[conf >= pl_t_threshold] * CE(student, teacher argmax)."""

    name = "pl_t"
    description = "thresholded pseudo-labelling"

    def pseudo_label_loss(self, logits_u, teacher_probs):
        conf, hard = teacher_probs.max(dim=1)
        keep = (conf >= self.cfg.pl_t_threshold).float()
        return weighted_ce_per_sample(logits_u, hard, keep)
