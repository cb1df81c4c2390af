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
calls O(Ld). ``variant.blocks=B`` builds the paper's Block AttnRes instead (§3.2, "with about 8
blocks it recovers most of the gains"): the 2N sublayers in B contiguous blocks of S = ⌊2N/B⌋
(the last absorbs the remainder), each block's outputs summed into one representation b_n as a
plain residual would, b₀ the embedding; the first sublayer of block n reads softmax attention
over [b₀ … b_{n−1}], a later one over [b₀ … b_{n−1}, b_n^{i−1}] (the block's partial sum so
far), and the output over [b₀ … b_B]. The stream then holds B + 1 slots, O(Bd). B = 0 (the
default), or B ≥ 2N, is the full form: every block one sublayer. The paper leaves the output's
aggregation to its code; here it is one more pseudo-query over all the values, before the final
norm. Init: Pre-LN's (GPT-2 residual projections). Cost of the full form: every sublayer reads,
and autograd re-writes, the whole slot tensor, O(N²d) per token over the model; on the CPU that
is most of its step: 2.2–2.7× Pre-LN's at depth 6, 3.6–8× at depth 24, 1.6–2.8× with 8 blocks
(docs/performance.md; the range is two CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from variants.base import Recipe, Sublayer, Wiring
from variants.norms import LayerNorm, RMSNorm
from variants.preln import PreLN
from variants.registry import register


class DepthAttention(nn.Module):
    """h = Σ_i softmax_i(wᵀ RMSNorm(v_i)) v_i over the values v (..., slots, d) given, or over
    the first ``slots`` of them."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(width))
        self.key_norm = RMSNorm(width, eps)

    def forward(self, values: Tensor, slots: int | None = None) -> Tensor:
        slots = values.shape[-2] if slots is None else slots
        if not 0 < slots <= values.shape[-2]:
            raise ValueError(f"DepthAttention: reads 1 to {values.shape[-2]} slots, not {slots}")
        # wᵀ RMSNorm(v) = rsqrt(mean(v²) + ε) · vᵀ(g ⊙ w): the normalized keys never exist.
        key_query = (self.key_norm.weight * self.query).to(values.dtype)
        with torch.autocast(values.device.type, enabled=False):  # the stream's own precision
            read, *_ = _AttendOverDepth.apply(values, key_query, slots, self.key_norm.eps)
        return read


class _AttendOverDepth(torch.autograd.Function):
    """DepthAttention's read of the first ``slots`` slots of the stream, with its backward
    written out: autograd's backward of the same few lines (the RMS scale's pow and division,
    the softmax-weighted sum as a broadcast product, the slice of the stream) made a temporary
    the size of the read per operation and zero-filled a whole stream-sized gradient per read:
    most of Block AttnRes's step on a CPU beyond Pre-LN's. Here the weighted sum and its
    gradient are batched products (per-token GEMMs only where CPU ``bmm`` was faster than a
    multiply-and-sum, measured) and the values' gradient is three passes over them:

        ∂h/∂v_i ← α_i ∂h,  ∂α_i = v_i·∂h,  ∂ℓ_i = α_i (∂α_i − Σ_j α_j ∂α_j)
        ℓ_i = s_i (v_i·u), s_i = (|v_i|²/d + ε)^(−½):
        ∂v_i += ∂ℓ_i s_i u − ∂ℓ_i (v_i·u) s_i³/d · v_i,   ∂u = Σ ∂ℓ_i s_i v_i.
    """

    generate_vmap_rule = True  # packed runs (train.pack_lr) vmap the model over members

    @staticmethod
    def forward(
        stream: Tensor, key_query: Tensor, slots: int, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        values = stream[..., :slots, :]
        precision = torch.float64 if values.dtype == torch.float64 else torch.float32
        norm = torch.linalg.vector_norm(values, dim=-1, dtype=precision)
        scale = torch.rsqrt(norm.square() / values.shape[-1] + eps)  # kept in fp32: s³ below
        projected = values @ key_query
        weights = (projected * scale.to(values.dtype)).softmax(dim=-1)
        read = (weights.unsqueeze(-2) @ values).squeeze(-2)
        return read, weights, scale, projected

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
        stream, key_query, ctx.slots, _ = inputs
        _, weights, scale, projected = output
        ctx.mark_non_differentiable(weights, scale, projected)
        ctx.save_for_backward(stream, key_query, weights, scale, projected)

    @staticmethod
    @once_differentiable  # its gradient treats the weights and scales as constants
    def backward(
        ctx: FunctionCtx, grad_read: Tensor, *_: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        stream, key_query, weights, scale, projected = ctx.saved_tensors
        values = stream[..., : ctx.slots, :]
        grad_weights = torch.linalg.vecdot(values, grad_read.unsqueeze(-2))
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True))
        along_query = grad_logits * scale.to(values.dtype)
        # s³ overflows float16 at the embedding's init (s ≈ 50): formed in the scale's fp32.
        along_values = (
            -grad_logits.to(scale.dtype)
            * projected.to(scale.dtype)
            * scale.pow(3)
            / values.shape[-1]
        ).to(values.dtype)
        grad_values = (weights.unsqueeze(-1) * grad_read.unsqueeze(-2)).addcmul(
            along_query.unsqueeze(-1), key_query
        )
        grad_values = grad_values.addcmul(along_values.unsqueeze(-1), values)
        grad_key_query = None
        if ctx.needs_input_grad[1]:
            grad_key_query = torch.einsum("...s,...sd->d", along_query, values)
        rest = stream.shape[-2] - ctx.slots
        if rest:  # the slots not read get nothing (out of place, so that vmap may batch it)
            zeros = grad_values.new_zeros(*grad_values.shape[:-2], rest, grad_values.shape[-1])
            grad_values = torch.cat([grad_values, zeros], dim=-2)
        return grad_values, grad_key_query, None, None


class _Put(torch.autograd.Function):
    """A copy of the stream with one slot set to a value, or with a value added to it. Written
    out because autograd's backward of the same cat or slice assignment zero-filled a full
    slot-tensor gradient per piece and added them up: most of Block AttnRes's step on a CPU."""

    generate_vmap_rule = True  # packed runs (train.pack_lr) vmap the model over members

    @staticmethod
    def forward(stream: Tensor, value: Tensor, slot: int, accumulate: bool) -> Tensor:
        value = value.unsqueeze(-2)
        if accumulate:
            value = stream[..., slot : slot + 1, :] + value
        # Out of place (a scatter into a copy), so that vmap may batch value and not stream.
        return stream.slice_scatter(value, dim=-2, start=slot, end=slot + 1)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: Tensor) -> None:
        ctx.slot, ctx.accumulate = inputs[2], inputs[3]

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        slot = slice(ctx.slot, ctx.slot + 1)
        grad_value = grad[..., ctx.slot, :].clone()
        if not ctx.accumulate:  # the overwritten slot passes nothing back
            zeros = grad.new_zeros(grad[..., slot, :].shape)
            grad = grad.slice_scatter(zeros, dim=-2, start=slot.start, end=slot.stop)
        return grad, grad_value, None, None


