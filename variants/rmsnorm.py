"""Pre-norm with RMSNorm, as LLaMA (Touvron et al. 2023; Zhang & Sennrich 2019 for RMSNorm).

    h = x + F(RMSNorm(x))
    y = h + G(RMSNorm(h))
    final RMSNorm;  RMSNorm(x) = x · rsqrt(mean(x²) + eps) · g, computed in fp32, eps 1e-5

Init is Pre-LN's (nanoGPT) so that the comparison isolates the norm itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from variants.base import (
    ModelView,
    Recipe,
    Variant,
    Wiring,
    gpt2_residual_std,
    scale_residual_projections,
)
from variants.norms import RMSNorm
from variants.preln import PreNormWiring
from variants.registry import register


@register("rmsnorm")
@dataclass
class PreRMSNorm(Variant):
    formula = "h = x + F(RMS x); y = h + G(RMS h); final RMSNorm (fp32)"
    eps: float = 1e-5

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return PreNormWiring(lambda: RMSNorm(width, self.eps))

    def final_norm(self, width: int) -> nn.Module:
        return RMSNorm(width, self.eps)

    def init_weights(self, model: ModelView) -> None:
        scale_residual_projections(model, gpt2_residual_std(model.depth))

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "LLaMA's model.py: RMSNorm's eps and fp32 statistics are the variant, RoPE and "
                "SwiGLU the llama backbone: nothing beyond the wiring"
            )
        )
