"""What the variants' hand-written autograd Functions (variants.attnres, variants.streams,
variants.mhc) share."""

from __future__ import annotations

import torch
from torch import Tensor


def apply_function(
    function: type[torch.autograd.Function], *args: Tensor | float | int
) -> Tensor | tuple[Tensor, ...]:
    """``function.apply(*args)``, or where reverse-mode autograd records nothing (under
    ``no_grad``: the suite's evaluation and diagnostics) the function's forward alone, the same
    computation. torch.compile (torch 2.13) failed to trace AttnRes's ``_AttendOverDepth.apply``
    under ``no_grad`` (an AttributeError on ``values[0].dtype`` inside dynamo) and broke the graph
    there; the frames around the break then compiled again for every new model, 7–10 s a compiled
    Block AttnRes cell (docs/performance.md). HC's and mHC's Functions traced whole either way;
    every Function in ``variants/`` is called through here alike. Only for a Function whose
    forward is its whole computation (not one used for its vmap rule alone, as
    ``suite.run.model._MembersFoldedIntoBatch``). Under vmap (packed runs) always ``apply``, so
    that a Function's own vmap rule runs (mHC's Sinkhorn folds the members into its tokens).
    Every argument positional: forward's defaults are not filled in.
    """
    if functorch_transforms_active():
        return function.apply(*args)
    if not torch.is_grad_enabled():
        return function.forward(*args)
    if torch.compiler.is_compiling():
        return function.apply(*args)  # dynamo traces Function.apply by name
    # Function.apply binds the arguments to forward's signature on every call (for a Function
    # with setup_context: inspect.signature, 44 µs a call with 12 arguments against 12 µs
    # without, measured) only to fill in defaults these Functions do not have, then calls the
    # C apply below, which records the autograd node.
    return super(torch.autograd.Function, function).apply(*args)


def functorch_transforms_active() -> bool:
    """Whether a torch.func transform (vmap: packed runs) is running."""
    # A private torch query; should it go away, vmap still works through torch's slow fallback.
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())
