"""Sandwich-LN (Ding et al. 2021, "CogView: Mastering Text-to-Image Generation via Transformers").

    h = x + LN(F(LN(x)))
    y = h + LN(G(LN(h)))
    final LN

A pre-norm block whose branch output is normalized again before it joins the residual stream,
which CogView introduced to stop the value explosion that broke its fp16 training.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from variants.base import (
    ModelView,
    Recipe,
    Sublayer,
    Variant,
    Wiring,
    gpt2_residual_std,
    scale_residual_projections,
)
from variants.norms import LayerNorm
from variants.registry import register


class SandwichWiring(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.norm_attn_in = LayerNorm(width, eps)
        self.norm_attn_out = LayerNorm(width, eps)
        self.norm_mlp_in = LayerNorm(width, eps)
        self.norm_mlp_out = LayerNorm(width, eps)

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = x + self.norm_attn_out(attn(self.norm_attn_in(x)))
        return h + self.norm_mlp_out(mlp(self.norm_mlp_in(h)))


@register("sandwich")
@dataclass
class Sandwich(Variant):
    formula = "h = x + LN(F(LN x)); y = h + LN(G(LN h)); final LN"
    depth_parametrization_conflict = (
        "a multiplier on its branches would be undone: each branch ends in a LayerNorm, "
        "LN(m·F) = LN(F)"
    )
    eps: float = 1e-5

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return SandwichWiring(width, self.eps)

    def final_norm(self, width: int) -> nn.Module:
        return LayerNorm(width, self.eps)

    def init_weights(self, model: ModelView) -> None:
        scale_residual_projections(model, gpt2_residual_std(model.depth))

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Ding et al. 2021: its other stabilizers (PB-relax, for fp16 image tokens) have "
                "no counterpart here: nothing beyond the wiring"
            )
        )
