"""LayerScale (Touvron et al. 2021, "Going deeper with Image Transformers", CaiT).

    h = x + γ1 ⊙ F(LN(x))
    y = h + γ2 ⊙ G(LN(h))
    final LN

γ1, γ2 are learnable per-channel vectors initialized to a small ε. CaiT's schedule: ε = 0.1 up to
depth 18, 1e-5 up to depth 24, 1e-6 beyond; ``init_scale`` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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


def cait_epsilon(n_layers: int) -> float:
    if n_layers <= 18:
        return 0.1
    if n_layers <= 24:
        return 1e-5
    return 1e-6


class LayerScaleWiring(nn.Module):
    def __init__(self, width: int, eps: float, init_scale: float) -> None:
        super().__init__()
        self.norm_attn = LayerNorm(width, eps)
        self.norm_mlp = LayerNorm(width, eps)
        self.gamma_attn = nn.Parameter(torch.full((width,), init_scale))
        self.gamma_mlp = nn.Parameter(torch.full((width,), init_scale))

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = x + self.gamma_attn * attn(self.norm_attn(x))
        return h + self.gamma_mlp * mlp(self.norm_mlp(h))


@register("layerscale")
@dataclass
class LayerScale(Variant):
    formula = "h = x + γ⊙F(LN x); y = h + γ⊙G(LN h); γ per channel, init 0.1…1e-6 by depth"
    depth_parametrization_conflict = (
        "it already scales its branches with depth: the gains γ start at 0.1 … 1e-6, chosen "
        "by N (CaiT)"
    )
    eps: float = 1e-5
    init_scale: float | None = None  # None: CaiT's depth schedule

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        scale = self.init_scale if self.init_scale is not None else cait_epsilon(n_layers)
        return LayerScaleWiring(width, self.eps, scale)

    def final_norm(self, width: int) -> nn.Module:
        return LayerNorm(width, self.eps)

    def init_weights(self, model: ModelView) -> None:
        scale_residual_projections(model, gpt2_residual_std(model.depth))

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Touvron et al. 2021: γ's depth-dependent init is the variant; its other "
                "settings are for vision: nothing beyond the wiring"
            )
        )
