"""Attention Residuals' depth attention (variants/attnres.py, ``_AttendOverDepth``) by the C
kernel of depth_attention.c where it runs: h = Σ_i softmax_i(s_i · v_i·u) v_i over the slots
v_i, s_i their inverse RMS, and its backward. PyTorch's ops visit every slot three to four
times in each direction, each a dispatch (~50 ops a read at 12 slots, full AttnRes reads up to
2N + 1); the kernel reads a block of tokens' rows twice each way while they sit in cache. The
same formula in another order of additions (and exp of its own): agrees with PyTorch's ops to
float rounding, not bit for bit (tests/variants/test_native_depth_attention.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from variants.native import checked, declared, kernels_run, library, note_used, pointer


def _kernels(dtype: torch.dtype) -> tuple[Callable[..., int], Callable[..., int]] | None:
    kernels = library("depth_attention")
    if kernels is None:
        return None
    note_used("depth_attention")  # looked up to run, or by available() right before a run
    pointers, sizes = [ctypes.c_void_p], [ctypes.c_int64] * 3  # slots, tokens, d
    forward_types = pointers + sizes + pointers + [ctypes.c_double] + pointers * 4
    forward = declared(kernels, "depth_attention", dtype, forward_types, ctypes.c_int)
    backward_types = pointers * 2 + sizes + pointers * 6
    backward = declared(kernels, "depth_attention_backward", dtype, backward_types, ctypes.c_int)
    return forward, backward


def available(*tensors: Tensor) -> bool:
    """Whether the kernel runs these tensors: it loads, they are plain contiguous CPU tensors
    of one float dtype outside torch.compile (``runs_natively``), and no torch.func transform
    is running (packed runs: PyTorch's path batches)."""
    return kernels_run(_kernels, *tensors)


def runs(key_query: Tensor, values: Sequence[Tensor], *others: Tensor) -> bool:
    """Whether the kernel runs a read of these slots (with ``others``, the backward's tensors):
    ``available`` for all of them, the slots of one shape (..., d) and the key-query vector
    (d,): the kernel reads every slot as the first one's tokens, where PyTorch's path raises."""
    shape = values[0].shape
    return (
        key_query.shape == shape[-1:]
        and all(value.shape == shape for value in values)
        and available(key_query, *others, *values)
    )


def _pointers(tensors: Sequence[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(tensor.data_ptr() for tensor in tensors))


def forward(
    key_query: Tensor, eps: float, values: Sequence[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h (..., d), and for the backward the weights (slots, ..., 1), scales and projections
    (slots, ...), from the slots (each (..., d)), as ``available`` requires."""
    kernels = _kernels(key_query.dtype)
    assert kernels is not None, "call only where available() holds"
    lead, d, slots = values[0].shape[:-1], values[0].shape[-1], len(values)
    tokens = values[0].numel() // d if d else 0
    read = torch.empty_like(values[0])
    weights, scale, projected = (values[0].new_empty(slots, *lead) for _ in range(3))
    checked(kernels[0](
        _pointers(values), slots, tokens, d, pointer(key_query), eps, pointer(read),
        pointer(weights), pointer(scale), pointer(projected),
    ), "depth_attention")  # fmt: skip
    return read, weights.unsqueeze(-1), scale, projected


def backward(
    grad_read: Tensor, key_query: Tensor, weights: Tensor, scale: Tensor, projected: Tensor,
    values: Sequence[Tensor], needs_key_query: bool,
) -> tuple[Tensor | None, list[Tensor]]:  # fmt: skip
    """The gradients of the key-query vector (None unless asked for; summed over tokens in
    float64) and of each slot, from h's (all contiguous, as ``runs`` requires)."""
    kernels = _kernels(key_query.dtype)
    assert kernels is not None, "call only where available() holds"
    d, slots = values[0].shape[-1], len(values)
    tokens = values[0].numel() // d if d else 0
    grads = [torch.empty_like(value) for value in values]
    grad_key_query = torch.zeros(d, dtype=torch.float64) if needs_key_query else None
    checked(kernels[1](
        pointer(grad_read), _pointers(values), slots, tokens, d, pointer(key_query),
        pointer(weights), pointer(scale), pointer(projected), _pointers(grads),
        None if grad_key_query is None else pointer(grad_key_query),
    ), "depth_attention")  # fmt: skip
    if grad_key_query is not None:
        grad_key_query = grad_key_query.to(key_query.dtype)
    return grad_key_query, grads
