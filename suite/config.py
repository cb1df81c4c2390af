"""The typed schema of the suite's configuration, and of one sweep cell.

Every setting is declared once, here: its type, default, meaning, range check and whether it is
part of the cell's identity (:func:`setting`). The sections and the cell are plain dataclasses:
this module needs neither torch nor Hydra nor the variant registry, so analysis code imports it
freely. suite/launch/cell.py registers them in Hydra's ConfigStore (so Hydra type-checks every
composed config, and the YAML files under ``conf/`` hold only choices and presets) and builds a
:class:`CellConfig` from a composed config. ``python -m suite.config`` lists every setting.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An impossible or malformed configuration, detected before training."""


def store_path(store: Any) -> str:
    """The store as a folder path: ``~`` expanded, as a shell would (a preset's ``store: ~/x``
    is the home folder's, never a literal ``./~/x``)."""
    text = str(store)
    return str(Path(text).expanduser()) if text.strip() else text  # "" stays, to be refused


# --- range checks, each stated beside the field it checks ------------------------------------


@dataclass(frozen=True)
class Check:
    holds: Callable[[Any], bool]
    requirement: str  # completes "<key>: ..." in the error message


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def at_least(bound: int) -> Check:
    return Check(lambda x: x >= bound, "must be ≥ 0" if bound == 0 else f"must be at least {bound}")


POSITIVE = Check(lambda x: _finite(x) and x > 0, "must be a positive number")
# The store keeps integers as 64-bit (Parquet int64); a seed seeds torch and NumPy.
INT64_MAX = 2**63 - 1
SEED = Check(
    lambda x: isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= INT64_MAX,
    f"must be an integer in [0, {INT64_MAX}]",
)
NON_NEGATIVE = Check(lambda x: _finite(x) and x >= 0, "must be ≥ 0")


def within(
    low: float, high: float, *, include_low: bool = True, include_high: bool = False
) -> Check:
    def holds(x: Any) -> bool:
        above = x >= low if include_low else x > low
        below = x <= high if include_high else x < high
        return _finite(x) and above and below

    brackets = ("[" if include_low else "(", "]" if include_high else ")")
    return Check(holds, f"must be in {brackets[0]}{low:g}, {high:g}{brackets[1]}")


def one_of(*choices: str) -> Check:
    listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
    return Check(lambda x: x in choices, f"must be {listed}")


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    check: Check | None = None,
    identity: bool = True,
    factory: Callable[[], Any] | None = None,
    since: str | None = None,
) -> Any:
    """A config field with its meaning, its range check, and whether it belongs to the cell's
    identity (the hash in its id). ``identity=False`` is for what cannot change the trained
    result (where it is stored, how often it logs, labels judged after training): changing such
    a field re-uses the stored cells instead of training them again. ``since`` marks a field
    added after stores were written: at its default it stays out of the hash, so the cells of
    those stores keep their ids (and resume); set to anything else it is part of it."""
    metadata = {"doc": doc, "check": check, "identity": identity, "since": since}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _default(schema: type, name: str) -> Any:
    return next(spec.default for spec in dataclasses.fields(schema) if spec.name == name)


# --- the sections ----------------------------------------------------------------------------


BACKBONES = ("gpt2", "llama")


