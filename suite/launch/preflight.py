"""Preflight: expand the sweep exactly as Hydra's basic sweeper will, compose and validate every
cell, and build each distinct model once, so that an impossible value anywhere in the sweep fails
before any training, with a message naming the key.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import variants
from suite.config import CellConfig, ConfigError
from suite.launch.cell import cell_from_config, config_dir, config_error, register_schema
from suite.launch.devices import register_resolver, sweep_gpus
from suite.launch.launchers import LAUNCHERS, LauncherError, launcher
from suite.launch.targets import ForbiddenTarget, check_config, check_target
from suite.plan import RESERVED_ENV_PREFIX
from suite.run.environment import resolve_device
from suite.run.model import VariantError, swiglu_hidden
from suite.run.runner import build_model, corpus_for

CONFIG_GROUPS = {p.name for p in config_dir().iterdir() if p.is_dir()} | {"variant"}
PREFLIGHT_BUILD_LIMIT = 50e6  # parameters; bigger models are checked when their cell starts


_registered: tuple = ()  # the ConfigStore itself (not its id) and the variants stored in it


def register_configs() -> None:
    """The schema (suite.config) and every registered variant (built-in or plugin), as the
    config group ``variant``, in Hydra's ConfigStore; only again when a variant was registered
    since (storing them took 15 ms a call, and sweep_cells calls this per sweep)."""
    global _registered
    store = ConfigStore.instance()
    now = (store, *((name, variants.get(name)) for name in variants.names()))
    resolvers = all(map(OmegaConf.has_resolver, ("suite_path", "suite_gpu_workers")))
    if now == _registered and resolvers:
        return
    register_schema()
    register_resolver()
    for name, variant in now[1:]:
        store.store(
            # Every parameter settable, also those params() leaves out of the id at default.
            group="variant",
            name=name,
            node={"name": name, **asdict(variant())},
        )
    _registered = now


def _check_variant_names(overrides: list) -> None:
    known = set(variants.names())
    for override in overrides:
        if override.key_or_group.lstrip("+~") == "variant.name":
            raise ConfigError(
                "variant.name: the variant is chosen with +variant=NAME (a comma list sweeps "
                "several), not set as a value"
            )
        if override.key_or_group != "variant":
            continue
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.value()]
        )
        for name in values:
            if not isinstance(name, str):
                raise ConfigError(
                    f"variant: expected a variant name, or a comma list to sweep several "
                    f"(+variant=preln,postln); got {override.input_line}"
                )
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


def launcher_choice(overrides: list[str]) -> str:
    """The ``hydra/launcher`` choice every job of the sweep runs under (``basic`` by default)."""
    register_configs()
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and _needs_compose(o)]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        base = compose("config", overrides=fixed, return_hydra_config=True)
    return str(base.hydra.runtime.choices.get("hydra/launcher") or "basic")


def _composed(overrides: list[str], compositions: dict[tuple[str, ...], DictConfig]) -> DictConfig:
    """``compose`` with Hydra's config, once per list of overrides in ``compositions`` (a
    caller's cache; the configs in it are not to be changed). A composition also holds what
    was true when it was made (the working folder, variables Hydra copies from the environment,
    the config files, the registered variants, ``${now:}``): keep a cache for one plan, not
    across changes to those."""
    key = tuple(overrides)
    if key not in compositions:
        compositions[key] = compose("config", overrides=list(key), return_hydra_config=True)
    return compositions[key]


def expand_sweep(
    overrides: list[str], compositions: dict[tuple[str, ...], DictConfig] | None = None
) -> list[list[str]]:
    """The override list of every job the sweep will run, as Hydra's basic sweeper builds them:
    the preset's ``hydra.sweeper.params`` with command-line values taking precedence."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    _check_variant_names(parsed)
    _refuse_foreign_targets(parsed)
    _check_launcher_installed(parsed)
    # Only the choices that can change the preset's grid: the sweep preset and Hydra's own keys.
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and _needs_compose(o)]
    base = _composed(fixed, {} if compositions is None else compositions)
    _check_targets_in("", lambda: check_config(base))  # Hydra's own config: callbacks, launcher
    check_hydra_settings(base)
    preset = [f"{k}={v}" for k, v in (base.hydra.sweeper.params or {}).items()]
    # As Hydra's basic sweeper: one axis per key, the preset's first; a command-line value of a
    # preset's key replaces its values in place (its position in the grid's order stays), so
    # the jobs come out in Hydra's order and the plan's job k is Hydra's job k.
    axes: dict[str, list[str]] = {}
    for override in parser.parse_overrides(preset) + parsed:
        if override.is_hydra_override() and override.is_sweep_override():
            raise ConfigError(
                f"{override.key_or_group}: Hydra's own settings cannot be swept (one value each)"
            )
        # Hydra's own settings stay in every job's overrides (one value each), as in Hydra's
        # jobs: a job's env_set, search path or launcher compose with its cell.
        key = override.get_key_element()
        if override.is_sweep_override():
            axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            axes[key] = [override.input_line]
    jobs = [list(job) for job in itertools.product(*axes.values())]
    choice = str(base.hydra.runtime.choices.get("hydra/launcher") or "basic")
    if choice in LAUNCHERS and LAUNCHERS[choice].needs_gpus:
        _check_gpu_launcher(choice, base, jobs)
    return jobs


