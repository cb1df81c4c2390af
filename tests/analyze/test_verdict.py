"""Verdict logic on crafted loss curves: the verdict, escape step, relapse, borderline."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from suite.config import VerdictConfig
from suite.verdict import (
    CONVERGED,
    DIVERGED,
    STALLED,
    UNTRAINED,
    divergence_reason,
    final_loss,
    judge,
    judge_curve,
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


# --- judged from the curve: escape step, relapse, censoring, borderline -----------------------

THRESHOLD = ENTROPY - CFG.stall_margin  # 3.1


def plateau_then_learn(plateau_steps: int, total: int, low: float = 2.5) -> list[float]:
    """Loss on the unigram plateau (just above the threshold) for ``plateau_steps``, then a
    straight drop to ``low``."""
    return [ENTROPY] * plateau_steps + [low] * (total - plateau_steps)


def test_escape_step_is_the_first_step_the_smoothed_loss_is_below_the_threshold():
    losses = plateau_then_learn(40, 100)
    # A 10-step trailing mean of 3.2 ... then 2.5: below 3.1 once 2 of its 10 steps are 2.5.
    judgement = judge_curve(losses, False, 100, ENTROPY, CFG)
    assert judgement.escape_step == 41
    assert judgement.verdict == CONVERGED and not judgement.relapsed
    assert judgement.stall_threshold == pytest.approx(THRESHOLD)


def test_one_lucky_batch_does_not_count_as_an_escape():
    losses = [ENTROPY] * 50 + [2.5] + [ENTROPY] * 49  # one batch 0.7 nats down, smoothed away
    judgement = judge_curve(losses, False, 100, ENTROPY, CFG)
    assert judgement.escape_step is None and judgement.verdict == STALLED


def test_never_escaping_run_is_censored_not_given_a_step():
    judgement = judge_curve([ENTROPY + 0.3] * 200, False, 200, ENTROPY, CFG)
    assert judgement.escape_step is None and judgement.verdict == STALLED
    assert not judgement.relapsed and not judgement.borderline  # 0.4 nats from the threshold


def test_relapse_is_an_escape_that_ends_above_the_threshold():
    losses = plateau_then_learn(30, 120)[:80] + [ENTROPY + 0.2] * 40
    judgement = judge_curve(losses, False, 120, ENTROPY, CFG)
    assert judgement.escape_step == 31
    assert judgement.verdict == STALLED and judgement.relapsed


def test_late_escape_is_borderline_early_escape_is_not():
    late = judge_curve(plateau_then_learn(170, 200, low=2.0), False, 200, ENTROPY, CFG)
    assert late.verdict == CONVERGED and late.escape_step >= 150 and late.borderline
    early = judge_curve(plateau_then_learn(20, 200, low=2.0), False, 200, ENTROPY, CFG)
    assert early.verdict == CONVERGED and not early.borderline


def test_final_loss_near_the_threshold_is_borderline_on_either_side():
    for offset in (-0.03, 0.03):
        losses = [5.0] * 10 + [THRESHOLD + offset] * 190
        judgement = judge_curve(losses, False, 200, ENTROPY, CFG)
        assert judgement.borderline, offset
    assert (
        judge_curve([5.0] * 10 + [THRESHOLD - 0.03] * 190, False, 200, ENTROPY, CFG).verdict
        == CONVERGED
    )
    far = judge_curve([5.0] * 10 + [THRESHOLD - 0.5] * 190, False, 200, ENTROPY, CFG)
    assert not far.borderline


def test_diverged_run_keeps_the_escape_it_made_and_is_never_borderline():
    losses = plateau_then_learn(20, 60) + [math.nan]
    judgement = judge_curve(losses, True, 200, ENTROPY, CFG)
    assert judgement.verdict == DIVERGED and judgement.escape_step == 21
    assert not judgement.relapsed and not judgement.borderline


def test_label_knobs_change_the_verdict_of_the_same_curve():
    losses = [5.0] * 10 + [ENTROPY - 0.15] * 190
    assert judge_curve(losses, False, 200, ENTROPY, CFG).verdict == CONVERGED
    wider = VerdictConfig(stall_margin=0.2)
    assert judge_curve(losses, False, 200, ENTROPY, wider).verdict == STALLED


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=8.0), min_size=1, max_size=60),
    st.integers(min_value=1, max_value=15),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_every_converged_run_has_an_escape_step_and_every_stalled_escape_is_a_relapse(
    losses, window, margin
):
    cfg = VerdictConfig(final_window=window, stall_margin=margin)
    judgement = judge_curve(losses, False, len(losses), ENTROPY, cfg)
    if judgement.verdict == CONVERGED:
        assert judgement.escape_step is not None
        assert judgement.final_loss < judgement.stall_threshold
    else:
        assert judgement.verdict == STALLED
        assert judgement.relapsed == (judgement.escape_step is not None)
