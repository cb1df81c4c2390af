"""Hyper-Connections' C kernels (variants/native/hyper_connection.c): the dynamic connection
weights and the read-out compute PyTorch's formula in their own order of additions, so they
agree with PyTorch's path to float rounding (not bit for bit), gradients included, and keep
what a divergence must show (NaN)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_as_accurate_as_pytorch, needs_compiler, record_calls

import variants.native
from variants.hyper_connections import HyperConnection
from variants.native import hyper_connection
from variants.streams import read_and_mix

pytestmark = needs_compiler


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the kernels' Python entry points, each time one runs."""
    return record_calls(
        monkeypatch,
        hyper_connection,
        ("forward", "backward", "read_out", "read_out_backward", "write_back_backward"),
    )


def perturbed_connection(width: int, streams: int, index: int, seed: int) -> HyperConnection:
    """A dynamic HC in float64, its parameters moved far from the init so that every term
    counts."""
    torch.manual_seed(seed)
    module = HyperConnection(width, streams, index, dynamic=True, eps=1e-5).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return module


def connection(
    native, on: bool, dtype: torch.dtype, streams: int, width: int, expanded: bool
) -> list[torch.Tensor]:
    """Output and every gradient of one dynamic HC (a tanh branch), kernels on or off; the same
    parameters and inputs (drawn in float64) whatever the dtype."""
    native(on)
    module = perturbed_connection(width, streams, 1, seed=4).to(dtype)
    # 2 x 33 tokens: rows of n streams cross the kernel's 64-row blocks
    embedded = torch.randn(2, 33, width, dtype=torch.float64).to(dtype).requires_grad_()
    upstream = torch.randn(2, 33, streams, width, dtype=torch.float64).to(dtype)
    x = embedded.unsqueeze(-2).expand(2, 33, streams, width)  # as the first block gets them
    if not expanded:
        x = x * torch.linspace(0.5, 1.5, streams, dtype=dtype)[:, None]
    out = module(x, torch.tanh)
    inputs = [embedded, *module.parameters()]
    return [out, *torch.autograd.grad((out * upstream).sum(), inputs)]


@pytest.mark.parametrize("streams", [1, 3, 4])
@pytest.mark.parametrize("width", [12, 64])  # 12: a row's tail after the 8-wide lanes
@pytest.mark.parametrize("expanded", [True, False])
def test_the_kernels_are_as_accurate_as_pytorch_in_float32_every_gradient_too(
    native, kernel_calls, streams, width, expanded
):
    """Each output's error against float64 is within 4x PyTorch's float32 error (sums over
    tokens cancel, so that bound rather than a relative one) plus 4e-6 of its largest entry:
    measured, the kernels' errors were 0.4-3.2x PyTorch's, under 6e-7 of the largest entry; a
    formula error (a term left out) is ~1e-2 of it."""
    exact = connection(native, False, torch.float64, streams, width, expanded)
    pytorch = connection(native, False, torch.float32, streams, width, expanded)
    assert kernel_calls == []
    kernel = connection(native, True, torch.float32, streams, width, expanded)
    assert sorted(set(kernel_calls)) == [
        "backward", "forward", "read_out", "read_out_backward", "write_back_backward"
    ]  # fmt: skip
    assert_as_accurate_as_pytorch(kernel, pytorch, exact)


def test_in_float64_they_agree_to_float64_rounding(native):
    kernel = connection(native, True, torch.float64, 4, 64, expanded=False)
    pytorch = connection(native, False, torch.float64, 4, 64, expanded=False)
    for got, want in zip(kernel, pytorch, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())


def test_the_kernels_gradient_is_the_connections_gradient(native):
    native(True)
    module = perturbed_connection(10, 3, 0, seed=5)
    x = torch.randn(2, 5, 3, 10, dtype=torch.float64, requires_grad=True)
    assert hyper_connection.available(x.reshape(-1, 10))
    parameters = tuple(module.parameters())
    assert torch.autograd.gradcheck(lambda x, *_: module(x, torch.sin), (x, *parameters))


def float32_ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of float32's last place at exact (exact in float64)."""
    exponent = torch.frexp(exact.abs().float().clamp_min(torch.finfo(torch.float32).tiny))[1]
    return (got.double() - exact).abs() / torch.ldexp(torch.tensor(1.0, dtype=torch.float64),
                                                      (exponent - 24).double())  # fmt: skip


