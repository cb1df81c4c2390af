"""Sinkhorn-Knopp's linear rounds (variants/mhc.py) on (n, n, tokens) matrices, by the C kernel
of sinkhorn.c where it loads, else by the same loop in PyTorch: the same numbers either way.

At 1,024 tokens and n = 4 (mHC at the benchmark shape), 19 rounds are ~80 PyTorch ops forward
and ~190 backward, each a dispatch and a pass over the matrix; the kernel runs them all over a
block of tokens in cache (measured in docs/performance.md).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import Tensor

from variants.native import declared, library, note_used, pointer, runs_natively


def _kernels(dtype: torch.dtype) -> tuple[Callable[..., int], Callable[..., int]] | None:
    """The forward and backward kernels for this dtype, their C signatures declared. Not
    cached: ``library`` is, and so is each function ctypes looks up, so declaring again is cheap
    and nothing can go stale."""
    kernels = library("sinkhorn")
    if kernels is None:
        return None
    note_used("sinkhorn")  # only looked up to run
    sizes = [ctypes.c_int64] * 3  # n, tokens, rounds
    forward = declared(kernels, "sinkhorn_rounds", dtype, [ctypes.c_void_p, *sizes], ctypes.c_int)
    backward = declared(
        kernels, "sinkhorn_rounds_backward", dtype, [ctypes.c_void_p] * 2 + sizes, ctypes.c_int
    )
    return forward, backward


def _summed(tensor: Tensor, axis: int) -> Tensor:
    """The sum over ``axis`` (kept as a dimension of 1) in the kernel's order: added to zero
    from the first term to the last. ``Tensor.sum`` over a leading dimension adds in that order
    for up to 4 terms (mHC's default n = 4; tests/variants/test_native.py holds it to that bit
    for bit) and in another for more, where the terms are added one by one (slower). Off CPU
    (no kernel) one ``sum`` always: fewer launches."""
    if tensor.device.type != "cpu" or tensor.shape[axis] <= 4:
        return tensor.sum(dim=axis, keepdim=True)
    total = torch.zeros_like(tensor.select(axis, 0))
    for term in tensor.unbind(axis):
        total += term
    return total.unsqueeze(axis)


def _loop(matrix: Tensor, rounds: int) -> Tensor:
    sums = []
    for _ in range(rounds):
        for axis in (0, 1):  # columns, then rows
            total = _summed(matrix, axis)
            matrix.div_(total)
            sums.append(total.squeeze(axis))
    return torch.stack(sums) if sums else _no_sums(matrix)


def _no_sums(matrix: Tensor) -> Tensor:
    return matrix.new_empty(0, *matrix.shape[1:])


def normalize_rounds(matrix: Tensor, rounds: int) -> Tensor:
    """``rounds`` times: divide every column by its sum, then every row by its; ``matrix``
    (n, n, tokens), contiguous, in place. Returns the sums (2 · rounds, n, tokens; columns' at
    even rows) where the PyTorch loop ran, for its backward; none (an empty tensor) where the
    kernel ran or there were no rounds (the kernel's backward recomputes them, block by block in
    cache, cheaper than saving them)."""
    n, _, tokens = matrix.shape
    kernels = _kernels(matrix.dtype) if rounds > 0 and runs_natively(matrix) else None
    if kernels is None:
        return _loop(matrix, rounds)
    if kernels[0](pointer(matrix), n, tokens, rounds) != 0:
        raise MemoryError("sinkhorn_rounds: no memory for a block of tokens")
    return _no_sums(matrix)


def backward_from_input(grad: Tensor, initial: Tensor, rounds: int) -> None:
    """``grad``, the gradient of ``normalize_rounds``' result, becomes that of its input
    ``initial``, in place (both (n, n, tokens), contiguous): the rounds run again from
    ``initial``, keeping their sums, then ``backward_from_sums``."""
    n, _, tokens = grad.shape
    kernels = _kernels(grad.dtype) if rounds > 0 and runs_natively(grad, initial) else None
    if kernels is None:
        result = initial.clone()
        backward_from_sums(grad, result, _loop(result, rounds))
    elif kernels[1](pointer(grad), pointer(initial), n, tokens, rounds) != 0:
        raise MemoryError("sinkhorn_rounds_backward: no memory for a block of tokens")


def backward_from_sums(grad: Tensor, result: Tensor, sums: Tensor) -> None:
    """``grad``, the gradient of ``normalize_rounds``' result, becomes that of its input, in
    place, from the result and the sums it returned: back through each normalization m' =
    m / s, last first, ∂m = (∂m' − Σ_axis ∂m' ⊙ m') / s, with m rebuilt as m' ⊙ s."""
    matrix = result.clone()
    for index in reversed(range(len(sums))):
        axis = index % 2
        total = sums[index].unsqueeze(axis)
        grad.sub_(_summed(grad * matrix, axis)).div_(total)
        matrix.mul_(total)
