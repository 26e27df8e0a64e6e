"""The segmentation-network registry and the one function every caller builds networks with.

Each family module (`unet.py`, `vnet.py`, ...) registers a `NetworkSpec`: how to build the network,
which spatial dims it supports, default options that run on small CPU patches (32x48x48, 64x64),
which patch sizes work, and which submodule feeds the final output layer (for
`features_and_logits`). Nothing here imports torch or MONAI: the command-line parser lists
`network_names()` without paying for them.

Common options understood by every network (besides its own, listed in its spec's defaults):
- `channels` / `features`: width override, either the network's full width sequence or one int
  (the base width, doubled per level, see `NetworkSpec.width_from_base`);
- `img_size`: the training patch size; required by `unetr`, checked against the network's size
  constraints by all others, so a bad patch size fails at build time rather than mid-training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

from ..errors import ConfigError
from ..registry import Registry

NETWORKS = Registry("network")

WIDTH_ALIASES = ("channels", "features")
ATTRIBUTE = "qgseg_network"  # set on every built module: the registry name it was built from


@dataclass(frozen=True)
class NetworkSpec:
    """Everything the library needs to know about one network family member.

    build(spatial_dims, in_channels, out_channels, options) -> nn.Module
    feature_module(net) -> the submodule whose *input* is the decoder feature map
    divisor(options) -> every spatial patch dim must be a multiple of this
    width_option: the native name of the width option (`channels`, `features`, `init_filters`)
    width_from_base(base) -> the native width value for a single base-width int
    exact_size: True when the network only accepts patches of exactly `img_size` (UNETR)
    """

    name: str
    description: str
    dims: Tuple[int, ...]
    defaults: Dict[str, Any]
    build: Callable[..., Any]
    feature_module: Callable[[Any], Any]
    divisor: Callable[[Dict[str, Any]], int]
    width_option: str | None = None
    width_from_base: Callable[[int], Any] | None = None
    exact_size: bool = False
    notes: str = ""
    constraints: Tuple[Callable[[int, int, int, Dict[str, Any]], None], ...] = field(default=())


def register_network(spec: NetworkSpec) -> NetworkSpec:
    """Add `spec` to `NETWORKS` under `spec.name`, tagged with its supported dims."""
    NETWORKS.register(spec.name, description=spec.description,
                      tags=tuple(f"{d}d" for d in spec.dims))(spec)
    return spec


def network_names() -> List[str]:
    """Sorted names of every registered segmentation network."""
    return NETWORKS.names()


def network_spec(name: str) -> NetworkSpec:
    """The spec registered under `name`; unknown names raise ConfigError listing the choices."""
    return NETWORKS.get(name)


def doubling(levels: int, tail: Sequence[int] = ()) -> Callable[[int], Tuple[int, ...]]:
    """width_from_base for networks whose widths double per level: base -> (b, 2b, 4b, ...)."""

    def widths(base: int) -> Tuple[int, ...]:
        seq = tuple(int(base) * 2 ** i for i in range(levels))
        return seq + tuple(int(base) * t for t in tail)

    return widths


def resolve_options(spec: NetworkSpec, spatial_dims: int, options: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults of `spec` updated with `options`, width aliases mapped to the native name.

    Unknown option names raise ConfigError listing the options this network accepts."""
    opts = dict(spec.defaults)
    given = dict(options)
    img_size = given.pop("img_size", None)
    for alias in WIDTH_ALIASES:
        if alias in given and alias != spec.width_option:
            if spec.width_option is None:
                raise ConfigError(f"network '{spec.name}' has a fixed width; option '{alias}' "
                                  "is not supported")
            if spec.width_option in given:
                raise ConfigError(f"network '{spec.name}': give only one of "
                                  f"'{alias}' and '{spec.width_option}'")
            given[spec.width_option] = given.pop(alias)
    unknown = sorted(set(given) - set(opts))
    if unknown:
        allowed = sorted(set(opts) | {"img_size"} | (set(WIDTH_ALIASES) if spec.width_option else set()))
        raise ConfigError(f"network '{spec.name}' does not accept option(s) {', '.join(unknown)}; "
                          f"accepted: {', '.join(allowed)}")
    opts.update(given)
    if spec.width_option is not None:
        opts[spec.width_option] = _normalise_width(spec, opts[spec.width_option])
    if img_size is not None:
        opts["img_size"] = _as_size(img_size, spatial_dims, "img_size")
    return opts


def _normalise_width(spec: NetworkSpec, value: Any) -> Any:
    default = spec.defaults[spec.width_option]
    if isinstance(value, bool):
        raise ConfigError(f"network '{spec.name}': width option must be an int or a list of ints")
    if isinstance(value, (int, float)) and not isinstance(default, (int, float)):
        value = spec.width_from_base(int(value))
    elif isinstance(value, (list, tuple)) and isinstance(default, (int, float)):
        value = value[0] if value else 0
    if isinstance(value, (list, tuple)):
        if len(value) != len(default) and spec.width_option == "features":
            raise ConfigError(f"network '{spec.name}': '{spec.width_option}' needs {len(default)} "
                              f"values (got {list(value)})")
        if any(int(v) < 1 for v in value):
            raise ConfigError(f"network '{spec.name}': widths must be positive (got {list(value)})")
        return tuple(int(v) for v in value)
    if int(value) < 1:
        raise ConfigError(f"network '{spec.name}': width must be positive (got {value})")
    return int(value)


