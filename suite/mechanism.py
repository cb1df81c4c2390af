"""Why a run failed: its failure mechanism, named by documented rules over its stored curve
(definitions and thresholds: docs/results.md, Why it failed).

The stability literature names a small set of mechanisms, each with a signature in the series
the diagnostics sample (suite/run/diagnostics.py) and a published remedy. :func:`signatures`
looks for every signature in a curve and says at which step it started; :func:`diagnose` names
the mechanism of a run that did not simply converge (stalled, diverged, relapsed or borderline):
the signature that started first, or, when none did, ``still_descending`` (a stalled run whose
loss still falls significantly at the budget's end: slow, not stuck) or ``plateau`` (a stalled
run flat on the plateau, with no mechanism the rules know) or ``abrupt`` (a divergence with no
signature in the sampled steps before it).

Like the verdict, it is a label computed from the curve at collect time: a rule that changes
re-labels a store by re-collecting, never by re-training. A signature is not a proof of cause:
the report counts how often each also appears in runs that converged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Bumped whenever a rule or threshold below changes meaning; every collected table records it.
RULES_VERSION = 1

ATTENTION_LOGIT_LIMIT = 1e4
LOG_Z_DRIFT = 20.0  # nats from log Z at init
SPIKE_LEAD = 32  # steps before a divergence (or after an escape, for a relapse)
GRADIENT_SPREAD = 1e-2  # smallest / largest block gradient norm
STREAM_GAIN_LIMIT = 1e3
SATURATION_SHARE = 0.5
DESCENT_T = -3.0  # t statistic of the loss slope over the last quarter of the budget
DESCENT_MIN_DROP = 0.05  # nats over that window


@dataclass(frozen=True)
class Mechanism:
    """One failure mechanism: its signature's rule, the source of both, and the remedy."""

    name: str
    signature: str
    source: str
    remedy: str
    setting: str  # the suite setting that applies the remedy ('' where the suite has none)


# In order of precedence when two signatures start at the same step.
MECHANISMS: dict[str, Mechanism] = {
    m.name: m
    for m in (
        Mechanism(
            "attention_logit_growth",
            f"a sampled max attention logit |q·k|/√d_head ≥ {ATTENTION_LOGIT_LIMIT:.0e}",
            "Wortsman et al. 2023 §3.1.1 (attention logits past ~1e4 precede attention-entropy "
            "collapse and divergence); Dehghani et al. 2023",
            "LayerNorm on queries and keys (qk-layernorm)",
            "model.qk_norm=true",
        ),
        Mechanism(
            "output_logit_divergence",
            f"sampled log Z of the output logits {LOG_Z_DRIFT:g} nats or more from its init",
            "Wortsman et al. 2023 §3.2 (output logit divergence); PaLM's z-loss",
            "z-loss 1e-4 (or a logit soft-cap, model.logit_softcap=30, or output embedding "
            "centering, arXiv 2601.02031: optim.center_output_embedding=true, or its "
            "regularizer form optim.mu_loss=λ)",
            "optim.z_loss=1e-4",
        ),
        Mechanism(
            "update_spike",
            f"a loss or gradient-norm spike (mean + 6σ of the last 128 steps) within "
            f"{SPIKE_LEAD} steps before the divergence, or after the escape of a run that "
            "relapsed",
            "OLMo 2 (Team OLMo 2024) §3; OLMo-core's spike rule (SkipStepAdamW)",
            "skipping the update of a spiking step (OLMo-core's SkipStepAdamW); warmup",
            "optim.skip_spikes=true",
        ),
        Mechanism(
            "vanishing_gradient_early",
            f"sampled per-block gradient norms spread by more than 1/{GRADIENT_SPREAD:g}, the "
            "smallest in the first half of the blocks, in at least half the samples from then on",
            "Xiong et al. 2020 Fig. 3 (Post-LN's gradient grows toward the output at init)",
            "learning-rate warmup (Xiong et al. 2020), or a pre-norm arrangement",
            "optim.warmup_steps=100",
        ),
        Mechanism(
            "vanishing_gradient_late",
            "the same spread, the smallest gradient in the second half of the blocks",
            "Li et al. 2024 (Mix-LN: Pre-LN's deep layers get small gradients)",
            "Mix-LN or LayerNorm scaling (LNS)",
            "+variant=mixln",
        ),
        Mechanism(
            "stream_collapse",
            f"a sampled Amax gain of the streams' mixing over depth ≥ {STREAM_GAIN_LIMIT:.0e}",
            "Xie et al. 2025 (mHC) Fig. 3: HC's composite mixing gain explodes; arXiv 2606.03483",
            "doubly stochastic mixing (manifold-constrained hyper-connections)",
            "+variant=mhc",
        ),
        Mechanism(
            "saturation",
            f"a block whose DyT/Derf inputs are {SATURATION_SHARE:.0%} or more past the map's "
            "knee (slope below 0.1 of its slope at 0)",
            "Zhu et al. 2025 §6 (α and the tanh's linear range); arXiv 2604.23434",
            "a smaller α₀, warmup, a lower learning rate",
            "variant.alpha_init=0.1 optim.warmup_steps=100",
        ),
        Mechanism(
            "still_descending",
            f"stalled, but the training loss over the last quarter of the budget falls with "
            f"t < {DESCENT_T:g} and by ≥ {DESCENT_MIN_DROP:g} nats: slow, not stuck",
            "docs/calibration.md (a budget calibrated on one corpus is not on another)",
            "a longer budget",
            "train.steps=800",
        ),
        Mechanism(
            "plateau",
            "stalled flat on the plateau (or, borderline, escaped late or barely), and no "
            "signature above",
            "Post-LN without warmup (Liu et al. 2020, Admin)",
            "warmup, a lower learning rate, or a pre-norm arrangement",
            "optim.warmup_steps=100",
        ),
        Mechanism(
            "abrupt",
            "diverged with no signature above in the sampled steps before it",
            "(sampled every diagnostics.every steps: a precursor between samples is missed)",
            "a lower learning rate; to look closer, sample every step",
            "diagnostics.every=1",
        ),
    )
}
FAILED = ("stalled", "diverged")