def check_hydra_settings(cfg: DictConfig) -> None:
    """What a user may set in Hydra's own namespace that would move results out of the store's
    reach, bypass preflight, or fail only after the sweep has started."""
    hydra_cfg = cfg.hydra
    for key in hydra_cfg.job.get("env_set") or {}:
        if str(key).startswith(RESERVED_ENV_PREFIX):
            raise ConfigError(
                f"hydra.job.env_set.{key}: {RESERVED_ENV_PREFIX}* variables are the suite's own "
                "channel to its jobs, not a setting"
            )
    if hydra_cfg.job.get("chdir"):
        raise ConfigError(
            "hydra.job.chdir: must stay false: the suite resolves store and data.path from the "
            "folder it is started in, and a job that changes folder writes its results elsewhere"
        )
    sweep_dir = str(hydra_cfg.sweep.get("dir") or "").strip()
    if not sweep_dir:
        raise ConfigError(
            "hydra.sweep.dir: must be a folder path (empty would write Hydra's job folders into "
            "the working directory)"
        )
    _check_writable_folder("hydra.sweep.dir", sweep_dir)
    if Path(sweep_dir).is_dir() and any(Path(sweep_dir).iterdir()):
        raise ConfigError(
            f"hydra.sweep.dir: {sweep_dir!r} holds an earlier sweep's job folders; give each "
            "sweep a new folder (the default makes one per start), or its summary would mix them"
        )
    subdir = OmegaConf.to_container(hydra_cfg.sweep, resolve=False).get("subdir")
    if str(subdir) != JOB_SUBDIR:
        raise ConfigError(
            f"hydra.sweep.subdir: must stay {JOB_SUBDIR} (one folder per job, which the sweep's "
            f"summary reads); got {subdir!r}"
        )
    collect = (hydra_cfg.get("callbacks") or {}).get("collect")
    if collect is None or collect.get("_target_") != COLLECT_CALLBACK:
        raise ConfigError(
            f"hydra.callbacks.collect: must stay {COLLECT_CALLBACK}: it summarizes the sweep and "
            "sets its exit code (add callbacks of your own under another name)"
        )
    for section in ("job_logging", "hydra_logging"):
        check_logging_config(f"hydra.{section}", hydra_cfg.get(section))
    choice = str(hydra_cfg.runtime.choices.get("hydra/launcher") or "basic")
    try:
        row = launcher(choice, str(hydra_cfg.launcher.get("_target_", "")))
        if row.check is not None:
            row.check(choice, hydra_cfg.launcher)
    except LauncherError as error:
        raise ConfigError(str(error)) from None


