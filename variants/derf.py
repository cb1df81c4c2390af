"""Dynamic erf (Chen et al. 2025, "Stronger Normalization-Free Transformers", arXiv 2512.10938;
the authors' code, github.com/zlab-princeton/Derf).

    Derf(x) = γ ⊙ erf(α·x + s) + β      α, s learnable scalars, init ``alpha_init`` (0.5) and
                                          ``shift_init`` (0); γ = 1, β = 0 per channel
    h = x + F(Derf(x)); y = h + G(Derf(h)); final Derf

DyT's recipe with erf in place of tanh and a learnable shift: Pre-LN with every LayerNorm
replaced by a point-wise function, no statistics computed. Init as DyT and Pre-LN (GPT-2).
``controlled``: the formula alone (on the quick preset it stalls: docs/results.md).
``recipe=authors`` adds the authors' GPT-2 (nanoGPT) patch, "language model/model_derf.patch" of
github.com/zlab-princeton/Derf: a learnable scalar ``shared_scale`` on the token + position
embeddings, initialised to √d, and α₀ = 1 in every Derf (their attn/ffn/dec defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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

ERF_KNEE = math.sqrt(-math.log(SATURATION_SLOPE))  # erf'(z) ∝ exp(−z²)


class Derf(nn.Module):
    def __init__(self, width: int, alpha_init: float = 0.5, shift_init: float = 0.0) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.shift = nn.Parameter(torch.tensor(float(shift_init)))
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * torch.erf(self.alpha * x + self.shift) + self.bias

    def saturated(self, x: Tensor) -> Tensor:
        return (self.alpha * x + self.shift).abs() > ERF_KNEE


@register("derf")
@dataclass
class DynamicErf(Variant):
    formula = "pre-norm with every LN replaced by γ·erf(α·x + s)+β; α init 0.5, s init 0"
    alpha_init: float = 0.5
    shift_init: float = 0.0

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return PreNormWiring(lambda: Derf(width, self.alpha_init, self.shift_init))

    def final_norm(self, width: int) -> nn.Module:
        return Derf(width, self.alpha_init, self.shift_init)

    def init_weights(self, model: ModelView) -> None:
        scale_residual_projections(model, gpt2_residual_std(model.depth))

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source="github.com/zlab-princeton/Derf, language model/model_derf.patch: (tok_emb + "
            "pos_emb) × shared_scale, a learnable scalar init √n_embd; attn, ffn and dec "
            "alpha_init_value 1.0",
            embedding_scale=math.sqrt,
            learnable_embedding_scale=True,
            init=_authors_alphas,
        )


AUTHORS_ALPHA = 1.0  # the patch's attn_alpha_init_value = ffn_... = dec_... = 1.0


def _authors_alphas(model: ModelView) -> None:
    for wiring in model.wirings(PreNormWiring):
        wiring.norm_attn.alpha.fill_(AUTHORS_ALPHA)
        wiring.norm_mlp.alpha.fill_(AUTHORS_ALPHA)
    model.final_norm.alpha.fill_(AUTHORS_ALPHA)
