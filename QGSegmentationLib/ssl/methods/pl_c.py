"""PL-C: confidence-weighted pseudolabels."""

from __future__ import annotations

from ..losses import weighted_ce_per_sample
from . import METHODS
from .pl import PseudoLabel


@METHODS.register("pl_c", description="confidence-weighted pseudolabels (conf^2 above 0.9)")
class ConfidenceWeightedPseudoLabel(PseudoLabel):
    """Per sample: mean over pixels of conf^T * 1[conf >= threshold] * CE(student, teacher argmax),
    T = pl_c_temperature (2), threshold = pl_c_threshold (0.9): the pixel-level analogue of QW's
    q^T * 1[q >= tau]."""

    name = "pl_c"
    description = "confidence-weighted pseudo-labelling"

    def pseudo_label_loss(self, logits_u, teacher_probs):
        conf, hard = teacher_probs.max(dim=1)
        c = self.cfg
        weights = conf ** c.pl_c_temperature * (conf >= c.pl_c_threshold).float()
        return weighted_ce_per_sample(logits_u, hard, weights)
