"""HybridNorm (Zhuo et al. 2025, "HybridNorm: Towards Stable and Efficient Transformer Training
via Hybrid Normalization", arXiv 2503.04598; the authors' OLMo2 configs in BryceZhuo/HybridNorm).

    h = x + F_qkv(x)          attention with QKV-norm (q, k, v each normalized after the
                              projection), no norm on its input
    u = Norm(h);  y = u + G(u)    the FFN's residual taken after its norm (Post-Norm-like)
    final Norm

HybridNorm* (``star=true``): block 0 is Pre-Norm instead, h = x + F_qkv(Norm x) and
y = h + G(Norm h) (the authors' ``{0: {attn_norm: True, ffn_residual: False}}``). Every norm is
RMSNorm with a gain, as in the authors' configs (``layer_norm_type: rms``); the QKV norms act on
the full width before the heads split, as OLMo2's. Init as the suite's Pre-LN (GPT-2 residual
projections); the authors' Megatron init differs only in its std.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from variants.base import (
    AttentionOptions,
    ModelView,
    Recipe,
    Sublayer,
    SublayerOptions,
    Variant,
    Wiring,
    gpt2_residual_std,
    scale_residual_projections,
)
from variants.norms import RMSNorm
from variants.registry import register


class HybridNormWiring(nn.Module):
    def __init__(self, width: int, eps: float, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm  # HybridNorm*'s first block
        self.norm_attn = RMSNorm(width, eps) if pre_norm else None
        self.norm_mlp = RMSNorm(width, eps)

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = x + attn(self.norm_attn(x) if self.norm_attn is not None else x)
        u = self.norm_mlp(h)
        return (h if self.pre_norm else u) + mlp(u)


@register("hybridnorm")
@dataclass
class HybridNorm(Variant):
    formula = "h = x + F(x) with QKV-norm; u = Norm h; y = u + G(u); star: block 0 Pre-Norm"
    star: bool = False
    eps: float = 1e-5

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return HybridNormWiring(width, self.eps, pre_norm=self.star and layer == 0)

    def sublayer_options(self) -> SublayerOptions:
        return SublayerOptions(attention=AttentionOptions(qkv_norm=partial(RMSNorm, eps=self.eps)))

    def final_norm(self, width: int) -> nn.Module:
        return RMSNorm(width, self.eps)

    def init_weights(self, model: ModelView) -> None:
        scale_residual_projections(model, gpt2_residual_std(model.depth))

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Zhuo et al. 2025, the authors' OLMo2 configs: QKV-norm and the post-norm FFN are "
                "the variant. Their Megatron init's std differs from GPT-2's (not expressed "
                "here), and OLMo 2 exempts embeddings from weight decay (a setting of any run: "
                "optim.no_decay=[embeddings,gains,biases]); otherwise nothing beyond the wiring"
            )
        )
