"""Peri-LN (Kim et al. 2025, "Peri-LN: Revisiting Layer Normalization in the Transformer
Architecture").

    x0 = LN(embedding)
    h = x + LN(F(LN(x)))
    y = h + LN(G(LN(h)))
    final LN

Sandwich-LN's block (norms around every sublayer) plus a norm on the embedding output.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from variants.base import Recipe
from variants.norms import LayerNorm
from variants.registry import register
from variants.sandwich import Sandwich


@register("peri-ln")
@dataclass
class PeriLN(Sandwich):
    formula = "x0 = LN(emb); h = x + LN(F(LN x)); y = h + LN(G(LN h)); final LN"

    def embedding_norm(self, width: int) -> nn.Module:
        return LayerNorm(width, self.eps)

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Kim et al. 2025: the embedding norm is the variant, trained with the common "
                "init and optimizer: nothing beyond the wiring"
            )
        )
