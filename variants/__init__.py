"""Variant registry, the variant contract, and the built-in variants.

Importing this package registers the built-ins: every module of the package is imported, so a
new built-in is one new file with its ``@register`` and nothing else. :func:`get` and
:func:`names` also load installed plugins.

The names below are the API a plugin builds on; the wirings and norms among them are exported so
that a plugin reuses them rather than copying them.
"""

import importlib
import pkgutil

from variants.base import (
    GPT2_INIT_STD,
    AttentionOptions,
    BlockView,
    InitView,
    MLPOptions,
    ModelView,
    Recipe,
    Stream,
    Sublayer,
    SublayerOptions,
    Variant,
    Wiring,
    gpt2_residual_std,
    scale_residual_projections,
)
from variants.derf import Derf
from variants.dyt import DyT
from variants.norms import LayerNorm, RMSNorm
from variants.postln import PostLNWiring
from variants.preln import PreLNWiring, PreNormWiring
from variants.registry import ENTRY_POINT_GROUP, UnknownVariantError, get, names, register
from variants.streams import CopyIntoStreams, MixesStreams, SumStreams

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "__main__":
        importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = [
    "AttentionOptions",
    "ENTRY_POINT_GROUP",
    "GPT2_INIT_STD",
    "BlockView",
    "CopyIntoStreams",
    "Derf",
    "DyT",
    "InitView",
    "ModelView",
    "LayerNorm",
    "MLPOptions",
    "MixesStreams",
    "PostLNWiring",
    "PreLNWiring",
    "PreNormWiring",
    "RMSNorm",
    "Recipe",
    "Stream",
    "Sublayer",
    "SublayerOptions",
    "SumStreams",
    "UnknownVariantError",
    "Variant",
    "Wiring",
    "get",
    "gpt2_residual_std",
    "names",
    "register",
    "scale_residual_projections",
]
