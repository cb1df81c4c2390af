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
def _kernels(dtype: torch.dtype) -> tuple[Callable[..., None], Callable[..., int]] | None:
    """The forward and backward kernels for this dtype, their C signatures declared (ctypes
    would pass Python ints as 32-bit ints)."""
    kernels = library("sinkhorn")
    if kernels is None:
        return None
    suffix = "f32" if dtype == torch.float32 else "f64"
    forward = getattr(kernels, f"sinkhorn_rounds_{suffix}")
    backward = getattr(kernels, f"sinkhorn_rounds_backward_{suffix}")
    sizes = [ctypes.c_int64] * 3  # n, tokens, rounds
    forward.argtypes = [ctypes.c_void_p, *sizes]
    backward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *sizes]
    forward.restype, backward.restype = None, ctypes.c_int
    return forward, backward


def _added(terms: tuple[Tensor, ...]) -> Tensor:
    """The terms added from the first to the last, as the kernel adds them: ``Tensor.sum``
    orders the additions by its own heuristics (another order for n ≥ 5 than for n ≤ 4, here).
    A new tensor even for one term: the caller divides the terms by it in place."""
    total = terms[0].clone()
    for term in terms[1:]:
        total += term
    return total


def _loop(matrix: Tensor, rounds: int) -> list[Tensor]:
    sums = []
    for _ in range(rounds):
        for axis in (0, 1):  # columns, then rows
            total = _added(matrix.unbind(axis)).unsqueeze(axis)
            matrix.div_(total)
            sums.append(total)
    return sums


def normalize_rounds(matrix: Tensor, rounds: int) -> None:
    """``rounds`` times: divide every column by its sum, then every row by its; ``matrix``
    (n, n, tokens), contiguous, in place."""
    n, _, tokens = matrix.shape
    kernels = _kernels(matrix.dtype) if runs_natively(matrix) else None
    if kernels is None:
        _loop(matrix, rounds)
    else:
        kernels[0](pointer(matrix), n, tokens, rounds)


def normalize_rounds_backward(grad: Tensor, initial: Tensor, rounds: int) -> None:
    """``grad``, the gradient of ``normalize_rounds``' result, becomes that of its input
    ``initial``, in place (both (n, n, tokens), contiguous): the rounds run again on a copy of
    ``initial``, keeping their sums (cheaper than saving 2 · rounds · n sums a token from the
    forward), then back through each normalization m' = m / s, last first: ∂m = (∂m' − Σ_axis
    ∂m' ⊙ m') / s, with m rebuilt as m' ⊙ s."""
    n, _, tokens = grad.shape
    kernels = _kernels(grad.dtype) if runs_natively(grad, initial) else None
    if kernels is not None:
        if kernels[1](pointer(grad), pointer(initial), n, tokens, rounds) != 0:
            raise MemoryError("sinkhorn_rounds_backward: no memory for a block of tokens")
        return
    matrix = initial.clone()
    sums = _loop(matrix, rounds)
    for index in reversed(range(len(sums))):
        axis, total = index % 2, sums[index]
        grad.sub_(_added((grad * matrix).unbind(axis)).unsqueeze(axis)).div_(total)
        matrix.mul_(total)
