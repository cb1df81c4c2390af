"""What a variant is: residual wiring, the norm after the last block, and its own initialization.

A variant is a dataclass whose fields are its own hyper-parameters (overridable from the command
line as ``variant.<field>=...``). It never sees Hydra, the results store or the report, and it
never sees the model itself: it builds its wirings and norms, and initializes through
:class:`ModelView`, the few parts of the built model that a variant's paper may set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from torch import Tensor, nn

Sublayer = Callable[[Tensor], Tensor]
"""One of a block's two sublayers: causal self-attention (F) or the MLP (G), width → width."""

Stream = Tensor | tuple[Tensor, ...]
"""The residual stream between blocks: one tensor, or a slot variant's tuple of (batch, seq,
width) slots."""

GPT2_INIT_STD = 0.02
"""The std of the N(0, σ) init every weight starts from (GPT-2; Radford et al. 2019)."""


@runtime_checkable
class Wiring(Protocol):
    """A block's residual arrangement: how its two sublayers, their norms and the residual
    stream combine. ``forward(x, attn, mlp)`` maps the residual stream (batch, seq, width) to
    the next one, of the same shape (or, for a variant whose :meth:`Variant.expand_stream` makes
    a tuple of slots, to a tuple of as many slots, each of the same shape). Implement it as an
    :class:`torch.nn.Module` so that its own parameters (norm gains, residual scales) train with
    the model; the model calls it."""

    def forward(self, x: Stream, attn: Sublayer, mlp: Sublayer) -> Stream: ...

    def __call__(self, x: Stream, attn: Sublayer, mlp: Sublayer) -> Stream: ...


SATURATION_SLOPE = 0.1
"""A squashing map's input is past its knee where the map's slope is below this fraction of its
slope at 0: for tanh |z| > atanh(√0.9) ≈ 1.82, for erf |z| > √ln 10 ≈ 1.52."""


@runtime_checkable
class Saturates(Protocol):
    """A point-wise squashing map (DyT's tanh, Derf's erf) that says which of its inputs are
    past its knee (:data:`SATURATION_SLOPE`), where little gradient passes back: the diagnostics
    count their share per block over training (suite/run/diagnostics.py), the signature of the
    saturation failure of normalization-free Transformers (Zhu et al. 2025 §6; Chen et al. 2025)."""

    def saturated(self, x: Tensor) -> Tensor: ...


WiringT = TypeVar("WiringT")


@dataclass(frozen=True)
class BlockView:
    """What a variant may initialize in one block: the sublayers' linear maps and its wiring.

    ``attn_qkv`` is the fused query/key/value projection: its weight's rows are the query's,
    then the key's, then the value's (``width`` rows each).
    """

    attn_qkv: nn.Linear
    attn_out: nn.Linear
    mlp_in: nn.Linear
    mlp_out: nn.Linear
    wiring: Wiring
    mlp_in_maps: int = 1
    """How many maps ``mlp_in`` fuses: 1 (GELU's), or 2 (SwiGLU's up and gate, in that order,
    on the llama backbone); an init defined per matrix (Xavier's) treats each on its own."""

    @property
    def residual_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The two maps whose output joins the residual stream: attention's, then the MLP's."""
        return self.attn_out, self.mlp_out


@dataclass(frozen=True)
class ModelView:
    """The model as a variant may see it, never the model itself: at init
    (:meth:`Variant.init_weights`, after the common base init) and after each optimizer step
    (:meth:`Variant.after_optimizer_step`): its shape, its blocks in order, and two ways to run
    it (for inits that profile the model)."""

    vocab_size: int
    seq_len: int
    width: int
    depth: int
    blocks: tuple[BlockView, ...]
    token_embedding: nn.Embedding
    position_embedding: nn.Embedding | None
    """None on the llama backbone, whose positions are RoPE's."""
    head: nn.Linear
    """The output head; its weight is the token embedding's when the model ties them."""
    final_norm: nn.Module
    """What the variant's :meth:`Variant.final_norm` built (identity when it has none)."""
    embed: Callable[[Tensor], Tensor]
    """tokens (batch, seq) → the residual stream entering the first block."""
    forward: Callable[[Tensor], Tensor]
    """tokens (batch, seq) → logits, through every block."""

    def wirings(self, kind: type[WiringT]) -> list[WiringT]:
        """Every block's wiring, checked to be the variant's own ``kind``."""
        wirings: list[WiringT] = []
        for index, block in enumerate(self.blocks):
            if not isinstance(block.wiring, kind):
                raise TypeError(
                    f"block {index}'s wiring is a {type(block.wiring).__name__}, "
                    f"not a {kind.__name__}"
                )
            wirings.append(block.wiring)
        return wirings


