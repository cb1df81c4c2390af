"""Verdicts judged from the stored curve at collect time: equal to training's for the same
knobs, re-judged by re-collecting (never re-training), old and damaged stores still collect."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
from helpers import make_cell, run_suite

from suite.analyze.collect import collect, warn_mixed_corpora
from suite.config import VerdictConfig
from suite.mechanism import MECHANISMS
from suite.run.runner import run_cell
from suite.store import cell_dir, curve_path, write_cell


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store with three real cells: one that learns, one that stays near the plateau, one that
    diverges."""
    store = tmp_path_factory.mktemp("judged") / "store"
    cells = [
        make_cell("preln", lr=1e-2, depth=2, steps=300),  # escapes near step 100, ends 0.5 below
        make_cell("postln", lr=1e-4, depth=2, steps=30),
        make_cell("rezero", lr=10.0, depth=4, steps=60),
    ]
    records = {}
    for cell in cells:
        record, curve = run_cell(cell)
        write_cell(store, record, curve)
        records[record["cell_id"]] = record
    return store, records


def test_collect_time_verdict_equals_the_one_recorded_in_training(trained):
    store, records = trained
    runs = collect(store, write=False).set_index("cell_id")
    assert set(runs["verdict"]) == {"converged", "stalled", "diverged"}
    for cell_id, record in records.items():
        row = runs.loc[cell_id]
        assert row["judged_from"] == "curve"
        assert row["verdict"] == record["verdict"], cell_id
        assert row["final_loss"] == pytest.approx(record["final_loss"], nan_ok=True)
        assert row["stall_threshold"] == pytest.approx(record["stall_threshold"])
        escape = record["escape_step"]
        assert (math.isnan(row["escape_step"]) and escape is None) or row["escape_step"] == escape
        assert row["borderline"] == record["borderline"]
        assert row["verdict_rule"].startswith("v2 stall_margin=0.1 final_window=10")


def test_label_knobs_re_judge_the_stored_curves(trained):
    store, _ = trained
    strict = collect(store, write=False, verdict=VerdictConfig(stall_margin=10.0))
    finished = strict[strict["verdict"] != "diverged"]
    assert set(finished["verdict"]) == {"stalled"}  # nothing gets 10 nats below the entropy
    assert (strict["verdict_rule"].str.contains("stall_margin=10")).all()
    assert strict["escape_step"].isna().all()


def test_a_curve_that_does_not_match_its_record_keeps_the_recorded_verdict(trained, tmp_path):
    store, records = trained
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    cell_id = next(c for c, r in records.items() if r["verdict"] == "converged")
    path = curve_path(copy, cell_id)
    pd.read_parquet(path).head(10).to_parquet(path)  # a curve that is not the record's
    other = next(c for c, r in records.items() if r["verdict"] == "stalled")
    curve_path(copy, other).write_bytes(b"not parquet")
    runs = collect(copy, write=False).set_index("cell_id")
    for damaged in (cell_id, other):
        assert runs.loc[damaged, "judged_from"] == "record"
        assert runs.loc[damaged, "verdict"] == records[damaged]["verdict"]
    # ... and stay out of the escape-step statistics instead of counting as never escaped.
    from suite.analyze.summary import median_escape_step

    assert math.isnan(median_escape_step(runs.loc[[cell_id, other]]))


def test_a_store_from_before_collect_time_verdicts_still_collects(trained, tmp_path):
    store, records = trained
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    for cell_id in records:
        path = cell_dir(copy, cell_id) / "record.json"
        record = json.loads(path.read_text())
        for key in ("escape_step", "relapsed", "borderline", "stall_threshold"):
            record.pop(key)
        path.write_text(json.dumps(record))
    runs = collect(copy, write=False)
    assert len(runs) == 3 and (runs["judged_from"] == "curve").all()
    assert runs["stall_threshold"].notna().all()


def test_the_same_cell_under_an_old_and_a_new_id_counts_once(trained, tmp_path):
    """Before label knobs left the cell hash, the same cell had another id; a store re-run after
    the change holds both records. The later run is the one collected."""
    store, records = trained
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    cell_id, record = next(iter(records.items()))
    old_id = cell_id.rsplit("-", 1)[0] + "-0123456789"
    shutil.copytree(cell_dir(copy, cell_id), cell_dir(copy, old_id))
    old = {**record, "cell_id": old_id, "config_hash": "0123456789" * 6}
    old["started_at"] = "2020-01-01T00:00:00+00:00"
    (cell_dir(copy, old_id) / "record.json").write_text(json.dumps(old))
    runs = collect(copy, write=False)
    assert len(runs) == 3 and old_id not in set(runs["cell_id"])