@dataclass
class ModelConfig:
    width: int = setting(64, "residual stream width d", check=at_least(1))
    heads: int = setting(4, "attention heads (must divide width)", check=at_least(1))
    depth: int = setting(6, "number of blocks, N in the variant formulas", check=at_least(1))
    mlp_ratio: float = setting(4.0, "MLP hidden width / width", check=POSITIVE)
    seq_len: int = setting(64, "tokens per training sequence", check=at_least(1))
    bias: bool = setting(False, "linear-layer biases; off as in PaLM, which found that more stable")
    tie_embeddings: bool = setting(True, "output head shares the token embedding's weights")
    qk_norm: bool = setting(False, "LayerNorm on queries and keys, any variant")
    value_residual: str = setting(
        "off",
        "mix every block's attention values with the first block's, any variant: "
        "v ← λv + (1−λ)v₁ (ResFormer); off | fixed (λ = ½) | learned (λ per head, init ½)",
        check=one_of("off", "fixed", "learned"),
        since="0.3",
    )
    parametrization: str = setting(
        "sp",
        "how branches, learning rates and AdamW ε scale with depth N "
        "(suite/run/parametrization.py): sp (none) | depth_mup (branches × (N/N₀)^-½) | "
        "completep (branches × (N/N₀)^-1)",
        check=one_of("sp", "depth_mup", "completep"),
        since="0.3",
    )
    # N₀ = 4: the shallowest depth of the transfer preset (4 … 32), so its shallowest cells are
    # exactly sp and the grid reads as "an LR tuned at 4 blocks, carried to 8 … 32".
    base_depth: int = setting(
        4,
        "N₀, the depth at which depth_mup and completep are exactly sp (the depth an LR is tuned "
        "at); only used by those two",
        check=at_least(1),
        since="0.3",
    )

    backbone: str = setting(
        "gpt2",
        "what every variant's F, G and embeddings are (suite/run/model.py): gpt2 (learned "
        "positions, GELU MLP) | llama (RoPE θ=10 000, SwiGLU MLP of LLaMA's hidden width, no "
        "biases); the norms stay the variant's",
        check=one_of(*BACKBONES),
        since="0.4",
    )
    logit_softcap: float = setting(
        0.0,
        "cap c on the output logits, c·tanh(logits/c) (Gemma 2: 30); 0 = off",
        check=NON_NEGATIVE,
        since="0.5",
    )

    def check_together(self) -> None:
        _check(
            self.width % self.heads == 0,
            "model.heads",
            f"must divide model.width={self.width}",
            self.heads,
        )
        if self.backbone == "llama":
            _check(
                (self.width // self.heads) % 2 == 0,
                "model.heads",
                f"must leave an even head dimension for the llama backbone's RoPE (model.width="
                f"{self.width} / model.heads is odd)",
                self.heads,
            )
            _check(
                not self.bias,
                "model.bias",
                "the llama backbone has no biases; set model.bias=false",
                self.bias,
            )


# The size of the pinned stdlib corpus (suite/run/corpus/; suite/run/data.py reads it).
STDLIB_CORPUS_BYTES = 4_000_000


@dataclass
class DataConfig:
    source: str = setting(
        "stdlib", "stdlib | text | tokens", check=one_of("stdlib", "text", "tokens")
    )
    path: str | None = setting(
        None,
        "text file (source=text) or uint16 .bin (source=tokens)",
        check=Check(lambda x: x is None or x.strip() != "", "must be a file path"),
    )
    max_bytes: int = setting(
        STDLIB_CORPUS_BYTES, "stdlib corpus size cap, bytes", check=at_least(1)
    )
    val_fraction: float = setting(0.1, "held-out fraction", check=within(0, 1, include_low=False))
    vocab_size: int | None = setting(
        None,
        "tokens only; default: largest token id + 1",
        # Token files hold uint16 ids: a larger vocabulary only adds embeddings no token uses.
        check=Check(
            lambda x: x is None or 2 <= x <= 2**16, "must be in [2, 65536] (token ids are uint16)"
        ),
    )

    def check_together(self) -> None:
        _check(
            self.source != "stdlib" or self.max_bytes <= STDLIB_CORPUS_BYTES,
            "data.max_bytes",
            f"must be at most {STDLIB_CORPUS_BYTES}: the shipped stdlib corpus holds that many "
            "bytes (for more text, data=text data.path=FILE)",
            self.max_bytes,
        )
        if self.source in ("text", "tokens"):
            _check(
                bool(self.path),
                "data.path",
                f"is required for data.source={self.source}",
                self.path,
            )
            _check(Path(self.path).is_file(), "data.path", "no such file", self.path)


DECAY_GROUPS = ("embeddings", "head", "gains", "biases")  # what optim.no_decay may exempt


@dataclass
class OptimConfig:
    name: str = setting(
        "adamw",
        "adamw | muon: Muon for the blocks' hidden matrices, AdamW for the rest "
        "(suite/run/optimizers.py); chosen as optim=adamw|muon",
        check=one_of("adamw", "muon"),
        since="0.3",
    )
    lr: float = setting(
        1e-3, "peak learning rate (AdamW; Muon's too, at AdamW's update RMS)", check=POSITIVE
    )
    beta1: float = setting(0.9, "AdamW β1", check=within(0, 1))
    beta2: float = setting(0.95, "AdamW β2", check=within(0, 1))
    eps: float = setting(1e-8, "AdamW ε", check=POSITIVE)
    weight_decay: float = setting(
        0.1,
        "weight decay λ (AdamW's decoupled form; on the groups optim.no_decay leaves in)",
        check=NON_NEGATIVE,
    )
    weight_decay_mode: str = setting(
        "coupled",
        "coupled: θ ← θ·(1 − η_t·λ), torch's AdamW (Loshchilov & Hutter 2019) | independent: "
        "θ ← θ·(1 − (η_t/η)·λ), the decay follows the schedule but not the peak LR η (Wortsman "
        "et al. 2023, §3.2.2)",
        check=one_of("coupled", "independent"),
        since="0.4",
    )
    no_decay: list[str] = setting(
        doc="parameter groups exempt from weight decay, from: embeddings (token and position "
        "tables; a tied head with them), head (an untied output head), gains (norm gains and "
        "every other vector or scalar a variant adds), biases. OLMo 2 exempts embeddings too",
        factory=lambda: ["gains", "biases"],
        check=Check(
            lambda x: isinstance(x, list) and set(x) <= set(DECAY_GROUPS) and len(set(x)) == len(x),
            f"must be a list of distinct groups from {', '.join(DECAY_GROUPS)}",
        ),
        since="0.4",
    )
    warmup_steps: int = setting(0, "linear warmup, in steps ...", check=at_least(0))
    warmup_fraction: float = setting(
        0.0, "... or as a fraction of train.steps (set one, not both)", check=within(0, 1)
    )
    schedule: str = setting(
        "constant", "constant | cosine (after warmup)", check=one_of("constant", "cosine")
    )
    min_lr_ratio: float = setting(
        0.1, "cosine floor, as a fraction of lr", check=within(0, 1, include_high=True)
    )
    grad_clip: float = setting(0.0, "max global gradient norm; 0 = no clipping", check=NON_NEGATIVE)
    z_loss: float = setting(
        0.0, "coefficient of the auxiliary log²Z loss (PaLM: 1e-4); 0 = off", check=NON_NEGATIVE
    )
    center_output_embedding: bool = setting(
        False,
        "μ-centering (Stollenwerk et al. 2026, arXiv 2601.02031): after every optimizer step "
        "the output embeddings' mean is subtracted from each (the token embedding too, when "
        "tied), which bounds the mean output logit",
        since="0.5",
    )
    mu_loss: float = setting(
        0.0,
        "μ-loss (Stollenwerk et al. 2026, arXiv 2601.02031), the regularizer form of output "
        "embedding centering: coefficient λ of λ·‖μ‖² added to the objective, μ the mean "
        "output embedding; 0 = off",
        check=NON_NEGATIVE,
        since="0.5",
    )
    skip_spikes: bool = setting(
        False,
        "skip the update of a step whose loss or gradient norm is a spike (mean + 6σ of the "
        "previous 128 steps, from 32 on, fixed: the diagnostics' default rule, whatever "
        "diagnostics.spike_* say; OLMo-core's SkipStepAdamW)",
        since="0.5",
    )
    momentum: float = setting(
        0.95, "Muon momentum μ (optim=muon only)", check=within(0, 1), since="0.3"
    )
    nesterov: bool = setting(True, "Muon's Nesterov momentum (optim=muon only)", since="0.3")
    ns_steps: int = setting(
        5,
        "Muon's Newton–Schulz iterations (optim=muon only)",
        check=Check(lambda x: 1 <= x < 100, "must be in [1, 100)"),
        since="0.3",
    )

    def check_together(self) -> None:
        _check(
            self.warmup_steps <= INT64_MAX,
            "optim.warmup_steps",
            "must fit in 64 bits (the store keeps integers as int64)",
            self.warmup_steps,
        )
        _check(
            not (self.warmup_steps and self.warmup_fraction),
            "optim.warmup_fraction",
            "set either optim.warmup_steps or optim.warmup_fraction, not both",
            self.warmup_fraction,
        )
        if self.name != "muon":
            # Muon's knobs would change the cell id of an AdamW run without changing what trains.
            for name in MUON_KNOBS:
                _check(
                    getattr(self, name) == _default(OptimConfig, name),
                    f"optim.{name}",
                    f"is a Muon setting; it needs optim=muon (this cell has optim={self.name})",
                    getattr(self, name),
                )


MUON_KNOBS = ("momentum", "nesterov", "ns_steps")


@dataclass
class TrainConfig:
    steps: int = setting(
        200, "optimizer steps: the budget N every verdict is judged within", check=at_least(0)
    )
    batch_size: int = setting(16, "sequences per step", check=at_least(1))
    eval_batches: int = setting(
        8, "validation batches averaged for val_loss at the end", check=at_least(1)
    )
    device: str = setting(
        "auto",
        "auto (cuda when available, else cpu) | cpu | cuda | cuda:N",
        check=Check(
            lambda x: x in ("auto", "cpu") or x.startswith("cuda"),
            "must be auto, cpu, cuda or cuda:N",
        ),
    )
    dtype: str = setting(
        "float32", "float32 | bfloat16 (autocast; for CUDA)", check=one_of("float32", "bfloat16")
    )
    compile: bool = setting(False, "torch.compile the model")
    threads: int = setting(
        0, "torch intra-op threads per cell; 0 = torch's default", check=at_least(0), identity=False
    )
    log_every: int = setting(
        50, "steps between training log lines", check=at_least(1), identity=False
    )
    flush_every: int = setting(
        50,
        "steps between rewrites of the partial curve (kept if a run is killed)",
        check=at_least(1),
        identity=False,
    )
    timing_skip_steps: int = setting(
        10, "first steps left out of the median tokens/s (warm-up)", check=at_least(0)
    )
    cells_per_gpu: int = setting(
        1,
        "cells trained at once on each GPU by a local launcher's pinned workers "
        "(hydra/launcher=gpus, joblib, submitit_local; suite/launch/devices.py)",
        check=at_least(1),
        identity=False,
    )
    # A packed member is not bit-for-bit its unpacked cell: batched kernels round differently,
    # and over a full budget the runs drift apart (final loss by ~2% at 400 steps). So packing
    # is part of the identity: a packed cell has its own id ("-packed"), never an unpacked one's.
    pack_lr: bool = setting(
        False,
        "train a sweep's learning rates together as one packed run (torch.func; "
        "suite/run/packed.py); packed cells are cells of their own (id tag 'packed', arm "
        "'· packed')",
        since="0.4",
    )

    def check_together(self) -> None:
        _check(
            not (self.compile and self.pack_lr),
            "train.pack_lr",
            "packed runs are not compiled; set train.compile=false or train.pack_lr=false",
            self.pack_lr,
        )


@dataclass
class VerdictConfig:
    """The verdict's knobs (suite/verdict.py). Only ``blowup_factor`` acts during training (the
    divergence stop); the others label the stored curve at collect time, so they are not part of
    the cell's identity: changing one re-judges instead of re-training."""

    blowup_factor: float = setting(
        2.0,
        "diverged: loss > blowup_factor × initial loss (or a non-finite loss/gradient)",
        check=Check(lambda x: _finite(x) and x > 1, "must be a number > 1"),
    )
    stall_margin: float = setting(
        0.1,
        "stalled: final loss > unigram entropy − stall_margin (nats)",
        check=Check(
            lambda x: _finite(x) and x >= 0, "must be a number ≥ 0 (nats below the unigram entropy)"
        ),
        identity=False,
    )
    final_window: int = setting(
        10,
        "steps averaged into the final loss, and into the smoothed "
        "loss whose first step below the threshold is the escape step",
        check=at_least(1),
        identity=False,
    )
    borderline_margin: float = setting(
        0.05,
        "borderline: final loss within this many nats of the threshold ...",
        check=Check(lambda x: _finite(x) and x >= 0, "must be a number ≥ 0 (nats)"),
        identity=False,
    )
    late_escape_fraction: float = setting(
        0.25,
        "... or escaped in this last fraction of the budget",
        check=within(0, 1),
        identity=False,
    )


# The verdict knobs that only label a stored curve (verdict_rule lists them).
LABEL_KNOBS = tuple(
    spec.name for spec in dataclasses.fields(VerdictConfig) if not spec.metadata["identity"]
)


@dataclass
class DiagnosticsConfig:
    """What suite/run/diagnostics.py measures, on a fixed probe batch beside training; none of it
    changes the training result (tested), so none of it is part of the cell's identity."""

    enabled: bool = setting(True, "measure the diagnostics")
    every: int = setting(
        20,
        "steps between samples (model update, attention logits, log Z, update ratio)",
        check=at_least(1),
    )
    early_steps: int = setting(
        10,
        "... and every step before this one (the early model update, DeepNet)",
        check=at_least(0),
    )
    probe_batch: int = setting(4, "validation sequences in the probe batch", check=at_least(1))
    spike_window: int = setting(
        128,
        "a loss/grad spike: a value > mean + spike_sigmas·σ of the last spike_window steps",
        check=at_least(2),
    )
    spike_sigmas: float = setting(6.0, "see spike_window", check=POSITIVE)
    spike_min_history: int = setting(32, "steps seen before spikes are called", check=at_least(2))

    def check_together(self) -> None:
        _check(
            self.spike_min_history <= self.spike_window,
            "diagnostics.spike_min_history",
            f"must be in [2, diagnostics.spike_window={self.spike_window}]",
            self.spike_min_history,
        )


# Experiment trackers (suite/run/trackers.py): the package each needs, and the pip extra that
# installs it.
TRACKERS = {"none": ("", ""), "tensorboard": ("tensorboard", "tensorboard"),
            "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}  # fmt: skip


@dataclass
class TrackerConfig:
    """Opt-in logging of each cell's curve and record to an experiment tracker, one tracker run
    per cell (suite/run/trackers.py); it never changes a result, so it is not part of a cell's
    identity."""

    kind: str = setting(
        "none",
        "none | tensorboard | mlflow (SQLite backend) | wandb (offline): every curve column "
        "(per-layer lists as one series per block) and the record; chosen with tracker=KIND",
        check=one_of(*TRACKERS),
    )
    dir: str = setting(
        "",
        "where the tracker writes (~ is expanded); empty: <store>/trackers/<kind>",
        check=Check(
            lambda x: isinstance(x, str) and not set(x) & set("\0?#"),
            "must be a folder path without ? or # (MLflow's database URI would cut it there)",
        ),
    )


RECIPES = ("controlled", "authors")

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "verdict": VerdictConfig,
    "diagnostics": DiagnosticsConfig,
    "tracker": TrackerConfig,
}


@dataclass
class SuiteConfig:
    """The root of the composed config: what ``python -m suite --cfg job`` prints."""

    seed: int = setting(0, "seeds the init and the batch order", check=SEED)
    store: str = setting(
        "results", "the results store: one folder per cell under <store>/cells (~ is expanded)"
    )
    sweep_name: str = setting("custom", "set by each sweep preset; recorded with every run")
    resume: bool = setting(True, "skip cells whose finished record is already in the store")
    recipe: str = setting(
        "controlled",
        "controlled: only the wiring differs between variants | authors: each variant also "
        "gets the parts of its paper's training setup that are not wiring (variants/*.py "
        "declare them with their source; `python -m variants --recipes` lists them)",
        check=one_of(*RECIPES),
    )
    progress_every: float = setting(
        60.0,
        "seconds between the progress lines a sweep prints while a quiet launcher (slurm, "
        "ray, submitit_local) runs its cells",
        check=Check(lambda x: _finite(x) and x > 0, "must be > 0"),
    )
    variant: Any = setting(
        None,
        "chosen with +variant=NAME (the registry's group); its own "
        "parameters as variant.<param>=...",
    )
    model: ModelConfig = setting(factory=ModelConfig)
    data: DataConfig = setting(factory=DataConfig)
    optim: OptimConfig = setting(factory=OptimConfig)
    train: TrainConfig = setting(factory=TrainConfig)
    verdict: VerdictConfig = setting(factory=VerdictConfig)
    diagnostics: DiagnosticsConfig = setting(factory=DiagnosticsConfig)
    tracker: TrackerConfig = setting(factory=TrackerConfig)


# --- the cell --------------------------------------------------------------------------------


@dataclass
class CellConfig:
    """Everything that determines one run's result (plus where to store it)."""

    variant: str = setting(doc="registry name")
    variant_params: dict[str, Any] = setting(doc="the variant's own parameters")
    model: ModelConfig = setting(doc="model shape")
    data: DataConfig = setting(doc="training data")
    optim: OptimConfig = setting(doc="optimizer")
    train: TrainConfig = setting(doc="training loop")
    verdict: VerdictConfig = setting(doc="verdict knobs")
    diagnostics: DiagnosticsConfig = setting(
        doc="diagnostics (measured beside training, never changing it)",
        factory=DiagnosticsConfig,
        identity=False,
    )
    tracker: TrackerConfig = setting(
        doc="experiment tracker (logging beside training, never changing it)",
        factory=TrackerConfig,
        identity=False,
        since="0.5",
    )
    seed: int = setting(0, "seeds the init and the batch order")
    recipe: str = setting(
        "controlled",
        "controlled | authors (the variant's published recipe beyond its wiring)",
        since="0.4",
    )
    sweep: str = setting("custom", "the sweep preset's name", identity=False)
    store: str = setting("results", "the results store", identity=False)
    variant_revision: int = field(
        init=False, metadata={"doc": "the variant's revision (Variant.revision)", "identity": True}
    )

    def __post_init__(self) -> None:
        # Always the code's own: a cell is trained by the variant as it is now. (Imported here:
        # the schema itself needs neither the registry nor torch, which analysis code avoids.)
        import variants

        self.variant_revision = variants.get(self.variant).revision

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SECTIONS}

    def result_defining(self) -> dict[str, Any]:
        """The part of the config that can change the result (not where it is stored)."""
        return result_defining(asdict(self))

    def config_hash(self) -> str:
        return identity_hash(asdict(self))

    def id_tags(self) -> list[str]:
        """Words in the id for how the cell was trained, where that is not the default: the
        backbone, the recipe, packing (``preln-L6-lr0.01-s0-llama-authors-…``)."""
        tags = [] if self.model.backbone == "gpt2" else [self.model.backbone]
        tags += [] if self.recipe == "controlled" else [self.recipe]
        return tags + (["packed"] if self.train.pack_lr else [])

    def cell_id(self) -> str:
        tags = "".join(f"-{tag}" for tag in self.id_tags())
        return (
            f"{self.variant}-L{self.model.depth}-lr{self.optim.lr:g}-s{self.seed}{tags}-"
            f"{self.config_hash()[:10]}"
        )

    def warmup_steps(self) -> int:
        if self.optim.warmup_steps:
            return self.optim.warmup_steps
        return round(self.optim.warmup_fraction * self.train.steps)


