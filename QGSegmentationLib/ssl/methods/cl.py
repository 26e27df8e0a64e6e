"""Contrastive learning on decoder features, with confident EMA-teacher pseudolabels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...engine.device import float32_under_float16_autocast
from ..base import StepInfo, TeacherStudentMethod
from ..features import (batch_index, features_and_logits, flatten_pixels, scatter_mean,
                        to_feature_grid)
from ..losses import weighted_ce_per_sample
from ..ramps import sigmoid_rampup
from . import METHODS


def pixel_contrastive_per_sample(student_features: torch.Tensor, teacher_features: torch.Tensor,
                                 labels: torch.Tensor, confident: torch.Tensor, temperature: float,
                                 negatives: int, anchors_per_class: int) -> torch.Tensor:
    """(B,) InfoNCE of confident student pixels: positive = the teacher's class prototype, negatives
    = `negatives` teacher features of confident pixels of other classes. Samples with no anchor,
    or batches with a single confident class, give 0 (with a defined gradient)."""
    b = student_features.shape[0]
    fs = F.normalize(flatten_pixels(student_features.float()), dim=1)
    ft = F.normalize(flatten_pixels(teacher_features.float()), dim=1).detach()
    flat_labels, flat_conf = labels.flatten(), confident.flatten()
    owner = batch_index(labels.shape, labels.device)
    losses, owners = [], []
    for c in torch.unique(flat_labels[flat_conf]).tolist():
        is_c = flat_conf & (flat_labels == c)
        pool = torch.nonzero(flat_conf & (flat_labels != c)).flatten()
        if pool.numel() == 0:
            continue
        anchors = torch.nonzero(is_c).flatten()
        if anchors.numel() > anchors_per_class:
            anchors = anchors[torch.randperm(anchors.numel(), device=anchors.device)[:anchors_per_class]]
        positive = F.normalize(ft[is_c].mean(dim=0), dim=0)
        neg = ft[pool[torch.randint(pool.numel(), (anchors.numel(), negatives), device=pool.device)]]
        a = fs[anchors]
        logits = torch.cat([(a @ positive)[:, None], torch.einsum("nf,nkf->nk", a, neg)], dim=1)
        target = torch.zeros(anchors.numel(), dtype=torch.long, device=a.device)
        losses.append(F.cross_entropy(logits / temperature, target, reduction="none"))
        owners.append(owner[anchors])
    if not losses:
        return fs.sum() * 0.0 + fs.new_zeros(b)
    return scatter_mean(torch.cat(losses), torch.cat(owners), b, fs)


@METHODS.register("cl", description="pixel contrastive learning + confident pseudolabels (EMA teacher)")
class ContrastiveLearning(TeacherStudentMethod):
    """Per unlabeled sample: u_b = mean_pixels(1[conf >= cl_threshold] CE(student, teacher argmax))
    + cl_weight * InfoNCE_b (temperature 0.1, 256 negatives) on normalised decoder features.
    L = L_sup + sigmoid_rampup(epoch, consistency_rampup_epochs) * mean_b u_b (ramp: our choice).
    No projection head: the engine optimises only the networks' own parameters."""

    name = "cl"
    description = "contrastive learning"

    def training_step(self, labeled, unlabeled, step: StepInfo):
        xu = self.require_unlabeled(self.name, unlabeled)
        xl, b_l = labeled["image"], labeled["image"].shape[0]
        net = self.networks[0]
        if xl.shape[1:] == xu.shape[1:]:
            feats, logits = features_and_logits(net, torch.cat([xl, xu]))
            logits_l, logits_u, feats_u = logits[:b_l], logits[b_l:], feats[b_l:]
        else:
            logits_l = net(xl)
            feats_u, logits_u = features_and_logits(net, xu)
        self.teacher.follow_device(net)
        with torch.no_grad(), float32_under_float16_autocast():  # as teacher_probs: fp16 overflows
            self.teacher.module.eval()
            feats_t, logits_t = features_and_logits(self.teacher.module, xu.float())
            conf, hard = torch.softmax(logits_t.float(), dim=1).max(dim=1)
        confident = conf >= self.cfg.cl_threshold
        grid = feats_u.shape[2:]
        contrast = pixel_contrastive_per_sample(
            feats_u, feats_t, to_feature_grid(hard, grid), to_feature_grid(confident, grid),
            self.cfg.cl_temperature, self.cfg.cl_negatives, self.cfg.cl_anchors_per_class)
        pseudo = weighted_ce_per_sample(logits_u, hard, confident.float())
        weights = self.quality_weights(xu, hard, logits_u.shape[1])
        unl = self.unlabeled_mean(pseudo + self.cfg.cl_weight * contrast, weights)
        ramp = sigmoid_rampup(step.epoch, self.cfg.consistency_rampup_epochs)
        logs = {"sup": self.supervised_loss(logits_l, labeled["label"]), "pseudo": pseudo.mean(),
                "contrastive": contrast.mean(), "unlabeled_weight": ramp}
        loss = logs["sup"] + ramp * unl + self.qar_term(xu, logits_u, step, logs)
        return self.result(loss, logs)
