"""U-Net family (MONAI): `unet`, `basicunet`, `attentionunet`."""

from __future__ import annotations

from .registry import NetworkSpec, doubling, norm_layer, product, register_network


def _build_unet(spatial_dims, in_channels, out_channels, opts):
    from monai.networks.nets import UNet

    channels = opts["channels"]
    strides = opts["strides"]
    if isinstance(strides, int):
        strides = (strides,) * (len(channels) - 1)
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                channels=channels, strides=tuple(strides), num_res_units=int(opts["num_res_units"]),
                norm=norm_layer("unet", opts["norm"]), dropout=float(opts["dropout"]))


def _unet_divisor(opts):
    strides = opts["strides"]
    if isinstance(strides, int):
        return strides ** (len(opts["channels"]) - 1)
    return product(strides)


# The top-level up layer (model[2]) maps the concatenated skip + decoder features (2*channels[0],
# half resolution) to the output; its input is the decoder feature map.
register_network(NetworkSpec(
    name="unet",
    description="MONAI UNet with residual units (channels 16..256, 4 stride-2 levels)",
    dims=(2, 3),
    defaults={"channels": (16, 32, 64, 128, 256), "strides": 2, "num_res_units": 2,
              "norm": "instance", "dropout": 0.0},
    build=_build_unet,
    feature_module=lambda net: net.model[2],
    divisor=_unet_divisor,
    width_option="channels",
    width_from_base=doubling(5),
    notes="features are at half the output resolution",
))


def _build_basicunet(spatial_dims, in_channels, out_channels, opts):
    from monai.networks.nets import BasicUNet

    norm = norm_layer("basicunet", opts["norm"])
    return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                     features=opts["features"], norm=(norm, {"affine": True}),
                     dropout=float(opts["dropout"]))


register_network(NetworkSpec(
    name="basicunet",
    description="MONAI BasicUNet: plain two-conv U-Net, 4 max-pool levels",
    dims=(2, 3),
    defaults={"features": (16, 16, 32, 64, 128, 16), "norm": "instance", "dropout": 0.0},
    build=_build_basicunet,
    feature_module=lambda net: net.final_conv,
    divisor=lambda opts: 16,
    width_option="features",
    width_from_base=doubling(1, tail=(1, 2, 4, 8, 1)),
))


def _build_attentionunet(spatial_dims, in_channels, out_channels, opts):
    from monai.networks.nets import AttentionUnet

    channels = opts["channels"]
    strides = opts["strides"]
    if isinstance(strides, int):
        strides = (strides,) * (len(channels) - 1)
    return AttentionUnet(spatial_dims=spatial_dims, in_channels=in_channels,
                         out_channels=out_channels, channels=channels, strides=tuple(strides),
                         dropout=float(opts["dropout"]))


register_network(NetworkSpec(
    name="attentionunet",
    description="MONAI Attention U-Net (attention-gated skips, batch norm)",
    dims=(2, 3),
    defaults={"channels": (16, 32, 64, 128, 256), "strides": 2, "dropout": 0.0},
    build=_build_attentionunet,
    feature_module=lambda net: net.model[2],
    divisor=_unet_divisor,
    width_option="channels",
    width_from_base=doubling(5),
))