@dataclass(frozen=True)
class Diagnosis:
    mechanism: str  # '' for a run that converged cleanly
    step: int | None  # where its signature started
    signatures: dict[str, int] = field(default_factory=dict)  # every signature that fired
    still_descending: bool = False

    def fields(self) -> dict[str, Any]:
        return {
            "failure_mechanism": self.mechanism,
            "mechanism_step": self.step,
            "signatures": ",".join(self.signatures),
            "still_descending": self.still_descending,
        }


Curve = Mapping[str, Sequence[Any]]


def _sampled(curve: Curve, column: str, end: int | None) -> list[tuple[int, Any]]:
    """(step, value) of the rows that hold ``column``, up to step ``end``."""
    steps, values = curve.get("step", ()), curve.get(column, ())
    return [
        (int(step), value)
        for step, value in zip(steps, values, strict=False)
        if _present(value) and _present(step) and math.isfinite(step)
        and (end is None or step <= end)
    ]  # fmt: skip


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float):
        return not math.isnan(value)
    return True


def _first(pairs: list[tuple[int, Any]], test) -> int | None:
    return next((step for step, value in pairs if test(value)), None)


def _magnitude(value: float) -> float:
    """|value|; an unmeasured (NaN) sample is no evidence of growth, an infinite one is."""
    return 0.0 if value is None or math.isnan(value) else abs(value)


def _spread_onset(pairs: list[tuple[int, Any]], late: bool) -> int | None:
    """The first sample whose block gradient norms spread by more than 1/GRADIENT_SPREAD with
    the smallest in the first (or, ``late``, the second) half, held in half the samples on."""
    hits = []
    for _, norms in pairs:
        values = [v for v in norms if v is not None and math.isfinite(v)]
        if len(values) < 2 or len(values) != len(norms) or max(values) <= 0:
            hits.append(False)
            continue
        smallest = min(range(len(values)), key=values.__getitem__)
        in_half = smallest >= len(values) / 2 if late else smallest < len(values) / 2
        hits.append(in_half and values[smallest] < GRADIENT_SPREAD * max(values))
    for index, hit in enumerate(hits):
        if hit and sum(hits[index:]) >= len(hits[index:]) / 2:
            return pairs[index][0]
    return None


