"""The C kernels of variants/native: built with this machine's compiler, bit for bit the PyTorch
loop beside them (so whether they load never changes a result), and a clear fallback where they
cannot be built."""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import shlex
from pathlib import Path

import pytest
import torch
from helpers import has_c_compiler, needs_compiler

import variants.native
import variants.native.sinkhorn
from variants.mhc import sinkhorn_knopp
from variants.native.sinkhorn import backward_from_input, backward_from_sums, normalize_rounds


@needs_compiler
def test_the_sinkhorn_kernel_builds_with_this_machines_compiler(native, monkeypatch, tmp_path):
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    native(True)
    assert variants.native.library("sinkhorn") is not None
    assert [path.suffix for path in (tmp_path / "native").iterdir()] == [".so"]
    native(False)
    assert variants.native.library("sinkhorn") is None


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the last bit, signs of zero included (``torch.equal`` has -0.0 == 0.0)."""
    integers = torch.int32 if a.dtype == torch.float32 else torch.int64
    return a.dtype == b.dtype and torch.equal(a.view(integers), b.view(integers))


def rounds_both_ways(native, matrix: torch.Tensor, grad: torch.Tensor, rounds: int):
    """(result, gradient of the input) by the kernel (which recomputes the sums), then by the
    PyTorch loop from its saved sums, then by the loop recomputing them."""
    results = []
    for on in (True, False):
        native(on)
        result, gradient = matrix.clone(), grad.clone()
        sums = normalize_rounds(result, rounds)
        assert (sums.numel() == 0) == on
        if on:
            backward_from_input(gradient, matrix, rounds)
        else:
            backward_from_sums(gradient, result, sums)
            recomputed = grad.clone()
            backward_from_input(recomputed, matrix, rounds)
            assert same_bits(recomputed, gradient)
        results.append((result, gradient))
    return results


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("tokens", [1, 63, 65, 1024])
def test_the_kernel_is_bit_for_bit_the_pytorch_loop(native, dtype, n, tokens):
    """Forward and backward, across a block boundary (64 tokens), at stream counts where
    ``Tensor.sum`` would order its additions otherwise (n ≥ 5), signs of zero included."""
    generator = torch.Generator().manual_seed(n * 1000 + tokens)
    matrix = torch.rand(n, n, tokens, dtype=dtype, generator=generator) + 0.01
    grad = torch.randn(n, n, tokens, dtype=dtype, generator=generator)
    grad[..., ::7] = -0.0  # sums of negative zeros: +0 by Tensor.sum, so by the kernel too
    (kernel, loop) = rounds_both_ways(native, matrix, grad, rounds=19)
    for ours, theirs in zip(kernel, loop, strict=True):
        assert same_bits(ours, theirs)
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
    assert same_bits(results[0][0], results[1][0])
    assert same_bits(results[0][1], results[1][1])


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kernel calls made (``forward`` / ``backward``), recorded as they pass."""
    calls: list[str] = []
    kernels = variants.native.sinkhorn._kernels

    def counted(dtype: torch.dtype):
        found = kernels(dtype)
        if found is None:
            return None

        def forward(*args):
            calls.append("forward")
            return found[0](*args)

        def backward(*args):
            calls.append("backward")
            return found[1](*args)

        return forward, backward

    monkeypatch.setattr(variants.native.sinkhorn, "_kernels", counted)
    return calls


