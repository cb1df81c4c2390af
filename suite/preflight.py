"""Preflight: expand the sweep exactly as Hydra's basic sweeper will, compose and validate every
cell, and build each distinct model once, so that an impossible value anywhere in the sweep fails
before any training, with a message naming the key.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import variants
from suite.config import (
    CellConfig,
    ConfigError,
    cell_from_config,
    config_dir,
    config_error,
    register_schema,
)
from suite.devices import GPU_LAUNCHER, register_resolver, sweep_gpus
from suite.environment import resolve_device
from suite.model import VariantError
from suite.runner import build_model, corpus_for
from suite.targets import ForbiddenTarget, check_config, check_target

CONFIG_GROUPS = {p.name for p in config_dir().iterdir() if p.is_dir()} | {"variant"}
PREFLIGHT_BUILD_LIMIT = 50e6  # parameters; bigger models are checked when their cell starts


def register_configs() -> None:
    """The schema (suite.config) and every registered variant (built-in or plugin), as the
    config group ``variant``, in Hydra's ConfigStore."""
    register_schema()
    register_resolver()
    store = ConfigStore.instance()
    for name in variants.names():
        store.store(
            group="variant", name=name, node={"name": name, **variants.get(name)().params()}
        )


def _check_variant_names(overrides: list) -> None:
    known = set(variants.names())
    for override in overrides:
        if override.key_or_group != "variant":
            continue
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.value()]
        )
        for name in values:
            if name not in known:
                raise ConfigError(
                    f"variant: unknown variant {name!r}; registered variants: "
                    f"{', '.join(sorted(known))}"
                )


def swept_overrides(args: list[str]) -> list[str]:
    """The command line's overrides that sweep several values (``+variant=a,b``, ``range(..)``);
    empty if the line does not parse (Hydra then says why)."""
    overrides = [arg for arg in args if "=" in arg and not arg.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return []
    return [override.input_line for override in parsed if override.is_sweep_override()]


def root_setting(overrides: list[str], key: str) -> Any:
    """A root setting (``resume``, ``store``, ...) as every job of the sweep composes it: the
    command line's value over a preset's or a config dir's over the default. A swept key has
    no one value: its default is returned."""
    register_configs()
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [
        override.input_line
        for override in parsed
        if not override.is_sweep_override()
        and (_needs_compose(override) or override.key_or_group.lstrip("+~") == key)
    ]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=fixed).get(key)


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The override list of every job the sweep will run, as Hydra's basic sweeper builds them:
    the preset's ``hydra.sweeper.params`` with command-line values taking precedence."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    _check_variant_names(parsed)
    _refuse_foreign_targets(parsed)
    _check_launcher_installed(parsed)
    # Only the choices that can change the preset's grid: the sweep preset and Hydra's own keys.
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and _needs_compose(o)]
    base = compose("config", overrides=fixed, return_hydra_config=True)
    _check_targets_in("", lambda: check_config(base))  # Hydra's own config: callbacks, launcher
    given = {o.key_or_group for o in parsed}
    preset = [f"{k}={v}" for k, v in (base.hydra.sweeper.params or {}).items() if k not in given]
    axes = []
    for override in parser.parse_overrides(preset) + parsed:
        if override.is_hydra_override() and override.key_or_group != "hydra.searchpath":
            continue  # the search path stays: a job's preset may live in a user's config dir
        key = override.get_key_element()
        if override.is_sweep_override():
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([override.input_line])
    jobs = [list(job) for job in itertools.product(*axes)]
    if base.hydra.runtime.choices.get("hydra/launcher") == GPU_LAUNCHER:
        _check_gpu_launcher(base, jobs)
    return jobs


# Launcher configs that need a plugin the suite does not install by default: its pip extra.
_LAUNCHER_EXTRAS = {
    "ray": ("hydra_plugins.hydra_ray_launcher", "ray"),
    "ray_cluster": ("hydra_plugins.hydra_ray_launcher", "ray"),
}


def _check_launcher_installed(overrides: list) -> None:
    for override in overrides:
        if override.key_or_group != "hydra/launcher" or override.is_sweep_override():
            continue
        plugin, extra = _LAUNCHER_EXTRAS.get(str(override.value()), (None, None))
        if plugin is not None and importlib.util.find_spec(plugin) is None:
            raise ConfigError(
                f"hydra/launcher={override.value()}: its Hydra plugin is not installed; "
                f"pip install -e '.[{extra}]' (or pip install 'stability-suite[{extra}]')"
            )


