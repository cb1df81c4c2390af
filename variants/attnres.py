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

The residual stream holds one slot per value, 2N + 1 tensors of (batch, seq, d): the memory
the paper calls O(Ld). ``variant.blocks=B`` builds the paper's Block AttnRes instead (§3.2,
"with about 8 blocks it recovers most of the gains"): the 2N sublayers in B contiguous blocks of
S = ⌊2N/B⌋ (the last absorbs the remainder), each block's outputs summed into one representation
b_n as a plain residual would, b₀ the embedding; the first sublayer of block n reads softmax
attention over [b₀ … b_{n−1}], a later one over [b₀ … b_{n−1}, b_n^{i−1}] (the block's partial
sum so far), and the output over [b₀ … b_B]. The stream then holds B + 1 slots, O(Bd). B = 0
(the default), or B ≥ 2N, is the full form: every block one sublayer. The paper leaves the
output's aggregation to its code; here it is one more pseudo-query over all the values, before
the final norm. Init: Pre-LN's (GPT-2 residual projections). Cost of the full form: every
sublayer reads every earlier value, O(N²d) per token over the model: on a 2-core CPU, one
thread, with the depth attention's C kernel (variants/native/depth_attention.c), 1.2–1.4×
Pre-LN's step at depth 6 and 1.6–2.1× at depth 24; with 8 blocks 1.2–1.4× at depth 24
(docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from variants.base import Recipe, Sublayer, Wiring
from variants.functions import apply_function
from variants.native import depth_attention
from variants.norms import LayerNorm, RMSNorm
from variants.preln import PreLN
from variants.registry import register

Slots = tuple[Tensor, ...]
"""AttnRes's residual stream: one (batch, seq, width) tensor per slot, b₀ the embedding's. A tuple,
not one (batch, seq, slots, width) tensor: a sublayer then writes its slot without copying the
others, and each slot's gradient accumulates in place; with one tensor, every write copied the
whole stream and every read's backward filled a stream-sized gradient, most of Block AttnRes's
step on a CPU beyond Pre-LN's (docs/performance.md)."""


class DepthAttention(nn.Module):
    """h = Σ_i softmax_i(wᵀ RMSNorm(v_i)) v_i over the slots v given, or over the first
    ``slots`` of them: a tuple of (..., d) tensors, or one (..., slots, d) tensor."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(width))
        self.key_norm = RMSNorm(width, eps)

    def forward(self, values: Slots | Tensor, slots: int | None = None) -> Tensor:
        if isinstance(values, Tensor):
            values = values.unbind(-2)
        slots = len(values) if slots is None else slots
        if not 0 < slots <= len(values):
            raise ValueError(f"DepthAttention: reads 1 to {len(values)} slots, not {slots}")
        # wᵀ RMSNorm(v) = rsqrt(mean(v²) + ε) · vᵀ(g ⊙ w): the normalized keys never exist.
        key_query = (self.key_norm.weight * self.query).to(values[0].dtype)
        with torch.autocast(values[0].device.type, enabled=False):  # the stream's own precision
            read, *_ = apply_function(
                _AttendOverDepth, key_query, self.key_norm.eps, *values[:slots]
            )
        return read


class _AttendOverDepth(torch.autograd.Function):
    """DepthAttention's read of the slots given, with its backward written out: autograd's
    backward of the same few lines (the RMS scale's pow and division, the softmax-weighted sum
    as a broadcast product) made a temporary the size of the read per operation. Here each slot
    is visited a few times in each direction, every temporary is one slot's size, and each slot
    gets its own gradient (autograd adds it in place to what the later reads gave that slot):

        ∂h/∂v_i ← α_i ∂h,  ∂α_i = v_i·∂h,  ∂ℓ_i = α_i (∂α_i − Σ_j α_j ∂α_j)
        ℓ_i = s_i (v_i·u), s_i = (|v_i|²/d + ε)^(−½):
        ∂v_i += ∂ℓ_i s_i u − ∂ℓ_i (v_i·u) s_i³/d · v_i,   ∂u = Σ ∂ℓ_i s_i v_i.
    """

    generate_vmap_rule = True  # packed runs (train.pack_lr) vmap the model over members

    @staticmethod
    def forward(key_query: Tensor, eps: float, *values: Tensor) -> tuple[Tensor, ...]:
        if depth_attention.runs(key_query, values):  # its C kernel, in one pass a block
            return depth_attention.forward(key_query, eps, values)
        # Per-slot quantities slot-first, (slots, ...): CPU softmax over a last dimension of
        # 2–9 took 55–165 µs for 1024 tokens, over the first 3–9 µs.
        precision = torch.float64 if values[0].dtype == torch.float64 else torch.float32
        norm = torch.stack([torch.linalg.vector_norm(v, dim=-1, dtype=precision) for v in values])
        scale = torch.rsqrt(norm.square() / values[0].shape[-1] + eps)  # kept in fp32: s³ below
        projected = torch.stack([v @ key_query for v in values])
        weights = (projected * scale.to(values[0].dtype)).softmax(dim=0).unsqueeze(-1)
        # Summed in fp32 (a no-op for a float32 stream): in a bfloat16 model the sum over up to
        # 2N + 1 slots would round after each one.
        read = values[0] * weights[0].to(precision)
        for value, weight in zip(values[1:], weights[1:], strict=True):
            read = torch.addcmul(read, value, weight)
        return read.to(values[0].dtype), weights, scale, projected

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
        key_query, _, *values = inputs
        _, weights, scale, projected = output
        ctx.mark_non_differentiable(weights, scale, projected)
        ctx.save_for_backward(key_query, weights, scale, projected, *values)

    @staticmethod
    @once_differentiable  # its gradient treats the weights and scales as constants
    def backward(ctx: FunctionCtx, grad_read: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        key_query, weights, scale, projected, *values = ctx.saved_tensors
        if depth_attention.runs(key_query, values, grad_read, weights, scale, projected):
            grad_key_query, grads = depth_attention.backward(
                grad_read, key_query, weights, scale, projected, values, ctx.needs_input_grad[0]
            )
            return grad_key_query, None, *grads
        grad_weights = torch.stack([torch.linalg.vecdot(v, grad_read) for v in values])
        weights = weights.squeeze(-1)
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(0, keepdim=True))
        along_query = (grad_logits * scale.to(grad_logits.dtype)).unsqueeze(-1)
        # s³ overflows float16 at the embedding's init (s ≈ 50): formed in the scale's fp32.
        along_values = (
            -grad_logits.to(scale.dtype) * projected.to(scale.dtype) * scale.pow(3)
            / values[0].shape[-1]
        ).to(values[0].dtype).unsqueeze(-1)  # fmt: skip
        weights = weights.unsqueeze(-1)
        grad_values = [
            torch.addcmul(torch.addcmul(query * key_query, grad_read, weight), along, value)
            for value, weight, query, along in zip(
                values, weights, along_query, along_values, strict=True
            )
        ]
        grad_key_query = None
        if ctx.needs_input_grad[0]:  # Σ_i ∂ℓ_i s_i v_i over the tokens: one matrix-vector each
            grad_key_query = sum(
                query.flatten() @ value.flatten(0, -2)
                for query, value in zip(along_query, values, strict=True)
            )
        return grad_key_query, None, *grad_values


def put(stream: Slots, slot: int, value: Tensor, accumulate: bool = False) -> Slots:
    """The stream with ``value`` (..., d) in ``slot``, or added to it; the other slots are the
    same tensors."""
    value = value.to(stream[slot].dtype)
    if accumulate:
        value = stream[slot] + value
    return (*stream[:slot], value, *stream[slot + 1 :])


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

    def forward(self, x: Slots, attn: Sublayer, mlp: Sublayer) -> Slots:
        h = self.depth_attn(x, self.slots(self.block_attn, self.first_attn))
        x = put(x, self.block_attn, attn(self.norm_attn(h)), accumulate=not self.first_attn)
        h = self.depth_mlp(x, self.slots(self.block_mlp, self.first_mlp))
        return put(x, self.block_mlp, mlp(self.norm_mlp(h)), accumulate=not self.first_mlp)


class EmbeddingIntoSlots(nn.Module):
    """The embedding in slot 0 of 2N + 1 (B + 1 in blocks); the sublayers fill the rest, which
    hold zeros until then (one broadcast zero: no memory)."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.slots = slots

    def forward(self, x: Tensor) -> Slots:
        empty = x.new_zeros(()).expand(x.shape)
        return (x, *(empty,) * (self.slots - 1))


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
