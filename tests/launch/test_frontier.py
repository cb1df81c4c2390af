"""python -m suite.frontier: each bracket's max stable LR by bisection over the sweep's LR grid,
its probes ordinary cells of the grid (same ids) that resume and collect like any."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pandas as pd
import pytest
from helpers import REPO, run_suite

from suite.launch.frontier import Bracket, search
from suite.launch.preflight import sweep_cells
from suite.verdict import CONVERGED, DIVERGED, STALLED

GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def planted(highest_stable: int, failing_seed: dict[int, int]):
    """Verdicts of a monotone grid: every seed converges up to ``highest_stable``; above it the
    seed ``failing_seed[index]`` (default 0) stalls and the others converge."""

    def verdict_of(bracket: Bracket, index: int, seed: int) -> str:
        if index <= highest_stable:
            return CONVERGED
        return STALLED if seed == failing_seed.get(index, 0) else CONVERGED

    return verdict_of


@pytest.mark.parametrize("size", range(1, len(GRID) + 1))
def test_bisection_finds_every_monotone_frontier_with_fewer_cells_than_the_grid(size):
    lrs = GRID[:size]
    for highest_stable in range(-1, size):
        for late in (False, True):  # the failing seed is the first, or the last one asked
            failing = {index: 2 if late else 0 for index in range(size)}
            bracket = Bracket("x", lrs, [0, 1, 2])
            search([bracket], planted(highest_stable, failing))
            row = bracket.result()
            expected = lrs[highest_stable] if highest_stable >= 0 else math.nan
            assert row["max_stable_lr"] == pytest.approx(expected, nan_ok=True)
            first_failing = lrs[highest_stable + 1] if highest_stable + 1 < size else math.nan
            assert row["first_failing_lr"] == pytest.approx(first_failing, nan_ok=True)
            # Each probe costs at most its seeds, and there are at most ⌈log2(size + 1)⌉ + 1.
            probes = len({index for index, _ in bracket.verdicts})
            assert probes <= size and probes <= (size + 1).bit_length()
            assert row["cells"] <= 3 * probes


def test_a_failing_seed_ends_its_probe_and_a_grid_stable_to_its_top_takes_two_probes():
    bracket = Bracket("x", GRID[:5], [0, 1])
    search([bracket], lambda b, index, seed: DIVERGED)  # nothing trains at any LR
    assert sorted(bracket.verdicts) == [(0, 0), (2, 0)]  # two probes, one cell each
    assert bracket.result()["note"].startswith("no grid LR is stable")
    bracket = Bracket("x", GRID[:5], [0, 1])
    search([bracket], planted(-1, {}))  # seed 0 stalls at every LR: maybe too slow, not unstable
    assert bracket.result()["note"].startswith("no probed LR is stable; the lowest stalled")
    bracket = Bracket("x", GRID[:5], [0, 1])
    search([bracket], planted(4, {}))
    assert sorted({index for index, _ in bracket.verdicts}) == [2, 4]
    assert bracket.result()["note"].startswith("stable at the grid's top LR")


def test_a_seed_that_arrives_after_its_probe_was_decided_does_not_move_the_frontier():
    bracket = Bracket("x", GRID[:5], [0, 1])
    bracket.learn(2, 1, DIVERGED)  # the later seed, started beside the first, fails first
    assert bracket.probe() == 0
    bracket.learn(2, 0, CONVERGED)  # the first seed finishing afterwards changes nothing
    assert bracket.probe() == 0 and bracket.highest_stable == -1


def frontier(*args: str) -> subprocess.CompletedProcess:
    return run_suite(*args, command="suite.frontier")


@pytest.mark.slow
def test_frontier_trains_grid_cells_that_resume_and_collect(tmp_path):
    # LR 10 diverges on any CPU; what 3e-2 does may differ, so the test asserts only what the
    # stored verdicts imply.
    args = ("+variant=preln", "sweep=tiny", "model.depth=2", "train.steps=60")
    args += ("optim.lr=3e-2,10", "seed=0,1", f"store={tmp_path}")
    first = frontier("--workers", "1", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    grid = {cell.cell_id(): cell for _, cell in sweep_cells(list(args))}
    stored = {path.name for path in (tmp_path / "cells").iterdir()}
    assert stored and stored <= set(grid)  # the grid's own cells, by id
    runs = pd.read_parquet(tmp_path / "runs.parquet")  # collected by the probes' sweeps
    assert set(runs["cell_id"]) == stored
    verdict = {(row.lr, row.seed): row.verdict for row in runs.itertuples()}
    assert (10.0, 1) not in verdict
    stable = all(verdict.get((3e-2, seed)) == CONVERGED for seed in (0, 1))
    row = pd.read_csv(next((tmp_path / "frontier").glob("tiny-*.csv"))).iloc[0]
    if stable:  # then LR 10 was probed: its first seed ended the probe
        assert row["max_stable_lr"] == 3e-2 and row["first_failing_lr"] == 10
        assert len(stored) == 3 and verdict[10.0, 0] == DIVERGED
    else:  # LR 3e-2 already failed: nothing lower to try, nothing higher is stable
        assert pd.isna(row["max_stable_lr"]) and row["first_failing_lr"] == 3e-2
        assert len(stored) in (1, 2) and (10.0, 0) not in verdict
    assert row["cells"] == len(stored)
    again = frontier("--workers", "1", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"({len(stored)} of 4 grid cells, 0 trained now" in again.stdout
    # A curve damaged inside (its footer whole, so the store still counts the cell finished) is
    # judged from its record, as collect does, instead of crashing the search.
    from suite.launch.frontier import stored_verdict

    cell = grid[sorted(stored)[0]]
    curve = next((tmp_path / "cells" / cell.cell_id()).glob("*.parquet"))
    data = bytearray(curve.read_bytes())
    data[8:200] = b"\xff" * 192
    curve.write_bytes(bytes(data))
    from suite.store import read_curve_columns

    with pytest.raises((OSError, ValueError)):
        read_curve_columns(tmp_path, cell.cell_id())
    assert stored_verdict(cell) == verdict[cell.optim.lr, cell.seed]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.lr=1e-3", "optim.lr"),
        ("train.pack_lr=true", "train.pack_lr"),
        ("+variant=nosuch", "preln"),  # the known variants are listed
        ("model.depth=0", "model.depth"),
        ("hydra.sweep.dir=/tmp/x", "hydra.sweep.dir"),
    ],
)
def test_bad_input_is_refused_before_anything_trains(tmp_path, override, named):
    args = ["sweep=tiny", f"store={tmp_path}", override]
    if not override.startswith("+variant"):
        args.insert(0, "+variant=preln")
    result = frontier(*args)
    assert result.returncode == 2 and named in result.stderr
    assert not (tmp_path / "cells").exists()


def test_workers_must_be_positive():
    result = frontier("--workers", "0", "+variant=preln")
    assert result.returncode == 2 and "--workers" in result.stderr


def test_every_probe_of_a_multi_axis_sweep_is_a_bracket_of_its_own():
    from suite.launch.frontier import split_grid

    cells = sweep_cells(["+variant=preln,postln", "sweep=tiny", "model.qk_norm=false,true"])
    grid = split_grid(cells)
    labels = [bracket.label for bracket in grid.brackets]
    assert len(labels) == 2 * 2 * 2  # variant × depth (tiny: 2, 4) × qk-norm
    assert len(set(labels)) == len(labels) and all("model.depth=" in label for label in labels)
    for (number, index, seed), (_, cell) in grid.jobs.items():
        assert cell.optim.lr == grid.brackets[number].lrs[index] and cell.seed == seed
    assert sum(b.result()["grid_cells"] for b in grid.brackets) == len(cells)
    assert list(itertools.chain(grid.jobs)) and len(grid.jobs) == len(cells)


def test_a_recipe_sweep_naming_one_cell_twice_is_one_bracket():
    from suite.launch.frontier import split_grid

    # DeepNorm's paper adds nothing to its wiring: its `authors` cell is its `controlled` cell.
    cells = sweep_cells(["+variant=deepnorm", "recipe=controlled,authors", "sweep=tiny"])
    grid = split_grid(cells)
    assert len(grid.brackets) == 2  # one per depth, not one per recipe
    assert all(" = " in bracket.label for bracket in grid.brackets)


def frontier_process(store, *extra: str, **popen) -> subprocess.Popen:
    args = ("+variant=preln", "sweep=tiny", "model.depth=2", "optim.lr=3e-2,10", "seed=0")
    return subprocess.Popen(
        [sys.executable, "-m", "suite.frontier", "--workers", "1", *args, f"store={store}", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )  # fmt: skip


@pytest.mark.slow
def test_two_frontiers_on_one_store_wait_for_each_other_instead_of_failing(tmp_path):
    first, second = frontier_process(tmp_path), frontier_process(tmp_path)
    outputs = [process.communicate(timeout=300)[0] for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    tables = [pd.read_csv(path) for path in (tmp_path / "frontier").glob("tiny-*.csv")]
    assert len(tables) == 2  # one per run, never overwritten
    assert tables[0]["max_stable_lr"].equals(tables[1]["max_stable_lr"])
    assert all(
        table["note"].isna().all() or "error" not in str(table["note"][0]) for table in tables
    )
    trained = sum(int(out.split(" trained now")[0].rsplit(", ", 1)[1]) for out in outputs)
    assert trained == len(list((tmp_path / "cells").iterdir()))  # no cell trained twice


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a job started with & in a script


@pytest.mark.slow
@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_sigterm_stops_the_probes_and_keeps_what_finished(tmp_path, sigint_ignored):
    import os
    import signal
    import time

    popen = {"preexec_fn": _ignore_sigint} if sigint_ignored else {}
    process = frontier_process(tmp_path, "train.steps=100000", **popen)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("cells/*/running.json")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert list(tmp_path.glob("cells/*")), "no probe started"
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]  # a probe ignoring Ctrl-C gets SIGTERM at 10 s
    assert process.returncode == 130, output
    assert "interrupted" in output
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"store={tmp_path}" not in running  # no probe left training on its own
    assert os.path.isdir(tmp_path / "cells")