def _check_gpu_launcher(base: DictConfig, jobs: list[list[str]]) -> None:
    """The GPU launcher needs a GPU, and a cell device its pinning can choose."""
    if not sweep_gpus():
        raise ConfigError(
            f"hydra/launcher={GPU_LAUNCHER}: no GPU is visible here (torch.cuda.is_available() "
            "is false, or CUDA_VISIBLE_DEVICES hides every GPU); use hydra/launcher=per_core "
            "(CPU cores) or basic"
        )
    devices = {str(base.train.device)} | {
        arg.split("=", 1)[1]
        for job in jobs
        for arg in job
        if arg.lstrip("+").startswith("train.device=")
    }
    for device in sorted(devices - {"auto", "cuda"}):
        raise ConfigError(
            f"train.device: {device!r} cannot be used with hydra/launcher={GPU_LAUNCHER}, which "
            "pins each worker to one GPU; use train.device=auto or cuda"
        )


def sweep_cells(overrides: list[str]) -> list[tuple[list[str], CellConfig]]:
    """Every job of the sweep as (its overrides, its validated cell), in Hydra's order.

    Composing is slow (~50 ms), so it is done once per combination of config-group choices;
    each cell's plain values are then set on a copy, as Hydra itself applies them after
    composing the defaults list.
    """
    register_configs()
    parser = OverridesParser.create()
    composed: dict[tuple[str, ...], DictConfig] = {}
    cells = []
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        try:
            jobs = expand_sweep(overrides)
        except HydraException as error:
            raise config_error(error) from None
        for job in jobs:
            try:
                parsed = parser.parse_overrides(job)
                groups = tuple(o.input_line for o in parsed if _needs_compose(o))
                if groups not in composed:
                    composed[groups] = compose("config", overrides=list(groups))
                cfg = copy.deepcopy(composed[groups])
                for override in parsed:
                    if not _needs_compose(override):
                        OmegaConf.update(
                            cfg,
                            override.key_or_group,
                            override.value(),
                            force_add=override.is_add(),
                        )
                _check_targets_in("", lambda cfg=cfg: check_config(cfg))
                cells.append((job, cell_from_config(cfg)))
            except (OmegaConfBaseException, HydraException) as error:
                error = config_error(error)
                raise ConfigError(f"{error}\n  in the cell: {' '.join(job)}") from None
            except ConfigError as error:
                raise ConfigError(f"{error}\n  in the cell: {' '.join(job)}") from None
    return cells


def preflight(overrides: list[str]) -> list[tuple[list[str], CellConfig]]:
    """Compose and validate every cell of the sweep and build each distinct model once;
    returns the cells, as :func:`sweep_cells`."""
    cells = sweep_cells(overrides)
    _refuse_duplicate_cells(cells)
    for store in {cell.store for _, cell in cells}:
        check_store_writable(store)
    check_data(cells)
    # A packed run holds one model copy per learning rate of the sweep.
    members = len({cell.optim.lr for _, cell in cells})
    built: set[str] = set()
    for job, cell in cells:
        try:
            _check_model_builds(cell, built, members if cell.train.pack_lr else 1)
        except ConfigError as error:
            raise ConfigError(f"{error}\n  in the cell: {' '.join(job)}") from None
    return cells


def check_data(cells: list[tuple[list[str], CellConfig]]) -> None:
    """Open each distinct data source of the sweep once, before any cell starts, and check what
    a cell would later trip on: a corpus that cannot be read or is too small, token ids beyond
    the vocabulary, a sequence longer than a split."""
    by_source: dict[str, list[CellConfig]] = {}
    for _, cell in cells:
        by_source.setdefault(json.dumps(asdict(cell.data), sort_keys=True), []).append(cell)
    for group in by_source.values():
        data = group[0].data
        try:
            corpus = corpus_for(data)
        except ConfigError:
            raise
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"data.path: cannot read {data.path!r} as data.source={data.source} ({error})"
            ) from None
        shortest = min(len(corpus.train), len(corpus.val))
        for cell in group:
            if cell.model.seq_len + 1 >= shortest:
                raise ConfigError(
                    f"model.seq_len: {cell.model.seq_len} is too long for {corpus.name}, whose "
                    f"smaller split has {shortest} tokens (a window is seq_len + 1 tokens)"
                )