JOB_SUBDIR = "${hydra.job.num}"
COLLECT_CALLBACK = "suite.analyze.collect.CollectCallback"
# What a logging config may build: Python's own handlers, never a factory ('()') of any module.
LOGGING_HANDLERS = ("logging.StreamHandler", "logging.FileHandler", "logging.NullHandler")
LOGGING_STREAMS = ("ext://sys.stdout", "ext://sys.stderr")
LOGGING_LEVELS = ("CRITICAL", "ERROR", "WARNING", "WARN", "INFO", "DEBUG", "NOTSET")


def check_logging_config(where: str, node: Any) -> None:
    """A logging config (Python's dictConfig schema) from Hydra's namespace builds only Python's
    own handlers and formatters: a ``()`` factory or another class would run any callable (a
    suite function that rewrites a record, say) when the job configures its logging."""
    if node is None:
        return
    config = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: must be a logging config (a mapping)")

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "()":
                    raise ConfigError(
                        f"{path}.(): a logging factory runs any callable; the suite's logging "
                        f"configs take handlers from {', '.join(LOGGING_HANDLERS)}"
                    )
                walk(item, f"{path}.{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]")

    walk(config, where)
    if config.get("filters"):
        raise ConfigError(f"{where}.filters: logging filters are not supported")
    for name, formatter in (config.get("formatters") or {}).items():
        if isinstance(formatter, dict) and formatter.get("class", "logging.Formatter") != (
            "logging.Formatter"
        ):
            raise ConfigError(f"{where}.formatters.{name}.class: must be logging.Formatter")
    levels = [(f"{where}.root.level", (config.get("root") or {}).get("level"))]
    for name, handler in (config.get("handlers") or {}).items():
        key = f"{where}.handlers.{name}"
        if not isinstance(handler, dict) or handler.get("class") not in LOGGING_HANDLERS:
            got = handler.get("class") if isinstance(handler, dict) else handler
            raise ConfigError(
                f"{key}.class: must be one of {', '.join(LOGGING_HANDLERS)} (got {got!r})"
            )
        if handler.get("mode", "a") != "a":
            raise ConfigError(f"{key}.mode: log files are appended to (mode a), never replaced")
        if "stream" in handler and handler["stream"] not in LOGGING_STREAMS:
            raise ConfigError(f"{key}.stream: must be one of {', '.join(LOGGING_STREAMS)}")
        levels.append((f"{key}.level", handler.get("level")))
    for name, logger in (config.get("loggers") or {}).items():
        levels.append((f"{where}.loggers.{name}.level", (logger or {}).get("level")))
    for key, level in levels:
        if level is not None and str(level).upper() not in LOGGING_LEVELS:
            raise ConfigError(f"{key}: must be one of {', '.join(LOGGING_LEVELS)} (got {level!r})")


def _check_launcher_installed(overrides: list) -> None:
    """A launcher whose Hydra plugin is not installed (the ray extra): the pip command."""
    for override in overrides:
        if override.key_or_group != "hydra/launcher" or override.is_sweep_override():
            continue
        row = LAUNCHERS.get(str(override.value()))
        if row is not None and row.plugin and importlib.util.find_spec(row.plugin) is None:
            raise ConfigError(
                f"hydra/launcher={override.value()}: its Hydra plugin is not installed; "
                f"pip install -e '.[{row.extra}]' (or pip install 'stability-suite[{row.extra}]')"
            )


def _check_gpu_launcher(choice: str, base: DictConfig, jobs: list[list[str]]) -> None:
    """The GPU launcher needs a GPU, and a cell device its pinning can choose."""
    if not sweep_gpus():
        raise ConfigError(
            f"hydra/launcher={choice}: no GPU is visible here (torch.cuda.is_available() "
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
            f"train.device: {device!r} cannot be used with hydra/launcher={choice}, which "
            "pins each worker to one GPU; use train.device=auto or cuda"
        )


