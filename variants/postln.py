"""Post-LN: the original Transformer (Vaswani et al. 2017, "Attention Is All You Need").

    h = LN(x + F(x))
    y = LN(h + G(h))

No norm after the last block: the last block's output is already normalized. This is
torchscale's decoder with ``decoder_normalize_before=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from variants.base import Recipe, Sublayer, Variant, Wiring
from variants.norms import LayerNorm
from variants.registry import register


class PostLNWiring(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.norm_attn = LayerNorm(width, eps)
        self.norm_mlp = LayerNorm(width, eps)

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = self.norm_attn(x + attn(x))
        return self.norm_mlp(h + mlp(h))


@register("postln")
@dataclass
class PostLN(Variant):
    formula = "h = LN(x + F(x)); y = LN(h + G(h)); no final norm"
    eps: float = 1e-5

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return PostLNWiring(width, self.eps)

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Vaswani et al. 2017, as its reference trains it: torchscale's decoder "
                "(normalize_before=False) scales no embedding by default "
                "(no_scale_embedding=True) and uses the common init: nothing beyond the wiring"
            )
        )