@pytest.mark.parametrize("on", [True, False])
def test_under_vmap_each_member_is_normalized_as_alone(native, kernel_calls, on):
    """Packed runs vmap the model's forward over members and call ``.backward()`` outside it
    (suite/run/packed.py); Sinkhorn's vmap rule folds the members into its tokens, so each
    member's matrix and gradient are bit for bit its run alone, by the kernel where it loads."""
    native(on)
    if on and not has_c_compiler():
        pytest.skip("no C compiler on this machine")
    members = 4 * torch.randn(3, 2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    weights = torch.randn_like(members)
    packed = members.clone().requires_grad_()
    batched = torch.func.vmap(lambda x: sinkhorn_knopp(x, 20))(packed)
    (batched * weights).sum().backward()
    assert kernel_calls == (["forward", "backward"] if on else [])
    with torch.no_grad():  # the packed evaluation
        assert same_bits(torch.func.vmap(lambda x: sinkhorn_knopp(x, 20))(members), batched)
    functional = torch.func.vmap(torch.func.grad(lambda x, w: (sinkhorn_knopp(x, 20) * w).sum()))
    grads = functional(members, weights)
    for k in range(len(members)):
        alone = members[k].clone().requires_grad_()
        matrix = sinkhorn_knopp(alone, 20)
        assert same_bits(batched[k], matrix)
        gradient = torch.autograd.grad((matrix * weights[k]).sum(), alone)[0]
        assert same_bits(packed.grad[k], gradient)
        assert same_bits(grads[k], gradient)


@needs_compiler
def test_one_iteration_runs_no_rounds_on_a_fresh_thread(native):
    """``variant.sinkhorn_iterations=1`` leaves no linear rounds: nothing for the kernel, on a
    thread that never ran it (no workspace yet) too, called through mHC and directly."""
    native(True)
    logits = torch.randn(8, 4, 4, requires_grad=True)
    forward, backward = variants.native.sinkhorn._kernels(torch.float32)
    matrix, grad = torch.rand(4, 4, 8), torch.randn(4, 4, 8)
    pointers = (variants.native.pointer(matrix), variants.native.pointer(grad))

    def on_a_fresh_thread() -> tuple[torch.Tensor, list[int]]:
        statuses = [forward(pointers[0], 4, 8, 0), forward(pointers[0], 4, 0, 3)]
        statuses += [backward(pointers[1], pointers[0], 4, 8, 0)]
        return sinkhorn_knopp(logits, 1), statuses

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result, statuses = pool.submit(on_a_fresh_thread).result()
    assert statuses == [0, 0, 0]
    torch.testing.assert_close(result, torch.softmax(torch.log_softmax(logits, -2), -1))
    result.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_a_failed_build_warns_and_the_loop_runs_instead(native, monkeypatch, tmp_path):
    """A compiler that answers ``--version`` and fails to compile: a warning that says so, no
    partial file left in the cache, and mHC still normalizes (by the loop)."""
    failing = 'case "$0" in --version) echo a compiler;; *) echo "no such flag" >&2; exit 1;; esac'
    monkeypatch.setattr(variants.native, "_compiler", lambda: ["sh", "-c", failing])
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    native(True)
    with pytest.warns(RuntimeWarning, match="sinkhorn kernel is not built .*no such flag"):
        assert variants.native.library("sinkhorn") is None
    assert list((tmp_path / "native").iterdir()) == []
    matrix = sinkhorn_knopp(torch.randn(16, 4, 4), 20)
    torch.testing.assert_close(matrix.sum(-1), torch.ones(16, 4))


@pytest.mark.parametrize(
    "cc, reported",
    [("no-such-compiler -m64", "CC='no-such-compiler -m64' names no program"),
     ('gcc "-m64', "cannot be split")],
)  # fmt: skip
def test_a_cc_that_cannot_run_is_reported_not_replaced(native, monkeypatch, tmp_path, cc, reported):
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    native(True)
    with pytest.warns(RuntimeWarning, match=reported):
        assert variants.native.library("sinkhorn") is None


@needs_compiler
def test_a_cc_with_flags_builds_with_them(native, monkeypatch, tmp_path):
    compiler = shlex.join(variants.native._compiler())
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    monkeypatch.setenv("CC", f"{compiler} --no-such-flag")  # the flags reach the compiler
    native(True)
    with pytest.warns(RuntimeWarning, match="sinkhorn kernel is not built .*failed"):
        assert variants.native.library("sinkhorn") is None
    monkeypatch.setenv("CC", f"{compiler} -DSTABILITY_SUITE_TEST=1")
    native(True)
    assert variants.native.library("sinkhorn") is not None
    (built,) = (tmp_path / "native").iterdir()
    assert built.stat().st_mode & 0o044 == 0o044  # readable by the cache's other users


@needs_compiler
def test_fast_math_in_cc_changes_no_bit(native, monkeypatch, tmp_path):
    """``-ffast-math`` would reorder the kernel's arithmetic and (GCC) flush denormals in the
    loading thread; the suite's own flags come after $CC's and turn it off."""
    monkeypatch.setenv("CC", f"{shlex.join(variants.native._compiler())} -ffast-math")
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    native(True)
    assert variants.native.library("sinkhorn") is not None
    assert torch.tensor(1e-39) * 1 != 0  # denormals still kept in this thread
    generator = torch.Generator().manual_seed(3)
    matrix = torch.rand(5, 5, 100, generator=generator) + 0.01
    grad = torch.randn(5, 5, 100, generator=generator)
    kernel, loop = rounds_both_ways(native, matrix, grad, rounds=19)
    for ours, theirs in zip(kernel, loop, strict=True):
        assert same_bits(ours, theirs)


@needs_compiler
def test_partial_builds_a_killed_worker_left_are_removed(native, monkeypatch, tmp_path):
    cache = tmp_path / "native"
    cache.mkdir()
    stale, fresh = cache / ".sinkhorn-old.so", cache / ".sinkhorn-building.so"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (0, 0))
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(cache))
    native(True)
    assert variants.native.library("sinkhorn") is not None
    assert not stale.exists() and fresh.exists()  # another worker may still be building that


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
    whole = built.read_bytes()
    built.write_bytes(b"not a shared library")
    assert variants.native.library("sinkhorn").sinkhorn_rounds_f32
    assert built.read_bytes() == whole


