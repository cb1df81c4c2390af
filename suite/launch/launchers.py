"""The launchers the suite runs sweeps under: one table, which every module asks.

A row per ``hydra/launcher`` choice the suite ships or supports: the class Hydra instantiates
(the ``_target_`` guard allows exactly these, suite/launch/targets.py), whether its cells run in
worker processes on this machine (those are pinned to GPUs and watch the sweep's main process),
whether the sweep's own output shows its cells' logs (otherwise the sweep prints progress
lines), how many cells it runs at once on one machine, the plugin it needs (and the pip extra
that installs it), and the checks preflight makes of its settings. A user's own launcher config
(in a ``--config-dir``) that builds on one of these is the row of its class.

A new launcher is one config under conf/hydra/launcher/ and one row here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
RAY = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"


class LauncherError(ValueError):
    """A launcher setting that would fail only once the sweep has started."""


def _one(settings: Any, sweep_size: int) -> int:
    return 1  # in-process, or one allocation per cell on a cluster


def _joblib_workers(settings: Any, sweep_size: int) -> int:
    jobs = int(settings.get("n_jobs", 1))
    workers = (os.cpu_count() or 1) if jobs < 0 else jobs
    return min(workers, sweep_size) if sweep_size else workers


def _every_cell(settings: Any, sweep_size: int) -> int:
    return sweep_size or 1  # submitit's local launcher starts every cell of the sweep at once


def _check_joblib(choice: str, settings: Any) -> None:
    if settings.get("n_jobs") == 0:
        raise LauncherError(
            "hydra.launcher.n_jobs: must not be 0 (a number of workers, or -1 for one per core)"
        )


def _check_slurm(choice: str, settings: Any) -> None:
    if shutil.which("sbatch") is None:
        raise LauncherError(
            f"hydra/launcher={choice}: no SLURM here (sbatch is not on the PATH); submit from "
            "a SLURM login node, or use hydra/launcher=per_core on this machine"
        )


@dataclass(frozen=True)
class Launcher:
    target: str  # the class Hydra instantiates
    local_workers: bool  # cells run in worker processes of this machine
    shows_cell_logs: bool  # the sweep's output carries its cells' log lines
    parallel_cells: Callable[[Any, int], int]  # (its settings, sweep size) → cells at once
    plugin: str | None = None  # the module its Hydra plugin lives in, when not a default one
    extra: str | None = None  # the suite's pip extra that installs that plugin
    needs_gpus: bool = False  # pins one worker per GPU slot and needs a GPU (gpus)
    check: Callable[[str, Any], None] | None = None  # preflight's check of its settings


# The suite's launcher configs (conf/hydra/launcher/) and the plugins' own, by choice.
LAUNCHERS: dict[str, Launcher] = {
    "basic": Launcher(BASIC, False, True, _one),
    "joblib": Launcher(JOBLIB, True, True, _joblib_workers, check=_check_joblib),
    "per_core": Launcher(JOBLIB, True, True, _joblib_workers, check=_check_joblib),
    "gpus": Launcher(JOBLIB, True, True, _joblib_workers, needs_gpus=True, check=_check_joblib),
    "submitit_local": Launcher(SUBMITIT_LOCAL, True, False, _every_cell),
    "submitit_slurm": Launcher(SUBMITIT_SLURM, False, False, _one, check=_check_slurm),
    "slurm": Launcher(SUBMITIT_SLURM, False, False, _one, check=_check_slurm),
    "ray": Launcher(RAY, False, False, _one, "hydra_plugins.hydra_ray_launcher", "ray"),
    "ray_cluster": Launcher(RAY, False, False, _one, "hydra_plugins.hydra_ray_launcher", "ray"),
}
TARGETS = frozenset(launcher.target for launcher in LAUNCHERS.values())


def launcher(choice: str, target: str = "") -> Launcher:
    """The row of a ``hydra/launcher`` choice, or, for a user's own config, of its class."""
    if choice in LAUNCHERS:
        return LAUNCHERS[choice]
    for row in LAUNCHERS.values():
        if row.target == target:
            return row
    known = ", ".join(sorted(LAUNCHERS))
    raise LauncherError(f"hydra/launcher={choice}: not a launcher the suite supports ({known})")
