"""Mix-LN (Li et al. 2024, "Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN and
Post-LN", arXiv 2412.13795).

    layers 0 … ⌊α·N⌋−1:  Post-LN blocks   h = LN(x + F(x)); y = LN(h + G(h))
    layers ⌊α·N⌋ … N−1:  Pre-LN blocks    h = x + F(LN x);  y = h + G(LN h)
    final LN;  α = post_fraction (0.25 in the paper)

Post-LN's strong gradients in the early layers, Pre-LN's stable ones in the deep layers. The
wirings are the suite's own Post-LN and Pre-LN, so this file only decides which one each layer
gets. Init: the common base init, N(0, 0.02), as in the suite's example plugin it started as.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from variants.base import Recipe, Variant, Wiring
from variants.norms import LayerNorm
from variants.postln import PostLNWiring
from variants.preln import PreLNWiring
from variants.registry import register


@register("mixln")
@dataclass
class MixLN(Variant):
    formula = "Post-LN blocks for the first ⌊αN⌋ layers, Pre-LN after; final LN; α = 0.25"
    post_fraction: float = 0.25
    eps: float = 1e-5

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        if layer < int(self.post_fraction * n_layers):
            return PostLNWiring(width, self.eps)
        return PreLNWiring(width, self.eps)

    def final_norm(self, width: int) -> nn.Module:
        return LayerNorm(width, self.eps)

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Li et al. 2024: the share of Post-LN blocks is the variant, on LLaMA blocks "
                "(model.backbone=llama) with the common recipe: nothing beyond the wiring"
            )
        )
