"""The paper presets: each expands to the grid its header documents, the zero-step init preset
runs end to end, and docs/findings.py turns a store into the tables and figures of the findings."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, run_suite

from suite.launch.preflight import sweep_cells


@pytest.mark.parametrize(
    ("preset", "variants", "cells", "fixed"),
    [
        ("warmup", "postln,preln", 36, {"depth": 12, "steps": 300}),
        ("depth", "postln,preln,deepnorm", 48, {"width": 32, "steps": 300}),
        ("lr", "preln", 24, {"depth": 6, "warmup": 30}),
        ("init", "postln,preln", 30, {"steps": 0}),
    ],
)
def test_paper_presets_expand_to_their_documented_grid(preset, variants, cells, fixed):
    expanded = [cell for _, cell in sweep_cells([f"+variant={variants}", f"sweep={preset}"])]
    assert len(expanded) == cells
    assert {c.sweep for c in expanded} == {preset}
    values = {
        "depth": {c.model.depth for c in expanded},
        "width": {c.model.width for c in expanded},
        "steps": {c.train.steps for c in expanded},
        "warmup": {c.warmup_steps() for c in expanded},
    }
    for key, value in fixed.items():
        assert values[key] == {value}, key
    if preset == "lr":
        assert {c.model.qk_norm for c in expanded} == {False, True}


def test_depth_preset_runs_its_longest_cells_first():
    expanded = [cell for _, cell in sweep_cells(["+variant=preln", "sweep=depth"])]
    depths = [c.model.depth for c in expanded]
    assert depths == sorted(depths, reverse=True)


@pytest.mark.slow
def test_init_preset_and_findings_end_to_end(tmp_path):
    store = tmp_path / "store"
    result = run_suite(
        "+variant=postln,preln",
        "sweep=init",
        "model.depth=2,4",
        "seed=0",
        "model.width=32",
        "model.heads=2",
        "data.max_bytes=200000",
        f"store={store}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    findings = subprocess.run(
        [
            sys.executable,
            "docs/findings.py",
            "--store",
            str(store),
            "--figures",
            str(tmp_path / "figures"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert findings.returncode == 0, findings.stderr[-3000:]
    assert "## init (4 runs)" in findings.stdout
    assert "| postln |" in findings.stdout and "| preln |" in findings.stdout
    assert "## warmup: no runs" in findings.stdout
    assert (tmp_path / "figures" / "init.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_claims_table_compares_each_arm_with_rmsnorm_on_the_llama_backbone(tmp_path):
    store = tmp_path / "store"
    result = run_suite(
        "+variant=rmsnorm,dyt",
        "sweep=claims",
        "model.width=32",
        "model.heads=2",
        "train.steps=30",
        "optim.lr=1e-2,3e-2",
        "seed=0",
        "data.max_bytes=200000",
        "hydra/launcher=basic",
        f"store={store}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    findings = subprocess.run(
        [sys.executable, "docs/findings.py", "--store", str(store), "--figures", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert findings.returncode == 0, findings.stderr[-3000:]
    claims = findings.stdout.split("## claims (4 runs)")[1]
    assert "| rmsnorm · llama | 6 |" in claims and "| dyt · llama · authors | 6 |" in claims
    assert "gap_to_rmsnorm" in claims and "steps_to_rmsnorm_loss" in claims
    assert (tmp_path / "claims.png").stat().st_size > 10_000
