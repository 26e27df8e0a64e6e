"""Dual-network uncertainty-guided pseudo-labelling (Lu et al.): two heterogeneous networks."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from ..base import AveragedSoftmax, SSLMethod, StepInfo
from ..features import (batch_index, features_and_logits, flatten_pixels, scatter_mean,
                        to_feature_grid)
from ..losses import cross_entropy_map, entropy_map, per_sample_mean
from ..ramps import sigmoid_rampup
from . import METHODS


def union_pseudolabel(probs_a: torch.Tensor, probs_b: torch.Tensor) -> torch.Tensor:
    """Foreground wherever either network predicts foreground; its class is the foreground class
    with the highest summed probability (binary: exactly the union of the two masks)."""
    fg = (probs_a.argmax(1) > 0) | (probs_b.argmax(1) > 0)
    fg_class = (probs_a + probs_b)[:, 1:].argmax(1) + 1
    return torch.where(fg, fg_class, torch.zeros_like(fg_class))


def low_entropy(entropy: torch.Tensor, percentile: float) -> torch.Tensor:
    """Voxels whose entropy is within the lowest `percentile` % of the batch."""
    flat = entropy.flatten()
    k = max(1, min(flat.numel(), int(round(flat.numel() * percentile / 100.0))))
    threshold = flat.kthvalue(k).values
    return entropy <= threshold


def kl_weighted_per_sample(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) mean(exp(-D) CE(s, argmax p_t)) + mean(D), D = KL(p_t || p_s) per voxel at temperature
    T; the target network t is detached (the term trains s)."""
    log_ps = F.log_softmax(logits_s.float() / temperature, dim=1)
    pt = F.softmax(logits_t.detach().float() / temperature, dim=1)
    kl = (pt * (torch.log(pt.clamp_min(1e-12)) - log_ps)).sum(dim=1)
    ce = cross_entropy_map(logits_s.float(), pt.argmax(dim=1))
    return per_sample_mean(torch.exp(-kl) * ce) + per_sample_mean(kl)


def prototype_alignment_per_sample(features: torch.Tensor, labels: torch.Tensor, reliable: torch.Tensor,
                                   fraction: float) -> torch.Tensor:
    """(B,) 1 - cos(feature, prototype of its pseudolabel class) over a random `fraction` of the
    uncertain voxels; prototypes = mean normalised feature of reliable voxels per class (detached).
    Classes without reliable voxels, and samples without a sampled voxel, contribute 0."""
    b, n_feat = features.shape[0], features.shape[1]
    flat = F.normalize(flatten_pixels(features.float()), dim=1)
    flat_labels, flat_reliable = labels.flatten(), reliable.flatten()
    n_classes = int(flat_labels.max().item()) + 1
    sums = torch.zeros(n_classes, n_feat, device=flat.device).index_add(
        0, flat_labels[flat_reliable], flat[flat_reliable].detach())
    counts = torch.bincount(flat_labels[flat_reliable], minlength=n_classes)
    prototypes = F.normalize(sums, dim=1)
    uncertain = torch.nonzero(~flat_reliable & (counts[flat_labels] > 0)).flatten()
    if uncertain.numel() == 0:
        return flat.sum() * 0.0 + flat.new_zeros(b)
    keep = max(1, int(round(uncertain.numel() * fraction)))
    chosen = uncertain[torch.randperm(uncertain.numel(), device=flat.device)[:keep]]
    loss = 1.0 - (flat[chosen] * prototypes[flat_labels[chosen]]).sum(dim=1)
    return scatter_mean(loss, batch_index(labels.shape, labels.device)[chosen], b, flat)


