"""Summary functions on hand-made DataFrames with known answers."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from suite.analyze.summary import (
    best_val,
    diagnostics_table,
    format_summary,
    kaplan_meier,
    lr_sensitivity,
    max_stable_lr,
    median_escape_step,
    per_lr_table,
    summarize,
    throughput_vs_preln,
    unstable_below,
    wilson_interval,
)
from suite.record import RECORD_COLUMNS


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


# --- intervals, escape steps and flags ---------------------------------------------------------


def test_wilson_interval_known_values():
    # Reference values: Wilson (1927) score interval, z = 1.96.
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_summary_rates_carry_wilson_intervals_that_shrink_with_more_runs():
    few = runs([("x", 6, 1e-3, s, "converged" if s else "stalled", 2.5) for s in range(2)])
    many = runs([("x", 6, 1e-3, s, "converged" if s % 2 else "stalled", 2.5) for s in range(40)])
    small, large = summarize(few).loc[("x", 6)], summarize(many).loc[("x", 6)]
    assert small["converged_%"] == large["converged_%"] == 50
    for row in (small, large):
        assert row["converged_%_lo"] < 50 < row["converged_%_hi"]
    assert large["converged_%_hi"] - large["converged_%_lo"] < 0.5 * (
        small["converged_%_hi"] - small["converged_%_lo"]
    )


def test_kaplan_meier_censors_runs_that_never_escaped_at_their_budget():
    escape = pd.Series([10.0, 20.0, math.nan, math.nan])
    curve = kaplan_meier(escape, pd.Series([100] * 4))
    assert list(curve["step"]) == [0, 10, 20, 100]
    assert list(curve["on_plateau"]) == [1.0, 0.75, 0.5, 0.5]
    # A run censored early (a shorter budget) leaves the risk set without counting as an escape.
    curve = kaplan_meier(pd.Series([math.nan, 100.0, 150.0]), pd.Series([50, 200, 200]))
    assert list(curve["on_plateau"]) == [1.0, 1.0, 0.5, 0.0]


def test_median_escape_step_and_censored_median():
    frame = runs([("x", 6, 1e-3, s, "converged", 2.5) for s in range(4)])
    frame["steps"] = 200
    frame["escape_step"] = [30.0, 50.0, 70.0, math.nan]
    assert median_escape_step(frame) == 50
    frame["escape_step"] = [30.0, math.nan, math.nan, math.nan]
    assert math.isinf(median_escape_step(frame))  # more than half never left the plateau
    table = summarize(frame.assign(verdict="stalled"))
    assert ">200" in format_summary(table)


def test_summary_counts_borderline_and_relapsed_runs_and_shows_the_budget():
    frame = runs([("x", 6, 1e-3, s, "converged", 2.5) for s in range(3)])
    frame["steps"] = 400
    frame["escape_step"] = [30.0, 350.0, 40.0]
    frame["borderline"] = [False, True, False]
    frame["relapsed"] = [False, False, True]
    row = summarize(frame).loc[("x", 6)]
    assert (row["borderline"], row["relapsed"], row["steps"]) == (1, 1, "400")
    assert "borderline" in format_summary(summarize(frame))


def test_a_failing_lr_below_the_max_stable_lr_is_listed_not_hidden():
    frame = runs(
        [
            ("x", 6, 1e-3, 0, "converged", 2.5),
            ("x", 6, 3e-3, 0, "stalled", 3.3),
            ("x", 6, 1e-2, 0, "converged", 2.4),
            ("y", 6, 1e-3, 0, "converged", 2.5),
        ]
    )
    assert unstable_below(frame).loc[("x", 6)] == "0.003"
    assert ("y", 6) not in unstable_below(frame).index
    table = summarize(frame)
    assert table.loc[("x", 6), "max_stable_lr"] == 1e-2
    assert table.loc[("y", 6), "unstable_below"] == ""
    assert "0.01*" in format_summary(table) and "a lower LR" in format_summary(table)


def test_seed_bootstrap_intervals_of_lr_sensitivity_and_best_val_loss():
    frame = runs(
        [
            ("x", 6, 1e-3, 0, "converged", 2.5),
            ("x", 6, 1e-3, 1, "converged", 2.7),
            ("x", 6, 1e-2, 0, "converged", 2.9),
            ("x", 6, 1e-2, 1, "converged", 2.8),
        ]
    )
    row = summarize(frame).loc[("x", 6)]
    # Resampled seeds: {0} gives (0 + 0.4)/2 = 0.2, {1} gives 0.05, {0, 1} the estimate itself.
    assert (row["lr_sensitivity_lo"], row["lr_sensitivity_hi"]) == pytest.approx((0.05, 0.2))
    assert row["lr_sensitivity_lo"] <= row["lr_sensitivity"] <= row["lr_sensitivity_hi"]
    assert row["best_lr"] == 1e-3
    assert (row["best_val_loss_lo"], row["best_val_loss_hi"]) == pytest.approx((2.5, 2.7))


def test_bootstrap_interval_contains_the_estimate_when_seeds_disagree_on_the_best_lr():
    # Each seed alone has sensitivity 0.5; together both LRs average 1.5, sensitivity 0.
    frame = runs(
        [
            ("x", 6, 1e-3, 0, "converged", 1.0),
            ("x", 6, 1e-2, 0, "converged", 2.0),
            ("x", 6, 1e-3, 1, "converged", 2.0),
            ("x", 6, 1e-2, 1, "converged", 1.0),
        ]
    )
    row = summarize(frame).loc[("x", 6)]
    assert row["lr_sensitivity"] == 0
    assert row["lr_sensitivity_lo"] == 0 and row["lr_sensitivity_hi"] == pytest.approx(0.5)


def test_per_lr_table_and_summary_with_no_finished_run():
    errored = pd.DataFrame(
        [{"variant": "x", "depth": 6, "lr": 1e-3, "seed": 0, "status": "error"}]
    ).reindex(columns=RECORD_COLUMNS)
    assert per_lr_table(errored).empty
    assert summarize(errored).loc[("x", 6), "errors"] == 1


def test_zero_step_runs_have_no_escape_step_to_summarize():
    frame = runs([("x", 6, 1e-3, s, "untrained", None) for s in range(2)])
    frame["steps"] = 0
    assert math.isnan(median_escape_step(frame))


def test_runs_of_one_variant_at_two_of_its_own_settings_are_two_arms_not_one_row():
    """`+variant=dyt,derf variant.alpha_init=4` into a store that holds the default runs too:
    each variant's α₀ = 0.5 and α₀ = 4 runs must not be pooled; a setting every run of a
    variant shares stays out of its label; Muon and a Muon knob label the same way."""
    import json

    from suite.analyze.summary import with_arm_labels

    def run(variant, alpha=None, optimizer="adamw", momentum=0.95):
        params = {} if alpha is None else {"alpha_init": alpha}
        config = {"variant_params": params, "optim": {"name": optimizer, "momentum": momentum}}
        return {"variant": variant, "optimizer": optimizer, "config": json.dumps(config)}

    runs = pd.DataFrame(
        [run("dyt", 0.5), run("dyt", 4.0), run("preln"), run("preln", optimizer="muon"),
         run("preln", optimizer="muon", momentum=0.9), run("derf", 4.0), run("derf", 4.0)]
    )  # fmt: skip
    assert with_arm_labels(runs)["variant"].tolist() == [
        "dyt · alpha_init=0.5", "dyt · alpha_init=4.0", "preln",
        "preln · muon · momentum=0.95", "preln · muon · momentum=0.9", "derf", "derf",
    ]  # fmt: skip
