"""The failure-mechanism rules (suite/mechanism.py): each fires on a curve constructed to show
its signature, none fires on a healthy curve, the earliest signature names the mechanism, and
the thresholds are crossed with a margin on both sides."""

from __future__ import annotations

import math
import random

import pytest

from suite.mechanism import (
    ATTENTION_LOGIT_LIMIT,
    GRADIENT_SPREAD,
    LOG_Z_DRIFT,
    MECHANISMS,
    SATURATION_SHARE,
    SPIKE_LEAD,
    STREAM_GAIN_LIMIT,
    diagnose,
    signatures,
    still_descending,
)

SAMPLED = [*range(10), *range(20, 400, 20)]


def curve(steps: int = 400, loss=None, **sampled) -> dict[str, list]:
    """A curve of ``steps`` rows: ``loss(step)`` every step; each keyword a function of the step
    giving the sampled value (None where not sampled), or a list of per-step values."""
    rng = random.Random(0)
    loss = loss or (lambda s: 2.0 + 3.5 * math.exp(-s / 60) + rng.gauss(0, 0.05))
    columns: dict[str, list] = {"step": list(range(steps)), "loss": [loss(s) for s in range(steps)]}
    for name, value in sampled.items():
        if isinstance(value, list):
            columns[name] = value
        else:
            columns[name] = [value(s) if s in SAMPLED else None for s in range(steps)]
    return columns


def healthy(steps: int = 400, **override) -> dict[str, list]:
    series = dict(
        attn_logit_max=lambda s: 2.0 + s / 20,
        log_z=lambda s: 5.5 - s / 400,
        grad_norm_by_layer=lambda s: [0.5, 0.6, 0.7, 0.8],
        loss_spike=[False] * steps,
        grad_spike=[False] * steps,
    )
    series.update(override)
    return curve(steps, **series)


def test_a_healthy_curve_shows_no_signature_and_a_clean_convergence_no_mechanism():
    assert signatures(healthy(), init_log_z=5.5) == {}
    assert diagnose(healthy(), "converged", 400).mechanism == ""


def jump(before, after, at: int):
    """A sampled series that holds ``before`` until step ``at``, then ``after``."""
    return lambda s: after if s >= at else before


SPREAD_EARLY = [GRADIENT_SPREAD / 10, 1, 1, 1]
SPREAD_LATE = [1, 1, 1, GRADIENT_SPREAD / 10]


@pytest.mark.parametrize(
    ("mechanism", "series", "onset"),
    [
        ("attention_logit_growth", {"attn_logit_max": jump(1, 3 * ATTENTION_LOGIT_LIMIT, 99)}, 100),
        ("output_logit_divergence", {"log_z": jump(5.5, 5.5 + 2 * LOG_Z_DRIFT, 60)}, 60),
        ("vanishing_gradient_early", {"grad_norm_by_layer": jump(None, SPREAD_EARLY, 0)}, 0),
        ("vanishing_gradient_late", {"grad_norm_by_layer": jump(None, SPREAD_LATE, 0)}, 0),
        ("stream_collapse", {"stream_amax_gain": jump(1.0, 5 * STREAM_GAIN_LIMIT, 200)}, 200),
        ("saturation", {"saturation_by_layer": jump([0.1], [2 * SATURATION_SHARE], 40)}, 40),
    ],
)  # fmt: skip
def test_each_rule_fires_on_its_constructed_failure(mechanism, series, onset):
    failed = healthy(**series)
    diagnosis = diagnose(failed, "stalled", 400, init_log_z=5.5)
    assert (diagnosis.mechanism, diagnosis.step) == (mechanism, onset)
    assert mechanism in MECHANISMS


@pytest.mark.parametrize(
    "series",
    [
        {"attn_logit_max": lambda s: ATTENTION_LOGIT_LIMIT / 3},
        {"log_z": lambda s: 5.5 + LOG_Z_DRIFT / 2},
        {"grad_norm_by_layer": lambda s: [GRADIENT_SPREAD * 10, 1, 1, 1]},
        {"stream_amax_gain": lambda s: STREAM_GAIN_LIMIT / 3},
        {"saturation_by_layer": lambda s: [SATURATION_SHARE / 2, 0.0]},
        {"attn_logit_max": lambda s: math.nan},  # unmeasured is no evidence
    ],
)
def test_below_each_threshold_with_a_margin_nothing_fires(series):
    assert signatures(healthy(**series), init_log_z=5.5) == {}


