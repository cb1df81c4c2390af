"""End to end through the real CLI: a tiny sweep, the store it writes, the collected DataFrame."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from helpers import run_suite, start_suite

from suite.analyze.collect import collect
from suite.record import OPTIONAL_COLUMNS, RECORD_COLUMNS

pytestmark = pytest.mark.slow


def test_tiny_sweep_collects_every_cell(tiny_sweep):
    store, result = tiny_sweep
    runs = pd.read_parquet(store / "runs.parquet")
    assert len(runs) == 2 * 2 * 2  # variants × depths × LRs
    assert set(runs["variant"]) == {"postln", "preln"}
    assert set(runs["depth"]) == {2, 4} and set(runs["lr"]) == {1e-3, 3e-2}
    assert (runs["status"] == "ok").all() and (runs["sweep"] == "tiny").all()
    assert runs["verdict"].isin(["converged", "stalled", "diverged"]).all()
    assert (runs["steps"] == 150).all() and (runs["tokens_per_s"] > 0).all()
    assert runs["cell_id"].is_unique and runs["config_hash"].is_unique
    assert (runs["variant_source"] == "built-in").all()
    assert (runs["parallel_cells"] == 1).all() and not runs["shared_device"].any()
    assert set(RECORD_COLUMNS) - OPTIONAL_COLUMNS <= set(runs.columns)


def test_every_cell_has_record_and_curve(tiny_sweep):
    store, _ = tiny_sweep
    folders = sorted((store / "cells").iterdir())
    assert len(folders) == 8
    for folder in folders:
        record = json.loads((folder / "record.json").read_text())
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["record.json", record["curve_file"]]
        )
        curve = pd.read_parquet(folder / record["curve_file"])
        assert record["cell_id"] == folder.name
        assert len(curve) == record["steps_completed"] == 150
        assert list(curve.columns) == [
            *("step", "lr", "loss", "grad_norm", "tokens_per_s"),
            *("grad_rms", "loss_spike", "grad_spike"),  # diagnostics, every step
            *("model_update", "log_z", "attn_logit_max", "attn_logit_max_by_layer"),  # sampled
            "update_ratio",
            "act_rms_by_layer",  # per block, sampled
            *("grad_norm_by_layer", "update_ratio_by_layer"),
            *("grad_norm_attn_by_layer", "update_ratio_attn_by_layer"),
            *("grad_norm_mlp_by_layer", "update_ratio_mlp_by_layer"),
        ]
        assert record["config"]["model"]["width"] == 32  # enough to re-run the cell


def test_progress_and_summary_are_printed(tiny_sweep):
    _, result = tiny_sweep
    out = result.stdout
    assert "cell 1/8:" in out and "cell 8/8 done:" in out
    assert "step    0/150" in out
    assert "Summary of this sweep (8 cells" in out
    for column in ("converged_%", "stalled_%", "diverged_%", "max_stable_lr", "best_val_loss"):
        assert column in out


def test_standalone_collect_equals_the_callback(tiny_sweep):
    store, _ = tiny_sweep
    before = pd.read_parquet(store / "runs.parquet")
    again = collect(store)
    pd.testing.assert_frame_equal(before, again)


@pytest.mark.parametrize(
    "launcher",
    [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ["hydra/launcher=submitit_local"]],
)
def test_parallel_launchers_give_the_basic_launchers_results(tiny_sweep, tmp_path, launcher):
    store, _ = tiny_sweep
    result = run_suite("+variant=postln,preln", "sweep=tiny", f"store={tmp_path}", *launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    basic = pd.read_parquet(store / "runs.parquet").set_index("cell_id")
    other = pd.read_parquet(tmp_path / "runs.parquet").set_index("cell_id")
    assert sorted(basic.index) == sorted(other.index)
    assert other["shared_device"].all() and (other["parallel_cells"] > 1).all()
    pd.testing.assert_series_equal(basic["verdict"], other.loc[basic.index, "verdict"])
    pd.testing.assert_series_equal(
        basic["final_loss"], other.loc[basic.index, "final_loss"], rtol=1e-5
    )


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_kill_mid_sweep_keeps_every_finished_cell(tmp_path, stop):
    """Ctrl-C in a terminal, or ``kill PID`` (SIGTERM; also of a sweep started in the background
    of a script, where SIGINT is ignored): the sweep stops, every finished cell kept."""
    import signal
    import subprocess

    store = tmp_path / "store"
    # A shell's background job (`pytest ... &`) ignores SIGINT, and Python keeps an inherited
    # SIG_IGN: the Ctrl-C case gets the default a terminal would, the SIGTERM case keeps SIGINT
    # ignored, as `nohup python -m suite ... &` does.
    interrupt = signal.SIG_DFL if stop == "SIGINT" else signal.SIG_IGN
    process = start_suite(
        *("+variant=preln", "sweep=tiny", f"store={store}", "train.steps=400"),
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, interrupt),
    )
    for line in process.stdout:  # wait for the first cell to finish, then press Ctrl-C
        if "cell 1/4 done" in line:
            process.send_signal(getattr(signal, stop))
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted: finished cells are kept" in stderr
    records = sorted((store / "cells").glob("*/record.json"))
    assert 1 <= len(records) < 4
    runs = collect(store)
    assert len(runs) == len(records) and (runs["status"] == "ok").all()
    assert not list((store / "cells").glob("*/.record.json.*"))  # no half-written record


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_a_variant_setting_applies_to_every_variant_swept(tmp_path, prefix):
    """`+variant=dyt,derf variant.alpha_init=4` used to fail in Hydra (the setting had no
    variant to land on before the sweep was split), and `+variant.alpha_init=4` (add) failed
    there after preflight had accepted it (the variant already has that setting); each variant's
    cells now carry it, whichever way it is written."""
    result = run_suite(
        "+variant=dyt,derf", f"{prefix}variant.alpha_init=4.0", "sweep=tiny", "model.depth=2",
        "optim.lr=1e-3", "train.steps=2", f"store={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = collect(tmp_path)
    assert sorted(runs["variant"]) == ["derf", "dyt"]
    for config in runs["config"]:
        assert json.loads(config)["variant_params"]["alpha_init"] == 4.0


def test_cfg_shows_one_jobs_config_and_names_a_sweep_it_cannot_show():
    one = run_suite("+variant=preln", "model.depth=3", "--cfg", "job")
    assert one.returncode == 0, one.stderr[-2000:]
    assert "name: preln" in one.stdout and "depth: 3" in one.stdout
    several = run_suite("+variant=preln,rmsnorm", "sweep=tiny", "--cfg", "job")
    assert several.returncode == 2
    assert "config error" in several.stderr and "+variant=preln,rmsnorm" in several.stderr
    assert "Traceback" not in several.stderr


def test_a_preset_of_ones_own_in_a_config_dir_is_checked_and_swept(tmp_path):
    """`--config-dir DIR` adds a user's presets beside the suite's (a wheel's conf/ is not theirs
    to edit); preflight composes with it, so the grid is known and a bad value stops the sweep
    before training, as for the suite's own presets."""
    presets = tmp_path / "conf" / "sweep"
    presets.mkdir(parents=True)
    (presets / "mine.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - tiny\n"
        "sweep_name: mine\n"
        "hydra:\n  sweeper:\n    params:\n      model.depth: 2\n      optim.lr: 1e-3,2e-3\n"
    )
    store = tmp_path / "store"
    common = ("+variant=preln", "sweep=mine", "train.steps=2", f"store={store}")
    result = run_suite("--config-dir", str(tmp_path / "conf"), *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cell 2/2 done" in result.stdout  # the sweep's size was known up front
    runs = collect(store)
    assert sorted(runs["cell_id"].str.split("-").str[2]) == ["lr0.001", "lr0.002"]
    assert set(runs["sweep"]) == {"mine"}

    bad = run_suite(f"--config-dir={tmp_path / 'conf'}", *common, "model.heads=3")
    assert bad.returncode == 2 and "config error: model.heads" in bad.stderr, bad.stderr[-2000:]
    missing = run_suite("-cd", str(tmp_path / "nowhere"), *common)
    assert missing.returncode == 2 and "--config-dir" in missing.stderr
    no_value = run_suite(*common, "--config-dir")
    assert no_value.returncode == 2 and "--config-dir" in no_value.stderr
