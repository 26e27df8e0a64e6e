"""Every SSL method x guidance setting trains for two real steps on tiny 2D and 3D data (CPU)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from QGSegmentationLib.errors import ConfigError
from QGSegmentationLib.ssl.base import SSLConfig, StepInfo
from QGSegmentationLib.ssl.config import METHOD_NAMES
from QGSegmentationLib.ssl.guidance import QualityGuidance
from QGSegmentationLib.ssl.methods import METHODS, build_method

N_CLASSES = 3
SHAPES = {2: (32, 32), 3: (16, 16, 16)}
GUIDANCE = {"none": (False, False), "qar": (True, False), "qw": (False, True), "qar+qw": (True, True)}
FEATURE_METHODS = ("cl", "dualnet")   # need networks.build_network (features_and_logits)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one thread is faster than two on the shared CPU; restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyQuality(nn.Module):
    """A real (tiny) quality predictor with the contract's signature g(image, mask) -> (B, K)."""

    def __init__(self, dims: int, k: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv = conv(1 + k, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, k)

    def forward(self, image, mask):
        h = torch.relu(self.conv(torch.cat([image, mask], dim=1))).flatten(2).mean(-1)
        return torch.sigmoid(self.head(self.drop(h)))


def make_networks(name: str, dims: int, cfg: SSLConfig):
    cls = METHODS.get(name)
    if name in FEATURE_METHODS:
        from QGSegmentationLib.networks import build_network

        names = cls.network_names(cfg) or ["unet"] * cls.num_networks
        return [build_network(n, dims, 1, N_CLASSES, channels=(4, 8, 16)) for n in names]
    from monai.networks.nets import UNet

    return [UNet(dims, 1, N_CLASSES, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
            for _ in range(cls.num_networks)]


def active_config(**overrides) -> SSLConfig:
    """Ramps at full weight from step 0 and thresholds low enough that random networks produce
    confident pixels, so every unlabeled term really contributes."""
    base = dict(consistency_rampup_epochs=0, pl_delay_epochs=0, pl_rampup_epochs=0,
                qar_delay_epochs=0, qar_rampup_epochs=0, qw_delay_epochs=0, qw_rampup_epochs=0,
                het_rampup_epochs=0, qw_tau=0.0, pl_t_threshold=0.34, pl_c_threshold=0.34,
                cl_threshold=0.34, fixmatch_threshold=0.34, uamt_passes=2, cl_negatives=16,
                cl_anchors_per_class=32, dualnet_networks=("unet", "resunet"))
    base.update(overrides)
    return SSLConfig(**base)


def batches(dims: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[dims]
    labeled = {"image": torch.randn((2, 1) + shape, generator=g),
               "label": torch.randint(0, N_CLASSES, (2,) + shape, generator=g)}
    unlabeled = {"image": torch.randn((2, 1) + shape, generator=g)}
    return labeled, unlabeled


def train_two_steps(method, networks, labeled, unlabeled):
    optimizers = [torch.optim.AdamW(n.parameters(), lr=1e-2) for n in networks]
    outputs = []
    for i in range(2):
        step = StepInfo(iteration=i, total_iterations=4, iterations_per_epoch=2)
        out = method.training_step(labeled, unlabeled if method.uses_unlabeled else None, step)
        for opt in optimizers:
            opt.zero_grad()
        out["loss"].backward()
        for opt in optimizers:
            opt.step()
        method.after_optimizer_step(step)
        outputs.append(out)
    return outputs


def combos():
    for dims in (2, 3):
        for name in METHOD_NAMES:
            for guide in GUIDANCE:
                if name == "sup" and GUIDANCE[guide][1]:
                    continue  # sup has no pseudolabels to weight (tested separately)
                yield pytest.param(name, guide, dims, id=f"{name}-{guide}-{dims}d")


@pytest.mark.parametrize("name,guide,dims", list(combos()))
def test_method_trains_two_steps(name, guide, dims):
    torch.manual_seed(0)
    qar, qw = GUIDANCE[guide]
    cfg = active_config(guidance_qar=qar, guidance_qw=qw)
    networks = make_networks(name, dims, cfg)
    before = [[p.detach().clone() for p in n.parameters()] for n in networks]
    g = TinyQuality(dims, N_CLASSES - 1)
    g_before = [p.detach().clone() for p in g.parameters()]
    guidance = QualityGuidance(g, cfg) if (qar or qw) else None
    method = build_method(name, networks, cfg, guidance)
    teacher = getattr(method, "teacher", None)
    teacher_before = [p.clone() for p in teacher.module.parameters()] if teacher else None
    labeled, unlabeled = batches(dims)

    outputs = train_two_steps(method, networks, labeled, unlabeled)

    for out in outputs:
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
        assert all(torch.isfinite(v).all() for v in out.values())
    last = outputs[-1]
    assert ("qar" in last) == qar
    assert ("qw_mean" in last) == qw
    if qw:
        assert float(last["qw_mean"]) > 0.0  # tau = 0: every weight q^2 > 0
    for net, params in zip(networks, before):
        assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), params)), "network not trained"
    if teacher is not None:
        assert teacher.updates == 2
        assert any(not torch.equal(p, q) for p, q in zip(teacher.module.parameters(), teacher_before))
    # g: frozen, untouched, in eval mode
    assert g.training == (guidance is None)
    assert all(p.grad is None for p in g.parameters())
    assert all(not p.requires_grad for p in g.parameters()) or guidance is None
    assert all(torch.equal(p, q) for p, q in zip(g.parameters(), g_before))
    # evaluation network outputs n_classes maps
    with torch.no_grad():
        pred = method.eval_network()(unlabeled["image"])
    assert pred.shape == (2, N_CLASSES) + SHAPES[dims]


