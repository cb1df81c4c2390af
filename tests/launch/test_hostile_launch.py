"""Hostile input, round three: nothing reaches a job but through the config preflight checked,
the ``_target_`` guard allows only what the configs need, one bad value or file never makes a
store uncollectable, claims hold while their owner lives, and Hydra's own namespace cannot move
results out of the store's reach. Each test reproduces a case that failed before its fix."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, make_cell, run_suite

import suite.launch.claims as claims
from suite.analyze.collect import collect, report_text
from suite.config import ConfigError
from suite.launch.claims import CLAIM, Claim, ClaimLost, claim_cell
from suite.launch.preflight import memory_need, preflight
from suite.liveness import process_alive, process_stamp
from suite.plan import PLAN_ENV, PlanError, SweepPlan, job_plan
from suite.store import cell_dir, finished_record

STORE_V0_2_0 = REPO / "tests" / "data" / "store_v0_2_0"
TINY = ["+variant=preln", "sweep=tiny"]


def refused(*overrides: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        preflight([*TINY, *overrides])


# --- 1. the suite's own channel to its jobs cannot be written by a user ------------------------


@pytest.mark.parametrize(
    "override",
    [
        "++hydra.job.env_set.SUITE_PACKED_LRS='-1 1e9'",  # the 0.3 channel
        "++hydra.job.env_set.SUITE_SWEEP_PLAN=forged",  # today's
        "+hydra.job.env_set.SUITE_ANYTHING=1",
    ],
)
def test_the_suites_job_environment_is_refused_from_the_command_line(override):
    refused(override, match=r"^hydra\.job\.env_set\.SUITE_")


def test_the_suites_job_environment_is_refused_from_a_users_preset(tmp_path):
    presets = tmp_path / "presets" / "sweep"
    presets.mkdir(parents=True)
    (presets / "sneaky.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tiny\nhydra:\n  job:\n    env_set:\n"
        "      SUITE_PACKED_LRS: '-1 1e9'\n"
    )
    store = tmp_path / "store"
    result = run_suite(
        "+variant=preln", "sweep=sneaky", f"store={store}", "--config-dir", str(presets.parent)
    )
    assert result.returncode == 2, result.stdout[-2000:]
    assert "config error: hydra.job.env_set.SUITE_PACKED_LRS" in result.stderr
    assert not (store / "cells").exists()


def test_a_job_trains_only_cells_its_sweeps_plan_lists(tmp_path, monkeypatch):
    from suite.launch.cli import _refuse_unplanned

    planned, other = make_cell(lr=1e-3), make_cell(lr=-1.0)
    plan = SweepPlan(command=[], resume=True, launcher="basic", jobs=[[planned.cell_id()]])
    path = plan.write(tmp_path)
    monkeypatch.setenv(PLAN_ENV, plan.job_env)
    assert job_plan(tmp_path).cells == [planned.cell_id()]
    _refuse_unplanned(plan, [planned])
    with pytest.raises(PlanError, match="preflight did not check it"):
        _refuse_unplanned(plan, [other])
    for forged in ("", plan.name, "../../etc/passwd:0", "no-such-plan:0"):
        monkeypatch.setenv(PLAN_ENV, forged)
        with pytest.raises(PlanError):
            job_plan(tmp_path)
    # A plan edited after the sweep started (another cell appended) is refused by its digest.
    monkeypatch.setenv(PLAN_ENV, plan.job_env)
    edited = json.loads(path.read_text())
    edited["jobs"].append([other.cell_id()])
    path.write_text(json.dumps(edited))
    with pytest.raises(PlanError, match="changed after the sweep started"):
        job_plan(tmp_path)


@pytest.mark.slow
def test_a_packed_sweep_trains_exactly_the_planned_learning_rates(tmp_path):
    store = tmp_path / "store"
    result = run_suite(
        *TINY, "model.depth=2", "train.steps=10", "train.pack_lr=true", f"store={store}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pd.read_parquet(store / "runs.parquet")
    assert sorted(runs["lr"]) == [1e-3, 3e-2] and runs["packed"].all()
    [plan] = (store / "sweeps").glob("*.json")
    assert json.loads(plan.read_text())["packs"]  # the LRs travelled in the plan


# --- 2. the _target_ guard: an explicit allow-list ------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "suite.store.atomic_write",  # a suite function that replaces files
        "suite.plan.mark_ended",
        "suite.launch.cli.main",
        "variants.registry.register",
        "suite.launch.claims.Claim",  # a suite class, but not a config target
        "hydra.utils.instantiate",
        "hydra._internal.core_plugins.basic_launcher.BasicLauncher.__init__",
    ],
)
def test_only_the_configs_own_targets_are_allowed(target):
    refused(f"+hydra.callbacks.evil._target_={target}", match="_target_")


def test_a_preset_composing_suite_functions_runs_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    presets = tmp_path / "presets" / "sweep"
    presets.mkdir(parents=True)
    (presets / "shared.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tiny\nhydra:\n  callbacks:\n    wipe:\n"
        "      _target_: suite.store.Path.unlink\n"
        f"      self: {victim}\n"
    )
    result = run_suite(
        "+variant=preln", "sweep=shared", f"store={tmp_path / 's'}", "-cd", str(presets.parent)
    )
    assert result.returncode == 2 and "_target_" in result.stderr
    assert victim.read_text() == "keep me"


# --- 3. values the store cannot hold; a store one bad record cannot break --------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("seed=-1", "seed"),
        (f"seed={2**64}", "seed"),
        (f"optim.warmup_steps={2**63}", "optim.warmup_steps"),
        (f"train.steps={2**63}", "train.steps"),
    ],
)
def test_a_value_the_store_cannot_hold_is_refused(override, key):
    refused(override, match=f"^{key}: ")


def _small_store(tmp_path: Path) -> Path:
    return Path(shutil.copytree(STORE_V0_2_0, tmp_path / "store"))


def test_a_record_with_a_wrong_typed_field_is_flagged_and_the_rest_collected(tmp_path):
    store = _small_store(tmp_path)
    before = collect(store)  # the last good table
    path = next(store.glob("cells/*/record.json"))
    record = json.loads(path.read_text())
    record["depth"] = "six"
    record["lr"] = [1, 2]
    path.write_text(json.dumps(record))
    runs = collect(store)  # did crash writing Parquet
    assert len(runs) == len(before)
    row = runs.set_index("cell_id").loc[path.parent.name]
    assert bool(row["record_unreadable"]) and row["depth"] == record["config"]["model"]["depth"]
    assert path.parent.name in report_text(runs)
    assert finished_record(store, path.parent.name) is None  # resume trains it again


def test_an_undeclared_field_of_mixed_types_is_kept_as_text(tmp_path):
    store = _small_store(tmp_path)
    for index, path in enumerate(sorted(store.glob("cells/*/record.json"))[:2]):
        record = json.loads(path.read_text())
        record["plugin_note"] = [1, "x"] if index else 2**70
        path.write_text(json.dumps(record))
    runs = collect(store)
    assert (store / "runs.parquet").exists()
    assert runs["plugin_note"].dropna().map(type).eq(str).all()


def test_a_sweep_whose_collect_fails_exits_non_zero_saying_why(tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    import suite.analyze.collect

    def broken(*args, **kwargs):
        raise ValueError("simulated")

    monkeypatch.setattr(suite.analyze.collect, "collect", broken)
    config = OmegaConf.create(
        {"store": str(tmp_path), "verdict": {}, "hydra": {"sweep": {"dir": str(tmp_path)}}}
    )
    with pytest.raises(SystemExit) as stop:
        suite.analyze.collect.CollectCallback().on_multirun_end(config)
    assert stop.value.code == 1
    assert "collect failed: ValueError: simulated" in capsys.readouterr().err


def test_a_sweep_whose_cells_left_nothing_exits_non_zero(tmp_path, capsys):
    from omegaconf import OmegaConf

    import suite.analyze.collect

    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    (job / suite.analyze.collect.CELL_POINTER).write_text("preln-L2-lr0.001-s0-0123456789")
    config = OmegaConf.create(
        {"store": str(tmp_path / "s"), "verdict": {}, "hydra": {"sweep": {"dir": str(job.parent)}}}
    )
    with pytest.raises(SystemExit) as stop:
        suite.analyze.collect.CollectCallback().on_multirun_end(config)
    assert stop.value.code == 1 and "every cell failed to write" in capsys.readouterr().out


# --- 5. memory: the vocabulary and the activations count ------------------------------------


def test_memory_counts_the_vocabulary_and_the_activations():
    cell = make_cell(width=64, depth=2)
    small, large = memory_need(cell, 256), memory_need(cell, 65536)
    assert large.state_bytes - small.state_bytes == 16 * (65536 - 256) * 64  # tied head
    cell.model.tie_embeddings = False
    assert memory_need(cell, 65536).state_bytes - large.state_bytes == 16 * 65536 * 64
    longer = make_cell(width=64, depth=2)
    longer.model.seq_len *= 4
    assert memory_need(longer, 256).activation_bytes > 4 * small.activation_bytes  # T² scores
    assert memory_need(cell, 256, copies=3).total == pytest.approx(3 * memory_need(cell, 256).total)


def test_a_sequence_too_long_for_memory_is_refused_before_anything_is_allocated():
    refused("data.max_bytes=4000000", "model.seq_len=200000", match=r"^model: a cell needs")


@pytest.mark.parametrize("vocab", [2**16 + 1, 10**9])
def test_a_vocabulary_beyond_uint16_is_refused(tmp_path, vocab):
    tokens = tmp_path / "tokens.bin"
    tokens.write_bytes(bytes(range(256)) * 2000)
    refused(
        "data.source=tokens",
        f"data.path={tokens}",
        f"data.vocab_size={vocab}",
        match=r"^data\.vocab_size: ",
    )


# --- 6. Hydra's own namespace -------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["hydra.job.chdir=true"], "hydra.job.chdir"),
        (["hydra.sweep.dir="], "hydra.sweep.dir"),
        (["hydra.sweep.dir={file}/x"], "hydra.sweep.dir"),
        (["hydra/launcher=per_core", "hydra.launcher.n_jobs=0"], "hydra.launcher.n_jobs"),
    ],
)
def test_hydra_settings_that_lose_results_are_refused(tmp_path, overrides, key):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused(*[o.format(file=blocker) for o in overrides], match=f"^{key}: ")


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="SLURM is installed here")
def test_the_slurm_launcher_without_slurm_is_refused():
    refused("hydra/launcher=slurm", match=r"^hydra/launcher=slurm: no SLURM here")


@pytest.mark.parametrize("flag", [["--config-name", "other"], ["-cp", "elsewhere"]])
def test_another_config_than_the_suites_is_refused(tmp_path, flag):
    result = run_suite(*TINY, f"store={tmp_path}", *flag)
    assert result.returncode == 2 and "--config-dir" in result.stderr
    assert not (tmp_path / "cells").exists()


def test_chdir_true_on_the_command_line_writes_nothing(tmp_path):
    result = run_suite(*TINY, "store=relative-store", "hydra.job.chdir=true", "train.steps=2")
    assert result.returncode == 2 and "hydra.job.chdir" in result.stderr
    assert not (REPO / "relative-store").exists()


# --- 7. a suspended owner keeps its claim; a taken-over owner writes nothing -----------------


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_a_suspended_owner_on_this_host_keeps_its_claim(tmp_path):
    owner = _sleeper()
    try:
        os.kill(owner.pid, signal.SIGSTOP)
        stamp = process_stamp(owner.pid)
        folder = cell_dir(tmp_path, "c")
        folder.mkdir(parents=True)
        old = time.time() - 10 * claims.STALE_AFTER_S  # no heartbeat for a long time
        (folder / CLAIM).write_text(json.dumps({"token": "t", **stamp, "heartbeat": old}))
        assert isinstance(claim_cell(tmp_path, "c"), dict)  # not taken
    finally:
        owner.kill()
        owner.wait()
    assert isinstance(taken := claim_cell(tmp_path, "c"), Claim)  # its owner is gone now
    taken.release()


def test_a_reused_pid_does_not_keep_a_dead_owners_claim(tmp_path):
    stamp = {**process_stamp(), "pid_started": (process_stamp()["pid_started"] or 0) + 1}
    assert process_alive(stamp) is False
    folder = cell_dir(tmp_path, "c")
    folder.mkdir(parents=True)
    (folder / CLAIM).write_text(json.dumps({"token": "t", **stamp, "heartbeat": time.time()}))
    claim = claim_cell(tmp_path, "c")
    assert isinstance(claim, Claim)
    claim.release()


def test_an_owner_whose_claim_was_taken_writes_nothing(tmp_path, caplog):
    from suite.launch.cli import _keep, _write_held
    from suite.store import write_started

    claim = claim_cell(tmp_path, "c")
    (cell_dir(tmp_path, "c") / CLAIM).write_text(json.dumps({"token": "someone else"}))
    with pytest.raises(ClaimLost):
        _write_held(claim, write_started, tmp_path, "c", {})
    plan = SweepPlan(command=[], resume=True, launcher="basic", jobs=[["c"]])
    cell = make_cell()
    cell.store = str(tmp_path)
    with caplog.at_level(logging.ERROR, logger="suite"):
        status = _keep(cell, {"cell_id": "c", "status": "ok"}, [], "cell 1/1", None, claim, plan)
    assert status == "claimed" and "result is dropped" in caplog.text
    assert not (cell_dir(tmp_path, "c") / "record.json").exists()
    claim.release()


# --- 8. damaged curves ----------------------------------------------------------------------


def _tiny_store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    result = run_suite(*TINY, "model.depth=2", "train.steps=20", f"store={store}")
    assert result.returncode == 0, result.stderr[-3000:]
    return store


@pytest.mark.slow
def test_a_curve_of_the_wrong_length_is_retrained_as_collect_says(tmp_path):
    store = _tiny_store(tmp_path)
    record_path = next(store.glob("cells/*/record.json"))
    record = json.loads(record_path.read_text())
    curve = record_path.parent / record["curve_file"]
    pd.read_parquet(curve).iloc[:5].to_parquet(curve, index=False)
    runs = collect(store, write=False)
    assert "re-trains them" in report_text(runs)
    assert finished_record(store, record["cell_id"]) is None
    again = run_suite(*TINY, "model.depth=2", "train.steps=20", f"store={store}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"done: {record['cell_id']}" in again.stdout and again.stdout.count("done:") == 1


@pytest.mark.slow
def test_the_report_leaves_out_and_names_a_curve_without_its_step_column(tmp_path):
    store = _tiny_store(tmp_path)
    damaged = []
    for record_path in store.glob("cells/*/record.json"):
        record = json.loads(record_path.read_text())
        curve = record_path.parent / record["curve_file"]
        pd.read_parquet(curve).drop(columns="step").to_parquet(curve, index=False)
        damaged.append(record["cell_id"])
    out = tmp_path / "report.html"
    result = subprocess.run(
        [sys.executable, "-m", "suite.report", "--store", str(store), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    html = out.read_text()
    assert "whose stored curve is missing or damaged" in html
    assert any(cell_id in html for cell_id in damaged)


# --- 9. values preflight refuses --------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optim.warmup_steps=500", "train.steps=100"], r"optim\.warmup_steps"),
        (["+variant=[preln]"], "variant"),
        (["variant.name=postln"], r"variant\.name"),
    ],
)
def test_values_that_trained_something_else_are_refused(overrides, key):
    refused(*overrides, match=f"^{key}: ")


def test_a_preset_setting_variant_name_never_trains_another_variant(tmp_path):
    presets = tmp_path / "sweep"
    presets.mkdir()
    (presets / "other.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tiny\nvariant:\n  name: postln\n"
    )
    overrides = [*TINY[:1], "sweep=other", f"hydra.searchpath=['file://{tmp_path}']"]
    assert {cell.variant for _, cell in preflight(overrides)} == {"preln"}


def test_a_broken_yaml_preset_is_a_one_line_error(tmp_path):
    presets = tmp_path / "sweep"
    presets.mkdir()
    (presets / "broken.yaml").write_text("# @package _global_\ntrain: {steps: [\n")
    result = run_suite("+variant=preln", "sweep=broken", "--config-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("config error: a config file is not valid YAML")
    assert len(result.stderr.strip().splitlines()) <= 2


def test_a_presets_store_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    presets = tmp_path / "presets" / "sweep"
    presets.mkdir(parents=True)
    (presets / "home.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tiny\nstore: ~/results\n"
    )
    overrides = ["+variant=preln", "sweep=home", f"hydra.searchpath=['file://{presets.parent}']"]
    [(_, cell), *_] = preflight(overrides)
    assert cell.store == str(home / "results")  # it was checked as home's, written to ./~/
    from hydra import compose, initialize_config_dir

    from suite.launch.cell import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        hydra_cfg = compose("config", overrides, return_hydra_config=True)
    assert str(hydra_cfg.hydra.sweep.dir).startswith(str(home / "results"))


# --- 10. write failures are one line, and nothing is lost -------------------------------------


def test_a_full_disk_when_writing_a_record_is_one_line(tmp_path, monkeypatch, caplog):
    import suite.launch.cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(suite.launch.cli, "write_cell", full)
    claim = claim_cell(tmp_path, "c")
    plan = SweepPlan(command=[], resume=True, launcher="basic", jobs=[["c"]])
    cell = make_cell()
    cell.store = str(tmp_path)
    from omegaconf import OmegaConf

    job_config = OmegaConf.create({"launcher": {}})
    monkeypatch.setattr(suite.launch.cli.HydraConfig, "get", staticmethod(lambda: job_config))
    record = {"cell_id": "c", "status": "ok"}
    with caplog.at_level(logging.ERROR, logger="suite"):
        status = suite.launch.cli._keep(cell, record, [], "cell 1/1", None, claim, plan)
    claim.release()
    assert status == "error" and "No space left on device" in caplog.text


def test_collect_on_a_store_it_cannot_write_still_shows_the_table(tmp_path, monkeypatch, caplog):
    import suite.analyze.collect

    store = _small_store(tmp_path)

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(suite.analyze.collect, "write_table", read_only)
    with caplog.at_level(logging.WARNING):
        runs = collect(store)
    assert len(runs) and "cannot write the collected table" in caplog.text


def test_report_out_naming_a_folder_is_one_line_and_leaves_nothing(tmp_path):
    store = _small_store(tmp_path)
    folder = tmp_path / "reports"
    folder.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "suite.report", "--store", str(store), "--out", str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "is a folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("*.tmp"))


def test_watch_ends_when_a_dead_sweeps_pid_was_reused(tmp_path):
    from suite.analyze.progress import read_plans, sweep_over, sweep_progress

    plan = SweepPlan(command=[], resume=True, launcher="basic", jobs=[["a"]])
    plan.pid_started = (plan.pid_started or 0) + 1  # this pid, but another process's start
    plan.write(tmp_path)
    [(_, data)] = read_plans(tmp_path)
    assert sweep_over(tmp_path, data, sweep_progress(tmp_path, data))


@pytest.mark.slow
def test_the_plans_jobs_are_hydras_jobs_in_hydras_order(tmp_path):
    """A command-line value of a preset's swept key keeps the key's place in Hydra's grid: the
    plan's job k is the job Hydra numbers k (what a job reads of the plan relies on it)."""
    store = tmp_path / "store"
    result = run_suite(
        "+variant=postln,preln",
        "sweep=tiny",
        "model.depth=4,2",
        "train.steps=3",
        "hydra/launcher=basic",
        f"store={store}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [plan] = (store / "sweeps").glob("*.json")
    jobs = json.loads(plan.read_text())["jobs"]
    [sweep_dir] = {path.parent.parent for path in store.glob("hydra/*/*/0/cell_id")}
    pointers = [(sweep_dir / str(k) / "cell_id").read_text().split() for k in range(len(jobs))]
    assert pointers == jobs and len(jobs) == 8


# --- the second hostile pass over the fixes above ------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("~hydra.callbacks.collect", "hydra.callbacks.collect"),
        (
            "hydra.callbacks.collect._target_=hydra._internal.core_plugins.basic_sweeper."
            "BasicSweeper",
            "hydra.callbacks.collect",
        ),
        ("hydra.sweep.subdir=same", "hydra.sweep.subdir"),
        ("hydra.sweep.subdir=${hydra.job.num}/../..", "hydra.sweep.subdir"),
        ("hydra.job_logging.root.level=VERBOSE", "hydra.job_logging.root.level"),
        ("+hydra.sweeper.params.seed=-1,0", "hydra.sweeper.params.seed"),
        ("seed=${now:%S}", "seed"),
    ],
)
def test_hydra_settings_the_summary_and_exit_code_rely_on_are_kept(override, key):
    refused(override, match=f"^{key}: ")


