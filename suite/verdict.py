"""The verdict of a run: converged, stalled or diverged (definitions in DESIGN.md).

- ``diverged``: a non-finite loss or gradient, or the loss above ``blowup_factor`` × its initial
  value. Detected step by step so the run stops at once.
- ``stalled``: finished, but the final training loss never got ``stall_margin`` nats below the
  unigram entropy of the corpus, i.e. the model learned no more than token frequencies (the
  "bad local optimum" Post-LN sits in at depth).
- ``converged``: everything else.
- ``untrained``: a zero-step run (``train.steps=0``), which only measures the model at init.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from suite.config import VerdictConfig

CONVERGED, STALLED, DIVERGED, UNTRAINED = "converged", "stalled", "diverged", "untrained"
VERDICTS = (CONVERGED, STALLED, DIVERGED, UNTRAINED)


def divergence_reason(
    loss: float, grad_norm: float, initial_loss: float, cfg: VerdictConfig
) -> str | None:
    """Why this step counts as divergence, or None if it does not."""
    if not math.isfinite(loss):
        return "non-finite loss"
    if not math.isfinite(grad_norm):
        return "non-finite gradient"
    if loss > cfg.blowup_factor * initial_loss:
        return f"loss {loss:.3g} > {cfg.blowup_factor:g} × initial {initial_loss:.3g}"
    return None


def final_loss(losses: Sequence[float], cfg: VerdictConfig) -> float:
    """Mean training loss over the last ``final_window`` steps (nan when there are none)."""
    tail = list(losses)[-cfg.final_window :]
    return sum(tail) / len(tail) if tail else math.nan


def judge(
    losses: Sequence[float], diverged: bool, unigram_entropy: float, cfg: VerdictConfig
) -> str:
    """Verdict of a finished (or stopped) run from its per-step training losses."""
    if diverged:
        return DIVERGED
    if not losses:
        return UNTRAINED
    last = final_loss(losses, cfg)
    if not math.isfinite(last) or last > unigram_entropy - cfg.stall_margin:
        return STALLED
    return CONVERGED
