"""Summary functions on hand-made DataFrames with known answers."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from suite.store import RECORD_COLUMNS
from suite.summary import (
    best_val,
    diagnostics_table,
    format_summary,
    lr_sensitivity,
    max_stable_lr,
    per_lr_table,
    summarize,
    throughput_vs_preln,
)


def runs(rows):
    frame = pd.DataFrame(rows, columns=["variant", "depth", "lr", "seed", "verdict", "val_loss"])
    frame["status"] = "ok"
    frame["tokens_per_s"] = 1000.0
    frame["initial_loss"] = 5.5
    frame["final_loss"] = frame["val_loss"]
    return frame


def test_max_stable_lr_needs_every_seed_converged():
    frame = runs(
        [
            ("preln", 6, 1e-3, 0, "converged", 2.5),
            ("preln", 6, 1e-3, 1, "converged", 2.6),
            ("preln", 6, 1e-2, 0, "converged", 2.4),
            ("preln", 6, 1e-2, 1, "diverged", None),
            ("preln", 6, 1e-4, 0, "converged", 3.0),
            ("preln", 6, 1e-4, 1, "converged", 3.1),
        ]
    )
    assert max_stable_lr(frame).loc[("preln", 6)] == 1e-3


def test_max_stable_lr_is_nan_when_nothing_converged_and_top_lr_when_all_did():
    frame = runs(
        [
            ("postln", 24, 1e-3, 0, "stalled", 3.3),
            ("postln", 24, 1e-2, 0, "diverged", None),
            ("preln", 24, 1e-3, 0, "converged", 2.5),
            ("preln", 24, 1e-2, 0, "converged", 2.4),
        ]
    )
    result = max_stable_lr(frame)
    assert math.isnan(result.loc[("postln", 24)])
    assert result.loc[("preln", 24)] == 1e-2


def test_max_stable_lr_with_one_seed_and_a_gap():
    # Stable at 1e-2 even though 3e-3 failed: the definition is the largest all-converged LR.
    frame = runs(
        [
            ("x", 6, 1e-3, 0, "converged", 2.5),
            ("x", 6, 3e-3, 0, "stalled", 3.3),
            ("x", 6, 1e-2, 0, "converged", 2.4),
            ("x", 6, 3e-2, 0, "diverged", None),
        ]
    )
    assert max_stable_lr(frame).loc[("x", 6)] == 1e-2


def test_summarize_counts_percentages_and_errors():
    frame = runs(
        [
            ("postln", 6, 1e-3, 0, "converged", 2.5),
            ("postln", 6, 1e-2, 0, "stalled", 3.3),
            ("postln", 6, 3e-2, 0, "diverged", None),
            ("postln", 6, 3e-2, 1, "diverged", None),
        ]
    )
    errored = pd.DataFrame(
        [
            {
                "variant": "postln",
                "depth": 6,
                "lr": 1e-1,
                "seed": 0,
                "status": "error",
                "verdict": None,
            },
            # a cell still running (or interrupted) has no result yet, but did not raise
            {"variant": "postln", "depth": 6, "lr": 3e-1, "seed": 0, "status": "running"},
            {"variant": "postln", "depth": 6, "lr": 3e-1, "seed": 1, "status": "interrupted"},
        ]
    )
    table = summarize(pd.concat([frame, errored], ignore_index=True))
    row = table.loc[("postln", 6)]
    assert row["runs"] == 4
    assert (row["converged_%"], row["stalled_%"], row["diverged_%"]) == (25, 25, 50)
    assert row["errors"] == 1
    assert row["max_stable_lr"] == 1e-3
    assert row["best_val_loss"] == 2.5
    assert row["median_tokens_per_s"] == 1000.0
    text = format_summary(table)
    assert "postln" in text and "0.001" in text


def test_summarize_cell_with_only_errors_still_listed():
    errored = pd.DataFrame(
        [{"variant": "rezero", "depth": 6, "lr": 1e-1, "seed": 0, "status": "error"}]
    ).reindex(columns=RECORD_COLUMNS)  # as collect() gives it: every column, missing = NaN
    table = summarize(errored)
    assert table.loc[("rezero", 6), "errors"] == 1
    assert table.loc[("rezero", 6), "runs"] == 0
    assert "none" in format_summary(table)


def test_lr_sensitivity_by_hand():
    frame = runs(
        [
            ("x", 6, 1e-3, 0, "converged", 2.5),
            ("x", 6, 1e-3, 1, "converged", 2.7),  # ℓ = 2.6
            ("x", 6, 1e-2, 0, "converged", 2.4),
            ("x", 6, 1e-2, 1, "diverged", None),  # (2.4+5.5)/2
            ("x", 6, 1e-1, 0, "diverged", None),
            ("x", 6, 1e-1, 1, "diverged", None),  # ℓ0 = 5.5
        ]
    )
    expected = ((2.6 - 2.6) + (3.95 - 2.6) + (5.5 - 2.6)) / 3
    assert lr_sensitivity(frame).loc[("x", 6)] == pytest.approx(expected)


def test_lr_sensitivity_caps_losses_worse_than_init():
    frame = runs([("x", 6, 1e-3, 0, "converged", 2.0), ("x", 6, 1e-2, 0, "stalled", 9.0)])
    assert lr_sensitivity(frame).loc[("x", 6)] == pytest.approx((0 + 3.5) / 2)


def test_lr_sensitivity_edge_cases():
    all_diverged = runs([("x", 6, 1e-3, 0, "diverged", None), ("x", 6, 1e-2, 0, "diverged", None)])
    assert lr_sensitivity(all_diverged).loc[("x", 6)] == 0.0  # every LR equally (and fully) bad
    one_lr = runs([("x", 6, 1e-3, 0, "converged", 2.0)])
    assert lr_sensitivity(one_lr).loc[("x", 6)] == 0.0
    flat = runs([("x", 6, 1e-3, 0, "converged", 2.0), ("x", 6, 1e-2, 0, "converged", 2.0)])
    assert lr_sensitivity(flat).loc[("x", 6)] == 0.0


def test_best_val_loss_and_its_lr_use_the_seed_mean():
    frame = runs(
        [
            ("x", 6, 1e-3, 0, "converged", 2.0),
            ("x", 6, 1e-3, 1, "converged", 3.0),  # mean 2.5
            ("x", 6, 1e-2, 0, "converged", 2.2),
            ("x", 6, 1e-2, 1, "converged", 2.4),  # mean 2.3
        ]
    )
    row = best_val(frame).loc[("x", 6)]
    assert row["best_val_loss"] == pytest.approx(2.3) and row["best_lr"] == 1e-2


def test_throughput_ratio_to_preln_at_the_same_depth():
    frame = runs(
        [
            ("preln", 6, 1e-3, 0, "converged", 2.0),
            ("sandwich", 6, 1e-3, 0, "converged", 2.0),
            ("preln", 24, 1e-3, 0, "converged", 2.0),
            ("sandwich", 24, 1e-3, 0, "converged", 2.0),
        ]
    )
    frame["tokens_per_s"] = [1000.0, 800.0, 250.0, 125.0]
    ratio = throughput_vs_preln(frame)
    assert ratio.loc[("sandwich", 6)] == pytest.approx(0.8)
    assert ratio.loc[("sandwich", 24)] == pytest.approx(0.5)
    assert ratio.loc[("preln", 24)] == 1.0
    assert throughput_vs_preln(frame[frame["variant"] != "preln"]).isna().all()


def test_per_lr_table_divergence_rate_and_spread():
    frame = runs(
        [
            ("x", 6, 1e-3, 0, "converged", 2.0),
            ("x", 6, 1e-3, 1, "converged", 3.0),
            ("x", 6, 1e-2, 0, "converged", 2.0),
            ("x", 6, 1e-2, 1, "diverged", None),
        ]
    )
    table = per_lr_table(frame)
    assert table.loc[("x", 6, 1e-3), "divergence_rate"] == 0.0
    assert table.loc[("x", 6, 1e-3), "final_loss_mean"] == 2.5
    assert table.loc[("x", 6, 1e-3), "final_loss_std"] == 0.5
    assert table.loc[("x", 6, 1e-2), "divergence_rate"] == 0.5
    assert table.loc[("x", 6, 1e-2), "final_loss_mean"] == 2.0
    assert table.loc[("x", 6, 1e-2), "seeds"] == 2


def test_diagnostics_table_aggregates_per_variant_and_depth():
    frame = runs(
        [
            ("postln", 6, 1e-3, 0, "converged", 2.5),
            ("postln", 6, 1e-3, 1, "diverged", None),
            ("postln", 6, 1e-2, 0, "converged", 2.5),
            ("preln", 6, 1e-3, 0, "converged", 2.4),
        ]
    )
    frame["init_grad_norm_ratio"] = [1.0, 1.2, 2.0, 0.8]
    frame["max_attn_logit"] = [3.0, 9e4, 5.0, 2.0]
    frame["loss_spikes"] = [1, 0, 2, 0]
    frame["grad_spikes"] = [0, 3, 0, 0]
    frame["diagnostics_s"] = [1.0, 1.0, 3.0, 2.0]
    frame["wall_time_s"] = [50.0, 10.0, 100.0, 100.0]
    table = diagnostics_table(frame)
    postln = table.loc[("postln", 6)]
    assert postln["init_grad_norm_ratio"] == 1.2  # median of 1.0, 1.2, 2.0
    assert postln["max_attn_logit"] == 9e4
    assert (postln["loss_spikes"], postln["grad_spikes"]) == (3, 3)
    assert postln["diagnostics_%"] == pytest.approx(3.0)  # median of 2 %, 10 %, 3 %
    assert table.loc[("preln", 6), "diagnostics_%"] == pytest.approx(2.0)


def test_diagnostics_table_is_empty_for_runs_without_diagnostics():
    assert diagnostics_table(runs([("preln", 6, 1e-3, 0, "converged", 2.4)])).empty
