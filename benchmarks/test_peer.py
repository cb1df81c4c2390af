"""The peer comparison (benchmarks/peer.py) runs once per test session so it cannot rot: both
models build at both shapes with parameter counts within 1%, and both train a step."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("x_transformers")

from peer import SHAPES, Shape, compare  # noqa: E402


@pytest.mark.parametrize("variant", ["preln", "postln"])
@pytest.mark.parametrize("spec", SHAPES, ids=lambda s: f"w{s[0]}-L{s[2]}")
def test_peer_comparison_runs_at_matched_shapes(spec, variant):
    result = compare(Shape(*spec), variant, rounds=1, steps_per_round=1)
    assert result["peer_params"] == pytest.approx(result["suite_params"], rel=0.01)
    assert all(math.isfinite(v) and v > 0 for v in result.values())


@pytest.mark.parametrize(
    "script",
    [
        ["benchmarks.packed_vs_unpacked", "--cells-only", "--rounds", "1", "+variant=preln"]
        + ["sweep=tiny", "train.steps=5"],
        ["benchmarks.compile_payoff", "--variants", "preln", "--depths", "1", "--steps", "3"],
    ],
    ids=["packed_vs_unpacked", "compile_payoff"],
)
def test_measurement_scripts_run(script):
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-m", *script],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "speed-up" in result.stdout


def test_compile_costs_are_what_a_compiling_cell_spends_beyond_a_reusing_one():
    from compile_payoff import costs, quick_sweep_minutes

    cell = {"cpu": "cpu", "torch": "2"}
    runs = {
        "cold": {"wall_s": 50.5, "step_s": 0.1, **cell},
        "reused": {"wall_s": 10.5, "step_s": 0.1, **cell},
        "eager": {"wall_s": 20.0, "step_s": 0.2, **cell},
        "warm": {"wall_s": 14.5, "step_s": 0.1, **cell},
    }
    row = costs(runs, steps=100)
    assert row["cold_compile_s"] == pytest.approx(40.0)
    assert row["warm_compile_s"] == pytest.approx(4.0)
    assert row["reused_compile_s"] == pytest.approx(0.5)  # 10.5 s less 100 steps of 0.1 s
    # 10 cells of 400 steps on 2 workers: 2000 steps of wall, plus one warm compile compiled.
    assert quick_sweep_minutes([row], compiled=False) == pytest.approx(2000 * 0.2 / 60)
    assert quick_sweep_minutes([row], compiled=True) == pytest.approx((2000 * 0.1 + 4.0) / 60)
