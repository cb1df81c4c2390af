"""The training loop: AdamW or Muon (suite/optimizers.py), warmup then constant or cosine LR,
per-step metrics, divergence stop.

It knows nothing of which variant it trains. Timing is synchronized on CUDA, so each step's
duration is the device's, not the launch queue's.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from suite.config import CellConfig, OptimConfig
from suite.data import Batches, Corpus, validation_batches
from suite.diagnostics import Diagnostics
from suite.optimizers import make_optimizer, set_learning_rate
from suite.parametrization import model_depth_scaling
from suite.record import curve_row
from suite.verdict import divergence_reason, judge_curve

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


def train(
    model: nn.Module,
    corpus: Corpus,
    cell: CellConfig,
    device: torch.device,
    on_progress: Callable[[list[dict[str, float]]], None] | None = None,
    out: TrainOutcome | None = None,
) -> TrainOutcome:
    """Train ``model`` on ``cell``; fills and returns ``out`` (a new outcome if none is given:
    a caller that passes its own keeps the curve trained so far when training raises)."""
    cfg, optim = cell.train, cell.optim
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(model, optim, model_depth_scaling(cell.model))
    lr_at = lr_schedule(optim, cell.warmup_steps(), cfg.steps)
    batches = Batches(corpus.train, cell.model.seq_len, cfg.batch_size, seed=cell.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    params = [p for p in model.parameters() if p.requires_grad]
    # The variant's own step after the optimizer's (nGPT re-normalizes its weights), if any.
    after_optimizer_step = getattr(model, "after_optimizer_step", lambda: None)
    tokens_per_step = cfg.batch_size * cell.model.seq_len
    out = out if out is not None else TrainOutcome()
    started = time.perf_counter()
    diagnostics = _diagnostics_for(model, corpus, cell, device)

    for step in range(cfg.steps):
        sampled = diagnostics is not None and diagnostics.samples(step)
        before = diagnostics.snapshot() if sampled else None
        synchronize(device)
        t0 = time.perf_counter()
        lr = lr_at(step)
        set_learning_rate(optimizer, lr)
        x, y = batches.next(device)
        loss, objective = loss_and_objective(step_model, x, y, autocast, optim.z_loss)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        loss_value, grad_value = loss.item(), grad_norm.item()
        if step == 0:
            out.initial_loss = loss_value
        reason = divergence_reason(loss_value, grad_value, out.initial_loss, cell.verdict)
        if reason is None:
            optimizer.step()
            after_optimizer_step()
        synchronize(device)
        seconds = time.perf_counter() - t0
        out.curve.append(curve_row(step, lr, loss_value, grad_value, tokens_per_step / seconds))
        if diagnostics is not None:
            out.curve[-1].update(
                diagnostics.after_step(loss_value, grad_value, before, reason is not None)
            )
        if reason is not None:
            out.diverged_step, out.divergence_reason = step, reason
            log.info("step %d: diverged (%s)", step, reason)
            break
        if on_progress is not None and (step + 1) % cfg.flush_every == 0:
            on_progress(out.curve)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log.info(
                "step %4d/%d  loss %.4f  grad %.3g  lr %.3g  %.0f tok/s",
                step,
                cfg.steps,
                loss_value,
                grad_value,
                lr,
                tokens_per_step / seconds,
            )

    out.wall_time_s = time.perf_counter() - started
    if out.diverged_step is None:
        out.val_loss = evaluate(step_model, corpus, cell, device, autocast)
    conclude(out, cell, corpus.unigram_entropy)
    if diagnostics is not None:
        out.diagnostics = diagnostics.at_end(out.curve)
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


def _diagnostics_for(
    model: nn.Module, corpus: Corpus, cell: CellConfig, device: torch.device
) -> Diagnostics | None:
    """Diagnostics measured at init, or None when they are off."""
    if not cell.diagnostics.enabled:
        return None
    (probe_batch,) = validation_batches(
        corpus, cell.model.seq_len, cell.diagnostics.probe_batch, 1, device
    )
    diagnostics = Diagnostics(model, probe_batch, cell.diagnostics)
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
