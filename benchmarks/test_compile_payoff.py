"""benchmarks/compile_payoff.py runs once per test session (so it cannot rot), and its
arithmetic: what a compile costs and what the quick sweep takes either way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from compile_payoff import costs, quick_sweep_minutes


def test_the_script_measures_a_variant_at_a_depth():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_payoff", "--variants", "preln"]
        + ["--depths", "1", "--steps", "3"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| preln | 1 |" in result.stdout and "quick sweep, compiled" in result.stdout


def test_a_compile_costs_what_a_compiling_cell_spends_beyond_the_eager_cells_overhead():
    def cell(wall: float, step: float) -> dict:
        return {"wall_s": wall, "step_s": step, "overhead_s": wall - 100 * step,
                "machine": "cpu", "torch": "2"}  # fmt: skip

    runs = {
        "eager": cell(21.0, 0.2),  # 100 steps of 0.2 s and 1 s of build, diagnostics, evaluation
        "cold": cell(51.0, 0.1),
        "reused": cell(11.5, 0.1),
        "warm": cell(15.0, 0.1),
    }
    row = costs(runs)
    assert row["cold_compile_s"] == pytest.approx(40.0)
    assert row["warm_compile_s"] == pytest.approx(4.0)
    assert row["reused_compile_s"] == pytest.approx(0.5)
    # Per depth 10 cells of 400 steps on 2 workers: 5 cells each, and the warm compile once.
    assert quick_sweep_minutes([row], compiled=False) == pytest.approx(5 * (400 * 0.2 + 1) / 60)
    compiled = (5 * (400 * 0.1 + 1.5) + 4.0) / 60
    assert quick_sweep_minutes([row], compiled=True) == pytest.approx(compiled)
