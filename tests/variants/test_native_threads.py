"""The C kernels split their blocks of rows among PyTorch's threads (variants/native/parallel.h):
their results must be the same bits whatever ``torch.set_num_threads`` says, as a record's
numbers must not depend on the thread count a cell ran with (train.threads), and they must
share PyTorch's OpenMP runtime rather than start a second pool of threads."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import needs_compiler

import variants.native
from variants.native import depth_attention, hyper_connection, mhc_mappings

pytestmark = needs_compiler

# 1,000 tokens: 16 blocks of 64, the last a tail of 40; 3 threads split them unevenly.
TOKENS, STREAMS, WIDTH = 1000, 4, 24


def _hyper_connection() -> list[torch.Tensor]:
    n, d, m = STREAMS, WIDTH, STREAMS + 2
    rows = TOKENS * n
    x, gain, bias = torch.randn(rows, d), torch.randn(d), torch.randn(d)
    weight, offset, scale = torch.randn(m, d) * 0.3, torch.randn(n, m), torch.randn(m)
    first, last, *kept = hyper_connection.forward(x, gain, bias, weight, offset, scale, 1e-5)
    grads = hyper_connection.backward(
        torch.randn(rows, m - 1), torch.randn(rows), x, gain, bias, weight, scale, *kept, n
    )
    weights, streams = torch.randn(TOKENS, n, n + 1), torch.randn(TOKENS, n, d)
    grad_read, grad_mixed = torch.randn(TOKENS, d), torch.randn(TOKENS, n, d)
    read = hyper_connection.read_out(weights, streams)
    read_back = hyper_connection.read_out_backward(weights, streams, grad_read, grad_mixed)
    write_back = hyper_connection.write_back_backward(grad_mixed, weights[:, :, 0].contiguous(),
                                                      grad_read)  # fmt: skip
    return [first, last, *kept, *grads, *read, *read_back, *write_back]


def _mhc_mappings() -> list[torch.Tensor]:
    n, k = STREAMS, 2 * STREAMS + STREAMS**2
    raw, inv = torch.randn(TOKENS, k) * 3, torch.rand(TOKENS) + 0.5
    alpha, bias = torch.randn(3), torch.randn(k)
    weights, post = mhc_mappings.forward(raw, inv, alpha, bias, n, 19)
    grad_weights, grad_post = torch.randn(TOKENS, n, n + 1), torch.randn(TOKENS, n)
    grads = mhc_mappings.backward(grad_weights, grad_post, raw, inv, alpha, bias, n, 19)
    return [weights, post, *grads]


def _depth_attention() -> list[torch.Tensor]:
    values = [torch.randn(8, TOKENS // 8, WIDTH) * (1 + i) for i in range(5)]
    key_query = torch.randn(WIDTH)
    read, *kept = depth_attention.forward(key_query, 1e-6, values)
    grad_key_query, grad_values = depth_attention.backward(
        torch.randn_like(read), key_query, *kept, values, True
    )
    return [read, *kept, grad_key_query, *grad_values]


@pytest.fixture
def threads() -> Iterator[Callable[[int], None]]:
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("kernels", [_hyper_connection, _mhc_mappings, _depth_attention])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_are_the_same_bits_on_one_two_or_three_threads(native, threads, kernels, dtype):
    native(True)
    torch.set_default_dtype(dtype)
    try:
        results = {}
        for count in (1, 2, 3):
            threads(count)
            torch.manual_seed(0)
            results[count] = kernels()
    finally:
        torch.set_default_dtype(torch.float32)
    assert all(tensor.dtype == dtype for tensor in results[1])
    for count in (2, 3):
        for one, other in zip(results[1], results[count], strict=True):
            assert torch.equal(one, other)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_kernels_share_pytorchs_openmp_runtime(native):
    """GCC's -fopenmp links libgomp.so.1, which the loader must resolve to the copy PyTorch's
    wheel loaded: a second OpenMP runtime would start a second pool of threads that spin beside
    PyTorch's on the same cores."""
    native(True)
    for name in ("hyper_connection", "mhc_mappings", "depth_attention"):
        assert variants.native.library(name) is not None
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) <= 1, runtimes
    wheels = list((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    if wheels:  # PyTorch's CPU wheel for Linux ships one: the kernels must run on it
        assert runtimes == {str(wheels[0].resolve())} or runtimes == {str(wheels[0])}
