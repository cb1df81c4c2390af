"""The training loop: one loop (:func:`run_steps`) for an ordinary cell and for a packed run's
members (suite/run/packed.py), AdamW or Muon (suite/run/optimizers.py), warmup then constant or
cosine LR. What it records beside the step is its observers' (suite/run/observers.py: the curve
row, the divergence stop, the diagnostics, the partial-curve flush, the log line).

It knows nothing of which variant it trains. Timing is synchronized on CUDA, so each step's
duration is the device's, not the launch queue's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from suite.config import CellConfig, OptimConfig
from suite.run.data import Batches, Corpus, validation_batches
from suite.run.diagnostics import Diagnostics
from suite.run.observers import (
    DiagnosticsColumns,
    DivergenceStop,
    Flush,
    LogLine,
    Observer,
    SkipSpikes,
    StepColumns,
    StepEvent,
)
from suite.run.optimizers import make_optimizer, set_learning_rate
from suite.run.parametrization import model_depth_scaling
from suite.verdict import judge_curve

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What a training run measured. Every field but the curve and the diagnostics (which are
    merged in as they are) becomes the record column of its name (declared in suite/record.py)."""

    curve: list[dict[str, float]] = field(default_factory=list)
    initial_loss: float = math.nan
    final_loss: float = math.nan
    best_loss: float = math.nan
    val_loss: float = math.nan
    verdict: str = ""
    stall_threshold: float = math.nan
    escape_step: int | None = None
    relapsed: bool = False
    borderline: bool = False
    diverged_step: int | None = None
    divergence_reason: str | None = None
    steps_completed: int = 0
    tokens_per_s: float = math.nan
    wall_time_s: float = 0.0
    diagnostics: dict[str, object] = field(default_factory=dict)


def lr_schedule(optim: OptimConfig, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR at each step: linear warmup from lr/warmup to lr, then constant or cosine decay."""

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return optim.lr * (step + 1) / warmup_steps
        if optim.schedule == "constant":
            return optim.lr
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        floor = optim.min_lr_ratio * optim.lr
        return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return lr_at


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_and_objective(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: torch.autocast, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy (what is reported and judged) and the objective that is optimized:
    cross-entropy + z_loss · mean(log²Z) over the output softmax (PaLM; Wortsman et al. 2023)."""
    with autocast:
        logits = model(x)
    logits = logits.float().view(-1, logits.shape[-1])
    cross_entropy = F.cross_entropy(logits, y.reshape(-1))
    if not z_loss:
        return cross_entropy, cross_entropy
    log_z = torch.logsumexp(logits, dim=-1)
    return cross_entropy, cross_entropy + z_loss * log_z.pow(2).mean()


def mu_loss(model: nn.Module) -> torch.Tensor:
    """‖μ‖², μ the mean of the output embeddings e_i over the vocabulary: the regularizer form of
    output embedding centering (μ-loss; Stollenwerk et al. 2026, arXiv 2601.02031). The mean
    output logit is μ·h, so a small ‖μ‖ keeps the logits from drifting all together."""
    return model.head.weight.float().mean(dim=0).pow(2).sum()


# Dynamo keeps a bounded number of compiled versions of one function (GPT.forward's: per model
# configuration one for training, one for no-grad evaluation) and past the bound runs eager with
# only a warning. A sweep's worker trains configuration after configuration (variants × depths
# × ...) and reuses what it compiled: a new model of a compiled configuration compiles nothing.
# So the worker clears dynamo's caches before a new configuration past this many (recompiling
# later from the on-disk cache), and a cell that still hits the bound fails instead of recording
# an eager run as compiled.
COMPILED_CONFIGS_PER_PROCESS = 16
RECOMPILE_LIMIT = 4 * COMPILED_CONFIGS_PER_PROCESS
_compiled_configs: set[str] = set()


class Compiled(nn.Module):
    """``torch.compile(model)`` that never falls back to eager unnoticed; its calls run under
    the suite's recompile bound only (dynamo's settings elsewhere in the process stay)."""

    def __init__(self, model: nn.Module, configuration: str) -> None:
        super().__init__()
        if configuration not in _compiled_configs:
            if len(_compiled_configs) >= COMPILED_CONFIGS_PER_PROCESS:
                torch._dynamo.reset()
                _compiled_configs.clear()
            _compiled_configs.add(configuration)
        self.compiled = torch.compile(model)
        # dynamo refuses to both fail on the bound and suppress errors (TORCHDYNAMO_SUPPRESS_ERRORS)
        self.bound = {"recompile_limit": RECOMPILE_LIMIT}
        if not torch._dynamo.config.suppress_errors:
            self.bound["fail_on_recompile_limit_hit"] = True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch._dynamo.config.patch(**self.bound):
            return self.compiled(tokens)


def model_configuration(cell: CellConfig) -> str:
    """What decides the compiled graph: the cell but its learning rate and seed (over-counting,
    e.g. the step budget, costs only an early cache reset)."""
    neutral = dataclasses.replace(cell, seed=0, optim=dataclasses.replace(cell.optim, lr=1.0))
    return neutral.config_hash()


class Stepper(Protocol):
    """How one step trains the run's members (one cell, or a pack's; suite/run/packed.py): the
    loop (:func:`run_steps`) knows nothing else of the model or the optimizer."""

    packed: bool

    def forward_backward(
        self, lrs: list[float], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[float], list[float]]:
        """Each training member's loss and gradient norm (before clipping) on the batch, its
        gradients in place (clipped when the cell asks)."""
        ...

    def update(self, keep: list[int], lrs: list[float]) -> None:
        """Apply the optimizer step to the members at ``keep`` (indices into this step's
        members, with their ``lrs``); the others ended and are dropped."""
        ...

    def evaluate(self) -> list[float]:
        """Each training member's mean validation loss."""
        ...


class StandardStep:
    """One model, its optimizer (AdamW or Muon), and the variant's own step after it."""

    packed = False

    def __init__(
        self, model: nn.Module, corpus: Corpus, cell: CellConfig, device: torch.device
    ) -> None:
        cfg, optim = cell.train, cell.optim
        self.corpus, self.cell, self.device, self.model = corpus, cell, device, model
        self.step_model = Compiled(model, model_configuration(cell)) if cfg.compile else model
        self.optimizer = make_optimizer(model, optim, model_depth_scaling(cell.model))
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The variant's own step after the optimizer's (nGPT re-normalizes its weights), if any,
        # then μ-centering of the output embedding when the cell asks for it.
        steps = [getattr(model, "after_optimizer_step", lambda: None)]
        if optim.center_output_embedding:
            steps.append(model.center_output_embedding)
        self.after_optimizer_step = lambda: [step() for step in steps]
        self.autocast = _autocast(cell, device)

    def forward_backward(
        self, lrs: list[float], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[float], list[float]]:
        optim = self.cell.optim
        set_learning_rate(self.optimizer, lrs[0])
        loss, objective = loss_and_objective(self.step_model, x, y, self.autocast, optim.z_loss)
        if optim.mu_loss:
            objective = objective + optim.mu_loss * mu_loss(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, optim.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params], foreach=True)
        return [loss.item()], [norm.item()]

    def update(self, keep: list[int], lrs: list[float]) -> None:
        if keep:
            self.optimizer.step()
            self.after_optimizer_step()

    def evaluate(self) -> list[float]:
        return [evaluate(self.step_model, self.corpus, self.cell, self.device, self.autocast)]


