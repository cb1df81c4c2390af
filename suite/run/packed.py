"""Packed learning-rate sweeps: the cells of one (variant, depth, seed, ...) that differ only in
their learning rate, trained together as one batched computation.

Every member starts from the same model and reads the same batches, as its own unpacked cell
would (same seed); only the learning rate differs. The K copies of each parameter are stacked
along a leading member dimension and each step is one ``torch.func.vmap`` of
``functional_call(model)`` over them (the variant's code runs unchanged), so K small models make
one set of K-times-larger kernel calls. Each member has its own AdamW state, gradient norm,
clipping and divergence verdict; a member that diverges is finished at once and dropped from the
stack, so it stops costing compute and never touches the others.

Diagnostics (suite/run/diagnostics.py) hook one model's modules and are not measured for packed
runs.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from suite.config import CellConfig, OptimConfig
from suite.run.data import Corpus, validation_batches
from suite.run.observers import Observer
from suite.run.optimizers import decay_group, hidden_parameters
from suite.run.parametrization import DepthScaling, model_depth_scaling
from suite.run.train import Member, TrainOutcome, loss_and_objective, member_observers, run_steps

log = logging.getLogger(__name__)

MemberDone = Callable[[int, TrainOutcome], None]
MemberProgress = Callable[[int, list[dict[str, float]]], None]


class PackedAdamW:
    """AdamW (Loshchilov & Hutter 2019) over member-stacked parameters, one learning rate per
    member; the same update as ``torch.optim.AdamW``, weight decay on the parameters ``decayed``
    names (by default every matrix), coupled or independent as suite/run/optimizers.py applies it.
    ``factors`` maps a parameter's name to its depth parametrization's (LR factor, ε factor), as
    suite/run/optimizers.py gives its groups (none: 1 for every parameter). ``peak_lrs`` are the
    members' own ``optim.lr`` (the independent decay's η)."""

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        optim: OptimConfig,
        factors: dict[str, tuple[float, float]] | None = None,
        decayed: set[str] | None = None,
        peak_lrs: torch.Tensor | None = None,
    ) -> None:
        self.optim = optim
        self.params = params
        self.factors = factors or {}
        self.decayed = (
            decayed if decayed is not None else {n for n, p in params.items() if p.dim() >= 3}
        )
        self.peak_lrs = peak_lrs
        self.exp_avg = {name: torch.zeros_like(p) for name, p in params.items()}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in params.items()}
        self.steps = 0

    def keep(self, members: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
        """Continue with only these members (indices into the current stack)."""
        self.params = params
        if self.peak_lrs is not None:
            self.peak_lrs = self.peak_lrs[members]
        self.exp_avg = {name: t[members] for name, t in self.exp_avg.items()}
        self.exp_avg_sq = {name: t[members] for name, t in self.exp_avg_sq.items()}

    @torch.no_grad()
    def step(self, lrs: torch.Tensor) -> None:
        o = self.optim
        self.steps += 1
        bias_correction1 = 1 - o.beta1**self.steps
        bias_correction2_sqrt = math.sqrt(1 - o.beta2**self.steps)
        for name, p in self.params.items():
            grad, exp_avg, exp_avg_sq = p.grad, self.exp_avg[name], self.exp_avg_sq[name]
            lr_factor, eps_factor = self.factors.get(name, (1.0, 1.0))
            member_lrs = lrs * lr_factor if lr_factor != 1.0 else lrs
            per_member = (-1, *[1] * (p.dim() - 1))
            if name in self.decayed:
                if o.weight_decay_mode == "independent" and self.peak_lrs is not None:
                    decay = lrs / self.peak_lrs * o.weight_decay  # (η_t/η)·λ, no depth factor
                else:
                    decay = member_lrs * o.weight_decay
                p.mul_((1 - decay).view(per_member))
            exp_avg.lerp_(grad, 1 - o.beta1)
            exp_avg_sq.mul_(o.beta2).addcmul_(grad, grad, value=1 - o.beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(o.eps * eps_factor)
            p.sub_(exp_avg / denom * (member_lrs / bias_correction1).view(per_member))


def depth_factors(model: nn.Module, scaling: DepthScaling) -> dict[str, tuple[float, float]]:
    """Per parameter name, the (LR, ε) factors of the depth parametrization: ``scaling``'s for
    the hidden parameters (inside the blocks), 1 for the rest (suite/run/optimizers.py)."""
    hidden = {id(p) for p in hidden_parameters(model)}
    return {
        name: (scaling.hidden_lr, scaling.hidden_eps) if id(p) in hidden else (1.0, 1.0)
        for name, p in model.named_parameters()
    }


def member_grad_norms(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each member's global gradient norm (over all its parameters)."""
    per_tensor = [p.grad.reshape(len(p), -1).norm(dim=1) for p in params.values()]
    return torch.stack(per_tensor).norm(dim=0)


def stack_members(model: nn.Module, members: int) -> dict[str, torch.Tensor]:
    """``members`` identical copies of every parameter, stacked along a new first dimension
    (tied weights appear once, as ``named_parameters`` lists them)."""
    return {
        name: p.detach().expand(members, *p.shape).clone().requires_grad_()
        for name, p in model.named_parameters()
    }


