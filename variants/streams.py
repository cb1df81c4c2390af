"""A residual stream of n parallel copies, for variants whose blocks read and write several
streams (Hyper-Connections and their manifold-constrained form).

The stream is a tensor (batch, seq, n, width). The embedding enters it as n copies of itself and
leaves it as the sum of the n streams (Zhu et al. 2025, "Hyper-Connections", §2: "the output of
the final layer is obtained by summing the hidden vectors of all streams").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from variants.base import ModelView, Variant, gpt2_residual_std, scale_residual_projections
from variants.norms import LayerNorm


@runtime_checkable
class MixesStreams(Protocol):
    """A module of a multi-stream wiring whose update is x' = M·x + (sublayer terms), x the n
    streams: it reports M (..., n, n) for given streams. Diagnostics multiply the M of every
    sublayer over depth: the mHC paper's Amax gain (suite/run/diagnostics.py)."""

    def stream_mixing(self, streams: Tensor) -> Tensor: ...


class CopyIntoStreams(nn.Module):
    def __init__(self, streams: int) -> None:
        super().__init__()
        self.streams = streams

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.streams, x.shape[-1])


class SumStreams(nn.Module):
    def forward(self, streams: Tensor) -> Tensor:
        return streams.sum(dim=-2)


@dataclass
class MultiStreamVariant(Variant):
    """A variant of ``streams`` parallel residual streams around Pre-LN sublayers: the embedding
    enters as n copies, the streams are summed before the final LayerNorm, residual projections
    as GPT-2 (Hyper-Connections and mHC share all of it; their wirings differ)."""

    streams: int = 4
    eps: float = 1e-5

    def expand_stream(self, width: int, n_layers: int) -> nn.Module:
        return CopyIntoStreams(self.streams)

    def collapse_stream(self, width: int, n_layers: int) -> nn.Module:
        return SumStreams()

    def final_norm(self, width: int) -> nn.Module:
        return LayerNorm(width, self.eps)

    def init_weights(self, model: ModelView) -> None:
        scale_residual_projections(model, gpt2_residual_std(model.depth))
