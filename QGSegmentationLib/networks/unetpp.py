"""UNet++ (MONAI BasicUNetPlusPlus), wrapped to return only its last (full-depth) output."""

from __future__ import annotations

from .registry import NetworkSpec, doubling, norm_layer, register_network


def _build_unetpp(spatial_dims, in_channels, out_channels, opts):
    from monai.networks.nets import BasicUNetPlusPlus

    from .wrappers import LastOutput

    norm = norm_layer("basicunetplusplus", opts["norm"])
    net = BasicUNetPlusPlus(spatial_dims=spatial_dims, in_channels=in_channels,
                            out_channels=out_channels, features=opts["features"],
                            deep_supervision=False, norm=(norm, {"affine": True}),
                            dropout=float(opts["dropout"]))
    return LastOutput(net)


register_network(NetworkSpec(
    name="basicunetplusplus",
    description="MONAI UNet++ (nested dense skips); returns the last output only",
    dims=(2, 3),
    defaults={"features": (16, 16, 32, 64, 128, 16), "norm": "instance", "dropout": 0.0},
    build=_build_unetpp,
    feature_module=lambda net: net.net.final_conv_0_4,
    divisor=lambda opts: 16,
    width_option="features",
    width_from_base=doubling(1, tail=(1, 2, 4, 8, 1)),
))