InitView = ModelView
"""The name of :class:`ModelView` before suite 0.4 (it serves the post-step hook too): plugins
written for 0.3 keep working."""


@dataclass(frozen=True)
class AttentionOptions:
    """What a variant may ask of every attention sublayer, without subclassing the model."""

    qkv_norm: Callable[[int], nn.Module] | None = None
    """A norm, built for the model width, applied to each of the full-width query, key and value
    after the fused projection (HybridNorm's QKV-norm); none by default."""
    query_key_map: Callable[[int, int], nn.Module] | None = None
    """Built from (heads, head_dim): one module applied to the queries and to the keys, each
    (batch, heads, seq, head_dim), after the heads split (nGPT's s_qk ⊙ Norm(·)); none by
    default."""
    softmax_scale: Callable[[int], float] | None = None
    """head_dim → the factor on q·k before the softmax; 1/√head_dim by default."""


@dataclass(frozen=True)
class MLPOptions:
    """What a variant may ask of every MLP sublayer, without subclassing the model."""

    hidden_scale: Callable[[int, int], nn.Module] | None = None
    """Built from (hidden, width): applied to the MLP's hidden pre-activation, before the
    nonlinearity (nGPT's s_u); none by default."""


@dataclass(frozen=True)
class SublayerOptions:
    """What a variant may ask of the backbone's sublayers and head without subclassing the model:
    every attention sublayer's options (HybridNorm's QKV-norm; nGPT's query/key map and softmax
    scale), every MLP's (nGPT's hidden scale), and a module on the logits (nGPT's s_z). The
    family-specific hooks live here, in one optional object, rather than on every variant."""

    attention: AttentionOptions = field(default_factory=AttentionOptions)
    mlp: MLPOptions = field(default_factory=MLPOptions)
    output_scale: Callable[[int, int], nn.Module] | None = None
    """(vocabulary, width) → the module applied to the logits after the output head."""


@dataclass(frozen=True)
class Recipe:
    """The parts of a variant's published training setup that are not its wiring and that the
    suite can express, applied by ``recipe=authors`` (the ``controlled`` arm leaves them out, so
    that only the wiring differs). ``source`` says where each part comes from (paper section,
    the authors' code); a recipe that sets nothing says that the paper trains the variant as the
    controlled arm does, and its ``authors`` cells are the controlled ones (never trained
    twice). Optimizer facts (weight-decay mode, exemptions) are settings of any run
    (``optim.weight_decay_mode``, ``optim.no_decay``), not part of a recipe."""

    source: str
    embedding_scale: Callable[[int], float] | None = None
    """width d → a scalar on the embeddings entering the first block (e.g. √d)."""
    learnable_embedding_scale: bool = False
    """... trained with the model (DyT's and Derf's), or fixed (fairseq's)."""
    scale_positions: bool = True
    """Whether the scale multiplies the learned position embeddings too (Derf's patch scales
    tok + pos) or the token embeddings only (fairseq adds positions after its scale)."""
    embedding_std: Callable[[int], float] | None = None
    """width d → the std of the token embedding's N(0, σ) init, instead of GPT-2's 0.02."""
    init: Callable[[ModelView], None] | None = None
    """Run without gradients after the variant's own init (e.g. per-sublayer α₀)."""

    @property
    def changes_training(self) -> bool:
        return any(
            part is not None for part in (self.embedding_scale, self.embedding_std, self.init)
        )


NO_RECIPE = Recipe(source="")
"""A variant that declares no recipe: ``recipe=authors`` trains it as ``controlled``."""


