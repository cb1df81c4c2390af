"""Sinkhorn-Knopp's linear rounds (variants/mhc.py) on (n, n, tokens) matrices, by the C kernel
of sinkhorn.c where it loads, else by the same loop in PyTorch: the same numbers either way.

At 1,024 tokens and n = 4 (mHC at the benchmark shape), 19 rounds are ~80 PyTorch ops forward
and ~190 backward, each a dispatch and a pass over the matrix; the kernel runs them all over a
block of tokens in cache (measured in docs/performance.md).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch
from torch import Tensor

from variants.native import library, pointer, runs_natively


@functools.cache
def _kernels(dtype: torch.dtype) -> tuple[Callable[..., None], Callable[..., None]] | None:
    """The forward and backward kernels for this dtype, their C signatures declared (ctypes
    would pass Python ints as 32-bit ints)."""
    kernels = library("sinkhorn")
    if kernels is None:
        return None
    suffix = "f32" if dtype == torch.float32 else "f64"
    forward = getattr(kernels, f"sinkhorn_rounds_{suffix}")
    backward = getattr(kernels, f"sinkhorn_rounds_backward_{suffix}")
    sizes = [ctypes.c_int64] * 3  # n, tokens, rounds
    forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *sizes]
    backward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, *sizes]
    forward.restype = backward.restype = None
    return forward, backward


def _added(terms: tuple[Tensor, ...]) -> Tensor:
    """The terms added from the first to the last, as the kernel adds them: ``Tensor.sum``
    orders the additions by its own heuristics (another order for n ≥ 5 than for n ≤ 4, here).
    A new tensor even for one term: the caller divides the terms by it in place."""
    total = terms[0].clone()
    for term in terms[1:]:
        total += term
    return total


def normalize_rounds(matrix: Tensor, rounds: int) -> Tensor:
    """``rounds`` times: divide every column by its sum, then every row by its; ``matrix``
    (n, n, tokens) in place. Returns the sums (2 · rounds, n, tokens): row r holds the n
    divisors of normalization r (columns at even r, rows at odd), for the backward."""
    n, _, tokens = matrix.shape
    kernels = _kernels(matrix.dtype) if runs_natively(matrix) else None
    if kernels is None:
        sums = []
        for _ in range(rounds):
            for axis in (0, 1):  # columns, then rows
                total = _added(matrix.unbind(axis))
                matrix.div_(total.unsqueeze(axis))
                sums.append(total)
        return torch.stack(sums) if sums else matrix.new_empty(0, n, tokens)
    sums = matrix.new_empty(2 * rounds, n, tokens)
    kernels[0](pointer(matrix), pointer(sums), n, tokens, rounds)
    return sums


def normalize_rounds_backward(grad: Tensor, matrix: Tensor, sums: Tensor) -> None:
    """Back through the normalizations of ``normalize_rounds``, last first: ∂m = (∂m' −
    Σ_axis ∂m' ⊙ m') / s, with m rebuilt as m' ⊙ s from the saved sums. ``grad`` (the result's
    gradient) becomes the gradient of the matrix the rounds began with, and ``matrix`` (their
    result) that matrix again: both (n, n, tokens), contiguous, in place."""
    n, _, tokens = matrix.shape
    kernels = _kernels(matrix.dtype) if runs_natively(grad, matrix, sums) else None
    if kernels is None:
        for index in reversed(range(len(sums))):
            axis, total = index % 2, sums[index].unsqueeze(index % 2)
            grad.sub_(_added((grad * matrix).unbind(axis)).unsqueeze(axis)).div_(total)
            matrix.mul_(total)
        return
    kernels[1](pointer(grad), pointer(matrix), pointer(sums), n, tokens, len(sums) // 2)
