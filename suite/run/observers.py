"""What the step loop (suite/run/train.py) records beside training: observers.

The loop trains one member (an ordinary cell) or several (a packed run's learning rates) and
calls each member's observers around every step:

    before_step(step)                   before the forward pass (a snapshot of the weights)
    stop_reason(event) -> str | None    after the backward pass, before the update: a reason
                                        ends the member (the update is not applied)
    skip_update(event) -> bool          ... True skips this step's update, the member goes on
    after_step(event, curve) -> dict    after the update: columns for this step's curve row
    at_end(curve) -> dict               once, when the member ends: columns for its record

Every observer declares the curve and record columns it contributes (``curve_columns``,
``record_columns``); suite/record.py declares them all, with their kinds, and a test checks the
two agree. A new per-step metric is one observer and its declaration in suite/record.py, added
where :func:`member_observers` lists the observers (or passed to ``train(observers=...)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from suite.config import DiagnosticsConfig, VerdictConfig
from suite.record import PER_LAYER_SERIES, curve_row
from suite.run.diagnostics import Diagnostics, SpikeCounter
from suite.verdict import divergence_reason

log = logging.getLogger("suite.run.train")

Curve = list[dict[str, Any]]


@dataclass(frozen=True)
class StepEvent:
    """One member's step, as the loop measured it."""

    step: int
    lr: float
    loss: float
    grad_norm: float
    tokens_per_s: float
    stopped: str | None = None  # why the member ended at this step (its update was not applied)


class Observer:
    """Base class: every hook does nothing."""

    curve_columns: ClassVar[tuple[str, ...]] = ()
    record_columns: ClassVar[tuple[str, ...]] = ()

    def before_step(self, step: int) -> None:
        """Before the step's forward pass."""

    def stop_reason(self, event: StepEvent) -> str | None:
        """After the backward pass: why the member must end here (None: it goes on)."""
        return None

    def skip_update(self, event: StepEvent) -> bool:
        """After the backward pass of a member that goes on: whether its update is skipped."""
        return False

    def after_step(self, event: StepEvent, curve: Curve) -> dict[str, Any]:
        """After the update: columns for this step's row (``curve`` is the curve so far)."""
        return {}

    def at_end(self, curve: Curve) -> dict[str, Any]:
        """When the member ends: columns for its record."""
        return {}


class StepColumns(Observer):
    """The step's own numbers: the row every curve has."""

    curve_columns = ("step", "lr", "loss", "grad_norm", "tokens_per_s")

    def after_step(self, event: StepEvent, curve: Curve) -> dict[str, Any]:
        return curve_row(event.step, event.lr, event.loss, event.grad_norm, event.tokens_per_s)


class DivergenceStop(Observer):
    """The divergence stop, the only verdict taken during training (suite/verdict.py): a
    non-finite loss or gradient, or a loss past ``blowup_factor`` × the first step's."""

    record_columns = ("initial_loss",)

    def __init__(self, verdict: VerdictConfig) -> None:
        self.verdict = verdict
        self.initial_loss: float | None = None

    def stop_reason(self, event: StepEvent) -> str | None:
        if self.initial_loss is None:
            self.initial_loss = event.loss
        return divergence_reason(event.loss, event.grad_norm, self.initial_loss, self.verdict)


