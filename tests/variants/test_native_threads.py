"""The C kernels split their blocks of rows among PyTorch's threads (variants/native/parallel.h):
their results must be the same bits whatever ``torch.set_num_threads`` says, as a record's
numbers must not depend on the thread count a cell ran with (train.threads), and they must
share PyTorch's OpenMP runtime rather than start a second pool of threads."""

from __future__ import annotations

import os
import signal
import sys
import warnings
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


def _draw(subnormal: bool, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Normal draws times ``scale``, or positive float32 subnormals made from their bits (no
    arithmetic: it would flush them where the caller's mode flushes)."""
    if not subnormal:
        return torch.randn(*shape) * scale
    return torch.randint(1, 2**23, shape, dtype=torch.int32).view(torch.float32)


def _hyper_connection(subnormal: bool) -> list[torch.Tensor]:
    n, d, m = STREAMS, WIDTH, STREAMS + 2
    rows = TOKENS * n
    x, gain, bias = _draw(subnormal, rows, d), torch.randn(d), torch.randn(d)
    weight, offset, scale = torch.randn(m, d) * 0.3, torch.randn(n, m), torch.randn(m)
    first, last, *kept = hyper_connection.forward(x, gain, bias, weight, offset, scale, 1e-5)
    grads = hyper_connection.backward(
        torch.randn(rows, m - 1), torch.randn(rows), x, gain, bias, weight, scale, *kept, n
    )
    weights, streams = torch.randn(TOKENS, n, n + 1), _draw(subnormal, TOKENS, n, d)
    grad_read, grad_mixed = torch.randn(TOKENS, d), torch.randn(TOKENS, n, d)
    read = hyper_connection.read_out(weights, streams)
    read_back = hyper_connection.read_out_backward(weights, streams, grad_read, grad_mixed)
    write_back = hyper_connection.write_back_backward(grad_mixed, weights[:, :, 0].contiguous(),
                                                      grad_read)  # fmt: skip
    return [first, last, *kept, *grads, *read, *read_back, *write_back]


def _mhc_mappings(subnormal: bool) -> list[torch.Tensor]:
    n, k = STREAMS, 2 * STREAMS + STREAMS**2
    raw, inv = _draw(subnormal, TOKENS, k, scale=3.0), torch.rand(TOKENS) + 0.5
    alpha, bias = torch.randn(3), torch.randn(k)
    weights, post = mhc_mappings.forward(raw, inv, alpha, bias, n, 19)
    grad_weights, grad_post = torch.randn(TOKENS, n, n + 1), torch.randn(TOKENS, n)
    grads = mhc_mappings.backward(grad_weights, grad_post, raw, inv, alpha, bias, n, 19)
    return [weights, post, *grads]


def _depth_attention(subnormal: bool) -> list[torch.Tensor]:
    values = [_draw(subnormal, 8, TOKENS // 8, WIDTH) for _ in range(5)]
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


def _on_threads(kernels: Callable[[bool], list[torch.Tensor]], subnormal: bool, threads: Callable,
                counts: tuple[int, ...] = (1, 2, 3)) -> dict[int, list[torch.Tensor]]:  # fmt: skip
    results = {}
    for count in counts:
        threads(count)
        torch.manual_seed(0)
        results[count] = kernels(subnormal)
    return results


def _assert_same_bits(results: dict[int, list[torch.Tensor]]) -> None:
    first, *others = results.values()
    for other in others:
        for one, another in zip(first, other, strict=True):
            assert torch.equal(one, another)


@pytest.mark.parametrize("kernels", [_hyper_connection, _mhc_mappings, _depth_attention])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_are_the_same_bits_on_one_two_or_three_threads(native, threads, kernels, dtype):
    native(True)
    torch.set_default_dtype(dtype)
    try:
        results = _on_threads(kernels, False, threads)
    finally:
        torch.set_default_dtype(torch.float32)
    assert all(tensor.dtype == dtype for tensor in results[1])
    _assert_same_bits(results)


@pytest.mark.parametrize("kernels", [_hyper_connection, _mhc_mappings, _depth_attention])
def test_subnormals_are_flushed_on_every_thread_as_on_the_callers(native, threads, kernels):
    """A cell trains with torch.set_flush_denormal(True), which sets the calling thread's
    floating-point mode only: blocks run on PyTorch's other threads must flush as the caller
    does, or a cell's bits would depend on its thread count wherever a subnormal appears."""
    native(True)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        flushed = _on_threads(kernels, True, threads)
    finally:
        torch.set_flush_denormal(False)
    _assert_same_bits(flushed)
    kept = _on_threads(kernels, True, threads)  # the other threads gave the caller's mode back
    _assert_same_bits(kept)
    assert any(  # the inputs do reach subnormals: flushing them changed the results
        not torch.equal(one, other) for one, other in zip(flushed[1], kept[1], strict=True)
    )


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


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="fork()")
def test_a_child_forked_after_the_kernels_ran_on_threads_runs_them_on_its_own(native, threads):
    """libgomp's threads do not survive fork(): a parallel region in the child would wait for
    them forever, so a forked child runs the kernels' loops on its one thread."""
    native(True)
    threads(2)
    torch.manual_seed(0)
    parent = _depth_attention(False)  # on two threads: OpenMP's pool now exists
    with warnings.catch_warnings():  # Python 3.12 warns of fork() in a process with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # the child: only the kernels (PyTorch's own ops above its grain would hang)
        try:
            # The default action kills it: a Python handler would never run in a hung kernel.
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(30)
            torch.manual_seed(0)
            again = _depth_attention(False)
            os._exit(0 if all(map(torch.equal, parent, again)) else 1)
        finally:
            os._exit(2)  # an exception: never back into pytest in the child
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status), "the child hung in the kernel (killed by its alarm)"
    assert os.WEXITSTATUS(status) == 0, "the child's results differ (1) or it raised (2)"