def check_store_writable(store: str) -> None:
    """The store, or the folder it would be created in, must be a writable folder: checked
    without writing anything."""
    path = Path(store).expanduser().absolute()
    if not str(store).strip():
        raise ConfigError("store: must be a folder path (got an empty one)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"store: {str(existing)!r} is a file, not a folder (store={store!r})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"store: cannot write in {str(existing)!r} (store={store!r})")


def _refuse_duplicate_cells(cells: list[tuple[list[str], CellConfig]]) -> None:
    """Two jobs of one grid must not be the same cell: they would train it twice, at once. It
    happens when a swept key does not change training (a verdict label knob, train.threads)."""
    seen: dict[str, list[str]] = {}
    for job, cell in cells:
        first = seen.setdefault(cell.cell_id(), job)
        if first is job:
            continue
        differing = sorted(set(first) ^ set(job))
        keys = sorted({override.split("=")[0].lstrip("+~") for override in differing})
        raise ConfigError(
            f"{', '.join(keys) or 'sweep'}: the grid names cell {cell.cell_id()} twice "
            f"({' vs '.join(' '.join(o for o in j if o in differing) for j in (first, job))}); "
            "that key does not change training. Verdict knobs re-judge stored curves: run the "
            "sweep once, then `python -m suite.collect verdict.KEY=VALUE` for each value"
        )


def _check_model_builds(cell: CellConfig, built: set[str], copies: int) -> None:
    """Build each distinct (variant, shape) once on CPU: a broken variant fails here, not
    mid-sweep (the vocabulary size does not matter to the check). A model too big for the
    machine is refused before anything is allocated."""
    key = json.dumps([cell.variant, cell.variant_params, asdict(cell.model)], sort_keys=True)
    if key in built:
        return
    built.add(key)
    if check_fits_in_memory(cell, copies) > PREFLIGHT_BUILD_LIMIT:
        return  # too slow to build twice; GPT checks its blocks again when the cell starts
    try:
        build_model(cell, vocab_size=256)
    except VariantError as error:
        raise ConfigError(f"variant: {error}") from None
    except Exception as error:  # a plugin's own bug: name it, without a torch traceback
        raise ConfigError(
            f"variant: {cell.variant!r} failed to build: {type(error).__name__}: {error}"
        ) from None


def check_fits_in_memory(cell: CellConfig, copies: int = 1) -> float:
    """Parameters, gradients and AdamW's two moments: 16 bytes per fp32 parameter, for each of
    ``copies`` models (a packed run's members). Activations are not counted; a run that still
    does not fit is recorded as an out-of-memory error. Returns the (approximate) parameter
    count of one model."""
    m = cell.model
    device = _available_device(cell.train.device)
    per_layer = (4 + 2 * m.mlp_ratio) * m.width**2
    parameters = m.depth * per_layer + (256 + m.seq_len) * m.width
    needed = 16 * parameters * copies
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ConfigError(
            f"model: the parameters, gradients and AdamW state need ~{needed / 2**30:,.0f} GiB "
            f"(model.width={m.width}, model.depth={m.depth}, model.mlp_ratio={m.mlp_ratio:g}"
            + (f", {copies} packed learning rates" if copies > 1 else "")
            + ") "
            f"but this {device.type} has {available / 2**30:,.0f} GiB"
        )
    return parameters


def _available_device(requested: str) -> torch.device:
    if requested.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = torch.device(requested).index or 0
        if index >= count:
            raise ConfigError(
                f"train.device: {requested!r} is not available here ({count} CUDA device(s)); "
                "use train.device=auto or cpu"
            )
    return resolve_device(requested)


def _refuse_foreign_targets(overrides: list) -> None:
    """Every ``_target_`` given on the command line, swept values included, before composing."""
    for override in overrides:
        key = override.key_or_group
        if key == "_target_" or key.endswith("._target_"):
            values = (
                list(override.sweep_string_iterator())
                if override.is_sweep_override()
                else [override.value()]
            )
            for value in values:
                _check_targets_in(key, lambda v=value: check_target(v))


def _check_targets_in(where: str, check) -> None:
    try:
        check()
    except ForbiddenTarget as error:
        raise ConfigError(f"{where}: {error}" if where else str(error)) from None


def _needs_compose(override) -> bool:
    """Group choices (and deletions) change the defaults list; plain values do not."""
    key = override.key_or_group
    return key in CONFIG_GROUPS or key.startswith("hydra") or override.is_delete()
