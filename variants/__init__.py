"""Variant registry and the built-in variants.

Importing this package registers the built-ins; :func:`get` also loads installed plugins.
"""

from variants import deepnorm, postln, preln, rezero, rmsnorm  # noqa: F401  (registers built-ins)
from variants.base import Variant
from variants.registry import ENTRY_POINT_GROUP, UnknownVariantError, get, names, register

__all__ = ["ENTRY_POINT_GROUP", "UnknownVariantError", "Variant", "get", "names", "register"]