def test_registry_matches_static_names():
    assert tuple(METHODS.names()) == tuple(sorted(METHOD_NAMES))
    for entry in METHODS.entries():
        assert entry.description and entry.obj.name == entry.name


@pytest.mark.parametrize("name", ["mt", "fixmatch", "cps"])
@pytest.mark.parametrize("guide", ["none", "qar+qw"])
def test_heterogeneous_variants_train(name, guide):
    torch.manual_seed(1)
    qar, qw = GUIDANCE[guide]
    cfg = active_config(heterogeneous_loss=True, guidance_qar=qar, guidance_qw=qw)
    networks = make_networks(name, 2, cfg)
    g = TinyQuality(2, N_CLASSES - 1)
    method = build_method(name, networks, cfg, QualityGuidance(g, cfg) if qar or qw else None)
    labeled, unlabeled = batches(2)
    outputs = train_two_steps(method, networks, labeled, unlabeled)
    last = outputs[-1]
    assert float(last["het_unlabeled"]) > 0 and float(last["het_labeled"]) > 0
    assert torch.isfinite(last["loss"])
    # thresholds moved from their 0.9 initialisation and are checkpointable (tensors only)
    state = method.extra_state()
    flat = state["heterogeneous"] if name != "cps" else state["heterogeneous"][0]
    assert not torch.allclose(flat["unlabeled"]["pred"], torch.full((N_CLASSES,), 0.9))


def test_heterogeneous_rejected_for_other_methods():
    cfg = active_config(heterogeneous_loss=True)
    with pytest.raises(ConfigError, match="heterogeneous_loss"):
        build_method("pl_t", make_networks("pl_t", 2, cfg), cfg, None)


def test_sup_with_qw_is_a_clear_error_and_guidance_needs_a_predictor():
    cfg = active_config(guidance_qw=True)
    with pytest.raises(ConfigError, match="sup"):
        build_method("sup", make_networks("sup", 2, cfg), cfg, QualityGuidance(TinyQuality(2, 2), cfg))
    with pytest.raises(ConfigError, match="quality predictor"):
        build_method("mt", make_networks("mt", 2, cfg), cfg, None)
    with pytest.raises(ConfigError, match="unknown ssl method 'nope'"):
        build_method("nope", [], cfg, None)


