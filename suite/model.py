"""A decoder-only causal language model whose residual wiring comes from a variant.

The backbone is a GPT (Radford et al. 2019): learned token and position embeddings, N blocks of
causal self-attention (F) and a GELU MLP (G), an optional final norm, and an output head tied to
the token embedding. How F and G are wrapped in residual connections and norms, what follows the
last block, and any special init are the variant's; everything else is shared, so differences
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
    InitView,
    MLPOptions,
    Variant,
    Wiring,
)
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
    # On each sublayer's output before the wiring sees it (suite/parametrization.py; 1 = SP).
    branch_multiplier: float = 1.0


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Causal scaled-dot-product attention in one fused kernel call, also under ``torch.func.vmap``.
    ``scale`` multiplies q·k before the softmax (1/√d_head when None).

    torch has no vmap rule for the fused CPU kernel and would loop over the vmapped members one
    call at a time; packed training (suite/packed.py) vmaps the whole model, so there the members
    are folded into the batch dimension instead, which computes exactly the same thing.
    """
    if _functorch_transforms_active():
        if scale is not None:  # packed runs refuse the variants that set one (config.validate)
            raise NotImplementedError("a softmax scale under vmap")
        return _MembersFoldedIntoBatch.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _functorch_transforms_active() -> bool:
    # A private torch query; should it go away, vmap still works through torch's slow fallback.
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


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
    al. 2023; Wortsman et al. 2023), which bounds the attention logits.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        bias: bool,
        qk_norm: bool = False,
        options: AttentionOptions | None = None,
        value_residual: ValueResidual | None = None,
    ) -> None:
        super().__init__()
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
        self.attn = CausalSelfAttention(
            shape.width, shape.heads, shape.bias, shape.qk_norm, attention, value_residual
        )
        self.mlp = MLP(shape.width, int(shape.mlp_ratio * shape.width), shape.bias, mlp)
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
        )


class GPT(nn.Module):
    def __init__(self, shape: ModelShape, variant: Variant) -> None:
        super().__init__()
        self.shape = shape
        _check_hook_signatures(variant)
        self.token_embedding = nn.Embedding(shape.vocab_size, shape.width)
        self.position_embedding = nn.Embedding(shape.seq_len, shape.width)
        self.embedding_norm = variant.embedding_norm(shape.width)
        self.expand_stream = variant.expand_stream(shape.width, shape.depth)
        attention, mlp = variant.attention_options(), variant.mlp_options()
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
        self.output_scale = variant.output_scale(shape.vocab_size, shape.width)
        self.apply(_base_init)
        self._variant_view = self._init_view(blocks)
        variant.init_weights(self._variant_view)
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

    def _init_view(self, blocks: list[Block]) -> InitView:
        """What the variant's init may touch (``blocks`` are ``self.blocks``, typed); it never
        gets the model itself."""
        return InitView(
            vocab_size=self.shape.vocab_size,
            seq_len=self.shape.seq_len,
            width=self.shape.width,
            depth=self.shape.depth,
            blocks=tuple(block.init_view() for block in blocks),
            token_embedding=self.token_embedding,
            position_embedding=self.position_embedding,
            head=self.head,
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
        for index, block in enumerate(self.blocks):
            y = block(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise VariantError(
                    f"variant {variant_name!r}: block {index} maps the residual stream "
                    f"{tuple(x.shape)} to {got}; a block must keep its shape"
                )
            if not torch.isfinite(y).all():
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
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.embedding_norm(
            self.token_embedding(tokens) + self.position_embedding(positions)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.expand_stream(self.embed(tokens))
        for block in self.blocks:
            x = block(x)
        if self.first_values is not None:
            self.first_values.values = None  # held for this pass only
        return self.output_scale(self.head(self.final_norm(self.collapse_stream(x))))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_hook_signatures(variant: Variant) -> None:
    """Plugins written for an earlier contract, refused with what changed rather than a bare
    TypeError: suite 0.2's ``init_weights(model, n_layers)`` (since 0.3 it gets one InitView;
    N is ``model.depth``), and the one-argument ``expand_stream``/``collapse_stream`` of early
    0.3 (they now get ``(width, n_layers)``)."""
    expected = {
        "init_weights": (1, "one, model: InitView (the depth N is model.depth)"),
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
                f"suite 0.3 it takes {meaning} (see README, 'Add your own variant')"
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
