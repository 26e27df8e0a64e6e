"""Quality guidance (QAR, QW), EMA teacher, ramps, SSLConfig and per-sample losses, by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from QGSegmentationLib.errors import ConfigError
from QGSegmentationLib.ssl.base import SSLConfig, StepInfo
from QGSegmentationLib.ssl.config import ssl_config_of
from QGSegmentationLib.ssl.ema import EMATeacher, ema_decay_at
from QGSegmentationLib.ssl.guidance import QualityGuidance
from QGSegmentationLib.ssl.losses import dice_ce_per_sample, soft_dice_loss_per_sample
from QGSegmentationLib.ssl.ramps import delayed_linear, linear_rampup, sigmoid_rampup


class MeanIntensityQuality(nn.Module):
    """A real conv net whose output we can compute by hand: q_k = mean(image) for every class k
    (a 1x1 conv that reads only the image channel, then global average pooling), plus dropout
    that would change the output if the module were left in training mode."""

    def __init__(self, k: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(1 + k, k, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0] = 1.0
            self.conv.bias.zero_()
        self.drop = nn.Dropout(0.9)

    def forward(self, image, mask):
        return self.drop(self.conv(torch.cat([image, mask], 1)).flatten(2).mean(-1))


class SoftQuality(nn.Module):
    """Tiny learnable-looking g whose output depends on the mask, so QAR has a gradient."""

    def __init__(self, k: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(1 + k, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, k)

    def forward(self, image, mask):
        h = torch.relu(self.bn(self.conv(torch.cat([image, mask], 1)))).flatten(2).mean(-1)
        return torch.sigmoid(self.head(h))


# --- QW -----------------------------------------------------------------------------------
def test_qw_weights_hand_example_through_g():
    """q = [0.9, 0.4, 0.6], T = 2, tau = 0.5 -> [0.81, 0, 0.36]."""
    g = MeanIntensityQuality(1)
    guidance = QualityGuidance(g, SSLConfig(qw_temperature=2.0, qw_tau=0.5))
    image = torch.tensor([0.9, 0.4, 0.6]).reshape(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
    labels = torch.zeros(3, 4, 4, dtype=torch.long)
    labels[:, 1:3, 1:3] = 1
    g.train()  # guidance must put it back in eval mode (dropout 0.9 would scramble q)
    w = guidance.qw_weights(image, labels)
    assert torch.allclose(w, torch.tensor([0.81, 0.0, 0.36]), atol=1e-6)
    assert not g.training and not w.requires_grad


def test_qw_multiclass_weight_is_mean_over_present_classes():
    guidance = QualityGuidance(MeanIntensityQuality(2), SSLConfig(qw_temperature=2.0, qw_tau=0.5))
    q = torch.tensor([[0.9, 0.6], [0.9, 0.4], [0.8, 0.7]])
    masks = torch.zeros(3, 2, 2, 2)
    masks[0, 0, 0, 0] = masks[0, 1, 1, 1] = 1     # both classes present: (0.81 + 0.36) / 2
    masks[1, 0, 0, 0] = 1                          # only class 1 present: 0.81
    # sample 2: no foreground -> mean over all classes: (0.64 + 0.49) / 2
    w = guidance.weights_from_quality(q, masks)
    assert torch.allclose(w, torch.tensor([0.585, 0.81, 0.565]), atol=1e-6)


def test_weighted_mean_and_all_zero_weights():
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    w = torch.tensor([0.81, 0.0, 0.36])
    value = QualityGuidance.weighted_mean(losses, w)
    assert math.isclose(float(value.detach()), (0.81 * 1 + 0.36 * 3) / (1.17 + 1e-8), rel_tol=1e-6)
    zero = QualityGuidance.weighted_mean(losses, torch.zeros(3))
    assert float(zero.detach()) == 0.0
    zero.backward()
    assert losses.grad is not None and torch.equal(losses.grad, torch.zeros(3))


# --- QAR ------------------------------------------------------------------------------------
def test_qar_gradient_reaches_segmenter_not_g():
    torch.manual_seed(0)
    segmenter = nn.Conv2d(1, 2, 3, padding=1)
    g = SoftQuality(1)
    g.train()
    guidance = QualityGuidance(g, SSLConfig())
    assert not g.training
    g_before = {k: v.clone() for k, v in g.state_dict().items()}
    x = torch.randn(2, 1, 8, 8)
    logits = segmenter(x)
    loss = guidance.qar_loss(x, logits)
    with torch.no_grad():
        expected = 1.0 - g(x, torch.softmax(logits, 1)[:, 1:]).mean()
    assert torch.allclose(loss, expected)
    opt = torch.optim.SGD(list(segmenter.parameters()) + list(g.parameters()), lr=1.0)
    loss.backward()
    assert segmenter.weight.grad is not None and segmenter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in g.parameters())
    opt.step()
    assert not g.training
    for k, v in g.state_dict().items():  # incl. BN running stats: eval mode leaves them alone
        assert torch.equal(v, g_before[k]), k


class PooledInputs(nn.Module):
    """Returns one value per input channel: (B, 1 + K) instead of (B, K)."""

    def forward(self, image, mask):
        return torch.sigmoid(torch.cat([image, mask], 1).flatten(2).mean(-1))


def test_quality_mismatches_are_clear_errors():
    x = torch.randn(2, 1, 4, 4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match="expected \\(2, 2\\)"):
        QualityGuidance(PooledInputs(), SSLConfig()).qw_weights(x, labels, n_classes=3)
    with pytest.raises(ConfigError, match="trained for 3 classes"):
        QualityGuidance(MeanIntensityQuality(1), SSLConfig()).qw_weights(x, labels, n_classes=3)


def test_guidance_schedules():
    guidance = QualityGuidance(MeanIntensityQuality(1), SSLConfig())
    assert guidance.lambda_qar(0) == 0.0 and guidance.lambda_qar(30) == 0.0
    assert math.isclose(guidance.lambda_qar(50), 0.005)
    assert math.isclose(guidance.lambda_qar(70), 0.01) and math.isclose(guidance.lambda_qar(200), 0.01)
    assert guidance.lambda_qw(15) == 0.0
    assert math.isclose(guidance.lambda_qw(30), 0.125) and math.isclose(guidance.lambda_qw(45), 0.25)


# --- ramps, step info ---------------------------------------------------------------------------
def test_ramps_at_chosen_epochs():
    assert math.isclose(sigmoid_rampup(0, 40), math.exp(-5))
    assert math.isclose(sigmoid_rampup(20, 40), math.exp(-1.25))
    assert sigmoid_rampup(40, 40) == 1.0 and sigmoid_rampup(80, 40) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    assert linear_rampup(10, 40) == 0.25
    assert delayed_linear(14.9, 15, 30, 0.25) == 0.0 and math.isclose(delayed_linear(21, 15, 30, 0.25), 0.05)
    assert StepInfo(iteration=75, total_iterations=1000, iterations_per_epoch=50).epoch == 1.5


# --- EMA --------------------------------------------------------------------------------------
def test_ema_update_hand_computed_with_warmup_and_bn_copy():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = EMATeacher(student, decay=0.99)
    t0 = [p.clone() for p in teacher.module.parameters()]
    assert all(not p.requires_grad for p in teacher.module.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()
    student(torch.randn(8, 2))  # changes BN running statistics and the batch counter
    alpha = teacher.update(student)
    assert math.isclose(alpha, 1 / 10)  # min(0.99, (1 + 0) / (10 + 0))
    for t, s, old in zip(teacher.module.parameters(), student.parameters(), t0):
        assert torch.allclose(t, 0.1 * old + 0.9 * s)
    for t, s in zip(teacher.module.buffers(), student.buffers()):
        assert torch.equal(t, s)
    t1 = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2.0)
    alpha = teacher.update(student)
    assert math.isclose(alpha, 2 / 11)
    for t, s, old in zip(teacher.module.parameters(), student.parameters(), t1):
        assert torch.allclose(t, 2 / 11 * old + 9 / 11 * s)
    assert ema_decay_at(0.99, 10_000) == 0.99 and ema_decay_at(0.999, 0) == 0.1


# --- config ---------------------------------------------------------------------------------
def test_config_validation_and_lookup():
    with pytest.raises(ConfigError, match="unknown option\\(s\\) bogus"):
        SSLConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="ssl.pl_t_threshold"):
        SSLConfig(pl_t_threshold=1.5)
    with pytest.raises(ConfigError, match="ssl.het_region_order"):
        SSLConfig(het_region_order=("UC", "US", "DC"))
    with pytest.raises(ConfigError, match="ssl.fixmatch_mix"):
        SSLConfig(fixmatch_mix="mixup")
    assert ssl_config_of(SimpleNamespace(ssl={"qw_tau": 0.7})).qw_tau == 0.7
    assert ssl_config_of(SimpleNamespace(ssl=SSLConfig(qw_tau=0.6))).qw_tau == 0.6
    assert ssl_config_of(None) == SSLConfig()
    assert SSLConfig.from_dict(SSLConfig(cutmix_area=(0.2, 0.3)).to_dict()).cutmix_area == (0.2, 0.3)



def test_option_values_of_the_wrong_type_are_refused_naming_the_option():
    """`--set lr=abc` or `ssl: 3` in a config file used to fail deep inside training (a TypeError
    in AdamW, in SSLConfig); every config dataclass now checks the declared types up front."""
    from QGSegmentationLib.data.augment import AugmentConfig
    from QGSegmentationLib.engine.config import TrainConfig
    from QGSegmentationLib.quality.train import QualityTrainConfig

    refused = [(TrainConfig, {"lr": "abc"}, "option lr must be a finite number, not 'abc'"),
               (TrainConfig, {"lr": float("nan")}, "option lr must be a finite number"),
               (TrainConfig, {"lr": -1.0}, "lr must be a positive number"),
               (TrainConfig, {"ssl": 3}, "option ssl must be a mapping"),
               (TrainConfig, {"iterations": 2.5}, "option iterations must be a whole number"),
               (TrainConfig, {"crop_foreground": "yes"}, "option crop_foreground must be true or false"),
               (TrainConfig, {"n_validation": "two"}, "option n_validation must be a whole number or null"),
               (TrainConfig, {"target_spacing": [float("nan"), 1, 1]}, "target_spacing must be auto"),
               (SSLConfig, {"ema_decay": "x"}, "option ema_decay must be a finite number"),
               (QualityTrainConfig, {"batch_size": "abc"}, "option batch_size must be a whole number"),
               (QualityTrainConfig, {"vqm": 3}, "option vqm must be a mapping"),
               (AugmentConfig, {"gamma_prob": "often"}, "option gamma_prob must be a finite number")]
    for cls, data, message in refused:
        with pytest.raises(ConfigError, match=message):
            cls.from_dict(data)
    assert TrainConfig.from_dict({"lr": 1, "n_validation": None, "num_threads": None}).lr == 1
    assert QualityTrainConfig.from_dict({"samples_per_case": None, "lr": 1}).lr == 1


# --- per-sample losses ----------------------------------------------------------------------------
def test_per_sample_dice_ce_by_hand():
    # one sample, 2 pixels, 2 classes; logits = log-probabilities so softmax returns them exactly
    probs = torch.tensor([[[0.8, 0.3], [0.2, 0.7]]])          # (B=1, C=2, N=2)
    labels = torch.tensor([[0, 1]])
    ce = (-math.log(0.8) - math.log(0.7)) / 2
    dice = (2 * 0.7 + 1e-5) / (0.2 + 0.7 + 1 + 1e-5)
    got = dice_ce_per_sample(torch.log(probs), labels)
    assert torch.allclose(got, torch.tensor([0.5 * ce + 0.5 * (1 - dice)]), atol=1e-6)
    # empty reference predicted (almost) empty scores (almost) perfectly
    empty = soft_dice_loss_per_sample(torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]), torch.tensor([[0, 0]]))
    assert float(empty) == 0.0


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, QGSegmentationLib.ssl, QGSegmentationLib.ssl.config as c; "
            "c.SSLConfig(); assert 'torch' not in sys.modules, 'torch imported'")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr


def test_a_quality_predictor_sees_training_patches_as_it_was_trained_to_see_them():
    """QAR and QW show g each patch resized to its grid with the image standardised there, as g's
    own training did (`present_patch`), whatever the segmenter's intensity normalisation ([0, 1],
    volume z-score, raw values); gradients still reach the masks."""
    from QGSegmentationLib.quality.predictor import QualityPredictor, predictor_config
    from QGSegmentationLib.quality.presentation import present_patch

    torch.manual_seed(0)
    g = QualityPredictor(predictor_config(n_foreground=1, mode="3d", grid_size=(16, 16, 16))).eval()
    seen = []
    g.backbone.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0][:, 0].detach()))
    guidance = QualityGuidance(g, SSLConfig())
    image = torch.rand(2, 1, 20, 24, 28)
    probs = torch.rand(2, 1, 20, 24, 28, requires_grad=True)
    for scaled in (image, image * 800.0 - 300.0):  # [0, 1] percentiles, raw CT-like values
        q = guidance.quality(scaled, probs)
        image_channel = seen[-1]
        assert image_channel.shape == (2, 16, 16, 16)
        assert torch.allclose(image_channel.flatten(1).mean(1), torch.zeros(2), atol=1e-4)
        assert torch.allclose(image_channel.flatten(1).std(1, unbiased=False), torch.ones(2), atol=1e-3)
        with torch.no_grad():
            assert torch.allclose(q, g(*present_patch(scaled, probs, g.grid_size)))
    q.sum().backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0


def test_guidance_schedules_that_do_not_fit_the_run_are_measured_and_scaled_to_it():
    """The paper's QAR / QW schedules are for 200 epochs: in a 40-epoch run QAR reaches a quarter of
    its weight, QW five sixths. Scaled to the run, both reach full weight at the same fraction of
    training as in the paper (QAR at 70/200, QW at 45/200)."""
    from QGSegmentationLib.ssl.config import guidance_schedule_for

    both = SSLConfig(guidance_qar=True, guidance_qw=True)
    short = both.guidance_shortfall(40)
    assert math.isclose(short["qar"], 0.25) and math.isclose(short["qw"], 25 / 30)
    assert both.guidance_shortfall(200) == {} and SSLConfig().guidance_shortfall(10) == {}  # off: no shortfall
    assert SSLConfig(guidance_qar=True).guidance_shortfall(20) == {"qar": 0.0}
    scaled = SSLConfig(guidance_qar=True, guidance_qw=True, **guidance_schedule_for(40))
    assert scaled.guidance_shortfall(40) == {}
    guidance = QualityGuidance(MeanIntensityQuality(1), scaled)
    assert guidance.lambda_qar(40 * 30 / 200) == 0.0 and math.isclose(guidance.lambda_qar(40 * 70 / 200), 0.01)
    assert math.isclose(guidance.lambda_qw(40 * 45 / 200), 0.25)


def test_the_last_presented_image_is_remembered_until_it_changes(monkeypatch):
    """QW and QAR judge the same unlabeled batch in one step: its standardised image is computed
    once. A new tensor, even with equal values, or the same tensor changed in place, is presented
    afresh, and what g sees is always `present_patch`'s image."""
    from QGSegmentationLib.quality import presentation
    from QGSegmentationLib.quality.predictor import QualityPredictor, predictor_config

    calls = []
    standardize = presentation.standardize_image
    monkeypatch.setattr(presentation, "standardize_image", lambda x: calls.append(1) or standardize(x))
    torch.manual_seed(0)
    g = QualityPredictor(predictor_config(n_foreground=1, mode="2d", grid_size=(16, 16))).eval()
    guidance = QualityGuidance(g, SSLConfig())
    image = torch.rand(2, 1, 20, 24)
    probs = torch.rand(2, 1, 20, 24)
    first = guidance._presented(image, probs)[0]
    assert guidance._presented(image, probs.flip(-1))[0] is first and len(calls) == 1
    assert guidance._presented(image.clone(), probs)[0] is not first and len(calls) == 2
    image.mul_(5.0).add_(3.0)
    image[0, 0, 0, 0] = 40.0
    changed = guidance._presented(image, probs)[0]
    assert len(calls) == 3
    assert torch.equal(changed, presentation.present_patch(image, probs, g.grid_size)[0])
    assert not torch.equal(changed, first)
