"""Stability diagnostics from the literature, measured without perturbing training.

Every measurement runs on a fixed probe batch (the first validation batch) in its own forward
pass, outside the timed training step, and reads parameters without changing them or any RNG,
so a run's loss curve is bit-identical with diagnostics on or off (tested).

One-shot, into the record:

- per-layer gradient norm at initialization of the feed-forward weights on the probe batch
  (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture", Fig. 3: grows
  toward the output for Post-LN, flat for Pre-LN), and its last/first-layer ratio;
- per-layer activation RMS of the residual stream after each block, at init and at the end
  (over the stream's filled slots, for a variant that carries several);
- loss and gradient-norm spikes: a value above mean + 6σ of the previous 128 steps (the rule
  OLMo-core counts), counted per run and kept apart from divergence.

Sampled every step for the first ``early_steps`` steps, then every ``every`` steps, into the
curve:

- model update ‖F(x; θ_t) − F(x; θ_0)‖: the RMS over probe tokens of the L2 distance between
  the final hidden state (the output head's input, after any final norm) now and at init (Wang
  et al. 2022, "DeepNet", Fig. 3: grows with depth for Post-LN, stays flat for DeepNorm). The
  head itself is left out: it is tied to the embedding, shared by every variant, and early
  training moves it mostly toward the unigram distribution;
- max attention logit max|q·k|/√d_head per layer (Wortsman et al. 2023, "Small-scale proxies for
  large-scale Transformer training instabilities": logits past ~1e4 precede divergence);
- output log Z (mean logsumexp of the logits over probe tokens; same paper, output-logit
  divergence);
- the update-to-weight ratio ‖θ_{t+1} − θ_t‖ / ‖θ_t‖ of the optimizer step.

Per block, at the same sampled steps (the curves a heatmap of layer × step is drawn from):

- the gradient norm of the block's parameters, and of its attention's and its MLP's, from the
  step's own training gradients (before clipping: a clipped step's are scaled back by the clip
  factor, which is common to every parameter);
- the update-to-weight ratio of the block's parameters, and of its attention's and its MLP's;
- the residual stream's RMS after the block;
- for a variant with a squashing map in place of a norm (DyT, Derf: ``variants.base.Saturates``),
  the share of the block's map inputs past the map's knee;
- for a multi-stream variant, the Amax gain of its mixing matrices (one number per sample) and
  each stream's share of what enters the collapse to one stream.

Every step, into the curve: global gradient RMS (‖g‖ / √n_params) and the spike flags.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from suite.config import DiagnosticsConfig
from suite.run.model import GPT
from variants.base import Saturates
from variants.streams import MixesStreams


def is_spike(history: Sequence[float], value: float, sigmas: float, min_history: int) -> bool:
    """True if ``value`` exceeds mean + ``sigmas``·σ of ``history`` (population σ), once the
    history holds at least ``min_history`` finite values."""
    finite = [v for v in history if math.isfinite(v)]
    if len(finite) < min_history or not math.isfinite(value):
        return False
    mean = math.fsum(finite) / len(finite)
    variance = math.fsum((v - mean) ** 2 for v in finite) / len(finite)
    return value > mean + sigmas * math.sqrt(variance)


class SpikeCounter:
    """Counts values above mean + kσ of a trailing window (the current value is not in it)."""

    def __init__(self, window: int, sigmas: float, min_history: int) -> None:
        self.history: deque[float] = deque(maxlen=window)
        self.sigmas, self.min_history = sigmas, min_history
        self.count = 0

    def observe(self, value: float) -> bool:
        spike = is_spike(self.history, value, self.sigmas, self.min_history)
        self.count += spike
        self.history.append(value)
        return spike


def ffn_grad_norms(model: GPT) -> list[float]:
    """Per layer, the gradient norm of the feed-forward weights ‖∇(W₁, W₂)‖: the quantity
    Xiong et al. (2020, Fig. 3) plot against layer index."""
    norms = []
    for block in model.blocks:
        weights = (block.mlp.fc.weight, block.mlp.proj.weight)
        grads = [w.grad.norm() if w.grad is not None else w.new_zeros(()) for w in weights]
        norms.append(torch.linalg.vector_norm(torch.stack(grads)).item())
    return norms


def model_update(output: torch.Tensor, initial_output: torch.Tensor) -> float:
    """RMS over tokens of ‖F(x; θ_t) − F(x; θ_0)‖₂ (each token's output vector)."""
    distance = (output - initial_output).flatten(0, -2).norm(dim=-1)
    return distance.pow(2).mean().sqrt().item()


def amax_gains(mixings: list[torch.Tensor]) -> tuple[float, float]:
    """The mHC paper's Amax gain magnitudes (Xie et al. 2025): of the product of the streams'
    mixing matrices over depth (per token, M_L ⋯ M_1), the largest absolute row sum (forward
    gain) and column sum (backward gain), over the tokens. 1 for a doubly stochastic mixing."""
    product = mixings[0]
    for mixing in mixings[1:]:
        product = mixing @ product
    magnitude = product.abs()
    return magnitude.sum(-1).amax().item(), magnitude.sum(-2).amax().item()


def vector_norm(values: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(values)


def layer_groups(model: GPT, params: list[torch.Tensor]) -> dict[str, list[list[int]]]:
    """Per block, the indices into ``params`` of its parameters (``block``), of its attention's
    (``attn``) and of its MLP's (``mlp``)."""
    index = {id(p): i for i, p in enumerate(params)}

    def indices(module: torch.nn.Module) -> list[int]:
        return [index[id(p)] for p in module.parameters() if id(p) in index]

    blocks = list(model.blocks)
    return {
        "block": [indices(block) for block in blocks],
        "attn": [indices(block.attn) for block in blocks],
        "mlp": [indices(block.mlp) for block in blocks],
    }


def group_norms(per_parameter: torch.Tensor, groups: list[list[int]]) -> list[float]:
    """The L2 norm of each group of per-parameter norms (0 for an empty group)."""
    zero = per_parameter.new_zeros(())
    return torch.stack(
        [vector_norm(per_parameter[group]) if group else zero for group in groups]
    ).tolist()


def stream_shares(streams: torch.Tensor) -> list[float]:
    """Each stream's share of the streams entering the collapse (batch, seq, n, width): its RMS
    over the sum of the n RMS values. 1/n each when the streams carry alike; a stream near 0 is
    one the model stopped using (stream collapse, arXiv 2606.03483)."""
    rms = streams.float().pow(2).mean(dim=(0, 1, 3)).sqrt()
    return (rms / rms.sum().clamp_min(torch.finfo(rms.dtype).tiny)).tolist()


def stream_rms(stream: torch.Tensor | tuple[torch.Tensor, ...]) -> float:
    """RMS of a residual stream: (batch, seq, width), or (batch, seq, slots, width) or a tuple
    of (batch, seq, width) slots for a variant that carries several. A slot that is exactly zero
    everywhere is left out: AttnRes fills its 2N + 1 slots block by block, and counting the ones
    not written yet would make the RMS grow with depth by √(filled / total) alone."""
    if isinstance(stream, torch.Tensor):
        if stream.dim() != 4:
            return stream.detach().float().pow(2).mean().sqrt().item()
        stream = stream.unbind(dim=2)
    mean_squares = [
        part.detach().float().pow(2).mean()
        for part in stream
        if part.ne(0).any()  # NaN ≠ 0: a diverged slot is kept
    ]
    if not mean_squares:
        return 0.0
    return torch.stack(mean_squares).mean().sqrt().item()  # slots of one size: mean of means


class Probe:
    """One forward pass on the fixed probe batch that also reads, per block, the residual
    stream's RMS after the block and the attention's max logit, and the final hidden state."""

    def __init__(self, model: GPT, tokens: torch.Tensor, targets: torch.Tensor) -> None:
        self.model, self.tokens, self.targets = model, tokens, targets
        self.act_rms: list[float] = []
        self.attn_logit_max: list[float] = []
        self.stream_mixings: list[torch.Tensor] = []
        self.saturation: list[list[torch.Tensor]] = []  # per block: [saturated, inputs] counts
        self.stream_shares: list[float] = []
        self.hidden = torch.empty(0)

    @contextmanager
    def _hooks(self) -> Iterator[None]:
        self.act_rms, self.attn_logit_max, self.stream_mixings = [], [], []
        self.saturation, self.stream_shares = [], []

        def before_stream_mixing(module: MixesStreams, inputs: tuple[torch.Tensor, ...]) -> None:
            with torch.no_grad():  # a reading, not part of the step's graph
                self.stream_mixings.append(module.stream_mixing(inputs[0]).float())

        def before_collapse(_module, inputs: tuple[torch.Tensor, ...]) -> None:
            if isinstance(inputs[0], torch.Tensor):  # n streams as one tensor (variants.streams)
                self.stream_shares = stream_shares(inputs[0].detach())

        def after_final_norm(_module, _inputs, output: torch.Tensor) -> None:
            self.hidden = output.detach().float()

        def after_block(_module, _inputs, output: torch.Tensor) -> None:
            self.act_rms.append(stream_rms(output))

        def before_attention(module, inputs: tuple[torch.Tensor, ...]) -> None:
            self.attn_logit_max.append(module.max_logit(inputs[0].detach()))

        def before_squashing(counts: list[torch.Tensor]):
            def hook(module: Saturates, inputs: tuple[torch.Tensor, ...]) -> None:
                saturated = module.saturated(inputs[0].detach())
                counts[0] += saturated.sum()
                counts[1] += saturated.numel()

            return hook

        handles = [self.model.final_norm.register_forward_hook(after_final_norm)]
        for block in self.model.blocks:
            handles.append(block.register_forward_hook(after_block))
            handles.append(block.attn.register_forward_pre_hook(before_attention))
            squashing = [m for m in block.modules() if isinstance(m, Saturates)]
            if squashing:
                counts = [torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)]
                counts = [c.to(self.tokens.device) for c in counts]
                self.saturation.append(counts)
                handles += [
                    m.register_forward_pre_hook(before_squashing(counts)) for m in squashing
                ]
        mixers = [m for m in self.model.modules() if isinstance(m, MixesStreams)]
        handles += [module.register_forward_pre_hook(before_stream_mixing) for module in mixers]
        if mixers:
            handles.append(self.model.collapse_stream.register_forward_pre_hook(before_collapse))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def logits(self) -> torch.Tensor:
        with self._hooks(), torch.no_grad():
            return self.model(self.tokens).float()

    def saturation_by_layer(self) -> list[float]:
        """Per block, the share of its squashing maps' inputs past their knee in the last pass
        (empty for a variant without such maps)."""
        if not self.saturation:
            return []
        counts = torch.stack([torch.stack(pair) for pair in self.saturation]).double()
        return (counts[:, 0] / counts[:, 1].clamp(min=1)).tolist()

    def loss_with_gradients(self) -> float:
        """Cross-entropy on the probe batch with gradients in ``.grad`` (the caller clears them)."""
        with self._hooks():
            logits = self.model(self.tokens).float()
            loss = F.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
            loss.backward()
        return loss.item()


class Diagnostics:
    """Called by the training loop at init, around each step and at the end."""

    def __init__(
        self,
        model: GPT,
        probe_batch: tuple[torch.Tensor, torch.Tensor],
        cfg: DiagnosticsConfig,
        grad_clip: float = 0.0,
    ) -> None:
        self.model, self.cfg, self.grad_clip = model, cfg, grad_clip
        self.probe = Probe(model, *probe_batch)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.layer_groups = layer_groups(model, self.params)
        self.sqrt_n_params = math.sqrt(sum(p.numel() for p in self.params))
        self.loss_spikes = SpikeCounter(cfg.spike_window, cfg.spike_sigmas, cfg.spike_min_history)
        self.grad_spikes = SpikeCounter(cfg.spike_window, cfg.spike_sigmas, cfg.spike_min_history)
        self.initial_hidden = torch.empty(0)
        self.max_attn_logit = -math.inf
        self.seconds = 0.0
        self.record: dict[str, Any] = {}

    @contextmanager
    def _timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def _track_attention(self, values: list[float]) -> float:
        worst = max(values, default=math.nan)
        if math.isfinite(worst):
            self.max_attn_logit = max(self.max_attn_logit, worst)
        return worst

    def at_init(self) -> None:
        with self._timed():
            self.model.zero_grad(set_to_none=True)
            self.probe.loss_with_gradients()
            grad_norms = ffn_grad_norms(self.model)
            self.model.zero_grad(set_to_none=True)
            initial_logits = self.probe.logits()
            self.initial_hidden = self.probe.hidden
            first = grad_norms[0]
            self.record.update(
                init_grad_norm_by_layer=grad_norms,
                init_grad_norm_ratio=grad_norms[-1] / first if first > 0 else math.nan,
                init_act_rms_by_layer=list(self.probe.act_rms),
                init_attn_logit_max=self._track_attention(self.probe.attn_logit_max),
                init_log_z=torch.logsumexp(initial_logits, dim=-1).mean().item(),
            )

    def samples(self, step: int) -> bool:
        return step < self.cfg.early_steps or step % self.cfg.every == 0

    def snapshot(self) -> list[torch.Tensor]:
        """Parameters before the optimizer step, for the update-to-weight ratio."""
        with self._timed():
            return [p.detach().clone() for p in self.params]

    def after_step(
        self,
        loss: float,
        grad_norm: float,
        before: list[torch.Tensor] | None,
        diverged: bool,
    ) -> dict[str, Any]:
        """This step's curve entries; ``before`` is the snapshot when the step is sampled."""
        with self._timed():
            row: dict[str, Any] = {"grad_rms": grad_norm / self.sqrt_n_params}
            if not diverged:  # the diverging step is a divergence, not a spike
                row["loss_spike"] = self.loss_spikes.observe(loss)
                row["grad_spike"] = self.grad_spikes.observe(grad_norm)
            if before is None or diverged:
                return row
            logits = self.probe.logits()
            per_layer = list(self.probe.attn_logit_max)
            weights = torch.stack([b.norm() for b in before])
            changes = torch.stack(
                [(p.detach() - b).norm() for p, b in zip(self.params, before, strict=True)]
            )
            grads = self._unclipped_grad_norms(grad_norm)
            row.update(
                model_update=model_update(self.probe.hidden, self.initial_hidden),
                log_z=torch.logsumexp(logits, dim=-1).mean().item(),
                attn_logit_max=self._track_attention(per_layer),
                attn_logit_max_by_layer=per_layer,
                update_ratio=(vector_norm(changes) / vector_norm(weights)).item(),
                act_rms_by_layer=list(self.probe.act_rms),
            )
            for part, groups in self.layer_groups.items():
                suffix = f"_{part}" if part != "block" else ""
                row[f"grad_norm{suffix}_by_layer"] = group_norms(grads, groups)
                changed, weighed = group_norms(changes, groups), group_norms(weights, groups)
                row[f"update_ratio{suffix}_by_layer"] = [
                    c / w if w > 0 else math.nan for c, w in zip(changed, weighed, strict=True)
                ]
            saturation = self.probe.saturation_by_layer()
            if saturation:
                row["saturation_by_layer"] = saturation
            if self.probe.stream_mixings:
                row["stream_amax_gain"] = amax_gains(self.probe.stream_mixings)[0]
                row["stream_share"] = list(self.probe.stream_shares)
            return row

    def _unclipped_grad_norms(self, grad_norm: float) -> torch.Tensor:
        """Each parameter's gradient norm as the backward pass left it: clipping scaled every
        gradient by max_norm / (‖g‖ + 1e-6) (torch's clip_grad_norm_), undone here."""
        zero = self.params[0].new_zeros(())
        norms = torch.stack([p.grad.norm() if p.grad is not None else zero for p in self.params])
        if self.grad_clip > 0 and math.isfinite(grad_norm):
            norms = norms / min(1.0, self.grad_clip / (grad_norm + 1e-6))
        return norms

    def at_end(self, curve: list[dict[str, Any]]) -> dict[str, Any]:
        """The one-shot fields for the record."""
        with self._timed():
            self.probe.logits()
            early_rows = curve[: self.cfg.early_steps]
            early = [r["model_update"] for r in early_rows if "model_update" in r]

            if self.probe.stream_mixings:  # a multi-stream variant (variants.streams)
                forward, backward = amax_gains(self.probe.stream_mixings)
                self.record.update(amax_gain_forward=forward, amax_gain_backward=backward)
            self.record.update(
                final_act_rms_by_layer=list(self.probe.act_rms),
                max_attn_logit=self.max_attn_logit if self.max_attn_logit > -math.inf else math.nan,
                early_model_update=early[-1] if early else math.nan,
                loss_spikes=self.loss_spikes.count,
                grad_spikes=self.grad_spikes.count,
            )
        self.record["diagnostics_s"] = self.seconds
        return self.record