class SkipSpikes(Observer):
    """``optim.skip_spikes``: a step whose loss or gradient norm is a spike by the diagnostics'
    rule (mean + 6σ of the previous 128 steps, from 32 on) is not applied, as OLMo-core's
    SkipStepAdamW does (OLMo 2, Team OLMo 2024). Every step's values join the history, the
    skipped ones too, so a lasting change of level stops counting as a spike."""

    curve_columns = ("skipped",)
    record_columns = ("skipped_steps",)

    def __init__(self) -> None:
        # The rule's own constants (the diagnostics' defaults), not the diagnostics.* knobs:
        # those are not part of a cell's identity, and this changes what is trained.
        defaults = DiagnosticsConfig()
        rule = (defaults.spike_window, defaults.spike_sigmas, defaults.spike_min_history)
        self.losses, self.grads = SpikeCounter(*rule), SpikeCounter(*rule)
        self.skipped = False

    def skip_update(self, event: StepEvent) -> bool:
        loss_spike = self.losses.observe(event.loss)  # both observed: each joins its history
        grad_spike = self.grads.observe(event.grad_norm)
        self.skipped = loss_spike or grad_spike
        return self.skipped

    def after_step(self, event: StepEvent, curve: Curve) -> dict[str, Any]:
        skipped, self.skipped = self.skipped and event.stopped is None, False
        return {"skipped": skipped}

    def at_end(self, curve: Curve) -> dict[str, Any]:
        return {"skipped_steps": sum(row.get("skipped", False) for row in curve)}


class Flush(Observer):
    """Hands the curve so far to ``on_progress`` every ``every`` steps (the caller keeps it as
    the partial curve, so a killed run loses at most that many steps)."""

    def __init__(self, every: int, on_progress: Callable[[Curve], None] | None) -> None:
        self.every, self.on_progress = every, on_progress

    def after_step(self, event: StepEvent, curve: Curve) -> dict[str, Any]:
        due = (event.step + 1) % self.every == 0
        if self.on_progress is not None and event.stopped is None and due:
            self.on_progress(curve)
        return {}


class DiagnosticsColumns(Observer):
    """The literature's diagnostics (suite/run/diagnostics.py), sampled on a probe batch: per-step
    gradient RMS and spike flags, the sampled series, and the record's one-shot numbers."""

    curve_columns = (
        "grad_rms",
        "loss_spike",
        "grad_spike",
        "model_update",
        "attn_logit_max",
        "attn_logit_max_by_layer",
        "log_z",
        "update_ratio",
        *PER_LAYER_SERIES,
        "saturation_by_layer",
        "stream_amax_gain",
        "stream_share",
    )
    record_columns = (
        "init_grad_norm_by_layer",
        "init_grad_norm_ratio",
        "init_act_rms_by_layer",
        "final_act_rms_by_layer",
        "init_attn_logit_max",
        "max_attn_logit",
        "init_log_z",
        "early_model_update",
        "loss_spikes",
        "grad_spikes",
        "amax_gain_forward",
        "amax_gain_backward",
        "diagnostics_s",
    )

    def __init__(self, diagnostics: Diagnostics) -> None:
        self.diagnostics = diagnostics
        self.before: list[torch.Tensor] | None = None

    def before_step(self, step: int) -> None:
        sampled = self.diagnostics.samples(step)
        self.before = self.diagnostics.snapshot() if sampled else None

    def after_step(self, event: StepEvent, curve: Curve) -> dict[str, Any]:
        return self.diagnostics.after_step(
            event.loss, event.grad_norm, self.before, event.stopped is not None
        )

    def at_end(self, curve: Curve) -> dict[str, Any]:
        return self.diagnostics.at_end(curve)


class LogLine:
    """One log line every ``every`` steps (and at the last), for the whole run: one member's
    loss, gradient norm and LR, or a pack's members' losses."""

    def __init__(self, every: int, steps: int, packed: bool) -> None:
        self.every, self.steps, self.packed = every, steps, packed

    def after_step(self, step: int, events: Sequence[StepEvent], training: int) -> None:
        if step % self.every and step != self.steps - 1:
            return
        going = [event for event in events if event.stopped is None]
        if not going:
            return
        if self.packed:
            log.info(
                "step %4d/%d  %d member(s)  loss %s  %.0f tok/s",
                step,
                self.steps,
                training,
                " ".join(f"{event.loss:.4f}" for event in going),
                events[0].tokens_per_s,
            )
        else:
            event = going[0]
            log.info(
                "step %4d/%d  loss %.4f  grad %.3g  lr %.3g  %.0f tok/s",
                step,
                self.steps,
                event.loss,
                event.grad_norm,
                event.lr,
                event.tokens_per_s,
            )