@pytest.mark.slow
def test_changing_stall_margin_re_collects_through_the_cli_without_training(tiny_sweep, tmp_path):
    store, _ = tiny_sweep
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    before = pd.read_parquet(copy / "runs.parquet")
    assert (before["verdict"] != "stalled").any()
    mtimes = {p: p.stat().st_mtime_ns for p in (copy / "cells").rglob("*") if p.is_file()}

    # The same sweep with another label knob: every cell is already in the store.
    result = run_suite(
        "+variant=postln,preln", "sweep=tiny", f"store={copy}", "verdict.stall_margin=5.0"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 already in the store" in result.stdout
    assert " done: " not in result.stderr + result.stdout  # nothing trained
    after = pd.read_parquet(copy / "runs.parquet")
    assert set(after.loc[after["verdict"] != "diverged", "verdict"]) == {"stalled"}
    assert (after["verdict_rule"].str.contains("stall_margin=5")).all()
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}  # no cell file touched

    # The collect command takes the same knob; the default judges as before.
    import subprocess
    import sys

    from helpers import REPO

    def collect_cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "suite.collect", "--store", str(copy), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    default = collect_cli()
    assert default.returncode == 0, default.stderr
    again = pd.read_parquet(copy / "runs.parquet")
    assert list(again["verdict"]) == list(before["verdict"])
    strict = collect_cli("verdict.stall_margin=5.0")
    assert strict.returncode == 0 and "stalled" in strict.stdout
    bad = collect_cli("verdict.stall_margin=-1")
    assert bad.returncode == 2 and "config error: verdict.stall_margin" in bad.stderr
    blowup = collect_cli("verdict.blowup_factor=3")
    assert blowup.returncode == 2 and "verdict.blowup_factor" in blowup.stderr
    assert "re-run the sweep" in blowup.stderr


@pytest.mark.slow
def test_budget_calibration_cut_at_the_full_budget_is_the_collected_verdict(tiny_sweep, capsys):
    """benchmarks/budget_calibration.py judges a constant-LR curve cut at a shorter budget as
    that shorter run; cut at its own budget it must agree with collect exactly."""
    from benchmarks.budget_calibration import cut, main

    store, _ = tiny_sweep
    runs = collect(store, write=False)
    for _, run in runs.iterrows():
        full = cut(str(store), run, int(run["steps"]), VerdictConfig())
        assert full["verdict"] == run["verdict"], run["cell_id"]
        assert full["borderline"] == run["borderline"]
        short = cut(str(store), run, 20, VerdictConfig())
        assert short["budget"] == 20 and short["verdict"] in ("stalled", "converged", "diverged")
    main(["--store", str(store), "--budgets", "50,150"])
    printed = capsys.readouterr().out
    assert "Escape step of every run" in printed and "budget 150" in printed


def test_a_failed_re_run_is_shown_beside_the_older_result_not_hidden(trained, tmp_path):
    store, records = trained
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    cell_id, record = next(iter(records.items()))
    new_id = cell_id.rsplit("-", 1)[0] + "-9876543210"
    failed = {**record, "cell_id": new_id, "status": "error", "verdict": None}
    failed.update(error="Traceback ...\nRuntimeError: boom", started_at="2999-01-01T00:00:00+00:00")
    (cell_dir(copy, new_id)).mkdir(parents=True)
    (cell_dir(copy, new_id) / "record.json").write_text(json.dumps(failed))
    runs = collect(copy, write=False).set_index("cell_id")
    assert runs.loc[new_id, "status"] == "error"
    assert runs.loc[cell_id, "status"] == "ok"  # the older result is not lost either
    assert len(runs) == 4


def test_collect_names_a_failure_mechanism_for_every_run_that_did_not_converge(trained):
    """Judged from the stored curve with the verdict: a clean convergence has none, the stalled
    and the diverged run have one the rules know, no later than the divergence."""
    store, _ = trained
    runs = collect(store, write=False).set_index("verdict")
    assert runs.loc["converged", "failure_mechanism"] == ""
    for verdict in ("stalled", "diverged"):
        assert runs.loc[verdict, "failure_mechanism"] in MECHANISMS, verdict
    diverged = runs.loc["diverged"]
    assert diverged["mechanism_step"] <= diverged["diverged_step"]
    assert set(runs["mechanism_rule"]) == {"m1"}


def test_a_damaged_diagnostics_column_costs_the_mechanism_not_the_verdict(trained, tmp_path):
    store, records = trained
    copy = shutil.copytree(store, tmp_path / "store")
    stalled = next(i for i, r in records.items() if r["verdict"] == "stalled")
    path = curve_path(copy, stalled)
    curve = pd.read_parquet(path)
    curve["grad_norm_by_layer"] = 1.0  # floats where per-block lists belong
    curve.to_parquet(path)
    row = collect(copy, write=False).set_index("cell_id").loc[stalled]
    assert row["judged_from"] == "curve" and row["verdict"] == "stalled"
    assert row["failure_mechanism"] == "unknown"


def test_cells_of_one_data_setting_that_read_different_text_are_named(trained, tmp_path, caplog):
    """A store trained under another Python before the stdlib corpus was pinned holds other
    text under the same ids: collect says so instead of pooling it silently."""
    store, records = trained
    assert collect(store, write=False).pipe(warn_mixed_corpora) == []
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    cell_id = next(iter(records))
    path = cell_dir(copy, cell_id) / "record.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "corpus_sha256": "f" * 64}))
    with caplog.at_level("WARNING", logger="suite.analyze.collect"):
        runs = collect(copy, write=False)
    assert len(runs) == 3  # still collected, every cell kept
    [message] = [r.getMessage() for r in caplog.records if "different text" in r.getMessage()]
    assert "ffffffffffff… in 1" in message and "max_bytes=300000" in message
    assert "stdlib corpus was pinned" in message
    # A damaged digest (not text) is no second corpus, and never breaks collect.
    path.write_text(json.dumps({**record, "corpus_sha256": 12345}))
    assert warn_mixed_corpora(collect(copy, write=False)) == []