@pytest.mark.parametrize(
    "handler, key",
    [
        ("{'()': suite.store.write_cell, store: /tmp/x}", r"\(\)"),
        ("{class: suite.store.write_started}", "class"),
        ("{class: logging.FileHandler, filename: /tmp/x, mode: w}", "mode"),
        ("{class: logging.StreamHandler, stream: 'ext://os.devnull'}", "stream"),
    ],
)
def test_a_logging_preset_builds_only_pythons_own_handlers(tmp_path, handler, key):
    presets = tmp_path / "hydra" / "job_logging"
    presets.mkdir(parents=True)
    (presets / "evil.yaml").write_text(
        f"version: 1\nhandlers:\n  pwn: {handler}\nroot: {{level: INFO, handlers: [pwn]}}\n"
    )
    with pytest.raises(ConfigError, match=rf"^hydra\.job_logging\.handlers\.pwn\.{key}"):
        preflight([*TINY, "hydra/job_logging=evil", f"hydra.searchpath=['file://{tmp_path}']"])


def test_a_sweep_dir_holding_an_earlier_sweep_is_refused(tmp_path):
    (tmp_path / "fixed" / "0").mkdir(parents=True)
    refused(f"hydra.sweep.dir={tmp_path / 'fixed'}", match=r"^hydra\.sweep\.dir: .* earlier sweep")


