"""Verdict logic on crafted loss curves."""

from __future__ import annotations

import math

from suite.config import VerdictConfig
from suite.verdict import (
    CONVERGED,
    DIVERGED,
    STALLED,
    UNTRAINED,
    divergence_reason,
    final_loss,
    judge,
)

CFG = VerdictConfig(blowup_factor=2.0, stall_margin=0.1, final_window=10)
ENTROPY = 3.2


def test_nan_loss_is_divergence():
    assert divergence_reason(math.nan, 1.0, 5.5, CFG) == "non-finite loss"
    assert divergence_reason(math.inf, 1.0, 5.5, CFG) == "non-finite loss"


def test_non_finite_gradient_is_divergence_even_with_finite_loss():
    assert divergence_reason(4.0, math.inf, 5.5, CFG) == "non-finite gradient"
    assert divergence_reason(4.0, math.nan, 5.5, CFG) == "non-finite gradient"


def test_blow_up_above_factor_times_initial_loss():
    assert divergence_reason(11.1, 1.0, 5.5, CFG).startswith("loss 11.1 > 2 × initial")
    assert divergence_reason(10.9, 1.0, 5.5, CFG) is None
    assert divergence_reason(2.0, 1.0, 5.5, CFG) is None


def test_healthy_curve_converges():
    losses = [5.5 - 0.02 * i for i in range(150)]  # ends near 2.5, well below the entropy
    assert judge(losses, diverged=False, unigram_entropy=ENTROPY, cfg=CFG) == CONVERGED


def test_curve_stuck_at_unigram_entropy_is_stalled():
    losses = [5.5, 4.0, 3.5] + [ENTROPY + 0.05 * (-1) ** i for i in range(100)]
    assert judge(losses, diverged=False, unigram_entropy=ENTROPY, cfg=CFG) == STALLED


def test_just_below_entropy_but_within_margin_is_still_stalled():
    losses = [5.5] + [ENTROPY - 0.05] * 20
    assert judge(losses, False, ENTROPY, CFG) == STALLED
    losses = [5.5] + [ENTROPY - 0.15] * 20
    assert judge(losses, False, ENTROPY, CFG) == CONVERGED


def test_final_loss_averages_the_last_window():
    losses = [9.0] * 5 + [2.0, 4.0] * 5
    assert final_loss(losses, CFG) == 3.0
    assert math.isnan(final_loss([], CFG))


def test_diverged_run_is_diverged_whatever_its_loss():
    assert judge([5.5, 2.0, math.nan], diverged=True, unigram_entropy=ENTROPY, cfg=CFG) == DIVERGED


def test_run_with_no_steps_is_untrained_not_converged():
    assert judge([], diverged=False, unigram_entropy=ENTROPY, cfg=CFG) == UNTRAINED