def test_missing_unlabeled_batch_names_the_method():
    cfg = active_config()
    method = build_method("mt", make_networks("mt", 2, cfg), cfg, None)
    labeled, _ = batches(2)
    with pytest.raises(ConfigError, match="'mt' needs unlabeled"):
        method.training_step(labeled, None, StepInfo(0, 2, 1))


def test_pl_qw_loss_is_the_quality_weighted_mean():
    """PL-QW's unlabeled term equals sum w l / sum w with w from g on the teacher's pseudolabel."""
    torch.manual_seed(2)
    cfg = active_config(guidance_qw=True)
    networks = make_networks("pl", 2, cfg)
    g = TinyQuality(2, N_CLASSES - 1)
    guidance = QualityGuidance(g, cfg)
    method = build_method("pl", networks, cfg, guidance)
    labeled, unlabeled = batches(2)
    out = method.training_step(labeled, unlabeled, StepInfo(0, 2, 1))
    from QGSegmentationLib.ssl.losses import dice_ce_per_sample

    xu = unlabeled["image"]
    with torch.no_grad():
        hard = method.teacher.module(xu).argmax(1)
        per_sample = dice_ce_per_sample(networks[0](xu), hard)
        masks = nn.functional.one_hot(hard, N_CLASSES).movedim(-1, 1)[:, 1:].float()
        q = g(xu, masks)
        present = (masks.flatten(2).sum(-1) > 0).float()
        w = ((q ** 2) * present).sum(1) / present.sum(1)
    expected = (w * per_sample).sum() / (w.sum() + 1e-8)
    assert torch.allclose(out["unlabeled"], expected, atol=1e-5)
    assert torch.allclose(out["qw_mean"], w.mean(), atol=1e-6)
    sup = out["sup"]
    assert torch.allclose(out["loss"], sup + cfg.qw_weight * expected, atol=1e-5)


def count_forwards(modules):
    counts = {id(m): 0 for m in modules}

    def hook(module, _inp, _out):
        counts[id(module)] += 1

    handles = [m.register_forward_hook(hook) for m in modules]
    return counts, handles


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if n != "sup"])
def test_guidance_adds_no_segmenter_forward_and_at_most_two_g_calls(name):
    """QAR/QW reuse the method's own outputs: same segmenter forwards, g once per use. ICT is the
    exception: its own unlabeled forward is on mixed images, which g never saw, so QAR makes one
    student forward on the unmixed ones."""
    labeled, unlabeled = batches(2)
    calls = {}
    for guide in ("none", "qar+qw"):
        torch.manual_seed(3)
        qar, qw = GUIDANCE[guide]
        cfg = active_config(guidance_qar=qar, guidance_qw=qw)
        networks = make_networks(name, 2, cfg)
        g = TinyQuality(2, N_CLASSES - 1)
        method = build_method(name, networks, cfg, QualityGuidance(g, cfg) if qar or qw else None)
        segmenters = list(networks) + ([method.teacher.module] if hasattr(method, "teacher") else [])
        counts, handles = count_forwards(segmenters + [g])
        method.training_step(labeled, unlabeled, StepInfo(0, 2, 1))
        for h in handles:
            h.remove()
        calls[guide] = (sum(counts[id(m)] for m in segmenters), counts[id(g)])
    assert calls["qar+qw"][0] == calls["none"][0] + (1 if name == "ict" else 0)
    assert calls["none"][1] == 0 and calls["qar+qw"][1] == 2


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if n != "sup"])
def test_a_guided_step_standardises_the_unlabeled_image_for_g_once(name, monkeypatch):
    """QW and QAR show g the same unlabeled batch: it is resized and standardised once per step
    (cps shows both networks' outputs on one doubled batch). The dual-network method is the
    exception: its QW judges one pseudolabel on the batch, its QAR both networks on the doubled
    batch."""
    from QGSegmentationLib.quality import presentation
    from QGSegmentationLib.quality.predictor import QualityPredictor, predictor_config

    calls = []
    standardize = presentation.standardize_image
    monkeypatch.setattr(presentation, "standardize_image", lambda x: calls.append(1) or standardize(x))
    torch.manual_seed(3)
    cfg = active_config(guidance_qar=True, guidance_qw=True)
    g = QualityPredictor(predictor_config(n_foreground=N_CLASSES - 1, mode="2d", grid_size=(16, 16)))
    method = build_method(name, make_networks(name, 2, cfg), cfg, QualityGuidance(g, cfg))
    labeled, unlabeled = batches(2)
    for i in range(2):
        method.training_step(labeled, {"image": unlabeled["image"].clone()}, StepInfo(i, 4, 2))
    assert len(calls) == 2 * (2 if name == "dualnet" else 1)


