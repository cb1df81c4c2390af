"""Cell claims: one trainer per cell at a time, stale claims taken over, two sweeps on one store
training each cell once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import pytest
from helpers import start_suite

import suite.launch.claims as claims
from suite.launch.claims import CLAIM, Claim, claim_cell, is_stale
from suite.store import cell_dir

CELL = "preln-L2-lr0.001-s0-0123456789"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_claim_is_respected_and_released(tmp_path):
    first = claim_cell(tmp_path, CELL)
    assert isinstance(first, Claim)
    second = claim_cell(tmp_path, CELL)
    assert isinstance(second, dict) and second["pid"] == first.owner["pid"]
    first.release()
    assert not (cell_dir(tmp_path, CELL) / CLAIM).exists()
    third = claim_cell(tmp_path, CELL)
    assert isinstance(third, Claim)
    third.release()


def test_racing_claimants_get_one_claim(tmp_path):
    results, start = [], threading.Barrier(16)

    def race():
        start.wait()
        results.append(claim_cell(tmp_path, CELL))

    threads = [threading.Thread(target=race) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [r for r in results if isinstance(r, Claim)]
    assert len(won) == 1
    won[0].release()


def write_claim(tmp_path, **owner) -> None:
    folder = cell_dir(tmp_path, CELL)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CLAIM).write_text(json.dumps({"token": "old", **owner}))


def test_a_claim_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    import socket

    write_claim(tmp_path, hostname=socket.gethostname(), pid=dead_pid(), heartbeat=time.time())
    claim = claim_cell(tmp_path, CELL)
    assert isinstance(claim, Claim) and claim.owner["token"] != "old"
    claim.release()


@pytest.mark.parametrize(("age", "taken"), [(10.0, False), (claims.STALE_AFTER_S + 60, True)])
def test_a_claim_from_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path, age, taken):
    write_claim(tmp_path, hostname="another-node", pid=1, heartbeat=time.time() - age)
    result = claim_cell(tmp_path, CELL)
    assert isinstance(result, Claim) is taken
    if taken:
        result.release()


def test_a_half_written_claim_is_never_taken_over(tmp_path):
    folder = cell_dir(tmp_path, CELL)
    folder.mkdir(parents=True)
    (folder / CLAIM).write_text("")  # its creator is between open() and write()
    assert isinstance(claim_cell(tmp_path, CELL), dict)
    assert is_stale({}) is True  # but a claim with no owner facts at all is


def test_the_heartbeat_is_refreshed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "HEARTBEAT_S", 0.05)
    claim = claim_cell(tmp_path, CELL)
    first = claim.owner["heartbeat"]
    time.sleep(0.4)
    stored = json.loads((cell_dir(tmp_path, CELL) / CLAIM).read_text())
    assert stored["heartbeat"] > first and stored["token"] == claim.owner["token"]
    claim.release()


@pytest.mark.slow
def test_two_sweeps_on_one_store_train_each_cell_once(tmp_path):
    store = tmp_path / "store"
    args = ("+variant=preln", "sweep=tiny", "train.steps=1500", f"store={store}")
    first = start_suite(*args)
    deadline = time.time() + 120
    while not list(store.glob("cells/*/claim.json")) and time.time() < deadline:
        time.sleep(0.1)
    second = start_suite(*args)
    outputs = [process.communicate(timeout=600)[0] for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs[1][-3000:]
    trained = [re.findall(r"done: (\S+)", output) for output in outputs]
    assert sorted(trained[0] + trained[1]) == sorted(set(trained[0] + trained[1]))  # once each
    assert len(set(trained[0] + trained[1])) == 4
    assert "left to it" in outputs[1] and "left to another sweep" in outputs[1]
