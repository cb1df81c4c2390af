"""A residual stream of n parallel copies, for variants whose blocks read and write several
streams (Hyper-Connections and their manifold-constrained form).

The stream is a tensor (batch, seq, n, width). The embedding enters it as n copies of itself and
leaves it as the sum of the n streams (Zhu et al. 2025, "Hyper-Connections", §2: "the output of
the final layer is obtained by summing the hidden vectors of all streams").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from variants.base import ModelView, Variant, gpt2_residual_std, scale_residual_projections
from variants.functions import apply_function, functorch_transforms_active
from variants.native import hyper_connection
from variants.norms import LayerNorm


@runtime_checkable
class MixesStreams(Protocol):
    """A module of a multi-stream wiring whose update is x' = M·x + (sublayer terms), x the n
    streams: it reports M (..., n, n) for given streams. Diagnostics multiply the M of every
    sublayer over depth: the mHC paper's Amax gain (suite/run/diagnostics.py)."""

    def stream_mixing(self, streams: Tensor) -> Tensor: ...


class _ReadAndMix(torch.autograd.Function):
    """weights[b]ᵀ · streams[b] for (B, n, 1 + n) weights and (B, n, d) streams, as one batched
    GEMM each way; row 0 (the sublayer's input) and rows 1..n (the mixed streams) come back as
    two outputs, so that their gradients arrive apart and are laid side by side in one copy
    (slicing one output made autograd zero-fill and add a (B, 1 + n, d) tensor twice). CPU
    ``bmm`` of these small per-token matrices is fast or slow by which operand is a transposed
    view (measured at 1024 tokens, n = 4, d = 64, one thread): the weights' gradient as streams
    times the gradient's transposed view took 170 µs, against 528 µs as the gradient times a
    contiguous copy of the streams transposed (and ~640 µs times their transposed view, what
    autograd's own backward does); the forward with the weights' transposed view 155 µs, with a
    contiguous copy of it 188 µs."""

    generate_vmap_rule = True  # packed runs (train.pack_lr) vmap the model over members

    @staticmethod
    def forward(weights: Tensor, streams: Tensor) -> tuple[Tensor, Tensor]:
        if hyper_connection.read_out_available(weights, streams):
            return hyper_connection.read_out(weights, streams)
        out = torch.bmm(weights.transpose(1, 2), streams)
        # The sublayer saves its input for backward: a copy of row 0, so that it does not keep
        # the whole (B, 1 + n, d) result alive.
        return out[:, 0].clone(), out[:, 1:]

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Tensor, Tensor], output: object) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_read: Tensor | None, grad_mixed: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        weights, streams = ctx.saved_tensors
        if grad_read is None:
            grad_read = streams.new_zeros(streams.shape[0], streams.shape[2])
        if grad_mixed is None:
            grad_mixed = torch.zeros_like(streams)
        # The kernel's gradients are not differentiable again: under create_graph (grad mode
        # on here) the batched products below run, which autograd can differentiate.
        if not torch.is_grad_enabled():
            grad_read, grad_mixed = grad_read.contiguous(), grad_mixed.contiguous()
            if hyper_connection.read_out_available(weights, streams, grad_read, grad_mixed):
                return hyper_connection.read_out_backward(weights, streams, grad_read, grad_mixed)
        # Out of place (one copy), so that vmap may batch the gradient and not the streams.
        grad = torch.cat([grad_read.unsqueeze(1), grad_mixed], dim=1)
        grad_weights = grad_streams = None
        if ctx.needs_input_grad[0]:  # d weights[s, t] = Σ_d streams[s] · grad[t]
            grad_weights = torch.bmm(streams, grad.transpose(1, 2))
        if ctx.needs_input_grad[1]:  # d streams[s] = Σ_t weights[s, t] · grad[t]
            grad_streams = torch.bmm(weights.contiguous(), grad)
        return grad_weights, grad_streams


def read_and_mix(weights: Tensor, streams: Tensor) -> tuple[Tensor, Tensor]:
    """The two read-outs of a Hyper-Connection from (..., n, d) streams and (..., n, 1 + n)
    weights (one set per token, or one (n, 1 + n) for all): Σ_s weights[s, 0] · streams[s], the
    sublayer's input (..., d), and Σ_s weights[s, t] · streams[s] for t = 1..n, the mixed
    streams (..., n, d): the "A_mᵀ H" and "A_rᵀ H" of the papers, in one GEMM."""
    lead, (n, width) = streams.shape[:-2], streams.shape[-2:]
    weights = weights.to(streams.dtype).expand(*lead, n, n + 1)
    streams = streams.contiguous()  # the first block's streams are n views of one copy
    with torch.autocast(streams.device.type, enabled=False):  # the stream's own precision
        read, mixed = apply_function(
            _ReadAndMix, weights.reshape(-1, n, n + 1), streams.view(-1, n, width)
        )
    return read.view(*lead, width), mixed.view(*lead, n, width)


class _WriteBack(torch.autograd.Function):
    """streams + write ⊗ output for (B, n, d) streams, (B, n) weights and a (B, d) output:
    PyTorch's addcmul forward (the same bits), variants.native's kernel backward, which reads
    the (B, n, d) gradient once where addcmul's backward multiplies it twice into new tensors
    and sums each (docs/performance.md, "HC's write-back backward")."""

    @staticmethod
    def forward(streams: Tensor, write: Tensor, output: Tensor) -> Tensor:
        return torch.addcmul(streams, write.unsqueeze(-1), output.unsqueeze(-2))

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        write, output = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: autograd's ops, differentiable again
            grad_write = (grad * output.unsqueeze(-2)).sum(-1)
            return grad, grad_write, (grad * write.unsqueeze(-1)).sum(-2)
        grad_write, grad_output = hyper_connection.write_back_backward(
            grad.contiguous(), write, output
        )
        return grad, grad_write, grad_output


def write_back(streams: Tensor, write: Tensor, output: Tensor) -> Tensor:
    """streams[s] + write[s] · output for every stream s: a sublayer's (..., d) output written
    into (..., n, d) streams with (..., n) weights (one set per token, or one (n,) for all): the
    "+ Bᵀ T(h)" of Hyper-Connections, "+ H_postᵀ F(...)" of mHC."""
    lead, (n, width) = streams.shape[:-2], streams.shape[-2:]
    per_token = write.shape == (*lead, n) and output.shape == (*lead, width)
    if (
        per_token
        and torch.is_grad_enabled()  # the kernel is the backward's; addcmul alone otherwise
        and not functorch_transforms_active()  # no vmap rule (packed runs)
        and hyper_connection.read_out_available(streams, write, output)
    ):
        result = apply_function(
            _WriteBack, streams.view(-1, n, width), write.view(-1, n), output.view(-1, width)
        )
        return result.view(streams.shape)
    return torch.addcmul(streams, write.unsqueeze(-1), output.unsqueeze(-2))


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
