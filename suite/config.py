"""The typed schema of one sweep cell, and the checks that run before any training.

Hydra composes a loose DictConfig; :func:`cell_from_config` turns it into a :class:`CellConfig`
(typed, range-checked, variant resolved through the registry) or raises :class:`ConfigError`
whose message starts with the offending key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import variants


class ConfigError(ValueError):
    """An impossible or malformed configuration, detected before training."""


@dataclass
class ModelConfig:
    width: int = 64
    heads: int = 4
    depth: int = 6
    mlp_ratio: float = 4.0
    seq_len: int = 64
    bias: bool = False  # linear-layer biases; off as in PaLM, which found that more stable
    tie_embeddings: bool = True
    qk_norm: bool = False  # LayerNorm on queries and keys, any variant


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | text | tokens
    path: str | None = None  # text file (source=text) or uint16 .bin (source=tokens)
    max_bytes: int = 4_000_000  # stdlib corpus size cap
    val_fraction: float = 0.1
    vocab_size: int | None = None  # tokens only; default: largest token id + 1


@dataclass
class OptimConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # alternative to warmup_steps: a fraction of train.steps
    schedule: str = "constant"  # constant | cosine (after warmup)
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping
    z_loss: float = 0.0  # coefficient of the auxiliary log²Z loss (PaLM uses 1e-4); 0 = off


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    eval_batches: int = 8
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    compile: bool = False
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    log_every: int = 25
    flush_every: int = 50  # steps between rewrites of the partial curve in the store
    timing_skip_steps: int = 10  # steps excluded from the throughput median (warm-up, allocator)
    pack_lr: bool = False  # train a sweep's learning rates as one packed run (suite/packed.py)
    packed_lrs: list[float] = field(default_factory=list)  # set by the CLI for each packed run


@dataclass
class VerdictConfig:
    """The verdict's knobs (suite/verdict.py). Only ``blowup_factor`` acts during training (the
    divergence stop); the others are labels computed from the stored curve at collect time."""

    blowup_factor: float = 2.0  # diverged if loss > blowup_factor × initial loss
    stall_margin: float = 0.1  # stalled if final loss > unigram entropy − stall_margin (nats)
    final_window: int = 10  # steps averaged for the final loss (and the smoothed loss of escape)
    borderline_margin: float = 0.05  # borderline: final loss this close (nats) to the threshold
    late_escape_fraction: float = 0.25  # ... or escaped in this last fraction of the budget


# Verdict knobs that only label a stored curve: left out of the cell's identity, so changing one
# re-collects instead of re-training.
LABEL_KNOBS = (
    "stall_margin",
    "final_window",
    "borderline_margin",
    "late_escape_fraction",
)


@dataclass
class DiagnosticsConfig:
    """What suite/diagnostics.py measures; none of it changes the training result."""

    enabled: bool = True
    every: int = 20  # steps between sampled diagnostics (after the first early_steps)
    early_steps: int = 10  # sample every step this long: the early model update (DeepNet)
    probe_batch: int = 4  # sequences in the fixed probe batch (from the validation split)
    spike_window: int = 128  # steps in the trailing window of the spike rule
    spike_sigmas: float = 6.0  # a spike is a value above mean + spike_sigmas·σ of the window
    spike_min_history: int = 32  # no spike is called before the window holds this many steps


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "verdict": VerdictConfig,
    "diagnostics": DiagnosticsConfig,
}


@dataclass
class CellConfig:
    """Everything that determines one run's result (plus where to store it)."""

    variant: str
    variant_params: dict[str, Any]
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    verdict: VerdictConfig
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    seed: int = 0
    sweep: str = "custom"
    store: str = "results"

    def result_defining(self) -> dict[str, Any]:
        """The part of the config that can change the result (not where it is stored)."""
        return result_defining(asdict(self))

    def config_hash(self) -> str:
        return identity_hash(asdict(self))

    def cell_id(self) -> str:
        return (
            f"{self.variant}-L{self.model.depth}-lr{self.optim.lr:g}-s{self.seed}-"
            f"{self.config_hash()[:10]}"
        )

    def warmup_steps(self) -> int:
        if self.optim.warmup_steps:
            return self.optim.warmup_steps
        return round(self.optim.warmup_fraction * self.train.steps)


def result_defining(config: dict[str, Any]) -> dict[str, Any]:
    """Of a cell's config (as stored in its record), the part that can change what is trained:
    not where it is stored, how often it logs, the diagnostics or the verdict's label knobs."""
    data = copy.deepcopy(config)
    data.pop("store", None)
    data.pop("sweep", None)
    data.pop("diagnostics", None)  # measured beside training, never changing it (tested)
    for key in ("threads", "log_every", "flush_every", "packed_lrs"):
        data.get("train", {}).pop(key, None)
    data.get("train", {}).pop("pack_lr", None)  # packed members equal their unpacked cells
    for key in LABEL_KNOBS:
        data.get("verdict", {}).pop(key, None)
    return data


