"""python -m suite.remedy: a store's failed cells, rebuilt exactly from their stored config,
re-run with the remedy for their mechanism into a store of their own, and the verdicts after."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from helpers import REPO, run_suite

from suite.launch.remedy import _differences, hydra_value, plan, remedy_overrides, sweeps


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (True, "true"),
        (None, "null"),
        (3, "3"),
        (1e-05, "1e-05"),
        ("gpt2", "gpt2"),
        ("a b", "'a b'"),
        (["biases", "gains"], "[biases,gains]"),
    ],
)
def test_values_are_written_as_hydra_overrides(value, written):
    assert hydra_value(value) == written


def test_only_settings_that_differ_from_the_preset_become_overrides():
    stored = {"optim": {"lr": 0.1, "beta2": 0.98}, "variant_params": {"eps": 1e-6}, "seed": 3}
    composed = {"optim": {"lr": 0.1, "beta2": 0.95}, "variant_params": {"eps": 1e-5}, "seed": 0}
    assert _differences(stored, composed) == ["optim.beta2=0.98", "variant.eps=1e-06"]


def test_a_remedy_that_is_another_arrangement_replaces_the_variant_and_its_parameters():
    command = ["+variant=hc", "variant.streams=4", "model.depth=6", "optim.lr=0.1"]
    assert remedy_overrides(command, "stream_collapse") == [
        "model.depth=6",
        "optim.lr=0.1",
        "+variant=mhc",
    ]


def test_cells_differing_only_in_lr_are_one_sweep():
    entries = [
        {"command": ["+variant=postln", "model.depth=2", "optim.lr=0.1", "optim.warmup_steps=100"]},
        {"command": ["+variant=postln", "model.depth=2", "optim.lr=0.3", "optim.warmup_steps=100"]},
        {"command": ["+variant=postln", "model.depth=4", "optim.lr=0.1", "optim.warmup_steps=100"]},
    ]
    assert sweeps(entries) == [
        ["+variant=postln", "model.depth=2", "optim.warmup_steps=100", "optim.lr=0.1,0.3"],
        ["+variant=postln", "model.depth=4", "optim.warmup_steps=100", "optim.lr=0.1"],
    ]


@pytest.fixture(scope="module")
def failing_store(tmp_path_factory):
    """Post-LN at LRs where it fails, with a setting the tiny preset does not have (width 48),
    which the rebuilt command line must carry."""
    store = tmp_path_factory.mktemp("remedy") / "store"
    result = run_suite(
        "+variant=postln", "sweep=tiny", "model.depth=2", "optim.lr=0.1,0.3", "model.width=48",
        f"store={store}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return store


def test_every_failed_cell_is_rebuilt_to_its_own_config_hash(failing_store):
    runs = pd.read_parquet(failing_store / "runs.parquet")
    failed = runs[runs["verdict"].isin(["stalled", "diverged"])]
    assert len(failed) >= 1
    entries = plan(runs)  # plan() re-composes each and checks its hash
    assert {e["cell_id"] for e in entries} == set(
        failed.loc[failed["failure_mechanism"] != "abrupt", "cell_id"]
    )
    for entry in entries:
        assert "model.width=48" in entry["command"]
    # A run whose stored config no command line composes is left alone, with a warning.
    broken = runs.assign(config_hash="0" * 64)
    assert plan(broken) == []


def test_the_plan_composes_hydra_once_per_set_of_config_groups(failing_store, monkeypatch):
    """Not once per failed run and check (the shipped reference's dry run composed ~1,800
    times: 252 s inside the test suite)."""
    from suite.launch import preflight

    runs = pd.read_parquet(failing_store / "runs.parquet")
    once = plan(runs)
    seen, real = [], preflight.compose
    monkeypatch.setattr(preflight, "compose", lambda *a, **k: seen.append(k) or real(*a, **k))
    entries = plan(pd.concat([runs, runs]))  # each failed run twice: the same compositions
    assert entries == once + once and len(once) >= 1
    assert len({tuple(call["overrides"]) for call in seen}) == len(seen) <= 2


def test_the_remedy_command_trains_the_remedied_cells_into_their_own_store(failing_store):
    out = failing_store.parent / "remedies"
    result = subprocess.run(
        [sys.executable, "-m", "suite.remedy", "--store", str(failing_store), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "remedies.json").read_text())
    remedied = pd.read_parquet(out / "runs.parquet")
    assert {e["remedied_cell_id"] for e in manifest} <= set(remedied["cell_id"])
    outcomes = pd.read_csv(out / "remedy_outcomes.csv")
    assert outcomes["runs"].sum() == len(manifest)
    assert "Remedies (" in result.stdout
    # the original store is untouched: the remedied runs never pool with the originals
    assert len(pd.read_parquet(failing_store / "runs.parquet")) == 2


def test_a_table_collected_before_mechanisms_is_refused_with_what_to_do(tmp_path):
    pd.DataFrame({"cell_id": ["x"], "status": ["ok"]}).to_parquet(tmp_path / "runs.parquet")
    result = subprocess.run(
        [sys.executable, "-m", "suite.remedy", "--store", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0 and "python -m suite.collect --store" in result.stderr


def test_a_second_remedy_run_keeps_the_first_run_s_mapping(tmp_path):
    from suite.launch.remedy import merged_manifest

    path = tmp_path / "remedies.json"
    path.write_text(json.dumps([{"cell_id": "a", "remedied_cell_id": "a2"}]))
    merged = merged_manifest(path, [{"cell_id": "b", "remedied_cell_id": "b2"}])
    assert [e["cell_id"] for e in merged] == ["a", "b"]
    again = merged_manifest(path, [{"cell_id": "a", "remedied_cell_id": "a3"}])
    assert again == [{"cell_id": "a", "remedied_cell_id": "a3"}]


def test_remedies_of_the_shipped_reference_go_to_a_store_of_ones_own(tmp_path, capsys):
    """The word reference reads the shipped table; its failures are remedied into --out, never
    into the shipped folder itself (one mechanism's: the whole plan is ~40 s of composing)."""
    from suite.launch.remedy import main

    with pytest.raises(SystemExit, match="^config error: --out: .* shipped reference results"):
        main(["--store", "reference", "--dry-run"])
    out = tmp_path / "remedies"
    main(["--store", "reference", "--out", str(out), "--only", "stream_collapse", "--dry-run"])
    commands = capsys.readouterr().out.splitlines()
    assert commands and all("+variant=mhc" in c and c.endswith(f"store={out}") for c in commands)
    assert not out.exists()  # a dry run writes nothing
