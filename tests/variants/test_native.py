"""The C kernels of variants/native: built with this machine's compiler, bit for bit the PyTorch
loop beside them (so whether they load never changes a result), and a clear fallback where they
cannot be built."""

from __future__ import annotations

import concurrent.futures
import ctypes

import pytest
import torch

import variants.native
import variants.native.sinkhorn
from variants.mhc import sinkhorn_knopp
from variants.native.sinkhorn import backward_from_input, backward_from_sums, normalize_rounds


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("native")


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch, module_cache):
    """Switches the kernels on or off (``native(True)``), built into this module's own cache."""
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(module_cache))

    def switch(on: bool) -> None:
        monkeypatch.setenv("SUITE_NATIVE", "1" if on else "0")
        variants.native.library.cache_clear()
        variants.native.sinkhorn._kernels.cache_clear()

    yield switch
    switch(True)


needs_compiler = pytest.mark.skipif(
    variants.native._compiler() is None, reason="no C compiler on this machine"
)


@needs_compiler
def test_the_sinkhorn_kernel_builds_with_this_machines_compiler(native, monkeypatch, tmp_path):
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    native(True)
    assert variants.native.library("sinkhorn") is not None
    assert [path.suffix for path in (tmp_path / "native").iterdir()] == [".so"]
    native(False)
    assert variants.native.library("sinkhorn") is None


def rounds_both_ways(native, matrix: torch.Tensor, grad: torch.Tensor, rounds: int):
    """(result, gradient of the input) by the kernel (which recomputes the sums), then by the
    PyTorch loop from its saved sums, then by the loop recomputing them."""
    results = []
    for on in (True, False):
        native(on)
        result, gradient = matrix.clone(), grad.clone()
        sums = normalize_rounds(result, rounds)
        assert (sums is None) == on
        if on:
            backward_from_input(gradient, matrix, rounds)
        else:
            backward_from_sums(gradient, result, sums)
            recomputed = grad.clone()
            backward_from_input(recomputed, matrix, rounds)
            assert torch.equal(recomputed, gradient)
        results.append((result, gradient))
    return results


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("tokens", [1, 63, 65, 1024])
def test_the_kernel_is_bit_for_bit_the_pytorch_loop(native, dtype, n, tokens):
    """Forward and backward, across a block boundary (64 tokens) and at stream counts where
    ``Tensor.sum`` would order its additions otherwise (n ≥ 5)."""
    generator = torch.Generator().manual_seed(n * 1000 + tokens)
    matrix = torch.rand(n, n, tokens, dtype=dtype, generator=generator) + 0.01
    grad = torch.randn(n, n, tokens, dtype=dtype, generator=generator)
    (kernel, loop) = rounds_both_ways(native, matrix, grad, rounds=19)
    for ours, theirs in zip(kernel, loop, strict=True):
        assert torch.equal(ours, theirs)
    ones = torch.ones(n, tokens, dtype=dtype)
    torch.testing.assert_close(kernel[0].sum(1), ones)  # rows: the last normalization
    torch.testing.assert_close(kernel[0].sum(0), ones, atol=0.01, rtol=0)  # columns: converging


@needs_compiler
def test_the_kernels_gradient_is_the_rounds_gradient(native):
    """Against autograd through the plain loop, in float64."""
    native(True)
    matrix = torch.rand(4, 4, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    matrix = (matrix + 0.1).requires_grad_()
    weights = torch.randn_like(matrix)
    result = matrix
    for _ in range(7):
        result = result / result.sum(0, keepdim=True)
        result = result / result.sum(1, keepdim=True)
    expected = torch.autograd.grad((result * weights).sum(), matrix)[0]
    gradient = weights.clone()
    backward_from_input(gradient, matrix.detach(), 7)
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-12)


@needs_compiler
def test_mhc_sinkhorn_and_its_gradient_are_the_same_with_and_without_the_kernel(native):
    logits = 4 * torch.randn(3, 64, 4, 4, generator=torch.Generator().manual_seed(0))
    weights = torch.randn_like(logits)
    results = []
    for on in (True, False):
        native(on)
        x = logits.clone().requires_grad_()
        matrix = sinkhorn_knopp(x, 20)
        results.append((matrix, torch.autograd.grad((matrix * weights).sum(), x)[0]))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_under_vmap_each_member_is_normalized_as_alone(native):
    """Packed runs vmap the model over members; Sinkhorn's vmap rule folds them into its
    tokens, so a member's matrix and gradient are exactly its run alone."""
    members = 4 * torch.randn(3, 2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    weights = torch.randn_like(members)

    def loss(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (sinkhorn_knopp(x, 20) * w).sum()

    for on in (True, False):
        native(on)
        batched = torch.func.vmap(lambda x: sinkhorn_knopp(x, 20))(members)
        grads = torch.func.vmap(torch.func.grad(loss))(members, weights)
        for k in range(len(members)):
            alone = members[k].clone().requires_grad_()
            matrix = sinkhorn_knopp(alone, 20)
            assert torch.equal(batched[k], matrix)
            assert torch.equal(grads[k], torch.autograd.grad(loss(alone, weights[k]), alone)[0])
        with torch.no_grad():  # the packed evaluation
            assert torch.equal(torch.func.vmap(lambda x: sinkhorn_knopp(x, 20))(members), batched)


def test_a_failed_build_warns_and_the_loop_runs_instead(native, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr(variants.native, "_compiler", lambda: "false")
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    native(True)
    with pytest.warns(RuntimeWarning, match="sinkhorn kernel is not built .*same numbers"):
        assert variants.native.library("sinkhorn") is None
    logits = torch.randn(16, 4, 4)
    matrix = sinkhorn_knopp(logits, 20)
    torch.testing.assert_close(matrix.sum(-1), torch.ones(16, 4))


@needs_compiler
def test_workers_building_at_once_each_load_a_whole_library(monkeypatch, tmp_path):
    """Sweep workers on one machine share the cache: each builds beside the final name and
    renames a finished library into place."""
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda _: variants.native._build("sinkhorn"), range(4)))
    assert len(set(built)) == 1
    assert [path.name for path in (tmp_path / "native").iterdir()] == [built[0].name]
    assert ctypes.CDLL(str(built[0])).sinkhorn_rounds_f32


@needs_compiler
def test_a_damaged_library_in_the_cache_is_built_again(native, monkeypatch, tmp_path):
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    native(True)
    built = variants.native._build("sinkhorn")
    built.write_bytes(b"not a shared library")
    assert variants.native.library("sinkhorn").sinkhorn_rounds_f32
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_an_unwritable_cache_warns_and_the_loop_runs_instead(native, monkeypatch, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(blocked / "native"))  # under a file: no folder
    native(True)
    with pytest.warns(RuntimeWarning, match="sinkhorn kernel is not built"):
        assert variants.native.library("sinkhorn") is None