@dataclass
class Member:
    """One cell of the run: its schedule, its outcome so far and its observers."""

    cell: CellConfig
    outcome: TrainOutcome
    observers: list[Observer]
    lr_at: Callable[[int], float] = field(init=False)

    def __post_init__(self) -> None:
        self.lr_at = lr_schedule(self.cell.optim, self.cell.warmup_steps(), self.cell.train.steps)


def member_observers(
    cell: CellConfig,
    on_progress: Callable[[list[dict[str, float]]], None] | None,
    diagnostics: Diagnostics | None = None,
) -> list[Observer]:
    """The observers of every member: its curve row, the divergence stop, the diagnostics when
    they are measured, and the partial-curve flush."""
    observers: list[Observer] = [StepColumns(), DivergenceStop(cell.verdict)]
    if cell.optim.skip_spikes:
        observers.append(SkipSpikes())
    if diagnostics is not None:
        observers.append(DiagnosticsColumns(diagnostics))
    return [*observers, Flush(cell.train.flush_every, on_progress)]


def run_steps(
    stepper: Stepper,
    members: list[Member],
    corpus: Corpus,
    device: torch.device,
    on_done: Callable[[int, TrainOutcome], None],
    started: float | None = None,
) -> None:
    """The step loop, for one member or a pack's: each step reads the same batch for every
    member, asks each member's observers whether it ends here, applies the update to the others
    and records the step; a member that ends is concluded at once and handed to ``on_done``
    (its index in ``members``), the others at the end with their validation loss."""
    lead = members[0].cell
    cfg = lead.train
    batches = Batches(corpus.train, lead.model.seq_len, cfg.batch_size, seed=lead.seed)
    tokens_per_step = cfg.batch_size * lead.model.seq_len
    log_line = LogLine(cfg.log_every, cfg.steps, stepper.packed)
    active = list(range(len(members)))  # members still training, in the stepper's order
    started = time.perf_counter() if started is None else started

    def finish(index: int, evaluated: float | None = None) -> None:
        member = members[index]
        out = member.outcome
        if evaluated is not None:
            out.val_loss = evaluated
        conclude(out, member.cell, corpus.unigram_entropy)
        for observer in member.observers:
            out.diagnostics.update(observer.at_end(out.curve))
        on_done(index, out)

    for step in range(cfg.steps):
        for index in active:
            for observer in members[index].observers:
                observer.before_step(step)
        synchronize(device)
        t0 = time.perf_counter()
        lrs = [members[index].lr_at(step) for index in active]
        x, y = batches.next(device)
        losses, grads = stepper.forward_backward(lrs, x, y)
        reasons, events_before = [], []
        for position, index in enumerate(active):
            member = members[index]
            if step == 0:
                member.outcome.initial_loss = losses[position]
            event = StepEvent(step, lrs[position], losses[position], grads[position], 0.0)
            reason = None
            for observer in member.observers:
                reason = reason or observer.stop_reason(event)
            reasons.append(reason)
            events_before.append(event)
        keep = [position for position, reason in enumerate(reasons) if reason is None]
        applied = [p for p in keep if not _skips(members[active[p]], events_before[p])]
        stepper.update(applied, [lrs[position] for position in applied])
        synchronize(device)
        tokens_per_s = len(active) * tokens_per_step / (time.perf_counter() - t0)
        events = []
        for position, index in enumerate(active):
            member = members[index]
            event = StepEvent(
                step, lrs[position], losses[position], grads[position], tokens_per_s,
                reasons[position],
            )  # fmt: skip
            events.append(event)
            row: dict = {}
            member.outcome.curve.append(row)
            for observer in member.observers:
                row.update(observer.after_step(event, member.outcome.curve))
            if reasons[position] is not None:
                member.outcome.diverged_step = step
                member.outcome.divergence_reason = reasons[position]
                member.outcome.wall_time_s = time.perf_counter() - started
                label = f"lr {lrs[position]:g}: " if stepper.packed else ""
                log.info("%sstep %d: diverged (%s)", label, step, reasons[position])
                finish(index)
        active = [active[position] for position in keep]
        log_line.after_step(step, events, len(active))
        if not active:
            break

    wall_time_s = time.perf_counter() - started
    if active:
        val_losses = stepper.evaluate()
        for index, val_loss in zip(active, val_losses, strict=True):
            members[index].outcome.wall_time_s = wall_time_s
            finish(index, val_loss)


