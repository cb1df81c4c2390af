"""A decoder-only causal language model whose residual wiring comes from a variant.

The backbone is a GPT (Radford et al. 2019): learned token and position embeddings, N blocks of
causal self-attention (F) and a GELU MLP (G), an optional final norm, and an output head tied to
the token embedding. How F and G are wrapped in residual connections and norms, what follows the
last block, and any special init are the variant's; everything else is shared, so differences
between variants are differences of wiring alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from variants.base import Variant


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    width: int
    heads: int
    depth: int
    mlp_ratio: float
    seq_len: int
    bias: bool = True
    tie_embeddings: bool = True


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention: one fused QKV projection, fused scaled-dot-product kernel."""

    def __init__(self, width: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = (
            self.qkv(x)
            .view(batch, seq, 3, self.heads, width // self.heads)
            .transpose(1, 3)
            .unbind(2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden, bias=bias)
        self.proj = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, shape: ModelShape, wiring: nn.Module) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(shape.width, shape.heads, shape.bias)
        self.mlp = MLP(shape.width, int(shape.mlp_ratio * shape.width), shape.bias)
        self.wiring = wiring

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wiring(x, self.attn, self.mlp)


class GPT(nn.Module):
    def __init__(self, shape: ModelShape, variant: Variant) -> None:
        super().__init__()
        self.shape = shape
        self.token_embedding = nn.Embedding(shape.vocab_size, shape.width)
        self.position_embedding = nn.Embedding(shape.seq_len, shape.width)
        self.embedding_norm = variant.embedding_norm(shape.width)
        self.blocks = nn.ModuleList(
            Block(shape, variant.wiring(shape.width, shape.depth, layer))
            for layer in range(shape.depth)
        )
        self.final_norm = variant.final_norm(shape.width)
        self.head = nn.Linear(shape.width, shape.vocab_size, bias=False)
        if shape.tie_embeddings:
            self.head.weight = self.token_embedding.weight
        self.apply(_base_init)
        variant.init_weights(self, shape.depth)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embedding_norm(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _base_init(module: nn.Module) -> None:
    """The init every variant starts from: N(0, 0.02) weights, zero biases (GPT-2 / nanoGPT)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
