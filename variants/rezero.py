"""ReZero (Bachlechner et al. 2020, "ReZero is All You Need"; official rztx.py).

    h = x + α·F(x)
    y = h + α·G(h)

One scalar α per layer, shared by both sublayers and initialized to ``alpha_init`` (0), so every
block starts as the identity. No normalization anywhere, final norm included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants.base import Recipe, Sublayer, Variant, Wiring
from variants.registry import register


class ReZeroWiring(nn.Module):
    def __init__(self, alpha_init: float) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = x + self.alpha * attn(x)
        return h + self.alpha * mlp(h)


@register("rezero")
@dataclass
class ReZero(Variant):
    formula = "h = x + α·F(x); y = h + α·G(h); α per layer, init 0; no norms"
    alpha_init: float = 0.0

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return ReZeroWiring(self.alpha_init)

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Bachlechner et al. 2020, rztx.py: α = 0 at init is the variant: nothing beyond "
                "the wiring"
            )
        )
