"""Transformer encoders with convolutional decoders (MONAI): `unetr`, `swinunetr`.

UNETR cuts the patch into 16-voxel tokens and is built for one fixed `img_size`; SwinUNETR
needs every patch dim divisible by patch_size**5 (32 by default)."""

from __future__ import annotations

from .registry import NetworkSpec, norm_layer, register_network


def _build_unetr(spatial_dims, in_channels, out_channels, opts):
    from monai.networks.nets import UNETR

    return UNETR(in_channels=in_channels, out_channels=out_channels, img_size=opts["img_size"],
                 feature_size=int(opts["feature_size"]), hidden_size=int(opts["hidden_size"]),
                 mlp_dim=int(opts["mlp_dim"]), num_heads=int(opts["num_heads"]),
                 norm_name=norm_layer("unetr", opts["norm"]), dropout_rate=float(opts["dropout"]),
                 spatial_dims=spatial_dims)


def _check_heads(spatial_dims, in_channels, out_channels, opts):
    from ..errors import ConfigError

    if int(opts["hidden_size"]) % int(opts["num_heads"]):
        raise ConfigError(f"network 'unetr': hidden_size {opts['hidden_size']} must be divisible "
                          f"by num_heads {opts['num_heads']}")


register_network(NetworkSpec(
    name="unetr",
    description="MONAI UNETR: ViT encoder on 16-voxel tokens (needs img_size = patch size)",
    dims=(2, 3),
    defaults={"feature_size": 16, "hidden_size": 192, "mlp_dim": 768, "num_heads": 4,
              "norm": "instance", "dropout": 0.0},
    build=_build_unetr,
    feature_module=lambda net: net.out,
    divisor=lambda opts: 16,
    width_option="feature_size",
    width_from_base=int,
    exact_size=True,
    constraints=(_check_heads,),
))


def _build_swinunetr(spatial_dims, in_channels, out_channels, opts):
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=in_channels, out_channels=out_channels,
                     patch_size=int(opts["patch_size"]), depths=tuple(opts["depths"]),
                     num_heads=tuple(opts["num_heads"]), feature_size=int(opts["feature_size"]),
                     norm_name=norm_layer("swinunetr", opts["norm"]),
                     drop_rate=float(opts["dropout"]), spatial_dims=spatial_dims)


def _check_swin(spatial_dims, in_channels, out_channels, opts):
    import importlib.util

    from ..errors import ConfigError

    if importlib.util.find_spec("einops") is None:
        raise ConfigError("network 'swinunetr' needs the einops package: pip install einops")

    if int(opts["feature_size"]) % 12:
        raise ConfigError(f"network 'swinunetr': feature_size must be a multiple of 12 "
                          f"(got {opts['feature_size']})")
    if len(opts["depths"]) != len(opts["num_heads"]):
        raise ConfigError("network 'swinunetr': depths and num_heads need the same length")


register_network(NetworkSpec(
    name="swinunetr",
    description="MONAI SwinUNETR: shifted-window transformer encoder (patch dims multiple of 32)",
    dims=(2, 3),
    defaults={"feature_size": 12, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24),
              "patch_size": 2, "norm": "instance", "dropout": 0.0},
    build=_build_swinunetr,
    feature_module=lambda net: net.out,
    divisor=lambda opts: int(opts["patch_size"]) ** 5,
    width_option="feature_size",
    width_from_base=int,
    constraints=(_check_swin,),
))