def identity_hash(config: dict[str, Any]) -> str:
    """sha256 of :func:`result_defining`: equal for two configs exactly when they train alike."""
    canonical = json.dumps(result_defining(config), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _typed_section(name: str, schema: type, node: Any) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or getattr(error, "key", None) or "?"
        message = getattr(error, "msg", None) or str(error).splitlines()[0]
        raise ConfigError(f"{name}.{key}: {message}") from None


def _resolve_variant(node: Any) -> tuple[str, dict[str, Any]]:
    if node is None or "name" not in node:
        raise ConfigError(
            "variant: none selected; add +variant=<name> "
            f"(registered: {', '.join(variants.names())})"
        )
    name = str(node["name"])
    try:
        variant_cls = variants.get(name)
    except variants.UnknownVariantError as error:
        raise ConfigError(f"variant: {error}") from None
    params = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}
    typed = _typed_section("variant", variant_cls, params)
    return name, typed.params()


def _check(condition: bool, key: str, message: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message} (got {value!r})")


def _finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def validate_verdict(v: VerdictConfig) -> None:
    """Range checks of the verdict's knobs (also for the ones given to collect and report)."""
    _check(
        _finite_positive(v.blowup_factor) and v.blowup_factor > 1,
        "verdict.blowup_factor",
        "must be a number > 1",
        v.blowup_factor,
    )
    _check(
        math.isfinite(v.stall_margin) and v.stall_margin >= 0,
        "verdict.stall_margin",
        "must be a number ≥ 0 (nats below the unigram entropy)",
        v.stall_margin,
    )
    _check(v.final_window >= 1, "verdict.final_window", "must be at least 1", v.final_window)
    _check(
        math.isfinite(v.borderline_margin) and v.borderline_margin >= 0,
        "verdict.borderline_margin",
        "must be a number ≥ 0 (nats)",
        v.borderline_margin,
    )
    _check(
        0 <= v.late_escape_fraction < 1,
        "verdict.late_escape_fraction",
        "must be in [0, 1)",
        v.late_escape_fraction,
    )


def verdict_from_overrides(overrides: list[str]) -> VerdictConfig:
    """The verdict knobs from ``verdict.KEY=VALUE`` arguments (collect and report take them as
    a sweep does); raises ConfigError naming the key."""
    pairs = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.startswith("verdict.") or key.count(".") != 1:
            raise ConfigError(f"{key or override}: expected verdict.KEY=VALUE (got {override!r})")
        if key == "verdict.blowup_factor":
            raise ConfigError(
                "verdict.blowup_factor: stops training, so it cannot change by re-judging "
                "stored curves; re-run the sweep with it instead"
            )
        pairs[key.removeprefix("verdict.")] = value
    try:
        node = OmegaConf.from_dotlist([f"{key}={value}" for key, value in pairs.items()])
    except OmegaConfBaseException as error:
        raise ConfigError(f"verdict: {error}") from None
    return verdict_config(node)


def verdict_config(node: Any) -> VerdictConfig:
    """Typed, checked verdict knobs from a config node (e.g. a composed sweep's ``verdict``)."""
    verdict = _typed_section("verdict", VerdictConfig, node)
    validate_verdict(verdict)
    return verdict