def sweep_cells(
    overrides: list[str], compositions: dict[tuple[str, ...], DictConfig] | None = None
) -> list[tuple[list[str], CellConfig]]:
    """Every job of the sweep as (its overrides, its validated cell), in Hydra's order.

    Composing is slow (~50 ms), so it is done once per combination of config-group choices
    (in ``compositions``, which a caller of many sweeps passes to each: the remedy plan of the
    shipped reference composed ~1,800 times without it, 51 s alone and 252 s inside the test
    suite); each cell's plain values are then set on a copy, as Hydra itself applies them after
    composing the defaults list.
    """
    register_configs()
    parser = OverridesParser.create()
    composed = {} if compositions is None else compositions
    cells = []
    checked: set[tuple[str, ...]] = set()  # compositions whose Hydra settings passed
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        try:
            jobs = expand_sweep(overrides, composed)
        except (HydraException, OmegaConfBaseException) as error:
            raise config_error(error) from None
        except UNREADABLE_CONFIG as error:  # a broken preset, e.g. in a user's --config-dir
            raise ConfigError(unreadable_config(error)) from None
        for job in jobs:
            try:
                parsed = parser.parse_overrides(job)
                groups = tuple(o.input_line for o in parsed if _needs_compose(o))
                # With Hydra's part: a job's own preset may set its keys (env_set, chdir).
                full = _composed(list(groups), composed)
                if groups not in checked:  # ~1.3 ms of file-system probes, once a composition
                    check_hydra_settings(full)
                    checked.add(groups)
                cfg = copy.deepcopy(full)
                for override in parsed:
                    if not _needs_compose(override):
                        OmegaConf.update(
                            cfg,
                            override.key_or_group,
                            override.value(),
                            force_add=override.is_add(),
                        )
                _check_targets_in("", lambda cfg=cfg: check_config(cfg))
                _refuse_values_that_change_by_when(cfg)
                # As the job will: its Hydra env_set applied while its values are resolved.
                with _job_environment(cfg.hydra.job.get("env_set")):
                    cell = cell_from_config(cfg)
                _check_variant_choice(parsed, cell)
                cells.append((job, cell))
            except (OmegaConfBaseException, HydraException) as error:
                error = config_error(error)
                raise ConfigError(f"{error}\n  in the cell: {' '.join(job)}") from None
            except ConfigError as error:
                raise ConfigError(f"{error}\n  in the cell: {' '.join(job)}") from None
            except UNREADABLE_CONFIG as error:
                raise ConfigError(
                    f"{unreadable_config(error)}\n  in the cell: {' '.join(job)}"
                ) from None
    return cells


# A preset that cannot be read as YAML (broken, not UTF-8) or whose defaults include itself.
UNREADABLE_CONFIG = (yaml.YAMLError, UnicodeDecodeError, RecursionError)


def unreadable_config(error: BaseException) -> str:
    if isinstance(error, RecursionError):
        return "a config's defaults list includes itself (endless recursion)"
    return f"a config file is not valid YAML: {_one_line(error)}"


@contextlib.contextmanager
def _job_environment(env_set: Any) -> Iterator[None]:
    """Hydra's ``hydra.job.env_set`` in this process's environment, as the job will have it."""
    values = {str(k): str(v) for k, v in (env_set or {}).items()}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _refuse_values_that_change_by_when(cfg: DictConfig) -> None:
    """A setting that interpolates the time (``${now:...}``) resolves to one value in preflight
    and another in the job: the job would train a cell preflight never saw."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")
        elif isinstance(node, str) and "${now:" in node:
            raise ConfigError(
                f"{path}: {node!r} is the time, which differs between preflight and the job; "
                "give a value"
            )

    container = OmegaConf.to_container(cfg, resolve=False)
    walk({k: v for k, v in container.items() if k != "hydra"}, "")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _check_variant_choice(parsed: list, cell: CellConfig) -> None:
    """The variant a job trains is the one it chose (+variant=NAME): a preset that sets
    ``variant.name`` would otherwise train another variant under the chosen one's command."""
    chosen = [str(o.value()) for o in parsed if o.key_or_group == "variant"]
    if chosen and cell.variant != chosen[-1]:
        raise ConfigError(
            f"variant.name: {cell.variant!r} does not match +variant={chosen[-1]}; a preset must "
            "not set variant.name (choose the variant with +variant=NAME)"
        )


