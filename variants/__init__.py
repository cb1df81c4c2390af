"""Variant registry and the built-in variants.

Importing this package registers the built-ins; :func:`get` also loads installed plugins.
"""

from variants import (  # noqa: F401  (importing registers the built-ins)
    admin,
    deepnorm,
    dyt,
    layerscale,
    peri_ln,
    postln,
    preln,
    respost,
    rezero,
    rmsnorm,
    sandwich,
)
from variants.base import Variant
from variants.registry import ENTRY_POINT_GROUP, UnknownVariantError, get, names, register

__all__ = ["ENTRY_POINT_GROUP", "UnknownVariantError", "Variant", "get", "names", "register"]