@needs_compiler
@pytest.mark.parametrize("kept", [0.5, 0.99])
def test_a_library_cut_short_in_the_cache_is_built_again(native, monkeypatch, tmp_path, kept):
    """A full disk or a crashed copy can leave an ELF file with a whole header and a missing
    tail: it fails to load, and it is rebuilt rather than refused for good."""
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    native(True)
    built = variants.native._build("sinkhorn")
    whole = built.read_bytes()
    built.write_bytes(whole[: int(len(whole) * kept)])
    assert not variants.native._is_whole_library(built)
    assert variants.native.library("sinkhorn").sinkhorn_rounds_f32
    assert built.read_bytes() == whole and variants.native._is_whole_library(built)


@needs_compiler
def test_an_unwritable_cache_warns_and_the_loop_runs_instead(native, monkeypatch, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(blocked / "native"))  # under a file: no folder
    native(True)
    with pytest.warns(RuntimeWarning, match="sinkhorn kernel is not built .*Not a directory"):
        assert variants.native.library("sinkhorn") is None


def test_a_librarys_key_hashes_the_headers_its_source_includes_and_no_others(tmp_path):
    """A record names the build: a header another library includes must not change this one's
    key (it would tell of a rounding change that did not happen)."""
    from variants.native import _local_headers

    (tmp_path / "a.c").write_text('#include <math.h>\n#include "x.h"\n')
    (tmp_path / "x.h").write_text('  #  include "z.h"\n')
    (tmp_path / "z.h").write_text('#include "x.h"\n')  # a cycle ends
    (tmp_path / "y.h").write_text("")
    assert [h.name for h in _local_headers(tmp_path / "a.c")] == ["x.h", "z.h"]
    shipped = Path(variants.native.__file__).parent
    assert [h.name for h in _local_headers(shipped / "sinkhorn.c")] == [
        "native.h",
        "sinkhorn_rounds.h",
    ]  # not parallel.h, which the multi-threaded kernels include


def _compiler_failing_on_openmp(monkeypatch, tmp_path: Path, message: str) -> Path:
    """$CC: the machine's cc, which fails with ``message`` when given -fopenmp; each call's
    arguments are logged to the file returned. The cache: a fresh one under tmp_path."""
    compiler, calls = tmp_path / "cc-failing-on-openmp", tmp_path / "calls"
    compiler.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        f'case " $* " in *" -fopenmp "*) echo "{message}" >&2; exit 1;; esac\nexec cc "$@"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    return calls


@needs_compiler
def test_a_compiler_without_openmp_builds_the_kernels_for_one_thread(native, monkeypatch, tmp_path):
    """Apple's clang has no -fopenmp without libomp: the multi-threaded kernels are built
    without it (their blocks then run one after another), not refused."""
    calls = _compiler_failing_on_openmp(monkeypatch, tmp_path, "unsupported: -fopenmp")
    native(True)
    built = variants.native._build("hyper_connection")
    assert b"libgomp" not in built.read_bytes() and b"GOMP_parallel" not in built.read_bytes()
    assert variants.native.library("hyper_connection").dynamic_weights_f32
    calls.unlink()
    assert variants.native._build("hyper_connection") == built  # the next process finds it
    assert calls.read_text() == "--version\n"  # without a compile (a read-only cache works)
    monkeypatch.delenv("CC")
    with_openmp = variants.native._build("hyper_connection")
    assert with_openmp != built and b"GOMP_parallel" in with_openmp.read_bytes()


@needs_compiler
def test_without_pytorchs_libgomp_the_kernels_build_for_one_thread(native, monkeypatch, tmp_path):
    """A PyTorch whose OpenMP is not a ``libgomp.so.1`` (a renamed copy, Intel's, LLVM's): a
    -fopenmp build would start a second runtime, whose threads torch.set_num_threads does not
    size."""
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(tmp_path / "native"))
    monkeypatch.setattr(variants.native, "_openmp_is_pytorchs", lambda: False)
    native(True)
    built = variants.native._build("hyper_connection")
    assert b"GOMP_parallel" not in built.read_bytes()


@needs_compiler
def test_a_damaged_elf_header_or_a_missing_file_is_not_a_whole_library(native, tmp_path):
    native(True)
    whole = variants.native._build("sinkhorn").read_bytes()
    assert whole[4] == 2  # 64-bit: e_phentsize at 0x36
    damaged = tmp_path / "damaged.so"
    damaged.write_bytes(whole[:0x36] + (8).to_bytes(2, "little") + whole[0x38:])
    assert not variants.native._is_whole_library(damaged)  # not struct.error
    assert not variants.native._is_whole_library(tmp_path / "missing.so")


@needs_compiler
def test_a_compile_that_fails_for_another_reason_is_not_taken_for_a_refusal_of_openmp(
    native, monkeypatch, tmp_path
):
    """A killed compiler must not pin the one-thread build for every later process."""
    _compiler_failing_on_openmp(monkeypatch, tmp_path, "Killed signal terminated")
    native(True)
    with pytest.raises(RuntimeError, match="Killed"):
        variants.native._build("hyper_connection")
    assert not list((tmp_path / "native").glob("*.refused"))