def kernel_tanh(z: torch.Tensor) -> torch.Tensor:
    """The kernel's tanh of each value: one row of width 1 normalizes to 0, so with gain 0 and
    bias 1 its projections are the weights themselves, tanh'd, and scale 1 returns them."""
    m = z.numel()
    one = torch.ones(1)
    first, last, tanh, _, _ = hyper_connection.forward(
        torch.zeros(1, 1), one, one, z.reshape(m, 1).contiguous(), torch.zeros(1, m),
        torch.ones(m), 1e-5,
    )  # fmt: skip
    return tanh.view(-1)


def test_the_kernels_float_tanh_is_within_two_ulps(native):
    native(True)
    values = torch.cat([
        torch.linspace(-12, 12, 100_001),
        torch.logspace(-38, 1.2, 4_000), -torch.logspace(-38, 1.2, 4_000),
        torch.linspace(0.54, 0.56, 2_001),  # where the series hands over to exp
    ])  # fmt: skip
    got = kernel_tanh(values)
    assert float32_ulps(got, torch.tanh(values.double())).max() <= 2.0
    special = torch.tensor([0.0, 30.0, -30.0, float("inf"), -float("inf"), float("nan")])
    expected = torch.tensor([0.0, 1.0, -1.0, 1.0, -1.0, float("nan")])
    got = torch.cat([kernel_tanh(value) for value in special.split(1)])
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)


def test_a_nan_in_the_streams_comes_out_as_nan(native, kernel_calls):
    """A diverging run must show NaN, not weights that tanh clipped to ±1."""
    native(True)
    module = HyperConnection(16, 4, 0, dynamic=True, eps=1e-5)
    x = torch.randn(3, 4, 16)
    x[1, 2, 5] = float("nan")
    with torch.no_grad():  # as the diagnostics read them: by the kernels
        weights, write = module.connection_weights(x)
    assert "forward" in kernel_calls
    assert weights[1, 2].isnan().all() and write[1, 2].isnan()
    assert not weights[0].isnan().any() and not weights[2].isnan().any()


@pytest.mark.parametrize("used", ["read", "mixed", "both"])
def test_the_read_out_kernel_is_the_batched_product_whichever_output_is_used(
    native, kernel_calls, used
):
    torch.manual_seed(6)
    weights = torch.randn(5, 7, 4, 5, requires_grad=True)
    streams = torch.randn(5, 7, 4, 24, requires_grad=True)
    results = []
    for on in (True, False):
        native(on)
        read, mixed = read_and_mix(weights, streams)
        loss = {"read": read.sin().sum(), "mixed": mixed.sin().sum()}.get(used)
        loss = read.sin().sum() + mixed.cos().sum() if loss is None else loss
        results.append([read, mixed, *torch.autograd.grad(loss, (weights, streams))])
    assert kernel_calls == ["read_out", "read_out_backward"]
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_record_names_the_kernels_that_ran_in_its_cell(native):
    """HC's kernels change a result's float rounding, so a record says whether they ran: per
    cell, not per process (a worker that trained HC has them loaded for its next cell)."""
    from helpers import make_cell

    from suite.run.runner import run_cell, run_pack

    native(True)
    built = variants.native.cache_dir()
    (hc_build,) = run_cell(make_cell("hc", steps=3))[0]["native_kernels"].split(",")
    # The build, not just the name: a kernel's source changes the key, and with it the name.
    assert hc_build.startswith("hyper_connection-") and (built / f"{hc_build}.so").is_file()
    assert run_cell(make_cell("preln", steps=3))[0]["native_kernels"] == ""
    mhc_builds = run_cell(make_cell("mhc", steps=3))[0]["native_kernels"].split(",")
    assert {build.rsplit("-", 1)[0] for build in mhc_builds} == {"hyper_connection", "mhc_mappings"}
    packed = run_pack([make_cell("mhc", lr=lr, steps=3) for lr in (1e-3, 3e-3)])
    for record, _ in packed:
        names = {build.rsplit("-", 1)[0] for build in record["native_kernels"].split(",")}
        assert "sinkhorn" in names and all(
            (built / f"{build}.so").is_file() for build in record["native_kernels"].split(",")
        )
    native(False)
    assert run_cell(make_cell("hc", steps=3))[0]["native_kernels"] == ""


def test_a_second_derivative_through_the_read_out_is_pytorchs(native):
    """The kernel's backward is not differentiable again, so under create_graph the batched
    products run: a gradient of a gradient is the same with the kernels on or off."""
    torch.manual_seed(7)
    weights, streams = torch.randn(6, 3, 4), torch.randn(6, 3, 8, requires_grad=True)
    results = []
    for on in (True, False):
        native(on)
        read, mixed = read_and_mix(weights, streams)
        (grad,) = torch.autograd.grad(read.sin().sum() + mixed.square().sum(), streams,
                                      create_graph=True)  # fmt: skip
        results.append(torch.autograd.grad(grad.square().sum(), streams)[0])
    torch.testing.assert_close(*results)


