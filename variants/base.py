"""What a variant is: residual wiring, the norm after the last block, and its own initialization.

A variant is a dataclass whose fields are its own hyper-parameters (overridable from the command
line as ``variant.<field>=...``). It never sees Hydra, the results store or the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import nn


@dataclass
class Variant:
    """Base class. Subclasses set ``formula`` and implement :meth:`wiring`.

    ``wiring(width, n_layers, layer)`` returns a module whose ``forward(x, attn, mlp)`` computes
    one Transformer block from its two sublayers: ``attn`` (F) and ``mlp`` (G).
    """

    name: ClassVar[str] = ""
    formula: ClassVar[str] = ""

    def wiring(self, width: int, n_layers: int, layer: int) -> nn.Module:
        raise NotImplementedError

    def final_norm(self, width: int) -> nn.Module:
        """The module applied after the last block (identity when the variant has none)."""
        return nn.Identity()

    def embedding_norm(self, width: int) -> nn.Module:
        """The module applied to the embeddings before the first block (identity by default)."""
        return nn.Identity()

    def init_weights(self, model: nn.Module, n_layers: int) -> None:
        """Variant-specific initialization, applied after the model's common base init."""

    def params(self) -> dict[str, Any]:
        return asdict(self)


def scale_residual_projections(model: nn.Module, std: float) -> None:
    """Re-initialize the output projection of every sublayer with N(0, std).

    GPT-2 / nanoGPT use std = 0.02 / sqrt(2N) so that the residual stream's variance does not
    grow with depth in pre-norm models (Radford et al. 2019).
    """
    for block in model.blocks:
        nn.init.normal_(block.attn.proj.weight, mean=0.0, std=std)
        nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=std)
