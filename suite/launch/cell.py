"""A sweep cell from a composed Hydra config: the schema (suite/config.py) registered in Hydra's
ConfigStore, every section typed by OmegaConf against it, the variant resolved through the
registry, and the checks across settings that need the variant or torch. Raises
:class:`ConfigError` whose message starts with the offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import variants
from suite.config import (
    DECAY_GROUPS,
    SECTIONS,
    SEED,
    CellConfig,
    ConfigError,
    ModelConfig,
    OptimConfig,
    SuiteConfig,
    _check,
    _check_root_setting,
    _default,
    _refuse_unknown_keys,
    check_section,
    store_path,
)
from suite.run.trackers import check_installed
from suite.store import in_reference

SCHEMA_NAME = "suite_schema"  # the ConfigStore entry conf/config.yaml starts its defaults from


def config_dir() -> Path:
    """The Hydra configs: ``conf/`` of a source checkout, else the copy a wheel carries as
    ``suite/conf`` (pyproject maps one onto the other)."""
    installed = Path(__file__).resolve().parent.parent / "conf"
    return installed if installed.is_dir() else installed.parent.parent / "conf"


def register_path_resolver() -> None:
    """``${suite_path:${store}}`` in conf/config.yaml: Hydra's sweep folder under the same
    store as the cells, ``~`` expanded."""
    if not OmegaConf.has_resolver("suite_path"):
        OmegaConf.register_new_resolver("suite_path", store_path)


def register_schema() -> None:
    """Put the schema in Hydra's ConfigStore, where conf/config.yaml's defaults list starts."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=SuiteConfig)
    register_path_resolver()


def validate(cell: CellConfig) -> None:
    """Range checks no type can express; raises ConfigError naming the key."""
    for name, section in cell.sections().items():
        check_section(name, section)
    check_installed(cell.tracker.kind)
    variant = variants.get(cell.variant)(**cell.variant_params)
    _check(
        not (cell.train.pack_lr and variant.acts_after_optimizer_steps()),
        "train.pack_lr",
        f"variant {cell.variant!r} acts on its weights after every optimizer step, which a "
        "packed run cannot do for each member; set train.pack_lr=false",
        cell.train.pack_lr,
    )
    _check(
        not (cell.train.pack_lr and cell.optim.center_output_embedding),
        "optim.center_output_embedding",
        "a packed run has no step after its members' optimizer steps to center each member's "
        "output embedding; set train.pack_lr=false",
        cell.optim.center_output_embedding,
    )
    _check(
        not (cell.train.pack_lr and cell.optim.mu_loss),
        "optim.mu_loss",
        "a packed run's objective has no μ-loss term for its members; set train.pack_lr=false",
        cell.optim.mu_loss,
    )
    _check(
        not (cell.train.pack_lr and cell.optim.skip_spikes),
        "optim.skip_spikes",
        "a packed run applies one update to all its members at once and cannot skip one "
        "member's; set train.pack_lr=false",
        cell.optim.skip_spikes,
    )
    _check(
        not (cell.train.pack_lr and cell.optim.name == "muon"),
        "train.pack_lr",
        "packed runs train with their own AdamW (suite/run/packed.py), not Muon; set "
        "train.pack_lr=false or optim=adamw",
        cell.train.pack_lr,
    )
    _check(
        cell.optim.name != "muon" or hasattr(torch.optim, "Muon"),
        "optim.name",
        f"muon needs torch.optim.Muon (torch ≥ 2.9); this torch is {torch.__version__}",
        cell.optim.name,
    )
    _check(
        not (cell.train.pack_lr and variant.sublayer_options().attention.softmax_scale),
        "train.pack_lr",
        f"variant {cell.variant!r} sets its own attention softmax scale, which the packed "
        "runs' batched attention does not take; set train.pack_lr=false",
        cell.train.pack_lr,
    )
    conflict = variant.depth_parametrization_conflict
    _check(
        cell.model.parametrization == "sp" or not conflict,
        "model.parametrization",
        f"variant {cell.variant!r} cannot take a depth parametrization: {conflict}. Use "
        "model.parametrization=sp with it",
        cell.model.parametrization,
    )
    _check(SEED.holds(cell.seed), "seed", SEED.requirement, cell.seed)
    _check(
        not in_reference(cell.store),
        "store",
        "is the suite's shipped reference results, which compare, the leaderboard and the "
        "report read: train into a store of your own (store=results is the default)",
        cell.store,
    )
    _check(
        cell.warmup_steps() <= cell.train.steps,
        "optim.warmup_steps",
        f"must be at most train.steps={cell.train.steps}: a longer warmup never reaches optim.lr",
        cell.optim.warmup_steps,
    )


