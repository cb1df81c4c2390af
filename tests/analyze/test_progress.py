"""Progress of a running sweep (suite/analyze/progress.py, `python -m suite.collect --watch`):
each cell's state read from the store and the sweep's plan, the one-line summary, and the watch
loop."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
from helpers import REPO, run_suite

from suite.analyze.progress import (
    CellProgress,
    ProgressPrinter,
    cell_progress,
    is_over,
    progress_line,
    read_plans,
    sweep_over,
    sweep_progress,
    watch,
)
from suite.launch.claims import claim_cell
from suite.plan import SweepPlan, mark_ended
from suite.store import PARTIAL_CURVE, cell_dir, write_started

BEFORE = "2026-01-01T00:00:00+00:00"


def write_plan(store, cells: list[str], command: list[str], resume: bool):
    """A plan of one job per cell, as the sweep's main process writes it (this process's)."""
    plan = SweepPlan(command=command, resume=resume, launcher="basic", jobs=[[c] for c in cells])
    return plan.write(store)


def _record(store, cell_id, status="ok", started_at=None, verdict="converged"):
    folder = cell_dir(store, cell_id)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "cell_id": cell_id,
        "status": status,
        "verdict": verdict,
        "started_at": started_at or dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    (folder / "record.json").write_text(json.dumps(record))


def _started(store, cell_id, started_at=None, pid=None, steps=400):
    marker = {
        "cell_id": cell_id,
        "steps": steps,
        "pid": pid or os.getpid(),
        "hostname": socket.gethostname(),
        "started_at": started_at or dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    write_started(store, cell_id, marker)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_each_cell_state_is_read_from_the_store(tmp_path):
    store = tmp_path
    _record(store, "old-ok", started_at=BEFORE)
    _record(store, "old-error", status="error", started_at=BEFORE, verdict=None)
    _started(store, "old-interrupted", started_at=BEFORE)
    plan = json.loads(write_plan(store, CELLS, ["+variant=preln"], resume=True).read_text())
    _record(store, "new-ok", verdict="diverged")
    _record(store, "new-error", status="error", verdict=None)
    _started(store, "running")
    pd.DataFrame({"loss": [5.0, 4.0, 3.0]}).to_parquet(cell_dir(store, "running") / PARTIAL_CURVE)
    claim = claim_cell(store, "running")
    _started(store, "died", pid=_dead_pid())
    claim_cell(store, "died").release()  # no live claim left behind
    try:
        states = {cell.cell_id: cell for cell in sweep_progress(store, plan)}
    finally:
        claim.release()
    assert {cell_id: cell.state for cell_id, cell in states.items()} == {
        "old-ok": "done",  # kept by resume
        "old-error": "queued",  # resume trains it again
        "old-interrupted": "queued",
        "new-ok": "done",
        "new-error": "errored",
        "running": "running",
        "died": "interrupted",
        "never-started": "queued",
    }
    assert states["old-ok"].earlier and not states["new-ok"].earlier
    assert (states["running"].step, states["running"].steps) == (3, 400)
    assert f"pid {os.getpid()}" in states["running"].holder
    line = progress_line(list(states.values()), plan, time.time())
    assert line.startswith(
        "8 cells: 2 done (1 diverged, 1 from earlier runs), 1 errored, 1 running, "
        "1 interrupted, 3 queued"
    )
    assert "cells/h" in line and "left at that rate" in line
    assert not is_over(list(states.values()))


CELLS = [
    "old-ok",
    "old-error",
    "old-interrupted",
    "new-ok",
    "new-error",
    "running",
    "died",
    "never-started",
]


def test_without_resume_an_earlier_record_is_queued_for_retraining(tmp_path):
    _record(tmp_path, "old-ok", started_at=BEFORE)
    plan = json.loads(write_plan(tmp_path, ["old-ok"], [], resume=False).read_text())
    assert cell_progress(tmp_path, "old-ok", plan).state == "queued"


def test_a_plan_is_written_for_each_sweep_and_watch_shows_it_finished(tmp_path):
    result = run_suite(
        "+variant=preln",
        "sweep=tiny",
        "train.steps=5",
        "model.depth=2",
        "optim.lr=1e-3,3e-3",
        f"store={tmp_path}",
        "hydra/launcher=basic",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [(path, plan)] = read_plans(tmp_path)
    runs = pd.read_parquet(tmp_path / "runs.parquet")
    assert sorted(plan["cells"]) == sorted(runs["cell_id"]) and plan["resume"] is True
    assert "optim.lr=1e-3,3e-3" in plan["command"]
    watched = subprocess.run(
        [sys.executable, "-m", "suite.collect", "--store", str(tmp_path), "--watch"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert watched.returncode == 0, watched.stderr
    assert "2 cells: 2 done" in watched.stdout and path.stem in watched.stdout


def test_watch_refreshes_until_the_sweep_is_over(tmp_path):
    write_plan(tmp_path, ["a", "b"], ["+variant=preln"], resume=True)
    _record(tmp_path, "a")
    out, sleeps = io.StringIO(), []

    def sleep(seconds):  # the second cell finishes while watch waits
        sleeps.append(seconds)
        _record(tmp_path, "b", verdict="stalled")

    watch(tmp_path, every_s=7, out=out, sleep=sleep)
    text = out.getvalue()
    assert sleeps == [7]
    assert "2 cells: 1 done (1 converged), 1 queued" in text
    assert "2 cells: 2 done (1 converged, 1 stalled)" in text


def test_watch_stops_when_the_sweeps_process_is_gone(tmp_path):
    path = write_plan(tmp_path, ["a"], [], resume=True)
    plan = json.loads(path.read_text())
    path.write_text(json.dumps({**plan, "pid": _dead_pid()}))
    out = io.StringIO()
    watch(tmp_path, out=out, sleep=lambda _: pytest.fail("waited for a sweep that has ended"))
    assert "(ended)" in out.getvalue() and "1 queued" in out.getvalue()
    assert "left at that rate" not in out.getvalue()


def test_watch_keeps_watching_while_a_dead_sweeps_cells_still_train(tmp_path):
    """A cluster's jobs outlive the sweep's process (SLURM): while one of its cells is running,
    the sweep is not over."""
    path = write_plan(tmp_path, ["a", "b"], [], resume=True)
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": _dead_pid()}))
    _started(tmp_path, "a")
    claim = claim_cell(tmp_path, "a")
    out, sleeps = io.StringIO(), []

    def sleep(seconds):
        sleeps.append(seconds)
        _record(tmp_path, "a")
        claim.release()

    try:
        watch(tmp_path, out=out, sleep=sleep)
    finally:
        claim.release()
    assert len(sleeps) == 1 and "1 running" in out.getvalue()


def test_an_ended_sweep_is_not_shown_beside_a_running_one_and_its_rate_stops(tmp_path):
    old = write_plan(tmp_path, ["a"], ["old"], resume=True)
    mark_ended(old)
    plan = json.loads(old.read_text())
    assert _over(tmp_path, plan)
    started = dt.datetime.fromisoformat(plan["started_at"])
    ended = (started + dt.timedelta(hours=1)).isoformat()
    cells = [CellProgress("a", "done"), CellProgress("b", "queued")]
    line = progress_line(cells, {**plan, "ended_at": ended}, time.time() + 10 * 3600, over=True)
    assert "1.0 cells/h" in line and "left" not in line  # the hour it ran, not up to now


def test_a_quiet_sweep_from_another_host_is_over_after_five_minutes(tmp_path):
    path = write_plan(tmp_path, ["a"], [], resume=True)
    plan = {**json.loads(path.read_text()), "hostname": "elsewhere"}
    assert not _over(tmp_path, plan)  # just started: its jobs may be queued on the cluster
    long_ago = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=6)).isoformat()
    assert _over(tmp_path, {**plan, "started_at": long_ago})


def test_damaged_cell_files_do_not_stop_the_watcher(tmp_path):
    plan = json.loads(write_plan(tmp_path, ["a", "b"], [], resume=True).read_text())
    _started(tmp_path, "a")
    marker = cell_dir(tmp_path, "a") / "running.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "started_at": 5, "steps": "x"}))
    claim = claim_cell(tmp_path, "a")
    (cell_dir(tmp_path, "b")).mkdir(parents=True)
    (cell_dir(tmp_path, "b") / "record.json").write_text("{not json")
    try:
        states = [cell.state for cell in sweep_progress(tmp_path, plan)]
    finally:
        claim.release()
    assert states == ["running", "queued"]


def _over(store, plan):
    return sweep_over(store, plan, sweep_progress(store, plan))


def test_watch_on_a_store_without_sweeps_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no sweep has been started"):
        watch(tmp_path, out=io.StringIO())


def test_the_cluster_progress_printer_prints_lines(tmp_path, capsys):
    path = write_plan(tmp_path, ["a", "b"], [], resume=True)
    _record(tmp_path, "a")
    printer = ProgressPrinter([path], every_s=0.05)
    printer.start()
    time.sleep(0.5)
    printer.stop()
    assert "progress: 2 cells: 1 done (1 converged), 1 queued" in capsys.readouterr().out


def test_a_damaged_plan_is_skipped_not_fatal(tmp_path):
    write_plan(tmp_path, ["a"], [], resume=True)
    (tmp_path / "sweeps" / "0-truncated.json").write_text('{"cells": ["a"')
    (tmp_path / "sweeps" / "1-no-start.json").write_text('{"cells": ["a"]}')
    (tmp_path / "sweeps" / "2-bad-cells.json").write_text(
        '{"cells": "a", "started_at": "2026-01-01T00:00:00+00:00"}'
    )
    assert len(read_plans(tmp_path)) == 1


def test_the_collect_callback_still_pickles_while_it_prints_progress(tmp_path, monkeypatch):
    """Cluster launchers (submitit, Ray) pickle Hydra's callbacks with every job."""
    import cloudpickle
    from omegaconf import OmegaConf

    from suite.analyze.collect import CollectCallback
    from suite.launch.launchers import LAUNCHERS

    monkeypatch.setenv("SUITE_SWEEP_PLANS", str(write_plan(tmp_path, ["a"], [], resume=True)))
    config = OmegaConf.create(
        {
            "progress_every": 60,
            "hydra": {
                "launcher": {"_target_": LAUNCHERS["slurm"].target},
                "runtime": {"choices": {"hydra/launcher": "slurm"}},
            },
        }
    )
    callback = CollectCallback()
    callback.on_multirun_start(config)
    try:
        assert callback._progress is not None  # a cluster launcher: the printer runs
        assert isinstance(cloudpickle.loads(cloudpickle.dumps(callback)), CollectCallback)
    finally:
        callback._progress.stop()


