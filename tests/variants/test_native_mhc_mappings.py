"""variants/native/mhc_mappings.c: mHC's mappings (H_pre, H_post, Sinkhorn's H_res) as one
kernel, forward and backward, against PyTorch's ops (the same formula, another rounding) and
float64, at the logits far apart that mHC reaches at high LR, and with NaN (a divergence must
show)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_as_accurate_as_pytorch, needs_compiler, record_calls

from variants.mhc import ManifoldHyperConnection, sinkhorn_knopp
from variants.native import mhc_mappings

pytestmark = needs_compiler


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return record_calls(monkeypatch, mhc_mappings, ("forward", "backward"))


def mappings(
    native, on: bool, dtype: torch.dtype, streams: int, spread: float, used: str = "both"
) -> list[torch.Tensor]:
    """[H_pre | H_resᵀ], H_post and every gradient of one mHC connection's mappings, the kernel
    on or off; the same parameters and inputs (drawn in float64) whatever the dtype. 2 x 37
    tokens cross the kernel's 64-token blocks; ``spread`` scales the parameters' perturbation
    (20: logits tens apart, Sinkhorn far from uniform)."""
    native(on)
    torch.manual_seed(3)
    module = ManifoldHyperConnection(12, streams, 1e-5, 4.0, iterations=20).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
        for alpha in (module.alpha_pre, module.alpha_post, module.alpha_res):
            alpha.mul_(spread)
    module = module.to(dtype)
    x = torch.randn(2, 37, streams, 12, dtype=torch.float64).to(dtype).requires_grad_()
    upstream = torch.randn(2, 37, streams, streams + 1, dtype=torch.float64).to(dtype)
    upstream_post = torch.randn(2, 37, streams, dtype=torch.float64).to(dtype)
    weights, post = module.connection_weights(x)
    loss = {
        "weights": (weights * upstream).sum(),
        "post": (post * upstream_post).sum(),
        "both": (weights * upstream).sum() + (post * upstream_post).sum(),
    }[used]
    inputs = [x, *module.parameters()]
    # PyTorch's ops leave the parameters of an unused output out of the graph: zeros.
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    return [weights, post, *grads]


@pytest.mark.parametrize("streams", [1, 3, 4])
@pytest.mark.parametrize("spread", [1.0, 20.0])
def test_the_kernel_is_as_accurate_as_pytorch_in_float32_every_gradient_too(
    native, kernel_calls, streams, spread
):
    """Each output's error against float64 within 4x PyTorch's float32 error plus 4e-6 of its
    largest entry (sums over tokens cancel, so that bound rather than a relative one)."""
    exact = mappings(native, False, torch.float64, streams, spread)
    pytorch = mappings(native, False, torch.float32, streams, spread)
    assert kernel_calls == []
    kernel = mappings(native, True, torch.float32, streams, spread)
    assert kernel_calls == ["forward", "backward"]
    assert_as_accurate_as_pytorch(kernel, pytorch, exact)


@pytest.mark.parametrize("used", ["weights", "post"])
def test_in_float64_it_agrees_to_float64_rounding_whichever_output_is_used(
    native, kernel_calls, used
):
    kernel = mappings(native, True, torch.float64, 4, 1.0, used)
    assert kernel_calls == ["forward", "backward"]
    pytorch = mappings(native, False, torch.float64, 4, 1.0, used)
    for got, want in zip(kernel, pytorch, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())


def test_the_kernels_gradient_is_the_mappings_gradient(native, kernel_calls):
    native(True)
    torch.manual_seed(5)
    module = ManifoldHyperConnection(6, 3, 1e-5, 4.0, iterations=7).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    x = torch.randn(2, 5, 3, 6, dtype=torch.float64, requires_grad=True)
    parameters = tuple(module.parameters())
    assert torch.autograd.gradcheck(lambda x, *_: module.connection_weights(x), (x, *parameters))
    assert "backward" in kernel_calls


def log_domain_sinkhorn(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    for _ in range(iterations):
        logits = logits - logits.logsumexp(dim=-2, keepdim=True)
        logits = logits - logits.logsumexp(dim=-1, keepdim=True)
    return logits.exp()


def test_logits_thousands_apart_give_pytorchs_accuracy_and_a_finite_gradient(native):
    """The kernel's own exp and log over float's whole range: a row or a column 5000 below the
    others (as mHC's logits reached at high LR), logits up to 1000 · N(0, 1), the denormals
    flushed as in training. Against float64's log-domain iterations, the matrix and its
    gradient are within 2x PyTorch's float32 error (measured: the same to 2e-7; both ~7e-5
    from float64, the rounding of logits in the thousands) and finite."""
    native(True)
    n, tokens = 4, 100
    generator = torch.Generator().manual_seed(13)
    scale = torch.logspace(0, 3, tokens)[:, None, None]
    logits = torch.randn(tokens, n, n, generator=generator) * scale
    logits[::3, 2] -= 5000
    logits[1::3, :, 1] -= 5000
    upstream = torch.randn(tokens, n, n, generator=generator)
    # Through the kernel's operands: p = raw · 1, logits = 1 · p_res + 0.
    raw = torch.cat([torch.zeros(tokens, 2 * n), logits.reshape(tokens, n * n)], dim=1)
    alpha, bias, ones = torch.ones(3), torch.zeros(2 * n + n * n), torch.ones(tokens)
    weights = torch.cat([torch.zeros(tokens, n, 1), upstream.transpose(-1, -2)], dim=-1)
    pytorch_logits = logits.clone().requires_grad_()
    flushed = torch.set_flush_denormal(True)
    try:
        kernel = mhc_mappings.forward(raw, ones, alpha, bias, n, 19)[0]
        kernel = kernel[..., 1:].transpose(-1, -2)
        grad_raw = mhc_mappings.backward(weights, None, raw, ones, alpha, bias, n, 19)[0]
        pytorch = sinkhorn_knopp(pytorch_logits, 20)
        (pytorch_grad,) = torch.autograd.grad((pytorch * upstream).sum(), pytorch_logits)
    finally:
        torch.set_flush_denormal(False)
    assert flushed  # x86: the setting took
    exact_logits = logits.double().requires_grad_()
    exact = log_domain_sinkhorn(exact_logits, 20)
    (exact_grad,) = torch.autograd.grad((exact * upstream.double()).sum(), exact_logits)
    kernel_grad = grad_raw[:, 2 * n :].view(tokens, n, n)
    assert torch.isfinite(kernel_grad).all()
    pairs = [(kernel, pytorch, exact), (kernel_grad, pytorch_grad, exact_grad)]
    for got, reference, want in pairs:
        bound = 2 * (reference.double() - want).abs().max() + 1e-6
        assert (got.double() - want).abs().max() <= bound


def test_a_nan_in_the_projection_comes_out_as_nan_for_its_token_alone(native):
    """A diverging run must show NaN, not mappings the sigmoid or Sinkhorn clipped."""
    native(True)
    n, tokens = 4, 3
    raw, ones = torch.randn(tokens, 2 * n + n * n), torch.ones(tokens)
    raw[1, 2 * n + 5] = float("nan")
    weights, post = mhc_mappings.forward(raw, ones, torch.ones(3), torch.zeros(24), n, 19)
    assert weights[1, :, 1:].isnan().all()
    assert not weights[[0, 2]].isnan().any() and not post.isnan().any()
    raw[2, 0] = float("nan")
    weights, _ = mhc_mappings.forward(raw, ones, torch.ones(3), torch.zeros(24), n, 19)
    assert weights[2, 0, 0].isnan() and not weights[2, 1:, 0].isnan().any()