def preflight(overrides: list[str]) -> list[tuple[list[str], CellConfig]]:
    """Compose and validate every cell of the sweep and build each distinct model once;
    returns the cells, as :func:`sweep_cells`."""
    cells = sweep_cells(overrides)
    _refuse_duplicate_cells(cells)
    for store in {cell.store for _, cell in cells}:
        check_store_writable(store)
    vocab_sizes = check_data(cells)
    # A packed run holds one model copy per learning rate of the sweep.
    members = len({cell.optim.lr for _, cell in cells})
    built: set[str] = set()
    for job, cell in cells:
        try:
            vocab_size = vocab_sizes[_data_key(cell)]
            copies = members if cell.train.pack_lr else 1
            _check_model_builds(cell, built, copies, vocab_size)
        except ConfigError as error:
            raise ConfigError(f"{error}\n  in the cell: {' '.join(job)}") from None
    return cells


def _data_key(cell: CellConfig) -> str:
    return json.dumps(asdict(cell.data), sort_keys=True)


def check_data(cells: list[tuple[list[str], CellConfig]]) -> dict[str, int]:
    """Open each distinct data source of the sweep once, before any cell starts, and check what
    a cell would later trip on: a corpus that cannot be read or is too small, token ids beyond
    the vocabulary, a sequence longer than a split. Returns each source's vocabulary size."""
    by_source: dict[str, list[CellConfig]] = {}
    for _, cell in cells:
        by_source.setdefault(_data_key(cell), []).append(cell)
    vocab_sizes = {}
    for key, group in by_source.items():
        data = group[0].data
        try:
            corpus = corpus_for(data)
        except ConfigError:
            raise
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"data.path: cannot read {data.path!r} as data.source={data.source} ({error})"
            ) from None
        vocab_sizes[key] = corpus.vocab_size
        shortest = min(len(corpus.train), len(corpus.val))
        for cell in group:
            if cell.model.seq_len + 1 >= shortest:
                raise ConfigError(
                    f"model.seq_len: {cell.model.seq_len} is too long for {corpus.name}, whose "
                    f"smaller split has {shortest} tokens (a window is seq_len + 1 tokens)"
                )
    return vocab_sizes


def check_store_writable(store: str) -> None:
    """The store, or the folder it would be created in, must be a writable folder: checked
    without writing anything."""
    if not str(store).strip():
        raise ConfigError("store: must be a folder path (got an empty one)")
    _check_writable_folder("store", store)


def _check_writable_folder(key: str, folder: str) -> None:
    existing = Path(folder).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {str(existing)!r} is a file, not a folder ({key}={folder!r})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write in {str(existing)!r} ({key}={folder!r})")


def _refuse_duplicate_cells(cells: list[tuple[list[str], CellConfig]]) -> None:
    """Two jobs of one grid must not be the same cell: they would train it twice, at once. It
    happens when a swept key does not change training (a verdict label knob, train.threads).
    Sweeping ``recipe`` is the exception: a variant whose paper adds nothing beyond its wiring
    has one cell for both arms, and the sweep trains it once (its later job skips it)."""
    seen: dict[str, list[str]] = {}
    for job, cell in cells:
        first = seen.setdefault(cell.cell_id(), job)
        if first is job:
            continue
        differing = sorted(set(first) ^ set(job))
        keys = sorted({override.split("=")[0].lstrip("+~") for override in differing})
        if keys == ["recipe"]:
            continue  # a variant whose recipe adds nothing: one cell, its later job skips it
        raise ConfigError(
            f"{', '.join(keys) or 'sweep'}: the grid names cell {cell.cell_id()} twice "
            f"({' vs '.join(' '.join(o for o in j if o in differing) for j in (first, job))}); "
            "that key does not change training. Verdict knobs re-judge stored curves: run the "
            "sweep once, then `python -m suite.collect verdict.KEY=VALUE` for each value"
        )


