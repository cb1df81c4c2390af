"""A decoder-only causal language model whose residual wiring comes from a variant.

Two backbones define the sublayers F (causal self-attention) and G (the MLP) and the embeddings,
the same for every variant (``model.backbone``):

- ``gpt2`` (Radford et al. 2019; nanoGPT): learned token and position embeddings, attention on
  the raw queries and keys, a GELU MLP of ``mlp_ratio·d`` hidden units;
- ``llama`` (Touvron et al. 2023, LLaMA; Hugging Face's ``LlamaDecoderLayer`` is the reference
  its blocks are checked against): token embeddings only, rotary position embeddings on queries
  and keys (RoPE, Su et al. 2021, θ = 10 000), a SwiGLU MLP (Shazeer 2020) whose hidden width is
  LLaMA's rule, and no biases.

Then N blocks, an optional final norm, and an output head (tied to the token embedding or not:
``model.tie_embeddings``). How F and G are wrapped in residual connections and norms, what
follows the last block, and any special init are the variant's, and the norms are the variant's
on either backbone (Pre-LN keeps LayerNorm on ``llama``), so within a backbone differences
between variants are differences of wiring alone.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx

from variants.base import (
    GPT2_INIT_STD,
    AttentionOptions,
    BlockView,
    MLPOptions,
    ModelView,
    Recipe,
    Variant,
    Wiring,
)
from variants.functions import functorch_transforms_active
from variants.norms import LayerNorm

if TYPE_CHECKING:  # torch exports no public name for the info its vmap rules receive
    from torch._functorch.autograd_function import VmapInfo


class VariantError(ValueError):
    """A variant whose blocks break the residual stream (shape change, non-finite output)."""


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    width: int
    heads: int
    depth: int
    mlp_ratio: float
    seq_len: int
    bias: bool = False
    tie_embeddings: bool = True
    qk_norm: bool = False
    value_residual: str = "off"  # off | fixed | learned (ValueResidual)
    # On each sublayer's output before the wiring sees it (suite/run/parametrization.py; 1 = SP).
    branch_multiplier: float = 1.0
    backbone: str = "gpt2"  # gpt2 | llama (see the module docstring)
    logit_softcap: float = 0.0  # c·tanh(logits/c) on the output logits (Gemma 2); 0 = off

    @property
    def llama(self) -> bool:
        return self.backbone == "llama"


ROPE_THETA = 10_000.0  # LLaMA's base of the rotary frequencies
SWIGLU_MULTIPLE = 8  # LLaMA's multiple_of, at the suite's widths (LLaMA's own is 256)


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
    """LLaMA's SwiGLU hidden width: ⌊⅔ · mlp_ratio · d⌋ rounded up to a multiple of 8, so that
    its three matrices (3·h·d weights) hold about as many as GPT-2's two (2·mlp_ratio·d²):
    +3% at d = 64 and d = 32, +0.8% at d = 128 with mlp_ratio 4 (LLaMA's model.py rounds to
    multiples of 256 at widths of 4096 and up, which at d = 64 would add 50%)."""
    third = int(2 * mlp_ratio * width / 3)
    return SWIGLU_MULTIPLE * math.ceil(third / SWIGLU_MULTIPLE)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding"):
    rotates each (i, i + d_head/2) pair of a query's or key's dimensions by position × θ^(−2i/d),
    in the rotate-half layout of GPT-NeoX and Hugging Face's LLaMA. The cos and sin tables are
    float64 buffers of the model's sequence length, cast to the input's type when used (a
    float64 model keeps them exact; Hugging Face computes its table in float32)."""

    def __init__(self, head_dim: int, seq_len: int, theta: float = ROPE_THETA) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension (got {head_dim})")
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        # rotate_half(x)·sin = roll(x, d/2)·[−sin, sin]: one roll instead of slices, a negation
        # and a concatenation (the same products, so the same numbers).
        self.register_buffer("cos", torch.cat([cos, cos], dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat([-sin, sin], dim=-1), persistent=False)
        self.register_buffer("cos32", self.cos.float(), persistent=False)
        self.register_buffer("sin32", self.sin.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, heads, seq, head_dim), rotated by its positions 0 … seq − 1."""
        seq, half = x.shape[-2], x.shape[-1] // 2
        cos, sin = (self.cos, self.sin) if x.dtype == torch.float64 else (self.cos32, self.sin32)
        cos, sin = cos[:seq].to(x.dtype), sin[:seq].to(x.dtype)
        return x * cos + x.roll(half, dims=-1) * sin


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Causal scaled-dot-product attention in one fused kernel call, also under ``torch.func.vmap``.
    ``scale`` multiplies q·k before the softmax (1/√d_head when None).

    torch has no vmap rule for the fused CPU kernel and would loop over the vmapped members one
    call at a time; packed training (suite/run/packed.py) vmaps the whole model, so there the
    members are folded into the batch dimension instead, which computes exactly the same thing.
    """
    if functorch_transforms_active():
        if scale is not None:  # packed runs refuse the variants that set one (config.validate)
            raise NotImplementedError("a softmax scale under vmap")
        return _MembersFoldedIntoBatch.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


class _MembersFoldedIntoBatch(torch.autograd.Function):
    """Only its vmap rule is ever used: it runs on the unwrapped tensors, below the transform,
    so regular autograd records the fused kernel itself and forward/backward are never called."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    @staticmethod
    def setup_context(
        ctx: FunctionCtx, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        pass

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("only differentiable through its vmap rule")

    @staticmethod
    def vmap(
        info: VmapInfo,
        in_dims: tuple[int | None, ...],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> tuple[torch.Tensor, int]:
        def fold(t: torch.Tensor, dim: int | None) -> torch.Tensor:
            t = t.expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
            return t.flatten(0, 1)

        q, k, v = (fold(t, dim) for t, dim in zip((q, k, v), in_dims, strict=True))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.unflatten(0, (info.batch_size, -1)), 0


class FirstBlockValues:
    """The first block's attention values, held during one forward pass for the later blocks'
    value residual (shared by every block's attention; not a module: nothing to train)."""

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None


class ValueResidual(nn.Module):
    """v ← λ·v + (1 − λ)·v₁, v₁ the first block's values (ResFormer: Zhou et al. 2024, "Value
    Residual Learning For Alleviating Attention Concentration In Transformers", arXiv
    2410.17897): λ = ½ fixed, or learned per head from ½. The first block keeps its own."""

    def __init__(self, heads: int, learned: bool, first: FirstBlockValues, is_first: bool) -> None:
        super().__init__()
        self.first, self.is_first = first, is_first
        self.mix = (
            nn.Parameter(torch.full((heads, 1, 1), 0.5)) if learned and not is_first else None
        )

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            self.first.values = v
            return v
        if self.first.values is None:
            raise RuntimeError("value residual: block 0 did not run before this block")
        mix = self.mix if self.mix is not None else 0.5
        return mix * v + (1 - mix) * self.first.values


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention: one fused QKV projection, fused scaled-dot-product kernel.

    ``qk_norm`` layer-normalizes queries and keys per head before the dot product (Dehghani et
    al. 2023; Wortsman et al. 2023), which bounds the attention logits. On the ``llama``
    backbone RoPE rotates them after that norm and before a variant's own query/key map: qk-norm
    then RoPE as OLMo 2 (Team OLMo 2024) does, and nGPT's s_qk ⊙ Norm(·) after RoPE as NVIDIA's
    nGPT code does.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        bias: bool,
        qk_norm: bool = False,
        options: AttentionOptions | None = None,
        value_residual: ValueResidual | None = None,
        rope: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.rope = rope
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        head_dim = width // heads
        self.q_norm = LayerNorm(head_dim) if qk_norm else None
        self.k_norm = LayerNorm(head_dim) if qk_norm else None
        options = options if options is not None else AttentionOptions()
        # A variant's norms on the full-width q, k and v, before the heads split (HybridNorm).
        self.qkv_norms = (
            nn.ModuleList(options.qkv_norm(width) for _ in range(3)) if options.qkv_norm else None
        )
        self.query_key_map = (
            options.query_key_map(heads, head_dim) if options.query_key_map else None
        )
        self.softmax_scale = options.softmax_scale(head_dim) if options.softmax_scale else None
        self.value_residual = value_residual

    def queries_keys_values(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (batch, heads, seq, head_dim), q and k normalized when qk_norm is on."""
        batch, seq, width = x.shape
        qkv = self.qkv(x)
        if self.qkv_norms is not None:
            parts = qkv.split(width, dim=-1)
            qkv = torch.cat([norm(t) for norm, t in zip(self.qkv_norms, parts, strict=True)], -1)
        q, k, v = qkv.view(batch, seq, 3, self.heads, width // self.heads).transpose(1, 3).unbind(2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        if self.query_key_map is not None:
            q, k = self.query_key_map(q), self.query_key_map(k)
        if self.value_residual is not None:
            v = self.value_residual(v)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.queries_keys_values(x)
        y = causal_attention(q, k, v, self.softmax_scale)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))

    @torch.no_grad()
    def max_logit(self, x: torch.Tensor) -> float:
        """max |q·k| × softmax scale (1/√d_head unless the variant sets its own) over heads and
        causal (query, key) pairs: the pre-softmax attention logit whose growth precedes
        divergence (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
        training instabilities")."""
        q, k, _ = self.queries_keys_values(x)
        scale = self.softmax_scale or 1 / math.sqrt(q.shape[-1])
        logits = (q @ k.transpose(-2, -1)).abs() * scale
        seq = q.shape[-2]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        return logits.masked_fill(~causal, 0.0).amax().item()


class MLP(nn.Module):
    def __init__(
        self, width: int, hidden: int, bias: bool, options: MLPOptions | None = None
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden, bias=bias)
        self.proj = nn.Linear(hidden, width, bias=bias)
        options = options if options is not None else MLPOptions()
        self.hidden_scale = options.hidden_scale(hidden, width) if options.hidden_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x)
        if self.hidden_scale is not None:
            hidden = self.hidden_scale(hidden)
        # The exact (erf) GELU of Hendrycks & Gimpel: on CPU its forward + backward measured 3×
        # faster than GPT-2's tanh approximation, which cost 15% of a whole training step.
        return self.proj(F.gelu(hidden))


class SwiGLU(nn.Module):
    """G(x) = W_down (SiLU(W_gate x) ⊙ W_up x) (Shazeer 2020, "GLU Variants Improve Transformer";
    LLaMA's FeedForward). W_up and W_gate are one fused map ``fc`` whose output is [up, gate],
    the order of NVIDIA's nGPT (u, v); a variant's hidden scale acts on that fused
    pre-activation, as nGPT's s_uv does."""

    def __init__(
        self, width: int, hidden: int, bias: bool, options: MLPOptions | None = None
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 2 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, width, bias=bias)
        options = options if options is not None else MLPOptions()
        self.hidden_scale = (
            options.hidden_scale(2 * hidden, width) if options.hidden_scale else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x)
        if self.hidden_scale is not None:
            hidden = self.hidden_scale(hidden)
        up, gate = hidden.chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


def stream_parts(stream: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The tensors a residual stream is made of: itself, or a slot variant's tuple of slots."""
    return stream if isinstance(stream, tuple) else (stream,)


def _is_stream(stream: object, slot_shape: torch.Size) -> bool:
    """A tensor, or a tuple of slots each of the embeddings' shape (what diagnostics and the
    wirings' reads assume of a slot)."""
    if isinstance(stream, torch.Tensor):
        return True
    return (
        isinstance(stream, tuple)
        and len(stream) > 0
        and all(isinstance(part, torch.Tensor) and part.shape == slot_shape for part in stream)
    )


def stream_layout(stream: object) -> object:
    """A residual stream's shape, (batch, seq, …), or a tuple of its slots' shapes; anything
    else by its type's name (what a broken block returned)."""
    if isinstance(stream, torch.Tensor):
        return tuple(stream.shape)
    if isinstance(stream, tuple) and all(isinstance(part, torch.Tensor) for part in stream):
        return tuple(tuple(part.shape) for part in stream)
    return type(stream).__name__


class Block(nn.Module):
    def __init__(
        self,
        shape: ModelShape,
        wiring: Wiring,
        attention: AttentionOptions | None = None,
        value_residual: ValueResidual | None = None,
        mlp: MLPOptions | None = None,
    ) -> None:
        super().__init__()
        rope = RotaryEmbedding(shape.width // shape.heads, shape.seq_len) if shape.llama else None
        self.attn = CausalSelfAttention(
            shape.width, shape.heads, shape.bias, shape.qk_norm, attention, value_residual, rope
        )
        self.mlp: MLP | SwiGLU = (
            SwiGLU(shape.width, swiglu_hidden(shape.width, shape.mlp_ratio), shape.bias, mlp)
            if shape.llama
            else MLP(shape.width, int(shape.mlp_ratio * shape.width), shape.bias, mlp)
        )
        self.wiring = wiring
        self.branch_multiplier = shape.branch_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.branch_multiplier
        if m == 1.0:
            return self.wiring(x, self.attn, self.mlp)
        # A depth parametrization scales F and G themselves, before the wiring; a variant whose
        # wiring would undo it (a norm at the branch's end) refuses it (suite/config.py).
        return self.wiring(x, lambda h: m * self.attn(h), lambda h: m * self.mlp(h))

    def init_view(self) -> BlockView:
        """The parts of this block a variant's init may set."""
        return BlockView(
            attn_qkv=self.attn.qkv,
            attn_out=self.attn.proj,
            mlp_in=self.mlp.fc,
            mlp_out=self.mlp.proj,
            wiring=self.wiring,
            mlp_in_maps=2 if isinstance(self.mlp, SwiGLU) else 1,
        )


class EmbeddingScale(nn.Module):
    """The embeddings × a scalar (a recipe's: Derf's and DyT's learnable √d, fairseq's fixed
    √d)."""

    def __init__(self, value: float, learnable: bool) -> None:
        super().__init__()
        tensor = torch.tensor(float(value))
        if learnable:
            self.scale = nn.Parameter(tensor)
        else:
            self.register_buffer("scale", tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class GPT(nn.Module):
    def __init__(self, shape: ModelShape, variant: Variant, recipe: Recipe | None = None) -> None:
        super().__init__()
        self.shape = shape
        _check_hook_signatures(variant)
        self.token_embedding = nn.Embedding(shape.vocab_size, shape.width)
        # RoPE encodes positions in the llama backbone's attention: no table.
        self.position_embedding = None if shape.llama else nn.Embedding(shape.seq_len, shape.width)
        scale = recipe.embedding_scale if recipe is not None else None
        self.embedding_scale = (
            EmbeddingScale(scale(shape.width), recipe.learnable_embedding_scale)
            if recipe is not None and scale is not None
            else nn.Identity()
        )
        self.scale_positions = recipe is None or recipe.scale_positions
        self.embedding_norm = variant.embedding_norm(shape.width)
        self.expand_stream = variant.expand_stream(shape.width, shape.depth)
        options = variant.sublayer_options()
        attention, mlp = options.attention, options.mlp
        self.first_values = FirstBlockValues() if shape.value_residual != "off" else None
        blocks = [
            Block(
                shape,
                _wiring_module(variant, shape, layer),
                attention,
                self._value_residual(layer),
                mlp,
            )
            for layer in range(shape.depth)
        ]
        self.blocks = nn.ModuleList(blocks)
        self.collapse_stream = variant.collapse_stream(shape.width, shape.depth)
        self.final_norm = variant.final_norm(shape.width)
        self.head = nn.Linear(shape.width, shape.vocab_size, bias=False)
        if shape.tie_embeddings:
            self.head.weight = self.token_embedding.weight
        self.output_scale = (
            options.output_scale(shape.vocab_size, shape.width)
            if options.output_scale is not None
            else nn.Identity()
        )
        self.apply(_base_init)
        self._variant_view = self._init_view(blocks)
        if recipe is not None and recipe.embedding_std is not None:
            with torch.no_grad():
                nn.init.normal_(self.token_embedding.weight, std=recipe.embedding_std(shape.width))
        variant.init_weights(self._variant_view)
        if recipe is not None and recipe.init is not None:
            with torch.no_grad():
                recipe.init(self._variant_view)
        self._after_optimizer_step = (
            variant.after_optimizer_step if variant.acts_after_optimizer_steps() else None
        )
        self._check_blocks(variant.name)

    def _value_residual(self, layer: int) -> ValueResidual | None:
        if self.first_values is None:
            return None
        learned = self.shape.value_residual == "learned"
        return ValueResidual(self.shape.heads, learned, self.first_values, is_first=layer == 0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """The variant's own step after each optimizer step, if it has one (train loop)."""
        if self._after_optimizer_step is not None:
            self._after_optimizer_step(self._variant_view)

    def _init_view(self, blocks: list[Block]) -> ModelView:
        """What the variant's init may touch (``blocks`` are ``self.blocks``, typed); it never
        gets the model itself."""
        return ModelView(
            vocab_size=self.shape.vocab_size,
            seq_len=self.shape.seq_len,
            width=self.shape.width,
            depth=self.shape.depth,
            blocks=tuple(block.init_view() for block in blocks),
            token_embedding=self.token_embedding,
            position_embedding=self.position_embedding,
            head=self.head,
            final_norm=self.final_norm,
            embed=self.embed,
            forward=self.forward,
        )

    @torch.no_grad()
    def _check_blocks(self, variant_name: str) -> None:
        """Fail at build time, not mid-sweep, if a block changes the residual stream's shape,
        the stream does not collapse back to (batch, seq, width), or anything is non-finite at
        init. Uses its own RNG: the training seed is untouched."""
        generator = torch.Generator().manual_seed(0)
        embedded = torch.randn(1, min(self.shape.seq_len, 8), self.shape.width, generator=generator)
        x = self.expand_stream(embedded)
        if not _is_stream(x, embedded.shape):
            raise VariantError(
                f"variant {variant_name!r}: expand_stream gives {stream_layout(x)}, not a "
                f"tensor or a tuple of {tuple(embedded.shape)} slots"
            )
        for index, block in enumerate(self.blocks):
            y = block(x)
            if not _is_stream(y, embedded.shape) or stream_layout(y) != stream_layout(x):
                raise VariantError(
                    f"variant {variant_name!r}: block {index} maps the residual stream "
                    f"{stream_layout(x)} to {stream_layout(y)}; a block must keep its shape"
                )
            if not all(torch.isfinite(part).all() for part in stream_parts(y)):
                raise VariantError(
                    f"variant {variant_name!r}: block {index} returns non-finite values at init"
                )
            x = y
        collapsed = self.collapse_stream(x)
        if not isinstance(collapsed, torch.Tensor) or collapsed.shape != embedded.shape:
            got = tuple(collapsed.shape) if isinstance(collapsed, torch.Tensor) else collapsed
            raise VariantError(
                f"variant {variant_name!r}: collapse_stream gives {got}, not the (batch, seq, "
                f"width) = {tuple(embedded.shape)} the final norm and head expect"
            )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the first block."""
        x = self.token_embedding(tokens)
        if self.position_embedding is None:
            return self.embedding_norm(self.embedding_scale(x))
        positions = self.position_embedding(torch.arange(tokens.shape[1], device=tokens.device))
        if self.scale_positions:
            return self.embedding_norm(self.embedding_scale(x + positions))
        return self.embedding_norm(self.embedding_scale(x) + positions)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.expand_stream(self.embed(tokens))
        for block in self.blocks:
            x = block(x)
        if self.first_values is not None:
            self.first_values.values = None  # held for this pass only
        logits = self.output_scale(self.head(self.final_norm(self.collapse_stream(x))))
        cap = self.shape.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    @torch.no_grad()
    def center_output_embedding(self) -> None:
        """μ-centering (Stollenwerk et al. 2026, "Output Embedding Centering for Stable LLM
        Pretraining"): e_i ← e_i − μ, μ the mean of the output embeddings e_i over the
        vocabulary. The mean logit is μ·h, so it stays 0: the output logits cannot all drift
        together, the output-logit divergence of Wortsman et al. 2023."""
        self.head.weight.sub_(self.head.weight.mean(dim=0, keepdim=True))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_hook_signatures(variant: Variant) -> None:
    """Plugins written for an earlier contract, refused with what changed rather than a bare
    TypeError: suite 0.2's ``init_weights(model, n_layers)`` (since 0.3 it gets one ModelView;
    N is ``model.depth``), and the one-argument ``expand_stream``/``collapse_stream`` of early
    0.3 (they now get ``(width, n_layers)``)."""
    for hook in ("attention_options", "mlp_options", "output_scale"):
        if callable(getattr(type(variant), hook, None)):  # a method; a field may be so named
            raise VariantError(
                f"variant {variant.name!r}: {hook}() is, since suite 0.4, a field of "
                "sublayer_options(), which returns SublayerOptions(attention=..., mlp=..., "
                "output_scale=...)"
            )
    expected = {
        "init_weights": (1, "one, model: ModelView (the depth N is model.depth)"),
        "expand_stream": (2, "two, (width, n_layers)"),
        "collapse_stream": (2, "two, (width, n_layers)"),
    }
    for hook, (count, meaning) in expected.items():
        required = [
            parameter
            for parameter in inspect.signature(getattr(variant, hook)).parameters.values()
            if parameter.default is inspect.Parameter.empty
            and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        ]
        if len(required) != count:
            raise VariantError(
                f"variant {variant.name!r}: {hook} takes {len(required)} arguments; since "
                f"suite 0.3 it takes {meaning} (see docs/variants.md, 'Add your own variant')"
            )


def _wiring_module(variant: Variant, shape: ModelShape, layer: int) -> Wiring:
    wiring = variant.wiring(shape.width, shape.depth, layer)
    if not isinstance(wiring, nn.Module):  # a plain object's parameters would never train
        raise VariantError(
            f"variant {variant.name!r}: the wiring of block {layer} is a "
            f"{type(wiring).__name__}, not a torch.nn.Module"
        )
    return wiring


def _base_init(module: nn.Module) -> None:
    """The init every variant starts from: N(0, 0.02) weights, zero biases (GPT-2 / nanoGPT)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=GPT2_INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=GPT2_INIT_STD)
