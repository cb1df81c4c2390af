"""Hyper-Connections' kernels in hyper_connection.c, forward and backward, used where they run:
the read-out A_mᵀH, A_rᵀH that HC and mHC share (variants/streams.py; per token, where CPU
``bmm`` runs one tiny GEMM per token), and HC's dynamic connection weights
(variants/hyper_connections.py):

    t = tanh(LayerNorm(x) Wᵀ),   out = offset[stream] + scale · t

for every stream x of every token (a row of width d), W the m = n + 2 projections, offset the
static weights and scale (s_α, …, s_α, s_β). At 1,024 tokens, n = 4 and d = 64 PyTorch runs this
as ~16 ops forward and ~30 backward, each a dispatch and a pass over the 4,096 rows, and its
(4096 × 64) by (64 × 6) product is too narrow for the GEMM library to run well; the kernel does
a row's norm, products, tanh and weights while the row is in cache (docs/performance.md). The
same formula in another order of additions: results agree with PyTorch's ops to float rounding,
not bit for bit (tests/variants/test_native_hyper_connection.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import Tensor

from variants.native import (
    checked,
    declared,
    kernels_run,
    library,
    note_used,
    pointer,
    runs_natively,
)


def _kernels(dtype: torch.dtype) -> tuple[Callable[..., int], Callable[..., int]] | None:
    """The forward and backward kernels for this dtype, their C signatures declared."""
    kernels = library("hyper_connection")
    if kernels is None:
        return None
    note_used("hyper_connection")  # looked up to run, or by available() right before a run
    pointers, sizes = [ctypes.c_void_p], [ctypes.c_int64] * 4  # rows, n, d, m
    forward_types = pointers * 6 + sizes + [ctypes.c_double] + pointers * 5
    forward = declared(kernels, "dynamic_weights", dtype, forward_types, ctypes.c_int)
    backward_types = pointers * 5 + sizes + pointers * 7 + [ctypes.c_int]  # ..., accumulate
    backward = declared(kernels, "dynamic_weights_backward", dtype, backward_types, ctypes.c_int)
    return forward, backward


def available(*tensors: Tensor) -> bool:
    """Whether the kernel runs these tensors: it loads, they are plain contiguous CPU tensors
    of one float dtype outside torch.compile (``runs_natively``), no torch.func transform is
    running (even on unbatched tensors: the Function has no vmap rule), and autocast is off
    (PyTorch's path would run the projection in autocast's dtype)."""
    return not torch.is_autocast_enabled("cpu") and kernels_run(_kernels, *tensors)


def forward(
    x: Tensor, gain: Tensor, bias: Tensor, weight: Tensor, offset: Tensor, scale: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """out's first m - 1 columns (rows, m - 1) and its last (rows,) for (rows, d) x, (d,) gain
    and bias, (m, d) weight, (n, m) offset and (m,) scale (as ``available`` requires; rows a
    multiple of n), and for ``backward``: t (rows, m), each row's mean and 1/sqrt(var + eps)."""
    kernels = _kernels(x.dtype)
    assert kernels is not None, "call only where available() holds"
    (rows, d), (n, m) = x.shape, offset.shape
    first, last = x.new_empty(rows, m - 1), x.new_empty(rows)
    tanh, mean, rstd = x.new_empty(rows, m), x.new_empty(rows), x.new_empty(rows)
    inputs = map(pointer, (x, gain, bias, weight, offset, scale))
    outputs = map(pointer, (first, last, tanh, mean, rstd))
    checked(kernels[0](*inputs, rows, n, d, m, eps, *outputs), "hyper_connection")
    return first, last, tanh, mean, rstd