def _as_size(size: Any, spatial_dims: int, what: str) -> Tuple[int, ...]:
    if isinstance(size, (int, float)):
        size = (int(size),) * spatial_dims
    size = tuple(int(s) for s in size)
    if len(size) != spatial_dims or any(s < 1 for s in size):
        raise ConfigError(f"{what} {list(size)} must be {spatial_dims} positive integers")
    return size


def required_divisor(name: str, **options: Any) -> int:
    """Every spatial dim of a patch fed to network `name` (with `options`) must be a multiple
    of this number."""
    spec = network_spec(name)
    return int(spec.divisor(resolve_options(spec, 3, _without_size(options))))


def _without_size(options: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in options.items() if k != "img_size"}


def check_patch_size(name: str, patch: Sequence[int], **options: Any) -> None:
    """Raise ConfigError naming the network, the patch and the nearest valid sizes when the
    network cannot run (or train) on patches of this size: every dim a multiple of
    `required_divisor`, and not all dims equal to it (a one-voxel bottleneck)."""
    spec = network_spec(name)
    div = required_divisor(name, **options)
    patch = tuple(int(p) for p in patch)
    bad = [p for p in patch if p < div or p % div]
    if bad:
        suggestion = tuple(max(div, int(round(p / div)) * div) for p in patch)
        raise ConfigError(f"patch size {list(patch)} does not work with network '{spec.name}': "
                          f"every dim must be a positive multiple of {div}; "
                          f"try {list(suggestion)}")
    if all(p == div for p in patch):
        raise ConfigError(f"patch size {list(patch)} is too small for network '{spec.name}': its "
                          "bottleneck would be a single voxel, which instance/batch normalisation "
                          f"cannot train on; make at least one dim {2 * div} or more")
    img_size = options.get("img_size")
    if spec.exact_size and img_size is not None:
        expected = _as_size(img_size, len(patch), "img_size")
        if expected != patch:
            raise ConfigError(f"network '{spec.name}' was built for img_size {list(expected)} and "
                              f"cannot run on patches of size {list(patch)}")


def valid_patch_size(name: str, patch: Sequence[int], **options: Any) -> bool:
    """True when `check_patch_size` would accept `patch`."""
    try:
        check_patch_size(name, patch, **options)
    except ConfigError:
        return False
    return True


def member_options(name: str, run_network: str, run_options: Dict[str, Any], patch_size: Sequence[int],
                   other_options: Dict[str, Dict[str, Any]] | None = None) -> Dict[str, Any]:
    """Build options of network `name` in a run whose own network is `run_network`: the run's
    `network_options` belong to that network; a method's other networks (the dual-network
    method's heterogeneous second one) take theirs from `other_options[name]` (the run's
    `other_network_options`) or keep their registry defaults. Every network gets the patch size
    (`img_size`) to check against its size constraints."""
    if name == run_network:
        own = dict(run_options or {})
    else:
        own = dict((other_options or {}).get(name) or {})
    return {"img_size": tuple(patch_size), **own}


def build_network(name: str, spatial_dims: int, in_channels: int, out_channels: int,
                  **options: Any):
    """Build the registered network `name` for `spatial_dims` (2 or 3).

    Unknown names, unsupported dims, unknown options or an `img_size` the network cannot run on
    raise ConfigError. The returned module carries `qgseg_network = name` so that
    `features_and_logits` finds its decoder features."""
    spec = network_spec(name)
    if spatial_dims not in spec.dims:
        dims = " or ".join(f"{d}D" for d in spec.dims)
        raise ConfigError(f"network '{spec.name}' supports {dims} only, not {spatial_dims}D "
                          f"(mode '{spatial_dims}d'); choose another network for this mode"
                          + (f" ({spec.notes})" if spec.notes else ""))
    for what, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"network '{spec.name}': {what} must be a positive int (got {value!r})")
    opts = resolve_options(spec, spatial_dims, options)
    img_size = opts.pop("img_size", None)
    if img_size is not None:
        check_patch_size(spec.name, img_size, **_without_size(options))
    elif spec.exact_size:
        raise ConfigError(f"network '{spec.name}' needs option img_size (the patch size it will "
                          f"run on, a multiple of {spec.divisor(opts)} per dim)")
    for constraint in spec.constraints:
        constraint(spatial_dims, in_channels, out_channels, opts)
    if spec.exact_size:
        opts["img_size"] = img_size
    try:
        net = spec.build(spatial_dims, in_channels, out_channels, opts)
    except (ValueError, AssertionError, TypeError) as exc:
        raise ConfigError(f"network '{spec.name}' cannot be built with options {opts}: {exc}") from exc
    setattr(net, ATTRIBUTE, spec.name)
    return net


def product(values: Sequence[int]) -> int:
    """Product of the (int) strides: the total down-sampling factor."""
    return int(math.prod(int(v) for v in values))


NORMS = ("instance", "batch")


def norm_layer(spec_name: str, value: Any) -> str:
    """Validate a `norm` option: 'instance' or 'batch' (case-insensitive)."""
    norm = str(value).lower()
    if norm not in NORMS:
        raise ConfigError(f"network '{spec_name}': norm must be one of {', '.join(NORMS)} "
                          f"(got {value!r})")
    return norm