@METHODS.register("dualnet", description="dual heterogeneous networks, uncertainty-guided union pseudolabels")
class DualNetwork(SSLMethod):
    """Two heterogeneous networks (V-Net or U-Net in 2D, and a residual encoder-decoder), each with
    its own optimizer; evaluation averages their softmaxes. Per unlabeled sample:
    - cce: CE of each network against the union pseudolabel on voxels whose entropy is in the
      lowest `dualnet_entropy_percentile` % of the batch in at least one network;
    - kl: KL dynamic weighting in both directions (temperature 0.5);
    - proto: prototype alignment of uncertain voxels' decoder features (1% subsample).
    L = L_sup(A) + L_sup(B) + w(t) (cce + kl) + proto_weight(t) proto, with w(t) = dualnet_weight
    and proto_weight(t) = dualnet_proto_weight, both times sigmoid_rampup(epoch,
    consistency_rampup_epochs). Unlike the released code, every term has gradients (the logits
    and features are never detached; only targets are)."""

    name = "dualnet"
    description = "dual-network uncertainty-guided pseudo-labelling"
    num_networks = 2

    def __init__(self, networks, config, guidance=None):
        super().__init__(networks, config, guidance)
        self._ensemble = AveragedSoftmax(self.networks)

    @classmethod
    def network_names(cls, config):
        from ..config import ssl_config_of

        names = ssl_config_of(config).dualnet_networks
        if names:
            return list(names)
        mode = getattr(config, "mode", "3d")
        return ["vnet" if mode == "3d" else "unet", "resunet"]

    def terms(self, labeled, unlabeled) -> Dict[str, torch.Tensor]:
        """Each loss term, unweighted and per sample for the unlabeled ones (B,), with gradients."""
        xu = self.require_unlabeled(self.name, unlabeled)
        xl, yl = labeled["image"], labeled["label"]
        outs = []
        for net in self.networks:
            if xl.shape[1:] == xu.shape[1:]:
                feats, logits = features_and_logits(net, torch.cat([xl, xu]))
                outs.append((logits[: xl.shape[0]], logits[xl.shape[0]:], feats[xl.shape[0]:]))
            else:
                feats, logits = features_and_logits(net, xu)
                outs.append((net(xl), logits, feats))
        (la, ua, fa), (lb, ub, fb) = outs
        probs_a = torch.softmax(ua.detach().float(), dim=1)
        probs_b = torch.softmax(ub.detach().float(), dim=1)
        pseudo = union_pseudolabel(probs_a, probs_b)
        pct = self.cfg.dualnet_entropy_percentile
        reliable_a, reliable_b = low_entropy(entropy_map(probs_a), pct), low_entropy(entropy_map(probs_b), pct)
        keep = (reliable_a | reliable_b).float()
        cce = (per_sample_mean(keep * cross_entropy_map(ua.float(), pseudo))
               + per_sample_mean(keep * cross_entropy_map(ub.float(), pseudo)))
        temp = self.cfg.dualnet_kl_temperature
        kl = kl_weighted_per_sample(ub, ua, temp) + kl_weighted_per_sample(ua, ub, temp)
        frac = self.cfg.dualnet_proto_fraction
        proto = 0.0
        for feats, reliable in ((fa, reliable_a), (fb, reliable_b)):
            grid = feats.shape[2:]
            proto = proto + prototype_alignment_per_sample(
                feats, to_feature_grid(pseudo, grid), to_feature_grid(reliable, grid), frac)
        return {"sup": self.supervised_loss(la, yl) + self.supervised_loss(lb, yl),
                "cce": cce, "kl": kl, "proto": proto, "pseudolabel": pseudo, "logits_u": (ua, ub)}

    def training_step(self, labeled, unlabeled, step: StepInfo):
        t = self.terms(labeled, unlabeled)
        xu = unlabeled["image"]
        ua, ub = t["logits_u"]
        weights = self.quality_weights(xu, t["pseudolabel"], ua.shape[1])
        ramp = sigmoid_rampup(step.epoch, self.cfg.consistency_rampup_epochs)
        w, w_proto = self.cfg.dualnet_weight * ramp, self.cfg.dualnet_proto_weight * ramp
        unl = self.unlabeled_mean(w * (t["cce"] + t["kl"]) + w_proto * t["proto"], weights)
        logs = {"sup": t["sup"], "cce": t["cce"], "kl": t["kl"], "proto": t["proto"],
                "unlabeled_weight": w, "proto_weight": w_proto}
        qar = self.qar_term(torch.cat([xu, xu]), torch.cat([ua, ub]), step, logs)
        return self.result(t["sup"] + unl + qar, logs)

    def eval_network(self):
        return self._ensemble