def keep_members(
    params: dict[str, torch.Tensor], optimizer: PackedAdamW, members: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A smaller stack of only these members, with their gradients and optimizer state: the
    dropped ones cost nothing from the next step on."""
    kept = {}
    for name, p in params.items():
        kept[name] = p.detach()[members].requires_grad_()
        kept[name].grad = p.grad[members]
    optimizer.keep(members, kept)
    return kept


def check_packable(cells: Sequence[CellConfig]) -> None:
    """A pack's cells may differ in their learning rate and nothing else that matters."""

    def without_lr(cell: CellConfig) -> dict:
        defining = cell.result_defining()
        defining["optim"].pop("lr")
        return defining

    first = without_lr(cells[0])
    for cell in cells[1:]:
        if without_lr(cell) != first:
            raise ValueError(f"cells {cells[0].cell_id()} and {cell.cell_id()} differ beyond lr")


class PackedStep:
    """The pack's step (:class:`suite.run.train.Stepper`): the members' parameters stacked, one
    ``vmap`` of the model over them, each member's own AdamW state, clipping and learning rate;
    a member that ends is dropped from the stack and costs nothing after."""

    packed = True

    def __init__(
        self,
        model: nn.Module,
        corpus: Corpus,
        cells: Sequence[CellConfig],
        device: torch.device,
    ) -> None:
        check_packable(cells)
        lead = cells[0]
        optim = lead.optim
        self.optim, self.corpus, self.lead, self.device = optim, corpus, lead, device
        self.params = stack_members(model, len(cells))
        decayed = {
            name
            for name, p in model.named_parameters()
            if decay_group(model, name, p) not in optim.no_decay
        }
        self.optimizer = PackedAdamW(
            self.params,
            optim,
            depth_factors(model, model_depth_scaling(lead.model)),
            decayed,
            torch.tensor([cell.optim.lr for cell in cells], device=device),
        )
        autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=lead.train.dtype == "bfloat16"
        )

        def losses(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, z: float):
            def member_model(tokens: torch.Tensor) -> torch.Tensor:
                return functional_call(model, params, (tokens,))

            return loss_and_objective(member_model, x, y, autocast, z)

        self.batched_losses = vmap(losses, in_dims=(0, None, None, None))

    def forward_backward(
        self, lrs: list[float], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[float], list[float]]:
        for p in self.params.values():
            p.grad = None
        member_losses, objectives = self.batched_losses(self.params, x, y, self.optim.z_loss)
        objectives.sum().backward()  # member k's parameters only see member k's objective
        grad_norms = member_grad_norms(self.params)
        if self.optim.grad_clip > 0:
            # As torch.nn.utils.clip_grad_norm_, member by member.
            scale = (self.optim.grad_clip / (grad_norms + 1e-6)).clamp(max=1.0)
            for p in self.params.values():
                p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))
        return member_losses.tolist(), grad_norms.tolist()

    def update(self, keep: list[int], lrs: list[float]) -> None:
        if not keep:
            return  # every member still training ended at this step: nothing left to update
        if len(keep) < len(next(iter(self.params.values()))):
            members = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.params = keep_members(self.params, self.optimizer, members)
        self.optimizer.step(torch.tensor(lrs, device=self.device))

    def evaluate(self) -> list[float]:
        return evaluate_packed(
            self.batched_losses, self.params, self.corpus, self.lead, self.device
        )


def train_packed(
    model: nn.Module,
    corpus: Corpus,
    cells: Sequence[CellConfig],
    device: torch.device,
    on_done: MemberDone,
    on_progress: MemberProgress | None = None,
    outcomes: list[TrainOutcome] | None = None,
    observers: Sequence[Sequence[Observer]] = (),
) -> None:
    """Train every cell (member) from ``model``'s initial weights; ``on_done(member, outcome)``
    is called for each as soon as it is finished: when it diverges, or all together at the end.
    ``outcomes`` (one per member, filled in place) lets a caller keep the curves trained so far
    when training raises; ``observers`` (one sequence per member) are added to each member's
    own. The loop is suite/run/train.py's, with :class:`PackedStep`."""
    outcomes = outcomes if outcomes is not None else [TrainOutcome() for _ in cells]
    stepper = PackedStep(model, corpus, cells, device)
    members = []
    for index, cell in enumerate(cells):
        progress = None
        if on_progress is not None:
            progress = functools.partial(on_progress, index)
        own = member_observers(cell, progress)
        extra = list(observers[index]) if observers else []
        members.append(Member(cell, outcomes[index], [*own[:-1], *extra, own[-1]]))
    run_steps(stepper, members, corpus, device, on_done)


@torch.no_grad()
def evaluate_packed(
    batched_losses: Callable,
    params: dict[str, torch.Tensor],
    corpus: Corpus,
    cell: CellConfig,
    device: torch.device,
) -> list[float]:
    """Each member's mean validation loss over the same batches as
    ``suite.run.train.evaluate``."""
    batches = validation_batches(
        corpus, cell.model.seq_len, cell.train.batch_size, cell.train.eval_batches, device
    )
    # z_loss 0: the validation loss is the cross-entropy alone, as suite.run.train.evaluate's.
    total = sum(batched_losses(params, x, y, 0.0)[0] for x, y in batches)
    return (total / len(batches)).tolist()
