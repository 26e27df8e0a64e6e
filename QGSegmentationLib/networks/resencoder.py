"""`resunet`: a residual encoder-decoder (MONAI DynUNet with residual blocks).

It is the heterogeneous second network of the dual-network method (V-Net + a ResNet-style
encoder-decoder): different blocks, normalisation and activation from `vnet`."""

from __future__ import annotations

from .registry import NetworkSpec, doubling, norm_layer, register_network


def _strides(opts):
    return [1] + [int(opts["strides"])] * (len(opts["filters"]) - 1)


def _build_resunet(spatial_dims, in_channels, out_channels, opts):
    from monai.networks.nets import DynUNet

    strides = _strides(opts)
    dropout = float(opts["dropout"])
    return DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                   kernel_size=[3] * len(strides), strides=strides,
                   upsample_kernel_size=strides[1:], filters=list(opts["filters"]),
                   norm_name=(norm_layer("resunet", opts["norm"]), {"affine": True}),
                   dropout=dropout if dropout > 0 else None, res_block=True,
                   deep_supervision=False)


def _check_levels(spatial_dims, in_channels, out_channels, opts):
    from ..errors import ConfigError

    if len(opts["filters"]) < 2:
        raise ConfigError("network 'resunet' needs at least 2 filter levels")


register_network(NetworkSpec(
    name="resunet",
    description="Residual encoder-decoder (MONAI DynUNet, residual blocks, 16..256, 4 levels)",
    dims=(2, 3),
    defaults={"filters": (16, 32, 64, 128, 256), "strides": 2, "norm": "instance", "dropout": 0.0},
    build=_build_resunet,
    feature_module=lambda net: net.output_block,
    divisor=lambda opts: int(opts["strides"]) ** (len(opts["filters"]) - 1),
    width_option="filters",
    width_from_base=doubling(5),
    constraints=(_check_levels,),
))
