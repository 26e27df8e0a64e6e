"""Registry of semi-supervised methods, one file per method.

    from QGSegmentationLib.ssl.methods import METHODS, build_method
    method = build_method("mt", networks, config, guidance)

Importing this package imports torch (the methods are training-time code); `ssl.config.METHOD_NAMES`
lists the names without it.
"""

from __future__ import annotations

from ...registry import Registry

METHODS = Registry("ssl method")

# Importing a module registers its method.
from . import sup, pl, pl_t, pl_c, mt, uamt, ict, cps, cl, fixmatch, dualnet  # noqa: E402,F401


def build_method(name: str, networks, config, guidance=None):
    """Instantiate the registered method `name` (unknown names raise a ConfigError listing choices)."""
    return METHODS.get(name)(networks, config, guidance)


def method_class(name: str):
    return METHODS.get(name)