def test_preflight_resolves_values_with_the_jobs_environment():
    cells = preflight([*TINY, "+hydra.job.env_set.W=48", "model.width=${oc.env:W,32}"])
    assert {cell.model.width for _, cell in cells} == {48}  # what the job will train


def test_a_mixed_packed_and_unpacked_grid_is_refused(tmp_path):
    result = run_suite(*TINY, "train.pack_lr=true,false", f"store={tmp_path}")
    assert result.returncode == 2 and "train.pack_lr: a sweep packs all its cells" in result.stderr
    assert not (tmp_path / "cells").exists()


def test_a_pack_member_finished_meanwhile_is_not_trained_again(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    import suite.launch.cli
    from suite.store import write_cell

    cells = [make_cell(lr=lr, steps=5) for lr in (1e-3, 3e-3)]
    for cell in cells:
        cell.store, cell.train.pack_lr = str(tmp_path), True
    done = {"cell_id": cells[0].cell_id(), "status": "ok", "steps_completed": 0,
            "config": __import__("dataclasses").asdict(cells[0])}  # fmt: skip
    write_cell(tmp_path, done, [])  # another sweep finished member 0 after the first look
    job_config = OmegaConf.create({"launcher": {}})
    monkeypatch.setattr(suite.launch.cli.HydraConfig, "get", staticmethod(lambda: job_config))
    plan = SweepPlan(command=[], resume=True, launcher="basic", jobs=[[c.cell_id() for c in cells]])
    status = suite.launch.cli._claim_and_train_pack(cells, tmp_path, "pack 1/1", None, plan)
    assert status == "ok"
    record = json.loads((cell_dir(tmp_path, cells[0].cell_id()) / "record.json").read_text())
    assert record == {**done, "curve_file": record["curve_file"]}  # untouched
    assert (cell_dir(tmp_path, cells[1].cell_id()) / "record.json").exists()


def test_values_parquet_cannot_hold_are_kept_as_text(tmp_path):
    store = _small_store(tmp_path)
    paths = sorted(store.glob("cells/*/record.json"))
    first, second = (json.loads(path.read_text()) for path in paths[:2])
    first["zzz"] = {}  # an empty mapping: no Parquet struct type
    second["hostname"] = "\ud800"  # a lone surrogate: not encodable
    second["\ud800key"] = 1
    paths[0].write_text(json.dumps(first))
    paths[1].write_text(json.dumps(second))
    runs = collect(store)
    assert (store / "runs.parquet").exists() and len(runs) == len(paths)


def test_a_damaged_pid_is_a_dead_owner_not_a_traceback(tmp_path):
    huge = {"hostname": process_stamp()["hostname"], "pid": 10**23}
    assert process_alive(huge) is False
    folder = cell_dir(tmp_path, "c")
    folder.mkdir(parents=True)
    (folder / CLAIM).write_text(json.dumps({"token": "t", **huge, "heartbeat": time.time()}))
    claim = claim_cell(tmp_path, "c")
    assert isinstance(claim, Claim)
    claim.release()


def test_a_curve_whose_losses_are_not_numbers_is_trained_again(tmp_path):
    store = _small_store(tmp_path)
    record_path = next(store.glob("cells/*/record.json"))
    record = json.loads(record_path.read_text())
    assert finished_record(store, record["cell_id"]) is not None
    curve = record_path.parent / (record.get("curve_file") or "curve.parquet")
    frame = pd.read_parquet(curve)
    frame.assign(loss=frame["loss"].astype(str)).to_parquet(curve, index=False)
    assert finished_record(store, record["cell_id"]) is None


def test_ending_a_plan_on_a_full_disk_is_quiet(tmp_path, monkeypatch):
    import suite.plan

    path = SweepPlan(command=[], resume=True, launcher="basic", jobs=[["a"]]).write(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(suite.plan, "atomic_write", full)
    suite.plan.mark_ended(path)  # no exception


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe\x00bad", "not valid YAML"),
        (b"# @package _global_\ndefaults:\n  - loop\n", "includes itself"),
    ],
)
def test_an_unreadable_preset_is_a_one_line_error(tmp_path, content, message):
    presets = tmp_path / "sweep"
    presets.mkdir()
    (presets / "loop.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        preflight(["+variant=preln", "sweep=loop", f"hydra.searchpath=['file://{tmp_path}']"])


def test_a_sweeper_parameter_that_does_not_resolve_is_a_config_error():
    with pytest.raises(ConfigError):
        preflight([*TINY, "+hydra.sweeper.params={seed:${oc.env:NO_SUCH_VARIABLE_HERE}}"])


def test_a_probe_batch_too_large_for_memory_is_refused():
    refused("diagnostics.probe_batch=100000000", match=r"^model: a cell needs")
