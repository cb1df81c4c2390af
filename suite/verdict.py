"""The verdict of a run, judged from its stored loss curve (definitions in the README, Verdicts).

Only the divergence stop acts during training (:func:`divergence_reason`): it changes what is
trained, so its knob (``blowup_factor``) is part of a cell's identity. Everything else here is a
label computed from the curve by :func:`judge_curve`, at collect time, so a label knob
(``stall_margin``, ``final_window``, ``smooth_window``, ``borderline_margin``,
``late_escape_fraction``) changes verdicts by re-collecting, never by re-training.

- ``diverged``: a non-finite loss or gradient, or the loss above ``blowup_factor`` × its initial
  value; the run stopped at that step.
- ``stalled``: did not learn within its budget of N steps: the final training loss (mean of the
  last ``final_window`` steps) is not ``stall_margin`` nats below the corpus's unigram entropy,
  i.e. no better than token frequencies (the plateau deep Post-LN sits on).
- ``converged``: everything else.
- ``untrained``: a zero-step run (``train.steps=0``), which only measures the model at init.

Beside the verdict: the **escape step** (first step at which the training loss, averaged over the
trailing ``smooth_window`` steps, is below the same threshold; none when it never was: censored
at the budget), **relapse** (escaped, then ended above the threshold) and **borderline** (a
verdict that could flip: the final loss within ``borderline_margin`` of the threshold, or an
escape in the last ``late_escape_fraction`` of the budget).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from suite.config import LABEL_KNOBS, VerdictConfig

CONVERGED, STALLED, DIVERGED, UNTRAINED = "converged", "stalled", "diverged", "untrained"
VERDICTS = (CONVERGED, STALLED, DIVERGED, UNTRAINED)

# Bumped whenever a rule below changes meaning; every collected table records it.
# 1: judged at training time from the final loss. 2: judged from the stored curve at collect
# time, with escape step, relapse and borderline.
RULE_VERSION = 2


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


def smoothed(losses: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` steps at each step (fewer at the start)."""
    out, total = [], 0.0
    for step, loss in enumerate(losses):
        total += loss
        if step >= window:
            total -= losses[step - window]
        out.append(total / min(step + 1, window))
    return out


def escape_step(losses: Sequence[float], threshold: float, window: int) -> int | None:
    """First step whose smoothed loss is below ``threshold``; None if it never was."""
    losses = list(losses)
    if not all(math.isfinite(v) for v in losses):
        # A non-finite loss only ever ends a curve (the divergence stop); judge the steps before.
        losses = losses[: next(i for i, v in enumerate(losses) if not math.isfinite(v))]
    for step, value in enumerate(smoothed(losses, window)):
        if value < threshold:
            return step
    return None


@dataclass(frozen=True)
class Judgement:
    """Everything :func:`judge_curve` derives from one run's curve."""

    verdict: str
    final_loss: float
    stall_threshold: float  # unigram entropy − stall_margin: the loss a run must get below
    escape_step: int | None
    relapsed: bool
    borderline: bool

    def fields(self) -> dict[str, object]:
        return asdict(self)


def judge_curve(
    losses: Sequence[float],
    diverged: bool,
    budget: int,
    unigram_entropy: float,
    cfg: VerdictConfig,
) -> Judgement:
    """Judge a run from its per-step training losses and its budget of ``budget`` steps."""
    threshold = unigram_entropy - cfg.stall_margin
    last = final_loss(losses, cfg)
    escaped = escape_step(losses, threshold, cfg.smooth_window)
    ended_above = not math.isfinite(last) or last > threshold
    if diverged:
        verdict = DIVERGED
    elif not losses:
        verdict = UNTRAINED
    else:
        verdict = STALLED if ended_above else CONVERGED
    near_threshold = math.isfinite(last) and abs(last - threshold) < cfg.borderline_margin
    late_escape = escaped is not None and escaped >= (1 - cfg.late_escape_fraction) * budget
    return Judgement(
        verdict=verdict,
        final_loss=last,
        stall_threshold=threshold,
        escape_step=escaped,
        relapsed=verdict != DIVERGED and escaped is not None and ended_above,
        borderline=verdict in (CONVERGED, STALLED) and (near_threshold or late_escape),
    )


def judge(
    losses: Sequence[float], diverged: bool, unigram_entropy: float, cfg: VerdictConfig
) -> str:
    """The verdict alone (the budget only matters for the borderline flag)."""
    return judge_curve(losses, diverged, len(losses), unigram_entropy, cfg).verdict


def rule_description(cfg: VerdictConfig) -> str:
    """The rule version and label-knob values that judged a table, e.g. for its records."""
    knobs = asdict(cfg)
    return f"v{RULE_VERSION} " + " ".join(f"{key}={knobs[key]:g}" for key in LABEL_KNOBS)
