"""GPU pinning (suite/launch/devices.py, hydra/launcher=gpus), tested on CPU with faked device
lists: which GPUs count as visible, how slots map to GPUs, that a GPU never holds more than
``cells_per_gpu`` cells at once (across processes, and against another sweep's held slots), and
that the records say where each cell ran. Also: a launcher whose plugin is not installed is
named with its pip extra before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pandas as pd
import pytest
from helpers import REPO, run_suite

from suite.launch.devices import (
    gpu_slot,
    parse_visible_devices,
    pins_gpus,
    slot_gpu,
    take_slot,
    workers_for,
)


@pytest.mark.parametrize(
    ("value", "count", "expected"),
    [
        (None, 0, []),
        (None, 3, ["0", "1", "2"]),
        ("", 4, []),
        ("2,0", 4, ["2", "0"]),
        (" 1 , 3 ", 4, ["1", "3"]),
        ("0,-1,1", 4, ["0"]),  # CUDA hides everything after an invalid entry
        ("0,abc,1", 4, ["0"]),
        ("NoDevFiles", 4, []),  # what older SLURM sets for a job without GPUs
        ("-1", 4, []),
        ("0,1,2,3", 2, ["0", "1"]),  # never more than CUDA sees
        ("0", 0, []),  # no CUDA here: a set variable names nothing
        ("GPU-8f3e,MIG-1a2b", 2, ["GPU-8f3e", "MIG-1a2b"]),
    ],
)
def test_visible_gpus_follow_cuda_visible_devices(value, count, expected):
    assert parse_visible_devices(value, count) == expected


def test_slots_go_round_robin_over_the_gpus():
    gpus = ["0", "1", "2"]
    assert workers_for(gpus, 2) == 6
    assert [slot_gpu(slot, gpus) for slot in range(6)] == ["0", "1", "2", "0", "1", "2"]
    assert workers_for([], 4) == 1


def test_a_held_slot_is_never_given_twice_and_a_released_one_is(tmp_path):
    gpus = ["0", "1"]
    held = [take_slot(gpus, 2, folder=tmp_path) for _ in range(4)]
    assert sorted(slot.index for slot in held) == [0, 1, 2, 3]
    assert [slot.gpu for slot in held] == ["0", "1", "0", "1"]
    held[2].release()
    again = take_slot(gpus, 2, folder=tmp_path)
    assert (again.index, again.gpu) == (2, "0")
    for slot in [*held, again]:
        slot.release()


def test_a_worker_waits_for_a_slot_on_its_own_gpu(tmp_path):
    gpus = ["0", "1"]
    busy = [take_slot(gpus, 1, folder=tmp_path, on_gpu="0")]
    free_on_other_gpu = take_slot(gpus, 1, folder=tmp_path)  # on_gpu=None: any free one
    assert free_on_other_gpu.gpu == "1"
    free_on_other_gpu.release()
    threading.Timer(0.5, busy[0].release).start()
    started = time.monotonic()
    slot = take_slot(gpus, 1, folder=tmp_path, on_gpu="0", poll_s=0.05)
    assert slot.gpu == "0" and time.monotonic() - started >= 0.4  # not GPU 1, though free
    slot.release()


HOLD_SLOT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from suite.launch.devices import take_slot
    slot = take_slot(["0", "1"], 1, folder=Path(sys.argv[1]))
    print(slot.gpu, flush=True)
    time.sleep(60)
    """
)