def _identity_fields(schema: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema) if f.metadata.get("identity", True)}


def result_defining(config: dict[str, Any]) -> dict[str, Any]:
    """Of a cell's config (as stored in its record), the part that can change what is trained:
    the fields marked as identity. A key the schema no longer has (a stored record's
    ``train.packed_lrs``, written by suite 0.2) is left out too."""
    data = {}
    for name in _identity_fields(CellConfig):
        if name not in config:
            continue
        value = copy.deepcopy(config[name])
        if name in SECTIONS and isinstance(value, dict):
            kept = _identity_fields(SECTIONS[name])
            value = {
                key: item
                for key, item in value.items()
                if key in kept and not _added_later_at_default(kept[key], item)
            }
        elif _added_later_at_default(_identity_fields(CellConfig)[name], value):
            continue
        data[name] = value
    if data.get("variant_revision") == 1:
        del data["variant_revision"]  # a first revision adds nothing: ids from before stay valid
    return data


def _added_later_at_default(spec: dataclasses.Field, value: Any) -> bool:
    if spec.metadata.get("since") is None:
        return False
    default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
    return value == default


def identity_hash(config: dict[str, Any]) -> str:
    """sha256 of :func:`result_defining`: equal for two configs exactly when they train alike."""
    canonical = json.dumps(result_defining(config), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- checks ----------------------------------------------------------------------------------


def _check(condition: bool, key: str, message: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message} (got {value!r})")


def _check_root_setting(name: str, value: Any) -> None:
    """A root setting's own range check (the root is not a section the cell keeps)."""
    spec = next(spec for spec in dataclasses.fields(SuiteConfig) if spec.name == name)
    check: Check = spec.metadata["check"]
    value = spec.default if value is None else value
    _check(check.holds(value), name, check.requirement, value)


def check_section(name: str, section: Any) -> None:
    """Every field's own range check, then the checks across the section's fields."""
    for spec in dataclasses.fields(section):
        check: Check | None = spec.metadata.get("check")
        value = getattr(section, spec.name)
        if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            _check(
                False,
                f"{name}.{spec.name}",
                "must fit in 64 bits (the store keeps integers as int64)",
                value,
            )
        if check is not None:
            try:
                holds = check.holds(value)
            except TypeError:
                holds = False
            _check(holds, f"{name}.{spec.name}", check.requirement, value)
    if hasattr(section, "check_together"):
        section.check_together()


def _refuse_unknown_keys(where: str, schema: type, node: Any, also: tuple[str, ...] = ()) -> None:
    """A key the schema does not have: Hydra refuses it unless it is force-added (``+key=``),
    and a typed section would then carry it silently. Named here, with the closest setting."""
    if node is None:
        return
    known = [spec.name for spec in dataclasses.fields(schema)] + list(also)
    for key in node:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else ""
            raise ConfigError(
                f"{where}{key}: not a setting of {where.rstrip('.') or 'the suite'}"
                f" (see python -m suite.config){hint}"
            )


def section_from_mapping(name: str, schema: type, values: Any) -> Any:
    """A section from plain values (a dict, or a Hydra node's items): unknown keys refused with
    the closest setting, each value converted to its field's type, then range-checked."""
    values = dict(values.items()) if values is not None else {}
    _refuse_unknown_keys(f"{name}.", schema, values)
    types = {spec.name: spec.type for spec in dataclasses.fields(schema)}
    typed = {}
    for key, value in values.items():
        kind = str(types[key])
        try:
            typed[key] = _converted(value, kind)
        except (TypeError, ValueError):
            words = _KIND_WORDS[kind]
            raise ConfigError(f"{name}.{key}: must be {words} (got {value!r})") from None
    section = schema(**typed)
    check_section(name, section)
    return section


_KIND_WORDS = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "text"}


