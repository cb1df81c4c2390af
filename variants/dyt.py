"""Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization").

    DyT(x) = γ ⊙ tanh(a·x) + β,   a a learnable scalar, init ``alpha_init`` (0.5)
    h = x + F(DyT(x)); y = h + G(DyT(h)); final DyT

Pre-LN with every LayerNorm replaced by DyT: no statistics are computed at all. ``controlled``:
the paper's formula at the suite's GPT-2 init (on the quick preset it stalls: docs/results.md).
``recipe=authors`` adds the authors' LLaMA recipe (their code, other_tasks/LLaMA in
github.com/jiachenzhu/DyT, and the paper's Table 10): a learnable scalar on the embeddings,
initialised to √d, and α₀ by sublayer, 0.8 before attention and 0.2 before the MLP and in the
final norm. The paper sets α₀ by width, smaller for wider models (LLaMA 2 7B 0.8 / 0.2 … 70B
0.2 / 0.05); the suite's widths are far below its narrowest model, whose values are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from variants.base import (
    SATURATION_SLOPE,
    ModelView,
    Recipe,
    Variant,
    Wiring,
    gpt2_residual_std,
    scale_residual_projections,
)
from variants.preln import PreNormWiring
from variants.registry import register

TANH_KNEE = math.atanh(math.sqrt(1 - SATURATION_SLOPE))  # tanh'(z) = 1 − tanh²(z)


class DyT(nn.Module):
    def __init__(self, width: int, alpha_init: float) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    def saturated(self, x: torch.Tensor) -> torch.Tensor:
        return (self.alpha * x).abs() > TANH_KNEE


@register("dyt")
@dataclass
class DynamicTanh(Variant):
    formula = "pre-norm with every LN replaced by γ·tanh(a·x)+β; a init 0.5"
    alpha_init: float = 0.5

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return PreNormWiring(lambda: DyT(width, self.alpha_init))

    def final_norm(self, width: int) -> nn.Module:
        return DyT(width, self.alpha_init)

    def init_weights(self, model: ModelView) -> None:
        scale_residual_projections(model, gpt2_residual_std(model.depth))

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source="Zhu et al. 2025 §7 and Table 10; github.com/jiachenzhu/DyT other_tasks/LLaMA "
            "(fms_fsdp/models/llama.py): embedding × learnable scalar init √d, α₀ attention 0.8, "
            "FFN and final 0.2 (LLaMA 2 7B)",
            embedding_scale=math.sqrt,
            learnable_embedding_scale=True,
            init=_authors_alphas,
        )


AUTHORS_ATTN_ALPHA, AUTHORS_OTHER_ALPHA = 0.8, 0.2  # the LLaMA 2 7B setting (Table 10)


def _authors_alphas(model: ModelView) -> None:
    for wiring in model.wirings(PreNormWiring):
        wiring.norm_attn.alpha.fill_(AUTHORS_ATTN_ALPHA)
        wiring.norm_mlp.alpha.fill_(AUTHORS_OTHER_ALPHA)
    model.final_norm.alpha.fill_(AUTHORS_OTHER_ALPHA)