def validate(cell: CellConfig) -> None:
    """Range checks that no schema can express; raises ConfigError naming the key."""
    m, d, o, t, v = cell.model, cell.data, cell.optim, cell.train, cell.verdict
    g = cell.diagnostics
    _check(m.depth >= 1, "model.depth", "must be at least 1", m.depth)
    _check(m.width >= 1, "model.width", "must be at least 1", m.width)
    _check(m.heads >= 1, "model.heads", "must be at least 1", m.heads)
    _check(
        m.width % m.heads == 0,
        "model.heads",
        f"must divide model.width={m.width}",
        m.heads,
    )
    _check(
        _finite_positive(m.mlp_ratio), "model.mlp_ratio", "must be a positive number", m.mlp_ratio
    )
    _check(m.seq_len >= 1, "model.seq_len", "must be at least 1", m.seq_len)
    _check(
        d.source in ("stdlib", "text", "tokens"),
        "data.source",
        "must be stdlib, text or tokens",
        d.source,
    )
    if d.source in ("text", "tokens"):
        _check(bool(d.path), "data.path", f"is required for data.source={d.source}", d.path)
        _check(Path(d.path).is_file(), "data.path", "no such file", d.path)
    _check(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)", d.val_fraction)
    _check(d.max_bytes > 0, "data.max_bytes", "must be positive", d.max_bytes)
    if d.vocab_size is not None:
        _check(d.vocab_size >= 2, "data.vocab_size", "must be at least 2", d.vocab_size)
    _check(_finite_positive(o.lr), "optim.lr", "must be a positive number", o.lr)
    _check(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)", o.beta1)
    _check(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)", o.beta2)
    _check(_finite_positive(o.eps), "optim.eps", "must be a positive number", o.eps)
    _check(
        math.isfinite(o.weight_decay) and o.weight_decay >= 0,
        "optim.weight_decay",
        "must be ≥ 0",
        o.weight_decay,
    )
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be ≥ 0", o.warmup_steps)
    _check(
        0 <= o.warmup_fraction < 1, "optim.warmup_fraction", "must be in [0, 1)", o.warmup_fraction
    )
    _check(
        not (o.warmup_steps and o.warmup_fraction),
        "optim.warmup_fraction",
        "set either optim.warmup_steps or optim.warmup_fraction, not both",
        o.warmup_fraction,
    )
    _check(
        o.schedule in ("constant", "cosine"),
        "optim.schedule",
        "must be constant or cosine",
        o.schedule,
    )
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", o.min_lr_ratio)
    _check(
        math.isfinite(o.grad_clip) and o.grad_clip >= 0,
        "optim.grad_clip",
        "must be ≥ 0",
        o.grad_clip,
    )
    _check(math.isfinite(o.z_loss) and o.z_loss >= 0, "optim.z_loss", "must be ≥ 0", o.z_loss)
    _check(t.steps >= 0, "train.steps", "must be ≥ 0", t.steps)
    _check(t.batch_size >= 1, "train.batch_size", "must be at least 1", t.batch_size)
    _check(t.eval_batches >= 1, "train.eval_batches", "must be at least 1", t.eval_batches)
    _check(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        "train.device",
        "must be auto, cpu, cuda or cuda:N",
        t.device,
    )
    _check(
        t.dtype in ("float32", "bfloat16"), "train.dtype", "must be float32 or bfloat16", t.dtype
    )
    _check(t.threads >= 0, "train.threads", "must be ≥ 0", t.threads)
    _check(t.log_every >= 1, "train.log_every", "must be at least 1", t.log_every)
    _check(t.flush_every >= 1, "train.flush_every", "must be at least 1", t.flush_every)
    _check(t.timing_skip_steps >= 0, "train.timing_skip_steps", "must be ≥ 0", t.timing_skip_steps)
    for lr in t.packed_lrs:
        _check(_finite_positive(lr), "train.packed_lrs", "must be positive numbers", t.packed_lrs)
    _check(
        not (t.compile and (t.pack_lr or t.packed_lrs)),
        "train.pack_lr",
        "packed runs are not compiled; set train.compile=false or train.pack_lr=false",
        t.pack_lr,
    )
    validate_verdict(v)
    _check(g.every >= 1, "diagnostics.every", "must be at least 1", g.every)
    _check(g.early_steps >= 0, "diagnostics.early_steps", "must be ≥ 0", g.early_steps)
    _check(g.probe_batch >= 1, "diagnostics.probe_batch", "must be at least 1", g.probe_batch)
    _check(g.spike_window >= 2, "diagnostics.spike_window", "must be at least 2", g.spike_window)
    _check(
        _finite_positive(g.spike_sigmas),
        "diagnostics.spike_sigmas",
        "must be a positive number",
        g.spike_sigmas,
    )
    _check(
        2 <= g.spike_min_history <= g.spike_window,
        "diagnostics.spike_min_history",
        f"must be in [2, diagnostics.spike_window={g.spike_window}]",
        g.spike_min_history,
    )


def cell_from_config(cfg: DictConfig) -> CellConfig:
    """Typed, validated cell from a composed Hydra config; raises ConfigError naming the key."""
    variant_name, variant_params = _resolve_variant(cfg.get("variant"))
    sections = {
        name: _typed_section(name, schema, cfg.get(name)) for name, schema in SECTIONS.items()
    }
    seed = cfg.get("seed", 0)
    _check(isinstance(seed, int) and not isinstance(seed, bool), "seed", "must be an integer", seed)
    cell = CellConfig(
        variant=variant_name,
        variant_params=variant_params,
        seed=seed,
        sweep=str(cfg.get("sweep_name", "custom")),
        store=str(cfg.get("store", "results")),
        **sections,
    )
    validate(cell)
    return cell
