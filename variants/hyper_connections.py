"""Hyper-Connections (Zhu et al. 2025, "Hyper-Connections", ICLR; arXiv 2409.19606).

The residual stream widens into n parallel streams H ∈ R^{n×d}. Each sublayer k (attention and
MLP count separately) reads a mix of the streams and writes its output back into every stream:

    h_in = A_mᵀ H                        width connection (which streams feed the sublayer)
    H'   = A_rᵀ H + Bᵀ T(h_in)           residual mixing, and depth connection (who gets T)
    T(h) = F(LN h)                       the Pre-LN sublayer (attention F, or MLP G)

Static (SHC): A_m, A_r, B are learned matrices, initialised as Pre-LN spread over n streams:
A_m = e_{k mod n}, A_r = I, B = 1. Dynamic (DHC, the paper's default): each also gets an
input-dependent term from the normalized streams H̄ = LN(H):

    A_m(H) = A_m + s_α · tanh(H̄ W_m)
    A_r(H) = A_r + s_α · tanh(H̄ W_r)
    B(H)   = B   + s_β · tanh(H̄ W_β)

with W = 0 and s_α = s_β = 0.01 at init. The embedding enters as n copies, the streams are summed
before the final LN. With n = 1 and W = 0 this is exactly Pre-LN (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn import functional as F

from variants.base import (
    Recipe,
    Sublayer,
    Wiring,
)
from variants.functions import apply_function
from variants.native import hyper_connection
from variants.norms import LayerNorm
from variants.registry import register
from variants.streams import MultiStreamVariant, read_and_mix, write_back


class _Connection(torch.autograd.Function):
    """A dynamic connection's reads, A_mᵀH, A_rᵀH and B, from (tokens, n, d) streams and the
    connection's parameters, as one autograd node over variants.native's kernels (the dynamic
    weights, then the read-out with them): the parameters are packed into the kernel's operands
    inside forward, where autograd records nothing, and the streams' two gradients are summed
    by the weights' backward kernel, so none of the ~20 autograd nodes of packing, reshaping
    and summing runs (docs/performance.md, "HC's connection as one autograd node"). Used only
    where both kernels run; elsewhere HyperConnection.forward runs the same formula as PyTorch
    ops."""

    @staticmethod
    def forward(
        streams: Tensor, gain: Tensor, bias: Tensor, read_weight: Tensor, mix_weight: Tensor,
        write_weight: Tensor, read: Tensor, mix: Tensor, write: Tensor, alpha: Tensor,
        beta: Tensor, eps: float,
    ) -> tuple[Tensor, ...]:  # fmt: skip
        tokens, n, width = streams.shape
        weight = torch.cat([read_weight[None], mix_weight.T, write_weight[None]])  # (n + 2, d)
        offset = torch.cat([read[:, None], mix, write[:, None]], dim=1)  # (n, n + 2)
        scale = torch.cat([alpha.expand(n + 1), beta[None]])
        rows = streams.view(tokens * n, width)
        weights, write_weights, *kept = hyper_connection.forward(
            rows, gain, bias, weight, offset, scale, eps
        )
        weights = weights.view(tokens, n, n + 1)
        branch_input, mixed = hyper_connection.read_out(weights, streams)
        return branch_input, mixed, write_weights.view(tokens, n), weights, weight, scale, *kept

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        ctx.mark_non_differentiable(*output[3:])
        # An unused output's gradient arrives as None, not as zeros made for it (six kept
        # outputs would each get a zero-filled tensor on every backward).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], inputs[1], inputs[2], *output[3:])

    @staticmethod
    @once_differentiable  # hand-written backward kernels: no double backward through them
    def backward(
        ctx: FunctionCtx, grad_input: Tensor | None, grad_mixed: Tensor | None,
        grad_write: Tensor | None, *_kept: Tensor,
    ) -> tuple:  # fmt: skip
        streams, gain, bias, weights, weight, scale, *kept = ctx.saved_tensors
        tokens, n, width = streams.shape
        grad_input = streams.new_zeros(tokens, width) if grad_input is None else grad_input
        grad_mixed = torch.zeros_like(streams) if grad_mixed is None else grad_mixed
        grad_write = streams.new_zeros(tokens, n) if grad_write is None else grad_write
        grad_weights, grad_streams = hyper_connection.read_out_backward(
            weights, streams, grad_input.contiguous(), grad_mixed.contiguous()
        )
        _, gain_grad, bias_grad, weight_grad, offset_grad, scale_grad = hyper_connection.backward(
            grad_weights.view(tokens * n, n + 1), grad_write.reshape(tokens * n),
            streams.view(tokens * n, width), gain, bias, weight, scale, *kept, n,
            onto=grad_streams.view(tokens * n, width),
        )  # fmt: skip
        return (
            grad_streams, gain_grad, bias_grad,
            weight_grad[0], weight_grad[1 : n + 1].T, weight_grad[n + 1],  # W_m, W_r, W_β
            offset_grad[:, 0], offset_grad[:, 1 : n + 1], offset_grad[:, n + 1],  # A_m, A_r, B
            scale_grad[: n + 1].sum(), scale_grad[n + 1],  # s_α, s_β
            None,
        )  # fmt: skip


class HyperConnection(nn.Module):
    """One sublayer's width and depth connections over n streams: (..., n, d) → (..., n, d)."""

    def __init__(self, width: int, streams: int, index: int, dynamic: bool, eps: float) -> None:
        super().__init__()
        self.read = nn.Parameter(torch.eye(streams)[index % streams])  # A_m = e_{k mod n}
        self.mix = nn.Parameter(torch.eye(streams))  # A_r = I
        self.write = nn.Parameter(torch.ones(streams))  # B = 1
        self.dynamic = dynamic
        if dynamic:
            self.norm = LayerNorm(width, eps)
            self.read_weight = nn.Parameter(torch.zeros(width))  # W_m
            self.mix_weight = nn.Parameter(torch.zeros(width, streams))  # W_r
            self.write_weight = nn.Parameter(torch.zeros(width))  # W_β
            self.alpha = nn.Parameter(torch.tensor(0.01))  # s_α
            self.beta = nn.Parameter(torch.tensor(0.01))  # s_β

    def connection_weights(self, streams: Tensor) -> tuple[Tensor, Tensor]:
        """[A_m | A_r] (..., n, n + 1) and B (..., n) for these streams: A_m and A_r side by
        side, so that one GEMM reads the sublayer's input and the mixed streams at once. Where
        autograd records nothing (the diagnostics), by the kernels where they run."""
        static = torch.cat([self.read[:, None], self.mix], dim=1)
        if not self.dynamic:
            return static, self.write
        if not torch.is_grad_enabled() and (by_kernels := self._by_kernels(streams)) is not None:
            return by_kernels[3], by_kernels[2]
        # W_m, W_r, W_β in one GEMM, laid out as rows: with its 1 + n + 1 = 6 outputs as
        # columns, CPU matmul and its weight gradient ran 2.2× slower (measured).
        weights = torch.cat([self.read_weight[None], self.mix_weight.T, self.write_weight[None]], 0)
        dynamic = torch.tanh(F.linear(self.norm(streams), weights))
        read_and_mix = static + self.alpha * dynamic[..., :-1]
        return read_and_mix, self.write + self.beta * dynamic[..., -1]

    def connections(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A_m (..., n), A_r (..., n, n) and B (..., n) for these streams."""
        read_and_mix, write = self.connection_weights(streams)
        return read_and_mix[..., 0], read_and_mix[..., 1:], write

    def stream_mixing(self, streams: Tensor) -> Tensor:
        """M of x' = M·x: A_rᵀ, one per token (see variants.streams.MixesStreams)."""
        mix = self.connections(streams)[1].transpose(-1, -2)
        return mix.expand(*streams.shape[:-2], *mix.shape[-2:])

    def forward(self, streams: Tensor, branch: Sublayer) -> Tensor:
        by_kernels = self._by_kernels(streams)
        if by_kernels is None:
            weights, write = self.connection_weights(streams)
            branch_input, mixed = read_and_mix(weights, streams)  # A_mᵀ H, A_rᵀ H
        else:
            branch_input, mixed, write = by_kernels[:3]
        return write_back(mixed, write, branch(branch_input))  # + Bᵀ T(h)

    def _by_kernels(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """A_mᵀ H, A_rᵀ H, B and [A_m | A_r] of a dynamic connection by one _Connection node
        (the last not differentiable), where its kernels run these tensors; else None."""
        if not self.dynamic or streams.device.type != "cpu":
            return None
        lead, (n, width) = streams.shape[:-2], streams.shape[-2:]
        parameters = (
            self.norm.weight, self.norm.bias, self.read_weight, self.mix_weight,
            self.write_weight, self.read, self.mix, self.write, self.alpha, self.beta,
        )  # fmt: skip
        if not hyper_connection.available(*parameters):  # before a copy that would go unused
            return None
        streams = streams.contiguous()  # the first block's streams are n views of one copy
        if not hyper_connection.available(streams, *parameters):
            return None
        branch_input, mixed, write, weights = apply_function(
            _Connection, streams.view(math.prod(lead), n, width), *parameters, self.norm.eps
        )[:4]
        return (branch_input.view(*lead, width), mixed.view(*lead, n, width),
                write.view(*lead, n), weights.view(*lead, n, n + 1))  # fmt: skip


class HyperConnectionWiring(nn.Module):
    def __init__(self, width: int, streams: int, layer: int, dynamic: bool, eps: float) -> None:
        super().__init__()
        self.norm_attn = LayerNorm(width, eps)
        self.norm_mlp = LayerNorm(width, eps)
        self.attn_connection = HyperConnection(width, streams, 2 * layer, dynamic, eps)
        self.mlp_connection = HyperConnection(width, streams, 2 * layer + 1, dynamic, eps)

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = self.attn_connection(x, lambda t: attn(self.norm_attn(t)))
        return self.mlp_connection(h, lambda t: mlp(self.norm_mlp(t)))


@register("hc")
@dataclass
class HyperConnections(MultiStreamVariant):
    formula = "n streams H; h = A_mᵀH; H' = A_rᵀH + Bᵀ F(LN h); dynamic: A, B += s·tanh(LN(H) W)"
    dynamic: bool = True

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        if self.streams < 1:
            raise ValueError(f"variant.streams: must be at least 1 (got {self.streams})")
        return HyperConnectionWiring(width, self.streams, layer, self.dynamic, self.eps)

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Zhu et al. 2025: the static and dynamic connections and their init are the "
                "variant: nothing beyond the wiring"
            )
        )
