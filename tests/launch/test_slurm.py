"""The SLURM launcher on a real one-node SLURM cluster (scripts/slurm_cluster.sh): a sweep through
`hydra/launcher=slurm` gives the basic launcher's records, resumes across submissions, and a
cancelled job (`scancel`) leaves its cell `interrupted` for the next submission to finish.

Opt-in: these tests install (root + apt) and start system daemons, so they run only with
SUITE_SLURM=1 (`.ci/run` sets it); otherwise they are skipped. About two minutes on two cores.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, resubmit_with_a_third_lr, run_suite, start_suite

from suite.analyze.collect import collect

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        os.environ.get("SUITE_SLURM") != "1",
        reason="SLURM tests start a real cluster (root + apt); opt in with SUITE_SLURM=1",
    ),
]

CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
STATE = Path(os.environ.get("SUITE_SLURM_STATE", "/tmp/suite-slurm"))
SLURM_CONF = STATE / "slurm.conf"
# One node without GPUs: a cell per core, in the partition slurm_cluster.sh configures.
SLURM = (
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
)
SWEEP = ("+variant=postln,preln", "sweep=tiny", "train.steps=20", "model.depth=2")


@pytest.fixture(scope="module")
def cluster():
    """The cluster for this module: started if it is not up, and then stopped again after."""
    env = {**os.environ, "SUITE_SLURM_STATE": str(STATE)}
    already_up = subprocess.run([CLUSTER, "status"], env=env, capture_output=True).returncode == 0
    up = subprocess.run([CLUSTER, "up"], env=env, capture_output=True, text=True, timeout=600)
    if up.returncode != 0 and ("apt-get install" in up.stderr or "no apt-get" in up.stderr):
        # No packages to be had on this machine: say so, rather than fail the suite's own tests.
        pytest.skip("SLURM could not be installed here: " + up.stderr.strip()[-500:])
    assert up.returncode == 0, up.stdout + up.stderr
    yield {"SLURM_CONF": str(SLURM_CONF)}
    if not already_up:
        subprocess.run([CLUSTER, "down"], env=env, check=True, timeout=120)


def slurm(*args: str, env: dict) -> str:
    result = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def job_ids(store: Path) -> list[str]:
    """The SLURM jobs (arrays) the store's sweeps submitted, from submitit's folders."""
    return sorted(p.name for p in store.glob("hydra/*/*/.submitit/*") if p.name.isdigit())


# A task whose result submitit has already read can still be RUNNING (or COMPLETING) in sacct for
# a moment: slurmd reports the end to the controller after the process exits, and on a loaded
# machine that took seconds (seen in CI).
UNSETTLED = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def states(store: Path, env: dict, settle_s: float = 60) -> list[str]:
    """sacct's state of every array task (not their steps) the store's sweeps submitted, once
    SLURM has recorded the end of every one of them (or after `settle_s`)."""
    deadline = time.monotonic() + settle_s
    while True:
        ids = ",".join(job_ids(store))
        out = slurm("sacct", "-n", "-X", "-P", "-o", "State", "-j", ids, env=env)
        found = sorted(line.split()[0] for line in out.splitlines() if line)  # "CANCELLED by 0"
        if not UNSETTLED.intersection(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.fixture(scope="module")
def swept(cluster, tmp_path_factory):
    """The same small sweep through the basic launcher and as a SLURM job array."""
    root = tmp_path_factory.mktemp("slurm")
    stores = {}
    for name, launcher in [("basic", ()), ("slurm", SLURM)]:
        stores[name] = root / name
        start = time.monotonic()
        result = run_suite(
            *SWEEP, "optim.lr=1e-3,3e-2", f"store={stores[name]}", *launcher, env=cluster
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        print(f"{name}: 4 cells in {time.monotonic() - start:.1f} s")
    return stores


def test_a_slurm_job_array_gives_the_basic_launchers_records(swept, cluster):
    basic = pd.read_parquet(swept["basic"] / "runs.parquet").set_index("cell_id")
    other = pd.read_parquet(swept["slurm"] / "runs.parquet").set_index("cell_id")
    assert sorted(basic.index) == sorted(other.index) and len(basic) == 4
    assert (other["status"] == "ok").all()
    pd.testing.assert_series_equal(basic["verdict"], other.loc[basic.index, "verdict"])
    pd.testing.assert_series_equal(
        basic["final_loss"], other.loc[basic.index, "final_loss"], rtol=1e-5
    )
    # It really went through SLURM: one array job, every task of it completed.
    assert len(job_ids(swept["slurm"])) == 1
    assert states(swept["slurm"], cluster) == ["COMPLETED"] * 4


def test_a_second_submission_trains_only_the_new_cells(swept, cluster, tmp_path):
    store = tmp_path / "store"
    resubmit_with_a_third_lr(swept["slurm"], store, SWEEP, SLURM, env=cluster)
    # Both submissions ran as arrays (the skipped cells as tasks that return at once).
    assert states(store, cluster) == ["COMPLETED"] * 10


def test_a_cancelled_job_leaves_its_cell_interrupted_and_the_next_submission_finishes_it(
    cluster, tmp_path
):
    store = tmp_path / "store"
    # Long enough to outlast scancel's KillWait (5 s in slurm_cluster.sh): submitit ignores the
    # SIGTERM, so the cell trains on until the SIGKILL.
    sweep = ("+variant=preln", *SWEEP[1:], "optim.lr=1e-3", "train.steps=6000", f"store={store}")
    progress = ("progress_every=1",)  # the sweep's process reports while SLURM runs the job
    start = time.monotonic()
    process = start_suite(
        *sweep, *progress, *SLURM, env={**os.environ, "PYTHONUNBUFFERED": "1", **cluster}
    )
    try:
        deadline = time.monotonic() + 120
        while not list(store.glob("cells/*/running.json")):
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no cell started within 120 s"
            time.sleep(0.2)
        [job] = job_ids(store)
        slurm("scancel", job, env=cluster)
        cancelled = time.monotonic()
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    ended = time.monotonic() - cancelled
    print(f"cell running after {cancelled - start:.1f} s; sweep ended {ended:.1f} s after scancel")
    # submitit learns the job's fate from sacct: the sweep fails and says why.
    assert process.returncode != 0
    assert "CANCELLED" in output, output[-3000:]
    assert "progress: 1 cell: 0 done, 1 running" in output, output[-3000:]
    assert states(store, cluster) == ["CANCELLED"]
    [cell] = store.glob("cells/*")
    assert not (cell / "record.json").exists(), "the cell finished before SIGKILL: more steps"
    assert (cell / "running.json").exists() and (cell / "curve.partial.parquet").exists()
    runs = collect(store)
    assert runs["status"].tolist() == ["interrupted"], runs["status"]

    # The same command again: the dead job's claim is stale, so the cell is trained to the end.
    result = run_suite(*sweep, *SLURM, env=cluster)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "already in the store" not in result.stdout
    runs = collect(store)
    assert runs["status"].tolist() == ["ok"] and runs["steps"].tolist() == [6000]
    assert not (cell / "running.json").exists() and not (cell / "claim.json").exists()
