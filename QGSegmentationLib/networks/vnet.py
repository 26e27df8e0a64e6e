"""V-Net (MONAI), 3D only: the first network of the dual-network method (Lu et al.)."""

from __future__ import annotations

from .registry import NetworkSpec, register_network


def _build_vnet(spatial_dims, in_channels, out_channels, opts):
    from monai.networks.nets import VNet

    dropout = float(opts["dropout"])
    return VNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                dropout_prob_down=dropout, dropout_prob_up=(dropout, dropout))


def _check_in_channels(spatial_dims, in_channels, out_channels, opts):
    from ..errors import ConfigError

    if 16 % in_channels:
        raise ConfigError(f"network 'vnet' needs in_channels dividing 16 (1 for single-channel "
                          f"images), got {in_channels}")


# out_tr = (5^3 conv to n classes, norm, act, 1x1 conv): its input is the 32-channel
# full-resolution decoder output.
register_network(NetworkSpec(
    name="vnet",
    description="MONAI V-Net (fixed widths 16..256, 4 stride-2 levels); 3D only",
    dims=(3,),
    defaults={"dropout": 0.5},
    build=_build_vnet,
    feature_module=lambda net: net.out_tr,
    divisor=lambda opts: 16,
    notes="V-Net is 3D only, needs in_channels 1 and patch dims divisible by 16",
    constraints=(_check_in_channels,),
))