def _converted(value: Any, kind: str) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise ValueError(value)
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    return str(value)


def verdict_from_overrides(overrides: list[str]) -> VerdictConfig:
    """The verdict knobs from ``verdict.KEY=VALUE`` arguments (collect and report take them as
    a sweep does); raises ConfigError naming the key."""
    pairs = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.startswith("verdict.") or key.count(".") != 1:
            raise ConfigError(f"{key or override}: expected verdict.KEY=VALUE (got {override!r})")
        name = key.removeprefix("verdict.")
        spec = next((f for f in dataclasses.fields(VerdictConfig) if f.name == name), None)
        if spec is not None and spec.metadata["identity"]:
            raise ConfigError(
                f"{key}: stops training, so it cannot change by re-judging "
                "stored curves; re-run the sweep with it instead"
            )
        pairs[name] = value
    return verdict_config(pairs)


def verdict_config(values: Any) -> VerdictConfig:
    """Typed, checked verdict knobs from a mapping (e.g. a composed sweep's ``verdict``)."""
    return section_from_mapping("verdict", VerdictConfig, values)


# The composed root's keys that the cell keeps under another name (the rest keep their own).
_CELL_FIELD = {"sweep_name": "sweep"}


def in_cell_identity(key: str) -> bool:
    """Whether a setting (``model.depth``, ``store``, ...) is part of the cell's identity: its
    own flag and, for a setting inside a section, the section's flag in :class:`CellConfig`."""
    cell = {spec.name: spec for spec in dataclasses.fields(CellConfig)}
    section, _, name = key.rpartition(".")
    if section:
        own = {spec.name: spec for spec in dataclasses.fields(SECTIONS[section])}[name]
        return cell[section].metadata.get("identity", True) and own.metadata.get("identity", True)
    spec = cell.get(_CELL_FIELD.get(name, name))
    return spec is not None and spec.metadata.get("identity", True)  # resume: not in the cell


def describe_settings() -> str:
    """Every setting as ``key  default  meaning`` lines: the reference `python -m suite.config`
    prints (the README points there instead of keeping a copy)."""
    lines = [
        "Defaults of the schema; a sweep preset sets some of them (e.g. sweep=quick: 400 steps,",
        "untied head, one thread per cell): python -m suite --cfg job +variant=NAME sweep=PRESET",
        "shows what a run uses. [not in the cell id]: changing it re-uses stored cells.",
        "",
    ]

    def walk(prefix: str, schema: type) -> None:
        for spec in dataclasses.fields(schema):
            key = f"{prefix}{spec.name}"
            if spec.name in SECTIONS and prefix == "":
                walk(f"{key}.", SECTIONS[spec.name])
                continue
            if spec.default is not dataclasses.MISSING:
                default = repr(spec.default)
            elif spec.default_factory is not dataclasses.MISSING and spec.name not in SECTIONS:
                default = repr(spec.default_factory())
            else:
                default = ""
            tag = "" if in_cell_identity(key) else " [not in the cell id]"
            lines.append(f"{key:32} {default:12} {spec.metadata.get('doc', '')}{tag}")

    walk("", SuiteConfig)
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_settings())
