"""Segmentation networks: a registry of MONAI networks for 2D and 3D, one file per family.

    from QGSegmentationLib.networks import build_network, network_names, features_and_logits
    net = build_network("unet", 3, in_channels=1, out_channels=2, channels=8)

Importing this package does not import torch or MONAI (builders import them when called)."""

from __future__ import annotations

# Each family module registers its networks on import.
from . import resencoder, segresnet, transformers, unet, unetpp, vnet  # noqa: F401
from .features import feature_module, features_and_logits
from .registry import (NETWORKS, NetworkSpec, build_network, check_patch_size, member_options, network_names,
                       network_spec, required_divisor, valid_patch_size)

__all__ = [
    "NETWORKS", "NetworkSpec", "build_network", "network_names", "network_spec",
    "required_divisor", "check_patch_size", "valid_patch_size", "member_options",
    "features_and_logits", "feature_module",
]
