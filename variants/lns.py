"""LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth in Large Language Models",
arXiv 2502.05795; the authors' code, github.com/lmsdss/LayerNorm-Scaling).

    h = x + F(LN(x) / √ℓ)
    y = h + G(LN(h) / √ℓ)      ℓ = 1 … N, the block's depth (1-based)
    final LN

Pre-LN whose norm outputs shrink with depth, so that the residual stream's variance grows
polynomially rather than exponentially and deep blocks stop collapsing to the identity. No new
parameters. Init: N(0, 0.02) everywhere, without GPT-2's 1/√(2N) on the residual projections —
the paper (footnote 1) found that scaled init diminishes LNS and recommends removing it, and its
code gives that scaled init only to its ``scale_pre`` variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from variants.base import ModelView, Recipe, Sublayer, Wiring
from variants.preln import PreLN, PreLNWiring
from variants.registry import register


class LNSWiring(PreLNWiring):
    def __init__(self, width: int, eps: float, depth: int) -> None:
        super().__init__(width, eps)
        self.depth = depth  # ℓ, 1-based
        self.scale = 1 / math.sqrt(depth)

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = x + attn(self.norm_attn(x) * self.scale)
        return h + mlp(self.norm_mlp(h) * self.scale)


@register("lns")
@dataclass
class LayerNormScaling(PreLN):
    formula = "h = x + F(LN(x)/√ℓ); y = h + G(LN(h)/√ℓ), ℓ = 1…N; final LN; no 1/√2N init"
    depth_parametrization_conflict = (
        "it already scales its branches with depth: their inputs × 1/√ℓ, ℓ the block's depth"
    )

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return LNSWiring(width, self.eps, layer + 1)

    def init_weights(self, model: ModelView) -> None:
        """The common N(0, 0.02) init, as is: no depth-scaled residual projections."""

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Sun et al. 2025 and github.com/lmsdss/LayerNorm-Scaling: the 1/√ℓ scaling is "
                "the variant, on LLaMA blocks (model.backbone=llama) with the common recipe: "
                "nothing beyond the wiring"
            )
        )
