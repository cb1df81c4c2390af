"""The launcher table (suite/launch/launchers.py): every launcher config the suite ships has its
row, every row's class is the one Hydra composes for it, and the guard allows exactly those."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from suite.launch.cell import config_dir
from suite.launch.launchers import LAUNCHERS, LauncherError, launcher
from suite.launch.preflight import register_configs
from suite.launch.targets import ALLOWED_TARGETS

SHIPPED = sorted(path.stem for path in (config_dir() / "hydra" / "launcher").glob("*.yaml"))
PLUGINS_INSTALLED = ["basic", "joblib", "submitit_local", "submitit_slurm"]


@pytest.mark.parametrize("choice", SHIPPED + PLUGINS_INSTALLED)
def test_every_launcher_config_has_its_row_with_the_class_hydra_builds(choice):
    if LAUNCHERS[choice].plugin:
        pytest.importorskip(LAUNCHERS[choice].plugin)
    register_configs()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config", overrides=["+variant=preln", f"hydra/launcher={choice}"],
            return_hydra_config=True,
        )  # fmt: skip
    assert cfg.hydra.launcher._target_ == LAUNCHERS[choice].target
    assert LAUNCHERS[choice].target in ALLOWED_TARGETS


def test_a_users_own_launcher_config_is_the_row_of_its_class():
    row = launcher("my_cluster", LAUNCHERS["slurm"].target)
    assert row.target == LAUNCHERS["slurm"].target and not row.local_workers
    with pytest.raises(LauncherError, match="hydra/launcher=mine: not a launcher"):
        launcher("mine", "some.other.Launcher")


def test_parallel_cells_per_launcher():
    assert LAUNCHERS["per_core"].parallel_cells({"n_jobs": 3}, 2) == 2
    assert LAUNCHERS["joblib"].parallel_cells({"n_jobs": 3}, 10) == 3
    assert LAUNCHERS["submitit_local"].parallel_cells({}, 7) == 7
    assert LAUNCHERS["slurm"].parallel_cells({}, 7) == 1
    assert LAUNCHERS["basic"].parallel_cells({}, 7) == 1
