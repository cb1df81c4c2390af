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
        + ["sweep=tiny", "train.steps=5"]
    ],
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
