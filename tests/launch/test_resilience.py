"""Nothing finished is ever lost or silently recomputed: resume, kill, errors, corrupt records,
concurrent writers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, fake_distribution, run_suite, start_suite

from suite.analyze.collect import collect

pytestmark = pytest.mark.slow

SMALL = ("+variant=preln", "sweep=tiny", "model.depth=2", "train.steps=20")


def records(store):
    return {p.parent.name: json.loads(p.read_text()) for p in store.glob("cells/*/record.json")}


def test_rerun_skips_finished_cells_and_a_changed_key_is_a_new_cell(tmp_path):
    first = run_suite(*SMALL, f"store={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    before = records(tmp_path)
    assert len(before) == 2

    again = run_suite(*SMALL, f"store={tmp_path}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("is already in the store; skipped") == 2
    assert not re.search(r"step +\d+/\d+", again.stdout + again.stderr)  # nothing trained
    assert "2 already in the store (resume=false re-runs them)" in again.stdout
    assert records(tmp_path) == before  # untouched

    changed = run_suite(*SMALL, "optim.warmup_steps=5", f"store={tmp_path}")
    assert changed.returncode == 0 and "skipped" not in changed.stdout
    assert len(records(tmp_path)) == 4  # new cells, never a stale hit

    forced = run_suite(*SMALL, "resume=false", f"store={tmp_path}")
    assert forced.returncode == 0 and "skipped" not in forced.stdout
    after = records(tmp_path)
    assert len(after) == 4
    for cell_id, record in before.items():
        assert after[cell_id]["started_at"] >= record["started_at"]
        assert after[cell_id]["final_loss"] == record["final_loss"]  # deterministic re-run


def test_sigkill_mid_cell_keeps_finished_cells_marks_the_killed_one_and_resumes(tmp_path):
    args = [
        "+variant=preln",
        "sweep=tiny",
        "model.depth=2",
        "train.steps=400",
        "train.flush_every=20",
        f"store={tmp_path}",
    ]
    process = start_suite(*args)
    in_second_cell = False
    for line in process.stdout:
        in_second_cell = in_second_cell or "cell 2/2:" in line
        if in_second_cell and "step  100/400" in line:
            process.kill()  # SIGKILL: no handler runs, nothing gets cleaned up
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    finished = records(tmp_path)
    assert len(finished) == 1 and next(iter(finished.values()))["status"] == "ok"
    killed = [p.parent for p in tmp_path.glob("cells/*/running.json")]
    assert len(killed) == 1
    partial = pd.read_parquet(killed[0] / "curve.partial.parquet")
    assert len(partial) >= 100  # the flushed part of the curve survived
    runs = collect(tmp_path)
    assert sorted(runs["status"]) == ["interrupted", "ok"]

    rerun = subprocess.run(
        [sys.executable, "-m", "suite", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("already in the store; skipped") == 1
    runs = collect(tmp_path)
    assert list(runs["status"]) == ["ok", "ok"]
    assert not list(tmp_path.glob("cells/*/running.json"))


RAISES_IN_TRAINING = """
    from dataclasses import dataclass
    import torch
    from variants import register
    from variants.preln import PreLN, PreLNWiring

    class Failing(PreLNWiring):
        def forward(self, x, attn, mlp):
            if torch.is_grad_enabled():
                raise RuntimeError("CUDA out of memory (simulated)")
            return super().forward(x, attn, mlp)

    @register("fails")
    @dataclass
    class Fails(PreLN):
        def wiring(self, width, n_layers, layer):
            return Failing(width, self.eps)
"""


def test_an_erroring_cell_is_recorded_the_sweep_goes_on_and_the_exit_code_says_so(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "fails-plugin", RAISES_IN_TRAINING)
    store = tmp_path / "store"
    result = run_suite(
        "+variant=fails,preln",
        "sweep=tiny",
        "model.depth=2",
        "train.steps=10",
        "optim.lr=1e-3",
        f"store={store}",
        env={"PYTHONPATH": str(site)},
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "1 cell(s) errored (traceback in their record.json):" in result.stdout
    runs = collect(store).set_index("variant")
    assert runs.loc["preln", "status"] == "ok"
    assert runs.loc["fails", "status"] == "error"
    assert "RuntimeError: CUDA out of memory (simulated)" in runs.loc["fails", "error"]


def test_a_truncated_record_keeps_its_last_collected_row_with_a_warning_naming_it(
    tiny_sweep, tmp_path, caplog
):
    import shutil

    store, _ = tiny_sweep
    copy = tmp_path / "store"
    shutil.copytree(store, copy)  # with the runs.parquet the sweep collected
    victim = sorted(copy.glob("cells/*/record.json"))[0]
    victim.write_text(victim.read_text()[:100])  # a record cut short, e.g. a full disk
    with caplog.at_level(logging.WARNING):
        runs = collect(copy)
    assert len(runs) == 8  # the table does not shrink
    row = runs.set_index("cell_id").loc[victim.parent.name]
    assert row["status"] == "ok" and row["record_unreadable"]
    assert f"unreadable record {victim}" in caplog.text


def test_two_workers_writing_one_store_at_once(tmp_path):
    command = [sys.executable, "-m", "suite", *SMALL, "resume=false", f"store={tmp_path}"]
    workers = [
        subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr[-2000:]
    runs = collect(tmp_path)
    assert len(runs) == 2 and (runs["status"] == "ok").all()
    assert not list(tmp_path.glob("cells/*/.*"))  # no stray temporary files
    stored = pd.read_parquet(tmp_path / "runs.parquet")
    lists = [c for c in runs.columns if c.endswith("_by_layer")]  # read back as arrays
    assert stored.drop(columns=lists).equals(runs.drop(columns=lists))
    for column in lists:
        assert [list(v) for v in stored[column]] == [list(v) for v in runs[column]]


WORKER_MARKS = ("popen_loky", "submitit.core._submit")  # loky's and submitit's job processes


def _worker_pids(root: int) -> set[int]:
    """The processes under ``root`` that run the launcher's jobs (not its helper processes)."""
    found, pending = set(), [root]
    while pending:
        pid = pending.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        pending += [int(child) for child in children]
        found |= {int(c) for c in children if any(m in _cmdline(int(c)) for m in WORKER_MARKS)}
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize(
    "launcher, kill_when",
    [
        # A loky worker that has no cell yet holds none; kill once both are training.
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], "all training"),
        # submitit hands every worker its cell at start: kill while they are still starting up.
        (["hydra/launcher=submitit_local"], "started"),
    ],
)
def test_killing_a_parallel_sweep_stops_its_workers_too(tmp_path, launcher, kill_when):
    args = ["+variant=preln", "sweep=tiny", "train.steps=5000", f"store={tmp_path}", *launcher]
    # A session of its own, so the test can clean up whatever is left.
    process = start_suite(*args, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            workers = _worker_pids(process.pid)
            training = len(list(tmp_path.glob("cells/*/running.json")))
            if len(workers) >= 2 and (kill_when == "started" or training >= len(workers)):
                break
            assert time.monotonic() < deadline, f"the sweep's workers never {kill_when}"
            time.sleep(0.2)
        process.kill()  # SIGKILL the main process only, as `kill -9 PID` does
        process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_cmdline(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_cmdline(pid) for pid in workers), "workers outlived the sweep"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