def test_sup_qar_uses_one_forward_for_both_batches():
    cfg = active_config(guidance_qar=True)
    networks = make_networks("sup", 2, cfg)
    g = TinyQuality(2, N_CLASSES - 1)
    method = build_method("sup", networks, cfg, QualityGuidance(g, cfg))
    assert method.uses_unlabeled
    counts, handles = count_forwards([networks[0], g])
    labeled, unlabeled = batches(2)
    method.training_step(labeled, unlabeled, StepInfo(0, 2, 1))
    assert counts[id(networks[0])] == 1 and counts[id(g)] == 1
    plain = build_method("sup", make_networks("sup", 2, SSLConfig()), SSLConfig(), None)
    assert not plain.uses_unlabeled


@pytest.mark.parametrize("name", ["cps", "dualnet"])
def test_two_network_eval_averages_softmaxes(name):
    cfg = active_config()
    networks = make_networks(name, 2, cfg)
    method = build_method(name, networks, cfg, None)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        mean = (torch.softmax(networks[0](x), 1) + torch.softmax(networks[1](x), 1)) / 2
        got = torch.softmax(method.eval_network()(x), 1)
    assert torch.allclose(got, mean, atol=1e-5)


@pytest.mark.parametrize("name", ["mt", "fixmatch", "cps"])
def test_extra_state_round_trips_through_weights_only_checkpoint(name, tmp_path):
    cfg = active_config(heterogeneous_loss=True)
    networks = make_networks(name, 2, cfg)
    method = build_method(name, networks, cfg, None)
    labeled, unlabeled = batches(2)
    train_two_steps(method, networks, labeled, unlabeled)
    path = tmp_path / "state.pt"
    torch.save(method.extra_state(), path)
    state = torch.load(path, weights_only=True)
    fresh = build_method(name, make_networks(name, 2, cfg), cfg, None)
    fresh.load_extra_state(state)
    assert repr(fresh.extra_state()) == repr(method.extra_state())
    if name == "mt":
        assert fresh.teacher.updates == 2
        for a, b in zip(fresh.teacher.module.parameters(), method.teacher.module.parameters()):
            assert torch.equal(a, b)


def test_config_is_taken_from_an_engine_config_ssl_field():
    @dataclasses.dataclass
    class EngineConfig:
        mode: str = "2d"
        ssl: dict = dataclasses.field(default_factory=lambda: {"ema_decay": 0.5})

    networks = make_networks("mt", 2, SSLConfig())
    method = build_method("mt", networks, EngineConfig(), None)
    assert method.cfg.ema_decay == 0.5 and method.teacher.decay == 0.5
    assert METHODS.get("dualnet").network_names(EngineConfig(ssl={})) == ["unet", "resunet"]
    assert METHODS.get("dualnet").network_names(EngineConfig(mode="3d", ssl={})) == ["vnet", "resunet"]
    assert METHODS.get("cps").network_names(EngineConfig()) is None