def _check_model_builds(cell: CellConfig, built: set[str], copies: int, vocab_size: int) -> None:
    """Build each distinct (variant, shape) once on CPU: a broken variant fails here, not
    mid-sweep (the vocabulary size does not matter to the check). A cell too big for the
    machine is refused before anything is allocated."""
    needed = check_fits_in_memory(cell, vocab_size, copies)
    key = json.dumps(
        [cell.variant, cell.variant_params, cell.recipe, asdict(cell.model)], sort_keys=True
    )
    if key in built:
        return
    built.add(key)
    if needed.parameters > PREFLIGHT_BUILD_LIMIT:
        return  # too slow to build twice; GPT checks its blocks again when the cell starts
    try:
        build_model(cell, vocab_size=256)
    except VariantError as error:
        raise ConfigError(f"variant: {error}") from None
    except Exception as error:  # a plugin's own bug: name it, without a torch traceback
        raise ConfigError(
            f"variant: {cell.variant!r} failed to build: {type(error).__name__}: {error}"
        ) from None


@dataclass(frozen=True)
class MemoryNeed:
    parameters: float  # of one model
    state_bytes: float  # parameters, gradients and AdamW's two moments, fp32
    activation_bytes: float  # what one training step keeps for its backward pass

    @property
    def total(self) -> float:
        return self.state_bytes + self.activation_bytes


def memory_need(cell: CellConfig, vocab_size: int, copies: int = 1) -> MemoryNeed:
    """An upper estimate of what a cell allocates, for ``copies`` models (a packed run's
    members): 16 bytes per fp32 parameter (the weights, their gradients, AdamW's two moments),
    the embeddings and head counted by the vocabulary, plus the activations one step keeps for
    backward, by batch and sequence: per block the residual stream and sublayer inputs (~10·d),
    the MLP's hidden units (3·r·d) and the attention scores and probabilities (2·heads·T), and
    the output logits with their softmax and its gradient (3·V) per token, in fp32; or those of
    the diagnostics' probe batch, when it is the larger."""
    m, batch = cell.model, cell.train.batch_size
    if m.backbone == "llama":  # SwiGLU's three matrices; RoPE instead of a position table
        per_layer = 4 * m.width**2 + 3 * swiglu_hidden(m.width, m.mlp_ratio) * m.width
        positions = 0
    else:
        per_layer = (4 + 2 * m.mlp_ratio) * m.width**2
        positions = m.seq_len * m.width
    embeddings = vocab_size * m.width * (1 if m.tie_embeddings else 2) + positions
    parameters = m.depth * per_layer + embeddings
    per_token = m.depth * (m.width * (10 + 3 * m.mlp_ratio) + 2 * m.heads * m.seq_len)
    per_token += 3 * vocab_size
    activations = 4 * batch * m.seq_len * per_token
    if cell.diagnostics.enabled:  # the probe batch's forward pass beside training
        probe = cell.diagnostics.probe_batch
        activations = max(activations, 4 * probe * m.seq_len * per_token)
    return MemoryNeed(parameters, 16 * parameters * copies, activations * copies)


def check_fits_in_memory(cell: CellConfig, vocab_size: int, copies: int = 1) -> MemoryNeed:
    """Refuse a cell whose estimated memory (:func:`memory_need`) exceeds the device's: the
    machine's RAM on CPU (one cell at a time; parallel workers share it), the GPU's memory on
    CUDA. Returns the estimate."""
    m = cell.model
    device = _available_device(cell.train.device)
    need = memory_need(cell, vocab_size, copies)
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need.total > available:
        raise ConfigError(
            f"model: a cell needs ~{need.total / 2**30:,.1f} GiB "
            f"(~{need.state_bytes / 2**30:,.1f} GiB of parameters, gradients and AdamW state, "
            f"~{need.activation_bytes / 2**30:,.1f} GiB of activations: model.width={m.width}, "
            f"model.depth={m.depth}, model.mlp_ratio={m.mlp_ratio:g}, model.seq_len={m.seq_len}, "
            f"train.batch_size={cell.train.batch_size}, vocabulary {vocab_size}"
            + (f", {copies} packed learning rates" if copies > 1 else "")
            + f") but this {device.type} has {available / 2**30:,.0f} GiB"
        )
    return need


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
