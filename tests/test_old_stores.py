"""A store written by an earlier release keeps working: it collects into the same table, and a
sweep with the same settings finds its cells finished (same cell ids) instead of re-training.

tests/data/store_v0_2_0 was written by suite 0.2.0 (commit e3cee3e) with
``python -m suite +variant=preln,postln sweep=tiny model.depth=2 train.steps=40``; its
runs.parquet is the table 0.2.0 collected from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from suite.analyze.collect import collect
from suite.launch.preflight import sweep_cells
from suite.store import finished_record

STORE_V0_2_0 = Path(__file__).parent / "data" / "store_v0_2_0"
ARGS_V0_2_0 = ["+variant=preln,postln", "sweep=tiny", "model.depth=2", "train.steps=40"]


def test_a_v0_2_0_store_collects_into_the_same_table(tmp_path):
    store = shutil.copytree(STORE_V0_2_0, tmp_path / "store")
    expected = pd.read_parquet(STORE_V0_2_0 / "runs.parquet")
    runs = collect(store, write=False)
    assert list(runs["cell_id"]) == list(expected["cell_id"])
    same = [column for column in expected.columns if column in runs.columns]
    assert set(expected.columns) - set(same) == set()
    # Columns added since, empty for an old store's records (none optional shows up empty).
    added = {
        "variant_revision",
        "amax_gain_forward",
        "amax_gain_backward",
        "value_residual",
        "optimizer",
        "parametrization",
        "base_depth",
        "cells_per_device",
        "backbone",
        "recipe",
        "weight_decay_mode",
        "no_decay",
        "diagnostics",
        "skip_spikes",
        "logit_softcap",
        "skipped_steps",
        "center_output_embedding",
        "mu_loss",
        "native_kernels",
    }
    # ... the failure mechanism, judged from each stored curve like the verdict ...
    judged = {"failure_mechanism", "mechanism_step", "signatures", "still_descending"}
    judged |= {"mechanism_rule"}
    # ... and one read from each record's config: none of them was packed.
    assert set(runs.columns) - set(expected.columns) == added | judged | {"packed"}
    assert runs[sorted(added)].isna().all().all()
    assert not runs["packed"].any()
    stalled = runs["verdict"] == "stalled"
    assert runs.loc[stalled, "failure_mechanism"].isin(["plateau", "still_descending"]).all()
    assert set(runs["mechanism_rule"]) == {"m1"}
    pd.testing.assert_frame_equal(
        runs[same].reset_index(drop=True), expected[same].reset_index(drop=True)
    )


def test_a_v0_2_0_store_resumes_without_re_training(tmp_path):
    store = shutil.copytree(STORE_V0_2_0, tmp_path / "store")
    cells = [cell for _, cell in sweep_cells([*ARGS_V0_2_0, f"store={store}"])]
    stored = sorted(path.name for path in (store / "cells").iterdir())
    assert sorted(cell.cell_id() for cell in cells) == stored
    assert all(finished_record(store, cell.cell_id()) is not None for cell in cells)


def test_a_fixed_variant_re_trains_only_its_own_cells_and_supersedes_the_old_results(
    tmp_path, monkeypatch
):
    """A fix that changes what a variant trains bumps its revision: its cells get new ids (the
    old results are not resumed), the other variants' ids stay, collect names the outdated rows
    until they are re-run, and then keeps the new revision's result for each cell."""
    import json

    import variants
    from suite.analyze.collect import latest_per_cell, report_text

    store = shutil.copytree(STORE_V0_2_0, tmp_path / "store")
    monkeypatch.setattr(variants.get("preln"), "revision", 2)
    cells = [cell for _, cell in sweep_cells([*ARGS_V0_2_0, f"store={store}"])]
    resumed = {cell.variant for cell in cells if finished_record(store, cell.cell_id())}
    assert resumed == {"postln"}

    runs = collect(store, write=False)
    assert "2 preln cell(s) were trained by an earlier revision of preln" in report_text(runs)

    old = json.loads(next((store / "cells").glob("preln-*/record.json")).read_text())
    new = {
        **old,
        "cell_id": "preln-new",
        "started_at": "2000-01-01T00:00:00+00:00",  # older clock, newer revision: still wins
        "config": {**old["config"], "variant_revision": 2},
    }
    assert latest_per_cell([old, new]) == [new]


def test_a_v0_2_0_store_is_comparable_with_one_written_today(tmp_path):
    """Compare fills a setting an old record lacks with the default it trained at: an old
    store's Pre-LN against today's records of the same cells is not refused (recipe, optimizer,
    no_decay and packed are record columns whose config field is named or placed otherwise)."""
    import torch

    from suite.analyze.compare import Side, check_comparable
    from suite.run.runner import base_record

    old = collect(shutil.copytree(STORE_V0_2_0, tmp_path / "store"), write=False)
    old = old[old["variant"] == "preln"]
    cells = [cell for _, cell in sweep_cells([*ARGS_V0_2_0, f"store={tmp_path / 'new'}"])]
    today = pd.DataFrame(
        [base_record(cell, torch.device("cpu")) for cell in cells if cell.variant == "preln"]
    )
    assert set(today["cell_id"]) == set(old["cell_id"])
    today["corpus_sha256"] = old["corpus_sha256"].iloc[0]  # the record's corpus comes at training
    check_comparable(Side("preln in 0.2.0", old), Side("preln today", today))