def put(stream: Tensor, slot: int, value: Tensor, accumulate: bool = False) -> Tensor:
    """The stream with ``value`` (..., d) in ``slot``, or added to it (out of place: autograd
    keeps the old stream)."""
    return _Put.apply(stream, value.to(stream.dtype), slot, accumulate)


def block_of(sublayer: int, sublayers: int, blocks: int) -> tuple[int, bool]:
    """Sublayer l's block n (1-based: slot 0 is the embedding's) of ``blocks`` over
    ``sublayers`` (0: one per sublayer), and whether l is its block's first sublayer (then the
    block holds nothing yet and l reads the earlier blocks only)."""
    if not 0 < blocks < sublayers:
        return sublayer, True
    size = sublayers // blocks
    block = (sublayer - 1) // size + 1
    if block > blocks:  # the last block absorbs the remainder
        return blocks, False
    return block, (sublayer - 1) % size == 0


class AttnResWiring(nn.Module):
    def __init__(self, width: int, eps: float, layer: int, n_layers: int, blocks: int = 0) -> None:
        super().__init__()
        # Sublayers 2·layer + 1 (attention) and + 2 (MLP), counted from 1 after the embedding.
        self.block_attn, self.first_attn = block_of(2 * layer + 1, 2 * n_layers, blocks)
        self.block_mlp, self.first_mlp = block_of(2 * layer + 2, 2 * n_layers, blocks)
        self.depth_attn, self.depth_mlp = DepthAttention(width, eps), DepthAttention(width, eps)
        self.norm_attn, self.norm_mlp = LayerNorm(width, eps), LayerNorm(width, eps)

    @staticmethod
    def slots(block: int, first: bool) -> int:
        """How many slots a sublayer reads: the earlier blocks, and its own once it holds some."""
        return block if first else block + 1

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = self.depth_attn(x, self.slots(self.block_attn, self.first_attn))
        x = put(x, self.block_attn, attn(self.norm_attn(h)), accumulate=not self.first_attn)
        h = self.depth_mlp(x, self.slots(self.block_mlp, self.first_mlp))
        return put(x, self.block_mlp, mlp(self.norm_mlp(h)), accumulate=not self.first_mlp)


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

    blocks: int = field(default=0, metadata={"since": "0.5"})  # Block AttnRes; 0: full AttnRes

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        if self.blocks < 0:
            raise ValueError(f"variant.blocks: must be ≥ 0, 0 for full AttnRes (got {self.blocks})")
        return AttnResWiring(width, self.eps, layer, n_layers, self.blocks)

    def expand_stream(self, width: int, n_layers: int) -> nn.Module:
        return EmbeddingIntoSlots(block_of(2 * n_layers, 2 * n_layers, self.blocks)[0] + 1)

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