def signatures(
    curve: Curve, end: int | None = None, init_log_z: float | None = None, since: int = 0
) -> dict[str, int]:
    """Every signature in ``curve`` up to step ``end``, with the step it started (a spike only
    counts from step ``since`` on, and within SPIKE_LEAD steps before ``end`` when ``end`` is
    given)."""
    found: dict[str, int | None] = {}
    found["attention_logit_growth"] = _first(
        _sampled(curve, "attn_logit_max", end),
        lambda v: _magnitude(v) >= ATTENTION_LOGIT_LIMIT,
    )
    log_z = _sampled(curve, "log_z", end)
    reference = init_log_z if init_log_z is not None and math.isfinite(init_log_z) else None
    if reference is None and log_z:
        reference = log_z[0][1]
    if reference is not None:
        found["output_logit_divergence"] = _first(
            log_z, lambda v: _magnitude(v - reference) >= LOG_Z_DRIFT
        )
    spikes = sorted(
        step
        for column in ("loss_spike", "grad_spike")
        for step, value in _sampled(curve, column, end)
        if value and step >= since and (end is None or step >= end - SPIKE_LEAD)
    )
    found["update_spike"] = spikes[0] if spikes else None
    gradients = _sampled(curve, "grad_norm_by_layer", end)
    found["vanishing_gradient_early"] = _spread_onset(gradients, late=False)
    found["vanishing_gradient_late"] = _spread_onset(gradients, late=True)
    found["stream_collapse"] = _first(
        _sampled(curve, "stream_amax_gain", end),
        lambda v: _magnitude(v) >= STREAM_GAIN_LIMIT,
    )
    found["saturation"] = _first(
        _sampled(curve, "saturation_by_layer", end),
        lambda shares: max((s for s in shares if s is not None), default=0) >= SATURATION_SHARE,
    )
    return {name: step for name, step in found.items() if step is not None}


def still_descending(losses: Sequence[float], budget: int) -> bool:
    """Whether the training loss over the last quarter of the budget (at least 20 steps) still
    falls: least-squares slope with t < DESCENT_T and a drop of DESCENT_MIN_DROP nats or more."""
    window = max(20, budget // 4)
    tail = [float(v) for v in losses[-window:]]
    if len(tail) < window or not all(math.isfinite(v) for v in tail):
        return False
    n = len(tail)
    x_mean, y_mean = (n - 1) / 2, math.fsum(tail) / n
    sxx = math.fsum((i - x_mean) ** 2 for i in range(n))
    slope = math.fsum((i - x_mean) * (y - y_mean) for i, y in enumerate(tail)) / sxx
    residual = math.fsum((y - y_mean - slope * (i - x_mean)) ** 2 for i, y in enumerate(tail))
    if residual == 0:
        return slope < 0 and -slope * (n - 1) >= DESCENT_MIN_DROP
    t = slope / math.sqrt(residual / (n - 2) / sxx)
    return t < DESCENT_T and -slope * (n - 1) >= DESCENT_MIN_DROP


def diagnose(
    curve: Curve,
    verdict: str,
    budget: int,
    *,
    diverged_step: int | None = None,
    escape_step: int | None = None,
    relapsed: bool = False,
    borderline: bool = False,
    init_log_z: float | None = None,
) -> Diagnosis:
    """The failure mechanism of one run (none for a run that converged and is not borderline)."""
    losses = list(curve.get("loss", ()))
    descending = verdict == "stalled" and still_descending(losses, budget)
    since = escape_step if relapsed and escape_step is not None else 0
    found = signatures(curve, diverged_step, init_log_z, since)
    if verdict not in FAILED and not relapsed and not borderline:
        # Nothing to explain; its signatures still count, as evidence against a rule that
        # fires on healthy runs too (the report's share of converged runs showing each).
        return Diagnosis("", None, found, still_descending=descending)
    if not relapsed and verdict != "diverged":
        found.pop("update_spike", None)  # a spike explains a divergence or a relapse only
    if found:
        order = list(MECHANISMS)
        name = min(found, key=lambda n: (found[n], order.index(n)))
        return Diagnosis(name, found[name], found, descending)
    if verdict == "diverged":
        return Diagnosis("abrupt", diverged_step, found, descending)
    if descending:
        window_start = max(0, len(losses) - max(20, budget // 4))
        return Diagnosis("still_descending", window_start, found, True)
    return Diagnosis("plateau", None, found, descending)