def config_error(error: Exception) -> ConfigError:
    """A ConfigError starting with the key, from an OmegaConf/Hydra error (a wrong type at
    compose time, an unknown key) found anywhere in ``error``'s chain."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return ConfigError(str(error).strip())
    key = getattr(cause, "full_key", None) or getattr(cause, "key", None) or "config"
    message = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
    return ConfigError(f"{key}: {message}")


def _typed_section(name: str, schema: type, node: Any) -> Any:
    _refuse_unknown_keys(f"{name}.", schema, node)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or getattr(error, "key", None) or "?"
        message = (getattr(error, "msg", None) or str(error)).strip().splitlines()[0]
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


def cell_from_config(cfg: DictConfig) -> CellConfig:
    """Typed, validated cell from a composed Hydra config; raises ConfigError naming the key."""
    _refuse_unknown_keys("", SuiteConfig, cfg, also=("hydra",))
    _check_root_setting("progress_every", cfg.get("progress_every"))
    variant_name, variant_params = _resolve_variant(cfg.get("variant"))
    sections = {
        name: _typed_section(name, schema, cfg.get(name)) for name, schema in SECTIONS.items()
    }
    if sections["model"].parametrization == "sp":
        # N₀ plays no part under sp: one id for one model, so that sp can be swept beside a
        # parametrization at another base depth (model.parametrization=sp,completep
        # model.base_depth=8).
        sections["model"].base_depth = _default(ModelConfig, "base_depth")
    if variants.get(variant_name).trains_without_weight_decay:
        decay = sections["optim"].weight_decay
        _check(
            decay in (0.0, _default(OptimConfig, "weight_decay")),
            "optim.weight_decay",
            f"variant {variant_name!r} trains without weight decay, as its paper does; leave "
            "optim.weight_decay at its default (the cell is built with 0) or set it to 0",
            decay,
        )
        # As its paper trains it; the record's optim.weight_decay then says what was trained.
        sections["optim"].weight_decay = 0.0
    optim = sections["optim"]
    if isinstance(optim.no_decay, list):  # a set of groups: one id for one set, in any order
        optim.no_decay = (
            sorted(set(optim.no_decay), key=DECAY_GROUPS.index)
            if all(group in DECAY_GROUPS for group in optim.no_decay)
            else optim.no_decay
        )
    if optim.weight_decay == 0:  # no decay at all: how it would be applied changes nothing
        optim.weight_decay_mode = _default(OptimConfig, "weight_decay_mode")
        optim.no_decay = OptimConfig().no_decay
    _check_root_setting("recipe", cfg.get("recipe"))
    recipe = str(cfg.get("recipe") or "controlled")
    variant = variants.get(variant_name)(**variant_params)
    if not variant.authors_recipe().changes_training:
        # Its paper adds nothing beyond the wiring: one cell for both arms, never trained twice.
        recipe = "controlled"
    cell = CellConfig(
        variant=variant_name,
        variant_params=variant_params,
        recipe=recipe,
        seed=cfg.get("seed", 0),
        sweep=str(cfg.get("sweep_name", "custom")),
        store=store_path(cfg.get("store", "results")),
        **sections,
    )
    validate(cell)
    return cell
