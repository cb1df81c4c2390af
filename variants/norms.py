"""Normalization layers shared by the variants.

Both are thin wrappers over the fused functional kernels (`F.layer_norm`, `F.rms_norm`) so that
every variant pays the same, minimal cost for a norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """LayerNorm with a learnable gain and (optionally) bias (Ba et al. 2016)."""

    def __init__(self, width: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x²) + eps) over the last dimension (kept, of size 1), computed as RMSNorm
    computes it (fp32; float64 stays float64) and given in x's dtype: the scale of
    ``RMSNorm(x) @ W = inverse_rms(x) · (x @ (g ⊙ W))`` for variants that project a normalized
    input straight away and need not materialize it."""
    precision = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean_square = x.to(precision).pow(2).mean(-1, keepdim=True)
    return torch.rsqrt(mean_square + eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm(x) = x · rsqrt(mean(x²) + eps) · g (Zhang & Sennrich 2019).

    Computed in fp32 and cast back, as LLaMA's reference implementation does, so that bf16
    autocast does not change the statistics (a float64 input, as in the reference checks, keeps
    its own precision).
    """

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64:
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)
