"""mHC's mappings H_pre, H_post and H_res from its projected streams (variants/mhc.py), forward
and backward, by the C kernel of mhc_mappings.c where it runs:

    p = raw · inv                                  raw = (vec x)(g ⊙ φ), inv = 1/rms(vec x)
    H_pre = σ(α_pre p_pre + b_pre),  H_post = 2σ(α_post p_post + b_post)
    H_res = Sinkhorn-Knopp(α_res mat(p_res) + b_res)

At 1,024 tokens and n = 4 PyTorch runs this as ~20 ops forward and ~40 backward per sublayer
(slices, scales, sigmoids, Sinkhorn's layout changes and first round), each a dispatch and a
pass over (tokens, n, n) tensors; the kernel runs them over a block of tokens in cache. The
same formula with exp and log of the kernel's own: agrees with PyTorch's ops to float
rounding, not bit for bit (tests/variants/test_native_mhc_mappings.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import Tensor

from variants.native import checked, declared, kernels_run, library, note_used, pointer


def _kernels(dtype: torch.dtype) -> tuple[Callable[..., int], Callable[..., int]] | None:
    kernels = library("mhc_mappings")
    if kernels is None:
        return None
    note_used("mhc_mappings")  # looked up to run, or by available() right before a run
    pointers, sizes = [ctypes.c_void_p], [ctypes.c_int64] * 3  # n, tokens, rounds
    forward = declared(
        kernels, "mhc_mappings", dtype, pointers * 4 + sizes + pointers * 2, ctypes.c_int
    )
    backward_types = pointers * 6 + sizes + pointers * 4
    backward = declared(kernels, "mhc_mappings_backward", dtype, backward_types, ctypes.c_int)
    return forward, backward


def available(*tensors: Tensor) -> bool:
    """Whether the kernel runs these tensors: it loads, they are plain contiguous CPU tensors
    of one float dtype outside torch.compile (``runs_natively``), no torch.func transform is
    running (packed runs: PyTorch's path batches) and autocast is off."""
    return not torch.is_autocast_enabled("cpu") and kernels_run(_kernels, *tensors)


def forward(
    raw: Tensor, inv: Tensor, alpha: Tensor, bias: Tensor, n: int, rounds: int
) -> tuple[Tensor, Tensor]:
    """[H_pre | H_resᵀ] (tokens, n, n + 1) and H_post (tokens, n) from raw (tokens, 2n + n²),
    inv (tokens,), alpha (α_pre, α_post, α_res) and bias (b_pre, b_post, vec b_res), with
    ``rounds`` linear Sinkhorn rounds after the first (as ``available`` requires)."""
    kernels = _kernels(raw.dtype)
    assert kernels is not None, "call only where available() holds"
    assert rounds >= 0, "Sinkhorn's linear rounds: none or more"
    tokens = raw.shape[0]
    weights, post = raw.new_empty(tokens, n, n + 1), raw.new_empty(tokens, n)
    checked(kernels[0](*map(pointer, (raw, inv, alpha, bias)), n, tokens, rounds,
                        pointer(weights), pointer(post)), "mhc_mappings")  # fmt: skip
    return weights, post


def backward(
    grad_weights: Tensor | None, grad_post: Tensor | None, raw: Tensor, inv: Tensor,
    alpha: Tensor, bias: Tensor, n: int, rounds: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of raw, inv, alpha and bias from those of ``forward``'s outputs (None:
    zero); the parameters' sums over tokens added in float64."""
    kernels = _kernels(raw.dtype)
    assert kernels is not None, "call only where available() holds"
    assert rounds >= 0, "Sinkhorn's linear rounds: none or more"
    tokens = raw.shape[0]
    upstream = [None if g is None else g.contiguous() for g in (grad_weights, grad_post)]
    grad_raw, grad_inv = torch.empty_like(raw), torch.empty_like(inv)
    grad_alpha = torch.zeros(3, dtype=torch.float64)
    grad_bias = torch.zeros(bias.shape[0], dtype=torch.float64)
    checked(kernels[1](
        *(None if g is None else pointer(g) for g in upstream),
        *map(pointer, (raw, inv, alpha, bias)), n, tokens, rounds,
        *map(pointer, (grad_raw, grad_inv, grad_alpha, grad_bias)),
    ), "mhc_mappings")  # fmt: skip
    return grad_raw, grad_inv, grad_alpha.to(raw.dtype), grad_bias.to(raw.dtype)
