"""Res-post-norm (Liu et al. 2022, "Swin Transformer V2: Scaling Up Capacity and Resolution").

    h = x + LN(F(x))
    y = h + LN(G(h))
    final LN

The norm sits at the end of each branch, not on the residual stream. The branch norms' weight
and bias start at 0, so every block is the identity at init and the branches grow in as they
train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants.base import ModelView, Recipe, Sublayer, Variant, Wiring
from variants.norms import LayerNorm
from variants.registry import register


class ResPostWiring(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.norm_attn = LayerNorm(width, eps)
        self.norm_mlp = LayerNorm(width, eps)

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = x + self.norm_attn(attn(x))
        return h + self.norm_mlp(mlp(h))


@register("respost")
@dataclass
class ResPost(Variant):
    formula = "h = x + LN(F(x)); y = h + LN(G(h)); branch LN gain/bias start at 0; final LN"
    depth_parametrization_conflict = (
        "a multiplier on its branches would be undone: each branch ends in a LayerNorm, "
        "LN(m·F) = LN(F)"
    )
    eps: float = 1e-5

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return ResPostWiring(width, self.eps)

    def final_norm(self, width: int) -> nn.Module:
        return LayerNorm(width, self.eps)

    @torch.no_grad()
    def init_weights(self, model: ModelView) -> None:
        for wiring in model.wirings(ResPostWiring):
            for norm in (wiring.norm_attn, wiring.norm_mlp):
                for parameter in norm.parameters():  # gain and bias
                    parameter.zero_()

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Liu et al. 2022: its other changes (scaled cosine attention, log-spaced "
                "position bias) are for vision: nothing beyond the wiring"
            )
        )
