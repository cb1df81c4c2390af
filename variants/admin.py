"""Admin (Liu et al. 2020, "Understanding the Difficulty of Training Transformers"; the
authors' Transformer-Clinic code, ``--init-type adaptive``).

    x_{i+1} = LN(ω_i ⊙ x_i + F_i(x_i))   for each sublayer i = 1 … 2N (attention, MLP, ...)

Post-LN whose residual is rescaled by a learnable per-channel ω_i. Admin sets ω_i at init by a
profiling forward pass that fixes each ω as it reaches it, as the authors' code does:

    ω_1 = 1,   ω_{i+1} = sqrt(Var[ω_i ⊙ x_i] + Var[F_i(x_i)])

(variances over every element, as ``np.var``). Since every x_i after the first is a LayerNorm
output (variance ≈ 1), ω_i² ≈ Var[x_1] + Σ_{j<i} Var[F_j]: each branch's share of the residual
stream shrinks like Pre-LN's (≈ 1/i) while the block stays post-norm. ω_1 = 1 keeps the first
LayerNorm's input at the embedding's own scale (suite 0.2 set ω_1 = sqrt(Var[x_1]) ≈ 0.03, which
pushed that input's variance below the LayerNorm's eps). The profiling batch is
random tokens from a fixed generator, so the init is deterministic and leaves the training
seed's RNG untouched.

``recipe=authors`` adds what the recursion assumes of its input: Transformer-Clinic is built on
fairseq, whose Transformer scales the token embeddings by a fixed √d (``embed_scale``; Vaswani
et al. 2017 §3.4), initialises them N(0, d^-½) and adds the positions after the scale, so the
stream enters the first block at about unit variance rather than GPT-2's 0.02² (``controlled``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants.base import ModelView, Recipe, Sublayer, Variant, Wiring
from variants.norms import LayerNorm
from variants.registry import register


class AdminProfile:
    """The profiling recursion, carried through one forward pass: the next sublayer's ω."""

    def __init__(self) -> None:
        self.next_omega = 1.0  # ω_1

    def fix(self, omega: nn.Parameter, x: Tensor, branch: Tensor) -> None:
        omega.fill_(self.next_omega)
        scaled = (omega * x).float().var(correction=0).item()
        self.next_omega = math.sqrt(scaled + branch.float().var(correction=0).item())


class AdminWiring(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.norm_attn = LayerNorm(width, eps)
        self.norm_mlp = LayerNorm(width, eps)
        self.omega_attn = nn.Parameter(torch.ones(width))
        self.omega_mlp = nn.Parameter(torch.ones(width))
        self.profile: AdminProfile | None = None  # set only during the profiling pass

    def _sublayer(self, omega: nn.Parameter, norm: nn.Module, x: Tensor, f: Sublayer) -> Tensor:
        branch = f(x)
        if self.profile is not None:
            self.profile.fix(omega, x, branch)
        return norm(omega * x + branch)

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = self._sublayer(self.omega_attn, self.norm_attn, x, attn)
        return self._sublayer(self.omega_mlp, self.norm_mlp, h, mlp)


@register("admin")
@dataclass
class Admin(Variant):
    formula = "x = LN(ω⊙x + F(x)) per sublayer; ω_1 = 1, ω_i+1 = sqrt(Var[ω_i x_i] + Var F_i)"
    revision = 2  # 2: ω_1 = 1 and the authors' recursion (1: ω_1 = sqrt(Var[x_1]))
    depth_parametrization_conflict = (
        "it already scales its branches with depth: ω is profiled at init so that each "
        "branch's share of the stream shrinks like 1/ℓ"
    )
    eps: float = 1e-5
    profile_batch: int = 4

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return AdminWiring(width, self.eps)

    @torch.no_grad()
    def init_weights(self, model: ModelView) -> None:
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(
            0, model.vocab_size, (self.profile_batch, model.seq_len), generator=generator
        )
        wirings = model.wirings(AdminWiring)
        profile = AdminProfile()
        for wiring in wirings:
            wiring.profile = profile
        try:
            model.forward(tokens)
        finally:
            for wiring in wirings:
                wiring.profile = None

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source="Liu et al. 2020; Transformer-Clinic on fairseq: embed_scale = √d (fixed), "
            "embeddings N(0, d^-1/2) (fairseq's Embedding init)",
            embedding_scale=math.sqrt,
            embedding_std=_fairseq_embedding_std,
            scale_positions=False,  # fairseq adds the positions after embed_scale
        )


def _fairseq_embedding_std(width: int) -> float:
    return width**-0.5
