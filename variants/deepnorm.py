"""DeepNorm (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers"; torchscale).

    x ← LN(α·x + F(x))   for each sublayer (attention, then MLP)

Decoder-only constants (N layers): α = (2N)^(1/4) up-weights the residual; at init the weights of
v_proj, out_proj and both MLP matrices are multiplied by β = (8N)^(-1/4) (q and k are not). The
paper's init (its Figure 2 pseudo-code) is Xavier-normal with gain β for those and gain 1 for
q_proj and k_proj. The encoder-only and encoder-decoder constants differ; this suite builds
decoder-only models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants.base import ModelView, Recipe, Sublayer, Variant, Wiring
from variants.norms import LayerNorm
from variants.registry import register


def deepnorm_alpha(n_layers: int) -> float:
    return (2 * n_layers) ** 0.25


def deepnorm_beta(n_layers: int) -> float:
    return (8 * n_layers) ** -0.25


class DeepNormWiring(nn.Module):
    def __init__(self, width: int, eps: float, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.norm_attn = LayerNorm(width, eps)
        self.norm_mlp = LayerNorm(width, eps)

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = self.norm_attn(self.alpha * x + attn(x))
        return self.norm_mlp(self.alpha * h + mlp(h))


@register("deepnorm")
@dataclass
class DeepNorm(Variant):
    formula = "x = LN(α·x + F(x)) per sublayer; α=(2N)^¼; β=(8N)^-¼ on v/out/MLP at init"
    depth_parametrization_conflict = (
        "it already scales its branches with depth: α = (2N)^¼ on the residual stream and "
        "β = (8N)^-¼ on the branch weights"
    )
    eps: float = 1e-5

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return DeepNormWiring(width, self.eps, deepnorm_alpha(n_layers))

    def beta(self, n_layers: int) -> float:
        return deepnorm_beta(n_layers)

    @torch.no_grad()
    def init_weights(self, model: ModelView) -> None:
        beta = self.beta(model.depth)
        for block in model.blocks:
            query, key, value = block.attn_qkv.weight.chunk(3)
            mlp_in = block.mlp_in.weight.chunk(block.mlp_in_maps)  # SwiGLU: up, gate
            attn_out, mlp_out = block.attn_out.weight, block.mlp_out.weight
            for weight in (query, key, value, attn_out, *mlp_in, mlp_out):
                nn.init.xavier_normal_(weight)
            for weight in (value, attn_out, *mlp_in, mlp_out):
                weight.mul_(beta)

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Wang et al. 2022 and torchscale: α and the β init are the variant; torchscale "
                "scales no embedding by default: nothing beyond the wiring"
            )
        )
