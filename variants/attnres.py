"""Full Attention Residuals (Kimi Team 2026, "Attention Residuals", arXiv 2603.15031; the
authors' pseudocode in github.com/MoonshotAI/Attention-Residuals).

Every sublayer (each attention and each MLP, 2N in all) reads a softmax-weighted mix of the
embedding and of every earlier sublayer's output, instead of their plain sum:

    v₀ = embedding;  for sublayer l = 1 … 2N:
        h_l = Σ_{i<l} α_{i→l} v_i,   α_{i→l} = softmax_i(w_lᵀ RMSNorm_l(v_i))
        v_l = f_l(LN(h_l))                      (f = F or G, Pre-LN inside the sublayer)
    output = Σ_{i≤2N} α_{i→out} v_i  → final LN

one learned pseudo-query w_l ∈ ℝ^d per sublayer (and one for the output), initialised at 0 so
that every sublayer starts from the uniform mean of what came before; the keys are the values
through an RMSNorm with a gain. With unit weights α in place of the softmax this is Pre-LN.

The residual stream holds one slot per value, (batch, seq, 2N + 1, d): the memory the paper
calls O(Ld) (its Block AttnRes, which attends over block sums to save it, is not built here; at
this suite's depths the full form fits). The paper leaves the output's aggregation to its code;
here it is one more pseudo-query over all 2N + 1 values, before the final norm. Init: Pre-LN's
(GPT-2 residual projections). Cost: every sublayer reads, and autograd re-writes, the whole slot
tensor, O(N²d) per token over the model; on the CPU that is most of its step (profiled at width
64, depth 6: zero-filling and accumulating slot-tensor gradients), about 4× Pre-LN's step there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants.base import Recipe, Sublayer, Wiring
from variants.norms import LayerNorm, RMSNorm
from variants.preln import PreLN
from variants.registry import register


class DepthAttention(nn.Module):
    """h = Σ_i softmax_i(wᵀ RMSNorm(v_i)) v_i over the values v (..., slots, d) given."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(width))
        self.key_norm = RMSNorm(width, eps)

    def weights(self, values: Tensor) -> Tensor:
        return (self.key_norm(values) @ self.query).softmax(dim=-1)

    def forward(self, values: Tensor) -> Tensor:
        return (self.weights(values).unsqueeze(-1) * values).sum(dim=-2)


def put(stream: Tensor, slot: int, value: Tensor) -> Tensor:
    """The stream with ``value`` (..., d) in ``slot`` (out of place: autograd keeps the old one)."""
    return torch.cat([stream[..., :slot, :], value.unsqueeze(-2), stream[..., slot + 1 :, :]], -2)


class AttnResWiring(nn.Module):
    def __init__(self, width: int, eps: float, layer: int) -> None:
        super().__init__()
        self.slot_attn, self.slot_mlp = 2 * layer + 1, 2 * layer + 2  # slot 0: the embedding
        self.depth_attn, self.depth_mlp = DepthAttention(width, eps), DepthAttention(width, eps)
        self.norm_attn, self.norm_mlp = LayerNorm(width, eps), LayerNorm(width, eps)

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = self.depth_attn(x[..., : self.slot_attn, :])
        x = put(x, self.slot_attn, attn(self.norm_attn(h)))
        h = self.depth_mlp(x[..., : self.slot_mlp, :])
        return put(x, self.slot_mlp, mlp(self.norm_mlp(h)))


class EmbeddingIntoSlots(nn.Module):
    """The embedding in slot 0 of 2N + 1; the sublayers fill the rest."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.slots = slots

    def forward(self, x: Tensor) -> Tensor:
        empty = x.new_zeros(*x.shape[:-1], self.slots - 1, x.shape[-1])
        return torch.cat([x.unsqueeze(-2), empty], dim=-2)


@register("attnres")
@dataclass
class AttentionResiduals(PreLN):
    """Pre-LN's sublayer norms, final LN and init; its own reads over depth."""

    formula = "sublayer l reads Σ_{i<l} softmax_i(w_lᵀ RMSNorm v_i)·v_i of all earlier outputs"
    depth_parametrization_conflict = (
        "its sublayers read a softmax mix over depth, not a sum to correct: a multiplier would "
        "only down-weight every sublayer output against the embedding"
    )

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        return AttnResWiring(width, self.eps, layer)

    def expand_stream(self, width: int, n_layers: int) -> nn.Module:
        return EmbeddingIntoSlots(2 * n_layers + 1)

    def collapse_stream(self, width: int, n_layers: int) -> nn.Module:
        return DepthAttention(width, self.eps)

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Kimi Team 2026: the depth attention and its zero-initialised queries are the "
                "variant, on LLaMA-style blocks (model.backbone=llama): nothing beyond the "
                "wiring"
            )
        )
