"""The verdict of a run, judged from its stored loss curve (definitions: docs/results.md,
Verdicts).

Only the divergence stop acts during training (:func:`divergence_reason`): it changes what is
trained, so its knob (``blowup_factor``) is part of a cell's identity. Everything else here is a
label computed from the curve by :func:`judge_curve`, at collect time, so a label knob
(``stall_margin``, ``final_window``, ``borderline_margin``, ``late_escape_fraction``) changes
verdicts by re-collecting, never by re-training.

- ``diverged``: a non-finite loss or gradient, or the loss above ``blowup_factor`` × its initial
  value; the run stopped at that step.
- ``stalled``: did not learn within its budget of N steps: the final training loss (mean of the
  last ``final_window`` steps) is not below the stall threshold, ``stall_margin`` nats under the
  corpus's unigram entropy, i.e. no better than token frequencies (the plateau Post-LN sits on).
- ``converged``: everything else.
- ``untrained``: a zero-step run (``train.steps=0``), which only measures the model at init.

Beside the verdict: the **escape step** (first step at which the training loss, averaged over the
trailing ``final_window`` steps as the final loss is, is below the same threshold; none when it
never was: censored at the budget; every converged run has one), **relapse** (escaped, then
ended above the threshold) and **borderline** (a verdict that could flip: the final loss within
``borderline_margin`` of the threshold, or an escape in the last ``late_escape_fraction`` of the
budget).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from suite.config import LABEL_KNOBS, VerdictConfig
from suite.store import curve_length, read_curve_columns

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
    return trailing_mean(list(losses), len(losses) - 1, cfg.final_window)


def trailing_mean(losses: Sequence[float], step: int, window: int) -> float:
    """Mean of the losses of the ``window`` steps up to and including ``step`` (fewer at the
    start); the same sum in the same order wherever it is asked for, so the final loss and the
    smoothed loss at the last step are one number."""
    tail = losses[max(0, step - window + 1) : step + 1]
    return sum(tail) / len(tail) if len(tail) else math.nan


def escape_step(losses: Sequence[float], threshold: float, window: int) -> int | None:
    """First step whose trailing mean over ``window`` steps is below ``threshold``; None if it
    never was (a non-finite loss only ever ends a curve: the steps before it are judged)."""
    losses = list(losses)
    finite = next((i for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    for step in range(finite):
        if trailing_mean(losses, step, window) < threshold:
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
    escaped = escape_step(losses, threshold, cfg.final_window)
    ended_above = not last < threshold  # also when nan: a run must get below to converge
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


def judge_stored(
    store: str | Path, record: dict[str, Any], cfg: VerdictConfig
) -> tuple[Judgement, dict[str, list[Any]]]:
    """Judge a finished run from its curve in the store, and that curve (column by column).
    Raises OSError, ValueError, KeyError, TypeError or OverflowError when the curve is missing,
    unreadable or not the one the record describes (another number of steps)."""
    curve = read_curve_columns(store, record["cell_id"], record)
    losses = [float(loss) for loss in curve.get("loss", [])]
    expected = curve_length(record)
    if len(losses) != expected:
        raise ValueError(f"{len(losses)} steps stored, the record has {expected}")
    diverged = record.get("diverged_step") is not None
    budget, entropy = int(record["steps"]), float(record["unigram_entropy"])
    return judge_curve(losses, diverged, budget, entropy, cfg), curve


def rule_description(cfg: VerdictConfig) -> str:
    """The rule version and label-knob values that judged a table, e.g. for its records."""
    knobs = asdict(cfg)
    return f"v{RULE_VERSION} " + " ".join(f"{key}={knobs[key]:g}" for key in LABEL_KNOBS)
