"""Cross pseudo supervision: two differently initialised networks supervise each other."""

from __future__ import annotations

import torch

from ..base import AveragedSoftmax, SSLMethod, StepInfo, forward_pair
from ..losses import cross_entropy_map, per_sample_mean
from ..metassl import HeterogeneousTerms
from ..ramps import sigmoid_weight
from . import METHODS


@METHODS.register("cps", description="cross pseudo supervision (two networks, argmax of each trains the other)")
class CrossPseudoSupervision(SSLMethod):
    """L = L_sup(A) + L_sup(B) + w(t) [mean_b CE(A(x_u), argmax B) + mean_b CE(B(x_u), argmax A)],
    w(t) = cps_weight * sigmoid_rampup(epoch, consistency_rampup_epochs) (our choice).

    QW weights each term by the quality of the pseudolabel it trusts (one g call for both). QAR
    averages over both networks' unlabeled outputs. MetaSSL replaces each CE with the heterogeneous
    loss against the other network's softmax. Evaluation averages the two softmaxes.
    """

    name = "cps"
    description = "cross pseudo supervision"
    num_networks = 2
    supports_heterogeneous = True

    def __init__(self, networks, config, guidance=None):
        super().__init__(networks, config, guidance)
        self.het = ([HeterogeneousTerms(self.cfg) for _ in range(2)]
                    if self.cfg.heterogeneous_loss else None)
        self._ensemble = AveragedSoftmax(self.networks)

    def training_step(self, labeled, unlabeled, step: StepInfo):
        xu = self.require_unlabeled(self.name, unlabeled)
        xl, yl = labeled["image"], labeled["label"]
        (la, ua), (lb, ub) = (forward_pair(net, xl, xu) for net in self.networks)
        n_classes = ua.shape[1]
        hard_a, hard_b = ua.detach().argmax(dim=1), ub.detach().argmax(dim=1)
        weights_b = weights_a = None
        xu_twice = torch.cat([xu, xu]) if self.guidance is not None else None  # one image for QW and QAR
        if self.qw_on:  # one g call for both pseudolabels
            both = self.quality_weights(xu_twice, torch.cat([hard_b, hard_a]), n_classes)
            weights_b, weights_a = both.chunk(2)
        logs = {"sup": self.supervised_loss(la, yl) + self.supervised_loss(lb, yl)}
        if self.het is not None:
            probs_a = torch.softmax(ua.detach().float(), dim=1)
            probs_b = torch.softmax(ub.detach().float(), dim=1)
            unl = (self.unlabeled_mean(self.het[0].unlabeled.per_sample(ua, probs_b), weights_b)
                   + self.unlabeled_mean(self.het[1].unlabeled.per_sample(ub, probs_a), weights_a))
            lab = (self.het[0].labeled.per_sample(la, yl).mean()
                   + self.het[1].labeled.per_sample(lb, yl).mean())
            lam = self.het[0].weight(step.epoch)
            logs.update(het_unlabeled=unl, het_labeled=lab, het_weight=lam)
            unsup = lam * (unl + lab)
        else:
            unl = (self.unlabeled_mean(per_sample_mean(cross_entropy_map(ua.float(), hard_b)), weights_b)
                   + self.unlabeled_mean(per_sample_mean(cross_entropy_map(ub.float(), hard_a)), weights_a))
            lam = sigmoid_weight(step.epoch, self.cfg.cps_weight, self.cfg.consistency_rampup_epochs)
            logs.update(cps=unl, cps_weight=lam)
            unsup = lam * unl
        qar = self.qar_term(xu_twice, torch.cat([ua, ub]), step, logs)
        return self.result(logs["sup"] + unsup + qar, logs)

    def eval_network(self):
        return self._ensemble

    def extra_state(self) -> dict:
        if self.het is None:
            return {}
        return {"heterogeneous": [h.state_dict() for h in self.het]}

    def load_extra_state(self, state: dict) -> None:
        if self.het is not None and "heterogeneous" in state:
            for h, s in zip(self.het, state["heterogeneous"]):
                h.load_state_dict(s)
