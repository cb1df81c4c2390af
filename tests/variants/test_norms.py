"""variants.norms: the factored RMSNorm scale mHC projects with."""

from __future__ import annotations

import torch

from variants.norms import inverse_rms


def _as_written(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_inverse_rms_and_its_first_and_second_derivatives_are_the_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True) * 2

    def ours(t: torch.Tensor) -> torch.Tensor:
        return inverse_rms(t, 1e-3)

    torch.testing.assert_close(ours(x), _as_written(x, 1e-3))
    upstream = torch.randn(3, 5, 1, dtype=torch.float64)
    (got,) = torch.autograd.grad((ours(x) * upstream).sum(), x)
    (want,) = torch.autograd.grad((_as_written(x, 1e-3) * upstream).sum(), x)
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(ours, (x,)) and torch.autograd.gradgradcheck(ours, (x,))


def test_inverse_rms_runs_in_fp32_for_half_precision_and_vmaps_over_members():
    """bfloat16 streams get an fp32 statistic (cast back), as RMSNorm computes it; packed runs
    vmap over members, each member's gradient its own."""
    x = torch.randn(4, 6, 32)
    half = inverse_rms(x.bfloat16(), 1e-5)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(
        half.float(), _as_written(x.bfloat16().float(), 1e-5), rtol=1e-2, atol=0
    )

    def loss(t: torch.Tensor) -> torch.Tensor:
        return inverse_rms(t, 1e-5).sin().sum()

    grads = torch.func.vmap(torch.func.grad(loss))(x)
    torch.testing.assert_close(grads[2], torch.func.grad(loss)(x[2]))
    member = x[2].clone().requires_grad_()
    (want,) = torch.autograd.grad(_as_written(member, 1e-5).sin().sum(), member)
    torch.testing.assert_close(grads[2], want)


def test_inverse_rms_stays_fp32_under_bf16_autocast():
    """Autocast lists vecdot among the ops it runs in bf16; the statistic must not follow
    (a bf16 rms is ~4e-3 off: measured 5.7e-3 relative at rms 1e-2 to 1e2)."""
    torch.manual_seed(1)
    x = (torch.randn(512, 256) * torch.logspace(-2, 2, 512)[:, None]).requires_grad_()
    upstream = torch.randn(512, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = inverse_rms(x, 1e-5)
    (grad,) = torch.autograd.grad((got * upstream).sum(), x)
    exact = _as_written(x.double(), 1e-5)
    (want,) = torch.autograd.grad((_as_written(x, 1e-5) * upstream).sum(), x)
    assert got.dtype == torch.float32
    assert ((got.double() - exact) / exact).abs().max() < 1e-5
    assert ((grad - want).abs().max() / want.abs().max()) < 1e-5