def test_a_spread_that_comes_and_goes_is_not_vanishing():
    """Half the samples from the onset on must show it: one odd sample is not a mechanism."""
    odd = healthy(grad_norm_by_layer=lambda s: [1e-6, 1, 1, 1] if s == 40 else [1, 1, 1, 1])
    assert "vanishing_gradient_early" not in signatures(odd)


def test_the_earliest_signature_names_the_mechanism():
    both = healthy(
        attn_logit_max=lambda s: 1e5 if s >= 100 else 3.0,
        log_z=lambda s: 5.5 + (50 if s >= 40 else 0),
    )
    diagnosis = diagnose(both, "stalled", 400, init_log_z=5.5)
    assert diagnosis.mechanism == "output_logit_divergence" and diagnosis.step == 40
    assert diagnosis.signatures == {"output_logit_divergence": 40, "attention_logit_growth": 100}


def test_a_spike_explains_a_divergence_only_when_it_comes_just_before():
    def spiking(at: int) -> dict[str, list]:
        flags = [s == at for s in range(120)]
        return healthy(120, loss=flat, loss_spike=flags, grad_spike=[False] * 120)

    near = diagnose(spiking(100), "diverged", 400, diverged_step=110)
    assert (near.mechanism, near.step) == ("update_spike", 100)
    far = diagnose(spiking(110 - SPIKE_LEAD - 20), "diverged", 400, diverged_step=110)
    assert far.mechanism == "abrupt" and far.step == 110
    # ... or a relapse after the escape; a stalled run's spike alone explains nothing
    relapse = diagnose(spiking(100), "stalled", 120, escape_step=50, relapsed=True)
    assert relapse.mechanism == "update_spike"
    assert diagnose(spiking(100), "stalled", 120).mechanism == "plateau"


def test_signatures_after_the_divergence_step_do_not_count():
    late = healthy(attn_logit_max=lambda s: 1e6 if s >= 300 else 3.0)
    assert diagnose(late, "diverged", 400, diverged_step=200).mechanism == "abrupt"


def flat(s: int) -> float:
    return 5.0 + random.Random(s).gauss(0, 0.1)


def test_slow_is_not_stuck():
    """A stalled run whose loss still falls 0.3 nats over the last quarter is still descending;
    one flat on the plateau (same noise) is not."""
    falling = curve(400, loss=lambda s: flat(s) - 0.3 * max(0, s - 300) / 100)
    assert still_descending(falling["loss"], 400)
    diagnosis = diagnose(falling, "stalled", 400)
    assert (diagnosis.mechanism, diagnosis.step, diagnosis.still_descending) == (
        "still_descending",
        300,
        True,
    )
    plateau = curve(400, loss=flat)
    assert not still_descending(plateau["loss"], 400)
    assert diagnose(plateau, "stalled", 400).mechanism == "plateau"
    # a drop too small to matter, however regular, is the plateau
    creeping = curve(400, loss=lambda s: 5.0 - 0.01 * s / 400)
    assert not still_descending(creeping["loss"], 400)


def test_a_borderline_convergence_gets_a_mechanism_a_clean_one_does_not():
    assert diagnose(healthy(), "converged", 400, borderline=True).mechanism == "plateau"
    assert diagnose(healthy(), "converged", 400).fields()["failure_mechanism"] == ""


def test_every_mechanism_names_its_source_remedy_and_setting():
    for mechanism in MECHANISMS.values():
        assert mechanism.signature and mechanism.source and mechanism.remedy and mechanism.setting


def test_an_unreadable_step_is_skipped_not_a_crash():
    odd = healthy(attn_logit_max=lambda s: 1e6)
    odd["step"] = [math.inf if s == 100 else (math.nan if s == 120 else s) for s in odd["step"]]
    assert signatures(odd)["attention_logit_growth"] == 0


def test_a_clean_convergence_keeps_its_signatures_as_evidence():
    """The report's share of converged runs showing a signature needs them."""
    healthy_but_loud = healthy(attn_logit_max=lambda s: 3 * ATTENTION_LOGIT_LIMIT)
    diagnosis = diagnose(healthy_but_loud, "converged", 400)
    assert diagnosis.mechanism == ""
    assert diagnosis.fields()["signatures"] == "attention_logit_growth"
