"""Supervised baseline: labeled images only (plus QAR on unlabeled images when guided)."""

from __future__ import annotations

from ...errors import ConfigError
from ..base import SSLMethod
from . import METHODS


@METHODS.register("sup", description="supervised only (0.5 CE + 0.5 Dice); SUP+QAR with guidance_qar")
class Supervised(SSLMethod):
    """L = L_sup (+ lambda_qar L_qar on unlabeled images: the paper's QAR on a supervised host).

    QW has nothing to weight here (no pseudolabels): use pl / pl_t / pl_c for PL-QW.
    """

    name = "sup"
    description = "supervised only"

    def __init__(self, networks, config, guidance=None):
        super().__init__(networks, config, guidance)
        if self.cfg.guidance_qw:
            raise ConfigError("method 'sup' has no pseudolabels for ssl.guidance_qw to weight; "
                              "use method 'pl' (PL-QW), 'pl_t', 'pl_c' or another SSL method")
        self.uses_unlabeled = self.qar_on

    def training_step(self, labeled, unlabeled, step):
        net = self.networks[0]
        logs = {}
        if self.qar_on and self.guidance.lambda_qar(step.epoch) > 0:
            xu = self.require_unlabeled(self.name, unlabeled)
            from ..base import forward_pair

            logits_l, logits_u = forward_pair(net, labeled["image"], xu)
            sup = self.supervised_loss(logits_l, labeled["label"])
            loss = sup + self.qar_term(xu, logits_u, step, logs)
        else:
            sup = self.supervised_loss(net(labeled["image"]), labeled["label"])
            loss = sup
        logs["sup"] = sup
        return self.result(loss, logs)
