"""SegResNet (MONAI): residual encoder, light decoder (Myronenko 2018, without the VAE branch)."""

from __future__ import annotations

from .registry import NetworkSpec, norm_layer, register_network


def _build_segresnet(spatial_dims, in_channels, out_channels, opts):
    from monai.networks.nets import SegResNet

    dropout = float(opts["dropout"])
    return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                     init_filters=opts["init_filters"], norm=norm_layer("segresnet", opts["norm"]),
                     blocks_down=tuple(opts["blocks_down"]), blocks_up=tuple(opts["blocks_up"]),
                     dropout_prob=dropout if dropout > 0 else None)


def _check_blocks(spatial_dims, in_channels, out_channels, opts):
    from ..errors import ConfigError

    if len(opts["blocks_up"]) != len(opts["blocks_down"]) - 1:
        raise ConfigError("network 'segresnet': blocks_up needs one entry fewer than blocks_down "
                          f"(got {list(opts['blocks_down'])} and {list(opts['blocks_up'])})")


# conv_final = (norm, act, 1x1 conv); its input is the last decoder stage at full resolution.
register_network(NetworkSpec(
    name="segresnet",
    description="MONAI SegResNet: residual encoder (1,2,2,4 blocks) with a light decoder",
    dims=(2, 3),
    defaults={"init_filters": 8, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1),
              "norm": "instance", "dropout": 0.0},
    build=_build_segresnet,
    feature_module=lambda net: net.conv_final,
    divisor=lambda opts: 2 ** (len(opts["blocks_down"]) - 1),
    width_option="init_filters",
    width_from_base=int,
    constraints=(_check_blocks,),
))
