"""variants/native/depth_attention.c: AttnRes's depth attention, forward and backward, against
PyTorch's ops (the same formula, another rounding) and float64, and with NaN (a divergence must
show)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_as_accurate_as_pytorch, needs_compiler, record_calls

from variants.attnres import DepthAttention
from variants.native import depth_attention

pytestmark = needs_compiler


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return record_calls(monkeypatch, depth_attention, ("forward", "backward"))


def read(native, on: bool, dtype: torch.dtype, slots: int, width: int) -> list[torch.Tensor]:
    """One depth attention's read and every gradient (slots, query, key norm's gain), the kernel
    on or off; the same draws (in float64) whatever the dtype. 2 x 37 tokens cross the
    kernel's 64-token blocks; slot i's scale grows with i, so the softmax is far from uniform."""
    native(on)
    torch.manual_seed(8)
    attention = DepthAttention(width, 1e-5).double()
    with torch.no_grad():
        attention.query.normal_()
        attention.key_norm.weight.add_(torch.randn(width, dtype=torch.float64) * 0.3)
    attention = attention.to(dtype)
    values = [
        (torch.randn(2, 37, width, dtype=torch.float64) * (1 + i)).to(dtype).requires_grad_()
        for i in range(slots)
    ]
    upstream = torch.randn(2, 37, width, dtype=torch.float64).to(dtype)
    out = attention(tuple(values))
    inputs = [*values, *attention.parameters()]
    return [out, *torch.autograd.grad((out * upstream).sum(), inputs)]


@pytest.mark.parametrize("slots", [1, 2, 9])
@pytest.mark.parametrize("width", [12, 64])  # 12: a row's tail after the 8-wide lanes
def test_the_kernel_is_as_accurate_as_pytorch_in_float32_every_gradient_too(
    native, kernel_calls, slots, width
):
    """Each output's error against float64 within 4x PyTorch's float32 error plus 4e-6 of its
    largest entry."""
    exact = read(native, False, torch.float64, slots, width)
    pytorch = read(native, False, torch.float32, slots, width)
    assert kernel_calls == []
    kernel = read(native, True, torch.float32, slots, width)
    assert kernel_calls == ["forward", "backward"]
    assert_as_accurate_as_pytorch(kernel, pytorch, exact)


def test_in_float64_it_agrees_to_float64_rounding(native):
    kernel = read(native, True, torch.float64, 5, 64)
    pytorch = read(native, False, torch.float64, 5, 64)
    for got, want in zip(kernel, pytorch, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())


def test_the_kernels_gradient_is_the_reads_gradient(native, kernel_calls):
    native(True)
    torch.manual_seed(9)
    attention = DepthAttention(6, 1e-5).double()
    with torch.no_grad():
        attention.query.normal_()
    values = tuple(torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True) for _ in range(4))
    parameters = tuple(attention.parameters())
    assert torch.autograd.gradcheck(lambda *args: attention(args[: len(values)]),
                                    (*values, *parameters))  # fmt: skip
    assert "backward" in kernel_calls


def test_a_frozen_query_gets_no_gradient_and_the_slots_theirs(native, kernel_calls):
    native(True)
    attention = DepthAttention(16, 1e-5).requires_grad_(False)
    with torch.no_grad():
        attention.query.normal_()
    values = tuple(torch.randn(3, 16, requires_grad=True) for _ in range(3))
    grads = torch.autograd.grad(attention(values).square().sum(), values)
    assert kernel_calls == ["forward", "backward"] and all(g.isfinite().all() for g in grads)


def test_a_nan_in_a_slot_comes_out_as_nan_for_its_token_alone(native, kernel_calls):
    native(True)
    attention = DepthAttention(16, 1e-5)
    with torch.no_grad():
        attention.query.normal_()
        values = [torch.randn(4, 16) for _ in range(3)]
        values[1][2, 7] = float("nan")
        out = attention(tuple(values))
    assert kernel_calls == ["forward"]
    assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()


def test_an_attnres_record_names_the_kernels_build(native):
    from helpers import make_cell

    from suite.run.runner import run_cell

    native(True)
    builds = run_cell(make_cell("attnres", steps=3))[0]["native_kernels"].split(",")
    assert [build.rsplit("-", 1)[0] for build in builds] == ["depth_attention"]


def test_slots_of_different_shapes_are_refused_as_pytorch_refuses_them(native, kernel_calls):
    """The kernel reads every slot as the first one's tokens: slots of another shape must not
    reach it (it read and wrote past the smaller one's end), but PyTorch's error."""
    native(True)
    attention = DepthAttention(8, 1e-5)
    for first, second in [((2, 37, 8), (1, 37, 8)), ((1, 37, 8), (2, 37, 8))]:
        values = (torch.randn(first, requires_grad=True), torch.randn(second, requires_grad=True))
        with pytest.raises(RuntimeError, match="equal size"):
            attention(values).sum().backward()
    assert kernel_calls == []
