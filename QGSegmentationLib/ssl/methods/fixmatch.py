"""FixMatch / UniMatch-style weak-to-strong consistency (teacher-free)."""

from __future__ import annotations

import torch

from .. import augment
from ..base import SSLMethod, StepInfo, forward_pair
from ..losses import weighted_ce_per_sample
from ..metassl import HeterogeneousTerms
from . import METHODS


@METHODS.register("fixmatch", description="weak-to-strong pseudolabels (threshold 0.95, intensity + CutMix)")
class FixMatch(SSLMethod):
    """The network's own prediction on the weak view (the batch as sampled) becomes the target of its
    prediction on a strong view: intensity jitter + noise + blur, then CutMix (or copy-paste)
    between unlabeled samples, the same mix applied to the weak prediction. Per sample: mean over
    pixels of 1[conf >= fixmatch_threshold] CE. L = L_sup + fixmatch_weight * mean_b.

    The weak view goes through the same forward as the labeled batch (gradients kept, as UniMatch
    does), so QAR reuses it. A mixed sample's QW weight is the area-weighted mix of the two
    samples' weights. MetaSSL replaces the masked CE with the heterogeneous loss against the
    (mixed) weak softmax.
    """

    name = "fixmatch"
    description = "FixMatch weak-to-strong consistency"
    supports_heterogeneous = True

    def __init__(self, networks, config, guidance=None):
        super().__init__(networks, config, guidance)
        self.het = HeterogeneousTerms(self.cfg) if self.cfg.heterogeneous_loss else None

    def strong_view(self, xu: torch.Tensor, hard_weak: torch.Tensor):
        """(strong images, mixing mask (B,*sp), partner permutation)."""
        c = self.cfg
        perm = augment.partner_permutation(xu.shape[0], xu.device)
        mask = augment.mixing_masks(c.fixmatch_mix, xu, hard_weak, perm, c.cutmix_area)
        strong = augment.strong_intensity(xu, c)
        return augment.mix(strong, mask, perm), mask, perm

    def training_step(self, labeled, unlabeled, step: StepInfo):
        xu = self.require_unlabeled(self.name, unlabeled)
        net = self.networks[0]
        logits_l, logits_w = forward_pair(net, labeled["image"], xu)
        probs_w = torch.softmax(logits_w.detach().float(), dim=1)
        hard_w = probs_w.argmax(dim=1)
        x_strong, mask, perm = self.strong_view(xu, hard_w)
        logits_s = net(x_strong)
        probs_mixed = augment.mix(probs_w, mask, perm)
        weights = self.quality_weights(xu, hard_w, logits_w.shape[1])
        if weights is not None:
            share = mask.flatten(1).float().mean(1)
            weights = (1.0 - share) * weights + share * weights[perm]
        logs = {"sup": self.supervised_loss(logits_l, labeled["label"])}
        if self.het is not None:
            unl = self.unlabeled_mean(self.het.unlabeled.per_sample(logits_s, probs_mixed), weights)
            lab = self.het.labeled.per_sample(logits_l, labeled["label"]).mean()
            lam = self.het.weight(step.epoch)
            logs.update(het_unlabeled=unl, het_labeled=lab, het_weight=lam)
            unsup = lam * (unl + lab)
        else:
            conf, hard = probs_mixed.max(dim=1)
            keep = (conf >= self.cfg.fixmatch_threshold).float()
            unl = self.unlabeled_mean(weighted_ce_per_sample(logits_s, hard, keep), weights)
            logs.update(strong=unl, confident_fraction=keep.mean())
            unsup = self.cfg.fixmatch_weight * unl
        loss = logs["sup"] + unsup + self.qar_term(xu, logits_w, step, logs)
        return self.result(loss, logs)

    def extra_state(self) -> dict:
        return {"heterogeneous": self.het.state_dict()} if self.het is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.het is not None and "heterogeneous" in state:
            self.het.load_state_dict(state["heterogeneous"])