@pytest.mark.parametrize("mix", ["copy_paste", "none"])
def test_fixmatch_mixing_options(mix):
    torch.manual_seed(4)
    cfg = active_config(fixmatch_mix=mix, guidance_qw=True)
    networks = make_networks("fixmatch", 2, cfg)
    method = build_method("fixmatch", networks, cfg, QualityGuidance(TinyQuality(2, N_CLASSES - 1), cfg))
    labeled, unlabeled = batches(2)
    last = train_two_steps(method, networks, labeled, unlabeled)[-1]
    assert float(last["strong"]) > 0 and float(last["confident_fraction"]) > 0


def test_bench_step_overhead_reports_both_timings():
    from QGSegmentationLib.ssl.bench import bench_step_overhead

    labeled, unlabeled = batches(2)
    result = bench_step_overhead("mt", lambda: make_networks("mt", 2, SSLConfig()),
                                 TinyQuality(2, N_CLASSES - 1), labeled, unlabeled,
                                 steps=1, warmup=0)
    assert set(result) == {"host_s", "guided_s", "ratio"}
    assert result["host_s"] > 0 and result["guided_s"] > 0
    assert math.isclose(result["ratio"], result["guided_s"] / result["host_s"])


def test_teacher_follows_a_loaded_student_when_the_checkpoint_has_no_teacher():
    cfg = active_config()
    networks = make_networks("mt", 2, cfg)
    method = build_method("mt", networks, cfg, None)
    with torch.no_grad():
        for p in networks[0].parameters():
            p.add_(1.0)
    method.load_extra_state({})
    for a, b in zip(method.teacher.module.parameters(), networks[0].parameters()):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,teacher_in_float32", [(torch.float16, True), (torch.bfloat16, False)])
def test_ema_teacher_leaves_float16_autocast_only(dtype, teacher_in_float32):
    """Under float16 autocast the EMA teacher runs in float32 (an eval-mode teacher with lagging
    BatchNorm statistics overflowed float16 in a V-Net); bfloat16 autocast stays on for it."""
    cfg = active_config()
    networks = [n.cuda() for n in make_networks("mt", 3, cfg)]
    method = build_method("mt", networks, cfg)
    seen = []
    method.teacher.module.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    image = batches(3)[1]["image"].cuda()
    with torch.autocast("cuda", dtype=dtype):
        probs = method.teacher_probs(image)
    assert probs.dtype == torch.float32 and seen == [torch.float32 if teacher_in_float32 else dtype]


def test_teachers_decay_as_their_source_papers_say():
    """QG-SSL's PL-QW teacher (methods.md 1.4) decays at 0.999, UA-MT's Mean Teacher at 0.99;
    each has its own option."""
    cfg = SSLConfig()
    decay = lambda name, c=cfg: build_method(name, make_networks(name, 2, c), c, None).teacher.decay  # noqa: E731
    assert [decay(n) for n in ("pl", "pl_t", "pl_c")] == [0.999] * 3
    assert [decay(n) for n in ("mt", "uamt", "ict")] == [0.99] * 3
    assert decay("pl", SSLConfig(pl_ema_decay=0.9)) == 0.9 and decay("mt", SSLConfig(ema_decay=0.95)) == 0.95


def test_ict_applies_qar_to_the_unmixed_unlabeled_images():
    """g never saw a mixup blend: ICT's QAR judges the student's segmentation of x_u itself."""
    torch.manual_seed(0)
    cfg = active_config(guidance_qar=True)
    networks = make_networks("ict", 2, cfg)
    guidance = QualityGuidance(TinyQuality(2, N_CLASSES - 1), cfg)
    seen = []
    qar_loss = guidance.qar_loss
    guidance.qar_loss = lambda image, logits: seen.append(image) or qar_loss(image, logits)
    method = build_method("ict", networks, cfg, guidance)
    labeled, unlabeled = batches(2)
    out = method.training_step(labeled, unlabeled, StepInfo(iteration=0, total_iterations=4, iterations_per_epoch=2))
    assert len(seen) == 1 and torch.equal(seen[0], unlabeled["image"])
    assert float(out["qar"]) > 0 and torch.isfinite(out["loss"])
