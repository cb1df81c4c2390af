"""nGPT, the normalized Transformer (Loshchilov, Hsieh, Sun & Ginsburg 2024, "nGPT: Normalized
Transformer with Representation Learning on the Hypersphere", arXiv 2410.01131; constants as in
NVIDIA's model code, github.com/NVIDIA/ngpt).

Every vector of width d lives on the unit hypersphere, and each sublayer moves the hidden state
a learned step along the sphere (eqs. 10–11):

    h ← Norm(h + α_A ⊙ (Norm(F(h)) − h))        α_A, α_M ∈ ℝ^d, effective init 0.05
    h ← Norm(h + α_M ⊙ (Norm(G(h)) − h))        (|α|, as the code takes)

with Norm(x) = x / ‖x‖ and no other norm anywhere (no final norm). Inside the sublayers:

    q, k ← s_qk ⊙ Norm(q), s_qk ⊙ Norm(k) per head,   softmax(√d_head · q·k)   (eqs. 15–16)
    G(h) = W_out GELU(s_u ⊙ √d · W_in h)                                     (eq. 20)
    logits = s_z ⊙ E_out h                                                   (eq. 21)

and after every optimizer step each weight matrix is put back on the sphere along its
d-dimensional side (the rows of the embeddings, the head, W_qkv and W_in; the columns of the
attention and MLP output maps). The learned scales (α, s_qk, s_u, s_z) use the paper's
"scaled parameter" trick (section 2.5): stored at s_init_scaling, used × s_init/s_init_scaling,
with NVIDIA's constants: α 0.05 / (1/√d), s_qk 1 / (1/√d), s_u 1 / 1, s_z 1 / (1/√d). Trained
with no weight decay (the paper's recipe): the suite builds its cells with weight_decay = 0.

The backbone is the suite's, as for every variant. On ``model.backbone=llama`` it is NVIDIA's:
a SwiGLU MLP whose fused [u, v] pre-activation s_u ⊙ √d scales as the code's s_uv does, and RoPE
before s_qk ⊙ Norm(·). On ``gpt2`` the MLP is GELU (s_u on its pre-activation) and positions
are learned embeddings: both tables are unit rows and the stream starts at
Norm(e_token + e_position). A tied head is the same unit rows as the token embedding (nGPT does
not tie; the suite's ``model.tie_embeddings`` decides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from variants.base import (
    AttentionOptions,
    MLPOptions,
    ModelView,
    Recipe,
    Sublayer,
    SublayerOptions,
    Variant,
    Wiring,
)
from variants.registry import register


def unit(x: Tensor, dim: int = -1) -> Tensor:
    """x / ‖x‖ along ``dim`` (the paper's Norm)."""
    return F.normalize(x, dim=dim)


class ScaledParameter(nn.Module):
    """A learned vector used as ``stored × (init_value / init_scaling)``, stored from
    ``init_scaling``: its effective value starts at ``init_value`` while the optimizer moves it
    on the scale of ``init_scaling`` (nGPT section 2.5)."""

    def __init__(self, size: int, init_value: float, init_scaling: float) -> None:
        super().__init__()
        self.factor = init_value / init_scaling
        self.stored = nn.Parameter(torch.full((size,), init_scaling))

    def forward(self) -> Tensor:
        return self.stored * self.factor


class Unit(nn.Module):
    """Norm as a module: the stream entering the first block."""

    def forward(self, x: Tensor) -> Tensor:
        return unit(x)


class NGPTWiring(nn.Module):
    def __init__(self, width: int, step_init: float) -> None:
        super().__init__()
        self.attn_step = ScaledParameter(width, step_init, 1 / math.sqrt(width))
        self.mlp_step = ScaledParameter(width, step_init, 1 / math.sqrt(width))

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = self.move(x, attn(x), self.attn_step().abs())
        return self.move(h, mlp(h), self.mlp_step().abs())

    @staticmethod
    def move(h: Tensor, update: Tensor, step: Tensor) -> Tensor:
        h = unit(h)  # already unit; the code normalizes again, and so do we
        return unit(h + step * (unit(update) - h))


class QueryKeyScale(nn.Module):
    """q ← s_qk ⊙ Norm(q) per head (one s_qk ∈ ℝ^d for queries and keys, split by head)."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        width = heads * head_dim
        self.shape = (heads, 1, head_dim)  # broadcasts over (batch, heads, seq, head_dim)
        self.scale = ScaledParameter(width, 1.0, 1 / math.sqrt(width))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale().view(self.shape) * unit(x)


class HiddenScale(nn.Module):
    """u ← s_u ⊙ √d · u, the MLP's pre-activation (W_in's unit rows give entries of order
    1/√d; √d puts them back where the nonlinearity bends)."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.scale = ScaledParameter(hidden, 1.0, 1.0)
        self.sqrt_width = math.sqrt(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale() * self.sqrt_width * x


class LogitScale(nn.Module):
    """logits ← s_z ⊙ logits, one learned scale per vocabulary entry."""

    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        self.scale = ScaledParameter(vocab_size, 1.0, 1 / math.sqrt(width))

    def forward(self, logits: Tensor) -> Tensor:
        return self.scale() * logits


@register("ngpt")
@dataclass
class NGPT(Variant):
    formula = "h ← Norm(h + α⊙(Norm F(h) − h)), same for G; unit weights; s_qk, s_u, s_z scales"
    trains_without_weight_decay = True
    depth_parametrization_conflict = (
        "a multiplier on its branches would be undone: each update enters as Norm(F(h)), and "
        "its learned steps α already set how far a block moves the state"
    )
    step_init: float = 0.05  # α's effective init (the paper's α_A = α_M = 0.05)

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return NGPTWiring(width, self.step_init)

    def embedding_norm(self, width: int) -> nn.Module:
        return Unit()

    def sublayer_options(self) -> SublayerOptions:
        return SublayerOptions(
            attention=AttentionOptions(query_key_map=QueryKeyScale, softmax_scale=math.sqrt),
            mlp=MLPOptions(hidden_scale=HiddenScale),
            output_scale=LogitScale,
        )

    def init_weights(self, model: ModelView) -> None:
        """Directions from the common Gaussian init, put on the sphere (the code does the same:
        its Gaussian init is normalized before the first step)."""
        self.after_optimizer_step(model)

    @torch.no_grad()
    def after_optimizer_step(self, model: ModelView) -> None:
        """Every matrix back to unit vectors along its d-dimensional side."""
        rows_of_width = [model.token_embedding, model.head]
        if model.position_embedding is not None:  # none on the llama backbone (RoPE)
            rows_of_width.append(model.position_embedding)
        for block in model.blocks:
            rows_of_width += [block.attn_qkv, block.mlp_in]
            for projection in block.residual_projections:  # (d, ·): unit columns
                projection.weight.copy_(unit(projection.weight, dim=0))
        for module in rows_of_width:
            module.weight.copy_(unit(module.weight, dim=1))

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Loshchilov et al. 2024 and NVIDIA's code: no weight decay is the variant's in "
                "both arms, SwiGLU and RoPE are the llama backbone, the scales' init is the "
                "variant: nothing beyond the wiring"
            )
        )