def test_the_plan_says_resume_as_the_jobs_compose_it(tmp_path):
    """A preset (here one of the user's own, in a config dir) that turns resume off: its cells
    will be trained again, so the watch must not show their earlier records as done."""
    presets = tmp_path / "conf" / "sweep"
    presets.mkdir(parents=True)
    (presets / "again.yaml").write_text("# @package _global_\ndefaults: [tiny]\nresume: false\n")
    args = ("+variant=preln", "sweep=again", "model.depth=2", "optim.lr=1e-3", "train.steps=2")
    for store, extra, resumes in [("off", (), False), ("on", ("resume=true",), True)]:
        result = run_suite(
            "--config-dir", str(tmp_path / "conf"), *args, *extra, f"store={tmp_path / store}"
        )
        assert result.returncode == 0, result.stderr[-3000:]
        [(_, plan)] = read_plans(tmp_path / store)
        assert plan["resume"] is resumes


def test_a_cell_two_jobs_name_counts_once(tmp_path):
    """A recipe sweep over a variant whose recipe adds nothing names its cell in two jobs."""
    plan = SweepPlan(command=[], resume=True, launcher="basic", jobs=[["a"], ["b"], ["a"]])
    assert plan.cells == ["a", "b"]
    [(_, data)] = read_plans(tmp_path) if plan.write(tmp_path) else []
    assert len(sweep_progress(tmp_path, data)) == 2