def backward(
    grad_first: Tensor, grad_last: Tensor, x: Tensor, gain: Tensor, bias: Tensor,
    weight: Tensor, scale: Tensor, tanh: Tensor, mean: Tensor, rstd: Tensor, streams: int,
    onto: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of x, gain, bias, weight, offset and scale, given those of ``forward``'s
    two outputs and what it kept (the parameters' sums over rows added in float64). With
    ``onto`` (a contiguous tensor of x's shape and dtype) x's gradient is added to it in place
    and it is returned as x's: another gradient of the same rows summed without a pass of its
    own."""
    kernels = _kernels(x.dtype)
    assert kernels is not None, "call only where available() holds"
    (rows, d), m = x.shape, weight.shape[0]
    grad_first, grad_last = grad_first.contiguous(), grad_last.contiguous()  # kept alive here
    if onto is not None:
        assert onto.shape == x.shape and onto.dtype == x.dtype and onto.is_contiguous()
    grad_x = torch.empty_like(x) if onto is None else onto
    sums = torch.zeros((2 + m) * d + streams * m + m, dtype=torch.float64)
    inputs = map(pointer, (x, gain, bias, weight, scale))
    saved = map(pointer, (tanh, mean, rstd, grad_first, grad_last))
    accumulate = int(onto is not None)
    checked(kernels[1](*inputs, rows, streams, d, m, *saved, pointer(grad_x), pointer(sums),
                        accumulate), "hyper_connection")  # fmt: skip
    gain_bias_weight, offset, scale_grad = sums.to(x.dtype).split([(2 + m) * d, streams * m, m])
    gain_grad, bias_grad, weight_grad = gain_bias_weight.view(2 + m, d).split([1, 1, m])
    return (grad_x, gain_grad.view(d), bias_grad.view(d), weight_grad,
            offset.view(streams, m), scale_grad)  # fmt: skip


def _stream_kernels(dtype: torch.dtype) -> tuple[Callable[..., None], ...]:
    """The read-out's forward and backward and the write-back's backward for this dtype."""
    kernels = library("hyper_connection")
    assert kernels is not None, "call only where read_out_available() holds"
    note_used("hyper_connection")
    pointers, sizes = [ctypes.c_void_p], [ctypes.c_int64] * 3  # tokens, n, d
    forward = declared(kernels, "read_out", dtype, pointers * 2 + sizes + pointers * 2, None)
    backward_types = pointers * 4 + sizes + pointers * 2
    backward = declared(kernels, "read_out_backward", dtype, backward_types, None)
    write_back_types = pointers * 3 + sizes + pointers * 2
    write_back = declared(kernels, "write_back_backward", dtype, write_back_types, None)
    return forward, backward, write_back


def read_out_available(*tensors: Tensor) -> bool:
    """Whether ``read_out`` and ``read_out_backward`` run these tensors natively."""
    return runs_natively(*tensors) and library("hyper_connection") is not None


def read_out(weights: Tensor, streams: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_s weights[:, s, t] · streams[:, s] for (tokens, n, n + 1) weights and (tokens, n, d)
    streams: t = 0 as (tokens, d), t = 1..n as (tokens, n, d)."""
    tokens, n, d = streams.shape
    read, mixed = streams.new_empty(tokens, d), torch.empty_like(streams)
    _stream_kernels(streams.dtype)[0](
        pointer(weights), pointer(streams), tokens, n, d, pointer(read), pointer(mixed)
    )
    return read, mixed


def read_out_backward(
    weights: Tensor, streams: Tensor, grad_read: Tensor, grad_mixed: Tensor
) -> tuple[Tensor, Tensor]:
    """The gradients of ``read_out``'s weights and streams from those of its two outputs."""
    tokens, n, d = streams.shape
    grad_weights, grad_streams = torch.empty_like(weights), torch.empty_like(streams)
    _stream_kernels(streams.dtype)[1](
        *map(pointer, (weights, streams, grad_read, grad_mixed)), tokens, n, d,
        pointer(grad_weights), pointer(grad_streams),
    )  # fmt: skip
    return grad_weights, grad_streams


def write_back_backward(grad: Tensor, write: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of write (tokens, n) and output (tokens, d) in streams + write ⊗ output,
    from the result's gradient (tokens, n, d) (as ``read_out_available`` requires)."""
    tokens, n, d = grad.shape
    grad_write, grad_output = torch.empty_like(write), torch.empty_like(output)
    _stream_kernels(grad.dtype)[2](
        *map(pointer, (grad, write, output)), tokens, n, d,
        pointer(grad_write), pointer(grad_output),
    )  # fmt: skip
    return grad_write, grad_output