def test_slots_are_exclusive_across_processes_and_freed_when_one_dies(tmp_path):
    holders = []
    for _ in range(2):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_SLOT, str(tmp_path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append((holder, holder.stdout.readline().strip()))
    try:
        assert sorted(gpu for _, gpu in holders) == ["0", "1"]  # two processes, two GPUs
        holders[0][0].kill()  # a worker that dies (even by SIGKILL) frees its slot
        holders[0][0].wait()
        slot = take_slot(["0", "1"], 1, folder=tmp_path, poll_s=0.05)
        assert slot.gpu == holders[0][1]
        slot.release()
    finally:
        for holder, _ in holders:
            holder.kill()
            holder.wait()


def test_a_worker_is_pinned_before_cuda_starts(tmp_path):
    """In a fresh process (CUDA not started), the slot's GPU becomes CUDA_VISIBLE_DEVICES, and the
    process keeps to that GPU for its later cells."""
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        os.environ["SUITE_GPUS"] = "3,5"
        os.environ["SUITE_SLOT_DIR"] = {str(tmp_path)!r}
        from suite.launch.devices import gpu_slot, take_slot
        other = take_slot(["3", "5"], 1)  # another process's cell holds GPU 3
        with gpu_slot(True, 1) as slot:
            print(slot.gpu, os.environ["CUDA_VISIBLE_DEVICES"])
        other.release()
        with gpu_slot(True, 1) as slot:  # GPU 3 is free now, but this worker stays on 5
            print(slot.gpu, os.environ["CUDA_VISIBLE_DEVICES"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["5 5", "5 5"]


def test_only_local_workers_training_on_cuda_pin(monkeypatch):
    monkeypatch.setenv("SUITE_GPUS", "0,1")
    assert pins_gpus(True, "auto") and pins_gpus(True, "cuda")
    assert not pins_gpus(False, "auto")  # basic launcher (in-process) or a cluster's jobs
    assert not pins_gpus(True, "cpu") and not pins_gpus(True, "cuda:1")  # the user's choice
    monkeypatch.setenv("SUITE_GPUS", "")
    assert not pins_gpus(True, "auto")  # no GPU
    environment = dict(os.environ)
    with gpu_slot(False, 1) as slot:
        assert slot is None
    assert dict(os.environ) == environment


@pytest.mark.slow
def test_gpu_launcher_pins_each_cell_and_respects_another_sweeps_slots(tmp_path):
    """Workers for 2 faked GPUs × 2 cells each while another sweep holds both of GPU 0's slots:
    every cell trains on GPU 1, and its record says so."""
    slots = tmp_path / "slots"
    env = {"SUITE_FAKE_GPUS": "0,1", "SUITE_SLOT_DIR": str(slots)}
    other_sweep = [take_slot(["0", "1"], 2, folder=slots, on_gpu="0") for _ in range(2)]
    try:
        result = run_suite(
            "+variant=preln",
            "sweep=tiny",
            "train.steps=20",
            "model.depth=2",
            "optim.lr=1e-3,3e-3,1e-2",
            f"store={tmp_path / 'store'}",
            "hydra/launcher=gpus",
            "train.cells_per_gpu=2",
            env=env,
        )
    finally:
        for slot in other_sweep:
            slot.release()
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pd.read_parquet(tmp_path / "store" / "runs.parquet")
    assert len(runs) == 3 and (runs["status"] == "ok").all()
    assert (runs["pinned_gpu"] == "1").all()
    # 2 GPUs × 2 cells = 4 workers, capped at the sweep's 3 cells; at most 2 of them per GPU
    assert (runs["parallel_cells"] == 3).all() and (runs["cells_per_device"] == 2).all()
    assert runs["shared_device"].all()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {"SUITE_FAKE_GPUS": ""}, "hydra/launcher=gpus: no GPU is visible here"),
        (["train.device=cpu"], {"SUITE_FAKE_GPUS": "0"}, "train.device: 'cpu' cannot be used"),
        (["train.device=cuda:1"], {"SUITE_FAKE_GPUS": "0,1"}, "train.device: 'cuda:1'"),
        (["train.cells_per_gpu=0"], {"SUITE_FAKE_GPUS": "0"}, "train.cells_per_gpu"),
    ],
)
def test_gpu_launcher_refuses_what_it_cannot_pin_before_training(tmp_path, args, env, message):
    result = run_suite(
        "+variant=preln", "sweep=tiny", f"store={tmp_path}", "hydra/launcher=gpus", *args, env=env
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "cells").exists()


@pytest.mark.slow
def test_the_per_core_launcher_also_pins_its_workers_when_cells_train_on_gpus(tmp_path):
    """The CPU preset's launcher (a worker per core) on a machine with one (faked) GPU: its
    workers queue for the GPU's one slot instead of all training on it at once."""
    result = run_suite(
        "+variant=preln",
        "sweep=tiny",
        "train.steps=20",
        "model.depth=2",
        "optim.lr=1e-3,3e-3",
        f"store={tmp_path / 'store'}",
        "hydra/launcher=per_core",
        env={"SUITE_FAKE_GPUS": "7", "SUITE_SLOT_DIR": str(tmp_path / "slots")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pd.read_parquet(tmp_path / "store" / "runs.parquet")
    assert (runs["pinned_gpu"] == "7").all() and (runs["cells_per_device"] == 1).all()
    assert not runs["shared_device"].any()


def test_a_launcher_whose_plugin_is_missing_names_the_pip_extra(monkeypatch):
    import importlib.util

    from suite.config import ConfigError
    from suite.launch.preflight import sweep_cells

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if "ray_launcher" in name else real(name, *args),
    )
    with pytest.raises(
        ConfigError, match=r"hydra/launcher=ray_cluster: .*pip install -e '\.\[ray\]'"
    ):
        sweep_cells(["+variant=preln", "sweep=tiny", "hydra/launcher=ray_cluster"])


def test_a_mig_name_with_slashes_gets_a_lock_file(tmp_path):
    slot = take_slot(["MIG-GPU-5c89852c/1/0"], 1, folder=tmp_path)
    assert slot.gpu == "MIG-GPU-5c89852c/1/0"
    assert [p.name for p in tmp_path.iterdir()] == ["gpu-MIG-GPU-5c89852c_1_0.0.lock"]
    slot.release()


def test_cuda_visible_devices_without_cuda_is_no_gpu(monkeypatch):
    from suite.launch.devices import detect_gpus

    monkeypatch.delenv("SUITE_FAKE_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect_gpus() == []
