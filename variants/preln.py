"""Pre-LN (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"; GPT-2).

    h = x + F(LN(x))
    y = h + G(LN(h))
    final LN after the last block

Init as nanoGPT's model.py: N(0, 0.02) everywhere, residual output projections 0.02 / sqrt(2N).
"""

from __future__ import annotations

from collections.abc import Callable
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


class PreNormWiring(nn.Module):
    """The pre-norm block with any norm: h = x + F(norm(x)); y = h + G(norm(h)), one norm per
    sublayer built by ``norm()``. Pre-LN (LayerNorm), RMSNorm, DyT and Derf differ only in it."""

    def __init__(self, norm: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.norm_attn = norm()
        self.norm_mlp = norm()

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = x + attn(self.norm_attn(x))
        return h + mlp(self.norm_mlp(h))


class PreLNWiring(PreNormWiring):
    """Pre-LN's block: the pre-norm block with LayerNorm (a building block for plugins too)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__(lambda: LayerNorm(width, eps))


@register("preln")
@dataclass
class PreLN(Variant):
    formula = "h = x + F(LN x); y = h + G(LN h); final LN"
    eps: float = 1e-5

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return PreLNWiring(width, self.eps)

    def final_norm(self, width: int) -> nn.Module:
        return LayerNorm(width, self.eps)

    def init_weights(self, model: ModelView) -> None:
        scale_residual_projections(model, gpt2_residual_std(model.depth))

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "nanoGPT's model.py, its reference: the GPT-2 init the suite uses (residual "
                "projections 0.02/√(2N)) is part of the variant: nothing beyond the wiring"
            )
        )
