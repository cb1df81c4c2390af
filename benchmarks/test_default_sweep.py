"""benchmarks/default_sweep.py runs once per test session on the tiny preset (so it cannot rot):
the grid and the frontier of one variant, timed, with the same answer and the same verdicts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_script_times_the_grid_and_the_frontier_to_the_same_answer():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.default_sweep", "--arms", "grid,frontier", "sweep=tiny"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| `python")]
    assert len(rows) == 2, result.stdout
    grid, frontier = (row.split(" | ") for row in rows)
    assert grid[1] == "4" and int(frontier[1]) <= 4  # cells trained
    assert grid[4] == frontier[4]  # the same max stable LR at every depth
    assert frontier[5] == f"{frontier[1]} of {frontier[1]} |"  # its cells are the grid's
