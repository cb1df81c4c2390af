"""variants.functions.apply_function: the suite's autograd Functions recorded as themselves,
whichever way it calls them."""

from __future__ import annotations

import torch

from variants.functions import apply_function


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, factor: float) -> torch.Tensor:
        return x * factor

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.factor = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def test_with_gradients_the_function_is_the_recorded_node_and_its_backward_runs():
    """apply_function calls the C apply directly (not Function.apply): should a torch release
    change how a Function's node is made, this fails before a kernel's gradient goes missing."""
    x = torch.randn(3, requires_grad=True)
    y = apply_function(_Double, x, 2.0)
    assert type(y.grad_fn).__name__ == "_DoubleBackward"
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


def test_without_gradients_it_runs_the_forward_alone():
    with torch.no_grad():
        y = apply_function(_Double, torch.ones(2, requires_grad=True), 3.0)
    assert y.grad_fn is None and y.tolist() == [3.0, 3.0]


def test_under_vmap_the_function_applies_as_usual():
    _Double.generate_vmap_rule = True
    try:
        y = torch.func.vmap(lambda row: apply_function(_Double, row, 2.0))(torch.ones(2, 3))
    finally:
        del _Double.generate_vmap_rule
    torch.testing.assert_close(y, torch.full((2, 3), 2.0))