def test_under_a_function_transform_pytorchs_path_runs(native, kernel_calls):
    """vmap over something else (the connection's own tensors unbatched): no kernel without a
    vmap rule is reached, and the result is the plain call's."""
    native(True)
    module = HyperConnection(8, 2, 0, dynamic=True, eps=1e-5)
    x = torch.randn(3, 2, 8)
    scaled = torch.func.vmap(lambda y: module(x, torch.tanh).sum() * y)(torch.randn(2))
    assert "forward" not in kernel_calls
    assert torch.isfinite(scaled).all()


def test_no_tokens_give_empty_weights(native):
    native(True)
    module = HyperConnection(9, 2, 1, dynamic=True, eps=1e-5)
    weights, write = module.connection_weights(torch.randn(0, 2, 9))
    assert weights.shape == (0, 2, 3) and write.shape == (0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_write_back_kernel_is_addcmuls_gradient(native, kernel_calls, dtype):
    """streams + write ⊗ output per token: the kernel's gradients of write and output are
    addcmul's to float rounding (float64: 1e-12; float32: within 4x addcmul's own error against
    float64, plus 4e-6 of the largest entry), the streams' its gradient as it came; one set of
    weights for all tokens (SHC's B) runs addcmul's own backward."""
    from variants.streams import write_back

    torch.manual_seed(8)
    shapes = [(3, 11, 4, 12), (3, 11, 4), (3, 11, 12)]  # 12: a row's tail after 8-wide lanes
    exact = [torch.randn(shape, dtype=torch.float64) for shape in shapes]
    upstream = torch.randn(shapes[0], dtype=torch.float64)

    def gradients(on: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        native(on)
        inputs = [t.to(dtype).requires_grad_() for t in exact]
        out = write_back(*inputs)
        return [out, *torch.autograd.grad((out * upstream.to(dtype)).sum(), inputs)]

    want = gradients(False, torch.float64)
    pytorch = gradients(False, dtype)
    assert kernel_calls == []
    got = gradients(True, dtype)
    assert kernel_calls == ["write_back_backward"]
    for g, p, w in zip(got, pytorch, want, strict=True):
        bound = (
            4 * (p.double() - w).abs().max()
            + (4e-6 if dtype == torch.float32 else 1e-12) * w.abs().max()
        )
        assert (g.double() - w).abs().max() <= bound, tuple(w.shape)
    kernel_calls.clear()
    shared_write = torch.randn(4, dtype=torch.float64, requires_grad=True)
    static = [exact[0].clone().requires_grad_(), shared_write, exact[2].clone().requires_grad_()]
    write_back(*static).sum().backward()
    assert kernel_calls == [] and static[1].grad is not None


def test_a_second_derivative_through_the_write_back_is_addcmuls(native):
    """Under create_graph the write-back's backward runs as autograd ops (differentiable
    again): a gradient of a gradient is the same with the kernels on or off."""
    from variants.streams import write_back

    torch.manual_seed(9)
    streams, output = torch.randn(5, 3, 8), torch.randn(5, 8, requires_grad=True)
    write = torch.randn(5, 3, requires_grad=True)
    results = []
    for on in (True, False):
        native(on)
        out = write_back(streams, write, output)
        (grad,) = torch.autograd.grad(out.sin().sum(), write, create_graph=True)
        results.append(torch.autograd.grad(grad.square().sum(), (write, output)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


def test_the_diagnostics_read_the_connection_weights_by_the_kernels(native, kernel_calls):
    """connection_weights where autograd records nothing (the diagnostics' stream mixing) runs
    the kernels and gives PyTorch's path's weights (float64, to 1e-12); with gradients it is
    PyTorch's path, differentiable through both outputs."""
    module = perturbed_connection(8, 2, 1, seed=10)
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64)
    native(True)
    with torch.no_grad():
        by_kernels = module.connection_weights(x)
    assert "forward" in kernel_calls and "read_out" in kernel_calls
    kernel_calls.clear()
    by_pytorch = module.connection_weights(x)
    assert kernel_calls == []
    for got, want in zip(by_kernels, by_pytorch, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    assert all(output.grad_fn is not None for output in by_pytorch)