@dataclass
class Variant:
    """Base class. Subclasses set ``formula`` and implement :meth:`wiring`."""

    name: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    revision: ClassVar[int] = 1
    """Bumped when a fix changes what the variant trains (its formula or init): from 2 on it is
    part of the cell id, so a store re-trains that variant's cells, and only those."""
    trains_without_weight_decay: ClassVar[bool] = False
    """True for a variant whose paper trains it with no weight decay (nGPT, whose weights live
    on the unit sphere): its cells are built with optim.weight_decay = 0, and say so."""
    depth_parametrization_conflict: ClassVar[str] = ""
    """Why the variant cannot take model.parametrization=depth_mup|completep, in a few words:
    it already scales its residual branches with the depth N (DeepNorm's α and β), or a
    multiplier on its branches would be undone; empty when it can (suite/run/parametrization.py)."""

    def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
        """The wiring of block ``layer`` (0-based) of ``n_layers``: see :class:`Wiring`."""
        raise NotImplementedError

    def final_norm(self, width: int) -> nn.Module:
        """The module applied after the last block (identity when the variant has none)."""
        return nn.Identity()

    def embedding_norm(self, width: int) -> nn.Module:
        """The module applied to the embeddings before the first block (identity by default)."""
        return nn.Identity()

    def init_weights(self, model: ModelView) -> None:
        """Variant-specific initialization, applied after the model's common base init."""

    def sublayer_options(self) -> SublayerOptions:
        """What the variant asks of the backbone's sublayers and head beyond its wiring (most ask
        nothing): see :class:`SublayerOptions`."""
        return SublayerOptions()

    def expand_stream(self, width: int, n_layers: int) -> nn.Module:
        """The module that turns the embeddings (batch, seq, width) into the variant's residual
        stream, which its wirings map to a stream of the same shape. Identity by default (one
        stream of width d); a multi-stream variant (Hyper-Connections) returns n copies as one
        (batch, seq, n, width) tensor, and Attention Residuals a tuple of (batch, seq, width)
        slots, the embedding's and one for each of the 2N sublayers of the ``n_layers`` blocks
        (B + 1 in B blocks): a tuple when a sublayer writes one slot and reads some, so that a
        write does not copy the others."""
        return nn.Identity()

    def collapse_stream(self, width: int, n_layers: int) -> nn.Module:
        """The module that turns the residual stream after the last block back into (batch,
        seq, width), before :meth:`final_norm`. Identity by default."""
        return nn.Identity()

    def after_optimizer_step(self, model: ModelView) -> None:
        """Called after every optimizer step, without gradients (e.g. nGPT puts its weights back
        on the unit sphere). A variant that overrides it cannot be trained packed."""

    def acts_after_optimizer_steps(self) -> bool:
        return type(self).after_optimizer_step is not Variant.after_optimizer_step

    def authors_recipe(self) -> Recipe:
        """What ``recipe=authors`` adds to the wiring: see :class:`Recipe`. A built-in declares
        one, empty or not, with its source; a plugin that declares none is trained alike in
        both arms."""
        return NO_RECIPE

    def params(self) -> dict[str, Any]:
        """The variant's own parameters, as they name its cells. A parameter added after cells
        were stored (``field(metadata={"since": "0.5"})``) is left out at its default, so those
        cells keep their ids; set, it is a parameter like any."""
        values = asdict(self)
        return {
            spec.name: values[spec.name]
            for spec in fields(self)
            if spec.metadata.get("since") is None or values[spec.name] != spec.default
        }


def gpt2_residual_std(n_layers: int) -> float:
    """GPT-2's std for the output projections that join the residual stream: 0.02 / √(2N),
    one factor 1/√2N per residual branch, so that the stream's variance does not grow with
    depth in pre-norm models (Radford et al. 2019; nanoGPT)."""
    return GPT2_INIT_STD / math.sqrt(2 * n_layers)


def scale_residual_projections(model: ModelView, std: float) -> None:
    """Re-initialize the weight of every sublayer's output projection with N(0, std)."""
    for block in model.blocks:
        for projection in block.residual_projections:
            nn.init.normal_(projection.weight, mean=0.0, std=std)