def _skips(member: Member, event: StepEvent) -> bool:
    """Whether any observer of the member skips this step's update (every one is asked)."""
    return any([observer.skip_update(event) for observer in member.observers])


def train(
    model: nn.Module,
    corpus: Corpus,
    cell: CellConfig,
    device: torch.device,
    on_progress: Callable[[list[dict[str, float]]], None] | None = None,
    out: TrainOutcome | None = None,
    observers: Sequence[Observer] = (),
) -> TrainOutcome:
    """Train ``model`` on ``cell``; fills and returns ``out`` (a new outcome if none is given:
    a caller that passes its own keeps the curve trained so far when training raises).
    ``observers`` are added to the member's own (suite/run/observers.py)."""
    out = out if out is not None else TrainOutcome()
    started = time.perf_counter()  # the wall time counts the diagnostics at init, as before
    stepper = StandardStep(model, corpus, cell, device)
    diagnostics = _diagnostics_for(model, corpus, cell, device)
    own = member_observers(cell, on_progress, diagnostics)
    member = Member(cell, out, [*own[:-1], *observers, own[-1]])  # the flush last
    run_steps(stepper, [member], corpus, device, lambda index, outcome: None, started)
    return out


def conclude(out: TrainOutcome, cell: CellConfig, unigram_entropy: float) -> None:
    """Fill in the run's summary numbers and verdict from its curve."""
    losses = [row["loss"] for row in out.curve]
    out.steps_completed = len(losses) - (1 if out.diverged_step is not None else 0)
    # The median step time, as tokens/s: tokens / median(seconds), not the median of the rates.
    seconds_per_token = [1 / row["tokens_per_s"] for row in out.curve]
    steady = seconds_per_token[cell.train.timing_skip_steps :] or seconds_per_token[1:]
    if steady:
        out.tokens_per_s = 1 / statistics.median(steady)
    finite = [v for v in losses if math.isfinite(v)]
    out.best_loss = min(finite) if finite else math.nan
    # The same judgement collect makes from the stored curve; here for the cell's log line.
    judgement = judge_curve(
        losses, out.diverged_step is not None, cell.train.steps, unigram_entropy, cell.verdict
    )
    for name, value in judgement.fields().items():
        setattr(out, name, value)


def _autocast(cell: CellConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cell.train.dtype == "bfloat16")


def _diagnostics_for(
    model: nn.Module, corpus: Corpus, cell: CellConfig, device: torch.device
) -> Diagnostics | None:
    """Diagnostics measured at init, or None when they are off."""
    if not cell.diagnostics.enabled:
        return None
    (probe_batch,) = validation_batches(
        corpus, cell.model.seq_len, cell.diagnostics.probe_batch, 1, device
    )
    diagnostics = Diagnostics(model, probe_batch, cell.diagnostics, cell.optim.grad_clip)
    diagnostics.at_init()
    return diagnostics


@torch.no_grad()
def evaluate(
    model: nn.Module,
    corpus: Corpus,
    cell: CellConfig,
    device: torch.device,
    autocast: torch.autocast,
) -> float:
    model.eval()
    batches = validation_batches(
        corpus, cell.model.seq_len, cell.train.batch_size, cell.train.eval_batches, device
    )
    total = sum(loss_and_objective(model, x, y, autocast, 0.0)[0].item() for x, y in batches)
    model.train()
    return total / len(batches)
