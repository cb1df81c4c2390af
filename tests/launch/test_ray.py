"""The Ray launcher on a real Ray cluster (scripts/ray_cluster.sh: a head and a second node, both
started with `ray start`): a sweep through `hydra/launcher=ray_cluster` gives the basic launcher's
records and runs on both nodes, resumes across submissions, and a cell whose Ray worker process is
killed (SIGKILL) is not lost: Ray runs its task again, and the retry takes over the dead worker's
claim and trains the cell to the end. With Ray's retries off the killed cell is left
`interrupted`, and so it is when the sweep's own process is killed (Ray then stops its tasks);
either way the next submission trains it.

Opt-in: these tests need the ray extra (`pip install -e '.[ray]'`) and start a Ray cluster, so they
run only with SUITE_RAY=1 (`.ci/run` sets it, and `make test` then installs the extra); otherwise
they are skipped. About two minutes on two cores.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, resubmit_with_a_third_lr, run_suite, start_suite

from suite.analyze.collect import collect

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        os.environ.get("SUITE_RAY") != "1",
        reason="Ray tests need the ray extra and start a Ray cluster; opt in with SUITE_RAY=1",
    ),
]

CLUSTER = REPO / "scripts" / "ray_cluster.sh"
STATE = Path(os.environ.get("SUITE_RAY_STATE", "/tmp/suite-ray"))
RAY = ("hydra/launcher=ray_cluster",)  # one CPU and no GPU per cell; Ray's retries on (3)
SWEEP = ("+variant=postln,preln", "sweep=tiny", "train.steps=20", "model.depth=2")


@pytest.fixture(scope="module")
def cluster():
    """The cluster for this module: started if it is not up, and then stopped again after."""
    missing = [m for m in ("ray", "hydra_plugins.hydra_ray_launcher") if not _importable(m)]
    if missing:
        pytest.skip(
            f"SUITE_RAY=1 but {', '.join(missing)} cannot be imported: the ray extra is "
            "not installed (pip install -e '.[ray]'; `make test` installs it)"
        )
    env = {
        **os.environ,
        "SUITE_RAY_STATE": str(STATE),
        "SUITE_RAY_NODES": "2",
        "SUITE_RAY_CMD": str(Path(sys.executable).parent / "ray"),  # this venv's Ray
    }
    export = subprocess.run([CLUSTER, "env"], env=env, capture_output=True, text=True, check=True)
    address = export.stdout.strip().removeprefix("export RAY_ADDRESS=")
    already_up = subprocess.run([CLUSTER, "status"], env=env, capture_output=True).returncode == 0
    start = time.monotonic()
    up = subprocess.run([CLUSTER, "up"], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    print(f"cluster up in {time.monotonic() - start:.1f} s: {up.stderr.strip()}")
    # Every log line of every cell reaches the sweep's output (Ray folds similar lines otherwise).
    yield {"RAY_ADDRESS": address, "RAY_DEDUP_LOGS": "0"}
    if not already_up:
        subprocess.run([CLUSTER, "down"], env=env, check=True, timeout=120)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def cells_per_node(cell_ids: list[str]) -> dict[str, set[str]]:
    """Which cells each node's Ray workers trained, from the workers' own log files (a cell's
    job logs "cell 1/4: <cell id>" to stdout, which Ray keeps per node and worker)."""
    found = {}
    for node in ("head", "node2"):
        text = "".join(
            p.read_text(errors="replace")
            for p in (STATE / node).glob("session_*/logs/worker-*.out")
        )
        found[node] = {cell for cell in cell_ids if f": {cell}" in text}
    return found


@pytest.fixture(scope="module")
def swept(cluster, tmp_path_factory):
    """The same small sweep through the basic launcher and through Ray."""
    root = tmp_path_factory.mktemp("ray")
    stores, outputs = {}, {}
    for name, launcher in [("basic", ()), ("ray", RAY)]:
        stores[name] = root / name
        start = time.monotonic()
        result = run_suite(
            *SWEEP, "optim.lr=1e-3,3e-2", f"store={stores[name]}", *launcher, env=cluster
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        outputs[name] = result.stdout + result.stderr
        print(f"{name}: 4 cells in {time.monotonic() - start:.1f} s")
    return stores, outputs


def test_a_ray_sweep_gives_the_basic_launchers_records_on_both_nodes(swept, cluster):
    stores, outputs = swept
    basic = pd.read_parquet(stores["basic"] / "runs.parquet").set_index("cell_id")
    other = pd.read_parquet(stores["ray"] / "runs.parquet").set_index("cell_id")
    assert sorted(basic.index) == sorted(other.index) and len(basic) == 4
    assert (other["status"] == "ok").all()
    pd.testing.assert_series_equal(basic["verdict"], other.loc[basic.index, "verdict"])
    pd.testing.assert_series_equal(
        basic["final_loss"], other.loc[basic.index, "final_loss"], rtol=1e-5
    )
    # It really went through the running cluster (not a Ray the launcher started for itself)...
    address = cluster["RAY_ADDRESS"]
    assert f"Connecting to existing Ray cluster at address: {address}" in outputs["ray"]
    assert "Ray Launcher is launching 4 jobs" in outputs["ray"]
    # ... and both nodes trained cells: one CPU each, so four cells cannot fit on one.
    nodes = cells_per_node(list(basic.index))
    assert nodes["head"] and nodes["node2"], nodes
    assert nodes["head"] | nodes["node2"] == set(basic.index)


def test_a_second_submission_trains_only_the_new_cells(swept, cluster, tmp_path):
    stores, _ = swept
    resubmit_with_a_third_lr(stores["ray"], tmp_path / "store", SWEEP, RAY, env=cluster)


# One cell, long enough to be killed while it trains (a partial curve every 50 steps).
STEPS = 800
ONE_CELL = ("+variant=preln", *SWEEP[1:], "optim.lr=1e-3", f"train.steps={STEPS}")


def start_one_cell(store: Path, *args: str, cluster: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **cluster}
    return start_suite(*ONE_CELL, f"store={store}", *RAY, *args, env=env)


def training_worker(store: Path, process: subprocess.Popen) -> int:
    """Wait until the sweep's one cell is training (claimed, first partial curve written) and
    return the pid of the Ray worker process that trains it."""
    deadline = time.monotonic() + 120
    while not list(store.glob("cells/*/curve.partial.parquet")):
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no cell started training within 120 s"
        time.sleep(0.1)
    [claim] = store.glob("cells/*/claim.json")
    pid = int(pd.read_json(claim, typ="series")["pid"])
    # The claim's owner is a Ray worker (its process title names the task) under a raylet.
    assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_run_job")
    parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    assert "raylet" in Path(f"/proc/{parent}/cmdline").read_text(errors="replace")
    return pid


def gone(pid: int) -> bool:
    """The process has exited and been reaped: neither running nor a zombie."""
    return not Path(f"/proc/{pid}").exists()


def finish(process: subprocess.Popen) -> str:
    try:
        return process.communicate(timeout=180)[0]
    finally:
        if process.poll() is None:
            process.kill()


def assert_interrupted_then_finished_by_the_next_submission(store: Path, cluster: dict) -> None:
    """The cell is left as a killed run is (its running marker and partial curve, no record),
    `collect` lists it interrupted, and the same command again trains it to the end."""
    [cell] = store.glob("cells/*")
    assert not (cell / "record.json").exists(), f"the cell finished first: more than {STEPS} steps"
    assert (cell / "running.json").exists() and (cell / "curve.partial.parquet").exists()
    runs = collect(store)
    assert runs["status"].tolist() == ["interrupted"], runs["status"]
    # A SIGKILLed worker leaves its claim; one that Ray stops for its dead owner releases it.
    claimed = (cell / "claim.json").exists()
    result = run_suite(*ONE_CELL, f"store={store}", *RAY, env=cluster)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    if claimed:  # the dead worker's claim is stale (its pid is gone), so it is taken over
        assert f"took over a stale claim on {cell.name}" in result.stdout, result.stdout[-3000:]
    runs = collect(store)
    assert runs["status"].tolist() == ["ok"] and runs["steps"].tolist() == [STEPS]
    assert not (cell / "running.json").exists() and not (cell / "claim.json").exists()


def test_a_killed_worker_is_retried_by_ray_and_the_retry_finishes_the_cell(cluster, tmp_path):
    store = tmp_path / "store"
    start = time.monotonic()
    process = start_one_cell(store, cluster=cluster)
    try:
        pid = training_worker(store, process)
        os.kill(pid, signal.SIGKILL)  # the worker process dies, as with a crash or a lost node
        killed = time.monotonic()
    finally:
        output = finish(process)
    ended = time.monotonic() - killed
    print(f"worker killed {killed - start:.1f} s in; sweep ended {ended:.1f} s after the kill")
    # Ray saw its worker die and ran the task again (max_retries, 3 by default); the retry found
    # the dead worker's claim stale and took it over; the sweep then succeeded.
    assert process.returncode == 0, output[-3000:]
    assert "retries remaining, so the task will be retried" in output, output[-3000:]
    [cell] = store.glob("cells/*")
    assert re.search(rf"took over a stale claim on {cell.name} \(\S+ pid {pid}\)", output)
    runs = collect(store)
    assert runs["status"].tolist() == ["ok"] and runs["steps"].tolist() == [STEPS]
    assert not (cell / "running.json").exists() and not (cell / "claim.json").exists()
    assert gone(pid), f"the killed worker {pid} is still there"


def test_with_retries_off_a_killed_worker_leaves_its_cell_interrupted_for_the_next_submission(
    cluster, tmp_path
):
    store = tmp_path / "store"
    process = start_one_cell(store, "hydra.launcher.ray.remote.max_retries=0", cluster=cluster)
    try:
        pid = training_worker(store, process)
        os.kill(pid, signal.SIGKILL)
    finally:
        output = finish(process)
    # The task fails for good: ray.get raises in the sweep's process, which exits non-zero.
    assert process.returncode != 0
    assert "WorkerCrashedError" in output, output[-3000:]
    assert gone(pid)
    assert_interrupted_then_finished_by_the_next_submission(store, cluster)


def test_killing_the_sweeps_process_stops_its_ray_tasks_and_the_next_submission_finishes_them(
    cluster, tmp_path
):
    """Unlike a SLURM job, a Ray task does not outlive the process that submitted it (its owner):
    when the sweep's own process is killed, Ray stops the worker training its cell."""
    store = tmp_path / "store"
    process = start_one_cell(store, cluster=cluster)
    try:
        pid = training_worker(store, process)
        process.kill()
        killed = time.monotonic()
        process.wait()
        while not gone(pid):
            assert time.monotonic() < killed + 60, f"Ray's worker {pid} outlived the sweep by 60 s"
            time.sleep(0.1)
    finally:
        finish(process)
    print(f"the cell's worker stopped {time.monotonic() - killed:.1f} s after the sweep was killed")
    assert_interrupted_then_finished_by_the_next_submission(store, cluster)
