"""Depth parametrizations: how the residual branches and the optimizer's settings change with the
number of blocks N, so that a learning rate tuned at a base depth N₀ stays good at other depths.

With the depth multiplier m = N / N₀, the family studied by Bordelon et al. (2023, "Depthwise
Hyperparameter Transfer in Residual Networks: Dynamics and Scaling Limit", arXiv 2309.16620),
Yang et al. (2023, "Tensor Programs VI: Feature Learning in Infinite-Depth Neural Networks",
arXiv 2310.02244) and Dey et al. (2025, "Don't be lazy: CompleteP enables compute-efficient deep
transformers", arXiv 2505.01618, §2 and Table 1) is indexed by an exponent α:

    x_{ℓ+1} = x_ℓ + m^(−α) · F_ℓ(x_ℓ)       every residual branch (attention F, MLP G)
    η_hidden = η · m^(α − 1)                  Adam(W) learning rate of the hidden parameters
    ε_hidden = ε · m^(−α)                     AdamW ε of the same parameters

    sp          no depth rule at all (m plays no part): the suite's parametrization until 0.3
    depth_mup   α = ½: branches × m^(−½), hidden LR × m^(−½), ε × m^(−½) — Yang et al.'s
                depth-μP for Adam (block multiplier a/√L, learning rate η/√L) and Bordelon
                et al.'s 1/√L branch scaling
    completep   α = 1: branches × m^(−1), hidden LR unchanged, ε × m^(−1) — Dey et al.'s
                CompleteP, the only α whose every layer keeps learning non-linearly
                ("non-lazy") as N grows

At N = N₀ every factor is exactly 1, so each parametrization trains exactly the SP model there.
The exponents were checked against Dey et al.'s statement of the family (residual branch
m^(−α), LR correction m^(α−1)) and against the authors' reference implementation (the
``completep`` branch of EleutherAI/nanoGPT-mup), which applies the LR rule to the blocks' hidden
weights, norm gains and biases and the ε rule to AdamW's ε.

Which parameters are "hidden": every parameter inside the N blocks (the sublayers' matrices and
biases, the wirings' norm gains, residual gains and stream-mixing weights). Their gradients all
pass through a branch multiplier, which is why the ε rule follows them: ε keeps its ratio to
the gradient. The token and position embeddings, the norm after the embeddings, the final norm
and the output head are not scaled (Table 1's embedding and unembedding rows have no depth
factor). Width is fixed in this suite, so the width (μP) factors of Table 1 are 1.

Two choices of this suite, not the papers':

- The variant's own init is kept. The papers' hidden init has no depth factor, while most of the
  suite's variants give the output projections GPT-2's 0.02/√(2N) (suite/run/model.py); at N > N₀
  their branches therefore start √(N₀/N)-times smaller than in the papers' models (at N = N₀,
  nothing differs). Undoing it would make the parametrization depend on the variant.
- With optim=muon the hidden matrices' Muon learning rate gets the same m^(α−1) as AdamW's:
  Muon's orthogonalized step, rescaled to AdamW's update RMS, does not grow with the gradient's
  scale either, so the same argument holds (neither paper trained with Muon); Muon has no ε
  to rescale (its ε only guards a division by the norm of the momentum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from suite.config import ModelConfig

PARAMETRIZATIONS = ("sp", "depth_mup", "completep")
ALPHA: dict[str, float] = {"depth_mup": 0.5, "completep": 1.0}


@dataclass(frozen=True)
class DepthScaling:
    """The factors one parametrization gives a model of one depth: on each residual branch's
    output, and on the hidden parameters' learning rate and AdamW ε."""

    branch_multiplier: float = 1.0
    hidden_lr: float = 1.0
    hidden_eps: float = 1.0


SP = DepthScaling()


def depth_scaling(parametrization: str, depth: int, base_depth: int) -> DepthScaling:
    """The factors of ``parametrization`` for N = ``depth`` blocks and base depth N₀ =
    ``base_depth`` (see the module docstring); all exactly 1 at N = N₀ and for sp."""
    if parametrization == "sp":
        return SP
    if parametrization not in ALPHA:
        raise ValueError(
            f"unknown parametrization {parametrization!r}; one of {', '.join(PARAMETRIZATIONS)}"
        )
    alpha, m = ALPHA[parametrization], depth / base_depth
    return DepthScaling(
        branch_multiplier=m**-alpha, hidden_lr=m ** (alpha - 1), hidden_eps=m**-alpha
    )


def model_depth_scaling(model: ModelConfig) -> DepthScaling:
    """The factors a cell's ``model`` section asks for (``model.parametrization``,
    ``model.depth``, ``model.base_depth``)."""
    return depth_scaling(model.parametrization, model.depth, model.base_depth)
