"""Network registry: every registered network builds, runs forward + backward in each dim it
supports, exposes decoder features through one forward pass, and rejects bad configurations
with a ConfigError that says what is wrong."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from QGSegmentationLib.errors import ConfigError
from QGSegmentationLib.networks import (NETWORKS, build_network, check_patch_size, feature_module,
                                        features_and_logits, network_names, network_spec,
                                        required_divisor, valid_patch_size)

torch.set_num_threads(1)

# Tiny widths so forward + backward of every network stays well under a second on one core.
TINY = {
    "unet": {"channels": 4, "num_res_units": 1},
    "basicunet": {"features": 4},
    "attentionunet": {"channels": 4},
    "basicunetplusplus": {"features": 4},
    "segresnet": {"channels": 4, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)},
    "vnet": {"dropout": 0.0},
    "unetr": {"feature_size": 4, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2},
    "swinunetr": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
    "resunet": {"filters": (4, 8, 16, 32, 64)},
}

CASES = [(name, dims) for name in network_names() for dims in network_spec(name).dims]


def _needs(name):
    if name == "swinunetr" and importlib.util.find_spec("einops") is None:
        pytest.skip("swinunetr needs einops")


def _tiny_patch(name, dims):
    """The smallest trainable patch: the divisor per dim, twice that along the last axis."""
    div = required_divisor(name, **TINY[name])
    return (div,) * (dims - 1) + (2 * div,)


def test_every_network_has_tiny_test_options_and_a_description():
    assert set(TINY) == set(network_names())
    for entry in NETWORKS.entries():
        assert entry.description and entry.tags, entry.name


@pytest.mark.parametrize("name,dims", CASES)
def test_forward_backward_and_features(name, dims):
    _needs(name)
    torch.manual_seed(0)
    patch = _tiny_patch(name, dims)
    net = build_network(name, dims, 1, 3, img_size=patch, **TINY[name])
    net.train()
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 1, *patch)
    features, logits = features_and_logits(net, x)

    assert len(calls) == 1, "features_and_logits must run the network exactly once"
    assert logits.shape == (2, 3) + patch
    assert features.ndim == dims + 2 and features.shape[0] == 2
    assert all(f <= p for f, p in zip(features.shape[2:], patch))
    assert features.requires_grad

    net.zero_grad()
    features.float().pow(2).mean().backward()
    feature_grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert feature_grads and any(g.abs().sum() > 0 for g in feature_grads)

    net.zero_grad()
    logits = net(x)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 3, (2,) + patch)).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["unet", "segresnet", "resunet"])
def test_features_match_logits_resolution_on_request(name):
    net = build_network(name, 3, 1, 2, **TINY[name]).eval()
    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        features, logits = features_and_logits(net, x, match_logits=True)
        plain = net(x)
    assert features.shape[2:] == logits.shape[2:]
    torch.testing.assert_close(logits, plain)  # the hook does not change the output


def test_unet_features_are_the_input_of_its_last_layer():
    net = build_network("unet", 2, 1, 2, channels=(4, 8, 16)).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        features, logits = features_and_logits(net, x)
        torch.testing.assert_close(net.model[2](features), logits)
    assert features.shape == (1, 2 * 4, 8, 8)  # concatenated skip + decoder at half resolution


def test_basicunetplusplus_returns_one_tensor_in_train_and_eval():
    net = build_network("basicunetplusplus", 2, 1, 2, **TINY["basicunetplusplus"])
    x = torch.randn(1, 1, 16, 32)
    for training in (True, False):
        net.train(training)
        out = net(x)
        assert torch.is_tensor(out) and out.shape == (1, 2, 16, 32)


def test_default_options_run_on_small_cpu_patches():
    with torch.no_grad():
        for name in network_names():
            spec = network_spec(name)
            if name == "swinunetr":
                _needs(name)
            for dims in spec.dims:
                patch = (32, 48, 48) if dims == 3 else (64, 64)
                if not valid_patch_size(name, patch):
                    assert name == "swinunetr"
                    patch = (32, 32, 64) if dims == 3 else (64, 64)
                net = build_network(name, dims, 1, 2, img_size=patch).eval()
                assert net(torch.randn(1, 1, *patch)).shape == (1, 2) + patch, name


def test_unknown_network_lists_choices():
    with pytest.raises(ConfigError) as err:
        build_network("not_a_net", 3, 1, 2)
    for name in network_names():
        assert name in str(err.value)


def test_vnet_is_3d_only_and_needs_compatible_input_channels():
    with pytest.raises(ConfigError, match="3D only"):
        build_network("vnet", 2, 1, 2)
    with pytest.raises(ConfigError, match="in_channels"):
        build_network("vnet", 3, 3, 2)


def test_unknown_option_lists_accepted_options():
    with pytest.raises(ConfigError, match="num_res_units") as err:
        build_network("unet", 3, 1, 2, depth=3)
    assert "depth" in str(err.value)


def test_width_override_accepts_int_sequence_and_alias():
    assert build_network("unet", 3, 1, 2, channels=4).channels == (4, 8, 16, 32, 64)
    assert build_network("unet", 3, 1, 2, features=(2, 4, 8)).channels == (2, 4, 8)
    net = build_network("resunet", 2, 1, 2, channels=(4, 8, 16))
    assert list(net.filters) == [4, 8, 16]
    assert required_divisor("resunet", channels=(4, 8, 16)) == 4
    with pytest.raises(ConfigError, match="fixed width"):
        build_network("vnet", 3, 1, 2, channels=8)
    with pytest.raises(ConfigError, match="6 values"):
        build_network("basicunet", 3, 1, 2, features=(4, 8))


def test_patch_size_rules():
    assert required_divisor("unet") == 16
    assert required_divisor("unet", channels=(4, 8, 16)) == 4
    assert required_divisor("segresnet") == 8
    assert required_divisor("swinunetr") == 32
    assert valid_patch_size("unet", (32, 48, 48))
    assert not valid_patch_size("unet", (30, 48, 48))
    assert not valid_patch_size("swinunetr", (32, 48, 48))
    assert not valid_patch_size("unet", (16, 16, 16))  # one-voxel bottleneck cannot train
    assert valid_patch_size("unet", (16, 16, 32))
    with pytest.raises(ConfigError, match=r"multiple of 32.*\[32, 64, 64\]"):
        check_patch_size("swinunetr", (32, 48, 48))
    with pytest.raises(ConfigError, match="swinunetr"):
        build_network("swinunetr", 3, 1, 2, img_size=(32, 48, 48))
    with pytest.raises(ConfigError, match="img_size"):
        build_network("unetr", 3, 1, 2)
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_network("unetr", 3, 1, 2, img_size=(24, 32, 32))


def test_bad_channels_and_dims_are_config_errors():
    with pytest.raises(ConfigError, match="out_channels"):
        build_network("unet", 3, 1, 0)
    with pytest.raises(ConfigError, match="norm"):
        build_network("unet", 3, 1, 2, norm="layer")
    with pytest.raises(ConfigError, match="num_heads"):
        build_network("unetr", 2, 1, 2, img_size=32, hidden_size=30, num_heads=4)


def test_batch_norm_option_and_feature_module_lookup_through_wrappers():
    net = build_network("unet", 2, 1, 2, channels=(4, 8), norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    wrapped = torch.nn.DataParallel(net)
    assert feature_module(wrapped) is net.model[2]
    with pytest.raises(ConfigError, match="not built by"):
        feature_module(torch.nn.Conv2d(1, 2, 3))


@pytest.mark.parametrize("name", ["unet", "vnet", "resunet"])
def test_channels_last_gives_the_same_output(name):
    torch.manual_seed(0)
    net = build_network(name, 3, 1, 2, **TINY[name]).eval()
    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        reference = net(x)
        net = net.to(memory_format=torch.channels_last_3d)
        out = net(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_package_import_does_not_import_torch():
    code = ("import sys, QGSegmentationLib.networks as n; n.network_names(); "
            "assert 'torch' not in sys.modules and 'monai' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_deep_copies_keep_their_feature_layer():
    """EMA teachers are deep copies of the student: features must still be found."""
    import copy

    net = build_network("resunet", 2, 1, 2, **TINY["resunet"])
    teacher = copy.deepcopy(net)
    assert feature_module(teacher) is teacher.output_block


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,dims", CASES)
def test_autocast_on_cuda(name, dims):
    _needs(name)
    patch = _tiny_patch(name, dims)
    net = build_network(name, dims, 1, 2, img_size=patch, **TINY[name]).cuda()
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    net = net.to(memory_format=fmt)
    x = torch.randn(2, 1, *patch, device="cuda").to(memory_format=fmt)
    with torch.autocast("cuda", dtype=torch.float16):
        features, logits = features_and_logits(net, x)
        loss = logits.float().mean() + features.float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (2, 2) + patch
