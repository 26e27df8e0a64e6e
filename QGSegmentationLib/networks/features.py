"""Decoder features and logits from one forward pass, for methods that need features
(contrastive learning, prototype alignment).

The features are the *input* of the module that produces the logits (the final output layer),
captured with a forward pre-hook: the network runs once and the features keep their graph, so
losses on them train the decoder. Which submodule that is depends on the family and is stored
in the registry entry (`NetworkSpec.feature_module`).

Resolution: full output resolution for most networks; `unet` features are at half resolution
(its last layer is a stride-2 transposed conv). Pass `match_logits=True` to get them
interpolated to the logits' spatial size.
"""

from __future__ import annotations

from typing import Any, Tuple

from ..errors import ConfigError
from .registry import ATTRIBUTE, network_spec


def unwrap(net: Any) -> Any:
    """The network built by `build_network` under torch.compile / DataParallel / DDP wrappers."""
    seen = 0
    while not hasattr(net, ATTRIBUTE) and seen < 4:
        inner = getattr(net, "_orig_mod", None) or getattr(net, "module", None)
        if inner is None:
            break
        net, seen = inner, seen + 1
    return net


def feature_module(net: Any) -> Any:
    """The submodule whose input is the decoder feature map of `net` (built by build_network)."""
    base = unwrap(net)
    name = getattr(base, ATTRIBUTE, None)
    if name is None:
        raise ConfigError(f"{type(net).__name__} was not built by networks.build_network, so its "
                          "decoder features cannot be located")
    return network_spec(name).feature_module(base)


def features_and_logits(net: Any, x: Any, match_logits: bool = False) -> Tuple[Any, Any]:
    """Run `net` once on `x` and return (features (B, F, *spatial), logits (B, C, *spatial)).

    Features are at the output resolution or lower (see module docstring); with
    `match_logits=True` they are linearly interpolated to the logits' spatial size."""
    import torch.nn.functional as F

    module = feature_module(net)
    captured = []

    def keep_input(_module, args):
        captured.append(args[0])

    handle = module.register_forward_pre_hook(keep_input)
    try:
        logits = net(x)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the feature layer {type(module).__name__} of "
                           f"{getattr(unwrap(net), ATTRIBUTE, '?')} did not run")
    features = captured[-1]
    if match_logits and features.shape[2:] != logits.shape[2:]:
        mode = "trilinear" if features.ndim == 5 else "bilinear"
        features = F.interpolate(features, size=logits.shape[2:], mode=mode, align_corners=False)
    return features, logits
