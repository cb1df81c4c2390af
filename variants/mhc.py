"""Manifold-Constrained Hyper-Connections, mHC (Xie et al. 2025, DeepSeek-AI; arXiv 2512.24880).

Hyper-Connections (variants/hyper_connections.py) with n streams x ∈ R^{n×C}, whose mappings
are projected onto manifolds that keep the identity mapping of a residual stream:

    x_{l+1} = H_res x_l + H_postᵀ F(H_pre x_l)        F = the Pre-LN sublayer, F(LN h)

    x' = RMSNorm(vec(x_l))                            the n·C streams flattened, normalized
    H_pre  = σ(α_pre · x' φ_pre + b_pre)              1×n, non-negative
    H_post = 2σ(α_post · x' φ_post + b_post)          1×n, in (0, 2)
    H_res  = Sinkhorn-Knopp(α_res · mat(x' φ_res) + b_res)   n×n, doubly stochastic

Sinkhorn-Knopp exponentiates the logits and alternately normalizes columns and rows, 20
iterations, in fp32. A doubly stochastic H_res cannot amplify the stream (its row and column sums
are 1), so the product over layers stays bounded where plain HC's grows.

Init: the gating scales α = 0.01 (the paper), φ = 0 (as HC's dynamic weights). The paper does
not state the biases' initial values; chosen here so that mHC starts as Pre-LN spread over n
streams, as HC does: b_pre = 0 (every stream read at σ(0) = ½; the sublayer's LayerNorm removes
the scale), b_post = 0 (H_post = 1: every stream gets the sublayer's output, as HC's B = 1), and
b_res = ``res_diagonal_logit`` · I, close to the identity: with 4 (the default) and n = 4,
H_res starts with e⁴/(e⁴ + 3) ≈ 0.95 on its diagonal. Residual projections as GPT-2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
from variants.native import mhc_mappings
from variants.native.sinkhorn import backward_from_input, backward_from_sums, normalize_rounds
from variants.norms import LayerNorm, RMSNorm, inverse_rms
from variants.registry import register
from variants.streams import MultiStreamVariant, read_and_mix, write_back

if TYPE_CHECKING:
    from torch._functorch.autograd_function import VmapInfo


class _LinearRounds(torch.autograd.Function):
    """Sinkhorn's rounds after the first (every column divided by its sum, then every row by
    its), on (n, n, tokens) matrices, and their exact gradient: back through every normalization,
    ∂m = (∂m' − Σ_axis ∂m' ⊙ m') / s, with m rebuilt as m' ⊙ s. Autograd over the same loop
    kept every iterate and ran ~4× slower. Forward and back run in variants.native's C kernel
    where it loads (bit for bit the PyTorch loop beside it); its backward recomputes the sums
    from the rounds' input (saved anyway, by the softmax before it), where the loop saves them
    (2 · rounds · n a token) with the result."""

    @staticmethod
    def forward(initial: Tensor, rounds: int) -> tuple[Tensor, Tensor]:
        matrix = initial.clone()
        return matrix, normalize_rounds(matrix, rounds)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Tensor, int], output: tuple) -> None:
        (initial, ctx.rounds), (matrix, sums) = inputs, output
        ctx.mark_non_differentiable(sums)
        ctx.save_for_backward(*((initial,) if sums.numel() == 0 else (matrix, sums)))

    @staticmethod
    @once_differentiable  # a hand-written backward: no double backward through it
    def backward(ctx: FunctionCtx, grad: Tensor, _sums: Tensor) -> tuple[Tensor, None]:
        # An own copy, in place from here, tokens last: the gradient arrives in the layout of
        # the caller's (tokens-first) view.
        grad = grad.clone(memory_format=torch.contiguous_format)
        if ctx.rounds == 0:
            return grad, None
        saved = ctx.saved_tensors
        if len(saved) == 1:
            backward_from_input(grad, saved[0], ctx.rounds)
        else:
            backward_from_sums(grad, *saved)
        return grad, None

    @staticmethod
    def vmap(
        info: VmapInfo, in_dims: tuple[int | None, None], initial: Tensor, rounds: int
    ) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
        """Packed runs (train.pack_lr) vmap the model over members. Each token's matrix is
        normalized on its own, so a member's tokens are just more tokens: folded into the last
        dimension, all members run as one call of this Function on plain tensors (natively,
        where variants.native loads; a generated rule would run every op of the loop batched)."""
        members_last = initial.movedim(in_dims[0], -1)  # (n, n, tokens, members)
        outputs = apply_function(_LinearRounds, members_last.flatten(-2), rounds)
        return tuple(out.unflatten(-1, (-1, info.batch_size)) for out in outputs), (3, 3)


class _Mappings(torch.autograd.Function):
    """mHC's mappings from its projection, [H_pre | H_resᵀ] and H_post, as one autograd node
    over variants.native's kernel (mhc_mappings.c): the scales and biases are packed into its
    operands inside forward, where autograd records nothing, and its backward recomputes the
    mappings block by block from what it was given instead of saving them. Used only where
    the kernel runs; elsewhere ManifoldHyperConnection runs the same formula as PyTorch ops."""

    @staticmethod
    def forward(
        raw: Tensor, inverse: Tensor, alpha_pre: Tensor, alpha_post: Tensor, alpha_res: Tensor,
        b_pre: Tensor, b_post: Tensor, b_res: Tensor, rounds: int,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        alpha, bias = _packed(alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
        return mhc_mappings.forward(raw, inverse, alpha, bias, b_pre.shape[0], rounds)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        ctx.set_materialize_grads(False)  # an unused output's gradient: None, not zeros
        ctx.rounds = inputs[-1]
        ctx.save_for_backward(*inputs[:-1])

    @staticmethod
    @once_differentiable  # a hand-written backward kernel: no double backward through it
    def backward(ctx: FunctionCtx, grad_weights: Tensor | None, grad_post: Tensor | None) -> tuple:
        raw, inverse, *scales_and_biases = ctx.saved_tensors
        n = scales_and_biases[3].shape[0]
        alpha, bias = _packed(*scales_and_biases)
        grad_raw, grad_inverse, grad_alpha, grad_bias = mhc_mappings.backward(
            grad_weights, grad_post, raw, inverse, alpha, bias, n, ctx.rounds
        )
        b_pre, b_post, b_res = grad_bias.split([n, n, n * n])
        return (grad_raw, grad_inverse, *grad_alpha.unbind(), b_pre, b_post,
                b_res.view(n, n), None)  # fmt: skip


def _packed(
    alpha_pre: Tensor, alpha_post: Tensor, alpha_res: Tensor, b_pre: Tensor, b_post: Tensor,
    b_res: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The kernel's operands: (α_pre, α_post, α_res) and (b_pre, b_post, vec b_res)."""
    alpha = torch.stack([alpha_pre, alpha_post, alpha_res])
    return alpha, torch.cat([b_pre, b_post, b_res.flatten()])


def sinkhorn_knopp(logits: Tensor, iterations: int = 20) -> Tensor:
    """exp(logits) made doubly stochastic by alternate column and row normalization, in fp32
    (float64 stays float64, for the gradient checks): (..., n, n) logits give (..., n, n).

    The first column and row normalizations run in the log domain, as a log-softmax over each
    column and a softmax over each row: exponentiating first, a row whose logits sit ~90 below
    the others' in every column summed to a subnormal (zero, with the flushed denormals training
    runs under), and the division by it made mHC's gradient NaN from a finite loss at high LR
    (the cells of its reference arm that "diverged" with a non-finite gradient). After them
    every sum lies in [1/n, n] (a column-stochastic matrix has an entry ≥ 1/n per column and row
    sums ≤ n, and the other way round), so the other rounds are divisions (``_LinearRounds``).
    Tokens last, because each normalization reduces over n = 4 entries: a reduction over a last
    dimension of 4 ran ~6× slower on CPU than over a leading one."""
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp: iterations must be at least 1 (got {iterations})")
    lead, shape = logits.shape[:-2], logits.shape[-2:]
    precision = torch.float64 if logits.dtype == torch.float64 else torch.float32
    tokens_last = logits.to(precision).reshape(-1, *shape).permute(1, 2, 0).contiguous()
    first_round = torch.softmax(torch.log_softmax(tokens_last, dim=0), dim=1)
    matrix = apply_function(_LinearRounds, first_round, iterations - 1)[0]
    return matrix.permute(2, 0, 1).reshape(*lead, *shape)


class ManifoldHyperConnection(nn.Module):
    """One sublayer's mHC over n streams: (..., n, C) → (..., n, C)."""

    def __init__(
        self, width: int, streams: int, eps: float, res_diagonal_logit: float, iterations: int
    ) -> None:
        super().__init__()
        if iterations < 1:  # the kernel runs iterations - 1 linear rounds after the first
            raise ValueError(f"mHC: Sinkhorn needs at least 1 iteration (got {iterations})")
        self.streams, self.iterations = streams, iterations
        flat = streams * width
        self.norm = RMSNorm(flat, eps)  # its gain and ε; applied factored (see mappings)
        self.phi_pre = nn.Parameter(torch.zeros(flat, streams))
        self.phi_post = nn.Parameter(torch.zeros(flat, streams))
        self.phi_res = nn.Parameter(torch.zeros(flat, streams * streams))
        self.alpha_pre = nn.Parameter(torch.tensor(0.01))
        self.alpha_post = nn.Parameter(torch.tensor(0.01))
        self.alpha_res = nn.Parameter(torch.tensor(0.01))
        self.b_pre = nn.Parameter(torch.zeros(streams))
        self.b_post = nn.Parameter(torch.zeros(streams))
        self.b_res = nn.Parameter(res_diagonal_logit * torch.eye(streams))

    def mappings(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """H_pre (..., n), H_post (..., n) and H_res (..., n, n) for these streams."""
        weights, post = self.connection_weights(streams)
        return weights[..., 0], post, weights[..., 1:].transpose(-1, -2)

    def connection_weights(self, streams: Tensor) -> tuple[Tensor, Tensor]:
        """[H_pre | H_resᵀ] (..., n, n + 1), the read-out's weights, and H_post (..., n): by
        variants.native's kernel where it runs these tensors, else by PyTorch's ops."""
        n, flat = self.streams, streams.flatten(-2)
        # x' φ = RMSNorm(vec x) φ = rsqrt(mean(x²) + ε) · (vec x)(g ⊙ φ): the per-token scale
        # factored out of the GEMM, so that the normalized n·C vector is never materialized.
        # Through F.linear, so that the weight's gradient comes out as rows (2n + n², n·C):
        # computed as columns, CPU matmul ran it 1.4× slower (measured, as HC's projection).
        phi = torch.cat([self.phi_pre, self.phi_post, self.phi_res], dim=1).T
        raw = F.linear(flat, phi * self.norm.weight)
        inverse = inverse_rms(flat, self.norm.eps)
        scales_and_biases = (
            self.alpha_pre,
            self.alpha_post,
            self.alpha_res,
            self.b_pre,
            self.b_post,
            self.b_res,
        )
        if mhc_mappings.available(raw, inverse, *scales_and_biases):  # CPU tensors only
            lead = raw.shape[:-1]
            weights, post = apply_function(
                _Mappings, raw.view(-1, raw.shape[-1]), inverse.view(-1),
                *scales_and_biases, self.iterations - 1,
            )  # fmt: skip
            return weights.view(*lead, n, n + 1), post.view(*lead, n)
        projected = raw * inverse
        pre = torch.sigmoid(self.alpha_pre * projected[..., :n] + self.b_pre)
        post = 2 * torch.sigmoid(self.alpha_post * projected[..., n : 2 * n] + self.b_post)
        res_logits = self.alpha_res * projected[..., 2 * n :].unflatten(-1, (n, n))
        res = sinkhorn_knopp(res_logits + self.b_res, self.iterations).to(streams.dtype)
        return torch.cat([pre.unsqueeze(-1), res.transpose(-1, -2)], dim=-1), post

    def stream_mixing(self, streams: Tensor) -> Tensor:
        """M of x' = M·x: H_res, one per token (see variants.streams.MixesStreams)."""
        return self.mappings(streams)[2]

    def forward(self, streams: Tensor, branch: Sublayer) -> Tensor:
        weights, post = self.connection_weights(streams)
        branch_input, mixed = read_and_mix(weights, streams)  # H_pre x, H_res x
        return write_back(mixed, post, branch(branch_input))  # + H_postᵀ F(...)


class ManifoldHyperConnectionWiring(nn.Module):
    def __init__(
        self, width: int, streams: int, eps: float, res_diagonal_logit: float, iterations: int
    ) -> None:
        super().__init__()
        self.norm_attn = LayerNorm(width, eps)
        self.norm_mlp = LayerNorm(width, eps)
        connection = (width, streams, eps, res_diagonal_logit, iterations)
        self.attn_connection = ManifoldHyperConnection(*connection)
        self.mlp_connection = ManifoldHyperConnection(*connection)

    def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
        h = self.attn_connection(x, lambda t: attn(self.norm_attn(t)))
        return self.mlp_connection(h, lambda t: mlp(self.norm_mlp(t)))


@register("mhc")
@dataclass
class ManifoldConstrainedHyperConnections(MultiStreamVariant):
    formula = "x' = H_res x + H_postᵀ F(LN(H_pre x)); H_res doubly stochastic (Sinkhorn), H ≥ 0"
    res_diagonal_logit: float = 4.0
    sinkhorn_iterations: int = 20

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        if self.streams < 1 or self.sinkhorn_iterations < 1:
            raise ValueError(
                "variant.streams and variant.sinkhorn_iterations: must be at least 1 "
                f"(got {self.streams}, {self.sinkhorn_iterations})"
            )
        return ManifoldHyperConnectionWiring(
            width, self.streams, self.eps, self.res_diagonal_logit, self.sinkhorn_iterations
        )

    def authors_recipe(self) -> Recipe:
        return Recipe(
            source=(
                "Xie et al. 2025: the Sinkhorn projection and its fp32 are the variant (the "
                "paper's other changes are kernels and memory, not training): nothing beyond "
                "the wiring"
            )
        )
